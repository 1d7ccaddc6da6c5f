"""Source image files: raw disks, qcow2, and GCE's `.tar.gz` holding `disk.raw`.

Source images are untrusted data. The format is read from the file's
first bytes, not its name, and the source is only ever opened read-only:

- what the path is is found with stat alone before anything opens it, and
  it is opened with O_NONBLOCK and checked again through the descriptor, so
  a FIFO, a socket or a device (or a symlink to one) is refused, never
  read, and never blocks;
- a `.tar.gz` must hold exactly one member, a regular file named
  `disk.raw`; its bytes are streamed into a file we name (sparse: holes and
  zero runs are not written), and no name from the archive ever becomes a
  path of this machine; a member whose declared data does not fit in the
  free space beside the working copy is refused before anything is written;
- a qcow2 whose header names a backing file or an external data file is
  refused (those would read files of this machine into the output) unless
  the user allows it (`-allow-backing-file`); without that, qemu-img opens
  the checked file through its descriptor with no backing file at all;
- a disk shorter than its own GPT says is refused ("truncated").
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import gzip
import json
import os
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from cos_customizer import tarstream
from cos_customizer.disk import mover
from cos_customizer.disk.gpt import SECTOR, GptError, Table, read_table
from cos_customizer.disk.mover import Progress
from cos_customizer.errors import CustomizerError, shown
from cos_customizer.runner import CommandError, die_with_us, require_tool

GPT_HEAD = 34 * SECTOR  # protective MBR, primary header and entry array
TAR_MEMBER = "disk.raw"
TAR_NAMES = (TAR_MEMBER, f"./{TAR_MEMBER}")
REGULAR = "a regular file"
MISSING = "missing"
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)

# Whether a qcow2 source may name a backing file or an external data file (finish-image-build
# -allow-backing-file). Functions take it explicitly; when they are not told, this decides.
BACKING_FILES_ALLOWED: ContextVar[bool] = ContextVar("backing_files_allowed", default=False)


class ImageFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    TAR_GZ = "tar.gz"


@contextlib.contextmanager
def backing_files_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, qcow2 backing files and external data files are allowed (or not)."""
    token = BACKING_FILES_ALLOWED.set(allowed)
    try:
        yield
    finally:
        BACKING_FILES_ALLOWED.reset(token)


def _allowed(allow_backing_file: bool | None) -> bool:
    return BACKING_FILES_ALLOWED.get() if allow_backing_file is None else allow_backing_file


# What the path is, and opening it safely


def _mode_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return REGULAR
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a file"


