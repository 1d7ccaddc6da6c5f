"""A read-only GCS JSON API server over the qemu executor's GCS stand-in, for the guest of a rehearsed GCE build.

On GCE the build's guest (the provisioner) reads `gs://` objects (build contexts, the Anthos
installer release) through the GCS JSON API with the default service account's access token from
the metadata server (`provisioner/download.py`). The qemu executor keeps its GCS as a plain
directory tree `ROOT/BUCKET/OBJECT/PATH` (`qemu_resources.Resources.gcs`); `GcsServer` serves that
tree on a unix socket in a private directory (`loopback_http`: only this uid can connect; QEMU's
guestfwd takes the guest's connections there through socat, and the guest's `STORAGE_EMULATOR_HOST`
names the guest-side address). Product code cannot use the gcp-storage-emulator
package: it is a dev dependency, and it keeps objects in its own format, not as plain files.

Served, as GCS answers them (what the provisioner and google-cloud-storage's download path use):

- `GET /storage/v1/b/BUCKET/o/OBJECT?alt=media` and `GET /download/storage/v1/b/...?alt=media`
  (the provisioner's address and google-cloud-storage's): the object's bytes, streamed in chunks
  with `Content-Length`; one `Range: bytes=A-B` / `A-` / `-N` gives 206 with `Content-Range`
  (416 when unsatisfiable), which google-resumable-media sends for partial and resumed downloads;
- `GET /storage/v1/b/BUCKET/o/OBJECT` without `alt=media`: the object's JSON resource (`name`,
  `bucket`, `size` as a string, `generation` from the file's mtime, `selfLink` and `mediaLink` on
  the request's `Host`, ...); `generation=` in the
  query must match (404 otherwise, as for an older generation);
- everything needs `Authorization: Bearer TOKEN` (the metadata server's token): 401 with a GCS
  JSON error when it is missing or wrong, checked before anything else; 404 (GCS JSON) for a
  missing bucket or object, 400 for a name no object can have; any method but GET is 405.
  The rest of the API (listing, buckets.get, ...) is 501: nothing in the guest uses it (the GPU
  installer's deps come over public https, not this API; google-cloud-storage only looks buckets
  up in the background, for its telemetry).

Object names are the tree's relative paths: a name with an empty, `.` or `..` segment or a NUL is
refused (400), and the file is opened one component at a time from the root with `O_NOFOLLOW`
(and directories with `O_DIRECTORY`), so a symlink anywhere in the tree is never followed (GCS has
no symlinks; the executor writes plain files) and nothing outside the root is ever read. Only
regular files are objects. `requests` records every request (method, path, query, whether its
token was right, the status sent) for tests, before the answer goes out. Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import hmac
import http.server
import json
import os
import re
import socket
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cos_customizer.executors.qemu.loopback_http import PrivateHttpServer

# As qemu_resources.BUCKET (not imported: qemu_resources may well come to import this module).
BUCKET = re.compile(r"[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]")
OBJECT_PATH = re.compile(r"/(download/)?storage/v1/b/([^/]+)/o/(.+)")
API_PATH = re.compile(r"/storage/v1(/.*)?")
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 1 << 20
MAX_NAME_BYTES = 1024  # GCS's limit on an object name (UTF-8)
HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")  # a Host header's value


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: method, URL path (still encoded), query, right token or not, status."""

    method: str
    path: str
    query: dict[str, str]
    authorized: bool
    status: int


