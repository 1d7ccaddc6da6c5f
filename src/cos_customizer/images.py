"""Source image files: raw disks, qcow2, and GCE's `.tar.gz` holding `disk.raw`.

The format is read from the file's first bytes, not its name. The source
is only ever opened read-only.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import tarfile
import tempfile
from pathlib import Path

from cos_customizer.disk import mover
from cos_customizer.disk.gpt import SECTOR, GptError, Table, read_table
from cos_customizer.disk.mover import Progress
from cos_customizer.errors import CustomizerError
from cos_customizer.runner import require_tool, run

GPT_HEAD = 34 * SECTOR  # protective MBR, primary header and entry array
TAR_MEMBER = "disk.raw"


class ImageFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    TAR_GZ = "tar.gz"


def detect(path: Path) -> ImageFormat:
    with open(path, "rb") as source:
        magic = source.read(4)
    if magic == b"QFI\xfb":
        return ImageFormat.QCOW2
    if magic[:2] == b"\x1f\x8b":
        return ImageFormat.TAR_GZ
    return ImageFormat.RAW


def virtual_size(path: Path) -> int:
    """Size in bytes of the disk the image holds."""
    fmt = detect(path)
    if fmt is ImageFormat.RAW:
        return path.stat().st_size
    if fmt is ImageFormat.QCOW2:
        tool = require_tool("qemu-img", "qemu-utils")
        info = json.loads(run([tool, "info", "--output=json", "-f", "qcow2", str(path)]).stdout)
        return int(info["virtual-size"])
    return _tar_member(path).size


def _tar_member(path: Path) -> tarfile.TarInfo:
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name.lstrip("./") == TAR_MEMBER and member.isfile():
                    return member
    except (OSError, tarfile.TarError, EOFError) as err:
        raise CustomizerError(
            f"{path} is not a readable .tar.gz image ({err}): expected a tar holding disk.raw"
        ) from err
    raise CustomizerError(f"{path} holds no disk.raw: a GCE image archive is a .tar.gz with one member disk.raw")


def _head(path: Path, out: Path) -> None:
    """Write the first GPT_HEAD bytes of the disk inside `path` to `out`."""
    fmt = detect(path)
    if fmt is ImageFormat.QCOW2:
        tool = require_tool("qemu-img", "qemu-utils")
        run([tool, "dd", "-f", "qcow2", "-O", "raw", f"bs={SECTOR}", "count=34", f"if={path}", f"of={out}"])
        return
    with tarfile.open(path, "r:gz") as tar:
        member = tar.extractfile(_tar_member(path).name) or None
        if member is None:
            raise CustomizerError(f"{path}: cannot read disk.raw")
        out.write_bytes(member.read(GPT_HEAD))


def read_source_table(path: Path) -> Table:
    """The partition table of a source image of any supported format."""
    if detect(path) is ImageFormat.RAW:
        return _read(path, path)
    with tempfile.TemporaryDirectory(prefix="cos-customizer-head.") as tmp:
        head = Path(tmp) / "head.raw"
        _head(path, head)
        return _read(head, path)


def _read(file: Path, source: Path) -> Table:
    try:
        return read_table(file)
    except GptError as err:
        message = str(err).replace(str(file), str(source))
        if str(source) not in message:
            message = f"{source}: {message}"
        raise CustomizerError(f"{message} (a COS disk image has a GPT partition table)") from err


_FICLONE = 0x40049409


def working_copy(source: Path, target: Path, progress: Progress | None = None) -> None:
    """Make a sparse raw copy of `source` (any format) at `target`; the source is opened read-only."""
    fmt = detect(source)
    if fmt is ImageFormat.QCOW2:
        tool = require_tool("qemu-img", "qemu-utils")
        run([tool, "convert", "-f", "qcow2", "-O", "raw", str(source), str(target)])
    elif fmt is ImageFormat.TAR_GZ:
        member = _tar_member(source)
        tool = require_tool("tar", "tar")
        run([tool, "-xzf", str(source), "-C", str(target.parent), member.name])
        (target.parent / member.name).rename(target)
    else:
        _copy_raw(source, target, progress)


def _copy_raw(source: Path, target: Path, progress: Progress | None) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
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
                n = os.copy_file_range(src.fileno(), dst.fileno(), length - copied, offset + copied, offset + copied)
                if n == 0:
                    raise CustomizerError(f"{source} changed while it was being copied (short copy at byte {offset})")
                copied += n
                done += n
                if progress is not None:
                    progress(done, total)
        os.fsync(dst.fileno())
