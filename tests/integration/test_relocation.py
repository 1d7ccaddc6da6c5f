"""A partition relocated on a block device by what its file system uses (issue 24): the shutdown handler's
move (`apply.move_partition`) on a loop device, as on the preload VM's /dev/sda.

STATE is an ext4 file system of many block groups, written through the kernel (files spread over its
groups by the allocator) with half of them then deleted, so its free blocks hold stale data; the
destination holds old bytes too. The oracles: stock dumpe2fs says which blocks are used, and the
source's own bytes are what a full copy writes. After the move every used block is byte-identical to
the source's, every other block reads as zeros, `e2fsck -fn` is clean and every file's sha256 (read
back with debugfs) is the source's. A file system that is not clean, and a partition that holds no
ext file system, are copied whole. Moves go both ways, overlapping and apart.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import apply, ext, loop
from tests.conftest import sh
from tests.integration.test_extmap import dumpe2fs_used

pytestmark = [pytest.mark.root, pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices")]

MiB = 1 << 20
FS_SIZE = 384 * MiB  # 12 block groups of 32 MiB (-g 8192)
DISK_SIZE = 1024 * MiB
BLOCK = 4096


@pytest.fixture(scope="module")
def state_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The STATE file system (a file) and the sha256 of each file it keeps."""
    work = tmp_path_factory.mktemp("state")
    image = work / "state.img"
    with open(image, "wb") as out:
        out.truncate(FS_SIZE)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-g", "8192", "-L", "STATE", image)
    rng = random.Random(24)
    kept: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=work) as mountpoint:
        sh("mount", "-o", "loop", image, mountpoint)
        try:
            for d in range(24):  # top-level directories: the allocator spreads them over the groups
                (Path(mountpoint) / f"d{d}").mkdir()
                for f in range(6):
                    content = rng.randbytes(rng.choice([1, 5000, 70_000, 600_000, 3 << 20]))
                    (Path(mountpoint) / f"d{d}" / f"f{f}").write_bytes(content)
                    if (d + f) % 2:
                        kept[f"/d{d}/f{f}"] = hashlib.sha256(content).hexdigest()
            sh("sync")
            for d in range(24):
                for f in range(6):
                    if not (d + f) % 2:
                        (Path(mountpoint) / f"d{d}" / f"f{f}").unlink()  # its blocks keep their bytes, freed
        finally:
            sh("umount", mountpoint)
    yield image, kept


def disk_with(tmp_path: Path, content: Path, src: int, dst: int) -> Path:
    """A disk whose destination range holds old bytes and whose source range holds `content`."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as out:
        out.truncate(DISK_SIZE)
        out.seek(dst)
        for _ in range(content.stat().st_size // MiB):
            out.write(b"\xee" * MiB)
    sh("dd", f"if={content}", f"of={disk}", "bs=1M", f"seek={src // MiB}", "conv=notrunc", "status=none")
    return disk


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def debugfs_sha256(disk: Path, offset: int, name: str) -> str:
    result = subprocess.run(["debugfs", "-R", f"cat {name}", ext.device(disk, offset)], capture_output=True, check=True)
    return hashlib.sha256(result.stdout).hexdigest()


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (16 * MiB, 56 * MiB),  # right, overlapping
        (56 * MiB, 16 * MiB),  # left, overlapping
        (16 * MiB, 17 * MiB),  # right by less than a chunk
        (17 * MiB, 16 * MiB),
        (16 * MiB, 600 * MiB),  # apart
        (600 * MiB, 16 * MiB),
    ],
)
def test_a_clean_ext4_moves_by_its_used_blocks(
    tmp_path: Path, state_fs: tuple[Path, dict[str, str]], src: int, dst: int
) -> None:
    source, kept = state_fs
    used = dumpe2fs_used(source)
    disk = disk_with(tmp_path, source, src, dst)
    lines: list[str] = []
    with loop.attach(disk) as device:
        moved = apply.move_partition(device, "STATE", src, dst, FS_SIZE, lines.append)
    assert moved.copied == len(used) * BLOCK and moved.copied + moved.zeroed == FS_SIZE
    assert lines == [f"moving the {len(used) * BLOCK / MiB:.1f} MiB STATE uses of 384.0 MiB"]
    assert len(used) * BLOCK < FS_SIZE // 2  # what the test is about: much is free
    before, after = source.read_bytes(), read(disk, dst, FS_SIZE)
    zeros = bytes(BLOCK)
    for block in range(FS_SIZE // BLOCK):
        piece = slice(block * BLOCK, (block + 1) * BLOCK)
        assert after[piece] == (before[piece] if block in used else zeros), block
    assert sum(1 for b in range(FS_SIZE // BLOCK) if b not in used and before[b * BLOCK : (b + 1) * BLOCK] != zeros)
    sh("e2fsck", "-fn", ext.device(disk, dst))
    for name, digest in kept.items():
        assert debugfs_sha256(disk, dst, name) == digest, name


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ("ssv state 0", "the file system was not cleanly unmounted"),
        ("feature needs_recovery", "the file system's journal needs recovery"),
        (None, "not an ext file system"),
    ],
)
@pytest.mark.parametrize(("src", "dst"), [(16 * MiB, 56 * MiB), (56 * MiB, 16 * MiB)])
def test_anything_else_is_copied_whole(
    tmp_path: Path, state_fs: tuple[Path, dict[str, str]], request_: str | None, reason: str, src: int, dst: int
) -> None:
    content = tmp_path / "content.img"
    if request_ is None:  # not a file system: random bytes with runs of zeros
        rng = random.Random(src)
        content.write_bytes(b"".join(rng.randbytes(MiB) if i % 3 else bytes(MiB) for i in range(FS_SIZE // MiB)))
    else:
        sh("cp", "--sparse=always", state_fs[0], content)
        sh("debugfs", "-w", "-R", request_, content)
    disk = disk_with(tmp_path, content, src, dst)
    lines: list[str] = []
    with loop.attach(disk) as device:
        moved = apply.move_partition(device, "STATE", src, dst, FS_SIZE, lines.append)
    assert lines == [f"moving all of STATE (384.0 MiB): {reason}"]
    assert moved.copied == FS_SIZE
    assert read(disk, dst, FS_SIZE) == content.read_bytes()