class Refusal(Exception):
    """An error answer, as GCS gives it: `{"error": {"code", "message", "errors": [...]}}`."""

    def __init__(self, status: int, message: str, reason: str, **where: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.where = where

    def body(self) -> bytes:
        error = {"message": self.message, "domain": "global", "reason": self.reason, **self.where}
        return json.dumps({"error": {"code": self.status, "message": self.message, "errors": [error]}}).encode()


def _rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _unquote(text: str, what: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError as err:
        raise Refusal(400, f"The {what} is not valid UTF-8.", "invalid") from err


def check_name(name: str) -> list[str]:
    """The path segments of an object name the tree can hold; Refusal(400) for any other name."""
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise Refusal(400, f"Invalid object name: {name!r}", "invalid")
    return parts


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """[first, last] of a single `Range: bytes=...` header; None for the whole object (no or unparsable header)."""
    match = RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if size == 0:
        raise Refusal(416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable")
    if first == "":  # bytes=-N: the last N bytes
        if int(last) == 0:
            raise Refusal(416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable")
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise Refusal(416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable")
    return start, end


class GcsServer(PrivateHttpServer):
    """A read-only GCS JSON API over `root/BUCKET/OBJECT`; a context manager (start on enter, close on exit)."""

    name = "GCS server"
    prefix = "gcs."  # short: QEMU's socket paths must stay under 108 bytes

    def __init__(self, root: Path, token: str, *, socket_parent: Path | None = None) -> None:
        if not token:
            raise ValueError("the GCS server needs a token to require")
        self.root = Path(root)
        self.token = token
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        super().__init__(socket_parent)

    # -- life cycle (PrivateHttpServer's, with these hooks)

    def handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _handler(self)

    def start(self) -> None:
        self._closed.clear()
        super().start()

    def closing(self) -> None:
        self._closed.set()

    def stopped_serving(self) -> None:
        """Cut the connections still open (a stalled client too)."""
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # -- answers

    def authorized(self, header: str | None) -> bool:
        scheme, _, credentials = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    @contextlib.contextmanager
    def open_object(self, bucket: str, name: str) -> Iterator[tuple[int, os.stat_result]]:
        """The open file (descriptor, stat) of object `name` in `bucket`, never through a symlink; Refusal otherwise."""
        if not BUCKET.fullmatch(bucket):
            raise Refusal(400, f"Invalid bucket name: {bucket!r}", "invalid")
        parts = check_name(name)
        directory = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        # O_NONBLOCK: opening a FIFO must not hang; a regular file's reads are not affected.
        file = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                fds.append(os.open(bucket, directory, dir_fd=fds[-1]))
            except OSError as err:
                raise Refusal(404, "The specified bucket does not exist.", "notFound") from err
            missing = Refusal(404, f"No such object: {bucket}/{name}", "notFound")
            try:
                for part in parts[:-1]:
                    fds.append(os.open(part, directory, dir_fd=fds[-1]))
                fds.append(os.open(parts[-1], file, dir_fd=fds[-1]))
            except OSError as err:  # ENOENT, ENOTDIR, ELOOP (a symlink), EACCES: no such object here
                raise missing from err
            info = os.fstat(fds[-1])
            if not stat.S_ISREG(info.st_mode):
                raise missing
            yield fds[-1], info
        finally:
            for fd in reversed(fds):
                os.close(fd)

    def resource(self, bucket: str, name: str, info: os.stat_result, host: str | None) -> dict[str, str]:
        """The object's JSON resource, as objects.get answers it; its links on `host` (the request's Host)."""
        endpoint = f"http://{host if host and HOST.fullmatch(host) else 'localhost'}"
        generation = str(info.st_mtime_ns // 1000)
        quoted = f"b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{generation}",
            "selfLink": f"{endpoint}/storage/v1/{quoted}",
            "mediaLink": f"{endpoint}/download/storage/v1/{quoted}?generation={generation}&alt=media",
            "name": name,
            "bucket": bucket,
            "generation": generation,
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(info.st_size),
            "timeCreated": _rfc3339(info.st_mtime),
            "updated": _rfc3339(info.st_mtime),
            "timeStorageClassUpdated": _rfc3339(info.st_mtime),
            "etag": f"CL{generation}EAE=",
        }


def _handler(server: GcsServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.0 (the default): one request a connection, so an idle client connection cannot hold close().
        server_version = "UploadServer"
        sys_version = ""
        timeout = 60  # a connection that stalls does not hold close() forever

        _seen: tuple[str, dict[str, str], bool] | None = None  # path, query, authorized

        def setup(self) -> None:
            super().setup()
            server.track(self.connection, True)
            if server.closed:  # accepted while close() was cutting the others
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                server.track(self.connection, False)

        def __getattr__(self, name: str) -> object:
            # BaseHTTPRequestHandler calls do_<METHOD>; every method but GET is refused the same way.
            if name.startswith("do_"):
                return self._other
            raise AttributeError(name)

        def do_GET(self) -> None:
            self._serve(self._get)

        def _other(self) -> None:
            def refuse(_path: str, _query: dict[str, str]) -> None:
                message = f"Method {self.command} is not allowed: this GCS is read-only."
                raise Refusal(405, message, "methodNotAllowed")

            self.close_connection = True  # a request body, if any, is not read
            self._serve(refuse)

        def send_response(self, code: int, message: str | None = None) -> None:
            # Recorded before the client can see any of the answer, so a test reads it once its request returns.
            if self._seen is not None:
                server.record(Request(self.command, *self._seen, code))
            super().send_response(code, message)

        def _serve(self, answer: Callable[[str, dict[str, str]], None]) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            authorized = server.authorized(self.headers.get("Authorization"))
            self._seen = (url.path, query, authorized)
            try:
                if not authorized:
                    where = {"locationType": "header", "location": "Authorization"}
                    if "Authorization" in self.headers:
                        raise Refusal(401, "Invalid Credentials", "authError", **where)
                    raise Refusal(401, "Anonymous caller: this bucket is private.", "required", **where)
                answer(url.path, query)
            except Refusal as refusal:
                self._error(refusal)
            except (ConnectionError, TimeoutError):  # the client went away, or close() cut the transfer
                self.close_connection = True

        def _error(self, refusal: Refusal) -> None:
            body = refusal.body()
            self.send_response(refusal.status)
            if refusal.status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _get(self, path: str, query: dict[str, str]) -> None:
            match = OBJECT_PATH.fullmatch(path)
            if match is None:
                if API_PATH.fullmatch(path):
                    raise Refusal(501, "This GCS serves objects.get only.", "notImplemented")
                raise Refusal(404, "Not Found", "notFound")
            media = query.get("alt") == "media"
            if match.group(1) and not media:
                raise Refusal(400, "The download path needs alt=media.", "invalid")
            bucket, name = _unquote(match.group(2), "bucket name"), _unquote(match.group(3), "object name")
            with server.open_object(bucket, name) as (fd, info):
                resource = server.resource(bucket, name, info, self.headers.get("Host"))
                if "generation" in query and query["generation"] != resource["generation"]:
                    raise Refusal(404, f"No such object: {bucket}/{name}", "notFound")
                if media:
                    self._media(fd, info.st_size, resource)
                else:
                    self._json(resource)

        def _json(self, value: object) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _media(self, fd: int, size: int, resource: dict[str, str]) -> None:
            span = _range(self.headers.get("Range"), size)
            first, last = span if span is not None else (0, size - 1)
            self.send_response(200 if span is None else 206)
            self.send_header("Content-Type", resource["contentType"])
            self.send_header("Content-Length", str(last - first + 1))
            if span is not None:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", resource["etag"])
            self.send_header("X-Goog-Generation", resource["generation"])
            self.send_header("X-Goog-Metageneration", resource["metageneration"])
            self.send_header("X-Goog-Stored-Content-Length", resource["size"])
            self.send_header("X-Goog-Stored-Content-Encoding", "identity")
            self.end_headers()
            offset, remaining = first, last - first + 1
            while remaining > 0:
                if server.closed:
                    raise ConnectionResetError("the GCS server is closing")
                chunk = os.pread(fd, min(CHUNK, remaining), offset)
                if not chunk:  # the file shrank under us: cut the answer short rather than pad it
                    self.close_connection = True
                    break
                self.wfile.write(chunk)
                offset += len(chunk)
                remaining -= len(chunk)

        def log_message(self, *_args: object) -> None:
            pass

    return Handler
