"""Reproducible local builds: with SOURCE_DATE_EPOCH, the same inputs give the same bytes.

The reproducible-builds convention (https://reproducible-builds.org/specs/source-date-epoch/):
`SOURCE_DATE_EPOCH` is a number of seconds since 1970, and every time a build
would record "now" it records that instead. A local build's own marks on an
image are of four kinds, and each is made deterministic here:

* what the kernel records in an ext4 file system the build mounted read-write
  (STATE and OEM): the inodes the build created or changed get their times
  (atime, ctime, mtime, crtime) set to the epoch and their random generation
  number set to 0 (`debugfs`); inodes it freed are zeroed; the journal, which
  holds the build's transactions with their commit times, is emptied; free
  blocks are discarded (a second `e2fsck -E discard`: holes in the image file), so
  what deleted files held is gone; and the superblocks (the primary and every
  backup) get the epoch as mount, write and check time, no last-mounted path,
  a mount count and a lifetime-writes count of 0. Inodes the build did not
  touch, the file system UUIDs and the directory hash seeds are the source's,
  left as they are;
* the dm-verity salt of a sealed OEM, derived from the OEM's data and the
  epoch instead of random (`verity.derived_salt`);
* FAT times on EFI-SYSTEM (grub.cfg): mtools records the epoch itself when
  SOURCE_DATE_EPOCH is in its environment;
* the output's headers: the tar member's mtime is the epoch and its owner
  root; gzip stores no name and no time.

"Touched" means some time of the inode is at or after the moment the build
started and is not the time the source held (read before the build, to the
nanosecond: a source written a moment before the build keeps its own times);
the scan reads the inode tables in pure Python, and what is changed in them
is changed by `debugfs` and `e2fsck`, which keep the checksums right (`e2fsck
-fy` recomputes the directory and extent block checksums that depend on the
generation number). Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from cos_customizer.disk import ext, mover
from cos_customizer.errors import CustomizerError, UsageError
from cos_customizer.runner import CommandError, memory_file, require_tool, run

EPOCH_ENV = "SOURCE_DATE_EPOCH"
# ext4 inode times without the extra epoch bits are signed 32-bit seconds: up to 2038-01-19.
MAX_EPOCH = (1 << 31) - 1

_RO_COMPAT_GDT_CSUM = 0x10
_INCOMPAT_64BIT = 0x80
_BG_INODE_UNINIT = 0x1
_JOURNAL_MAGIC = 0xC03B3998
_JOURNAL_CSUM_V2_V3 = 0x8 | 0x10
_SPARSE_SUPER = 0x1
_SPARSE_SUPER2 = 0x200  # compat


def epoch_from(environ: Mapping[str, str]) -> int | None:
    """SOURCE_DATE_EPOCH from `environ`: None when unset or empty, else checked seconds since 1970."""
    text = environ.get(EPOCH_ENV, "")
    if not text:
        return None
    digits = text.lstrip("0") or "0"  # its length is checked before int() reads it (int() refuses 4300 digits)
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(MAX_EPOCH)) or int(digits) > MAX_EPOCH:
        raise UsageError(
            f"{EPOCH_ENV}={text!r} is not a time this build can record: set it to whole seconds since 1970 "
            f"up to {MAX_EPOCH} (2038-01-19), e.g. {EPOCH_ENV}=$(git log -1 --format=%ct), or unset it"
        )
    return int(digits)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the inode scan and the superblock rewrite need from the primary superblock."""

    inodes_count: int
    inodes_per_group: int
    inode_size: int
    block_size: int
    first_data_block: int
    blocks_per_group: int
    block_count: int
    desc_size: int
    journal_inode: int
    compat: int
    ro_compat: int
    backup_groups: tuple[int, int]

    @classmethod
    def parse(cls, sb: bytes) -> _Layout:
        ext.parse_superblock(sb)  # the magic and the block size are checked there
        inodes_count, blocks_lo = struct.unpack_from("<II", sb, 0x00)
        first_data_block, log_block = struct.unpack_from("<II", sb, 0x14)
        blocks_per_group, _clusters, inodes_per_group = struct.unpack_from("<III", sb, 0x20)
        compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
        wide = bool(incompat & _INCOMPAT_64BIT)
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if wide else 0
        return cls(
            inodes_count=inodes_count,
            inodes_per_group=inodes_per_group,
            inode_size=struct.unpack_from("<H", sb, 0x58)[0] or 128,
            block_size=1024 << log_block,
            first_data_block=first_data_block,
            blocks_per_group=blocks_per_group,
            block_count=blocks_hi << 32 | blocks_lo,
            desc_size=(struct.unpack_from("<H", sb, 0xFE)[0] if wide else 0) or 32,
            journal_inode=struct.unpack_from("<I", sb, 0xE0)[0],
            compat=compat,
            ro_compat=ro_compat,
            backup_groups=struct.unpack_from("<II", sb, 0x24C),
        )

    @property
    def groups(self) -> int:
        return -(-self.inodes_count // self.inodes_per_group)

    def superblock_groups(self) -> Iterator[int]:
        """The groups that hold a superblock: all, or with sparse_super 0, 1 and powers of 3, 5 and 7."""
        groups = -(-(self.block_count - self.first_data_block) // self.blocks_per_group)
        if self.compat & _SPARSE_SUPER2:
            yield 0
            yield from sorted({g for g in self.backup_groups if 0 < g < groups})
            return
        if not self.ro_compat & _SPARSE_SUPER:
            yield from range(groups)
            return
        found = {0, 1}
        for base in (3, 5, 7):
            power = base
            while power < groups:
                found.add(power)
                power *= base
        yield from sorted(g for g in found if g < groups)


# Each inode time: (offset of its seconds, offset of its extra bits (nanoseconds and epoch), the
# i_extra_isize it needs); crtime lives only in the extra space.
_TIMES = {"atime": (0x08, 0x8C, 0x10), "ctime": (0x0C, 0x84, 0x08), "mtime": (0x10, 0x88, 0x0C),
          "crtime": (0x90, 0x94, 0x18)}  # fmt: skip
Stamp = tuple[int, int]  # a time: seconds (low 32 bits), its extra bits
Stamps = Mapping[int, Mapping[str, Stamp]]  # inode number -> its times, dtime included


@dataclasses.dataclass(frozen=True)
class Touched:
    """An inode the build created, changed, read or freed: some time of it is at or after `since` and is not
    what the source held (`changed` names those times)."""

    number: int
    at: int  # its byte offset in the image
    live: bool
    times: dict[str, int]  # atime, ctime, mtime, crtime: seconds (low 32 bits)
    changed: frozenset[str] = frozenset()


def _inodes(fd: int, offset: int, fs: _Layout) -> Iterator[tuple[int, int, bytes]]:
    """(number, byte offset, raw inode) of every inode in an initialized part of an inode table."""
    with_itable_unused = bool(fs.ro_compat & (_RO_COMPAT_GDT_CSUM | ext.RO_COMPAT_METADATA_CSUM))
    table_block = fs.first_data_block + 1
    descriptors = os.pread(fd, fs.groups * fs.desc_size, offset + table_block * fs.block_size)
    for group in range(fs.groups):
        desc = descriptors[group * fs.desc_size : (group + 1) * fs.desc_size]
        itable = struct.unpack_from("<I", desc, 0x08)[0]
        flags, unused = struct.unpack_from("<HxxxxxxxxH", desc, 0x12)
        if fs.desc_size >= 64:
            itable |= struct.unpack_from("<I", desc, 0x28)[0] << 32
            unused |= struct.unpack_from("<H", desc, 0x32)[0] << 16
        if with_itable_unused and flags & _BG_INODE_UNINIT:
            continue
        count = fs.inodes_per_group - unused if with_itable_unused else fs.inodes_per_group
        table = os.pread(fd, count * fs.inode_size, offset + itable * fs.block_size)
        for index in range(len(table) // fs.inode_size):
            at = offset + itable * fs.block_size + index * fs.inode_size
            yield (
                group * fs.inodes_per_group + index + 1,
                at,
                table[index * fs.inode_size : (index + 1) * fs.inode_size],
            )


def _stamps_of(raw: bytes, inode_size: int) -> dict[str, Stamp]:
    extra = struct.unpack_from("<H", raw, 0x80)[0] if inode_size > 128 else 0
    stamps = {"dtime": (struct.unpack_from("<I", raw, 0x14)[0], 0)}
    for name, (seconds, bits, needs) in _TIMES.items():
        if name == "crtime" and extra < needs:
            stamps[name] = (0, 0)
            continue
        stamps[name] = (
            struct.unpack_from("<I", raw, seconds)[0],
            struct.unpack_from("<I", raw, bits)[0] if extra >= needs else 0,
        )
    return stamps


def inode_stamps(image: Path, offset: int) -> dict[int, dict[str, Stamp]]:
    """The times of every inode of the ext file system at `offset` of `image` as they are now (before the
    build): `normalize_ext` leaves a time alone while it is still the one recorded here, however recent."""
    fd = os.open(image, os.O_RDONLY)
    try:
        fs = _Layout.parse(os.pread(fd, 1024, offset + ext.SUPERBLOCK))
        return {number: _stamps_of(raw, fs.inode_size) for number, _, raw in _inodes(fd, offset, fs)}
    finally:
        os.close(fd)


def _touched(fd: int, offset: int, fs: _Layout, since: int, source: Stamps) -> Iterator[Touched]:
    for number, at, raw in _inodes(fd, offset, fs):
        stamps = _stamps_of(raw, fs.inode_size)
        before = source.get(number, {})
        changed = frozenset(name for name, stamp in stamps.items() if stamp[0] >= since and before.get(name) != stamp)
        if changed:
            links = struct.unpack_from("<H", raw, 0x1A)[0]
            times = {name: stamps[name][0] for name in _TIMES}
            yield Touched(number, at, live=links > 0 and stamps["dtime"][0] == 0, times=times, changed=changed)


def _debugfs_commands(touched: list[Touched], epoch: int) -> list[str]:
    commands = []
    for inode in touched:
        if not inode.live:
            continue
        for name in _TIMES:
            if name in inode.changed:
                commands += [f"sif <{inode.number}> {name} @{epoch}", f"sif <{inode.number}> {name}_extra 0"]
        if "crtime" in inode.changed:
            commands.append(f"sif <{inode.number}> generation 0")
        if "ctime" in inode.changed:  # changed, not only read: its change counter moved with the changes
            commands.append(f"sif <{inode.number}> version 0")
    return commands


def _journal_blocks(device: str, fs: _Layout) -> list[int]:
    debugfs = require_tool("debugfs", ext.E2FSPROGS)
    result = run([debugfs, "-R", f"blocks <{fs.journal_inode}>", device])
    return [int(word) for word in result.stdout.decode().split()]


def _empty_journal(fd: int, offset: int, fs: _Layout, blocks: list[int]) -> None:
    """Zero every journal block but the journal superblock, which restarts at sequence 1 at its first block."""
    if not blocks:
        return
    at = offset + blocks[0] * fs.block_size
    jsb = bytearray(os.pread(fd, 1024, at))
    magic, block_type = struct.unpack_from(">II", jsb, 0)
    if magic != _JOURNAL_MAGIC or block_type not in (3, 4):
        raise CustomizerError(f"inode {fs.journal_inode} does not start with a journal superblock")
    if struct.unpack_from(">I", jsb, 0x1C)[0] != 0:
        raise CustomizerError("the journal holds transactions still to replay: the file system was not unmounted")
    checksummed = bool(struct.unpack_from(">I", jsb, 0x28)[0] & _JOURNAL_CSUM_V2_V3)
    if checksummed and _journal_checksum(jsb) != struct.unpack_from(">I", jsb, 0xFC)[0]:
        raise CustomizerError("the journal superblock's checksum does not match: refusing to rewrite it")
    for start, count in _runs(blocks[1:]):
        mover.zero_range(fd, offset + start * fs.block_size, count * fs.block_size)
    struct.pack_into(">I", jsb, 0x18, 1)  # s_sequence: the first transaction expected
    # s_head: where the kernel records the log's head at unmount, and starts the next transaction (the log
    # is empty): its first block, as in a new journal.
    jsb[0x58:0x5C] = jsb[0x14:0x18]
    if checksummed:
        struct.pack_into(">I", jsb, 0xFC, _journal_checksum(jsb))
    os.pwrite(fd, jsb, at)


def _journal_checksum(jsb: bytes | bytearray) -> int:
    return ext.crc32c(bytes(jsb[:0xFC]) + bytes(4) + bytes(jsb[0x100:1024]))


def _runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    start = previous = None
    for block in blocks:
        if start is not None and previous is not None and block == previous + 1:
            previous = block
            continue
        if start is not None and previous is not None:
            yield start, previous - start + 1
        start = previous = block
    if start is not None and previous is not None:
        yield start, previous - start + 1


def _normalize_superblocks(fd: int, offset: int, fs: _Layout, epoch: int) -> None:
    for group in fs.superblock_groups():
        first = (group * fs.blocks_per_group + fs.first_data_block) * fs.block_size
        at = offset + (ext.SUPERBLOCK if group == 0 else first)
        sb = bytearray(os.pread(fd, 1024, at))
        if struct.unpack_from("<H", sb, 0x38)[0] != ext.MAGIC or struct.unpack_from("<H", sb, 0x5A)[0] != group:
            continue  # no copy here (meta_bg, or an unusual layout): nothing to normalize
        struct.pack_into("<II", sb, 0x2C, epoch, epoch)  # s_mtime, s_wtime
        struct.pack_into("<H", sb, 0x34, 0)  # s_mnt_count
        struct.pack_into("<I", sb, 0x40, epoch)  # s_lastcheck
        sb[0x88:0xC8] = bytes(64)  # s_last_mounted
        struct.pack_into("<Q", sb, 0x178, 0)  # s_kbytes_written
        sb[0x274] = sb[0x275] = sb[0x277] = 0  # the high bytes of s_wtime, s_mtime, s_lastcheck
        if struct.unpack_from("<I", sb, 0x64)[0] & ext.RO_COMPAT_METADATA_CSUM:
            struct.pack_into("<I", sb, 0x3FC, ext.superblock_checksum(sb))
        os.pwrite(fd, sb, at)


def normalize_ext(image: Path, offset: int, *, epoch: int, since: int, source: Stamps | None = None) -> int:
    """Make what the build recorded in the ext file system at `offset` of `image` depend only on its content.

    `since` is when the build started (seconds); `source` the times the file system held before the build
    (`inode_stamps`): a time still as it was there is the source's, not the build's, however recent. Returns
    how many inodes were normalized.
    """
    device = ext.device(image, offset)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "E2FSCK_TIME": str(epoch)}
    fd = os.open(image, os.O_RDWR)
    try:
        fs = _Layout.parse(os.pread(fd, 1024, offset + ext.SUPERBLOCK))
        touched = list(_touched(fd, offset, fs, since, source or {}))
        commands = _debugfs_commands(touched, epoch)
        if commands:
            with memory_file("debugfs.cmd", ("\n".join(commands) + "\n").encode()) as script:
                result = run([require_tool("debugfs", ext.E2FSPROGS), "-w", "-f", str(script), device], env=env)
            errors = [line for line in result.stderr.decode(errors="replace").splitlines() if ": " in line]
            if errors:
                raise CustomizerError(f"debugfs could not normalize {device}: {errors[0]}")
        for inode in touched:
            if not inode.live:  # freed by the build: nothing of it is kept
                os.pwrite(fd, bytes(fs.inode_size), inode.at)
        if fs.journal_inode:
            _empty_journal(fd, offset, fs, _journal_blocks(device, fs))
        os.fsync(fd)
        e2fsck = require_tool("e2fsck", ext.E2FSPROGS)
        # First the checksums the generation numbers change (exit 1: errors corrected); then the free blocks
        # are discarded, which e2fsck does only on a file system where it found nothing to correct.
        for argv, fine in (
            ([e2fsck, "-f", "-y", device], (0, 1)),
            ([e2fsck, "-f", "-y", "-E", "discard", device], (0,)),
        ):
            result = run(argv, env=env, check=False)
            if result.returncode not in fine:
                output = (result.stdout + result.stderr).decode(errors="replace")
                raise CommandError(result.args, result.returncode, output)
        _normalize_superblocks(fd, offset, fs, epoch)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(touched)
