"""A tar reader for untrusted archives: every header is read with a limit, whatever its form.

GCE image archives hold one member, `disk.raw`, in the old GNU format (often sparse: `tar
--format=oldgnu -Sczf`) or in POSIX pax format. Python's `tarfile` reads a GNU long name, a pax
header or a sparse map whole into memory before anything can look at its size, so a small
.tar.gz could make it allocate gigabytes. This reader streams the archive once, in order, never
seeking, and bounds every header before it reads it:

- a GNU long name or long link name ('L', 'K'): at most NAME_LIMIT bytes, the name then NULs only
  (a long name "disk.raw" followed by anything else is not "disk.raw");
- a pax extended header ('x'): at most PAX_LIMIT bytes of well-formed records; a pax global header
  ('g') is refused (it would rename every member after it);
- at most one of each before a member;
- a sparse map (old GNU 'S' with its extension blocks, GNU pax sparse 0.0, 0.1 and 1.0): at most
  REGION_LIMIT runs, in order, inside the file, adding up to the data the archive stores;
- numbers: octal or GNU base-256 fields, pax decimals of at most 19 digits, all below 2**63.

A member's data is then read in pieces of at most CHUNK bytes.
"""

from __future__ import annotations

import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cos_customizer.errors import shown

BLOCK = 512
CHUNK = 1 << 20
NAME_LIMIT = 4096  # PATH_MAX: no file name of this machine is longer
PAX_LIMIT = 64 << 10
# Runs of data in one sparse member (4 MiB of map in memory at most); a COS image has a few hundred.
REGION_LIMIT = 1 << 18
MAX_NUMBER = (1 << 63) - 1
_DIGITS_LIMIT = 19  # decimal digits of MAX_NUMBER
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_REGULAR = frozenset({b"0", b"7", b"S"})
_EXTENDED = {b"L": "GNU long name", b"K": "GNU long link name", b"x": "pax extended header"}


class FormatError(Exception):
    """The archive is not a valid tar archive; the message says what is wrong."""


class EndsEarly(Exception):
    """The archive ends in the middle of a header or of a member's data."""


class Unsupported(Exception):
    """A valid header beyond this reader's limits; the message names it ("a GNU long name of N bytes ...")."""


@dataclass(frozen=True)
class Member:
    """One member as its headers describe it."""

    name: str  # decoded with surrogateescape: undecodable bytes stay distinct
    kind: bytes  # the typeflag: b"0" regular, b"S" GNU sparse, b"2" symlink, ...
    linkname: str
    size: int  # the file's size (a sparse file's real size)
    runs: array.array[int]  # (offset, length) pairs, flat: the data the archive stores, in order

    @property
    def is_regular(self) -> bool:
        return self.kind in _REGULAR

    @property
    def stored(self) -> int:
        """Bytes of file data the archive stores (a sparse file's holes are not stored)."""
        return sum(self.runs[1::2])

    def regions(self) -> Iterator[tuple[int, int]]:
        """The (offset, length) runs of the file the archive stores, in order."""
        runs = self.runs
        for index in range(0, len(runs), 2):
            yield runs[index], runs[index + 1]


@dataclass(frozen=True)
class _Header:
    name: bytes
    kind: bytes
    linkname: bytes
    size: int
    block: bytes


