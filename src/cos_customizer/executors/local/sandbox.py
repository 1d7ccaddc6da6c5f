"""The script sandbox of the local executor: a run-script can change only the image.

Two parts, both standard library only (this file also runs on its own, as
`python -I sandbox.py SPEC -- ARGV`, so a script's start costs no package
import but `cos_customizer.linux`, its Linux calls):

* `Namespaces` (once per build, in the stage): a user namespace mapping every
  id to itself, and its child `inner`, whose root is a high host uid
  (`INNER_BASE`), never 0; a network namespace owned by `inner`; all kept
  alive by bind mounts of their /proc/PID/ns files in the stage's private
  mount namespace (they vanish with it). `Network` gives that namespace
  outbound access through slirp4netns (the host's loopback refused unless
  allowed).
* `main` (once per script): the sandbox itself, as bubblewrap and mkosi's
  sandbox build theirs (read, not copied). As the host's root it joins the
  build's cgroups (every hierarchy) and, in a new cgroup, mount and PID
  namespace joined to the build's network namespace, it mounts on the build's
  view of the runtime tree (`idmap.make_view`: the image's files with their
  own owners as `inner` sees them) a fresh /proc (its /sys, sysrq-trigger and
  the other host-wide knobs read-only or masked), a fresh read-only sysfs of
  the sandbox's network namespace (so no cgroup tree at all), and a private
  /dev (a small tmpfs with null, zero, full, random, urandom and tty bound
  from the host, a private devpts with ptmx, a size-limited /dev/shm, the fd
  links); it pivot_roots into the tree and detaches the old root. Then it
  joins `inner` and unshares a mount, IPC and UTS namespace owned by it:
  every mount it inherited is locked (cannot be unmounted, revealed or made
  writable), root's capabilities count only for what `inner` owns (mounts
  inside the stage, its network), and the kernel's checks for "uid 0" (host
  sysctls through any /proc, even one a container hands over) fail for it.
  Last it drops CAP_MKNOD, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_BOOT,
  CAP_SYS_TIME and a few more from the bounding set, sets no_new_privs and
  its parent-death signal (after the last change of credentials, which
  clears it), and executes the script with the environment from the spec
  (never the one this helper was started with), as PID 1 of its PID
  namespace. If the helper dies, the kernel kills PID 1 and with it the
  whole namespace.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a file (`command`): -I leaves out PYTHONPATH, so the package's own directory
    _PACKAGES = str(Path(__file__).resolve().parents[3])
    if _PACKAGES not in sys.path:
        sys.path.insert(0, _PACKAGES)

from cos_customizer import linux  # the one module of the package this file imports (standard library only)

# Dropped from the bounding set. A preload script needs none of them: it makes no device nodes
# (CAP_MKNOD: devices of the image are created at boot by devtmpfs and udev), loads no module,
# touches no raw I/O port, clock, boot loader of the host, audit or MAC policy, BPF or perf.
DROPPED = {
    "CAP_MKNOD": 27,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_TIME": 25,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

# Host-wide knobs in a fresh /proc that only check "uid 0" (the sandbox's root is uid 0 on the host):
# read-only or hidden, as container runtimes do.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "acpi", "scsi", "asound")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SHM_SIZE = 64 << 20

# --- the build's namespaces and network (in the stage, once per build) ---


# The container daemons' user namespace (a child of the scripts'): its root is this host uid, not 0,
# as rootless container engines run (host-wide knobs that only check "uid 0" are closed to it); the
# image's files appear to it with their own owners through idmapped mounts (`executors.local.idmap`).
INNER_BASE = 1 << 31
INNER_COUNT = (1 << 31) - 1


@dataclasses.dataclass(frozen=True)
class Namespaces:
    user: str  # a bind mount of the scripts' user namespace's ns file (all ids mapped to themselves)
    net: str  # the build's network namespace, owned by `inner`
    inner: str  # the daemons' user namespace, a child of `user`: 0..INNER_COUNT-1 -> INNER_BASE..


def make_namespaces(directory: Path) -> Namespaces:
    """The build's user namespaces and the network namespace (loopback up) that `inner` owns.

    `user` maps all ids to themselves (root inside is uid 0 on disk, so a script's files have their
    exact owners); `inner` is its child, root there being INNER_BASE on the host, for the container
    daemons. Scripts, in `user`, keep every capability over the network namespace (their namespace is
    an ancestor of its owner). Kept by bind mounts under `directory` (in the caller's mount namespace,
    which should be private: they go with it). Needs root.
    """
    directory.mkdir(parents=True, exist_ok=True)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: the outer namespace, and the inner one through a grandchild
        os.close(to_child_w)
        os.close(to_parent_r)
        os._exit(_namespaces_child(to_child_r, to_parent_w))
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        if os.read(to_parent_r, 1) != b"u":
            raise OSError(errno.EPERM, "cannot make a user namespace (is user.max_user_namespaces 0?)")
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text("0 0 4294967295\n")
        os.write(to_child_w, b"m")
        answer = os.read(to_parent_r, 16)
        if not answer.startswith(b"n"):
            raise OSError(errno.EPERM, "cannot make the build's inner user namespace or its network namespace")
        inner_pid = int(answer[1:])
        spaces = Namespaces(user=str(directory / "user"), net=str(directory / "net"), inner=str(directory / "inner"))
        for path, source in (
            (spaces.user, f"/proc/{pid}/ns/user"),
            (spaces.inner, f"/proc/{inner_pid}/ns/user"),
            (spaces.net, f"/proc/{inner_pid}/ns/net"),
        ):
            Path(path).touch()
            linux.bind(source, path)
        return spaces
    finally:
        os.close(to_child_w)
        os.close(to_parent_r)
        os.waitpid(pid, 0)


def _namespaces_child(from_parent: int, to_parent: int) -> int:  # pragma: no cover - runs in the child
    """In `make_namespaces`' child: the outer namespace here, the inner one and the network in a grandchild."""
    try:
        linux.unshare(linux.CLONE_NEWUSER)
        os.write(to_parent, b"u")
        if os.read(from_parent, 1) != b"m":
            return 1
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(down_w)
            os.close(up_r)
            try:
                linux.unshare(linux.CLONE_NEWUSER)
                os.write(up_w, b"i")
                if os.read(down_r, 1) != b"m":
                    os._exit(1)
                linux.unshare(linux.CLONE_NEWNET)
                _loopback_up()
                os.write(up_w, b"n")
                os.read(down_r, 1)  # until the host has bound the files
                os._exit(0)
            except BaseException as err:  # noqa: BLE001
                os.write(2, f"sandbox: {err}\n".encode())
                os._exit(1)
        os.close(down_r)
        os.close(up_w)
        if os.read(up_r, 1) != b"i":
            return 1
        for name in ("uid_map", "gid_map"):  # written from the parent namespace, as the kernel asks
            Path(f"/proc/{pid}/{name}").write_text(f"0 {INNER_BASE} {INNER_COUNT}\n")
        os.write(down_w, b"m")
        if os.read(up_r, 1) != b"n":
            return 1
        os.write(to_parent, f"n{pid}".encode())
        os.read(from_parent, 1)  # until the host has bound the files (its side closes)
        os.close(down_w)
        os.waitpid(pid, 0)
        return 0
    except BaseException as err:  # noqa: BLE001
        os.write(2, f"sandbox: {err}\n".encode())
        return 1


