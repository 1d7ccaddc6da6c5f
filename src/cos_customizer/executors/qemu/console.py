"""The interactive console of `cos-customizer boot`: the guest's serial port 1 on this terminal.

Without a success match, `boot` is a console. QEMU listens for serial port 1 on a unix socket in
the instance's private directory (`Machine.console_socket`; the port is still logged to the console
file), and `Console` relays it to this process's standard input and output: a thread connects to
each boot's socket (a reboot starts a fresh QEMU, so it connects again) and copies both ways.

While attached to a terminal, the terminal's input is raw (keys reach the guest as typed: Ctrl-C
stops the guest's command, not this tool) and its output keeps its newline handling; `close`
restores the terminal whatever ended the run. Ctrl-] (`ESCAPE`) stops the VM at once: its disk is
a throw-away working copy, so nothing is lost. A `poweroff` in the guest ends the run too.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

ESCAPE = b"\x1d"  # Ctrl-]
ESCAPE_NAME = "Ctrl-]"
CONNECT_WAIT = 10.0  # seconds a boot's QEMU has to create its console socket
POLL = 0.2  # seconds between looks at whether the relay should end


class Console:
    """Relays a machine's serial port 1 to `stdin`/`stdout` (file descriptors) until `close`."""

    def __init__(self, on_escape: Callable[[], None], *, stdin: int = 0, stdout: int = 1) -> None:
        self.on_escape = on_escape
        self.stdin, self.stdout = stdin, stdout
        self.escaped = False
        self._input = True  # false once standard input ended (not a terminal): the guest's output is still shown
        self._closed = threading.Event()
        self._saved: list[object] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def attach(self, path: Path, alive: Callable[[], bool]) -> None:
        """Relay the socket at `path` (one boot's) once QEMU listens on it; the previous relay has ended or ends."""
        thread = threading.Thread(target=self._relay, args=(path, alive), daemon=True, name="console")
        with self._lock:
            previous, self._thread = self._thread, thread
        if previous is not None:
            previous.join()
        self._raw()
        thread.start()

    def _raw(self) -> None:
        if self._saved is not None or not os.isatty(self.stdin):
            return
        with contextlib.suppress(termios.error):
            self._saved = termios.tcgetattr(self.stdin)
            tty.setraw(self.stdin, termios.TCSANOW)
            if os.isatty(self.stdout):  # keep "\n" -> "\r\n" for what this tool prints meanwhile
                mode = termios.tcgetattr(self.stdout)
                mode[1] |= termios.OPOST | termios.ONLCR
                termios.tcsetattr(self.stdout, termios.TCSANOW, mode)

    def _connect(self, path: Path, alive: Callable[[], bool]) -> socket.socket | None:
        deadline = time.monotonic() + CONNECT_WAIT
        while not self._closed.is_set() and alive() and time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                return sock
            except OSError:
                sock.close()
                time.sleep(0.02)
        return None

    def _relay(self, path: Path, alive: Callable[[], bool]) -> None:
        sock = self._connect(path, alive)
        if sock is None:
            return
        with sock:
            while not self._closed.is_set():
                ready, _, _ = select.select(
                    [sock.fileno(), self.stdin] if self._input else [sock.fileno()], [], [], POLL
                )
                if sock.fileno() in ready:
                    data = sock.recv(65536)
                    if not data:
                        return  # this boot's QEMU is gone
                    with contextlib.suppress(OSError):
                        os.write(self.stdout, data)
                if self.stdin in ready:
                    data = os.read(self.stdin, 4096)
                    if ESCAPE in data:
                        with contextlib.suppress(OSError):
                            sock.sendall(data.split(ESCAPE, 1)[0])
                        self.escaped = True
                        self.on_escape()
                        return
                    if not data:
                        self._input = False
                        continue
                    with contextlib.suppress(OSError):
                        sock.sendall(data)

    def close(self) -> None:
        """End the relay and give the terminal back as it was."""
        self._closed.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(POLL * 5)
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
            self._saved = None
