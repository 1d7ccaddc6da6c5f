"""The command lines to start an image's own containerd and dockerd with, read from its systemd units.

Before a script of a local build uses docker, the build starts the image's containerd and dockerd
itself. No systemd runs, so this module works out their command lines as systemd would from the
image's own units (or COS's defaults where the image has none) and adapts them to the build.
Standard library only, and pure: it reads files under `root`, never writes, never executes.

`daemons(root, docker_socket=..., containerd_socket=...)` returns a `Daemon` for containerd, then
one for dockerd, leaving out a daemon that is absent; `resolve_daemons` returns an `Absent` (with
the reason) in its place, so that the caller can say why.

Finding the units. `containerd.service` and `docker.service` are looked up in the image's
/etc/systemd/system, /usr/local/lib/systemd/system, /usr/lib/systemd/system and
/lib/systemd/system; the first found wins. Drop-ins `NAME.d/*.conf` in the same directories are
read after it, sorted by file name (for a name in several directories the first directory wins).
A unit that is a symlink to /dev/null or an empty file is masked (systemd.unit(5)): that daemon
is absent. A unit systemd would refuse to load (an invalid section header, an ExecStart= argument
with unbalanced quotes or an unknown specifier), one with no ExecStart=, or one whose ExecStart= runs
something other than `containerd` (`dockerd`) is not used: COS's defaults are, with a note.

The files are untrusted. Every path is resolved inside `root` by this module, one component at a
time from a descriptor of the root: an absolute symlink is taken relative to the image's root, a
relative one that climbs above it is refused, as are loops (more than 40 symlinks). Files are
opened without following symlinks, must be regular and at most 1 MiB. A refused path counts as
not there (with a note). The binary must be a regular file with an execute bit; `argv[0]` is its
path inside the image with every symlink resolved, so that `root / argv[0][1:]` names that file.
If the unit's binary is not in the image, the daemon's name is looked for in /usr/bin, /usr/sbin,
/bin, /sbin and /usr/local/bin; if it is nowhere, the daemon is absent.

Parsing follows systemd (checked against `systemd-analyze verify` of systemd 252, see the tests):
systemd.syntax(7) for lines (a trailing backslash joins the next line with a space; lines starting
with `#` or `;` are comments, also inside a continuation; `#` elsewhere is not a comment) and
quoting; systemd.service(5) "COMMAND LINES" for ExecStart= (prefixes `-` `@` `:` `+` `!` `!!`;
`@` makes the next word argv[0], which we replace by the binary's path; `:` turns off expansion;
an empty ExecStart= resets the list); systemd.exec(5) for Environment= (several quoted assignments
a line, empty resets) and EnvironmentFile= (`-` makes it optional, empty resets; the files' values
override Environment=). Words are split as systemd's extract_first_word() does, which is close to
`shlex.split(posix=True)` but differs: quotes may open anywhere in a word; C escapes (`\\n`, `\\t`,
`\\s`, `\\x41`, `\\101`, `\\u00e9`) are decoded inside and outside quotes, single quotes included;
an unknown escape (`\\q`) is kept verbatim; `#` starts no comment; an unquoted lone `;` separates
commands and `\\;` is a literal `;`. Unit specifiers are resolved (`%%`, `%n`, `%N`, `%p`, `%i`,
`%t`...). Then, as at exec time, a word that is exactly `$NAME` becomes the variable's value split
into words (quotes respected, then removed), `${NAME}` anywhere in a word becomes the value as one
piece, `$$` becomes `$`, and unknown variables expand to nothing.

Where this differs from systemd, on purpose or for simplicity:
- several ExecStart= commands: systemd refuses a service that is not Type=oneshot; the last is used;
- drop-ins: only `NAME.d/` in the four directories (not /run, type-wide `service.d/`, or aliases);
- specifiers that depend on the running machine (`%a %b %H %m %v %o`...) make the unit unusable;
- only Environment= and EnvironmentFile= variables exist: systemd's own (`$MAINPID`, `$PATH`...)
  expand to nothing; an EnvironmentFile= wildcard may only be in the last path component; a
  missing file that is not optional is skipped with a note (systemd would fail the start); in an
  environment file a comment ending in a backslash continues nothing (systemd 254 on; before, the
  next line joined the comment);
- a byte above 0x7f written as `\\xNN` or `\\ooo` comes back as a surrogate escape (os.fsencode
  turns it into that byte); `\\u` and `\\U` must be valid code points.

Adapting to the build (the tool's rules, not systemd's). dockerd: a `-H`/`--host` (also `-H=X`,
`-HX`, `--host=X`) whose value is `fd://` or `fd://...` (socket activation) becomes
`unix://{docker_socket}`, in the same spelling; every other host (tcp://, another unix socket) is
dropped and listed in `Daemon.dropped`, since a build has no business listening there; with no
host left, `-H unix://{docker_socket}` is added. `--containerd X` / `--containerd=X` becomes
`--containerd={containerd_socket}` (added if absent). containerd: `--address X`, `-a X`, `-a=X`,
`--address=X` (Go flags; `-address` too) becomes `--address {containerd_socket}` (added if
absent); `--config` and everything else stay. Added options go right after argv[0]; a repeated
socket option is dropped. Options after `--` are left alone. /etc/docker/daemon.json is not read:
its "hosts" or "containerd" keys would conflict with these flags.

COS's defaults (used where the image has no usable unit), parsed like a unit of their own:
- dockerd: COS's /usr/lib/systemd/system/docker.service says
  `EnvironmentFile=-/etc/default/docker` and `ExecStart=/usr/bin/dockerd
  --registry-mirror=https://mirror.gcr.io --host=fd://
  --containerd=/var/run/containerd/containerd.sock $DOCKER_OPTS`. Source: the file as printed
  (`cat`) on a GKE COS node (node label gke-os-distribution=cos, 2019) in a public write-up; the
  same dockerd command line shows in `ps` and `systemctl status docker` output from COS VMs
  published in 2022 and 2024. The GoogleCloudPlatform/cos-customizer and dims/cos-tools sources
  do not contain COS's units.
- containerd: no COS unit text was found; `ExecStart=/usr/bin/containerd` (no arguments, as the
  upstream and Debian units; containerd's default socket is /run/containerd/containerd.sock).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import stat
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

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

_WS = " \t\n\r"
_COMMENTS = "#;"


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


@dataclasses.dataclass(frozen=True)
class Command:
    """One ExecStart= command as systemd stores it, before the environment is expanded."""

    path: str  # the executable as the unit names it
    argv: tuple[str, ...]  # argv[0] is `path`, or with the "@" prefix the word after it
    expand: bool = True  # False with the ":" prefix


@dataclasses.dataclass(frozen=True)
class Service:
    """The [Service] settings this module uses, from a unit and its drop-ins, parsed as systemd loads them."""

    exec_start: tuple[Command, ...]
    environment: Mapping[str, str] = dataclasses.field(hash=False)
    environment_files: tuple[str, ...]  # absolute paths, "-" first when optional
    problems: tuple[str, ...]  # why systemd would refuse to load the unit; empty when it would load it


class _Refused(Exception):
    """A path not followed or a file not read: it leaves the image, loops, or is otherwise odd."""


class _BadSpecifier(ValueError):
    pass


class _BadQuoting(ValueError):
    pass


class _BadEscape(ValueError):
    pass


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
# Unit file syntax: systemd.syntax(7)

_LINE_END = re.compile(r"\r\n|\n\r|\n|\r")


def _logical_lines(text: str) -> list[str]:
    """The lines of a unit file after joining continuations, stripped, without comments and blanks."""
    lines: list[str] = []
    continuation: str | None = None
    for raw in _LINE_END.split(text):
        if any("\udc80" <= c <= "\udcff" for c in raw):
            continue  # not UTF-8: systemd ignores the line
        if raw.lstrip(_WS)[:1] in tuple(_COMMENTS):
            continue  # a comment, also inside a continuation (and one ending in a backslash continues nothing)
        line = raw if continuation is None else continuation + raw
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            continuation = line[:-1] + " "
            continue
        continuation = None
        if line.strip(_WS):
            lines.append(line.strip(_WS))
    if continuation is not None and continuation.strip(_WS):
        lines.append(continuation.strip(_WS))
    return lines


_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"', "'": "'", "s": " ",
}  # fmt: skip


def _byte(value: int) -> str:
    return chr(value) if value < 0x80 else chr(0xDC00 + value)


def _valid_code_point(value: int) -> bool:
    return 0 < value < 0x110000 and not 0xD800 <= value <= 0xDFFF


def _unescape_one(s: str, i: int) -> tuple[str, int] | None:
    """The C escape after a backslash at s[i-1], as systemd's cunescape_one(): (text, characters used)."""
    c = s[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], 1
    if c == "x":
        digits = s[i + 1 : i + 3]
        if len(digits) == 2 and all(d in string.hexdigits for d in digits) and int(digits, 16):
            return _byte(int(digits, 16)), 3
        return None
    if c in "uU":
        width = 4 if c == "u" else 8
        digits = s[i + 1 : i + 1 + width]
        if len(digits) == width and all(d in string.hexdigits for d in digits):
            value = int(digits, 16)
            if _valid_code_point(value):
                return chr(value), 1 + width
        return None
    if c in "01234567":
        digits = s[i : i + 3]
        if len(digits) == 3 and all(d in "01234567" for d in digits) and 0 < int(digits, 8) <= 255:
            return _byte(int(digits, 8)), 3
        return None
    return None


