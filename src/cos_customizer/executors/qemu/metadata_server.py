"""A local GCE metadata server: what the guest of a rehearsed GCE build reads at 169.254.169.254.

`MetadataServer` listens on a unix socket in a private directory (`loopback_http`:
only this uid can connect; QEMU's guestfwd takes the guest's connections there
through socat) and answers the metadata server's v1 API as Compute Engine does
for what the build's guest uses:

- every request needs `Metadata-Flavor: Google` (403 otherwise, and 403 for a
  request carrying `X-Forwarded-For`, i.e. one that came through a proxy);
  every answer carries `Metadata-Flavor: Google` and an `ETag`;
- values under `/computeMetadata/v1/`: `instance/attributes/KEY`,
  `instance/id`, `instance/zone` (`projects/NUMBER/zones/ZONE`),
  `instance/hostname`, `instance/name`, `instance/service-accounts/default/email`,
  `project/project-id`, `project/numeric-project-id`, `project/attributes/KEY`;
  a directory with a trailing slash lists its entries, one a line, or with
  `?recursive=true` (any case) is one JSON object (what cloud-init's GCE
  datasource reads `user-data` from); a directory without the slash is a 301
  to it; anything else is 404;
- `instance/service-accounts/default/token` (or the account's email for
  `default`, as on GCE): `{"access_token", "expires_in",
  "token_type"}` with a configurable token, so a GCS stand-in can require it;
- `?wait_for_change=true` holds the request until the answer's ETag differs
  from `last_etag=` (when given; otherwise from the ETag the answer had when the
  request arrived), or until `timeout_sec=` passes, then answers the current
  value with its ETag. A changed `last_etag` answers at once. `close()`
  releases held requests with 503.

`set_attributes()` is what Daisy's `UpdateInstancesMetadata` does (it merges
keys; `None` removes one) and wakes the held requests. `requests` records what
was asked, for tests. Standard library only.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cos_customizer.executors.qemu.loopback_http import PrivateHttpServer

PREFIX = "/computeMetadata/v1/"
FLAVOR = ("Metadata-Flavor", "Google")
TOKEN_PATH = "instance/service-accounts/default/token"

Tree = dict[str, "Tree | str | int"]


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: its path, its query, its Metadata-Flavor header, the answer's status."""

    path: str
    query: dict[str, str]
    flavor: str | None
    status: int


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/text"
    location: str | None = None

    @property
    def etag(self) -> str:
        """GCE's ETags are 16 hex digits that change with the content; so are these."""
        return hashlib.sha256(b"%d\0%s" % (self.status, self.body)).hexdigest()[:16]


def _true(value: str | None) -> bool:
    return value is not None and value.lower() == "true"


def _camel(key: str) -> str:
    """GCE's recursive JSON names built-in entries in camelCase (service-accounts -> serviceAccounts)."""
    return re.sub(r"-([a-z])", lambda m: m.group(1).upper(), key)


def _json(node: Tree, literal: bool) -> object:
    """A directory as GCE's recursive JSON: attribute names as they are, built-in names camelCased."""
    out: dict[str, object] = {}
    for key, value in node.items():
        name = key if literal else _camel(key)
        out[name] = _json(value, literal or key == "attributes") if isinstance(value, dict) else value
    return out


