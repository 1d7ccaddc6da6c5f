"""Write the finished disk in the requested format, atomically.

- raw: the working copy itself is renamed into place (it is already sparse);
- qcow2: `qemu-img convert` (holes are skipped);
- tar.gz: the format Compute Engine imports: a tar holding one member
  `disk.raw`, stored sparse (GNU tar `--sparse --format=oldgnu`, which only
  reads data extents), gzip-compressed (pigz when installed, on every core).

The result is first written under a temporary name beside the working copy
(the build's own directory, which a later build sweeps if this one is
killed) and renamed at the end, so a failure never leaves a partial output.
Where the rename cannot work because the working copy is on another file
system than the output (EXDEV), the file is copied (sparse) to a temporary
name beside the output and renamed there. A full or read-only file system
is one clear error naming it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cos_customizer.disk import mover
from cos_customizer.errors import CustomizerError
from cos_customizer.images import ImageFormat
from cos_customizer.runner import CommandError, die_with_us, require_tool, run

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
_COPY_CHUNK = 4 << 20


class OutputError(CustomizerError):
    """The output could not be written (a full or read-only file system, a mount point in the way)."""


def partial_name(output: Path, directory: Path | None = None) -> Path:
    """Where `output` is written before it is renamed into place: in `directory` (default: beside it)."""
    return (directory or output.parent) / f".{output.name}.partial"


def compressor() -> list[str]:
    """pigz (or gzip) at level 1, storing no file name and no time in the header (-n), so equal input
    gives equal output."""
    pigz = shutil.which("pigz")
    return [pigz, "-1", "-n"] if pigz else [require_tool("gzip", "gzip"), "-1", "-n"]


def write(disk: Path, output: Path, fmt: ImageFormat, epoch: int | None = None) -> None:
    """Turn the raw working copy `disk` into `output`. `disk` is consumed for raw output. With `epoch`
    (SOURCE_DATE_EPOCH) the file's mtime, and in a tar.gz the member's, is the epoch."""
    try:
        if epoch is not None:  # holes where the content is zero, and only there; the epoch as mtime
            mover.sparsify(disk)
            os.utime(disk, (epoch, epoch))
        if fmt is ImageFormat.RAW:
            place(disk, output)
            return
        partial = partial_name(output, disk.parent)
        try:
            if fmt is ImageFormat.QCOW2:
                qemu_img = require_tool("qemu-img", "qemu-utils")
                run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(disk), str(partial)])
            else:
                tar_gz(disk, partial, epoch)
            if epoch is not None:
                os.utime(partial, (epoch, epoch))
            place(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, CommandError) as err:
        failure = explain(err, output, f"writing {output}")
        if failure is None:
            raise
        raise failure from err


def place(source: Path, output: Path) -> None:
    """Rename `source` to `output`; across file systems (EXDEV), copy it beside `output` first."""
    try:
        os.replace(source, output)
        return
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise OutputError(
                f"cannot replace {output}: it is a mount point (Device or resource busy); "
                "choose an -output that is not mounted on"
            ) from err
        if err.errno != errno.EXDEV:
            raise
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
            sparse_copy(src.fileno(), dst.fileno())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    source.unlink()


def sparse_copy(src: int, dst: int) -> None:
    """Copy file `src` to `dst` (both descriptors), data extents only: holes stay holes."""
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    for offset, length in mover.data_extents(src, 0, size):
        done = 0
        while done < length:
            data = os.pread(src, min(_COPY_CHUNK, length - done), offset + done)
            if not data:
                raise OSError(errno.EIO, f"short read at byte {offset + done}")
            written = 0
            while written < len(data):
                written += os.pwrite(dst, data[written:], offset + done + written)
            done += len(data)
    os.fsync(dst)


def explain(err: BaseException, where: Path, doing: str) -> OutputError | None:
    """One clear error for a full or read-only file system at `where` while `doing`; None for other errors."""
    directory = where if where.is_dir() else where.parent
    code = err.errno if isinstance(err, OSError) else None
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or NO_SPACE in text or os.strerror(errno.EDQUOT) in text:
        return OutputError(
            f"{NO_SPACE} in {directory} while {doing}: free some space there or choose a place on a larger file system"
        )
    if code == errno.EROFS or os.strerror(errno.EROFS) in text:
        return OutputError(
            f"{directory} is on a read-only file system (while {doing}): choose a place on a writable file system"
        )
    return None


def tar_gz(disk: Path, partial: Path, epoch: int | None = None) -> None:
    """A GCE image archive of `disk` (named disk.raw): one sparse member owned by root (dated `epoch` when
    set), gzip-compressed."""
    if disk.name != "disk.raw":
        raise ValueError("the working copy must be named disk.raw: it becomes the archive's only member")
    dated = [f"--mtime=@{epoch}"] if epoch is not None else []
    tar = [require_tool("tar", "tar"), "--sparse", "--format=oldgnu", "--owner=0", "--group=0", "--numeric-owner",
           *dated, "-C", str(disk.parent), "-cf", "-", "disk.raw"]  # fmt: skip
    gzip = compressor()
    with open(partial, "wb") as out:
        archiver = subprocess.Popen(tar, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_us())
        assert archiver.stdout is not None
        packer = subprocess.Popen(
            gzip, stdin=archiver.stdout, stdout=out, stderr=subprocess.PIPE, preexec_fn=die_with_us()
        )
        archiver.stdout.close()
        _, pack_err = packer.communicate()
        _, tar_err = archiver.communicate()
        # The compressor first: when it fails (a full disk), tar only sees a broken pipe.
        if packer.returncode != 0:
            raise CommandError(gzip, packer.returncode, pack_err.decode(errors="replace"))
        if archiver.returncode != 0:
            raise CommandError(tar, archiver.returncode, tar_err.decode(errors="replace"))
        out.flush()
        os.fsync(out.fileno())