def _loopback_up() -> None:
    import socket

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


class Network:
    """slirp4netns on the build's network namespace: outbound TCP/UDP through the host's sockets.

    The sandbox sees 10.0.2.100/24, the gateway 10.0.2.2 and a DNS forwarder at 10.0.2.3. The host's
    loopback (10.0.2.2 inside) is refused unless `allow_host_loopback`. Stopped with `close()`, and by
    itself when this process dies (its exit fd closes).
    """

    def __init__(self, spaces: Namespaces, *, allow_host_loopback: bool, tool: str = "slirp4netns") -> None:
        ready_r, ready_w = os.pipe()
        self._exit_r, self._exit_w = os.pipe()
        argv = [tool, "--configure", "--mtu=65520", f"--ready-fd={ready_w}", f"--exit-fd={self._exit_r}"]
        if not allow_host_loopback:
            argv.append("--disable-host-loopback")
        argv += ["--enable-sandbox", "--enable-seccomp", f"--userns-path={spaces.inner}"]
        argv += ["--netns-type=path", spaces.net, "tap0"]
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(ready_w, self._exit_r), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )  # fmt: skip
        finally:
            os.close(ready_w)
            os.close(self._exit_r)
        with os.fdopen(ready_r, "rb") as ready:
            readable, _, _ = select.select([ready], [], [], 10.0)
            ok = bool(readable) and ready.read(1) == b"1"
        if not ok:
            self.close()
            assert self.proc.stderr is not None
            said = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise OSError(errno.EIO, f"slirp4netns did not start: {said[-1] if said else 'no message'}")

    def close(self) -> None:
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# --- the sandbox of one script ---


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    root: str  # the build's view of the runtime tree (a mount point)
    user: str  # the user namespace the script runs in: Namespaces.inner
    net: str  # Namespaces.net
    env: dict[str, str]  # the script's whole environment
    hostname: str = "cos-customizer"
    cgroups: list[str] = dataclasses.field(default_factory=list)  # the build's cgroup directories, one per hierarchy

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def read(cls, path: Path) -> SandboxSpec:
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(**data)


def command(spec_path: Path) -> list[str]:
    """The argv prefix that runs a command in the sandbox; append `--wd=DIR -- ARGV`."""
    return [sys.executable, "-I", str(Path(__file__).resolve()), str(spec_path)]