def _extract_word(
    s: str, i: int, *, unescape: bool, relax_escapes: bool = False, relax_quotes: bool = False
) -> tuple[str | None, int]:
    """One word of `s` from `i`, as systemd's extract_first_word() with EXTRACT_UNQUOTE.

    `unescape`: C escapes are decoded (EXTRACT_CUNESCAPE); else a backslash takes the next character
    as it is. `relax_escapes`: an unknown escape or a trailing backslash is kept verbatim, as
    extract_first_word_and_warn() retries (EXTRACT_CUNESCAPE_RELAX). `relax_quotes`: an unbalanced
    quote ends the word (EXTRACT_RELAX). Returns the word (None at the end of `s`) and where the next
    word starts. Raises _BadQuoting or _BadEscape.
    """
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    if i >= n:
        return None, n
    out: list[str] = []
    quote = ""
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n:  # a trailing backslash
                i += 1
                if unescape and relax_escapes and not quote:
                    out.append("\\")
                    break
                if relax_quotes:
                    break
                raise _BadQuoting if quote else _BadEscape
            if not unescape:
                out.append(s[i + 1])
                i += 2
                continue
            decoded = _unescape_one(s, i + 1)
            if decoded is None:
                if not relax_escapes:
                    raise _BadEscape
                out.append("\\" + s[i + 1])
                i += 2
            else:
                out.append(decoded[0])
                i += 1 + decoded[1]
        elif quote:
            if c == quote:
                quote = ""
            else:
                out.append(c)
            i += 1
        elif c in "'\"":
            quote = c
            i += 1
        elif c in _WS:
            break
        else:
            out.append(c)
            i += 1
    if quote and not relax_quotes:
        raise _BadQuoting
    while i < n and s[i] in _WS:
        i += 1
    return "".join(out), i


