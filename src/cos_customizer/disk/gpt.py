"""A small, exact GPT reader and writer (UEFI 2.x layout, 512-byte sectors).

Layout written by `write_table` for a disk of D sectors with E entry sectors
(E = 32 for the usual 128 entries of 128 bytes):

    LBA 0            protective MBR (one 0xEE partition from LBA 1)
    LBA 1            primary header (92 bytes, rest of the sector zero)
    LBA 2 .. 1+E     primary entry array
    ...              partitions, between first_usable and last_usable
    D-1-E .. D-2     backup entry array
    D-1              backup header

GUIDs are stored mixed-endian (`uuid.UUID.bytes_le`), names as UTF-16LE in 72
bytes, integers little-endian. Only the standard library is used.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from cos_customizer.errors import CustomizerError

SECTOR = 512

LINUX_DATA = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
CHROMEOS_KERNEL = uuid.UUID("FE3A2A5D-4F32-41A7-B725-ACCC3285A309")
CHROMEOS_ROOT = uuid.UUID("3CB8E202-3B7E-47DD-8A3C-7FF2A13CFCEC")
CHROMEOS_RESERVED = uuid.UUID("2E0A753D-9E48-43B0-8337-B15192CB1B5E")
BIOS_BOOT = uuid.UUID("21686148-6449-6E6F-744E-656564454649")
EFI_SYSTEM = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
ANDROID_VBMETA = uuid.UUID("88434509-D9D1-487D-B82C-15EF964CBD4B")
# The types `cgpt prioritize` ranks (vbmeta since vboot_reference of January 2025; COS images have none).
BOOTABLE_TYPES = frozenset({CHROMEOS_KERNEL, ANDROID_VBMETA})

TYPE_NAMES: dict[uuid.UUID, str] = {
    LINUX_DATA: "Linux data",
    CHROMEOS_KERNEL: "ChromeOS kernel",
    CHROMEOS_ROOT: "ChromeOS root",
    CHROMEOS_RESERVED: "ChromeOS reserved",
    BIOS_BOOT: "BIOS boot",
    EFI_SYSTEM: "EFI system",
    ANDROID_VBMETA: "Android vbmeta",
}

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
HEADER_SIZE = 92
ENTRY_SIZE = 128
NAME_UNITS = 36  # UTF-16 code units in an entry name

# signature, revision, header size, header CRC, reserved, my LBA, alternate LBA, first usable, last usable,
# disk GUID, entry array LBA, number of entries, entry size, entry array CRC
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# type GUID, unique GUID, first LBA, last LBA, attributes, name
_ENTRY = struct.Struct("<16s16sQQQ72s")
_MAX_ENTRY_BYTES = 16 * 1024 * 1024  # sanity bound on what a header may ask us to read

_PRIORITY_SHIFT, _TRIES_SHIFT, _SUCCESSFUL_SHIFT = 48, 52, 56


class GptError(CustomizerError):
    """The GPT is missing, damaged or would be invalid."""


class _NoSignature(GptError):
    """No GPT header signature where one was looked for."""


def _entry_sectors(entries: int, entry_size: int) -> int:
    return -(-entries * entry_size // SECTOR)


@dataclass(frozen=True)
class Partition:
    """One populated entry of the partition entry array."""

    number: int
    type_guid: uuid.UUID
    guid: uuid.UUID
    first: int
    last: int
    attributes: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.number < 1:
            raise GptError(f"partition number {self.number} is invalid: numbers start at 1")
        if not 0 <= self.attributes < 1 << 64:
            raise GptError(f"partition {self.number}: attributes {self.attributes:#x} do not fit in 64 bits")
        try:
            encoded = self.name.encode("utf-16-le")
        except UnicodeEncodeError as exc:
            raise GptError(f"partition {self.number}: name {self.name!r} cannot be stored as UTF-16") from exc
        if len(encoded) > 2 * NAME_UNITS or "\0" in self.name:
            raise GptError(
                f"partition {self.number}: name {self.name!r} must be at most {NAME_UNITS} UTF-16 units, without NUL"
            )

    @property
    def size(self) -> int:
        """Size in sectors."""
        return self.last - self.first + 1

    @property
    def priority(self) -> int:
        """ChromeOS kernel priority (attribute bits 48-51)."""
        return (self.attributes >> _PRIORITY_SHIFT) & 0xF

    @property
    def tries(self) -> int:
        """ChromeOS kernel tries left (attribute bits 52-55)."""
        return (self.attributes >> _TRIES_SHIFT) & 0xF

    @property
    def successful(self) -> bool:
        """ChromeOS kernel 'successful boot' flag (attribute bit 56)."""
        return bool((self.attributes >> _SUCCESSFUL_SHIFT) & 1)

    def with_chromeos(
        self, *, priority: int | None = None, tries: int | None = None, successful: bool | None = None
    ) -> Partition:
        """A copy with the given ChromeOS kernel attribute fields changed; other bits are kept."""
        attrs = self.attributes
        for label, value, shift in (("priority", priority, _PRIORITY_SHIFT), ("tries", tries, _TRIES_SHIFT)):
            if value is None:
                continue
            if not 0 <= value <= 15:
                raise GptError(f"partition {self.number}: {label} {value} is out of range, use 0..15")
            attrs = (attrs & ~(0xF << shift)) | (value << shift)
        if successful is not None:
            attrs = (attrs & ~(1 << _SUCCESSFUL_SHIFT)) | (int(successful) << _SUCCESSFUL_SHIFT)
        return dataclasses.replace(self, attributes=attrs)

    def moved(self, first: int, size: int) -> Partition:
        """A copy that starts at `first` and spans `size` sectors."""
        if size < 1:
            raise GptError(f"partition {self.number}: size {size} is invalid, it must be at least 1 sector")
        return dataclasses.replace(self, first=first, last=first + size - 1)


@dataclass(frozen=True)
class Table:
    """A whole GPT: disk identity and size, entry array geometry, populated entries."""

    disk_guid: uuid.UUID
    disk_sectors: int
    partitions: tuple[Partition, ...]
    first_usable: int = 34
    entries: int = 128
    entry_size: int = ENTRY_SIZE

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.partitions, key=lambda p: p.number))
        if ordered != self.partitions:
            object.__setattr__(self, "partitions", ordered)

    @property
    def entry_sectors(self) -> int:
        """Sectors taken by one copy of the entry array."""
        return _entry_sectors(self.entries, self.entry_size)

    @property
    def last_usable(self) -> int:
        return self.disk_sectors - 1 - self.entry_sectors - 1

    def partition(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        have = ", ".join(str(p.number) for p in self.partitions) or "none"
        raise GptError(f"partition {number} does not exist in this GPT (partitions: {have})")

    def replace(self, *parts: Partition) -> Table:
        """A copy where each given partition replaces the existing one with the same number."""
        by_number = {p.number: p for p in self.partitions}
        for part in parts:
            self.partition(part.number)  # must exist
            by_number[part.number] = part
        return dataclasses.replace(self, partitions=tuple(by_number.values()))

    def resized(self, disk_sectors: int) -> Table:
        """The same partitions on a disk of `disk_sectors`; the backup structures move to its new end."""
        table = dataclasses.replace(self, disk_sectors=disk_sectors)
        if table.last_usable < table.first_usable:
            raise GptError(f"a disk of {disk_sectors} sectors is too small to hold a GPT; use a larger size")
        outside = [p for p in self.partitions if p.last > table.last_usable]
        if outside:
            which = ", ".join(f"{p.number} (ends at {p.last})" for p in outside)
            raise GptError(
                f"cannot resize the disk to {disk_sectors} sectors: partition {which} would end past "
                f"the last usable sector {table.last_usable}; shrink or move it first, or use a larger size"
            )
        return table

    def validate(self) -> None:
        """Raise GptError unless the table can be written as a correct GPT."""
        if self.entry_size < ENTRY_SIZE or self.entry_size % ENTRY_SIZE:
            raise GptError(f"entry size {self.entry_size} is invalid: it must be a multiple of {ENTRY_SIZE}")
        if self.entries < 1 or self.entries * self.entry_size > _MAX_ENTRY_BYTES:
            raise GptError(f"{self.entries} entry slots is not a usable entry array size")
        if self.first_usable < 2 + self.entry_sectors:
            raise GptError(
                f"first usable sector {self.first_usable} overlaps the primary entry array; "
                f"it must be at least {2 + self.entry_sectors}"
            )
        if self.last_usable < self.first_usable:
            raise GptError(f"a disk of {self.disk_sectors} sectors is too small to hold a GPT")
        numbers: set[int] = set()
        guids: dict[uuid.UUID, int] = {}
        for p in self.partitions:
            if p.number in numbers:
                raise GptError(f"partition number {p.number} appears more than once")
            numbers.add(p.number)
            if p.number > self.entries:
                raise GptError(f"partition {p.number} does not fit in an entry array of {self.entries} slots")
            if p.type_guid.int == 0:
                raise GptError(f"partition {p.number} has the nil type GUID, which marks an empty entry")
            if p.guid.int == 0:
                raise GptError(f"partition {p.number} has the nil unique GUID; give it a random one")
            if p.guid in guids:
                raise GptError(f"partitions {guids[p.guid]} and {p.number} share the unique GUID {p.guid}")
            guids[p.guid] = p.number
            if p.first > p.last:
                raise GptError(f"partition {p.number} starts at {p.first}, after its last sector {p.last}")
            if p.first < self.first_usable or p.last > self.last_usable:
                raise GptError(
                    f"partition {p.number} ({p.first}..{p.last}) lies outside the usable sectors "
                    f"{self.first_usable}..{self.last_usable}"
                )
        by_start = sorted(self.partitions, key=lambda p: (p.first, p.number))
        for a, b in itertools.pairwise(by_start):
            if b.first <= a.last:
                raise GptError(
                    f"partitions {a.number} ({a.first}..{a.last}) and {b.number} ({b.first}..{b.last}) overlap"
                )


def new_table(disk_sectors: int, partitions: Iterable[Partition], disk_guid: uuid.UUID | None = None) -> Table:
    """A validated table with 128 entries of 128 bytes (random disk GUID unless given)."""
    table = Table(
        disk_guid=uuid.uuid4() if disk_guid is None else disk_guid,
        disk_sectors=disk_sectors,
        partitions=tuple(partitions),
    )
    table.validate()
    return table


def describe(table: Table) -> list[str]:
    """One line per partition: number, name, first, last, size in sectors, type."""
    return [
        f"{p.number:>3} {p.name:<16} {p.first:>12} {p.last:>12} {p.size:>12}  "
        f"{TYPE_NAMES.get(p.type_guid, str(p.type_guid).upper())}"
        for p in table.partitions
    ]


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def _encode_entries(table: Table) -> bytes:
    array = bytearray(table.entries * table.entry_size)
    for p in table.partitions:
        raw = _ENTRY.pack(
            p.type_guid.bytes_le, p.guid.bytes_le, p.first, p.last, p.attributes, p.name.encode("utf-16-le")
        )
        start = (p.number - 1) * table.entry_size
        array[start : start + len(raw)] = raw
    return bytes(array)


def _encode_header(table: Table, *, backup: bool, entries_crc: int) -> bytes:
    last = table.disk_sectors - 1
    my_lba, alternate, entry_lba = (last, 1, last - table.entry_sectors) if backup else (1, last, 2)
    fields = [
        SIGNATURE, REVISION, HEADER_SIZE, 0, 0, my_lba, alternate, table.first_usable, table.last_usable,
        table.disk_guid.bytes_le, entry_lba, table.entries, table.entry_size, entries_crc,
    ]  # fmt: skip
    fields[3] = zlib.crc32(_HEADER.pack(*fields))
    return _HEADER.pack(*fields).ljust(SECTOR, b"\0")


def _chs(lba: int) -> bytes:
    """CHS address of `lba` with 255 heads and 63 sectors per track, or 0xFFFFFF when beyond reach."""
    if lba >= 1024 * 255 * 63:
        return b"\xff\xff\xff"
    cylinder, head, sector = lba // (255 * 63), (lba // 63) % 255, lba % 63 + 1
    return bytes((head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def _protective_mbr(boot_code: bytes, disk_sectors: int) -> bytes:
    size = min(disk_sectors - 1, 0xFFFFFFFF)
    entry = b"\0" + _chs(1) + b"\xee" + _chs(size) + struct.pack("<II", 1, size)
    return boot_code[:440].ljust(446, b"\0") + entry + bytes(48) + b"\x55\xaa"


# ---------------------------------------------------------------------------------------------------------------
# I/O


def _pread(fd: int, size: int, pos: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.pread(fd, size, pos)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def _pwrite(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, pos)
        view, pos = view[done:], pos + done


def _parse_header(fd: int, offset: int, lba: int, which: str) -> Table:
    """Parse and check the header at `lba` and its entry array; GptError says what is wrong."""
    raw = _pread(fd, SECTOR, offset + lba * SECTOR)
    if len(raw) < SECTOR or raw[:8] != SIGNATURE:
        raise _NoSignature(f"{which} header: no 'EFI PART' signature at LBA {lba}")
    (_, _, hsize, hcrc, _, my_lba, alternate, first_usable, _, disk_guid, entry_lba, entries, entry_size, ecrc) = (
        _HEADER.unpack_from(raw)
    )
    if not HEADER_SIZE <= hsize <= SECTOR:
        raise GptError(f"{which} header: header size {hsize} is invalid")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:hsize]) != hcrc:
        raise GptError(f"{which} header: header CRC32 mismatch")
    if my_lba != lba:
        raise GptError(f"{which} header: it says it is at LBA {my_lba}, but it was read from LBA {lba}")
    if entry_size < ENTRY_SIZE or entry_size % ENTRY_SIZE or not 0 < entries * entry_size <= _MAX_ENTRY_BYTES:
        raise GptError(f"{which} header: entry array of {entries} x {entry_size} bytes is invalid")
    array = _pread(fd, entries * entry_size, offset + entry_lba * SECTOR)
    if len(array) < entries * entry_size:
        raise GptError(f"{which} header: entry array at LBA {entry_lba} runs past the end of the disk")
    if zlib.crc32(array) != ecrc:
        raise GptError(f"{which} header: entry array CRC32 mismatch")
    parts = []
    for index in range(entries):
        type_le, guid_le, first, last, attrs, name_raw = _ENTRY.unpack_from(array, index * entry_size)
        if type_le == bytes(16):
            continue
        units = [name_raw[i : i + 2] for i in range(0, len(name_raw), 2)]
        end = units.index(b"\0\0") if b"\0\0" in units else len(units)
        name = b"".join(units[:end]).decode("utf-16-le", errors="replace")
        parts.append(
            Partition(index + 1, uuid.UUID(bytes_le=type_le), uuid.UUID(bytes_le=guid_le), first, last, attrs, name)
        )
    disk_sectors = (alternate if lba == 1 else my_lba) + 1
    return Table(uuid.UUID(bytes_le=disk_guid), disk_sectors, tuple(parts), first_usable, entries, entry_size)


def read_table(path: str | os.PathLike[str], *, offset: int = 0) -> Table:
    """Read the GPT of a disk image or block device whose LBA 0 is at byte `offset`.

    The primary header and entry array are used when intact; otherwise the backup at the last LBA (found from
    the size of the file or device) is used instead. GptError when neither is intact or the disk is not GPT.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise GptError(f"cannot open {os.fspath(path)} to read its GPT: {exc.strerror}") from exc
    try:
        try:
            return _parse_header(fd, offset, 1, "primary")
        except GptError as exc:
            primary_problem = exc
        end_lba = (os.lseek(fd, 0, os.SEEK_END) - offset) // SECTOR - 1
        if end_lba < 2:
            raise GptError(f"{os.fspath(path)} is not a GPT disk: it is too small to hold a partition table")
        try:
            return _parse_header(fd, offset, end_lba, "backup")
        except GptError as exc:
            backup_problem = exc
    finally:
        os.close(fd)
    if isinstance(primary_problem, _NoSignature) and isinstance(backup_problem, _NoSignature):
        raise GptError(
            f"{os.fspath(path)} is not a GPT disk: no 'EFI PART' signature at LBA 1 nor at the last LBA "
            f"{end_lba}; check that this is the right image or device"
        )
    raise GptError(
        f"the GPT of {os.fspath(path)} is damaged beyond use ({primary_problem}; {backup_problem}); "
        "restore the image from its source or repair it with gdisk"
    )


