"""A threaded HTTP server on 127.0.0.1 with a random port: the base of the qemu executor's guest services.

The metadata server and the GCS server are both one of these: started in a
thread of their own, closed by joining every request thread, and reached by
the guest through QEMU's guestfwd on the port they got. Standard library only.
"""

from __future__ import annotations

import http.server
import threading
from types import TracebackType
from typing import Self


class LoopbackServer:
    """Serves `handler_class()` on 127.0.0.1 once started; a context manager (start on enter, close on exit)."""

    name = "server"  # for the error when the port is asked of a server that is not running

    def __init__(self) -> None:
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

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
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        httpd.daemon_threads = False  # server_close() joins the request threads
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def closing(self) -> None:
        """Called first by `close()`: release what request threads wait for."""

    def stopped_serving(self) -> None:
        """Called by `close()` once no new request is accepted, before the request threads are joined."""

    def close(self) -> None:
        """Stop serving and wait for every request thread."""
        self.closing()
        if self._httpd is not None:
            self._httpd.shutdown()
            self.stopped_serving()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"the {self.name} is not running")
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        """host:port, as GCE_METADATA_HOST and STORAGE_EMULATOR_HOST take it."""
        return f"127.0.0.1:{self.port}"
