"""The one way to run an external command.

Argument lists only (never a shell string). The command is logged under
`-debug`; a failure raises `CommandError` carrying the command, its exit
status and the tail of its stderr. Standard library only.

No command outlives the process that started it: every child gets
`PR_SET_PDEATHSIG` = SIGKILL (`die_with_parent`), so the kernel kills it
when its parent dies, even by SIGKILL. Streamed output is read in bounded
chunks: a line longer than `LINE_LIMIT` bytes is cut (and marked), never
held whole in memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from cos_customizer import linux
from cos_customizer.errors import CustomizerError

log = logging.getLogger("cos_customizer.run")

STDERR_TAIL_LINES = 8
# The longest line passed on whole; the rest of a longer line is dropped and the cut marked.
LINE_LIMIT = 64 << 10
CUT_MARK = " [line cut: longer than {limit} bytes]"
# How much of one output line an error message quotes.
QUOTE_LIMIT = 1000
_READ_SIZE = 64 << 10
# Where tools live that a non-root PATH may lack (mke2fs, losetup, ...).
FALLBACK_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin")


class CommandError(CustomizerError):
    """An external command failed."""

    def __init__(self, argv: Sequence[str], status: int, stderr: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        lines = stderr.strip().splitlines()[-STDERR_TAIL_LINES:]
        tail = " | ".join(quote(line.strip()) for line in lines if line.strip())
        message = f"{shlex.join(self.argv)} failed with exit status {status}"
        if tail:
            message += f": {tail}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class MissingToolError(CustomizerError):
    """A required external tool is not installed."""


def quote(line: str, limit: int = QUOTE_LIMIT) -> str:
    """`line`, shortened for an error message."""
    return line if len(line) <= limit else line[:limit] + f"... ({len(line) - limit} more characters)"


def die_with_parent(parent: int = 0, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` (SIGKILL) to this process when its parent (thread) dies. Usable as a
    `preexec_fn`.

    With `parent` (the pid of the process that forked this one, taken before
    the fork), a parent that died before the call is noticed: then `sig` now.
    """
    with contextlib.suppress(OSError):  # one prctl, the C library resolved at import: safe after fork
        linux.set_parent_death_signal(int(sig))
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_us(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for a child that must die with this process (see `die_with_parent`); a child that must
    clean up first (daisy deletes what it made on SIGINT) gets its own `sig`."""
    return functools.partial(die_with_parent, os.getpid(), sig)


@contextlib.contextmanager
def memory_file(name: str, data: bytes) -> Iterator[Path]:
    """`data` in a file in memory (memfd), which every process of this machine's root can open by the path
    yielded (/proc/PID/fd/N) while the block runs: a command's input file that nothing has to remove, even
    if this process is killed."""
    fd = os.memfd_create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")
    finally:
        os.close(fd)


def require_tool(name: str, package: str) -> str:
    """The path of `name`, or a clear error naming the Debian package that provides it."""
    path = shutil.which(name) or next((str(Path(d) / name) for d in FALLBACK_DIRS if (Path(d) / name).exists()), None)
    if path is None:
        raise MissingToolError(f"{name} is not installed: install the Debian package {package} (scripts/setup does)")
    return path


def run(
    argv: Sequence[str | Path],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    hint: str = "",
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its completed process (stdout and stderr captured).

    With `on_line`, stdout is streamed line by line to it as it is
    produced (stderr is merged into it) instead of being captured.
    """
    args = [str(arg) for arg in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        if on_line is None:
            result = subprocess.run(
                args,
                input=input,
                env=env,
                cwd=cwd,
                capture_output=True,
                check=False,
                preexec_fn=die_with_us(),  # one prctl, resolved beforehand: safe after fork
            )
        else:
            result = _stream(args, env, cwd, on_line)
    except FileNotFoundError as err:
        raise MissingToolError(f"{args[0]} is not installed or not on PATH: {err.strerror}") from err
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.stderr.decode(errors="replace"), hint)
    return result


def _stream(
    args: list[str], env: Mapping[str, str] | None, cwd: Path | None, on_line: Callable[[str], None]
) -> subprocess.CompletedProcess[bytes]:
    lines: list[str] = []
    with subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_us(),
    ) as proc:
        assert proc.stdout is not None
        for line in bounded_lines(proc.stdout.fileno()):
            lines.append(line)
            del lines[:-STDERR_TAIL_LINES]
            on_line(line)
    tail = "\n".join(lines).encode()
    return subprocess.CompletedProcess(args, proc.returncode, b"", tail)


def bounded_lines(fd: int, limit: int = LINE_LIMIT) -> Iterator[str]:
    """The lines read from `fd` until end of file, without their newline, each at most `limit` bytes.

    The input is read in chunks of 64 KiB; of a longer line only the first
    `limit` bytes are kept, followed by `CUT_MARK`. Memory stays bounded
    whatever the input.
    """
    kept = bytearray()
    cut = False
    mark = CUT_MARK.format(limit=limit)

    def line() -> str:
        return kept.decode(errors="replace") + (mark if cut else "")

    while chunk := os.read(fd, _READ_SIZE):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            room = limit - len(kept)
            kept += piece[: max(room, 0)]
            cut = cut or len(piece) > room
            if end < 0:
                break
            yield line()
            kept.clear()
            cut = False
            start = end + 1
    if kept or cut:
        yield line()


@contextlib.contextmanager
def deadline(seconds: float, on_expire: Callable[[], None]) -> Iterator[threading.Event]:
    """Call `on_expire` (from a timer thread) if the block is still running after `seconds`.

    Yields an event that is set when it fired, so the caller can tell a timeout from a failure.
    """
    expired = threading.Event()

    def fire() -> None:
        expired.set()
        on_expire()

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def stop_group(proc: subprocess.Popen[bytes], steps: Sequence[tuple[int, float]]) -> None:
    """Send each signal of `steps` to the process group of `proc` in turn, waiting its grace period."""
    for sig, grace in steps:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