def kind(path: Path) -> str:
    """What `path` is, found with stat and lstat only (nothing is opened).

    REGULAR for a regular file or a symlink to one, MISSING, else a phrase for a message:
    "a FIFO", "a block device", "a symlink to a block device (/dev/sdb)", ...
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a dangling symlink to {shown(os.readlink(path))}"
        return MISSING
    except OSError as err:
        return f"not readable ({err.strerror})"
    what = _mode_kind(st.st_mode)
    if what != REGULAR and os.path.islink(path):
        return f"a symlink to {what} ({shown(os.path.realpath(path))})"
    return what


def check_source(path: Path) -> None:
    """Refuse, without opening it, a source image path that is not a regular file."""
    what = kind(path)
    if what == REGULAR:
        return
    if what == MISSING:
        raise CustomizerError(
            f"the source image {shown(path)} does not exist any more: put it back or run start-image-build again"
        )
    raise CustomizerError(
        f"the source image {shown(path)} is {what}, not a disk image file: give a regular raw, .qcow2 or .tar.gz "
        "image file to start-image-build -image-file"
    )


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    """The source opened read-only; anything but a regular file is refused before and after opening."""
    check_source(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise CustomizerError(f"cannot open the source image {shown(path)}: {err.strerror}") from err
    try:
        what = _mode_kind(os.fstat(fd).st_mode)
        if what != REGULAR:  # replaced between the check and the open
            raise CustomizerError(
                f"the source image {shown(path)} is {what}, not a disk image file: give a regular raw, .qcow2 or "
                ".tar.gz image file to start-image-build -image-file"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        source = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with source:
        yield source


def _detect(source: BinaryIO) -> ImageFormat:
    source.seek(0)
    magic = source.read(4)
    source.seek(0)
    if magic == b"QFI\xfb":
        return ImageFormat.QCOW2
    if magic[:2] == b"\x1f\x8b":
        return ImageFormat.TAR_GZ
    return ImageFormat.RAW


def detect(path: Path) -> ImageFormat:
    with _opened(path) as source:
        return _detect(source)


def virtual_size(path: Path) -> int:
    """Size in bytes of the disk the image holds."""
    with _opened(path) as source:
        return _virtual_size(path, source)


def _virtual_size(path: Path, source: BinaryIO) -> int:
    fmt = _detect(source)
    if fmt is ImageFormat.RAW:
        return os.fstat(source.fileno()).st_size
    if fmt is ImageFormat.QCOW2:
        return _qcow2_header(path, source).virtual_size
    with _tar(path, source) as tar:
        return _first_member(path, tar).size


# qcow2


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int
    backing_file: str  # "" when none
    data_file: str  # "" when none


_QCOW2_DATA_FILE_BIT = 1 << 2  # incompatible feature: an external data file
_QCOW2_EXT_DATA_FILE = 0x44415441


def _qcow2_header(path: Path, source: BinaryIO) -> Qcow2Header:
    """The fields of a qcow2 header that say which other files qemu would open (read here, not by qemu)."""
    source.seek(0)
    head = source.read(1 << 16)
    source.seek(0)
    if len(head) < 72:
        raise CustomizerError(f"{shown(path)} is not a readable qcow2 image: its header is cut short")
    _, version, backing_offset, backing_size, _, size = struct.unpack_from(">IIQIIQ", head)
    backing = ""
    if backing_offset:
        if backing_size > 1023 or backing_offset + backing_size > len(head):
            raise CustomizerError(f"{shown(path)} is not a readable qcow2 image: its backing file name is out of place")
        backing = head[backing_offset : backing_offset + backing_size].decode(errors="replace")
        backing = backing or "<unnamed>"
    data_file = ""
    header_length = 72
    if version >= 3:
        if len(head) < 104:
            raise CustomizerError(f"{shown(path)} is not a readable qcow2 image: its header is cut short")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
        if incompatible & _QCOW2_DATA_FILE_BIT:
            data_file = "(not named in the image)"
    offset = header_length
    while offset + 8 <= len(head):
        ext_type, ext_length = struct.unpack_from(">II", head, offset)
        if ext_type == 0:
            break
        if ext_type == _QCOW2_EXT_DATA_FILE:
            data_file = head[offset + 8 : offset + 8 + ext_length].decode(errors="replace") or data_file
        offset += 8 + (ext_length + 7) // 8 * 8
    return Qcow2Header(size, backing, data_file)


def _check_qcow2(path: Path, source: BinaryIO, allowed: bool) -> Qcow2Header:
    header = _qcow2_header(path, source)
    if allowed:
        return header
    for what, name in (("a backing file", header.backing_file), ("an external data file", header.data_file)):
        if name:
            raise CustomizerError(
                f"{shown(path)} is a qcow2 image with {what} {shown(name)}: building it would read that file of this "
                "machine into the image; flatten it (qemu-img convert -O qcow2) or, if you trust it, pass "
                "-allow-backing-file to finish-image-build"
            )
    return header


def _qemu_input(path: Path, source: BinaryIO, allowed: bool) -> tuple[str, tuple[int, ...]]:
    """How qemu-img names the source: the checked descriptor with no backing file, or the path when allowed."""
    if allowed:
        return str(path), ()
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": f"/dev/fd/{source.fileno()}"}}
    return "json:" + json.dumps(spec), (source.fileno(),)


def _qemu_img(argv: list[str], pass_fds: tuple[int, ...]) -> None:
    result = subprocess.run(argv, pass_fds=pass_fds, capture_output=True, check=False, preexec_fn=die_with_us())
    if result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr.decode(errors="replace"))


# .tar.gz: read by our own bounded reader (cos_customizer.tarstream), never by tarfile


@contextlib.contextmanager
def _tar(path: Path, source: BinaryIO) -> Iterator[tarstream.Reader]:
    """The archive's members, streamed; a corrupt, truncated or unsupported archive becomes one clear error."""
    source.seek(0)
    try:
        with gzip.GzipFile(fileobj=source, mode="rb") as stream:
            yield tarstream.Reader(cast(BinaryIO, stream))
    except tarstream.Unsupported as err:
        raise CustomizerError(
            f"{shown(path)}: the archive holds {err}: a GCE image archive holds one regular file disk.raw "
            "(tar --format=oldgnu -Sczf IMAGE.tar.gz disk.raw writes one)"
        ) from err
    except (tarstream.FormatError, tarstream.EndsEarly, EOFError, zlib.error, gzip.BadGzipFile) as err:
        if isinstance(err, (tarstream.EndsEarly, EOFError)):
            detail = "it ends too early"
        elif isinstance(err, (zlib.error, gzip.BadGzipFile)):
            detail = "its compressed data is damaged"
        else:
            detail = f"not a valid tar archive: {err}"
        raise CustomizerError(
            f"{shown(path)} is a corrupt or truncated .tar.gz ({detail}): export or download the image again"
        ) from err


