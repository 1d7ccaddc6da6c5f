"""A threaded HTTP server on a private unix socket: the base of the qemu executor's guest services.

The metadata server and the GCS server are both one of these: started in a thread of their own,
closed by joining every request thread, and reached by the guest through QEMU's guestfwd, which
starts `socat - UNIX-CONNECT:SOCKET` for each guest connection (as this uid: QEMU is our child).

Only this uid reaches them. They once listened on 127.0.0.1: any local user found the port in
/proc/net/tcp and read the service-account token, the user-data and, with the token, the build
context. Now each server binds `DIR/http.sock`, where DIR is a fresh `mkdtemp` directory (mode
0700, owned by this uid; another uid's connect() fails with EACCES), and every connection is
accepted only when its peer credentials (SO_PEERCRED) carry this process's uid. No abstract
socket, no TCP port, no secret on a command line. Standard library only.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from cos_customizer.errors import CustomizerError

SOCKET_NAME = "http.sock"
SOCKET_PATH_MAX = 107  # bytes of sun_path, less its terminating NUL
SOCKET_BASE_MAX = 60  # characters of $TMPDIR that leave room for the socket names below it
# What QEMU's guestfwd command (split as a shell would, without one) and socat's address syntax take as they
# are: no space, quote, comma, colon or "!!".
SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ServerError(CustomizerError):
    """A server of the rehearsal cannot be started where it was asked to listen."""


def socket_base() -> str:
    """Where private socket directories go: $TMPDIR when its path is short and plain, else /tmp."""
    base = tempfile.gettempdir()
    return base if len(base) <= SOCKET_BASE_MAX and SAFE_PATH.fullmatch(base) else "/tmp"


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a unix stream connection (as the kernel saw it at connect)."""
    _pid, uid, _gid = _UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False  # server_close() joins the request threads
    block_on_close = True
    request_queue_size = 64

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> bool:
        """Only this uid's connections are served (the directory already keeps the others out)."""
        return isinstance(request, socket.socket) and peer_uid(request) == os.geteuid()


class PrivateHttpServer:
    """Serves `handler_class()` on a unix socket in a private directory once started; a context manager.

    `socket_parent` is where the private directory is made (the build's own 0700 run directory, say);
    by default under `socket_base()`. `close()` removes the directory with the socket.
    """

    name = "server"  # for the error when the socket is asked of a server that is not running
    prefix = "cos-http."  # of the private directory's name

    def __init__(self, socket_parent: Path | None = None) -> None:
        self.socket_parent = socket_parent
        self._httpd: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._directory: Path | None = None

    def handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        parent = os.fspath(self.socket_parent) if self.socket_parent is not None else socket_base()
        directory = Path(tempfile.mkdtemp(prefix=self.prefix, dir=parent))  # 0700, ours
        path = directory / SOCKET_NAME
        try:
            if len(os.fsencode(path)) > SOCKET_PATH_MAX or not SAFE_PATH.fullmatch(os.fspath(path)):
                raise ServerError(
                    f"the {self.name} cannot listen at {path}: a socket path for QEMU must be at most "
                    f"{SOCKET_PATH_MAX} bytes of letters, digits and _./+- (set TMPDIR to a short plain directory)"
                )
            httpd = _UnixHTTPServer(os.fspath(path), self.handler_class())
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        os.chmod(path, 0o600)
        self._httpd, self._directory = httpd, directory
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def closing(self) -> None:
        """Called first by `close()`: release what request threads wait for."""

    def stopped_serving(self) -> None:
        """Called by `close()` once no new request is accepted, before the request threads are joined."""

    def close(self) -> None:
        """Stop serving, wait for every request thread, remove the socket's directory."""
        self.closing()
        if self._httpd is not None:
            self._httpd.shutdown()
            self.stopped_serving()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._directory is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._directory)
        self._httpd = self._thread = self._directory = None

    @property
    def socket(self) -> Path:
        """The unix socket the server listens on (in its private directory)."""
        if self._directory is None:
            raise RuntimeError(f"the {self.name} is not running")
        return self._directory / SOCKET_NAME
