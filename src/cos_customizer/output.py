"""Write the finished disk in the requested format, atomically.

- raw: the working copy itself is renamed into place (it is already sparse);
- qcow2: `qemu-img convert` (holes are skipped);
- tar.gz: the format Compute Engine imports: a tar holding one member
  `disk.raw`, stored sparse (GNU tar `--sparse --format=oldgnu`, which only
  reads data extents), gzip-compressed (pigz when installed, on every core).

The result is first written under a temporary name beside the output and
renamed at the end, so a failure never leaves a partial output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cos_customizer.images import ImageFormat
from cos_customizer.runner import CommandError, require_tool, run


def partial_name(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def compressor() -> list[str]:
    pigz = shutil.which("pigz")
    return [pigz, "-1"] if pigz else [require_tool("gzip", "gzip"), "-1"]


def write(disk: Path, output: Path, fmt: ImageFormat) -> None:
    """Turn the raw working copy `disk` into `output`. `disk` is consumed for raw output."""
    if fmt is ImageFormat.RAW:
        os.replace(disk, output)
        return
    partial = partial_name(output)
    try:
        if fmt is ImageFormat.QCOW2:
            run(
                [require_tool("qemu-img", "qemu-utils"), "convert", "-f", "raw", "-O", "qcow2", str(disk), str(partial)]
            )
        else:
            tar_gz(disk, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def tar_gz(disk: Path, partial: Path) -> None:
    """A GCE image archive of `disk` (named disk.raw): one sparse member, gzip-compressed."""
    if disk.name != "disk.raw":
        raise ValueError("the working copy must be named disk.raw: it becomes the archive's only member")
    tar = [require_tool("tar", "tar"), "--sparse", "--format=oldgnu", "-C", str(disk.parent), "-cf", "-", "disk.raw"]
    gzip = compressor()
    with open(partial, "wb") as out:
        archiver = subprocess.Popen(tar, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert archiver.stdout is not None
        packer = subprocess.Popen(gzip, stdin=archiver.stdout, stdout=out, stderr=subprocess.PIPE)
        archiver.stdout.close()
        _, pack_err = packer.communicate()
        _, tar_err = archiver.communicate()
        if archiver.returncode != 0:
            raise CommandError(tar, archiver.returncode, tar_err.decode(errors="replace"))
        if packer.returncode != 0:
            raise CommandError(gzip, packer.returncode, pack_err.decode(errors="replace"))
        out.flush()
        os.fsync(out.fileno())