def _member_kind(member: tarstream.Member) -> str:
    kinds = {b"2": "a symlink to", b"1": "a hard link to"}
    if member.kind in kinds:
        return f"{kinds[member.kind]} {shown(member.linkname)}"
    others = {b"5": "a directory", b"3": "a device", b"4": "a device", b"6": "a FIFO"}
    return others.get(member.kind, "not a regular file")


def _refuse_member(path: Path, member: tarstream.Member, why: str = "") -> CustomizerError:
    detail = f" ({_member_kind(member)})" if not member.is_regular else ""
    return CustomizerError(
        f"{shown(path)}: the archive's member {shown(member.name)}{detail} is not a regular file named disk.raw"
        f"{why}: a GCE image archive holds one regular file disk.raw"
    )


def _first_member(path: Path, tar: tarstream.Reader) -> tarstream.Member:
    member = tar.next()
    if member is None:
        raise CustomizerError(
            f"{shown(path)} holds no disk.raw: a GCE image archive is a .tar.gz with one member disk.raw"
        )
    if member.name not in TAR_NAMES or not member.is_regular:
        raise _refuse_member(path, member)
    return member


def _check_room(path: Path, member: tarstream.Member, directory: Path) -> None:
    declared = member.stored
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    if declared > free:
        raise CustomizerError(
            f"{shown(path)}: its disk.raw declares {declared} bytes of data, more than the {free} bytes free in "
            f"{shown(directory)}: free some space or write -output on a larger file system"
        )


def check_room(source: Path, directory: Path) -> None:
    """Refuse a `.tar.gz` source whose disk.raw would not fit in `directory` (a gzip bomb), before extracting."""
    with _opened(source) as opened:
        if _detect(opened) is ImageFormat.TAR_GZ:
            with _tar(source, opened) as tar:
                _check_room(source, _first_member(source, tar), directory)


def _extract(path: Path, source: BinaryIO, target: Path, progress: Progress | None, into: int | None) -> None:
    """Stream disk.raw's bytes into `target`, a new file we name; holes and zero runs stay holes."""
    with _tar(path, source) as tar:
        member = _first_member(path, tar)
        _check_room(path, member, target.parent)
        total = member.stored
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(target, flags, 0o600) if into is None else os.dup(into)
        try:
            done = 0
            for position, chunk in tar.data():
                if chunk != (_ZERO if len(chunk) == CHUNK else bytes(len(chunk))):
                    _write(target, out, chunk, position)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            _sync(target, out, member.size)
        finally:
            os.close(out)
        extra = tar.next()
        if extra is not None:
            raise _refuse_member(path, extra, " after disk.raw")
        tar.drain()  # to the end, so gzip checks its length and CRC


def _write(target: Path, fd: int, data: bytes, offset: int) -> None:
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
    except OSError as err:
        raise _write_error(target, err) from err


