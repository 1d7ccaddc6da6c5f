"""The command lines to start an image's own containerd and dockerd with, from its systemd units.

A local build starts the image's containerd and dockerd itself, before a script uses docker; no
systemd runs. `daemons()` works out each daemon's command line as systemd would start it from the
image's units (parsed by `systemd_units`), or from COS's defaults where the image has no usable
unit, and adapts it to the build's sockets. `resolve_daemons()` also says why a daemon is not there
(`Absent`). It reads files under `root` and nothing else: it never writes or executes.

Finding the units, as systemd does: the first of UNIT_DIRS holding `containerd.service`
(`docker.service`) wins; its drop-ins `NAME.d/*.conf` from all of UNIT_DIRS follow, sorted by file
name (the first directory wins a name). A unit that is empty or a symlink to /dev/null is masked:
that daemon is absent. A unit systemd would refuse to load, one without ExecStart=, or one whose
ExecStart= runs something other than `containerd` (`dockerd`) gives way to COS's defaults, with a note.

The image is untrusted, so this module resolves every path itself, a component at a time from a
descriptor of `root`: an absolute symlink means the image's own path; climbing above the root or
more than 40 symlinks is refused, and a refused path counts as not there (with a note). Only regular
files of at most MAX_FILE_SIZE are read, opened without following symlinks. The binary must be a
regular file with an execute bit, and `argv[0]` is its path inside the image with every symlink
resolved, so that `root / argv[0][1:]` names it. If the unit's binary is not in the image, the
daemon's name is looked for in FALLBACK_PATH; if it is nowhere, the daemon is absent.

Differences from systemd (beyond `systemd_units`'): with several ExecStart= commands (systemd refuses
that unless Type=oneshot) the last is used; drop-ins only come from `NAME.d/` in UNIT_DIRS (not
/run, type-wide `service.d/` or aliases); an EnvironmentFile= wildcard may only be in the last path
component; a missing environment file that is not optional is skipped with a note, where systemd
would fail the start.

Adapting to the build is the tool's rule, not systemd's: a build listens on its own sockets only.
dockerd: a `-H`/`--host` (`-H X`, `-H=X`, `-HX`, `--host=X`) of `fd://...` (socket activation)
becomes `unix://{docker_socket}` in the same spelling; any other host is dropped and listed in
`Daemon.dropped`; with no host left, `-H unix://{docker_socket}` is added. `--containerd` becomes
`--containerd={containerd_socket}`. containerd: `--address`, `-address` or `-a` (Go flags, any
spelling) becomes `--address {containerd_socket}`. A missing socket option is added right after
argv[0], a repeated one dropped; options after `--` are left alone. /etc/docker/daemon.json is not
read: its "hosts" or "containerd" keys would conflict with these flags.

COS's defaults (COS_DEFAULT_UNITS), parsed like units of their own:
- docker.service is COS's /usr/lib/systemd/system/docker.service as printed (`cat`) on a GKE COS
  node (node label gke-os-distribution=cos, 2019) in a public write-up; the same dockerd command line
  shows in `ps` and `systemctl status docker` output from COS VMs published in 2022 and 2024. The
  GoogleCloudPlatform/cos-customizer and dims/cos-tools sources do not contain COS's units.
- containerd.service: no COS unit text was found; `/usr/bin/containerd` with no arguments, as the
  upstream and Debian units (containerd's default socket is /run/containerd/containerd.sock).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from cos_customizer.executors.local.systemd_units import (
    Service,
    expand_arguments,
    parse_environment_file,
    parse_service,
)

CONTAINERD = "containerd"
DOCKERD = "dockerd"
UNIT_NAMES = {CONTAINERD: "containerd.service", DOCKERD: "docker.service"}
UNIT_DIRS = (
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
# Where a daemon is looked for when its unit's binary is not in the image.
FALLBACK_PATH = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin")
# systemd's compiled-in search path for an ExecStart= that names no directory (split /usr, bin and sbin).
_SYSTEMD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MAX_FILE_SIZE = 1 << 20
_MAX_SYMLINKS = 40
_MAX_DIR_ENTRIES = 4096

COS_DEFAULT_UNITS = {
    CONTAINERD: "[Service]\nExecStart=/usr/bin/containerd\n",
    DOCKERD: (
        "[Service]\n"
        "EnvironmentFile=-/etc/default/docker\n"
        "ExecStart=/usr/bin/dockerd --registry-mirror=https://mirror.gcr.io --host=fd:// "
        "--containerd=/var/run/containerd/containerd.sock $DOCKER_OPTS\n"
    ),
}


@dataclasses.dataclass(frozen=True)
class Daemon:
    """How to start one daemon: `argv` with `env` added to the environment, ready on `socket`."""

    name: str  # "containerd" or "dockerd"
    argv: tuple[str, ...]  # argv[0]: the binary's path inside the image, symlinks resolved
    env: Mapping[str, str] = dataclasses.field(hash=False)  # Environment= and EnvironmentFile= values
    unit: str | None  # the unit file inside the image it came from; None for COS's defaults
    socket: str  # the API socket inside the image the daemon listens on when ready
    dropins: tuple[str, ...] = ()  # the drop-ins read after `unit`
    dropped: tuple[str, ...] = ()  # arguments of the unit left out (hosts other than fd://), as they were
    notes: tuple[str, ...] = ()  # what the caller may want to print: fallbacks and files skipped

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


@dataclasses.dataclass(frozen=True)
class Absent:
    """A daemon not to start, and why: its unit is masked, or the image has no such binary."""

    name: str
    reason: str
    unit: str | None = None
    notes: tuple[str, ...] = ()


class _Refused(Exception):
    """A path not followed or a file not read: it leaves the image, loops, or is otherwise odd."""


# ---------------------------------------------------------------------------------------------
# The image's tree, walked from a descriptor of its root


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str  # inside the image, symlinks resolved (for a missing entry: as far as it could be resolved)
    mode: int | None  # the object's type and mode; None when it does not exist
    data: bytes | None = None
    names: tuple[str, ...] | None = None


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


class _Tree:
    def __init__(self, root: Path) -> None:
        self._fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._fd)

    def lookup(self, path: str, want: Literal["stat", "read", "list"] = "stat") -> _Entry:
        """Resolve `path` inside the image; read the file or list the directory if asked. Raises _Refused."""
        opened: list[int] = []  # descriptors of the directories walked into, innermost last
        names: list[str] = []  # their names: the resolved path so far
        pending = _components(path)[::-1]
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name == "..":
                    if not names:
                        raise _Refused(f"{path} leads above the image's root")
                    names.pop()
                    os.close(opened.pop())
                    continue
                at = opened[-1] if opened else self._fd
                try:
                    st = os.stat(name, dir_fd=at, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    return _Entry("/" + "/".join([*names, name, *pending[::-1]]), None)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise _Refused(f"{path}: too many symlinks")
                    target = os.readlink(name, dir_fd=at)
                    if not target:
                        raise _Refused(f"{path}: an empty symlink")
                    if target.startswith("/"):
                        for fd in opened:
                            os.close(fd)
                        opened.clear()
                        names.clear()
                    pending.extend(_components(target)[::-1])
                    continue
                if pending:
                    if not stat.S_ISDIR(st.st_mode):
                        return _Entry("/" + "/".join([*names, name, *pending[::-1]]), None)
                    opened.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at))
                    names.append(name)
                    continue
                resolved = "/" + "/".join([*names, name])
                if want == "read" and stat.S_ISREG(st.st_mode):
                    return _Entry(resolved, st.st_mode, data=_read(at, name, st, resolved))
                if want == "list" and stat.S_ISDIR(st.st_mode):
                    return _Entry(resolved, st.st_mode, names=_list(at, name, resolved))
                return _Entry(resolved, st.st_mode)
            return _Entry("/" + "/".join(names), stat.S_IFDIR)
        except OSError as e:
            raise _Refused(f"{path}: {e.strerror or e}") from None
        finally:
            for fd in opened:
                os.close(fd)


def _read(at: int, name: str, st: os.stat_result, path: str) -> bytes:
    if st.st_size > MAX_FILE_SIZE:
        raise _Refused(f"{path} is larger than {MAX_FILE_SIZE} bytes")
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=at)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise _Refused(f"{path} changed while being opened")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > MAX_FILE_SIZE:
                raise _Refused(f"{path} is larger than {MAX_FILE_SIZE} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _list(at: int, name: str, path: str) -> tuple[str, ...]:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
    try:
        found: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if len(found) >= _MAX_DIR_ENTRIES:
                    raise _Refused(f"{path} has more than {_MAX_DIR_ENTRIES} entries")
                found.append(entry.name)
        return tuple(sorted(found))
    finally:
        os.close(fd)


def _masks(entry: _Entry) -> bool:
    """A unit file or drop-in that masks: a symlink to /dev/null or an empty file (systemd.unit(5))."""
    if entry.path == "/dev/null":
        return True
    return entry.mode is not None and stat.S_ISREG(entry.mode) and entry.data == b""


def _is_executable(entry: _Entry) -> bool:
    return entry.mode is not None and stat.S_ISREG(entry.mode) and bool(entry.mode & 0o111)


# ---------------------------------------------------------------------------------------------
# Adapting the command lines to the build


@dataclasses.dataclass(frozen=True)
class _Option:
    spelling: str  # the option as written: "-H", "--host"...
    value: str | None  # None when the option ends the command line without a value
    form: Literal["separate", "equals", "attached"]
    tokens: tuple[str, ...]  # as it was on the command line

    def respelled(self, value: str) -> list[str]:
        if self.form == "separate":
            return [self.spelling, value]
        if self.form == "equals":
            return [f"{self.spelling}={value}"]
        return [self.spelling + value]


def _option(args: Sequence[str], i: int, spellings: Sequence[str], attached: str | None = None) -> _Option | None:
    arg = args[i]
    for spelling in spellings:
        if arg == spelling:
            if i + 1 < len(args):
                return _Option(spelling, args[i + 1], "separate", (arg, args[i + 1]))
            return _Option(spelling, None, "separate", (arg,))
        if arg.startswith(spelling + "="):
            return _Option(spelling, arg[len(spelling) + 1 :], "equals", (arg,))
    if attached and arg.startswith(attached) and len(arg) > len(attached) and not arg.startswith("--"):
        return _Option(attached, arg[len(attached) :], "attached", (arg,))
    return None


def _adapt_dockerd(args: Sequence[str], docker_socket: str, containerd_socket: str) -> tuple[list[str], list[str]]:
    host = f"unix://{docker_socket}"
    out: list[str] = []
    dropped: list[str] = []
    have_host = have_containerd = False
    i = 0
    while i < len(args):
        if args[i] == "--":
            out.extend(args[i:])
            break
        option = _option(args, i, ("-H", "--host"), attached="-H")
        if option is not None:
            i += len(option.tokens)
            value = option.value
            wanted = value is not None and (value == host or value == "fd://" or value.startswith("fd://"))
            if wanted and not have_host:
                out.extend(option.respelled(host))
                have_host = True
            else:
                dropped.extend(option.tokens)
            continue
        option = _option(args, i, ("--containerd",))
        if option is not None:
            i += len(option.tokens)
            if option.value is not None and not have_containerd:
                out.append(f"--containerd={containerd_socket}")
                have_containerd = True
            else:
                dropped.extend(option.tokens)
            continue
        out.append(args[i])
        i += 1
    added = ([] if have_host else ["-H", host]) + ([] if have_containerd else [f"--containerd={containerd_socket}"])
    return added + out, dropped


def _adapt_containerd(args: Sequence[str], containerd_socket: str) -> tuple[list[str], list[str]]:
    out: list[str] = []
    dropped: list[str] = []
    have_address = False
    i = 0
    while i < len(args):
        if args[i] == "--":
            out.extend(args[i:])
            break
        option = _option(args, i, ("--address", "-address", "--a", "-a"))
        if option is None:
            out.append(args[i])
            i += 1
            continue
        i += len(option.tokens)
        if option.value is not None and not have_address:
            out.extend(["--address", containerd_socket])
            have_address = True
        else:
            dropped.extend(option.tokens)
    return ([] if have_address else ["--address", containerd_socket]) + out, dropped


# ---------------------------------------------------------------------------------------------
# Putting it together


@dataclasses.dataclass(frozen=True)
class _UnitFiles:
    path: str
    texts: tuple[str, ...]
    dropins: tuple[str, ...]


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _find_unit(tree: _Tree, unit: str, notes: list[str]) -> _UnitFiles | Absent | None:
    main: tuple[str, bytes] | None = None
    for directory in UNIT_DIRS:
        candidate = f"{directory}/{unit}"
        try:
            entry = tree.lookup(candidate, "read")
        except _Refused as e:
            notes.append(f"{candidate} ignored: {e}")
            continue
        if _masks(entry):
            return Absent(_daemon_of(unit), f"{unit} is masked ({candidate} -> {entry.path})", candidate)
        if entry.mode is None:
            continue
        if entry.data is None:
            notes.append(f"{candidate} ignored: not a regular file")
            continue
        if b"\0" in entry.data:
            notes.append(f"{candidate} ignored: it holds NUL bytes")
            continue
        main = (candidate, entry.data)
        break
    if main is None:
        return None
    seen: set[str] = set()
    dropins: list[tuple[str, str, bytes]] = []
    for directory in UNIT_DIRS:
        folder = f"{directory}/{unit}.d"
        try:
            listing = tree.lookup(folder, "list").names or ()
        except _Refused as e:
            notes.append(f"{folder} ignored: {e}")
            continue
        for name in listing:
            if not name.endswith(".conf") or name in seen:
                continue
            seen.add(name)
            try:
                entry = tree.lookup(f"{folder}/{name}", "read")
            except _Refused as e:
                notes.append(f"{folder}/{name} ignored: {e}")
                continue
            if entry.data and b"\0" not in entry.data:
                dropins.append((name, f"{folder}/{name}", entry.data))
    dropins.sort()
    return _UnitFiles(
        main[0],
        (_decode(main[1]), *(_decode(data) for _, _, data in dropins)),
        tuple(path for _, path, _ in dropins),
    )


def _daemon_of(unit: str) -> str:
    return next(name for name, unit_name in UNIT_NAMES.items() if unit_name == unit)


def _unusable(service: Service, daemon: str) -> str | None:
    if service.problems:
        return service.problems[0]
    if not service.exec_start:
        return "it has no ExecStart="
    path = service.exec_start[-1].path
    if path.rsplit("/", 1)[-1] != daemon:
        return f"its ExecStart= runs {path}, not {daemon}"
    return None


def _environment_files(tree: _Tree, pattern: str, notes: list[str]) -> list[str]:
    """The files an EnvironmentFile= path names inside the image: itself, or its wildcard's matches, sorted."""
    folder, _, name = pattern.rpartition("/")
    if "{" in pattern or any(c in "*?[" for c in folder):
        notes.append(f"EnvironmentFile={pattern} skipped: only wildcards in the last component are supported")
        return []
    if not any(c in "*?[" for c in name):
        return [pattern]
    try:
        listing = tree.lookup(folder or "/", "list").names or ()
    except _Refused as e:
        notes.append(f"EnvironmentFile={pattern} skipped: {e}")
        return []
    hidden_ok = name.startswith(".")
    return [f"{folder}/{n}" for n in listing if fnmatch.fnmatchcase(n, name) and (hidden_ok or not n.startswith("."))]


