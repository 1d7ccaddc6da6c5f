"""Carry out a `DiskPlan` on an image file, offline.

Order (the crash-safety argument of `disk.mover`): first every data move,
in the planner's order; then the new partition table (backup copy first);
then the file systems grow (`e2fsck -fp`, `resize2fs`). Until the table is
written the old table is valid. The image is a working copy: the source
is never written.

STATE is the last partition of a COS disk, so when it moves inside a regular
file the file's tail is shifted in place (extent maps only) instead of
copying its data; other moves copy only data extents, holes stay holes.

On a block device (the provisioner's VM disk at shutdown) no hole tells
data from free space, so an ext file system that was cleanly unmounted
moves by the blocks its bitmaps call used (`disk.extmap`) and the rest of
its destination is zeroed by discard; any other partition (not ext, not
clean) is copied whole, as `sfdisk --move-data` does in the Go original.
Then the space the new table leaves outside every partition (from the
first partition's start) is discarded too. Only e2fsck and resize2fs run
(what the Go original relies on in the COS image).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cos_customizer.disk import ext, extmap, gpt, mover
from cos_customizer.disk.gpt import SECTOR
from cos_customizer.disk.planner import OEM, STATE, DiskPlan, MoveKind
from cos_customizer.units import human_size

Report = Callable[[str], None]


def _is_tail(plan: DiskPlan, number: int) -> bool:
    """Whether partition `number` holds the last data on the disk (nothing starts after it)."""
    part = plan.before.partition(number)
    return all(other.first < part.first for other in plan.before.partitions if other.number != number)


def apply(
    image: Path,
    plan: DiskPlan,
    report: Report = lambda _: None,
    progress: mover.Progress | None = None,
    *,
    grow: bool = True,
    full_copy: bool = False,
) -> mover.Moved:
    """Move data, write the new table, and (with `grow`) grow the file systems; returns what the moves did.

    `full_copy` (a private switch, for benchmarks) moves block-device partitions whole, as before bitmaps.
    """
    target_size = plan.after.disk_sectors * SECTOR
    moved = mover.Moved()
    for move in plan.moves:
        src, dst, length = move.src * SECTOR, move.dst * SECTOR, move.sectors * SECTOR
        if move.kind is MoveKind.COPY:
            report(f"copying ROOT-A to {move.name}")
            moved += mover.copy_range(image, src, dst, length, progress)
        elif move.number == STATE and _is_tail(plan, STATE) and mover.shift_tail(image, src, dst - src):
            report(f"moved {move.name} by shifting the image's tail")
        else:
            moved += move_partition(image, move.name, src, dst, length, report, progress, full_copy=full_copy)
    if stat.S_ISREG(os.stat(image).st_mode) and os.stat(image).st_size != target_size:
        os.truncate(image, target_size)
    gpt.write_table(image, plan.after)
    moved += discard_freed(image, plan)
    if grow:
        grow_file_systems(image, plan, report)
    return moved


def move_partition(
    image: Path,
    name: str,
    src: int,
    dst: int,
    length: int,
    report: Report = lambda _: None,
    progress: mover.Progress | None = None,
    *,
    full_copy: bool = False,
) -> mover.Moved:
    """Move the partition `name` of `length` bytes from byte `src` to `dst`: on a block device, the blocks
    its ext file system uses when it can be trusted (the rest of the destination is discarded), else all of
    it; in a file, its data extents."""
    if stat.S_ISBLK(os.stat(image).st_mode) and not full_copy:
        found = extmap.used_map(image, src, length)
        if isinstance(found, str):
            report(f"moving all of {name} ({human_size(length)}): {found}")
            return mover.copy_range(image, src, dst, length, progress)
        report(f"moving the {human_size(found.used_bytes)} {name} uses of {human_size(length)}")
        return mover.copy_range(image, src, dst, length, progress, used=found.ranges)
    report(f"moving {name}")
    return mover.copy_range(image, src, dst, length, progress)


def freed_ranges(plan: DiskPlan) -> list[tuple[int, int]]:
    """(first sector, sectors) that no partition holds after the plan, from the first partition's start to the
    last usable sector: the places partitions left (the OEM's, STATE's), ROOT-A's shrunk tail, any gap. What
    precedes the first partition (the MBR's boot code, the GPT) is never in it."""
    start = min(p.first for p in (*plan.before.partitions, *plan.after.partitions))
    end = plan.after.last_usable + 1
    freed: list[tuple[int, int]] = []
    pos = start
    for first, stop in sorted((p.first, p.last + 1) for p in plan.after.partitions):
        if first > pos:
            freed.append((pos, min(first, end) - pos))
        pos = max(pos, stop)
    if pos < end:
        freed.append((pos, end - pos))
    return [(first, sectors) for first, sectors in freed if sectors > 0]


def discard_freed(image: Path, plan: DiskPlan) -> mover.Moved:
    """Discard (punch holes in a file) what `freed_ranges` names, once the new table is written."""
    if not plan.changed:
        return mover.Moved()
    freed = freed_ranges(plan)
    fd = os.open(image, os.O_RDWR)
    try:
        for first, sectors in freed:
            mover.discard_range(fd, first * SECTOR, sectors * SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)
    return mover.Moved(zeroed=sum(sectors for _, sectors in freed) * SECTOR)


def grow_file_systems(image: Path, plan: DiskPlan, report: Report = lambda _: None) -> None:
    for number, size in ((OEM, plan.oem_fs_bytes), (STATE, plan.state_fs_bytes)):
        if size is not None:
            part = plan.after.partition(number)
            report(f"resizing the {part.name} file system to {size} bytes")
            ext.resize(image, part.first * SECTOR, size)