def _setup_mounts(root: str) -> None:
    """As the host's root, in the sandbox's fresh mount namespace: /proc, /sys and /dev on `root`."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    nosuid_nodev_noexec = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    proc = f"{root}/proc"
    linux.mount("proc", proc, "proc", nosuid_nodev_noexec)
    for name in PROC_READ_ONLY:
        if os.path.exists(f"{proc}/{name}"):
            linux.bind(f"{proc}/{name}", f"{proc}/{name}", linux.MS_RDONLY | nosuid_nodev_noexec)
    for name in PROC_MASKED:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY | nosuid_nodev_noexec, "size=0,mode=0555")
        elif os.path.exists(path):
            linux.bind("/dev/null", path)
    linux.mount("sysfs", f"{root}/sys", "sysfs", linux.MS_RDONLY | nosuid_nodev_noexec)
    make_dev(f"{root}/dev", INNER_BASE)  # the sandbox's root owns it (the script's /dev is its own)


def make_dev(dev: str, owner: int | None) -> None:
    """As the host's root: a private /dev on `dev`, for the scripts' sandbox and the container daemons'.

    A small tmpfs (inodes limited) with null, zero, full, random, urandom and tty bound from the host, the
    fd links, a private devpts with ptmx and a size-limited /dev/shm. `owner`: the host uid (and gid) that
    is root of the user namespace the sandbox runs in, which then owns the tmpfs and whose tty group owns
    the ptys; None: they stay the host root's.
    """
    owned = f",uid={owner},gid={owner}" if owner is not None else ""
    nosuid_noexec = linux.MS_NOSUID | linux.MS_NOEXEC
    linux.mount("tmpfs", dev, "tmpfs", nosuid_noexec, f"mode=0755,size=256k,nr_inodes=256{owned}")
    for name in DEV_NODES:
        Path(f"{dev}/{name}").touch()
        linux.bind(f"/dev/{name}", f"{dev}/{name}", nosuid_noexec)
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    os.symlink("/proc/kcore", f"{dev}/core")
    os.mkdir(f"{dev}/pts", 0o755)
    tty = f",gid={owner + 5}" if owner is not None else ""  # the group tty (5), as that namespace's root sees it
    linux.mount("devpts", f"{dev}/pts", "devpts", nosuid_noexec, f"newinstance,ptmxmode=0666,mode=0620{tty}")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm")
    linux.mount(
        "tmpfs", f"{dev}/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"mode=1777,size={DEV_SHM_SIZE}{owned}"
    )


def _enter(spec: SandboxSpec, workdir: str) -> None:
    """In the child that becomes PID 1: everything but the exec (no import after pivot_root: the host's
    Python library is gone)."""
    user_fd = os.open(spec.user, os.O_RDONLY | os.O_CLOEXEC)
    linux.setns(spec.net, linux.CLONE_NEWNET)
    _setup_mounts(spec.root)
    linux.pivot_into(spec.root)
    linux.setns(user_fd, linux.CLONE_NEWUSER)
    os.close(user_fd)
    # No cgroup namespace of its own: cgroup file systems can then be mounted only with CAP_SYS_ADMIN in
    # the host's user namespace, so no cgroup tree of the host is reachable (it would be, as a cgroup2
    # mount rooted at the stage's cgroup, in a cgroup namespace this user namespace owned).
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.setgroups([])

    socket.sethostname(spec.hostname)
    for number in DROPPED.values():
        linux.drop_bounding_capability(number)
    linux.set_no_new_privs()
    os.chdir(workdir)


def main(argv: list[str]) -> int:
    """`sandbox.py SPEC --wd=DIR -- ARGV...`: run ARGV in the sandbox; exit with its status."""
    if len(argv) < 4 or not argv[1].startswith("--wd=") or argv[2] != "--":
        sys.stderr.write("usage: sandbox.py SPEC --wd=DIR -- ARGV...\n")
        return 2
    spec = SandboxSpec.read(Path(argv[0]))
    workdir, command_argv = argv[1][len("--wd=") :], argv[3:]
    linux.set_parent_death_signal(signal.SIGKILL)  # the stage gone, this helper goes too
    for directory in spec.cgroups:  # the build's cgroups, in every hierarchy: no cgroup of the host is ours
        Path(directory, "cgroup.procs").write_text(f"{os.getpid()}\n")
    # A cgroup namespace owned by this machine's user namespace and rooted at the build's cgroups: no cgroup
    # file system can be mounted from it by the script (that needs CAP_SYS_ADMIN over its owner), and one
    # the script makes for itself is rooted at the build's cgroups too, showing nothing of the host's.
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID | (linux.CLONE_NEWCGROUP if spec.cgroups else 0))
    alive_r, alive_w = os.pipe()  # PID 1 sees EOF once this helper is gone
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - PID 1 of the sandbox
        try:
            os.close(alive_w)
            _enter(spec, workdir)
            # Set after the last change of credentials (the kernel clears it on one), then checked: a helper
            # that died before it was set would otherwise leave the script running.
            linux.set_parent_death_signal(signal.SIGKILL)
            if select.select([alive_r], [], [], 0)[0]:
                os._exit(137)
            os.close(alive_r)
            os.execve(command_argv[0], command_argv, spec.env)
        except BaseException as err:  # noqa: BLE001
            os.write(2, f"sandbox: {err}\n".encode())
        os._exit(127)
    os.close(alive_r)

    def stop(number: int, _frame: object) -> None:
        os.kill(pid, signal.SIGKILL)  # PID 1 gone, the kernel kills the rest of its namespace
        os._exit(128 + number)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
