"""ext2/3/4 file systems: the superblock read in pure Python; checks and growth with e2fsck and resize2fs.

A file system is named by a path and a byte offset, so a partition inside
a whole-disk image file needs no loop device to be checked: e2fsprogs
accepts `IMAGE?offset=BYTES` as a device name. On a block device (the
provisioner's busy /dev/sda) and for growth, a loop device (`losetup`)
covers the file system.

Only e2fsck and resize2fs run here (and losetup), the tools the Go original
relies on in the COS image itself (the provisioner uses this module on the
VM): the superblock is read, and the resize inode dropped, in our own code.
Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cos_customizer.disk import loop
from cos_customizer.errors import CustomizerError
from cos_customizer.runner import CommandError, require_tool, run

E2FSPROGS = "e2fsprogs"
SUPERBLOCK = 1024  # bytes into the file system, whatever its block size
MAGIC = 0xEF53
VALID_FS = 0x0001  # s_state: cleanly unmounted
COMPAT_RESIZE_INODE = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_METADATA_CSUM = 0x400

# Feature names as dumpe2fs prints them, by bit (compat, incompat, ro_compat).
_COMPAT = (
    *("dir_prealloc", "imagic_inodes", "has_journal", "ext_attr", "resize_inode", "dir_index", "lazy_bg", None),
    *("snapshot_bitmap", "sparse_super2", "fast_commit", "stable_inodes", "orphan_file"),
)
_INCOMPAT = (
    *("compression", "filetype", "needs_recovery", "journal_dev", "meta_bg", None, "extent", "64bit"),
    *("mmp", "flex_bg", "ea_inode", None, "dirdata", "metadata_csum_seed", "large_dir", "inline_data"),
    *("encrypt", "casefold"),
)
_RO_COMPAT = (
    *("sparse_super", "large_file", None, "huge_file", "uninit_bg", "dir_nlink", "extra_isize", "snapshot"),
    *("quota", "bigalloc", "metadata_csum", "replica", "read-only", "project", "shared_blocks", "verity"),
    *("orphan_present",),
)


def device(path: Path, offset: int = 0) -> str:
    """The e2fsprogs device name of a file system at `offset` bytes into `path`."""
    return f"{path}?offset={offset}" if offset else str(path)


@dataclasses.dataclass(frozen=True)
class ExtInfo:
    """What the superblock says (the fields `dumpe2fs -h` prints under these names)."""

    label: str
    uuid: str
    block_count: int
    block_size: int
    free_blocks: int
    features: tuple[str, ...]
    blocks_per_group: int = 32768
    desc_size: int = 32
    reserved_gdt_blocks: int = 0
    # The geometry a reader of the bitmaps needs (`extmap`), and the state (s_state, VALID_FS and ERROR_FS).
    state: int = VALID_FS
    first_data_block: int = 0
    cluster_size: int = 4096
    inodes_per_group: int = 8192
    inode_size: int = 256
    backup_bgs: tuple[int, int] = (0, 0)  # sparse_super2's two backup groups

    @property
    def size(self) -> int:
        return self.block_count * self.block_size


def _names(mask: int, names: tuple[str | None, ...], letter: str) -> list[str]:
    found = []
    for bit in range(32):
        if mask & (1 << bit):
            name = names[bit] if bit < len(names) else None
            found.append(name or f"FEATURE_{letter}{bit}")
    return found


def parse_superblock(sb: bytes | bytearray) -> ExtInfo:
    """The fields of a 1024-byte ext superblock; raises `ValueError` when it is not one."""
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != MAGIC:
        raise ValueError("no ext superblock magic")
    (blocks_lo, _reserved_lo, free_lo, _free_inodes, first_data, log_block, log_cluster, blocks_per_group,
     _clusters_per_group, inodes_per_group) = struct.unpack_from("<10I", sb, 0x04)  # fmt: skip
    state = struct.unpack_from("<H", sb, 0x3A)[0]
    rev_level = struct.unpack_from("<I", sb, 0x4C)[0]
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    wide = bool(incompat & INCOMPAT_64BIT)
    blocks_hi, _reserved_hi, free_hi = struct.unpack_from("<III", sb, 0x150) if wide else (0, 0, 0)
    if log_block > 6:
        raise ValueError(f"block size 2^{10 + log_block} is not an ext block size")
    if log_cluster > 30:
        raise ValueError(f"cluster size 2^{10 + log_cluster} is not an ext cluster size")
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if wide else 0
    return ExtInfo(
        label=sb[0x78:0x88].split(b"\0", 1)[0].decode(errors="replace"),
        uuid=str(uuid.UUID(bytes=bytes(sb[0x68:0x78]))),
        block_count=blocks_hi << 32 | blocks_lo,
        block_size=1024 << log_block,
        free_blocks=free_hi << 32 | free_lo,
        features=tuple(
            _names(compat, _COMPAT, "C") + _names(incompat, _INCOMPAT, "I") + _names(ro_compat, _RO_COMPAT, "R")
        ),
        blocks_per_group=blocks_per_group,
        desc_size=desc_size or 32,
        reserved_gdt_blocks=struct.unpack_from("<H", sb, 0xCE)[0],
        state=state,
        first_data_block=first_data,
        cluster_size=1024 << log_cluster,
        inodes_per_group=inodes_per_group,
        inode_size=struct.unpack_from("<H", sb, 0x58)[0] if rev_level else 128,
        backup_bgs=struct.unpack_from("<II", sb, 0x24C),
    )


def _read_superblock(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), 1024, offset + SUPERBLOCK)


def info(path: Path, offset: int = 0) -> ExtInfo:
    """Read the superblock of the ext file system at `offset`."""
    try:
        return parse_superblock(_read_superblock(path, offset))
    except (OSError, ValueError) as err:
        raise CustomizerError(f"no ext file system at byte {offset} of {path}: {err}") from err


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes | bytearray, crc: int = 0xFFFFFFFF) -> int:
    """crc32c as ext4 and jbd2 checksum their metadata: seeded (with ~0 by default), not inverted at the end."""
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def superblock_checksum(sb: bytes | bytearray) -> int:
    """A superblock's metadata_csum checksum: the crc32c of all but its last 4 bytes."""
    return crc32c(sb[:0x3FC])


