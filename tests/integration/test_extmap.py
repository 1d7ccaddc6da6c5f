"""The blocks an ext file system uses, as `disk.extmap` reads them from the bitmaps (issue 24).

The oracle is stock dumpe2fs: its per-group "Free blocks:" lists (libext2fs computes the bitmap of a
group that was never initialized), complemented. The file systems are made by mke2fs with the layouts
COS and mke2fs produce (flex_bg or not, 64bit or not, sparse_super2, 1 KiB blocks, ext2, ext3), and
one that was written to and partly deleted. Layouts the reader does not follow, and a file system that
is not clean, give the reason instead of a map.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cos_customizer.disk import ext, extmap

MiB = 1 << 20


def dumpe2fs_used(image: Path, offset: int = 0) -> set[int]:
    """The numbers of the blocks dumpe2fs does not list as free."""
    out = subprocess.run(["dumpe2fs", ext.device(image, offset)], capture_output=True, text=True, check=True).stdout
    count = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    free: set[int] = set()
    for match in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, match.group(1).split(", ")):
            first, _, last = part.partition("-")
            free.update(range(int(first), int(last or first) + 1))
    return set(range(count)) - free


def blocks_of(found: extmap.UsedMap, block_size: int) -> set[int]:
    used: set[int] = set()
    for start, length in found.ranges:
        assert start % block_size == 0 and length % block_size == 0
        used.update(range(start // block_size, (start + length) // block_size))
    return used


def mkfs(path: Path, size: int, *options: str) -> None:
    with open(path, "wb") as out:
        out.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", *options, str(path)], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("size", "options"),
    [
        (2048 * MiB, ("-t", "ext4")),
        (300 * MiB, ("-t", "ext4", "-g", "8192")),
        (200 * MiB, ("-t", "ext4", "-O", "^flex_bg")),
        (300 * MiB, ("-t", "ext4", "-O", "^64bit")),
        (300 * MiB, ("-t", "ext4", "-O", "sparse_super2")),
        (512 * MiB, ("-t", "ext4", "-O", "^sparse_super,^resize_inode")),
        (512 * MiB, ("-t", "ext4", "-O", "^resize_inode,^uninit_bg,^metadata_csum")),
        (100 * MiB, ("-t", "ext4", "-b", "1024")),
        (200 * MiB, ("-t", "ext2")),
        (300 * MiB, ("-t", "ext3")),
    ],
)
def test_the_used_blocks_are_the_ones_dumpe2fs_does_not_call_free(
    tmp_path: Path, size: int, options: tuple[str, ...]
) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, size, *options)
    # debugfs writes a few files, so the bitmaps have more than mke2fs's metadata in them.
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 4096)
    for i in range(3):
        subprocess.run(["debugfs", "-w", "-R", f"write {payload} f{i}", str(image)], check=True, capture_output=True)
    found = extmap.used_map(image, 0, size)
    assert isinstance(found, extmap.UsedMap), found
    block_size = ext.info(image).block_size
    assert blocks_of(found, block_size) == dumpe2fs_used(image)
    assert found.length == size


def test_a_partition_longer_than_its_file_system_counts_its_tail_as_used(tmp_path: Path) -> None:
    image = tmp_path / "part.img"
    mkfs(image, 64 * MiB, "-t", "ext4")
    with open(image, "r+b") as out:
        out.truncate(80 * MiB)
    found = extmap.used_map(image, 0, 80 * MiB)
    assert isinstance(found, extmap.UsedMap)
    assert found.ranges[-1][0] + found.ranges[-1][1] == 80 * MiB
    block = ext.info(image).block_size
    assert blocks_of(found, block) == dumpe2fs_used(image) | set(range(64 * MiB // block, 80 * MiB // block))


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ("ssv state 0", "the file system was not cleanly unmounted"),
        ("ssv state 3", "the file system was not cleanly unmounted"),
        ("feature needs_recovery", "the file system's journal needs recovery"),
    ],
)
def test_a_file_system_that_is_not_clean_gives_its_reason(tmp_path: Path, request_: str, reason: str) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 64 * MiB, "-t", "ext4")
    subprocess.run(["debugfs", "-w", "-R", request_, str(image)], check=True, capture_output=True)
    assert extmap.used_map(image, 0, 64 * MiB) == reason


def test_layouts_not_read_here_and_other_data_give_their_reason(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 128 * MiB, "-t", "ext4", "-O", "bigalloc")
    assert extmap.used_map(image, 0, 128 * MiB) == (
        "the file system's layout (meta_bg, bigalloc or a journal device) is not read here"
    )
    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * MiB)
    assert extmap.used_map(other, 0, MiB) == "not an ext file system"
    mkfs(image, 64 * MiB, "-t", "ext4")
    assert extmap.used_map(image, 0, 32 * MiB) == "the file system is larger than its partition"
