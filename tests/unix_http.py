"""HTTP to the rehearsal's servers, which listen on unix sockets only (`executors.qemu.loopback_http`).

`UnixHTTPConnection` speaks to a socket directly. Clients that only take host:port (google-auth, the
provisioner's `GCE_METADATA_HOST` and `STORAGE_EMULATOR_HOST`) go through `tcp_bridge`, a test-only
relay from a loopback port to the socket, standing where QEMU's guestfwd and socat stand for the guest.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from cos_customizer.executors.local import relay


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.unix_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@contextlib.contextmanager
def tcp_bridge(path: Path) -> Iterator[str]:
    """The address 127.0.0.1:PORT, each connection to it relayed to the unix socket `path` (for the test's life only)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            relay.splice_to_unix(conn, os.fspath(path))

    thread = threading.Thread(target=accept, daemon=True, name="tcp-bridge")
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)