def _load_environment(tree: _Tree, service: Service, notes: list[str]) -> dict[str, str]:
    env = dict(service.environment)
    for spec in service.environment_files:
        optional = spec.startswith("-")
        pattern = spec[1:] if optional else spec
        found = False
        for path in _environment_files(tree, pattern, notes):
            try:
                entry = tree.lookup(path, "read")
            except _Refused as e:
                notes.append(f"EnvironmentFile={path} skipped: {e}")
                continue
            if entry.data is None:
                continue
            found = True
            env.update(parse_environment_file(_decode(entry.data)))
        if not found and not optional:
            notes.append(f"EnvironmentFile={pattern} is not in the image; skipped")
    return env


def _find_binary(tree: _Tree, path: str, daemon: str, notes: list[str]) -> str | None:
    candidates = [path] if path.startswith("/") else [f"{d}/{path}" for d in _SYSTEMD_PATH]
    for candidate in candidates:
        if found := _executable(tree, candidate, notes):
            return found
    for directory in FALLBACK_PATH:
        if found := _executable(tree, f"{directory}/{daemon}", notes):
            notes.append(f"{path} is not an executable in the image; using {found}")
            return found
    return None


def _executable(tree: _Tree, candidate: str, notes: list[str]) -> str | None:
    """`candidate`'s path inside the image if it is an executable file there, else None (a refusal noted)."""
    try:
        entry = tree.lookup(candidate)
    except _Refused as e:
        notes.append(f"{candidate} ignored: {e}")
        return None
    return entry.path if _is_executable(entry) else None


