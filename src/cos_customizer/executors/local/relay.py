"""Byte relays between the build's sandbox and the host, in threads of the stage.

* `Watcher`: waits for the first client on listening sockets (socket activation) and calls back once.
* `splice`: copies both ways between two connected sockets, half-closes passed on.
* `LoopbackForwarder` (`-allow-host-loopback`): the host's loopback TCP services appear in the
  build's network namespace at the same addresses (127.0.0.1:PORT, [::1]:PORT), so
  `docker pull localhost:5000/img` in a script reaches the registry the user runs on their machine,
  as pasta's port forwarding does. The listening sockets are made inside the namespace; each
  connection is answered by a connection from the host's side to the same port.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cos_customizer import linux

CHUNK = 1 << 16
LISTEN = "0A"


class Watcher:
    """Calls `on_first` (in its own thread) the first time any of `listeners` has a client waiting."""

    def __init__(self, on_first: Callable[[], None], listeners: list[socket.socket]) -> None:
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(on_first, listeners), daemon=True, name="watcher")
        self._thread.start()

    def _run(self, on_first: Callable[[], None], listeners: list[socket.socket]) -> None:
        fds = [listener.fileno() for listener in listeners]
        readable, _, _ = select.select([*fds, self._stop_r], [], [])
        if self._stop_r not in readable:
            on_first()

    def close(self) -> None:
        """Stop watching; waits for a running `on_first` to return."""
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)


def accept_pending(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting on `listener` now, accepted."""
    accepted = []
    listener.setblocking(False)
    try:
        while True:
            conn, _ = listener.accept()
            conn.setblocking(True)
            accepted.append(conn)
    except BlockingIOError:
        pass
    finally:
        listener.setblocking(True)
    return accepted


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy a -> b and b -> a in two threads until both sides are done; then close both."""

    def close_both() -> None:
        a.close()
        b.close()

    done = threading.Barrier(2, action=close_both)

    def one_way(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)
                src.shutdown(socket.SHUT_RDWR)
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=one_way, args=(src, dst), daemon=True, name="splice").start()


def splice_to_unix(conn: socket.socket, path: str) -> None:
    """Relay `conn` to the unix socket at `path` (closed if nothing answers there)."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(path)
    except OSError:
        peer.close()
        conn.close()
        return
    splice(conn, peer)


def splice_to_unix_at(conn: socket.socket, directory: int, name: str) -> None:
    """Relay `conn` to the socket `name` in the held `directory`; never through a link a script put there."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        conn.close()
        return
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            splice_to_unix(conn, f"/proc/self/fd/{fd}")  # the very inode checked
        else:
            conn.close()
    finally:
        os.close(fd)


def loopback_ports() -> list[tuple[int, int]]:
    """(family, port) of this network namespace's TCP services that loopback clients reach."""
    found: set[tuple[int, int]] = set()
    for name, family, loopback in (("tcp", socket.AF_INET, "0100007F"), ("tcp6", socket.AF_INET6, "0" * 31 + "1")):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] != LISTEN:
                continue
            anywhere = set(address) == {"0"}
            on_loopback = address == loopback or (family == socket.AF_INET and address.endswith("7F"))
            if anywhere or on_loopback:
                found.add((family, int(port, 16)))
    return sorted(found)


class LoopbackForwarder:
    """Listeners in the network namespace at `net` for the host's loopback services, relayed to them."""

    def __init__(self, net: str) -> None:
        self.listeners: list[tuple[socket.socket, int, int]] = []
        ports = loopback_ports()
        with _in_netns(net):
            for family, port in ports:
                address = "127.0.0.1" if family == socket.AF_INET else "::1"
                listener = socket.socket(family, socket.SOCK_STREAM)
                try:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind((address, port))
                    listener.listen(64)
                except OSError:
                    listener.close()  # no IPv6 in the namespace, or the port taken: skipped
                    continue
                self.listeners.append((listener, family, port))
        for listener, family, port in self.listeners:
            threading.Thread(target=self._serve, args=(listener, family, port), daemon=True, name="forward").start()

    @staticmethod
    def _serve(listener: socket.socket, family: int, port: int) -> None:
        address = "127.0.0.1" if family == socket.AF_INET else "::1"
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((address, port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            splice(conn, upstream)

    def close(self) -> None:
        for listener, _, _ in self.listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()


@contextlib.contextmanager
def _in_netns(net: str) -> Iterator[None]:
    """This thread in the network namespace at `net` while the block runs (sockets made there stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(net, linux.CLONE_NEWNET)
        try:
            yield
        finally:
            linux.setns(home, linux.CLONE_NEWNET)
    finally:
        os.close(home)
