"""The mover against a model of the bytes (on a file and on a loop device); moves by used blocks: test_relocation."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, loop, mover

MiB = 1 << 20


def sparse_file(path: Path, size: int, chunks: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as out:
        out.truncate(size)
        for offset, data in chunks:
            out.seek(offset)
            out.write(data)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def scattered(rng: random.Random, start: int, length: int, count: int) -> list[tuple[int, bytes]]:
    chunks = []
    for _ in range(count):
        offset = start + rng.randrange(0, length - 256 * 1024) // 4096 * 4096
        chunks.append((offset, rng.randbytes(rng.choice([4096, 65536, 200 * 1024]))))
    return chunks


@pytest.mark.parametrize(
    ("src", "dst", "length"),
    [
        (8 * MiB, 20 * MiB, 32 * MiB),  # right, overlapping
        (20 * MiB, 8 * MiB, 32 * MiB),  # left, overlapping
        (8 * MiB, 8 * MiB + 4096, 16 * MiB),  # right by one block
        (8 * MiB + 4096, 8 * MiB, 16 * MiB),  # left by one block
        (4 * MiB, 60 * MiB, 16 * MiB),  # apart
        (60 * MiB, 4 * MiB, 16 * MiB),
    ],
)
def test_copy_range_is_byte_exact_and_sparse(tmp_path: Path, src: int, dst: int, length: int) -> None:
    rng = random.Random(src * 7 + dst)
    image = tmp_path / "disk.raw"
    size = 96 * MiB
    # Old data in the destination that must not survive where the source has holes.
    old = [(dst + i * MiB, b"\xee" * 8192) for i in range(0, length // MiB, 3)]
    data = scattered(rng, src, length, 12)
    sparse_file(image, size, [*old, *data])
    before = image.read_bytes()
    progress: list[tuple[int, int]] = []
    mover.copy_range(image, src, dst, length, progress=lambda done, total: progress.append((done, total)))
    after = image.read_bytes()
    assert after[dst : dst + length] == before[src : src + length]
    # Nothing outside the destination changes (the source may only be overwritten where they overlap).
    assert after[:dst] == before[:dst]
    assert after[dst + length :] == before[dst + length :]
    assert allocated(image) <= 2 * sum(len(d) for _, d in data) + 4 * MiB + sum(len(d) for _, d in old)
    assert progress and progress[-1][0] == progress[-1][1]


def test_copy_range_noop(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sparse_file(image, MiB, [(0, b"x" * 4096)])
    mover.copy_range(image, 0, 0, 4096)
    mover.copy_range(image, 0, 8192, 0)
    assert image.read_bytes()[:4096] == b"x" * 4096


def test_copy_range_on_a_fully_written_region(tmp_path: Path) -> None:
    rng = random.Random(3)
    image = tmp_path / "disk.raw"
    payload = rng.randbytes(24 * MiB)
    sparse_file(image, 64 * MiB, [(MiB, payload)])
    mover.copy_range(image, MiB, MiB + 5 * 4096, len(payload))
    assert image.read_bytes()[MiB + 5 * 4096 : MiB + 5 * 4096 + len(payload)] == payload


def make_ext(image: Path, offset: int, size: int, tree: Path) -> None:
    subprocess.run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-L",
            "STATE",
            "-d",
            str(tree),
            "-E",
            f"offset={offset}",
            str(image),
            f"{size // 1024}k",
        ],
        check=True,
        capture_output=True,
    )


def read_file(image: Path, offset: int, name: str) -> bytes:
    result = subprocess.run(
        ["debugfs", "-R", f"cat {name}", ext.device(image, offset)], check=True, capture_output=True
    )
    return result.stdout


@pytest.mark.parametrize("delta", [-8 * MiB, 12 * MiB, -4096, 4096])
def test_shift_tail_moves_the_end_of_the_file(tmp_path: Path, delta: int) -> None:
    rng = random.Random(delta)
    image = tmp_path / "disk.raw"
    start = 32 * MiB
    chunks = [(0, rng.randbytes(8192)), *scattered(rng, start, 24 * MiB, 10)]
    sparse_file(image, 64 * MiB, chunks)
    before = image.read_bytes()
    assert mover.shift_tail(image, start, delta)
    after = image.read_bytes()
    assert len(after) == len(before) + delta
    assert after[start + delta :] == before[start:]
    assert after[: min(start, start + delta)] == before[: min(start, start + delta)]
    if delta > 0:
        assert after[start : start + delta] == bytes(delta)  # the inserted hole
    assert allocated(image) <= allocated_of(chunks) + MiB


def allocated_of(chunks: list[tuple[int, bytes]]) -> int:
    return sum(len(data) for _, data in chunks) * 2


@pytest.mark.parametrize(
    ("start", "delta"), [(32 * MiB + 512, 4096), (32 * MiB, 1000), (64 * MiB, 4096), (4096, -8192)]
)
def test_shift_tail_refuses_what_it_cannot_do_and_changes_nothing(tmp_path: Path, start: int, delta: int) -> None:
    image = tmp_path / "disk.raw"
    sparse_file(image, 64 * MiB, [(32 * MiB, b"x" * 8192)])
    before = image.read_bytes()
    assert not mover.shift_tail(image, start, delta)
    assert image.read_bytes() == before


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="needs root for a loop device")
@pytest.mark.parametrize(("src", "dst"), [(8 * MiB, 20 * MiB), (20 * MiB, 8 * MiB), (4 * MiB, 60 * MiB)])
def test_copy_range_on_a_block_device_is_byte_exact_and_keeps_holes(tmp_path: Path, src: int, dst: int) -> None:
    """The provisioner's move on the VM: a device has no holes to find, so all is read; zeros are not written."""
    rng = random.Random(src - dst)
    image = tmp_path / "disk.raw"
    length = 32 * MiB
    old = [(dst + i * MiB, b"\xee" * 8192) for i in range(0, length // MiB, 3)]
    data = scattered(rng, src, length, 12)
    sparse_file(image, 96 * MiB, [*old, *data])
    before = image.read_bytes()
    with loop.attach(image) as device:
        mover.copy_range(device, src, dst, length)
    after = image.read_bytes()
    assert after[dst : dst + length] == before[src : src + length]
    assert after[:dst] == before[:dst]
    assert after[dst + length :] == before[dst + length :]
    assert allocated(image) <= 2 * sum(len(d) for _, d in data) + 16 * MiB + sum(len(d) for _, d in old)