@contextlib.contextmanager
def _on_device(path: Path, offset: int, size: int) -> Iterator[str]:
    """The device name e2fsprogs gets for the file system at `offset` of `path`.

    A file: `PATH?offset=N`. A block device (the provisioner's /dev/sda): a loop device over
    exactly `size` bytes at `offset`, because e2fsck and resize2fs open the device exclusively
    (O_EXCL) and a whole disk whose partition is in use (the root's dm-verity device holds
    /dev/sda3 or sda5) refuses that: "/dev/sda is in use", seen on a real shutdown. The loop
    device holds /dev/sda shared, and is exclusively theirs."""
    if stat.S_ISREG(os.stat(path).st_mode):
        yield device(path, offset)
        return
    with loop.attach(path, offset=offset, size=size) as dev:
        yield str(dev)


def check(path: Path, offset: int = 0, *, repair: bool = False, fix_all: bool = False) -> None:
    """`e2fsck -f -n`, `-f -p` with `repair`, `-f -y` with `fix_all`; raises unless clean (or fixed)."""
    tool = require_tool("e2fsck", E2FSPROGS)
    mode = "-y" if fix_all else "-p" if repair else "-n"
    with _on_device(path, offset, info(path, offset).size) as name:
        result = run([tool, "-f", mode, name], check=False)
    # e2fsck: 0 clean, 1 errors corrected; anything else is trouble.
    if result.returncode not in ((0, 1) if repair or fix_all else (0,)):
        raise CommandError(result.args, result.returncode, (result.stdout + result.stderr).decode(errors="replace"))