def _split_words(s: str) -> list[str]:
    """A variable's value split for `$NAME`: strv_split_full(WHITESPACE, EXTRACT_RELAX|EXTRACT_UNQUOTE)."""
    words: list[str] = []
    i = 0
    while True:
        word, i = _extract_word(s, i, unescape=False, relax_quotes=True)
        if word is None:
            return words
        words.append(word)


# ---------------------------------------------------------------------------------------------
# Specifiers: systemd.unit(5), "Specifiers"

_MACHINE_SPECIFIERS = "aAbBHlmMoqvwWd"  # depend on the running machine: not known when building an image


def _unescape_unit_name(name: str) -> str:
    out = []
    i = 0
    while i < len(name):
        if name.startswith("\\x", i) and len(name) >= i + 4 and all(d in string.hexdigits for d in name[i + 2 : i + 4]):
            out.append(chr(int(name[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append("/" if name[i] == "-" else name[i])
            i += 1
    return "".join(out)


def _specifier_table(unit: str, fragment: str) -> dict[str, str]:
    stem = unit.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    return {
        "n": unit,
        "N": stem,
        "p": prefix,
        "P": _unescape_unit_name(prefix),
        "i": instance,
        "I": _unescape_unit_name(instance),
        "j": prefix.rsplit("-", 1)[-1],
        "J": _unescape_unit_name(prefix.rsplit("-", 1)[-1]),
        "f": "/" + _unescape_unit_name(instance or prefix).lstrip("/"),
        "y": fragment,
        "Y": fragment.rsplit("/", 1)[0] if "/" in fragment else "",
        "t": "/run",
        "S": "/var/lib",
        "C": "/var/cache",
        "L": "/var/log",
        "E": "/etc",
        "T": "/tmp",
        "V": "/var/tmp",
        "h": "/root",
        "s": "/bin/sh",
        "u": "root",
        "U": "0",
        "g": "root",
        "G": "0",
    }


def _resolve_specifiers(s: str, table: Mapping[str, str]) -> str:
    """As systemd's specifier_printf(): `%%` is `%`; an unknown letter or digit is an error."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(s):
            out.append("%")
            break
        spec = s[i + 1]
        if spec == "%":
            out.append("%")
        elif spec in table:
            out.append(table[spec])
        elif spec in _MACHINE_SPECIFIERS:
            raise _BadSpecifier(f"%{spec} depends on the running machine")
        elif spec.isascii() and spec.isalnum():
            raise _BadSpecifier(f"unknown specifier %{spec}")
        else:
            out.append("%" + spec)
        i += 2
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# [Service]: ExecStart=, Environment=, EnvironmentFile=


def _valid_env_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


def _valid_env_value(value: str) -> bool:
    return not any(("\udc80" <= c <= "\udcff") or (c < " " and c not in "\t\n") for c in value)


def _simplify(path: str) -> str:
    """systemd's path_simplify(): no empty or "." components; ".." is kept."""
    simple = "/".join(_components(path))
    return "/" + simple if path.startswith("/") else simple


def _filename_ok(name: str) -> bool:
    if not name or name in (".", "..") or "/" in name:
        return False
    return len(name.encode(errors="surrogateescape")) <= 255


def _check_path(path: str) -> str | None:
    """Why systemd would not accept `path` as an ExecStart= executable, or None."""
    if not path:
        return "an empty executable path"
    if any(c < " " or c in "\"'\\\x7f" for c in path):
        return f"the executable path {path!r} has special characters"
    if path.endswith("/"):
        return f"the executable path {path!r} is a directory"
    if path.startswith("/"):
        if not all(_filename_ok(c) for c in _components(path)):
            return f"{path!r} is not a valid path"
    elif not _filename_ok(path):
        return f"{path!r} is neither an absolute path nor a file name"
    return None


def _parse_exec(value: str, table: Mapping[str, str]) -> tuple[list[Command], str | None, bool]:
    """One ExecStart= value, as config_parse_exec(): (commands, the error or None, whether it is ignored)."""
    commands: list[Command] = []
    i = 0
    n = len(value)
    more = True
    while more:
        more = False
        try:
            first, i = _extract_word(value, i, unescape=True, relax_escapes=True)
        except (_BadQuoting, _BadEscape):  # systemd ignores the assignment when its first word is bad
            return commands, f"unbalanced quoting in ExecStart={value}", True
        if first is None:
            break
        if first == ";":
            more = True
            continue
        ignore = argv0 = literal = False
        privileges = ""  # "+", "!" or "!!"
        k = 0
        while k < len(first):
            c = first[k]
            if c == "-" and not ignore:
                ignore = True
            elif c == "@" and not argv0:
                argv0 = True
            elif c == ":" and not literal:
                literal = True
            elif c in "+!" and not privileges:
                privileges = c
            elif c == "!" and privileges == "!":
                privileges = "!!"
            else:
                break
            k += 1
        try:
            path = _resolve_specifiers(first[k:], table)
        except _BadSpecifier as e:
            return commands, f"ExecStart={value}: {e}", ignore
        problem = _check_path(path)
        if problem:
            return commands, f"ExecStart={value}: {problem}", ignore
        argv: list[str] = [] if argv0 else [path]
        while i < n:
            if value[i] == ";" and (i + 1 == n or value[i + 1] in _WS):
                i += 1
                while i < n and value[i] in _WS:
                    i += 1
                more = True
                break
            if value.startswith("\\;", i) and (i + 2 == n or value[i + 2] in _WS):
                i += 2
                while i < n and value[i] in _WS:
                    i += 1
                argv.append(";")
                continue
            try:
                word, i = _extract_word(value, i, unescape=True, relax_escapes=True)
            except (_BadQuoting, _BadEscape):
                return commands, f"unbalanced quoting in ExecStart={value}", ignore
            if word is None:
                break
            try:
                argv.append(_resolve_specifiers(word, table))
            except _BadSpecifier as e:
                return commands, f"ExecStart={value}: {e}", ignore
        if not argv:
            return commands, f"ExecStart={value}: no argv[0] after @", ignore
        commands.append(Command(_simplify(path), tuple(argv), expand=not literal))
    return commands, None, False


def parse_service(texts: Sequence[str], *, unit: str, fragment: str = "") -> Service:
    """The [Service] settings of a unit file's text and its drop-ins' texts, applied in order.

    `unit` is the unit's name and `fragment` its path (for the specifiers %n, %y...).
    """
    table = _specifier_table(unit, fragment)
    exec_start: list[Command] = []
    environment: dict[str, str] = {}
    files: list[str] = []
    problems: list[str] = []
    for text in texts:
        section: str | None = None
        for line in _logical_lines(text):
            if line.startswith("["):
                if not line.endswith("]"):
                    problems.append(f"invalid section header {line!r}")
                    break
                section = line[1:-1]
                continue
            key, equals, value = line.partition("=")
            if section != "Service" or not equals:
                continue
            key, value = key.strip(_WS), value.strip(_WS)
            if key == "ExecStart":
                if not value:
                    exec_start.clear()
                    continue
                commands, problem, ignored = _parse_exec(value, table)
                exec_start.extend(commands)
                if problem and not ignored:
                    problems.append(problem)
            elif key == "Environment":
                if not value:
                    environment.clear()
                    continue
                _parse_environment(value, table, environment)
            elif key == "EnvironmentFile":
                if not value:
                    files.clear()
                    continue
                try:
                    resolved = _resolve_specifiers(value, table)
                except _BadSpecifier:
                    continue
                optional = resolved.startswith("-")
                path = resolved[1:] if optional else resolved
                if path.startswith("/"):
                    files.append(("-" if optional else "") + _simplify(path))
    return Service(tuple(exec_start), MappingProxyType(environment), tuple(files), tuple(problems))


def _parse_environment(value: str, table: Mapping[str, str], environment: dict[str, str]) -> None:
    """One Environment= value, as config_parse_environ(): a syntax error ends the line, bad words are skipped."""
    i = 0
    while True:
        try:
            word, i = _extract_word(value, i, unescape=True)
        except (_BadQuoting, _BadEscape):
            return
        if word is None:
            return
        try:
            word = _resolve_specifiers(word, table)
        except _BadSpecifier:
            continue
        name, equals, val = word.partition("=")
        if equals and _valid_env_name(name) and _valid_env_value(val):
            environment[name] = val


def parse_environment_file(text: str) -> dict[str, str]:
    """The assignments of an EnvironmentFile=, as systemd's parse_env_file (systemd.exec(5)).

    `KEY=VALUE` lines; `#` and `;` lines are comments; unquoted values lose surrounding whitespace
    and a backslash keeps the next character (backslash-newline joins lines); single quotes keep
    everything; double quotes unescape only `\\"`, `\\\\`, `` \\` `` and `\\$`. Invalid names are skipped.
    """
    result: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    key_ws: int | None = None  # where the key's trailing whitespace starts
    value_ws: int | None = None  # where the unquoted value's trailing whitespace starts
    state = "pre_key"

    def push(trim: bool) -> None:
        name = "".join(key[:key_ws] if key_ws is not None else key)
        val = "".join(value[:value_ws] if trim and value_ws is not None else value)
        if _valid_env_name(name) and _valid_env_value(val):
            result[name] = val

    for c in text:
        newline = c in "\n\r"
        if state == "pre_key":
            if c in _COMMENTS:
                state = "comment"
            elif c not in _WS:
                state, key, key_ws = "key", [c], None
        elif state == "key":
            if newline:
                state = "pre_key"
            elif c == "=":
                state, value, value_ws = "pre_value", [], None
            else:
                if c not in _WS:
                    key_ws = None
                elif key_ws is None:
                    key_ws = len(key)
                key.append(c)
        elif state == "pre_value":
            if newline:
                push(trim=False)
                state = "pre_key"
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in _WS:
                state = "value"
                value.append(c)
        elif state == "value":
            if newline:
                push(trim=True)
                state = "pre_key"
            elif c == "\\":
                state, value_ws = "value_escape", None
            else:
                if c not in _WS:
                    value_ws = None
                elif value_ws is None:
                    value_ws = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if not newline:
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in '"\\`$':
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif newline:
                state = "pre_key"
        else:  # comment_escape: since systemd 254 a backslash does not carry a comment onto the next line
            state = "pre_key" if newline else "comment"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push(trim=state == "value")
    return result


# ---------------------------------------------------------------------------------------------
# Exec time: the environment expanded into argv (systemd.service(5), "COMMAND LINES")


def _replace_env(word: str, env: Mapping[str, str]) -> str:
    """`${NAME}` anywhere in a word as systemd's replace_env() without flags: `$$` is `$`, nothing else expands."""
    out: list[str] = []
    i = 0
    n = len(word)
    while i < n:
        if word[i] != "$" or i + 1 >= n:
            out.append(word[i])
            i += 1
            continue
        after = word[i + 1]
        if after == "$":
            out.append("$")
            i += 2
        elif after == "{":
            end = next((j for j in range(i + 2, n) if word[j] in "}:"), None)
            if end is None:
                out.append(word[i:])
                break
            if word[end] == ":":  # ${NAME:-default}: not supported there; kept as it is
                out.append(word[i:end])
                i = end
                continue
            out.append(env.get(word[i + 2 : end], ""))
            i = end + 1
        else:
            out.append("$")
            i += 1
    return "".join(out)


def expand_arguments(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """systemd's replace_env_argv(): a word `$NAME` becomes the value's words; `${NAME}` expands in place."""
    out: list[str] = []
    for word in args:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            name = word[1:]
            if _valid_env_name(name) and name in env:
                out.extend(_split_words(env[name]))
            continue
        out.append(_replace_env(word, env))
    return out


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
        try:
            entry = tree.lookup(candidate)
        except _Refused as e:
            notes.append(f"{candidate} ignored: {e}")
            continue
        if _is_executable(entry):
            return entry.path
    for directory in FALLBACK_PATH:
        candidate = f"{directory}/{daemon}"
        try:
            entry = tree.lookup(candidate)
        except _Refused as e:
            notes.append(f"{candidate} ignored: {e}")
            continue
        if _is_executable(entry):
            notes.append(f"{path} is not an executable in the image; using {entry.path}")
            return entry.path
    return None


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
