"""The layout planner: a pure function from the current table to the target one.

It implements the final-state rules of 03-cos-disk.md:

1. a larger disk moves the GPT backup structures to the new end;
2. with ReclaimSDA3, ROOT-B receives a copy of ROOT-A, KERN-B is
   prioritized (`cgpt prioritize -P 5 -i 4`: KERN-B 5, KERN-A 4), ROOT-A
   shrinks to 8 sectors, and the free area begins at P = ROOT-A start +
   4096 (a 2 MiB margin, 4K aligned); otherwise P is STATE's start;
3. a requested OEM larger than the current one moves OEM to P and STATE to
   the 4K-aligned sector at or below P + OEM size, OEM filling the gap (a
   smaller request is a warning and leaves OEM alone, though STATE still
   moves to P when reclaiming);
4. STATE then extends to the last usable sector.

The result lists the data moves in an order that never overwrites data
that has yet to move. No I/O here: `disk.apply` carries the plan out.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from cos_customizer.disk.gpt import SECTOR, Partition, Table, prioritize
from cos_customizer.disk.verity import tree_size_blocks
from cos_customizer.errors import ValidationError

STATE, KERN_A, ROOT_A, KERN_B, ROOT_B, OEM = 1, 2, 3, 4, 5, 8
ALIGN = 8  # sectors: 4 KiB
MARGIN = 4096  # sectors left after the shrunk ROOT-A: 2 MiB
SHRUNK_ROOT = 8  # sectors
# The original switches the boot to B with `cgpt prioritize -P 5 -i 4`: KERN-B 5, the other kernels below it.
KERN_B_PRIORITY = 5


class PlanError(ValidationError):
    """The requested layout does not fit; the message gives the numbers."""


class MoveKind(enum.StrEnum):
    COPY = "copy"  # byte-identical copy of the whole partition (ROOT-A to ROOT-B); the source stays
    MOVE_EXT = "move-ext"  # relocate an ext file system (used blocks only)


@dataclasses.dataclass(frozen=True)
class DataMove:
    kind: MoveKind
    number: int  # the partition whose data moves (the destination's, for a copy)
    name: str
    src: int  # first sector of the data
    dst: int
    sectors: int  # length of the region that holds the data

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "partition": self.number, "name": self.name, **self._ranges()}

    def _ranges(self) -> dict[str, int]:
        return {"from": self.src, "to": self.dst, "sectors": self.sectors}


@dataclasses.dataclass(frozen=True)
class DiskPlan:
    before: Table
    after: Table
    moves: tuple[DataMove, ...]
    # Target sizes in bytes of the ext file systems that change (None: unchanged).
    oem_fs_bytes: int | None
    state_fs_bytes: int | None
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.after != self.before

    def to_json(self) -> dict[str, Any]:
        return {
            "before": _layout(self.before),
            "after": _layout(self.after),
            "disk_sectors": {"before": self.before.disk_sectors, "after": self.after.disk_sectors},
            "moves": [move.to_json() for move in self.moves],
            "oem_fs_bytes": self.oem_fs_bytes,
            "state_fs_bytes": self.state_fs_bytes,
            "warnings": list(self.warnings),
        }


def _layout(table: Table) -> dict[str, dict[str, Any]]:
    return {str(p.number): {"name": p.name, "start": p.first, "size": p.size} for p in table.partitions}


def align_down(sector: int) -> int:
    return sector - sector % ALIGN


def align_up(sector: int) -> int:
    return -(-sector // ALIGN) * ALIGN


def _get(table: Table, number: int, name: str) -> Partition:
    for partition in table.partitions:
        if partition.number == number:
            return partition
    raise PlanError(f"partition {number} ({name}) is missing: this does not look like a COS disk image")


def plan(
    table: Table,
    *,
    disk_sectors: int,
    reclaim_sda3: bool,
    oem_size: int = 0,
    oem_fs_size_4k: int = 0,
) -> DiskPlan:
    """The target layout and data moves for these inputs (sizes in bytes, disk in sectors)."""
    if disk_sectors < table.disk_sectors:
        raise PlanError(
            f"the disk would shrink from {table.disk_sectors} to {disk_sectors} sectors; "
            "give a disk size at least as large as the image"
        )
    target = table.resized(disk_sectors) if disk_sectors != table.disk_sectors else table
    state, root_a, oem = _get(target, STATE, "STATE"), _get(target, ROOT_A, "ROOT-A"), _get(target, OEM, "OEM")
    moves: list[DataMove] = []
    warnings: list[str] = []
    if reclaim_sda3 and root_a.size <= SHRUNK_ROOT:
        # Already reclaimed (a provisioner resuming after the reboots): ROOT-B holds the system.
        free_start = align_up(root_a.first + MARGIN)
    elif reclaim_sda3:
        root_b, kern_b = _get(target, ROOT_B, "ROOT-B"), _get(target, KERN_B, "KERN-B")
        if root_b.size < root_a.size:
            raise PlanError(f"ROOT-B ({root_b.size} sectors) is smaller than ROOT-A ({root_a.size} sectors)")
        moves.append(DataMove(MoveKind.COPY, ROOT_B, "ROOT-B", root_a.first, root_b.first, root_a.size))
        target = prioritize(target, kern_b.number, max_priority=KERN_B_PRIORITY)
        target = target.replace(root_a.moved(root_a.first, SHRUNK_ROOT))
        free_start = align_up(root_a.first + MARGIN)
    else:
        free_start = state.first

    oem_sectors = oem_size // SECTOR
    grow_oem = oem_sectors > oem.size
    if oem_size and not grow_oem:
        warnings.append(
            f"the requested OEM size ({oem_sectors} sectors) is not larger than the OEM partition "
            f"({oem.size} sectors): the OEM partition is left as it is"
        )
    oem_fs_bytes: int | None = None
    if grow_oem:
        state_first = align_down(free_start + oem_sectors)
        new_oem = oem.moved(free_start, state_first - free_start)
        if new_oem.first != oem.first:
            moves.append(DataMove(MoveKind.MOVE_EXT, OEM, "OEM", oem.first, new_oem.first, oem.size))
        target = target.replace(new_oem)
        oem_fs_bytes = oem_fs_size_4k * 4096 if oem_fs_size_4k else new_oem.size * SECTOR
    else:
        new_oem = oem
        state_first = free_start
    if oem_fs_size_4k:
        _check_sealable(new_oem, oem_fs_size_4k)

    last = target.last_usable
    if state_first > last or last - state_first + 1 < state.size:
        available = max(0, last - state_first + 1)
        raise PlanError(
            f"the disk is too small: STATE needs {state.size} sectors but only {available} remain after "
            f"sector {state_first}; give a larger disk size"
        )
    new_state = state.moved(state_first, last - state_first + 1)
    if new_state.first != state.first:
        moves.append(DataMove(MoveKind.MOVE_EXT, STATE, "STATE", state.first, new_state.first, state.size))
    target = target.replace(new_state)
    target.validate()
    state_fs_bytes = new_state.size * SECTOR if new_state.size != state.size else None
    return DiskPlan(table, target, _order(moves), oem_fs_bytes, state_fs_bytes, tuple(warnings))


def _check_sealable(oem: Partition, fs_size_4k: int) -> None:
    needed = (fs_size_4k + tree_size_blocks(fs_size_4k)) * 4096
    if needed > oem.size * SECTOR:
        raise PlanError(
            f"the OEM partition ({oem.size * SECTOR} bytes) cannot hold a {fs_size_4k * 4096}-byte file system "
            f"and its dm-verity hash tree ({needed} bytes in all); give a larger -oem-size"
        )


def _overlaps(a_first: int, a_sectors: int, b_first: int, b_sectors: int) -> bool:
    return a_first < b_first + b_sectors and b_first < a_first + a_sectors


def _order(moves: list[DataMove]) -> tuple[DataMove, ...]:
    """Order moves so none writes over the source of a move still pending."""
    pending = list(moves)
    ordered: list[DataMove] = []
    while pending:
        for move in pending:
            others = [m for m in pending if m is not move]
            if not any(_overlaps(move.dst, move.sectors, m.src, m.sectors) for m in others):
                ordered.append(move)
                pending.remove(move)
                break
        else:
            names = ", ".join(m.name for m in pending)
            raise PlanError(f"the moves of {names} depend on each other in a cycle; this layout is not supported")
    return tuple(ordered)