def _gdt_blocks(fs: ExtInfo, size_bytes: int) -> int:
    """Blocks of group descriptors a file system of `size_bytes` needs."""
    groups = -(-(size_bytes // fs.block_size) // fs.blocks_per_group)
    return -(-groups * fs.desc_size // fs.block_size)


def max_growth_with_resize_inode(fs: ExtInfo) -> int:
    """The largest size in bytes resize2fs can grow `fs` to while it keeps its resize inode.

    mke2fs reserves descriptor blocks for 1024 times the first size; past
    them resize2fs fails ("Illegal doubly indirect block found") and leaves
    the file system needing `e2fsck -fy`.
    """
    blocks = (_gdt_blocks(fs, fs.size) + fs.reserved_gdt_blocks) * fs.block_size // fs.desc_size * fs.blocks_per_group
    return blocks * fs.block_size


def drop_resize_inode(path: Path, offset: int) -> None:
    """Turn off the resize_inode feature, as `tune2fs -O ^resize_inode` then `e2fsck -fy` do.

    tune2fs only clears the feature bit (and the clean flag) in the
    superblock; e2fsck then frees the resize inode and its reserved
    descriptor blocks. So do we, with the superblock checksum kept right:
    the result is byte for byte tune2fs's. Without the resize inode,
    resize2fs grows a file system by moving blocks, to any size. The
    feature only serves online growth of a mounted file system.
    """
    sb = bytearray(_read_superblock(path, offset))
    fs = parse_superblock(sb)
    if "resize_inode" not in fs.features:
        return
    compat, ro_compat = struct.unpack_from("<I", sb, 0x5C)[0], struct.unpack_from("<I", sb, 0x64)[0]
    struct.pack_into("<I", sb, 0x5C, compat & ~COMPAT_RESIZE_INODE)
    struct.pack_into("<H", sb, 0x3A, struct.unpack_from("<H", sb, 0x3A)[0] & ~VALID_FS)
    if ro_compat & RO_COMPAT_METADATA_CSUM:
        struct.pack_into("<I", sb, 0x3FC, superblock_checksum(sb))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(sb), offset + SUPERBLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    check(path, offset, fix_all=True)


def resize(path: Path, offset: int, size_bytes: int) -> None:
    """Grow (or shrink) the file system at `offset` to exactly `size_bytes` (a multiple of 512).

    `e2fsck -f -p` first (resize2fs insists), then `resize2fs`; past what the
    resize inode reserved, the resize inode is dropped first (see
    `drop_resize_inode`). On a regular file resize2fs sets the file's size
    to the new file-system size, ignoring the offset: it would cut a disk
    image short. So the file system is resized through a loop device that
    covers exactly its new extent (root, as the local executor and the
    provisioner are), on a file as on a block device (see `_on_device`).
    """
    if size_bytes % 512:
        raise ValueError(f"resize2fs size {size_bytes} is not a whole number of sectors")
    check(path, offset, repair=True)
    current = info(path, offset)
    if "resize_inode" in current.features and size_bytes > max_growth_with_resize_inode(current):
        drop_resize_inode(path, offset)
    tool = require_tool("resize2fs", E2FSPROGS)
    # A loop device over the new extent, on a file (resize2fs would set a file's size, cutting a disk image
    # short) as on a block device (see `_on_device`).
    with loop.attach(path, offset=offset, size=size_bytes) as dev:
        run([tool, str(dev), f"{size_bytes // 512}s"])


def _debugfs(image: str, command: str) -> str:
    return run([require_tool("debugfs", E2FSPROGS), "-R", command, image], check=False).stdout.decode(errors="replace")


def file_head(path: Path, offset: int, name: str, *, hops: int = 8) -> bytes | None:
    """The first 32 bytes of the file `name` (absolute) in the ext file system at `offset` of the image `path`,
    its symbolic links followed inside that file system; None when there is no such regular file.

    Read with debugfs (nothing mounted, nothing run): `stat` says what the inode is and a fast link's
    target, `block_dump -f` shows the file's first block, of which two lines are read.
    """
    image = device(path, offset)
    current = PurePosixPath(name)
    for _ in range(hops):
        text = _debugfs(image, f'stat "{current}"')
        kind = re.search(r"Type: (\S+)", text)
        if kind is None:
            return None
        dump = _debugfs(image, f'block_dump -f "{current}" 0') if kind.group(1) in ("regular", "symlink") else ""
        rows = [line.split()[1:9] for line in dump.splitlines() if re.match(r"[0-7]{4}  ", line)]
        data = bytes.fromhex("".join("".join(row) for row in rows[: 2 if kind.group(1) == "regular" else None]))
        if kind.group(1) == "regular":
            return data
        if kind.group(1) != "symlink":
            return None
        fast = re.search(r'Fast link dest: "(.*)"', text)
        target = fast.group(1) if fast else data.split(b"\0", 1)[0].decode(errors="replace")
        if '"' in target or "\n" in target or not target:
            return None  # not a path debugfs can be given
        current = PurePosixPath(os.path.normpath(current.parent / target))
    return None