def _nts(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _number(field: bytes, what: str) -> int:
    """An octal (or GNU base-256) number field of a header."""
    if field[:1] == b"\x80":
        value = int.from_bytes(field[1:], "big")
    elif field[:1] == b"\xff":
        raise FormatError(f"a header with a negative {what}")
    else:
        text = _nts(field).strip(b" ")
        if text.strip(b"01234567"):  # anything left is not an octal digit
            raise FormatError(f"a header whose {what} is not a number")
        value = int(text, 8) if text else 0
    if value > MAX_NUMBER:
        raise FormatError(f"a header whose {what} is out of range")
    return value


def _decimal(text: bytes, what: str) -> int:
    """A decimal number of a pax record or of a sparse map."""
    if not text.isdigit() or len(text) > _DIGITS_LIMIT:
        raise FormatError(f"a {what} that is not a number")
    return int(text)


def _header(block: bytes) -> _Header:
    try:
        stored = _number(block[148:156], "checksum")
    except FormatError:
        raise FormatError("invalid header") from None
    unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for byte in (*block[:148], *block[156:]) if byte & 0x80)
    if stored not in (unsigned, signed):
        raise FormatError("invalid header")
    name = _nts(block[0:100])
    if block[257:265] == _POSIX_MAGIC and (prefix := _nts(block[345:500])):
        name = prefix + b"/" + name  # ustar's long names; GNU headers keep other fields there
    kind = block[156:157]
    if kind == b"\0":  # the old (v7) regular file, or a directory when its name ends with "/"
        kind = b"5" if name.endswith(b"/") else b"0"
    return _Header(name, kind, _nts(block[157:257]), _number(block[124:136], "size"), block)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The `LENGTH KEYWORD=VALUE\\n` records of a pax header, in order."""
    records = []
    position, last = 0, len(data.rstrip(b"\0"))
    while position < last:
        space = data.find(b" ", position, position + _DIGITS_LIMIT + 1)
        length = _decimal(data[position:space], "pax record length") if space > position else 0
        end = position + length
        if length <= space - position + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise FormatError("a malformed pax record")
        keyword, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not keyword:
            raise FormatError("a malformed pax record")
        records.append((keyword, value))
        position = end
    return records


class _Runs:
    """A sparse map being read: runs in order, inside the file, at most REGION_LIMIT of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs = array.array("q")
        self.end = 0

    def add(self, offset: int, length: int) -> None:
        if len(self.runs) >= 2 * REGION_LIMIT:
            raise Unsupported(f"a sparse file of more than {REGION_LIMIT} runs of data")
        if offset < self.end or offset + length > self.size:
            raise FormatError("a sparse map whose runs are out of order or past the file's end")
        self.runs.append(offset)
        self.runs.append(length)
        self.end = offset + length


def _regions_of(pairs: list[int], size: int) -> _Runs:
    if len(pairs) % 2:
        raise FormatError("a sparse map with an offset and no length")
    runs = _Runs(size)
    for index in range(0, len(pairs), 2):
        runs.add(pairs[index], pairs[index + 1])
    return runs


