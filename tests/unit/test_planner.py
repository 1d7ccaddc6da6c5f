"""The layout planner: expected layouts for the COS cases, and properties for all inputs."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cos_customizer.disk import gpt
from cos_customizer.disk.planner import ALIGN, OEM, ROOT_A, ROOT_B, STATE, MoveKind, PlanError, plan
from cos_customizer.sample.image import partitions

GiB_SECTORS = (1 << 30) // 512
MiB_SECTORS = (1 << 20) // 512
COS = gpt.new_table(10 * GiB_SECTORS, partitions(10 * GiB_SECTORS), uuid.UUID(int=1))


def layout(table: gpt.Table) -> dict[int, tuple[int, int]]:
    return {p.number: (p.first, p.last) for p in table.partitions}


def test_nothing_requested_changes_nothing() -> None:
    result = plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=False)
    assert result.after == COS
    assert result.moves == ()
    assert not result.changed


def test_disable_auto_update_on_10_gib() -> None:
    result = plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=True)
    after = layout(result.after)
    assert after[ROOT_A] == (4509696, 4509703)
    assert after[STATE] == (4513792, 20971486)
    assert after[OEM] == (86016, 118783)
    # `cgpt prioritize -P 5 -i 4`, as the original switches to B: KERN-B 5, KERN-A 4, KERN-C stays 0.
    assert [result.after.partition(n).priority for n in (2, 4, 6)] == [4, 5, 0]
    assert [(m.kind, m.name, m.src, m.dst, m.sectors) for m in result.moves] == [
        (MoveKind.COPY, "ROOT-B", 4509696, 315392, 4194304),
        (MoveKind.MOVE_EXT, "STATE", 8704000, 4513792, 12267487),
    ]
    assert result.state_fs_bytes == (20971486 - 4513792 + 1) * 512
    assert result.oem_fs_bytes is None


def test_seal_oem_1g_on_12_gib() -> None:
    # seal-oem -oem-size=1G -disk-size-gb=12: OEMSize 2047M, OEMFSSize4K 262144.
    disk = 12 * GiB_SECTORS
    result = plan(COS, disk_sectors=disk, reclaim_sda3=True, oem_size=2047 << 20, oem_fs_size_4k=262144)
    after = layout(result.after)
    assert after[ROOT_A] == (4509696, 4509703)
    assert after[OEM] == (4513792, 4513792 + 2047 * MiB_SECTORS - 1)
    assert after[STATE] == (4513792 + 2047 * MiB_SECTORS, disk - 34)
    assert result.after.disk_sectors == disk
    assert result.oem_fs_bytes == 1 << 30
    # OEM's destination lies in ROOT-A's old area: the ROOT-B copy comes first.
    assert [m.name for m in result.moves] == ["ROOT-B", "OEM", "STATE"]
    assert [result.after.partition(n).priority for n in (2, 4, 6)] == [4, 5, 0]


def test_oem_without_reclaim_moves_state_right_first() -> None:
    disk = 11 * GiB_SECTORS
    result = plan(COS, disk_sectors=disk, reclaim_sda3=False, oem_size=1023 << 20)
    after = layout(result.after)
    assert after[OEM] == (8704000, 8704000 + 1023 * MiB_SECTORS - 1)
    assert after[STATE] == (8704000 + 1023 * MiB_SECTORS, disk - 34)
    assert after[ROOT_A] == (4509696, 8703999)
    assert [m.name for m in result.moves] == ["STATE", "OEM"]
    assert result.oem_fs_bytes == (1023 << 20)


def test_state_start_is_aligned_down() -> None:
    result = plan(COS, disk_sectors=11 * GiB_SECTORS, reclaim_sda3=False, oem_size=(1023 << 20) + 3 * 512)
    assert result.after.partition(STATE).first % ALIGN == 0
    assert result.after.partition(STATE).first == result.after.partition(OEM).last + 1


def test_oem_not_larger_is_a_warning() -> None:
    result = plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=False, oem_size=15 << 20)
    assert result.after == COS
    assert result.warnings == (
        "the requested OEM size (30720 sectors) is not larger than the OEM partition (32768 sectors): "
        "the OEM partition is left as it is",
    )
    reclaimed = plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=True, oem_size=15 << 20)
    assert reclaimed.after.partition(STATE).first == 4513792
    assert reclaimed.after.partition(OEM) == COS.partition(OEM)


def test_growing_the_disk_only_extends_state() -> None:
    result = plan(COS, disk_sectors=20 * GiB_SECTORS, reclaim_sda3=False)
    assert layout(result.after)[STATE] == (8704000, 20 * GiB_SECTORS - 34)
    assert result.moves == ()
    assert result.state_fs_bytes == (20 * GiB_SECTORS - 34 - 8704000 + 1) * 512


def test_refusals_give_the_numbers() -> None:
    with pytest.raises(PlanError, match="the disk would shrink from 20971520 to 20971519 sectors"):
        plan(COS, disk_sectors=COS.disk_sectors - 1, reclaim_sda3=False)
    with pytest.raises(PlanError, match=r"STATE needs 12267487 sectors but only \d+ remain after sector \d+"):
        plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=False, oem_size=1 << 30)
    with pytest.raises(PlanError, match="cannot hold a 33554432-byte file system and its dm-verity hash tree"):
        plan(COS, disk_sectors=COS.disk_sectors, reclaim_sda3=True, oem_size=32 << 20, oem_fs_size_4k=8192)
    broken = gpt.new_table(COS.disk_sectors, [p for p in COS.partitions if p.number != OEM])
    with pytest.raises(PlanError, match=r"partition 8 \(OEM\) is missing: this does not look like a COS disk image"):
        plan(broken, disk_sectors=COS.disk_sectors, reclaim_sda3=False, oem_size=1 << 30)


def _check_invariants(before: gpt.Table, result_plan: object) -> None:
    from cos_customizer.disk.planner import DiskPlan

    assert isinstance(result_plan, DiskPlan)
    after = result_plan.after
    after.validate()  # no overlap, inside the usable area
    for part in after.partitions:
        assert after.first_usable <= part.first <= part.last <= after.last_usable
    for number in (STATE, OEM):
        old, new = before.partition(number), after.partition(number)
        assert new.size >= old.size, f"partition {number} shrank"
        if new.first != old.first:
            assert new.first % ALIGN == 0
    assert after.partition(STATE).last == after.last_usable
    # Every byte of every file system has a destination, and no move overwrites data still to move.
    live = {STATE: (before.partition(STATE).first, before.partition(STATE).size)}
    live[OEM] = (before.partition(OEM).first, before.partition(OEM).size)
    live[ROOT_A] = (before.partition(ROOT_A).first, before.partition(ROOT_A).size)
    for move in result_plan.moves:
        source = ROOT_A if move.kind is MoveKind.COPY else move.number
        assert live[source] == (move.src, move.sectors)
        for owner, (first, size) in live.items():
            if owner != source:
                assert not (move.dst < first + size and first < move.dst + move.sectors), (move, owner)
        del live[source]
        live[move.number] = (move.dst, move.sectors)
    if ROOT_A in live and after.partition(ROOT_A).size < before.partition(ROOT_A).size:
        pytest.fail("ROOT-A shrank but its data was never copied")
    for owner, (first, size) in live.items():
        target = after.partition(owner)
        assert target.first <= first and first + size - 1 <= target.last, (owner, first, size, target)


@settings(max_examples=300, deadline=None)
@given(
    disk_gb=st.integers(min_value=10, max_value=4096),
    extra_sectors=st.integers(min_value=0, max_value=GiB_SECTORS - 1),
    reclaim=st.booleans(),
    oem_sectors=st.integers(min_value=0, max_value=4096 * GiB_SECTORS),
    sealed=st.booleans(),
)
def test_plan_properties(disk_gb: int, extra_sectors: int, reclaim: bool, oem_sectors: int, sealed: bool) -> None:
    disk = disk_gb * GiB_SECTORS + extra_sectors
    oem_size = oem_sectors * 512
    fs_4k = oem_size // 2 // 4096 if sealed and oem_sectors > 2 * COS.partition(OEM).size else 0
    try:
        result = plan(COS, disk_sectors=disk, reclaim_sda3=reclaim, oem_size=oem_size, oem_fs_size_4k=fs_4k)
    except PlanError as err:
        assume(False)
        raise AssertionError from err
    _check_invariants(COS, result)
    if reclaim:
        assert result.after.partition(ROOT_A).size == 8
        assert result.moves[0].kind is MoveKind.COPY
        assert result.after.partition(ROOT_B).size >= COS.partition(ROOT_A).size
    if fs_4k and result.oem_fs_bytes is not None:
        assert result.oem_fs_bytes == fs_4k * 4096


@settings(max_examples=200, deadline=None)
@given(
    disk_gb=st.integers(min_value=10, max_value=64),
    reclaim=st.booleans(),
    sealed=st.booleans(),
    oem_mb=st.integers(min_value=16, max_value=64 * 1024),
)
def test_plans_that_fit_the_cli_table_are_accepted(disk_gb: int, reclaim: bool, sealed: bool, oem_mb: int) -> None:
    """Whatever finish-image-build's size rules accept, the planner can lay out."""
    from cos_customizer import plan as rules
    from cos_customizer.errors import ValidationError
    from cos_customizer.provisioner.config import DisableAutoUpdateArgs, ProvisionerConfig, SealOEMArgs

    config = ProvisionerConfig()
    if reclaim or sealed:
        config = config.with_boot_disk(reclaim_sda3=True).with_step(DisableAutoUpdateArgs())
    if sealed:
        config = config.with_step(SealOEMArgs())
    try:
        boot = rules.resolve_boot_disk(config, f"{oem_mb}M", disk_gb)
    except ValidationError:
        assume(False)
        return
    oem_bytes = int(boot.oem_size[:-1]) << 20
    result = plan(
        COS,
        disk_sectors=disk_gb * GiB_SECTORS,
        reclaim_sda3=boot.reclaim_sda3,
        oem_size=oem_bytes,
        oem_fs_size_4k=boot.oem_fs_size_4k,
    )
    _check_invariants(COS, result)
