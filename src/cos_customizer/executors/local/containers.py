"""The image's own containerd and dockerd in a local build, started on first use, the host untouched.

Where a booted COS has them running, a local build has them too: the binaries in the image's root,
with the arguments of its own systemd units (`daemon_units`), their data on STATE where COS keeps it
(/var/lib/docker, /var/lib/containerd), so what a script preloads is there on first boot.

How (the rootless engines' way, with the image's own files):

* The build's network namespace (`sandbox.make_namespaces`) is owned by the daemons' user namespace
  `inner`, whose root is a high host uid (`sandbox.INNER_BASE`), not 0. dockerd's bridge, veths and
  iptables rules are made there; the host's network and firewall are never touched.
* `DaemonHost` (a child of the stage, host root) joins that network namespace, makes its own mount
  and PID namespaces on the build's idmapped view of the runtime tree, the one the scripts run in
  (`idmap.make_view`: files owned by uid N on disk are the inner namespace's uid N, and what the
  daemons write is owned by N on disk), with a fresh /proc, /sys, /dev and the build's cgroups
  (`cgroups`, delegated to the inner root, in a cgroup namespace). Its child, PID 1 there,
  pivot_roots into the view, becomes the inner root and waits.
* Socket activation, as COS's docker.socket: the stage listens on /run/docker.sock and
  /run/containerd/containerd.sock in the runtime tree. The first connection starts containerd, then
  dockerd with the docker socket passed as `-H fd://` (it accepts the waiting connection itself);
  connections to containerd that arrived before it listened are relayed to it. A build whose
  scripts never use them pays for none of it.
* After the last script: SIGTERM to dockerd, then containerd (each waited for), every process of
  the build's cgroups killed, the cgroups removed; then the overlay markers the rootless daemons
  wrote (`user.overlay.*` xattrs) become the ones a root daemon reads (`trusted.overlay.*`).

Differences from a booted COS: no systemd (a script cannot `systemctl restart docker`), no metadata
server. The scripts and the daemons share one /etc overlay (discarded at the end, as before).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cos_customizer import linux
from cos_customizer.executors.local import cgroups, daemon_units, relay, sandbox

DOCKER_SOCKET = "/var/run/docker.sock"  # as docker.socket and COS's unit name it
RUN_DOCKER_SOCKET = "run/docker.sock"  # where it is in the runtime tree (/var/run -> /run)
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
READY_SECONDS = 60.0
STOP_SECONDS = 30.0
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
DATA_DIRS = ("var/lib/docker", "var/lib/containerd")


class ContainersError(Exception):
    """The daemons could not start or stop; the message says what and quotes their log."""


EMULATED_DOCKERD = "--iptables=false"


def find(root: Path, *, emulated: bool = False) -> tuple[daemon_units.Daemon, ...]:
    """The image's daemons, their argv adapted to the build (docker by socket activation).

    `emulated` (the image is another machine's, run under qemu-user): dockerd gets `--iptables=false`,
    as qemu-user cannot run iptables (its netfilter socket options fail), so containers get no NAT.
    """
    found = daemon_units.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET)
    adapted = []
    for daemon in found:
        argv = tuple("fd://" if arg == f"unix://{DOCKER_SOCKET}" else arg for arg in daemon.argv)
        notes = daemon.notes
        if daemon.name == "dockerd":
            argv = tuple(a.replace(f"--host=unix://{DOCKER_SOCKET}", "--host=fd://") for a in argv)
            if emulated:
                argv += (EMULATED_DOCKERD,)
                notes += (f"dockerd runs with {EMULATED_DOCKERD}: iptables cannot run under qemu-user emulation",)
        adapted.append(dataclasses.replace(daemon, argv=argv, notes=notes))
    return tuple(adapted)


# --- the host side, in the stage ---


class DaemonHost:
    """The daemons' sandbox, waiting; `start()` (from any thread) starts them, `stop()` stops everything.

    `root`: the runtime tree (the stage's mounts), `view`: its idmapped copy (`idmap.make_view`) the
    daemons run in, `work`: a private directory for their logs, `group`: the build's cgroups, which
    their PID 1 joins (its cgroup namespace is rooted there).
    """

    def __init__(
        self,
        root: Path,
        view: Path,
        spaces: sandbox.Namespaces,
        work: Path,
        group: cgroups.BuildCgroup,
        daemons: tuple[daemon_units.Daemon, ...],
        say: Callable[[str], None],
    ) -> None:
        self.root, self.work, self.daemons, self.say = root, work, daemons, say
        self.started = False
        self.failed: str | None = None
        self._lock = threading.Lock()
        work.mkdir(parents=True, exist_ok=True)
        self.logs = {d.name: work / f"{d.name}.log" for d in daemons}
        _var_run(root)
        # Held from before any script runs: a script may replace /run/containerd (or a socket in it) with
        # a link to this machine's files, and the stage, as this machine's root, goes through these only.
        self._run_dir = os.open(root / "run", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._containerd_dir = _own_directory(self._run_dir, "containerd")
        self.docker_listener = _listen(self._run_dir, RUN_DOCKER_SOCKET.removeprefix("run/"), _docker_gid(root))
        self.containerd_listener = _listen(self._containerd_dir, CONTAINERD_SOCKET.rsplit("/", 1)[1], 0)
        self._cmd_r, self._cmd_w = os.pipe()
        self._status_r, self._status_w = os.pipe()
        spec = _InitSpec(
            view=str(view),
            net=spaces.net,
            inner=spaces.inner,
            cgroup_mounts=[(h.fstype, h.options, h.label) for h in cgroups.for_containers(group.hierarchies)],
            daemons=[{"name": d.name, "argv": list(d.argv), "env": dict(d.env)} for d in daemons],
        )
        log_fds = [
            os.open(self.logs[d.name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600) for d in daemons
        ]
        try:
            self.pid = os.fork()
            if self.pid == 0:  # pragma: no cover - the daemons' host, then their PID 1
                status = 1
                try:
                    os.close(self._cmd_w)
                    os.close(self._status_r)
                    self.containerd_listener.close()  # only the stage accepts on it
                    group.enter(os.getpid())
                    status = _host(spec, self._cmd_r, self._status_w, self.docker_listener.fileno(), log_fds)
                except BaseException as err:  # noqa: BLE001
                    os.write(self._status_w, f"f{err}".encode())
                os._exit(status)
        finally:
            for fd in log_fds:
                os.close(fd)
        os.close(self._cmd_r)
        os.close(self._status_w)
        self._watch = relay.Watcher(self._first_use, [self.docker_listener, self.containerd_listener])

    def _first_use(self) -> None:
        """A client is waiting on one of the sockets: start the daemons (once) for it."""
        pending = relay.accept_pending(self.containerd_listener)
        self.containerd_listener.close()
        _unlink_at(self._containerd_dir, CONTAINERD_SOCKET.rsplit("/", 1)[1])
        try:
            self.start()
        except ContainersError as err:
            self.say(f"cos-customizer: {err}")
            for conn in pending:
                conn.close()
            self.docker_listener.close()  # its waiting client gets an error instead of waiting forever
            _unlink_at(self._run_dir, RUN_DOCKER_SOCKET.removeprefix("run/"))
            return
        self.docker_listener.close()  # dockerd has it now
        for conn in pending:
            relay.splice_to_unix_at(conn, self._containerd_dir, CONTAINERD_SOCKET.rsplit("/", 1)[1])

    def start(self) -> None:
        with self._lock:
            if self.started or self.failed:
                return
            self.say(
                "cos-customizer: a script uses containers: starting the image's "
                + " and ".join(d.name for d in self.daemons)
            )
            for note in (n for d in self.daemons for n in d.notes if EMULATED_DOCKERD in d.argv and "qemu" in n):
                self.say(f"cos-customizer: {note}")
            began = time.monotonic()
            with contextlib.suppress(BrokenPipeError):  # their host is gone: its status says why
                os.write(self._cmd_w, b"s")
            answer = _read_status(self._status_r, READY_SECONDS + 5)
            if not answer.startswith(b"r"):
                self.failed = self._why(answer[1:].decode(errors="replace") or "they stopped")
                raise ContainersError(self.failed)
            self.started = True
            self.say(f"cos-customizer: containerd and dockerd are up ({time.monotonic() - began:.1f} s)")

    def _why(self, message: str) -> str:
        tails = []
        for name, path in self.logs.items():
            try:
                lines = path.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            if lines:
                tails.append(f"{name}: {lines[-1][-300:]}")
        return f"the image's container daemons did not start: {message}" + ("; " + "; ".join(tails) if tails else "")

    def stop(self) -> list[str]:
        """Stop the daemons (SIGTERM, waited for), then everything left; returns notes for the log."""
        notes: list[str] = []
        self._watch.close()
        for listener in (self.docker_listener, self.containerd_listener):
            listener.close()
        with contextlib.suppress(OSError):
            os.write(self._cmd_w, b"q")
        os.close(self._cmd_w)
        answer = _read_status(self._status_r, STOP_SECONDS + 10)
        if answer.startswith(b"k") and len(answer) > 1:
            notes.extend(json.loads(answer[1:].decode(errors="replace")))
        os.close(self._status_r)
        _wait_exit(self.pid, 10.0)  # their PID 1 exits last, once every process of its namespace is gone
        _unlink_at(self._run_dir, RUN_DOCKER_SOCKET.removeprefix("run/"))
        _unlink_at(self._containerd_dir, CONTAINERD_SOCKET.rsplit("/", 1)[1])
        os.close(self._containerd_dir)
        os.close(self._run_dir)
        if self.started:  # the daemons and the scripts are gone: nothing changes the tree under this walk
            real = [self.root / d for d in DATA_DIRS if (self.root / d).resolve() == self.root.resolve() / d]
            fixed = rootful_overlay_markers(real)
            if fixed:
                notes.append(f"{fixed} overlay markers written as a root daemon reads them (trusted.overlay.*)")
        return notes


def _wait_exit(pid: int, seconds: float) -> None:
    """Wait for the child `pid` to exit; SIGKILL it after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _var_run(root: Path) -> None:
    """/var/run -> /run, as systemd-tmpfiles makes it at every COS boot (docker's socket path goes through it)."""
    var_run = root / "var/run"
    if not var_run.is_symlink() and not var_run.exists():
        var_run.symlink_to("../run")


def _docker_gid(root: Path) -> int:
    try:  # the image's file (not through a link: this runs as this machine's root)
        fd = os.open(root / "etc/group", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, errors="replace") as group:
            text = group.read(1 << 20) if stat.S_ISREG(os.fstat(fd).st_mode) else ""
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == "docker" and fields[2].isdigit():
                return int(fields[2])
    except OSError:
        pass
    return 0


def _own_directory(parent: int, name: str) -> int:
    """A descriptor of the directory `name` in `parent` (made, owned by the sandbox's root), never through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o711, dir_fd=parent)
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    os.chown(f"/proc/self/fd/{fd}", sandbox.INNER_BASE, sandbox.INNER_BASE)
    return fd


def _unlink_at(directory: int, name: str) -> None:
    """Remove `name` from the directory held by `directory` (not through a link: unlink never follows the last one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)


def _listen(directory: int, name: str, gid: int) -> socket.socket:
    """A listening socket `name` in the held `directory`, owned by the sandbox's root and `gid` (as it sees them)."""
    _unlink_at(directory, name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = f"/proc/self/fd/{directory}/{name}"  # short, and the held directory itself, whatever its name now
    listener.bind(path)
    os.chown(path, sandbox.INNER_BASE, sandbox.INNER_BASE + gid)
    os.chmod(path, 0o660)
    listener.listen(128)
    return listener


def _read_status(fd: int, seconds: float) -> bytes:
    readable, _, _ = select.select([fd], [], [], seconds)
    return os.read(fd, 4096) if readable else b"ftimed out"


def rootful_overlay_markers(tops: Iterable[Path]) -> int:
    """Rename `user.overlay.*` xattrs (a rootless overlay mount's markers: opaque directories,
    redirects) to `trusted.overlay.*`, which a root daemon's overlay mount on a booted COS reads."""
    count = 0
    for top in tops:
        if not top.is_dir() or top.is_symlink():
            continue
        for directory, dirs, _files in os.walk(top):
            for name in dirs:
                path = os.path.join(directory, name)
                try:
                    names = os.listxattr(path, follow_symlinks=False)
                except OSError:
                    continue
                for attr in names:
                    if attr.startswith("user.overlay."):
                        value = os.getxattr(path, attr, follow_symlinks=False)
                        os.setxattr(path, "trusted." + attr.removeprefix("user."), value, follow_symlinks=False)
                        os.removexattr(path, attr, follow_symlinks=False)
                        count += 1
    return count


# --- the daemons' host and PID 1 (in the forked child; standard library only) ---


@dataclasses.dataclass(frozen=True)
class _InitSpec:
    view: str
    net: str
    inner: str
    cgroup_mounts: list[tuple[str, str, str]]
    daemons: list[dict[str, Any]]


def _host(spec: _InitSpec, cmd_r: int, status_w: int, docker_fd: int, log_fds: list[int]) -> int:  # pragma: no cover
    """As host root: the network, mount and PID namespaces and the idmapped view; then PID 1 in them."""
    linux.set_parent_death_signal(signal.SIGKILL)
    linux.setns(spec.net, linux.CLONE_NEWNET)
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    alive_r, alive_w = os.pipe()  # PID 1 sees EOF once this host is gone
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            _enter(spec)
            # Set after the last change of credentials (becoming the inner root clears it), then checked: the
            # daemons' PID 1 must die with its host, and with it every process of its PID namespace.
            linux.set_parent_death_signal(signal.SIGKILL)
            if select.select([alive_r], [], [], 0)[0]:
                os._exit(137)
            os.close(alive_r)
            os._exit(_init(spec.daemons, cmd_r, status_w, docker_fd, log_fds))
        except BaseException as err:  # noqa: BLE001
            os.write(status_w, f"f{err}".encode())
            os._exit(1)
    os.close(alive_r)
    os.close(docker_fd)  # PID 1 has it: a client waiting on it must see it closed when the daemons cannot start
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


def _enter(spec: _InitSpec) -> None:  # pragma: no cover - PID 1, still host root until setns
    view = spec.view
    inner = os.open(spec.inner, os.O_RDONLY | os.O_CLOEXEC)  # the path is gone after pivot_root
    nosuid_nodev_noexec = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    # A fresh /proc and /sys, fully visible, so runc may mount them for containers; the daemons' root is
    # not host uid 0, so the host-wide knobs in them stay closed to it.
    linux.mount("proc", f"{view}/proc", "proc", nosuid_nodev_noexec)
    linux.mount("sysfs", f"{view}/sys", "sysfs", linux.MS_RDONLY | nosuid_nodev_noexec)
    linux.mount("tmpfs", f"{view}/sys/fs/cgroup", "tmpfs", nosuid_nodev_noexec, "mode=0755")
    for _fstype, _options, label in spec.cgroup_mounts:
        if label:
            os.mkdir(f"{view}/sys/fs/cgroup/{label}")
    sandbox.make_dev(f"{view}/dev", None)  # the host root's: the daemons' root cannot add to it
    linux.pivot_into(view)
    linux.setns(inner, linux.CLONE_NEWUSER)
    os.close(inner)
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.setgroups([])
    socket.sethostname("cos-customizer")
    for fstype, options, label in spec.cgroup_mounts:
        target = f"/sys/fs/cgroup/{label}" if label else "/sys/fs/cgroup"
        linux.mount(fstype, target, fstype, nosuid_nodev_noexec, options or None)


def _init(
    daemons: list[dict[str, Any]], cmd_r: int, status_w: int, docker_fd: int, log_fds: list[int]
) -> int:  # pragma: no cover
    """PID 1 of the daemons: wait for "s", start them in order, report; on "q", EOF or SIGTERM, stop them."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    terminated: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    running: list[tuple[str, int]] = []
    command = _wait_command(cmd_r, wake_r, running, terminated)
    if command != b"s":
        os.close(docker_fd)
    if command == b"s":
        try:
            for relative in DATA_DIRS:  # on STATE, where COS keeps them, made in here (links lead nowhere else)
                os.makedirs(f"/{relative}", mode=0o711, exist_ok=True)
            for daemon, log_fd in zip(daemons, log_fds, strict=True):
                pid = _spawn(daemon, log_fd, docker_fd)
                running.append((daemon["name"], pid))
                _wait_ready(daemon, pid)
            os.write(status_w, b"r")
        except OSError as err:
            os.write(status_w, f"f{err.strerror or err}".encode())
        os.close(docker_fd)  # dockerd has it, or it failed: its waiting clients get an error, not a hang
        command = _wait_command(cmd_r, wake_r, running, terminated)
    os.write(status_w, b"k" + _stop(running).encode())
    return 0


def _wait_command(
    cmd_r: int, wake_r: int, running: list[tuple[str, int]], terminated: list[bool]
) -> bytes:  # pragma: no cover
    while not terminated:
        try:
            readable, _, _ = select.select([cmd_r, wake_r], [], [], 1.0)
        except InterruptedError:
            continue
        _reap(running)
        if wake_r in readable:
            os.read(wake_r, 64)
        if cmd_r in readable:
            return os.read(cmd_r, 1) or b"q"
    return b"q"


def _spawn(daemon: dict[str, Any], log_fd: int, docker_fd: int) -> int:  # pragma: no cover
    argv = [str(a) for a in daemon["argv"]]
    env = {**DAEMON_ENV, **{str(k): str(v) for k, v in daemon["env"].items()}}
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            if daemon["name"] == "dockerd" and "fd://" in " ".join(argv):
                os.dup2(docker_fd, 3)
                os.set_inheritable(3, True)
                env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
            os.execve(argv[0], argv, env)
        except BaseException as err:  # noqa: BLE001
            os.write(2, f"cos-customizer: cannot run {argv[0]}: {err}\n".encode())
        os._exit(127)
    return pid


def _wait_ready(daemon: dict[str, Any], pid: int) -> None:  # pragma: no cover
    """Until the daemon answers on its socket (dockerd: GET /_ping says OK)."""
    path = "/var/run/docker.sock" if daemon["name"] == "dockerd" else CONTAINERD_SOCKET
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise OSError(errno.ECHILD, f"{daemon['name']} exited with status {os.waitstatus_to_exitcode(status)}")
        if _answers(path, daemon["name"] == "dockerd"):
            return
        time.sleep(0.05)
    raise OSError(errno.ETIMEDOUT, f"{daemon['name']} did not answer on {path} within {READY_SECONDS:.0f} s")


def _answers(path: str, ping: bool) -> bool:  # pragma: no cover
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2.0)
            conn.connect(path)
            if not ping:
                return True
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in conn.recv(256)
    except OSError:
        return False


def _reap(running: list[tuple[str, int]]) -> None:  # pragma: no cover
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        running[:] = [(n, p) for n, p in running if p != pid]


def _stop(running: list[tuple[str, int]]) -> str:  # pragma: no cover
    """SIGTERM to each daemon, the last started first, each waited for; what did not stop is killed."""
    notes = []
    for name, pid in reversed(list(running)):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + STOP_SECONDS / 2
        while time.monotonic() < deadline:
            _reap(running)
            if all(p != pid for _, p in running):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            notes.append(f"{name} did not stop within {STOP_SECONDS / 2:.0f} s of SIGTERM and was killed")
    return json.dumps(notes) if notes else ""
