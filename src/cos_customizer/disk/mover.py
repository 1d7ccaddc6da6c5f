"""Relocate data inside one image file or block device, keeping it sparse.

`copy_range` is correct when source and destination overlap in either
direction (`shift_tail` moves a file's tail by its extent maps alone):

- any byte range, byte for byte, in our own code: data
  extents found with `SEEK_DATA`/`SEEK_HOLE` are copied with
  `copy_file_range`, and holes in the source become holes (or zeros) at the
  destination, so the result is identical to the source and the image stays
  sparse. A block device has no holes to find: all of it is read, and
  runs that read as zeros are zeroed at the destination (`zero_range`)
  rather than written. This is what the provisioner uses on the VM, as
  `sfdisk --move-data` does in the Go original: it needs no tool at all.
- with `used` (the byte ranges an ext file system's bitmaps call used,
  `disk.extmap`), `copy_range` copies only those and makes the rest of
  the destination zeros by discard: on a device, cost follows the data,
  not the partition.

Order of writes and crash safety: the movers only write the destination
range, in an order that never overwrites source bytes not yet copied
(front to back when moving left, back to front when moving right, in
pieces no larger than the distance moved). The partition table is written
after all data has moved (see `disk.apply`), so a failure before that
leaves the old table valid and, for non-overlapping moves, the old data
intact. An overlapping move interrupted midway damages the partition being
moved: that is why the local executor moves data only in its working copy,
never in the source image.

Standard library only: the provisioner uses this module too.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cos_customizer import linux

CHUNK = 8 << 20
ZERO_GRAIN = 64 << 10  # runs of zeros this long are zeroed (holes), not written
_ZEROS = bytes(ZERO_GRAIN)
Progress = Callable[[int, int], None]

_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_BLKDISCARD = 0x1277  # _IO(0x12, 119)


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent of `fd` within [start, end).

    Where the file system cannot tell holes (no SEEK_DATA), all of it is data.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                return
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == start:
                yield start, end - start
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def _segments(fd: int, start: int, length: int) -> list[tuple[int, int, bool]]:
    """[start, start+length) cut into (relative offset, length, is_data) pieces."""
    pieces: list[tuple[int, int, bool]] = []
    pos = start
    for offset, size in data_extents(fd, start, start + length):
        if offset > pos:
            pieces.append((pos - start, offset - pos, False))
        pieces.append((offset - start, size, True))
        pos = offset + size
    if pos < start + length:
        pieces.append((pos - start, start + length - pos, False))
    return pieces


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: a hole where the file or device can unmap, else zeroed blocks.

    On a block device, FALLOC_FL_PUNCH_HOLE is the kernel's "zero, unmapping
    if you can, never by writing" (a loop device punches a hole in its backing
    file); BLKZEROOUT zeroes by any means; writing zeros is the last resort.
    """
    if length <= 0:
        return
    try:
        linux.fallocate(fd, linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            raise
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
    zeros = bytes(min(CHUNK, length))
    done = 0
    while done < length:
        done += os.pwrite(fd, zeros[: min(len(zeros), length - done)], offset + done)


def discard_range(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) back to the storage: BLKDISCARD on a block device (QEMU's `discard=unmap`
    and a loop device punch holes and then read zeros; a persistent disk unmaps them, what it reads back was not
    verified here), a hole in a file; `zero_range` where the device cannot discard."""
    if length <= 0:
        return
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, _BLKDISCARD, struct.pack("QQ", offset, length))
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
    zero_range(fd, offset, length)


def sparsify(path: Path, grain: int = 4096) -> None:
    """Make every all-zero `grain`-sized block of the file at `path` a hole and leave every other block data,
    so the file's holes follow from its content alone (a reproducible build's sparse tar map). Only data
    extents are read."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        extents = list(data_extents(fd, 0, size))
        # What SEEK_DATA calls a hole may be an unwritten (preallocated) extent, which turns into data for
        # SEEK_DATA once its zero pages are in the page cache (a readahead next door does that): punched, it
        # is a hole whatever is cached.
        ends = [0] + [start + length for start, length in extents]
        starts = [start for start, _ in extents] + [size]
        for gap_start, gap_end in zip(ends, starts, strict=True):
            zero_range(fd, gap_start, gap_end - gap_start)
        for start, length in extents:
            pos = start - start % grain
            end = min(size, start + length)
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                run_start = None
                for at in range(0, len(chunk) + grain, grain):
                    zero = at < len(chunk) and not chunk[at : at + grain].strip(b"\0")
                    if zero and run_start is None:
                        run_start = at
                    elif not zero and run_start is not None:
                        zero_range(fd, pos + run_start, min(at, len(chunk)) - run_start)
                        run_start = None
                pos += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset`, zeroing its runs of zero blocks instead of writing them (they stay holes)."""
    view = memoryview(data)
    zero = [bytes(view[pos : pos + ZERO_GRAIN]) == _ZEROS[: len(view[pos : pos + ZERO_GRAIN])]
            for pos in range(0, len(data), ZERO_GRAIN)]  # fmt: skip
    start = 0
    while start < len(zero):
        end = start
        while end < len(zero) and zero[end] == zero[start]:
            end += 1
        first, last = start * ZERO_GRAIN, min(end * ZERO_GRAIN, len(data))
        if zero[start]:
            zero_range(fd, offset + first, last - first)
        else:
            while first < last:
                written = os.pwrite(fd, view[first:last], offset + first)
                if written <= 0:
                    raise OSError(errno.EIO, f"short write at byte {offset + first}")
                first += written
        start = end


def _copy(fd: int, src: int, dst: int, length: int) -> None:
    """Copy a non-overlapping piece inside one file."""
    done = 0
    while done < length:
        try:
            copied = os.copy_file_range(fd, fd, length - done, src + done, dst + done)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = 0
        if copied == 0:
            data = os.pread(fd, min(CHUNK, length - done), src + done)
            if not data:
                raise OSError(errno.EIO, f"short read at byte {src + done}")
            _write(fd, data, dst + done)
            copied = len(data)
        done += copied


def shift_tail(path: Path, start: int, delta: int) -> bool:
    """Shift every byte from `start` to the end of the file by `delta` bytes, in place.

    Left (`delta` < 0) collapses the `-delta` bytes before `start` out of the
    file; right inserts a hole of `delta` bytes at `start`. The kernel only
    rewrites extent maps (FALLOC_FL_COLLAPSE_RANGE / FALLOC_FL_INSERT_RANGE), so
    the cost follows the number of extents, not the bytes. The file's size
    changes by `delta`. Returns False, having changed nothing, when the file
    is not a regular file on a file system that can do it (ext4 and XFS can)
    or the offsets are not multiples of its block size.
    """
    if delta == 0:
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        info = os.fstat(fd)
        block = info.st_blksize or 4096
        if not stat.S_ISREG(info.st_mode) or start % block or delta % block or start >= info.st_size:
            return False
        try:
            if delta < 0:
                if start + delta < 0:
                    return False
                linux.fallocate(fd, linux.FALLOC_FL_COLLAPSE_RANGE, start + delta, -delta)
            else:
                linux.fallocate(fd, linux.FALLOC_FL_INSERT_RANGE, start, delta)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return False
            raise
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Moved:
    """What a move did: bytes copied, and bytes of the destination made zeros without writing them."""

    copied: int = 0
    zeroed: int = 0

    def __add__(self, other: Moved) -> Moved:
        return Moved(self.copied + other.copied, self.zeroed + other.zeroed)


def _only(pieces: list[tuple[int, int, bool]], used: Sequence[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """`pieces` with data kept only inside the `used` ranges (relative, sorted, disjoint)."""
    out: list[tuple[int, int, bool]] = []

    def add(offset: int, size: int, is_data: bool) -> None:
        if size <= 0:
            return
        if out and out[-1][2] == is_data and out[-1][0] + out[-1][1] == offset:
            offset, size = out[-1][0], out[-1][1] + size
            out.pop()
        out.append((offset, size, is_data))

    ends = [start + length for start, length in used]
    for offset, size, is_data in pieces:
        pos, end = offset, offset + size
        if is_data:
            index = bisect.bisect_right(ends, pos)  # the first used range ending after `pos`
            while index < len(used) and used[index][0] < end:
                first, last = max(used[index][0], pos), min(ends[index], end)
                add(pos, first - pos, False)
                add(first, last - first, True)
                pos = last
                index += 1
        add(pos, end - pos, False)
    return out


def copy_range(
    path: Path,
    src: int,
    dst: int,
    length: int,
    progress: Progress | None = None,
    *,
    used: Sequence[tuple[int, int]] | None = None,
) -> Moved:
    """Copy `length` bytes from `src` to `dst` inside `path`, byte for byte and overlap-safe.

    With `used` (byte ranges relative to `src`, sorted and disjoint: what a file system uses), only those
    bytes are copied and the rest of the destination is made zeros (unmapped where the file or device can)."""
    if src == dst or length <= 0:
        return Moved()
    fd = os.open(path, os.O_RDWR)
    try:
        segments = _segments(fd, src, length)
        if used is not None:
            segments = _only(segments, used)
        total = sum(size for _, size, is_data in segments if is_data)
        distance = abs(dst - src)
        step = min(CHUNK, distance) if distance < length else CHUNK
        backwards = dst > src
        done = 0
        for offset, size, is_data in reversed(segments) if backwards else segments:
            if not is_data:  # what the file system does not use is discarded; a hole or zeros stay zeros
                (zero_range if used is None else discard_range)(fd, dst + offset, size)
                continue
            starts = range(offset, offset + size, step)
            for piece in reversed(starts) if backwards else starts:
                n = min(step, offset + size - piece)
                _copy(fd, src + piece, dst + piece, n)
                done += n
                if progress is not None:
                    progress(done, total)
        os.fsync(fd)
        return Moved(copied=done, zeroed=length - done)
    finally:
        os.close(fd)