class Reader:
    """Members of a tar stream, one at a time; `data` reads the current member's file data."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._unread = 0  # bytes of the current member's data blocks not read yet, padding included
        self._current: Member | None = None

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        while len(data) < size:
            more = self._stream.read(size - len(data))
            if not more:
                raise EndsEarly()
            data += more
        return data

    def _skip(self, size: int) -> None:
        while size:
            size -= len(self._read(min(CHUNK, size)))

    def next(self) -> Member | None:
        """The next member, its headers read and bounded; None at the end of the archive."""
        self._skip(self._unread)
        self._unread, self._current = 0, None
        extended: dict[bytes, bytes] = {}
        while True:
            block = self._stream.read(BLOCK)
            if not block and not extended:
                return None  # the end, without its zero blocks (as tar itself accepts)
            block += self._read(BLOCK - len(block)) if len(block) < BLOCK else b""
            if block == _ZERO_BLOCK:
                if extended:
                    raise FormatError("an extended header with no member after it")
                return None
            header = _header(block)
            if header.kind == b"g":
                raise Unsupported("a pax global header")
            kind = b"x" if header.kind == b"X" else header.kind  # X: Solaris' name for the same header
            what = _EXTENDED.get(kind)
            if what is None:
                break
            limit = PAX_LIMIT if kind == b"x" else NAME_LIMIT
            if header.size > limit:
                raise Unsupported(f"a {what} of {header.size} bytes (at most {limit})")
            if kind in extended:
                raise Unsupported(f"two {what}s for one member")
            extended[kind] = self._read(_padded(header.size))[: header.size]
        member = self._member(header, extended)
        self._current = member
        return member

    def _member(self, header: _Header, extended: dict[bytes, bytes]) -> Member:
        name, linkname, stored = header.name, header.linkname, header.size
        for kind, field in ((b"L", "name"), (b"K", "link name")):
            if kind in extended:
                value, _, rest = extended[kind].partition(b"\0")
                if rest.strip(b"\0"):
                    raise FormatError(f"a GNU long {field} with more bytes after its end")
                name, linkname = (value, linkname) if kind == b"L" else (name, value)
        pax: dict[bytes, bytes] = {}
        pairs: list[int] = []  # sparse 0.0: GNU.sparse.offset and GNU.sparse.numbytes records, in order
        for keyword, value in _pax_records(extended.get(b"x", b"")):
            if keyword in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                pairs.append(_decimal(value, "sparse map number"))
            else:
                pax[keyword] = value
        name = pax.get(b"GNU.sparse.name") or pax.get(b"path") or name
        linkname = pax.get(b"linkpath") or linkname
        if header.kind == b"5":
            name = name.rstrip(b"/")  # a directory is named without its slash, as tar lists it
        if b"size" in pax:
            stored = _decimal(pax[b"size"], "pax size")
        size, runs, map_bytes = stored, None, 0
        if header.kind == b"S":
            size = _number(header.block[483:495], "real size")
            runs = self._gnu_sparse(header.block, size)
        elif header.kind in _REGULAR and (pairs or any(key.startswith(b"GNU.sparse.") for key in pax)):
            version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
            if version == (b"1", b"0"):
                size = _decimal(pax.get(b"GNU.sparse.realsize", b""), "sparse real size")
                runs, map_bytes = self._sparse_10(size, stored)
            elif b"GNU.sparse.map" in pax:  # 0.1
                size = _decimal(pax.get(b"GNU.sparse.size", b""), "sparse size")
                text = pax[b"GNU.sparse.map"]
                runs = _regions_of([_decimal(n, "sparse map number") for n in text.split(b",")] if text else [], size)
            elif b"GNU.sparse.size" in pax:  # 0.0
                size = _decimal(pax[b"GNU.sparse.size"], "sparse size")
                runs = _regions_of(pairs, size)
            elif version != (None, None):
                number = b".".join(part or b"?" for part in version).decode(errors="replace")
                raise Unsupported(f"a GNU sparse file of format {shown(number, 40)}")
        if runs is not None and sum(runs.runs[1::2]) != stored - map_bytes:
            raise FormatError("a sparse map that does not add up to the data stored")
        if runs is None:
            runs = _Runs(size)
            if size and header.kind in _REGULAR:
                runs.add(0, size)
        if header.kind in _REGULAR or header.kind not in b"123456":
            self._unread = _padded(stored) - map_bytes
        return Member(
            name.decode(errors="surrogateescape"),
            header.kind,
            linkname.decode(errors="surrogateescape"),
            size,
            runs.runs,
        )

    def _gnu_sparse(self, block: bytes, size: int) -> _Runs:
        """The old GNU sparse map: four runs in the header, then 21 per extension block while one follows."""
        runs = _Runs(size)
        entries, extended = block[386:482], block[482]
        while True:
            for start in range(0, len(entries), 24):
                entry = entries[start : start + 24]
                if entry[12:13] == b"\0":  # no length: the map ends here (as GNU tar reads it)
                    if extended or entries[start:].strip(b"\0"):
                        raise FormatError("a sparse map with runs after its end")
                    return runs
                runs.add(_number(entry[:12], "sparse offset"), _number(entry[12:24], "sparse length"))
            if not extended:
                return runs
            block = self._read(BLOCK)
            entries, extended = block[:504], block[504]

    def _sparse_10(self, size: int, stored: int) -> tuple[_Runs, int]:
        """GNU pax sparse 1.0: the map is at the start of the data, decimal lines padded to a block."""
        buffer, read = b"", 0

        def number() -> int:
            nonlocal buffer, read
            while b"\n" not in buffer:
                if len(buffer) > _DIGITS_LIMIT or read + BLOCK > stored:
                    raise FormatError("a malformed sparse map")
                buffer += self._read(BLOCK)
                read += BLOCK
            line, _, buffer = buffer.partition(b"\n")
            return _decimal(line, "sparse map number")

        count = number()
        if count > REGION_LIMIT:
            raise Unsupported(f"a sparse file of more than {REGION_LIMIT} runs of data")
        runs = _Runs(size)
        for _ in range(count):
            offset = number()
            runs.add(offset, number())
        return runs, read

    def data(self) -> Iterator[tuple[int, bytes]]:
        """The current member's stored data as (offset in the file, bytes), pieces of at most CHUNK bytes."""
        member = self._current
        assert member is not None and member.is_regular
        for offset, length in member.regions():
            done = 0
            while done < length:
                piece = self._read(min(CHUNK, length - done))
                self._unread -= len(piece)
                yield offset + done, piece
                done += len(piece)

    def head(self, size: int) -> bytes:
        """The first `size` bytes of the current member's file (holes read as zeros)."""
        head = bytearray(size)
        for offset, piece in self.data():
            if offset >= size:
                break
            part = piece[: size - offset]
            head[offset : offset + len(part)] = part
            if offset + len(piece) >= size:
                break
        return bytes(head)

    def drain(self) -> None:
        """Read the stream to its end, whatever follows the archive (so a gzip stream checks its CRC)."""
        while self._stream.read(CHUNK):
            pass
