"""What this tool builds once and keeps: ~/.cache/cos-customizer (or $XDG_CACHE_HOME/cos-customizer), and
the lock that lets one process build an entry while others wait for it."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("cos_customizer")


def home() -> Path:
    """~/.cache/cos-customizer (or $XDG_CACHE_HOME/cos-customizer)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cos-customizer"


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` (flock, exclusive) for the block; says so when another process has it."""
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process building %s (%s)...", what, path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
