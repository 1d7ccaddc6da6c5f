"""Thin wrappers for e2fsprogs, through the single `run()` helper.

A file system is named by a path and a byte offset, so a partition inside
a whole-disk image file needs no loop device: e2fsprogs accepts
`IMAGE?offset=BYTES` as a device name.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from cos_customizer.disk import loop
from cos_customizer.errors import CustomizerError
from cos_customizer.runner import CommandError, require_tool, run

E2FSPROGS = "e2fsprogs"


def device(path: Path, offset: int = 0) -> str:
    """The e2fsprogs device name of a file system at `offset` bytes into `path`."""
    return f"{path}?offset={offset}" if offset else str(path)


@dataclasses.dataclass(frozen=True)
class ExtInfo:
    """What `dumpe2fs -h` says about a file system."""

    label: str
    uuid: str
    block_count: int
    block_size: int
    free_blocks: int
    features: tuple[str, ...]
    blocks_per_group: int = 32768
    desc_size: int = 32
    reserved_gdt_blocks: int = 0

    @property
    def size(self) -> int:
        return self.block_count * self.block_size


def parse_dumpe2fs(text: str) -> ExtInfo:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        label = fields.get("Filesystem volume name", "")
        return ExtInfo(
            label="" if label == "<none>" else label,
            uuid=fields.get("Filesystem UUID", ""),
            block_count=int(fields["Block count"]),
            block_size=int(fields["Block size"]),
            free_blocks=int(fields.get("Free blocks", "0")),
            features=tuple(fields.get("Filesystem features", "").split()),
            blocks_per_group=int(fields.get("Blocks per group", "32768")),
            desc_size=int(fields.get("Group descriptor size", "32")),
            reserved_gdt_blocks=int(fields.get("Reserved GDT blocks", "0")),
        )
    except (KeyError, ValueError) as err:
        raise CustomizerError(f"cannot read the dumpe2fs output (missing or bad {err})") from err


def info(path: Path, offset: int = 0) -> ExtInfo:
    """Read the superblock of the ext file system at `offset`."""
    tool = require_tool("dumpe2fs", E2FSPROGS)
    try:
        result = run([tool, "-h", device(path, offset)])
    except CommandError as err:
        raise CustomizerError(f"no ext file system at byte {offset} of {path}: {err.stderr.strip()}") from err
    return parse_dumpe2fs(result.stdout.decode(errors="replace"))


def check(path: Path, offset: int = 0, *, repair: bool = False) -> None:
    """`e2fsck -f -n` (or `-f -p` with `repair`); raises unless the file system is clean (or was fixed)."""
    tool = require_tool("e2fsck", E2FSPROGS)
    result = run([tool, "-f", "-p" if repair else "-n", device(path, offset)], check=False)
    # e2fsck: 0 clean, 1 errors corrected; anything else is trouble.
    if result.returncode not in ((0, 1) if repair else (0,)):
        raise CommandError(result.args, result.returncode, (result.stdout + result.stderr).decode(errors="replace"))


def _gdt_blocks(fs: ExtInfo, size_bytes: int) -> int:
    """Blocks of group descriptors a file system of `size_bytes` needs."""
    groups = -(-(size_bytes // fs.block_size) // fs.blocks_per_group)
    return -(-groups * fs.desc_size // fs.block_size)


def _drop_resize_inode(path: Path, offset: int) -> None:
    """Remove the resize inode, whose reserved descriptor blocks cannot cover the growth.

    resize2fs fails ("Illegal doubly indirect block") when a file system grows
    past what mke2fs reserved for it (1024 times its first size, as a 16M OEM
    grown to 1024G); without the resize inode it grows by moving blocks. The
    feature only serves online growth of a mounted file system.
    """
    run([require_tool("tune2fs", E2FSPROGS), "-O", "^resize_inode", device(path, offset)])
    result = run([require_tool("e2fsck", E2FSPROGS), "-f", "-y", device(path, offset)], check=False)
    if result.returncode not in (0, 1):
        raise CommandError(result.args, result.returncode, (result.stdout + result.stderr).decode(errors="replace"))


def resize(path: Path, offset: int, size_bytes: int) -> None:
    """Grow (or shrink) the file system at `offset` to exactly `size_bytes` (a multiple of 512).

    On a regular file resize2fs sets the file's size to the new file-system
    size, ignoring the offset: it would cut a disk image short. So the file
    system is resized through a loop device that covers exactly its new
    extent (this needs root, as the local executor does anyway).
    """
    if size_bytes % 512:
        raise ValueError(f"resize2fs size {size_bytes} is not a whole number of sectors")
    check(path, offset, repair=True)  # resize2fs insists on a freshly checked file system
    current = info(path, offset)
    if (
        "resize_inode" in current.features
        and _gdt_blocks(current, size_bytes) > _gdt_blocks(current, current.size) + current.reserved_gdt_blocks
    ):
        _drop_resize_inode(path, offset)
    tool = require_tool("resize2fs", E2FSPROGS)
    if not stat.S_ISREG(os.stat(path).st_mode):
        run([tool, device(path, offset), f"{size_bytes // 512}s"])
        return
    with loop.attach(path, offset=offset, size=size_bytes) as dev:
        run([tool, str(dev), f"{size_bytes // 512}s"])
