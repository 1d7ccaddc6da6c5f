"""A whole disk's page cache against writes through a partition's own device (root: loop and dm devices).

The stand-in for /dev/sda and /dev/sda8: a loop device, and a device-mapper linear device over part of
it (a partition device is one more block device with a page cache of its own, as a dm device is; a
second loop device would share the first one's cache and show nothing).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import blockdev, loop

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop and device-mapper devices"),
]
MiB = 1 << 20


def _read(device: Path, offset: int, size: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _device_mapper() -> bool:
    return subprocess.run(["dmsetup", "version"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(
    not _device_mapper(),
    reason="no device-mapper in this kernel (and loop devices get no partitions here): the sealed OEM of "
    "tests/guest/test_rehearsal.py verifies on a real guest's /dev/sda only with drop_cache",
)
def test_drop_cache_makes_the_disk_see_what_the_partition_wrote(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as out:
        out.truncate(64 * MiB)
    name = f"cos-customizer-test-{uuid.uuid4().hex[:8]}"
    with loop.attach(image) as disk:
        table = f"0 {16 * MiB // 512} linear {disk} {8 * MiB // 512}"
        subprocess.run(["dmsetup", "create", name, "--table", table], check=True)
        try:
            holder = os.open(disk, os.O_RDONLY)  # keeps the disk's cache alive between the reads, as a VM does
            try:
                assert _read(disk, 8 * MiB, 4096) == bytes(4096)  # now cached
                part = Path(f"/dev/mapper/{name}")
                fd = os.open(part, os.O_WRONLY)
                try:
                    os.pwrite(fd, b"written through the partition".ljust(4096, b"."), 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                assert _read(disk, 8 * MiB, 4096) == bytes(4096)  # the defect: the disk's stale page
                blockdev.drop_cache(disk)
                assert _read(disk, 8 * MiB, 4096).startswith(b"written through the partition")
            finally:
                os.close(holder)
        finally:
            subprocess.run(["dmsetup", "remove", name], check=True)


def test_drop_cache_leaves_a_file_alone(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    blockdev.drop_cache(image)
    assert image.read_bytes() == b"x" * 4096
