"""Which blocks an ext2/3/4 file system uses, read from its block bitmaps in pure Python.

The shutdown handler moves STATE and the OEM on the VM's disk, where no
hole tells data from free space: this map lets it copy only what the file
system uses. A block counts as used when its group's block bitmap says so;
a group whose bitmap was never initialized (`BLOCK_UNINIT`) uses only its
superblock and descriptor backups, as the kernel computes it; the bitmaps
and inode tables of every group count as used wherever they lie (flex_bg).
Blocks past the file system's end, up to the partition's end, count as
used too: only the file system says what is free inside it.

The map is trusted only for a file system that says it was cleanly
unmounted (no journal to replay, no errors); with anything else
(not ext, not clean, meta_bg or bigalloc layouts) `used_map` gives the
reason instead, and the caller copies everything. Standard library only:
the provisioner uses this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from pathlib import Path

from cos_customizer.disk import ext

STATE_ERROR = 0x0002  # s_state: errors were detected
BG_BLOCK_UNINIT = 0x0002
_NONZERO = re.compile(rb"[^\x00]+")


@dataclasses.dataclass(frozen=True)
class UsedMap:
    """Byte ranges (offset, length) from the file system's start, sorted and disjoint, that hold data."""

    ranges: tuple[tuple[int, int], ...]
    length: int  # the bytes covered (the partition's length)

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self.ranges)


@dataclasses.dataclass(frozen=True)
class _Layout:
    block_size: int
    block_count: int
    first_data_block: int
    blocks_per_group: int
    groups: int
    desc_size: int
    wide: bool
    inode_table_blocks: int
    sparse_super: bool
    sparse_super2: tuple[int, int] | None
    reserved_gdt: int

    def group_start(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def group_blocks(self, group: int) -> int:
        return min(self.blocks_per_group, self.block_count - self.group_start(group))

    def has_super(self, group: int) -> bool:
        """Whether `group` holds a superblock and descriptor backup (mke2fs's rule)."""
        if group == 0:
            return True
        if self.sparse_super2 is not None:
            return group in self.sparse_super2
        if not self.sparse_super or group == 1:
            return True
        return any(_power_of(group, base) for base in (3, 5, 7))

    def gdt_blocks(self) -> int:
        return -(-self.groups * self.desc_size // self.block_size)


def _power_of(n: int, base: int) -> bool:
    while n % base == 0:
        n //= base
    return n == 1


def _layout(sb: bytes) -> _Layout | str:
    """The geometry of the file system, or why its bitmaps cannot be trusted for a move."""
    try:
        info = ext.parse_superblock(sb)
    except ValueError:
        return "not an ext file system"
    features = set(info.features)
    if not info.state & ext.VALID_FS or info.state & STATE_ERROR:
        return "the file system was not cleanly unmounted"
    if "needs_recovery" in features:
        return "the file system's journal needs recovery"
    if features & {"meta_bg", "journal_dev", "bigalloc"}:
        return "the file system's layout (meta_bg, bigalloc or a journal device) is not read here"
    if info.cluster_size != info.block_size or not info.blocks_per_group or not info.inodes_per_group:
        return "the superblock's geometry is not valid"
    if info.block_count <= info.first_data_block or info.inode_size < 128 or info.desc_size < 32:
        return "the superblock's geometry is not valid"
    wide = "64bit" in features
    return _Layout(
        block_size=info.block_size,
        block_count=info.block_count,
        first_data_block=info.first_data_block,
        blocks_per_group=info.blocks_per_group,
        groups=-(-(info.block_count - info.first_data_block) // info.blocks_per_group),
        desc_size=info.desc_size if wide else 32,
        wide=wide,
        inode_table_blocks=-(-info.inodes_per_group * info.inode_size // info.block_size),
        sparse_super="sparse_super" in features,
        sparse_super2=info.backup_bgs if "sparse_super2" in features else None,
        reserved_gdt=info.reserved_gdt_blocks,
    )


def _bitmap_runs(bitmap: bytes, bits: int) -> list[tuple[int, int]]:
    """(first, count) of every run of set bits among the first `bits` of an ext bitmap (LSB first)."""
    runs: list[tuple[int, int]] = []
    for match in _NONZERO.finditer(bitmap[: -(-bits // 8)]):
        value = int.from_bytes(match.group(), "little")
        base = match.start() * 8
        while value:
            low = (value & -value).bit_length() - 1  # the lowest set bit
            value >>= low
            ones = (~value & (value + 1)).bit_length() - 1  # the run of ones starting there
            start = base + low
            if start >= bits:
                break
            runs.append((start, min(ones, bits - start)))
            value >>= ones
            base = start + ones
    return runs


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, size in sorted(r for r in ranges if r[1] > 0):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_size = merged[-1]
            merged[-1] = (last_start, max(last_size, start + size - last_start))
        else:
            merged.append((start, size))
    return merged


def used_map(path: Path, offset: int, length: int) -> UsedMap | str:
    """The used bytes of the file system at `offset` of `path` (a partition of `length` bytes), or why not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        layout = _layout(os.pread(fd, 1024, offset + ext.SUPERBLOCK))
        if isinstance(layout, str):
            return layout
        size = layout.block_size
        if layout.block_count * size > length:
            return "the file system is larger than its partition"
        gdt_at = (layout.first_data_block + 1) * size
        table = os.pread(fd, layout.groups * layout.desc_size, offset + gdt_at)
        if len(table) < layout.groups * layout.desc_size:
            return "the group descriptors could not be read"
        blocks: list[tuple[int, int]] = [(0, layout.first_data_block + 1)]  # the boot block and the superblock
        for group in range(layout.groups):
            desc = table[group * layout.desc_size : (group + 1) * layout.desc_size]
            block_bitmap, inode_bitmap, inode_table = struct.unpack_from("<III", desc, 0)
            flags = struct.unpack_from("<H", desc, 0x12)[0]
            if layout.wide and layout.desc_size >= 64:
                hi = struct.unpack_from("<III", desc, 0x20)
                block_bitmap, inode_bitmap, inode_table = (
                    hi[0] << 32 | block_bitmap, hi[1] << 32 | inode_bitmap, hi[2] << 32 | inode_table
                )  # fmt: skip
            if not all(0 < b < layout.block_count for b in (block_bitmap, inode_bitmap, inode_table)):
                return f"group {group}'s descriptor points outside the file system"
            blocks += [(block_bitmap, 1), (inode_bitmap, 1), (inode_table, layout.inode_table_blocks)]
            start = layout.group_start(group)
            if flags & BG_BLOCK_UNINIT:
                if layout.has_super(group):
                    blocks.append((start, 1 + layout.gdt_blocks() + layout.reserved_gdt))
                continue
            bitmap = os.pread(fd, size, offset + block_bitmap * size)
            if len(bitmap) < size:
                return f"group {group}'s block bitmap could not be read"
            blocks += [(start + first, count) for first, count in _bitmap_runs(bitmap, layout.group_blocks(group))]
    finally:
        os.close(fd)
    ranges = [(first * size, count * size) for first, count in _merge(blocks)]
    fs_end = layout.block_count * size
    ranges = [(start, min(part, fs_end - start)) for start, part in ranges if start < fs_end]
    if fs_end < length:  # the partition's tail past the file system: not the file system's to call free
        ranges.append((fs_end, length - fs_end))
    return UsedMap(ranges=tuple(_merge(ranges)), length=length)
