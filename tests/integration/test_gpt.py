"""The GPT reader/writer, cross-checked against the real sgdisk on sparse images."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cos_customizer import privilege
from cos_customizer.disk import gpt, planner
from cos_customizer.disk.gpt import (
    BIOS_BOOT,
    CHROMEOS_KERNEL,
    CHROMEOS_RESERVED,
    CHROMEOS_ROOT,
    EFI_SYSTEM,
    LINUX_DATA,
    SECTOR,
    GptError,
    Partition,
    Table,
)
from cos_customizer.sample import image as sample_image

SGDISK = "/usr/sbin/sgdisk"
GIB = 1024**3
SECTORS_10G = 10 * GIB // SECTOR
SECTORS_12G = 12 * GIB // SECTOR
DISK_GUID = uuid.UUID("6f1c4b2e-0d1a-4c55-9a43-0c3f3a1b2d7e")
SGDISK_CODES = {
    LINUX_DATA: "8300",
    CHROMEOS_KERNEL: "7F00",
    CHROMEOS_ROOT: "7F01",
    CHROMEOS_RESERVED: "7F02",
    BIOS_BOOT: "EF02",
    EFI_SYSTEM: "EF00",
}

# number, name, first, last (None: last usable sector), type -- from 03-cos-disk.md
COS_LAYOUT: list[tuple[int, str, int, int | None, uuid.UUID]] = [
    (1, "STATE", 8704000, None, LINUX_DATA),
    (2, "KERN-A", 20480, 53247, CHROMEOS_KERNEL),
    (3, "ROOT-A", 4509696, 8703999, CHROMEOS_ROOT),
    (4, "KERN-B", 53248, 86015, CHROMEOS_KERNEL),
    (5, "ROOT-B", 315392, 4509695, CHROMEOS_ROOT),
    (6, "KERN-C", 16448, 16448, CHROMEOS_KERNEL),
    (7, "ROOT-C", 16449, 16449, CHROMEOS_ROOT),
    (8, "OEM", 86016, 118783, LINUX_DATA),
    (9, "reserved", 16450, 16450, CHROMEOS_RESERVED),
    (10, "reserved", 16451, 16451, CHROMEOS_RESERVED),
    (11, "RWFW", 64, 16447, BIOS_BOOT),
    (12, "EFI-SYSTEM", 249856, 315391, EFI_SYSTEM),
]


def part_guid(number: int) -> uuid.UUID:
    return uuid.uuid5(DISK_GUID, f"partition-{number}")


def cos_table(disk_sectors: int = SECTORS_10G) -> Table:
    last_usable = disk_sectors - 34
    parts = [
        Partition(n, t, part_guid(n), first, last_usable if last is None else last, name=name)
        for n, name, first, last, t in COS_LAYOUT
    ]
    table = gpt.new_table(disk_sectors, parts, DISK_GUID)
    return table.replace(
        table.partition(2).with_chromeos(priority=1, tries=0, successful=True),
        table.partition(4).with_chromeos(priority=0, tries=15, successful=False),
    )


def image(tmp_path: Path, size: int, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.touch()
    os.truncate(path, size)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sgdisk(*args: str | Path) -> str:
    return subprocess.run([SGDISK, *map(str, args)], check=True, capture_output=True, text=True).stdout


def assert_sgdisk_clean(path: Path) -> None:
    out = sgdisk("-v", path)
    assert "No problems found" in out, out


@dataclasses.dataclass(frozen=True)
class SgdiskView:
    disk_guid: uuid.UUID
    first_usable: int
    last_usable: int
    rows: list[tuple[int, int, int, str, str]]  # number, first, last, type code, name


def sgdisk_print(path: Path) -> SgdiskView:
    lines = sgdisk("-p", path).splitlines()
    guid = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Disk identifier (GUID)"))
    usable = next(line for line in lines if line.startswith("First usable sector is"))
    first_usable = int(usable.split()[4].rstrip(","))
    last_usable = int(usable.split()[-1])
    start = next(i for i, line in enumerate(lines) if line.startswith("Number")) + 1
    rows = []
    for line in lines[start:]:
        number, first, last, _, _, code, name = line.split(None, 6)
        rows.append((int(number), int(first), int(last), code, name))
    return SgdiskView(uuid.UUID(guid), first_usable, last_usable, rows)


def sgdisk_info(path: Path, number: int) -> dict[str, str]:
    fields = {}
    for line in sgdisk("-i", str(number), path).splitlines():
        if ": " in line:
            key, value = line.split(": ", 1)
            fields[key] = value
    return fields


def expected_rows(table: Table) -> list[tuple[int, int, int, str, str]]:
    return [(p.number, p.first, p.last, SGDISK_CODES[p.type_guid], p.name) for p in table.partitions]


def flip_byte(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


# --------------------------------------------------------------------------------------------------------------
# Writing, checked by sgdisk


def test_written_cos_layout_is_what_sgdisk_sees(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    table = cos_table()
    gpt.write_table(path, table)

    assert_sgdisk_clean(path)
    view = sgdisk_print(path)
    assert view.disk_guid == DISK_GUID
    assert (view.first_usable, view.last_usable) == (34, SECTORS_10G - 34)
    assert view.rows == expected_rows(table)
    assert view.rows[0][1:3] == (8704000, 20971486)
    for p in table.partitions:
        info = sgdisk_info(path, p.number)
        assert info["Partition GUID code"].split()[0] == str(p.type_guid).upper()
        assert info["Partition unique GUID"] == str(p.guid).upper()
        assert info["Partition name"] == f"'{p.name}'"
        assert info["Attribute flags"] == f"{p.attributes:016X}"
    assert sgdisk_info(path, 2)["Attribute flags"] == "0101000000000000"  # successful, priority 1
    assert sgdisk_info(path, 4)["Attribute flags"] == "00F0000000000000"  # tries 15, priority 0


def test_round_trip_is_exact_and_image_stays_sparse(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    table = cos_table()
    gpt.write_table(path, table)
    assert gpt.read_table(path) == table
    assert os.path.getsize(path) == 10 * GIB
    assert allocated(path) < 1024 * 1024


def test_write_extends_a_short_file_without_filling_it(tmp_path: Path) -> None:
    path = image(tmp_path, 0)
    gpt.write_table(path, cos_table())
    assert os.path.getsize(path) == 10 * GIB
    assert allocated(path) < 1024 * 1024
    assert_sgdisk_clean(path)


def test_write_never_truncates_a_longer_file(tmp_path: Path) -> None:
    path = image(tmp_path, 11 * GIB)
    gpt.write_table(path, cos_table())
    assert os.path.getsize(path) == 11 * GIB
    assert gpt.read_table(path) == cos_table()


def test_protective_mbr_keeps_boot_code(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    boot_code = bytes(range(256)) + bytes(range(184))
    with open(path, "r+b") as f:
        f.write(boot_code + b"\x01" * 72)  # boot code, then junk where the partition entries go
    gpt.write_table(path, cos_table())
    with open(path, "rb") as f:
        mbr = f.read(512)
    assert mbr[:440] == boot_code
    entry = mbr[446:462]
    assert entry[0] == 0 and entry[4] == 0xEE
    assert int.from_bytes(entry[8:12], "little") == 1
    assert int.from_bytes(entry[12:16], "little") == SECTORS_10G - 1
    assert mbr[462:510] == bytes(48)
    assert mbr[510:] == b"\x55\xaa"


def test_protective_mbr_size_is_capped_beyond_2_tib(tmp_path: Path) -> None:
    size = 3 * 1024 * GIB
    path = image(tmp_path, size)
    gpt.write_table(path, gpt.new_table(size // SECTOR, [Partition(1, LINUX_DATA, part_guid(1), 2048, 4095)]))
    with open(path, "rb") as f:
        mbr = f.read(512)
    assert int.from_bytes(mbr[458:462], "little") == 0xFFFFFFFF
    assert_sgdisk_clean(path)


CHS_LIMIT = 1024 * 255 * 63  # sectors addressable by CHS


@pytest.mark.parametrize(
    "size", [1024 * 1024, 100 * 1024 * 1024, CHS_LIMIT * SECTOR, (CHS_LIMIT + 1) * SECTOR, 10 * GIB]
)
def test_protective_mbr_is_the_one_sgdisk_writes(tmp_path: Path, size: int) -> None:
    ours, theirs = image(tmp_path, size, "ours.img"), image(tmp_path, size, "theirs.img")
    sgdisk("-o", theirs)
    gpt.write_table(ours, gpt.new_table(size // SECTOR, []))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read(512)[446:] == b.read(512)[446:]  # partition records (CHS included) and signature


def test_without_protective_mbr_lba0_is_untouched(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    with open(path, "r+b") as f:
        f.write(b"\xab" * 512)
    gpt.write_table(path, cos_table(), protective_mbr=False)
    with open(path, "rb") as f:
        assert f.read(512) == b"\xab" * 512
    assert gpt.read_table(path) == cos_table()


def test_write_at_an_offset(tmp_path: Path) -> None:
    offset = 1024 * 1024
    path = image(tmp_path, offset)
    table = gpt.new_table(4096, [Partition(3, LINUX_DATA, part_guid(3), 100, 200, name="x")], DISK_GUID)
    gpt.write_table(path, table, offset=offset)
    assert os.path.getsize(path) == offset + 4096 * SECTOR
    with open(path, "rb") as f:
        f.seek(offset + SECTOR)
        assert f.read(8) == b"EFI PART"
    assert gpt.read_table(path, offset=offset) == table


def test_invalid_table_is_not_written(tmp_path: Path) -> None:
    path = image(tmp_path, 1024 * 1024)
    bad = dataclasses.replace(cos_table(), disk_sectors=2048)
    with pytest.raises(GptError, match="partition 1 "):
        gpt.write_table(path, bad)
    assert allocated(path) == 0
    assert os.path.getsize(path) == 1024 * 1024


# --------------------------------------------------------------------------------------------------------------
# Reading what sgdisk wrote


def test_reads_a_table_made_by_sgdisk(tmp_path: Path) -> None:
    path = image(tmp_path, 100 * 1024 * 1024)
    guid_a, guid_b = uuid.uuid4(), uuid.uuid4()
    sgdisk(
        "-o", "-U", str(DISK_GUID),
        "-n", "3:2048:4095", "-t", "3:7F00", "-c", "3:KERN-Ä", "-u", f"3:{guid_a}", "-A", "3:=:0135000000000000",
        "-n", "1:4096:+1M", "-t", "1:8300", "-c", "1:my data", "-u", f"1:{guid_b}",
        "-n", "128:8192:8192", "-t", "128:EF00",
        path,
    )  # fmt: skip
    table = gpt.read_table(path)
    assert table.disk_guid == DISK_GUID
    assert table.disk_sectors == 100 * 1024 * 1024 // SECTOR
    assert (table.first_usable, table.entries, table.entry_size) == (34, 128, 128)
    assert [p.number for p in table.partitions] == [1, 3, 128]
    one, three, last = table.partitions
    assert one == Partition(1, LINUX_DATA, guid_b, 4096, 6143, 0, "my data")
    assert three == Partition(3, CHROMEOS_KERNEL, guid_a, 2048, 4095, 0x0135000000000000, "KERN-Ä")
    assert (three.priority, three.tries, three.successful) == (5, 3, True)
    assert (last.type_guid, last.first, last.last, last.size) == (EFI_SYSTEM, 8192, 8192, 1)
    assert last.name == sgdisk_info(path, 128)["Partition name"].strip("'")


# --------------------------------------------------------------------------------------------------------------
# Resizing


def test_grow_moves_the_backup_to_the_new_end(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    gpt.write_table(path, cos_table())
    os.truncate(path, 12 * GIB)
    table = gpt.read_table(path)
    assert table.disk_sectors == SECTORS_10G  # the header still describes the old disk
    grown = table.resized(SECTORS_12G)
    assert grown.last_usable == SECTORS_12G - 34
    state = grown.partition(1)
    grown = grown.replace(state.moved(state.first, grown.last_usable - state.first + 1))
    gpt.write_table(path, grown)

    assert_sgdisk_clean(path)
    view = sgdisk_print(path)
    assert view.last_usable == SECTORS_12G - 34
    assert view.rows[0][:3] == (1, 8704000, SECTORS_12G - 34)
    assert gpt.read_table(path) == grown
    assert os.path.getsize(path) == 12 * GIB


def test_shrink_below_a_partition_is_refused() -> None:
    with pytest.raises(GptError, match=r"partition 1 \(ends at 20971486\)"):
        cos_table().resized(SECTORS_10G - 1)
    small = cos_table().replace(cos_table().partition(1).moved(8704000, 1000))
    assert small.resized(8704000 + 1000 + 33).last_usable == 8704999
    with pytest.raises(GptError, match="partition 1 "):
        small.resized(8704000 + 1000 + 32)


# --------------------------------------------------------------------------------------------------------------
# Damage


@pytest.mark.parametrize(
    ("where", "pos"),
    [("header CRC field", SECTOR + 16), ("disk GUID", SECTOR + 56), ("entry array", 2 * SECTOR + 130)],
)
def test_damaged_primary_falls_back_to_backup(tmp_path: Path, where: str, pos: int) -> None:
    path = image(tmp_path, 10 * GIB)
    gpt.write_table(path, cos_table())
    flip_byte(path, pos)
    assert gpt.read_table(path) == cos_table(), where


def test_backup_is_found_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    gpt.write_table(path, cos_table())
    with open(path, "r+b") as f:
        f.seek(SECTOR)
        f.write(bytes(SECTOR * 33))  # primary header and entries gone
    assert gpt.read_table(path) == cos_table()


def test_header_found_at_the_wrong_place_is_not_trusted(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    gpt.write_table(path, cos_table())
    with open(path, "r+b") as f:
        f.seek(10 * GIB - SECTOR)
        backup = f.read(SECTOR)
        f.seek(SECTOR)
        f.write(backup)  # intact CRCs, but it says it lives at the last LBA
    assert gpt.read_table(path) == cos_table()


def test_damage_to_both_copies_is_reported(tmp_path: Path) -> None:
    path = image(tmp_path, 10 * GIB)
    gpt.write_table(path, cos_table())
    flip_byte(path, SECTOR + 56)
    flip_byte(path, 10 * GIB - 33 * SECTOR + 5)  # backup entry array
    with pytest.raises(GptError, match="damaged") as info:
        gpt.read_table(path)
    assert "primary header: header CRC32 mismatch" in str(info.value)
    assert "backup header: entry array CRC32 mismatch" in str(info.value)


@pytest.mark.parametrize("size", [10 * GIB, 1024 * 1024, 600])
def test_not_a_gpt_disk(tmp_path: Path, size: int) -> None:
    path = image(tmp_path, size)
    with pytest.raises(GptError, match="is not a GPT disk"):
        gpt.read_table(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GptError, match="cannot open"):
        gpt.read_table(tmp_path / "nope.img")
    with pytest.raises(GptError, match="cannot open"):
        gpt.write_table(tmp_path / "nope.img", cos_table())


# --------------------------------------------------------------------------------------------------------------
# Validation


def with_part(table: Table, **changes: int) -> Table:
    """The table with partition 8 (OEM) changed; bypasses validation on purpose."""
    oem = dataclasses.replace(table.partition(8), **changes)  # type: ignore[arg-type]
    return table.replace(oem)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"first": 86015}, r"partitions 4 \(53248\.\.86015\) and 8 \(86015\.\.118783\) overlap"),
        ({"first": 249856, "last": 249856}, r"partitions 8 \(249856\.\.249856\) and 12 \(249856\.\.315391\) overlap"),
        ({"first": 30, "last": 40}, r"partition 8 \(30\.\.40\) lies outside the usable sectors 34\.\.20971486"),
        ({"first": 20971480, "last": 20971487}, r"partition 8 \(20971480\.\.20971487\) lies outside"),
        ({"first": 118783, "last": 118782}, r"partition 8 starts at 118783, after its last sector 118782"),
        ({"number": 129}, r"partition 129 does not fit"),
    ],
)
def test_validate_rejects(changes: dict[str, int], message: str) -> None:
    table = cos_table()
    if "number" in changes:
        bad = dataclasses.replace(table, partitions=(*table.partitions, Partition(129, LINUX_DATA, uuid.uuid4(), 1, 2)))
    else:
        bad = with_part(table, **changes)
    with pytest.raises(GptError, match=message):
        bad.validate()


def test_validate_rejects_duplicates() -> None:
    table = cos_table()
    twin = dataclasses.replace(table.partition(8), number=13, first=200000, last=200001)
    with pytest.raises(GptError, match="partitions 8 and 13 share the unique GUID"):
        dataclasses.replace(table, partitions=(*table.partitions, twin)).validate()
    with pytest.raises(GptError, match="partition number 8 appears more than once"):
        gpt.new_table(SECTORS_10G, [table.partition(8), dataclasses.replace(twin, number=8, guid=uuid.uuid4())])


def test_partition_and_table_helpers() -> None:
    table = cos_table()
    assert table.last_usable == 20971486
    assert table.partition(12).size == 65536
    with pytest.raises(GptError, match=r"partition 13 does not exist .*1, 2, 3"):
        table.partition(13)
    with pytest.raises(GptError, match="partition 13 does not exist"):
        table.replace(Partition(13, LINUX_DATA, uuid.uuid4(), 200000, 200001))
    assert table.partition(3).moved(4509696, 8) == dataclasses.replace(table.partition(3), last=4509703)
    shuffled = Table(DISK_GUID, SECTORS_10G, tuple(reversed(table.partitions)))
    assert shuffled.partitions == table.partitions
    assert Table(DISK_GUID, 1000, (), entries=4).last_usable == 1000 - 1 - 1 - 1


def test_chromeos_attribute_bits() -> None:
    p = Partition(2, CHROMEOS_KERNEL, uuid.uuid4(), 100, 200, attributes=1 << 60 | 1)
    q = p.with_chromeos(priority=15, tries=6, successful=True)
    assert q.attributes == 1 << 60 | 1 << 56 | 6 << 52 | 15 << 48 | 1
    assert (q.priority, q.tries, q.successful) == (15, 6, True)
    r = q.with_chromeos(priority=2, successful=False)
    assert r.attributes == 1 << 60 | 6 << 52 | 2 << 48 | 1
    assert r.with_chromeos() == r
    with pytest.raises(GptError, match="priority 16 is out of range"):
        p.with_chromeos(priority=16)
    with pytest.raises(GptError, match="tries -1 is out of range"):
        p.with_chromeos(tries=-1)
    for name in ("x" * 37, "\U0001f600" * 18 + "x", "a\0b"):
        with pytest.raises(GptError, match="at most 36 UTF-16 units, without NUL"):
            Partition(1, LINUX_DATA, uuid.uuid4(), 34, 35, name=name)
    with pytest.raises(GptError, match="cannot be stored as UTF-16"):
        Partition(1, LINUX_DATA, uuid.uuid4(), 34, 35, name="\ud800")
    assert Partition(1, LINUX_DATA, uuid.uuid4(), 34, 35, name="\U0001f600" * 18).name == "\U0001f600" * 18
    assert Partition(1, LINUX_DATA, uuid.uuid4(), 34, 35, name="x" * 36).name == "x" * 36


def test_describe() -> None:
    lines = gpt.describe(cos_table())
    assert len(lines) == 12
    assert lines[1].split() == ["2", "KERN-A", "20480", "53247", "32768", "ChromeOS", "kernel"]
    assert lines[0].split()[:5] == ["1", "STATE", "8704000", "20971486", str(20971486 - 8704000 + 1)]
    odd = Partition(1, uuid.UUID(int=5), uuid.uuid4(), 34, 34)
    assert gpt.describe(Table(DISK_GUID, 100, (odd,)))[0].split()[-1] == str(uuid.UUID(int=5)).upper()


# --------------------------------------------------------------------------------------------------------------
# cgpt prioritize


def kernels(*priorities: int) -> Table:
    """A table whose kernels 1..n have the given priorities, plus a non-kernel partition 100 with priority bits set."""
    parts = [
        Partition(i + 1, CHROMEOS_KERNEL, part_guid(i + 1), 100 + 10 * i, 109 + 10 * i).with_chromeos(
            priority=prio, tries=i % 16, successful=i % 2 == 0
        )
        for i, prio in enumerate(priorities)
    ]
    other = Partition(100, LINUX_DATA, part_guid(100), 1000, 1009).with_chromeos(priority=7)
    return gpt.new_table(4096, [*parts, other])


def priorities(table: Table) -> list[int]:
    return [p.priority for p in table.partitions if p.type_guid == CHROMEOS_KERNEL]


@pytest.mark.parametrize(
    ("before", "number", "after"),
    [
        ([1, 0, 0], 2, [1, 2, 0]),  # COS: KERN-B over KERN-A, KERN-C stays disabled
        ([2, 1, 0], 2, [1, 2, 0]),
        ([1, 1, 1], 2, [1, 2, 1]),  # equal priorities stay equal below the chosen one
        ([1, 1, 1], 1, [2, 1, 1]),
        ([0, 0, 0], 3, [0, 0, 1]),  # disabled kernels are never raised
        ([15, 15, 15], 3, [1, 1, 2]),  # compressed down to what the ranking needs
        ([5, 3, 9], 2, [1, 3, 2]),
        ([5, 3, 9], 3, [2, 1, 3]),  # already highest: only compressed
        ([7, 0, 4, 4, 1], 5, [2, 0, 1, 1, 3]),  # the chosen one's old group (1) disappears
        (list(range(16)), 1, [15, 1, *range(1, 15)]),  # 16 groups: ranks below 1 merge at 1
    ],
)
def test_prioritize(before: list[int], number: int, after: list[int]) -> None:
    table = kernels(*before)
    result = gpt.prioritize(table, number)
    assert priorities(result) == after
    for old, new in zip(table.partitions, result.partitions, strict=True):
        assert (new.tries, new.successful, new.first, new.guid) == (old.tries, old.successful, old.first, old.guid)
        assert new.attributes & ~(0xF << 48) == old.attributes & ~(0xF << 48)
    assert result.partition(100) == table.partition(100)


def test_prioritize_cos_table() -> None:
    table = cos_table().replace(cos_table().partition(6).with_chromeos(priority=0))
    result = gpt.prioritize(table, 4)
    assert [result.partition(n).priority for n in (2, 4, 6)] == [1, 2, 0]
    assert result.partition(2).successful and result.partition(4).tries == 15
    assert gpt.prioritize(result, 2).partition(2).priority == 2
    assert gpt.prioritize(result, 2).partition(4).priority == 1


def test_prioritize_options() -> None:
    table = kernels(3, 3, 1, 0, 0)
    assert priorities(gpt.prioritize(table, 1, friends=True)) == [2, 2, 1, 0, 0]
    assert priorities(gpt.prioritize(table, 1)) == [3, 2, 1, 0, 0]
    assert priorities(gpt.prioritize(table, 4)) == [2, 2, 1, 3, 0]
    assert priorities(gpt.prioritize(table, 4, friends=True)) == [2, 2, 1, 3, 3]  # friends at 0 are raised too
    assert priorities(gpt.prioritize(table, 3, max_priority=15)) == [14, 14, 15, 0, 0]
    assert priorities(gpt.prioritize(table, 3, max_priority=1)) == [1, 1, 1, 0, 0]


def test_prioritize_ranks_android_vbmeta_like_cgpt() -> None:
    table = kernels(2, 1)
    vbmeta = Partition(50, gpt.ANDROID_VBMETA, part_guid(50), 2000, 2009).with_chromeos(priority=3)
    table = dataclasses.replace(table, partitions=(*table.partitions, vbmeta))
    result = gpt.prioritize(table, 2)
    assert [result.partition(n).priority for n in (1, 2, 50)] == [1, 3, 2]
    assert gpt.prioritize(table, 50).partition(50).priority == 3


def test_prioritize_refuses_non_kernels() -> None:
    with pytest.raises(GptError, match="partition 100 is not a ChromeOS kernel"):
        gpt.prioritize(kernels(1, 0), 100)
    with pytest.raises(GptError, match="partition 5 does not exist"):
        gpt.prioritize(kernels(1, 0), 5)
    with pytest.raises(GptError, match="out of range"):
        gpt.prioritize(kernels(1, 0), 1, max_priority=16)


def test_switch_to_b_is_the_originals_cgpt_prioritize() -> None:
    """The original switches the boot to B with `cgpt prioritize -P 5 -i 4 /dev/sda`; on the sample image's
    kernels (KERN-A 1, successful; KERN-B 0; KERN-C 0) cgpt ranks KERN-B 5 and KERN-A 4 (next group down),
    leaves KERN-C disabled, and changes only the priority bits 48-51 (tries 52-55, successful 56 kept)."""
    table = gpt.new_table(SECTORS_10G, sample_image.partitions(SECTORS_10G))
    result = gpt.prioritize(table, planner.KERN_B, max_priority=planner.KERN_B_PRIORITY)
    assert planner.KERN_B_PRIORITY == 5
    assert [(result.partition(n).priority, result.partition(n).tries, result.partition(n).successful)
            for n in (2, 4, 6)] == [(4, 0, True), (5, 0, False), (0, 0, False)]  # fmt: skip
    assert [result.partition(n).attributes for n in (2, 4, 6)] == [1 << 56 | 4 << 48, 5 << 48, 0]


@pytest.mark.skipif(shutil.which("cgpt") is None, reason="cgpt (Debian package cgpt) is not installed")
@pytest.mark.parametrize("before", [(1, 0, 0), (2, 1, 0), (1, 1, 1), (15, 3, 9), (0, 0, 0)])
def test_prioritize_writes_the_bytes_cgpt_writes(tmp_path: Path, before: tuple[int, int, int]) -> None:
    """`cgpt prioritize -P 5 -i 4` and ours on the same COS table: byte-identical GPT structures on disk."""
    table = cos_table()
    table = table.replace(
        *(table.partition(n).with_chromeos(priority=prio) for n, prio in zip((2, 4, 6), before, strict=True))
    )
    theirs, ours = tmp_path / "cgpt.raw", tmp_path / "ours.raw"
    for path in (theirs, ours):
        with open(path, "wb") as out:
            out.truncate(SECTORS_10G * SECTOR)
        gpt.write_table(path, table)
    subprocess.run(["cgpt", "prioritize", "-P", "5", "-i", "4", str(theirs)], check=True, capture_output=True)
    gpt.write_table(ours, gpt.prioritize(gpt.read_table(ours), 4, max_priority=5))
    with open(theirs, "rb") as a, open(ours, "rb") as b:
        for offset, size in ((0, 34 * SECTOR), ((SECTORS_10G - 33) * SECTOR, 33 * SECTOR)):
            a.seek(offset)
            b.seek(offset)
            assert a.read(size) == b.read(size)


# --------------------------------------------------------------------------------------------------------------
# Properties and block devices


names = st.text(st.characters(codec="utf-16-le", exclude_characters="\0"), max_size=36).filter(
    lambda name: len(name.encode("utf-16-le")) <= 72
)


@st.composite
def tables(draw: st.DrawFn) -> Table:
    disk_sectors = draw(st.integers(min_value=68, max_value=1 << 24))
    last_usable = disk_sectors - 34
    count = draw(st.integers(min_value=0, max_value=min(8, (last_usable - 33) // 2)))
    bounds = sorted(draw(st.sets(st.integers(34, last_usable), min_size=2 * count, max_size=2 * count)))
    numbers = draw(st.lists(st.integers(1, 128), min_size=count, max_size=count, unique=True))
    guids = draw(st.lists(st.integers(1, (1 << 128) - 1), min_size=count, max_size=count, unique=True))
    types = list(gpt.TYPE_NAMES)
    parts = [
        Partition(
            number,
            draw(st.sampled_from(types)),
            uuid.UUID(int=guids[i]),
            bounds[2 * i],
            bounds[2 * i + 1],
            draw(st.integers(0, (1 << 64) - 1)),
            draw(names),
        )
        for i, number in enumerate(numbers)
    ]
    return gpt.new_table(disk_sectors, parts, uuid.UUID(int=draw(st.integers(0, (1 << 128) - 1))))


@settings(max_examples=60, deadline=None)
@given(table=tables())
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, table: Table) -> None:
    path = tmp_path_factory.mktemp("prop") / "disk.img"
    path.touch()
    gpt.write_table(path, table)
    assert gpt.read_table(path) == table


@pytest.mark.root
def test_block_device(tmp_path: Path) -> None:
    losetup = shutil.which("losetup")
    if not privilege.can_mount() or losetup is None:
        pytest.skip("needs root and losetup")
    path = image(tmp_path, 200 * 1024 * 1024)
    attach = subprocess.run([losetup, "-f", "--show", str(path)], capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        sectors = 200 * 1024 * 1024 // SECTOR
        table = gpt.new_table(sectors, [Partition(1, LINUX_DATA, part_guid(1), 2048, sectors - 34)], DISK_GUID)
        gpt.write_table(device, table)
        assert gpt.read_table(device) == table
        with pytest.raises(GptError, match="smaller than"):
            gpt.write_table(device, table.resized(sectors + 1))
    finally:
        subprocess.run([losetup, "-d", device], check=True)
    assert_sgdisk_clean(path)
    assert gpt.read_table(path) == table
