"""The one way to run an external command.

Argument lists only (never a shell string). The command is logged under
`-debug`; a failure raises `CommandError` carrying the command, its exit
status and the tail of its stderr. Standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from cos_customizer.errors import CustomizerError

log = logging.getLogger("cos_customizer.run")

STDERR_TAIL_LINES = 8
# Where tools live that a non-root PATH may lack (mke2fs, losetup, ...).
FALLBACK_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin")


class CommandError(CustomizerError):
    """An external command failed."""

    def __init__(self, argv: Sequence[str], status: int, stderr: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-STDERR_TAIL_LINES:] if line.strip())
        message = f"{shlex.join(self.argv)} failed with exit status {status}"
        if tail:
            message += f": {tail}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class MissingToolError(CustomizerError):
    """A required external tool is not installed."""


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
            result = subprocess.run(args, input=input, env=env, cwd=cwd, capture_output=True, check=False)
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
        args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            del lines[:-STDERR_TAIL_LINES]
            on_line(line)
    tail = "\n".join(lines).encode()
    return subprocess.CompletedProcess(args, proc.returncode, b"", tail)


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