def _resolve_one(tree: _Tree, daemon: str, docker_socket: str, containerd_socket: str) -> Daemon | Absent:
    unit_name = UNIT_NAMES[daemon]
    notes: list[str] = []
    found = _find_unit(tree, unit_name, notes)
    if isinstance(found, Absent):
        return dataclasses.replace(found, notes=tuple(notes))
    service: Service | None = None
    unit: str | None = None
    dropins: tuple[str, ...] = ()
    if found is not None:
        service = parse_service(found.texts, unit=unit_name, fragment=found.path)
        problem = _unusable(service, daemon)
        if problem is None:
            unit, dropins = found.path, found.dropins
        else:
            notes.append(f"{found.path} not used ({problem}); using COS's default command line")
            service = None
    if service is None:
        service = parse_service([COS_DEFAULT_UNITS[daemon]], unit=unit_name)
    if len(service.exec_start) > 1:
        notes.append(f"{unit} has {len(service.exec_start)} ExecStart= commands; using the last")
    command = service.exec_start[-1]
    env = _load_environment(tree, service, notes)
    binary = _find_binary(tree, command.path, daemon, notes)
    if binary is None:
        return Absent(daemon, f"no executable {daemon} in the image", unit, tuple(notes))
    args = list(command.argv[1:])
    if command.expand:
        args = expand_arguments(args, env)
    if daemon == DOCKERD:
        args, dropped = _adapt_dockerd(args, docker_socket, containerd_socket)
        socket = docker_socket
    else:
        args, dropped = _adapt_containerd(args, containerd_socket)
        socket = containerd_socket
    return Daemon(daemon, (binary, *args), env, unit, socket, dropins, tuple(dropped), tuple(notes))


def resolve_daemons(root: Path, *, docker_socket: str, containerd_socket: str) -> tuple[Daemon | Absent, ...]:
    """containerd, then dockerd: how to start each from the image at `root`, or why not.

    `docker_socket` and `containerd_socket` are absolute paths inside the image.
    """
    for socket in (docker_socket, containerd_socket):
        if not socket.startswith("/"):
            raise ValueError(f"a socket path inside the image must be absolute: {socket!r}")
    tree = _Tree(root)
    try:
        return tuple(_resolve_one(tree, daemon, docker_socket, containerd_socket) for daemon in (CONTAINERD, DOCKERD))
    finally:
        tree.close()


def daemons(root: Path, *, docker_socket: str, containerd_socket: str) -> tuple[Daemon, ...]:
    """The daemons to start, containerd first: masked ones and ones with no binary in the image are left out."""
    found = resolve_daemons(root, docker_socket=docker_socket, containerd_socket=containerd_socket)
    return tuple(d for d in found if isinstance(d, Daemon))
