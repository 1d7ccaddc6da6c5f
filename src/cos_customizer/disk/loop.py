"""Loop devices and mounts, each held by a context manager.

`losetup -P` creates no partition nodes on every machine, so a partition
is attached on its own with `--offset`/`--sizelimit`. Every device and
mount is released when the `with` block ends, however it ends. Only what
this process attached or mounted is ever detached or unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cos_customizer.errors import CustomizerError
from cos_customizer.runner import CommandError, require_tool, run


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CustomizerError(f"{what} needs root (loop devices and mounts): run as root, for example with sudo")


@contextlib.contextmanager
def attach(image: Path, *, offset: int = 0, size: int = 0, read_only: bool = False) -> Iterator[Path]:
    """Attach `size` bytes of `image` at `offset` (all of it when 0) to a new loop device."""
    _need_root("attaching a loop device")
    tool = require_tool("losetup", "mount")
    argv = [tool, "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    device = Path(run([*argv, str(image)]).stdout.decode().strip())
    try:
        yield device
    finally:
        detach(device)


def detach(device: Path) -> None:
    tool = require_tool("losetup", "mount")
    with contextlib.suppress(CommandError):
        run([tool, "--detach", str(device)])


def attached_to(image: Path) -> list[Path]:
    """The loop devices backed by `image` (to check that nothing was left behind)."""
    tool = require_tool("losetup", "mount")
    listing = json.loads(run([tool, "--json", "--list"]).stdout or b'{"loopdevices": []}')
    target = str(image.resolve())
    return [
        Path(entry["name"])
        for entry in listing.get("loopdevices", [])
        if str(entry.get("back-file") or "").removesuffix(" (deleted)") == target
    ]


@contextlib.contextmanager
def mounted(
    source: Path | str, target: Path, *, fstype: str | None = None, options: Sequence[str] = ()
) -> Iterator[Path]:
    """Mount `source` on `target` for the duration of the block."""
    _need_root("mounting a file system")
    tool = require_tool("mount", "mount")
    argv = [tool]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    if not target.exists():
        target.mkdir(parents=True)  # a file (a bind-mounted file) is a mount point as it is
    run([*argv, str(source), str(target)])
    try:
        yield target
    finally:
        unmount(target)


def unmount(target: Path) -> None:
    """Unmount `target` and everything mounted below it (our own mounts only live there)."""
    tool = require_tool("umount", "mount")
    try:
        run([tool, "--recursive", str(target)])
    except CommandError:
        # Busy (a process still inside): detach lazily rather than leave it mounted.
        run([tool, "--recursive", "--lazy", str(target)], check=False)


@contextlib.contextmanager
def partition_mounted(
    image: Path, *, offset: int, size: int, target: Path, read_only: bool = True, fstype: str | None = None
) -> Iterator[Path]:
    """Attach one partition of `image` and mount it on `target`."""
    with (
        attach(image, offset=offset, size=size, read_only=read_only) as device,
        mounted(device, target, fstype=fstype, options=("ro",) if read_only else ()),
    ):
        yield target