class MetadataServer(PrivateHttpServer):
    """A GCE metadata server for one instance; a context manager (start on enter, close on exit)."""

    name = "metadata server"
    prefix = "md."  # short: QEMU's socket paths must stay under 108 bytes

    def __init__(
        self,
        attributes: Mapping[str, str] | None = None,
        *,
        project_attributes: Mapping[str, str] | None = None,
        project_id: str = "cos-customizer-local",
        project_number: int = 123456789012,
        zone: str = "local-zone-a",
        name: str = "inst-build",
        instance_id: int = 4242424242424242424,
        hostname: str | None = None,
        token: str = "ya29.local-metadata-token",
        token_lifetime: int = 3599,
        email: str | None = None,
        socket_parent: Path | None = None,
    ) -> None:
        self.token = token
        self.token_lifetime = token_lifetime
        self.email = email or f"{project_number}-compute@developer.gserviceaccount.com"
        account: Tree = {
            "email": self.email,
            "aliases": "default",
            "scopes": "https://www.googleapis.com/auth/cloud-platform",
        }
        self.requests: list[Request] = []
        self.waiting = 0  # requests held by wait_for_change now
        self._instance_attributes: dict[str, str] = dict(attributes or {})
        self._project_attributes: dict[str, str] = dict(project_attributes or {})
        self._fixed_instance: Tree = {
            "id": instance_id,
            "name": name,
            "hostname": hostname or f"{name}.{zone}.c.{project_id}.internal",
            "zone": f"projects/{project_number}/zones/{zone}",
            # GCE lists the account under "default" and under its email; clients use both names.
            "service-accounts": {"default": account, self.email: account},
        }
        self._fixed_project: Tree = {"project-id": project_id, "numeric-project-id": project_number}
        self._changed = threading.Condition()
        self._closed = False
        super().__init__(socket_parent)

    # -- life cycle (PrivateHttpServer's, with this hook)

    def handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _handler(self)

    def closing(self) -> None:
        """Release the requests held by wait_for_change (503)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- state

    def set_attributes(self, updates: Mapping[str, str | None], project: bool = False) -> None:
        """Merge `updates` into the instance (or project) attributes, None removing a key; wakes waiters."""
        with self._changed:
            target = self._project_attributes if project else self._instance_attributes
            for key, value in updates.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
            self._changed.notify_all()

    def attributes(self, project: bool = False) -> dict[str, str]:
        with self._changed:
            return dict(self._project_attributes if project else self._instance_attributes)

    # -- answers

    def _tree(self) -> Tree:
        instance: Tree = {**self._fixed_instance, "attributes": {**self._instance_attributes}}
        project: Tree = {**self._fixed_project, "attributes": {**self._project_attributes}}
        return {"instance": instance, "project": project}

    def answer(self, path: str, query: Mapping[str, str]) -> Answer:
        """The answer to GET /computeMetadata/v1/PATH?QUERY now (call with the condition held)."""
        if path in (TOKEN_PATH, f"instance/service-accounts/{self.email}/token"):
            token = {"access_token": self.token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
            return Answer(200, json.dumps(token).encode(), "application/json")
        node: Tree | str | int = self._tree()
        parts = path.split("/")
        directory = path == "" or path.endswith("/")
        for part in parts[:-1] if directory else parts:
            if not isinstance(node, dict) or part not in node:
                return Answer(404, b"Not Found\n", "text/html")
            node = node[part]
        if not isinstance(node, dict):
            if directory:
                return Answer(404, b"Not Found\n", "text/html")
            if query.get("alt") == "json":
                return Answer(200, json.dumps(node).encode(), "application/json")
            return Answer(200, str(node).encode())
        if not directory:
            return Answer(301, b"", location=f"{PREFIX}{path}/")
        if _true(query.get("recursive")):
            literal = parts[-2:-1] == ["attributes"]
            return Answer(200, json.dumps(_json(node, literal)).encode(), "application/json")
        lines = "".join(f"{key}/\n" if isinstance(value, dict) else f"{key}\n" for key, value in node.items())
        return Answer(200, lines.encode())

    def respond(self, path: str, query: Mapping[str, str]) -> Answer:
        """The answer, after holding the request as `wait_for_change` asks."""
        with self._changed:
            answer = self.answer(path, query)
            if not _true(query.get("wait_for_change")):
                return answer
            try:
                timeout = float(query["timeout_sec"]) if "timeout_sec" in query else None
            except ValueError:
                return Answer(400, b"timeout_sec must be a number\n")
            if timeout is not None and timeout < 0:
                return Answer(400, b"timeout_sec must not be negative\n")
            last = query.get("last_etag") or answer.etag
            deadline = None if timeout is None else time.monotonic() + timeout
            self.waiting += 1
            try:
                while answer.etag == last:
                    if self._closed:
                        return Answer(503, b"metadata server shutting down\n")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._changed.wait(remaining)
                    answer = self.answer(path, query)
                return answer
            finally:
                self.waiting -= 1

    def record(self, request: Request) -> None:
        with self._changed:
            self.requests.append(request)


def _handler(server: MetadataServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "Metadata Server for VM"
        sys_version = ""
        timeout = 30  # a connection that never sends its request does not hold close() forever

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            path = url.path[len(PREFIX) :] if url.path.startswith(PREFIX) else None
            flavor = self.headers.get("Metadata-Flavor")
            if flavor != "Google":
                answer = Answer(403, b"Missing Metadata-Flavor:Google header.\n", "text/html")
            elif "X-Forwarded-For" in self.headers:
                answer = Answer(403, b"Request with X-Forwarded-For header refused.\n", "text/html")
            elif path is None:
                answer = Answer(404, b"Not Found\n", "text/html")
            else:
                answer = server.respond(path, query)
            server.record(Request(url.path, query, flavor, answer.status))
            self.send_response(answer.status)
            self.send_header(*FLAVOR)
            self.send_header("ETag", answer.etag)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            if answer.location:
                self.send_header("Location", answer.location)
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *_args: object) -> None:
            pass

    return Handler