def _sync(target: Path, fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as err:
        raise _write_error(target, err) from err


def _write_error(target: Path, err: OSError) -> CustomizerError:
    hint = "free some space or write -output elsewhere" if err.errno == errno.ENOSPC else "check the file system"
    return CustomizerError(f"cannot write the working copy {shown(target)}: {err.strerror}; {hint}")


# The partition table


def read_source_table(path: Path, *, allow_backing_file: bool | None = None) -> Table:
    """The partition table of a source image of any supported format; refused when the disk is shorter than it."""
    allowed = _allowed(allow_backing_file)
    with _opened(path) as source:
        fmt = _detect(source)
        if fmt is ImageFormat.RAW:
            # Read through the descriptor checked above, never by the name (which could be swapped for a FIFO).
            table = _read(Path(f"/proc/self/fd/{source.fileno()}"), path)
            size, holder = os.fstat(source.fileno()).st_size, "the file has"
        else:
            with tempfile.TemporaryDirectory(prefix="cos-customizer-head.") as tmp:
                head = Path(tmp) / "head.raw"
                if fmt is ImageFormat.QCOW2:
                    size, holder = _check_qcow2(path, source, allowed).virtual_size, "its qcow2 disk has"
                    name, fds = _qemu_input(path, source, allowed)
                    tool = require_tool("qemu-img", "qemu-utils")
                    _qemu_img([tool, "dd", "-f", "qcow2", "-O", "raw", f"bs={SECTOR}", "count=34", f"if={name}",
                               f"of={head}"], fds)  # fmt: skip
                else:
                    with _tar(path, source) as tar:
                        member = _first_member(path, tar)
                        head.write_bytes(tar.head(GPT_HEAD))
                    size, holder = member.size, "its disk.raw has"
                table = _read(head, path)
    # "Describes": the disk ends with the backup GPT header, at the primary header's AlternateLBA (the
    # table's checks keep every partition before it); a disk whose backup is missing is cut short.
    described = table.disk_sectors * SECTOR
    if size < described:
        raise CustomizerError(
            f"{shown(path)}: truncated: the partition table describes {described} bytes, {holder} {size}; "
            "the image is incomplete: copy or download it again"
        )
    return table


def write_head(path: Path, target: Path, size: int, *, allow_backing_file: bool | None = None) -> None:
    """The first `size` bytes of a source image's disk (any supported format), written raw to `target`."""
    allowed = _allowed(allow_backing_file)
    with _opened(path) as source:
        fmt = _detect(source)
        if fmt is ImageFormat.QCOW2:
            _check_qcow2(path, source, allowed)
            name, fds = _qemu_input(path, source, allowed)
            _qemu_img([require_tool("qemu-img", "qemu-utils"), "dd", "-f", "qcow2", "-O", "raw", f"bs={SECTOR}",
                       f"count={-(-size // SECTOR)}", f"if={name}", f"of={target}"], fds)  # fmt: skip
        elif fmt is ImageFormat.TAR_GZ:
            with _tar(path, source) as tar:
                _first_member(path, tar)
                target.write_bytes(tar.head(size))
        else:
            source.seek(0)
            target.write_bytes(source.read(size))


def _read(file: Path, source: Path) -> Table:
    try:
        return read_table(file)
    except GptError as err:
        message = str(err).replace(str(file), shown(source))
        if shown(source) not in message:
            message = f"{shown(source)}: {message}"
        raise CustomizerError(f"{message} (a COS disk image has a GPT partition table)") from err


# The working copy

_FICLONE = 0x40049409


def working_copy(
    source: Path,
    target: Path,
    progress: Progress | None = None,
    *,
    allow_backing_file: bool | None = None,
    into: int | None = None,
) -> None:
    """Make a sparse raw copy of `source` (any format) at `target`; the source is opened read-only.

    With `into`, an open empty file (the local build's unnamed working copy, in `target`'s directory), the
    copy is written there and `target` only names it."""
    allowed = _allowed(allow_backing_file)
    with _opened(source) as opened:
        fmt = _detect(opened)
        if fmt is ImageFormat.QCOW2:
            _check_qcow2(source, opened, allowed)
            name, fds = _qemu_input(source, opened, allowed)
            out, fds = (str(target), fds) if into is None else (f"/proc/self/fd/{into}", (*fds, into))
            _qemu_img([require_tool("qemu-img", "qemu-utils"), "convert", "-f", "qcow2", "-O", "raw", name, out],
                      fds)  # fmt: skip
        elif fmt is ImageFormat.TAR_GZ:
            _extract(source, opened, target, progress, into)
        else:
            _copy_raw(source, opened, target, progress, into)


def _copy_piece(src: int, dst: int, length: int, offset: int) -> int:
    """Copy up to `length` bytes at `offset` between two files; plain reads and writes where the kernel
    cannot copy_file_range (across file systems before Linux 5.19 and on some file systems)."""
    try:
        return os.copy_file_range(src, dst, length, offset, offset)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, min(length, 1 << 20), offset)
    written = 0
    while written < len(data):
        written += os.pwrite(dst, data[written:], offset + written)
    return len(data)


def _copy_raw(source: Path, src: BinaryIO, target: Path, progress: Progress | None, into: int | None) -> None:
    with open(target, "wb") if into is None else os.fdopen(os.dup(into), "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())  # a reflink: instant, shares blocks
            return
        except OSError:
            pass
        dst.truncate(size)
        extents = list(mover.data_extents(src.fileno(), 0, size))
        total = sum(length for _, length in extents)
        done = 0
        for offset, length in extents:
            copied = 0
            while copied < length:
                n = _copy_piece(src.fileno(), dst.fileno(), length - copied, offset + copied)
                if n == 0:
                    raise CustomizerError(
                        f"{shown(source)} changed while it was being copied (short copy at byte {offset})"
                    )
                copied += n
                done += n
                if progress is not None:
                    progress(done, total)
        os.fsync(dst.fileno())