def write_table(path: str | os.PathLike[str], table: Table, *, protective_mbr: bool = True, offset: int = 0) -> None:
    """Write `table` in place: backup copy first, then the primary copy and the protective MBR.

    A regular file shorter than the disk is extended (sparse); nothing is ever truncated. The boot code
    (bytes 0..439) of an existing MBR is kept. With protective_mbr=False, LBA 0 is left untouched.
    """
    table.validate()
    entries = _encode_entries(table)
    crc = zlib.crc32(entries)
    entries = entries.ljust(table.entry_sectors * SECTOR, b"\0")
    last = table.disk_sectors - 1
    needed = offset + table.disk_sectors * SECTOR
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise GptError(f"cannot open {os.fspath(path)} to write its GPT: {exc.strerror}") from exc
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if os.fstat(fd).st_size < needed:
                os.ftruncate(fd, needed)
        elif os.lseek(fd, 0, os.SEEK_END) < needed:
            raise GptError(
                f"{os.fspath(path)} is smaller than the {table.disk_sectors} sectors the GPT describes; "
                "resize the table to the device first"
            )
        _pwrite(fd, entries, offset + (last - table.entry_sectors) * SECTOR)
        _pwrite(fd, _encode_header(table, backup=True, entries_crc=crc), offset + last * SECTOR)
        os.fsync(fd)
        _pwrite(fd, entries, offset + 2 * SECTOR)
        _pwrite(fd, _encode_header(table, backup=False, entries_crc=crc), offset + SECTOR)
        if protective_mbr:
            _pwrite(fd, _protective_mbr(_pread(fd, 440, offset), table.disk_sectors), offset)
        os.fsync(fd)
    except OSError as exc:
        raise GptError(f"writing the GPT of {os.fspath(path)} failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# ChromeOS kernel priorities


def prioritize(table: Table, number: int, *, max_priority: int | None = None, friends: bool = False) -> Table:
    """Make kernel `number` the one to boot next, like `cgpt prioritize -i NUMBER` (`-P`, `-f` as keywords).

    What cgpt does: only partitions of the ChromeOS kernel type (and, in current cgpt, the Android vbmeta type)
    take part, and the chosen one must be one of them. The kernels are grouped by their current priority; the
    chosen kernel is taken out of its group and put alone in a new group ranked above all others (with `-f`, its
    whole group moves up instead). Groups are ranked by descending priority. A group of priority 0 stays at 0:
    cgpt never raises a disabled kernel, and never lowers an enabled one to 0. The remaining groups then get
    consecutive priorities counting down, the top group getting the number of groups (at most 15) or `-P`; once
    the count reaches 1 it stays at 1, so the lowest groups merge when there are too many. Kernels of equal
    priority stay equal, the relative order of the others is kept, and only the priority bits change: tries and
    the successful flag are left untouched.
    """
    if max_priority is not None and not 1 <= max_priority <= 15:
        raise GptError(f"maximum priority {max_priority} is out of range, use 1..15")
    chosen = table.partition(number)
    if chosen.type_guid not in BOOTABLE_TYPES:
        raise GptError(f"partition {number} is not a ChromeOS kernel partition; only those have a boot priority")
    kernels = [p for p in table.partitions if p.type_guid in BOOTABLE_TYPES]
    top = 16  # above any real priority
    rank: dict[int, int] = {}  # partition number -> group key
    for p in kernels:
        moves = p.number == number or (friends and p.priority == chosen.priority)
        rank[p.number] = top if moves else p.priority
    groups = sorted({key for key in rank.values() if key != 0}, reverse=True)
    value = max_priority if max_priority is not None else min(len(groups), 15)
    new_priority = {0: 0}
    for key in groups:
        new_priority[key] = value
        value = max(value - 1, 1)
    return table.replace(*(p.with_chromeos(priority=new_priority[rank[p.number]]) for p in kernels))
