"""Carry out a `DiskPlan` on an image file, offline.

Order (the crash-safety argument of `disk.mover`): first every data move,
in the planner's order; then the new partition table (backup copy first);
then the file systems grow (`e2fsck -fp`, `resize2fs`). Until the table is
written the old table is valid. The image is a working copy: the source
is never written.

STATE is the last partition of a COS disk, so when it moves inside a regular
file the file's tail is shifted in place (extent maps only) instead of
copying its data; other moves copy only data extents, holes stay holes.

Tools: by default only e2fsck and resize2fs run (what the Go original relies
on in the COS image; the provisioner applies the plan on the VM at shutdown),
so a move on a block device is an ordered copy of the whole partition, as
`sfdisk --move-data` does there. `e2image=True` (a builder machine with
e2fsprogs) moves an ext file system on a block device by its used blocks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cos_customizer.disk import ext, gpt, mover
from cos_customizer.disk.gpt import SECTOR
from cos_customizer.disk.planner import OEM, STATE, DiskPlan, MoveKind

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
    e2image: bool = False,
) -> None:
    """Move data, write the new table, and (with `grow`) grow the file systems.

    With `e2image`, ext file systems on a block device move with e2image (used blocks only).
    """
    target_size = plan.after.disk_sectors * SECTOR
    for move in plan.moves:
        src, dst, length = move.src * SECTOR, move.dst * SECTOR, move.sectors * SECTOR
        if move.kind is MoveKind.COPY:
            report(f"copying ROOT-A to {move.name}")
            mover.copy_range(image, src, dst, length, progress)
        elif move.number == STATE and _is_tail(plan, STATE) and mover.shift_tail(image, src, dst - src):
            report(f"moved {move.name} by shifting the image's tail")
        elif e2image and stat.S_ISBLK(os.stat(image).st_mode):
            report(f"moving {move.name} (used blocks only)")
            mover.move_ext(image, src, dst)  # a device has no holes to skip: let the file system say what is used
        else:
            report(f"moving {move.name}")
            mover.copy_range(image, src, dst, length, progress)
    if stat.S_ISREG(os.stat(image).st_mode) and os.stat(image).st_size != target_size:
        os.truncate(image, target_size)
    gpt.write_table(image, plan.after)
    if grow:
        grow_file_systems(image, plan, report)


def grow_file_systems(image: Path, plan: DiskPlan, report: Report = lambda _: None) -> None:
    for number, size in ((OEM, plan.oem_fs_bytes), (STATE, plan.state_fs_bytes)):
        if size is not None:
            part = plan.after.partition(number)
            report(f"resizing the {part.name} file system to {size} bytes")
            ext.resize(image, part.first * SECTOR, size)
