"""The pure-Python dm-verity tree against the real veritysetup, on the same bytes."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from cos_customizer.disk.verity import BLOCK, VerityParams, format_verity, random_salt, tree_size_blocks, verify_tree

VERITYSETUP = shutil.which("veritysetup") or (
    "/usr/sbin/veritysetup" if os.path.exists("/usr/sbin/veritysetup") else None
)
needs_veritysetup = pytest.mark.skipif(VERITYSETUP is None, reason="veritysetup (cryptsetup-bin) is not installed")

MiB = 1 << 20
GiB = 1 << 30
PART_OFFSET = MiB + 3 * 512  # a partition start that is sector- but not 4K-aligned
TREE_FILL = b"\xab"  # garbage put where the tree goes first: every tree byte must be written


def vs_args(n: int, hash_offset: int, salt: bytes) -> list[str]:
    assert VERITYSETUP is not None
    return [
        "--format=0",
        "--no-superblock",
        "--hash=sha256",
        "--data-block-size=4096",
        "--hash-block-size=4096",
        f"--salt={salt.hex() if salt else '-'}",
        f"--data-blocks={n}",
        f"--hash-offset={hash_offset}",
    ]


def vs_format(path: Path, n: int, hash_offset: int, salt: bytes) -> str:
    assert VERITYSETUP is not None
    cmd = [VERITYSETUP, "format", *vs_args(n, hash_offset, salt), str(path), str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("Root hash:"))


def vs_verify(path: Path, n: int, hash_offset: int, salt: bytes, root: str) -> bool:
    assert VERITYSETUP is not None
    cmd = [VERITYSETUP, "verify", *vs_args(n, hash_offset, salt), str(path), str(path), root]
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def pwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def extract(src: Path, offset: int, length: int, dst: Path) -> None:
    """Copy [offset, offset + length) of src to its own file, keeping holes."""
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fout, length)
        pos, end = offset, offset + length
        while pos < end:
            try:
                pos = os.lseek(fin, pos, os.SEEK_DATA)
            except OSError:
                break
            if pos >= end:
                break
            stop = min(os.lseek(fin, pos, os.SEEK_HOLE), end)
            while pos < stop:
                done = os.copy_file_range(fin, fout, stop - pos, pos, pos - offset)
                assert done > 0
                pos += done
    finally:
        os.close(fin)
        os.close(fout)


def make_image(path: Path, n: int, offset: int, rng: random.Random, *, contiguous: int = 0) -> int:
    """A sparse image with an n-block data region at `offset` followed by room for the tree; returns hash_offset.

    The region gets random blocks at scattered places (first and last block included), written all-zero
    blocks, a block that is zero but for its last byte, holes, and optionally `contiguous` random bytes.
    """
    hash_offset = offset + n * BLOCK
    tree = tree_size_blocks(n) * BLOCK
    with open(path, "wb") as f:
        f.truncate(hash_offset + tree + offset)  # as much slack after the partition as before it
        if offset:
            f.seek(0)
            f.write(b"\x11" * offset)
            f.seek(hash_offset + tree)
            f.write(b"\x22" * offset)
        f.seek(hash_offset)
        f.write(TREE_FILL * tree)
        picks = {0, n - 1} | {rng.randrange(n) for _ in range(min(n, 12))}
        for b in sorted(picks):
            f.seek(offset + b * BLOCK)
            f.write(rng.randbytes(BLOCK))
        for b in (rng.randrange(n) for _ in range(min(n, 4))):
            f.seek(offset + b * BLOCK)
            f.write(bytes(BLOCK * min(3, n - b)))
        nearly = rng.randrange(n)
        f.seek(offset + nearly * BLOCK)
        f.write(bytes(BLOCK - 1) + b"\x01")
        if contiguous:
            start = rng.randrange(n - contiguous // BLOCK)
            f.seek(offset + start * BLOCK)
            f.write(rng.randbytes(contiguous))
    return hash_offset


def levels_of(n: int) -> int:
    levels = 0
    while (n - 1) >> (7 * levels):
        levels += 1
    return levels


def check_path(path: Path, data_offset: int, p: VerityParams, block: int) -> None:
    """Walk root -> data block the way the kernel does on a read, from the documented layout alone."""
    n, levels = p.data_blocks, levels_of(p.data_blocks)
    starts: dict[int, int] = {}
    pos = p.hash_offset
    for level in reversed(range(levels)):
        starts[level] = pos
        pos += -(-n // 128 ** (level + 1)) * BLOCK
    want = p.root_hash
    for level in reversed(range(levels)):
        hb = pread(path, starts[level] + (block >> (7 * (level + 1))) * BLOCK, BLOCK)
        assert hashlib.sha256(hb + p.salt).digest() == want, (block, level)
        slot = (block >> (7 * level)) & 127
        want = hb[slot * 32 : (slot + 1) * 32]
    assert hashlib.sha256(pread(path, data_offset + block * BLOCK, BLOCK) + p.salt).digest() == want


def compare_with_veritysetup(tmp_path: Path, n: int, offset: int, salt: bytes, *, contiguous: int = 0) -> None:
    rng = random.Random(n * 7919 + offset)
    image, part = tmp_path / "image.raw", tmp_path / "part.raw"
    hash_offset = make_image(image, n, offset, rng, contiguous=contiguous)
    part_len = n * BLOCK + tree_size_blocks(n) * BLOCK
    extract(image, offset, part_len, part)  # veritysetup's copy, taken before we write anything
    before, after = pread(image, 0, offset), pread(image, offset + part_len, offset)

    params = format_verity(image, data_offset=offset, data_blocks=n, hash_offset=hash_offset, salt=salt)
    root = vs_format(part, n, n * BLOCK, salt)

    assert params.root_hexdigest == root
    assert params.data_blocks == n and params.hash_offset == hash_offset and params.salt_hex == salt.hex()
    assert params.tree_blocks == tree_size_blocks(n)
    tree = params.tree_blocks * BLOCK
    assert pread(image, hash_offset, tree) == pread(part, n * BLOCK, tree)
    assert pread(image, 0, offset) == before and pread(image, offset + part_len, offset) == after
    assert verify_tree(image, params, data_offset=offset)
    if n < 100_000:  # veritysetup verify reads every block: keep it to the small cases
        extract(image, offset, part_len, part)
        assert vs_verify(part, n, n * BLOCK, salt, params.root_hexdigest)


def test_tree_size_blocks() -> None:
    assert [tree_size_blocks(n) for n in (1, 2, 128, 129, 16384, 16385)] == [0, 1, 1, 3, 129, 132]
    assert tree_size_blocks(262144) == 2048 + 16 + 1
    with pytest.raises(ValueError, match="data_blocks must be at least 1, got 0"):
        tree_size_blocks(0)


def test_random_salt() -> None:
    a, b = random_salt(), random_salt()
    assert len(a) == 32 and a != b


def test_params_hex() -> None:
    p = VerityParams(data_blocks=1, hash_offset=4096, salt=b"\x01\xff", root_hash=b"\xab" * 32, tree_blocks=0)
    assert p.salt_hex == "01ff" and p.root_hexdigest == "ab" * 32


def test_single_block_root_is_the_blocks_own_digest(tmp_path: Path) -> None:
    path = tmp_path / "one.raw"
    path.write_bytes(b"x" * BLOCK + TREE_FILL * BLOCK)
    salt = random_salt()
    p = format_verity(path, data_offset=0, data_blocks=1, hash_offset=BLOCK, salt=salt)
    assert p.root_hash == hashlib.sha256(b"x" * BLOCK + salt).digest()  # format 0: salt after the data
    assert p.tree_blocks == 0 and path.read_bytes()[BLOCK:] == TREE_FILL * BLOCK  # nothing written


@needs_veritysetup
@pytest.mark.parametrize("offset", [0, PART_OFFSET], ids=["whole-file", "partition"])
@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 128 * 128, 128 * 128 + 1])
def test_matches_veritysetup(tmp_path: Path, n: int, offset: int) -> None:
    compare_with_veritysetup(tmp_path, n, offset, random_salt())


@needs_veritysetup
@pytest.mark.parametrize("salt", [b"", b"\x05\x06\x07", bytes(range(200))], ids=["none", "3-bytes", "200-bytes"])
def test_other_salt_sizes(tmp_path: Path, salt: bytes) -> None:
    compare_with_veritysetup(tmp_path, 300, 0, salt)


@needs_veritysetup
@pytest.mark.parametrize("offset", [0, PART_OFFSET], ids=["whole-file", "partition"])
def test_1gib_sparse_matches_veritysetup(tmp_path: Path, offset: int) -> None:
    compare_with_veritysetup(tmp_path, GiB // BLOCK - 5, offset, random_salt(), contiguous=3 * MiB)


@needs_veritysetup
def test_fully_written_region_matches_veritysetup(tmp_path: Path) -> None:
    n = 3000
    path = tmp_path / "full.raw"
    path.write_bytes(random.Random(3).randbytes(n * BLOCK) + bytes(tree_size_blocks(n) * BLOCK))
    copy = tmp_path / "copy.raw"
    shutil.copyfile(path, copy)
    salt = random_salt()
    p = format_verity(path, data_offset=0, data_blocks=n, hash_offset=n * BLOCK, salt=salt)
    assert p.root_hexdigest == vs_format(copy, n, n * BLOCK, salt)
    assert path.read_bytes() == copy.read_bytes()


@needs_veritysetup
@pytest.mark.parametrize("where", ["data", "hole", "tree"])
def test_one_flipped_byte_fails_verification(tmp_path: Path, where: str) -> None:
    n = 128 * 128 + 1
    path = tmp_path / "image.raw"
    hash_offset = make_image(path, n, 0, random.Random(5))
    salt = random_salt()
    p = format_verity(path, data_offset=0, data_blocks=n, hash_offset=hash_offset, salt=salt)
    assert vs_verify(path, n, hash_offset, salt, p.root_hexdigest)
    assert verify_tree(path, p, data_offset=0)
    at = {"data": 100, "hole": (n - 2) * BLOCK + 17, "tree": hash_offset + 5 * BLOCK + 3}[where]
    if where == "hole":
        assert pread(path, (n - 2) * BLOCK, BLOCK) == bytes(BLOCK)
    pwrite(path, at, bytes([pread(path, at, 1)[0] ^ 0x40]))
    assert not vs_verify(path, n, hash_offset, salt, p.root_hexdigest)
    assert not verify_tree(path, p, data_offset=0)


def test_huge_sparse_region_reads_only_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 GiB of holes: no hole is read; the tree checks out along kernel-style paths for data and hole blocks."""
    n = 64 * GiB // BLOCK
    path = tmp_path / "huge.raw"
    written = [0, 1, 4_000_000, 4_000_001, 9_999_999, n - 1]
    with open(path, "wb") as f:
        f.truncate(n * BLOCK + tree_size_blocks(n) * BLOCK)
        for b in written:
            f.seek(b * BLOCK)
            f.write(os.urandom(BLOCK))
    real_pread = os.pread
    read = 0

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        nonlocal read
        read += size
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting_pread)  # verity.py calls os.pread
    calls: list[tuple[int, int]] = []
    p = format_verity(
        path,
        data_offset=0,
        data_blocks=n,
        hash_offset=n * BLOCK,
        salt=random_salt(),
        progress=lambda d, t: calls.append((d, t)),
    )
    monkeypatch.undo()
    assert read <= len(written) * BLOCK * 16  # file system extents may round up, but never the 64 GiB
    assert p.tree_blocks == tree_size_blocks(n) == 131072 + 1024 + 8 + 1
    for b in [*written, 2, 127, 128, 5_000_000, n - 2]:
        check_path(path, 0, p, b)
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progress_and_verify_with_partition_offset(tmp_path: Path) -> None:
    n = 5000
    path = tmp_path / "image.raw"
    hash_offset = make_image(path, n, PART_OFFSET, random.Random(9))
    calls: list[tuple[int, int]] = []
    p = format_verity(
        path,
        data_offset=PART_OFFSET,
        data_blocks=n,
        hash_offset=hash_offset,
        salt=random_salt(),
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls and calls[-1] == (n, n)
    for b in (0, 1, 129, 4999):
        check_path(path, PART_OFFSET, p, b)
    assert verify_tree(path, p, data_offset=PART_OFFSET)
    assert not verify_tree(path, p, data_offset=PART_OFFSET - 512)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_blocks": 0}, "data_blocks must be at least 1, got 0"),
        ({"data_offset": 100}, "data_offset must be a non-negative multiple of 512, got 100"),
        ({"hash_offset": 40961}, "hash_offset must be a non-negative multiple of 512, got 40961"),
        ({"salt": bytes(257)}, "salt is at most 256 bytes, got 257"),
        ({"hash_offset": 4096}, r"hash area \[4096, 8192\) overlaps data area \[0, 40960\)"),
        (
            {"data_blocks": 12, "hash_offset": 49152},
            r"data region of 12 blocks at byte 0 ends past the end \(45056 bytes\)",
        ),
        ({"data_offset": 8192, "hash_offset": 49152}, r"data region of 10 blocks at byte 8192 ends past the end"),
    ],
)
def test_bad_arguments_change_nothing(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    path = tmp_path / "image.raw"
    content = os.urandom(11 * BLOCK)
    path.write_bytes(content)
    args: dict[str, object] = {"data_offset": 0, "data_blocks": 10, "hash_offset": 10 * BLOCK, "salt": b"s"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        format_verity(path, **args)  # type: ignore[arg-type]
    assert path.read_bytes() == content


@pytest.mark.root
@needs_veritysetup
def test_block_device(tmp_path: Path) -> None:
    """A loop device (no SEEK_DATA holes there): every block is read, zero blocks still take the short cut."""
    n = 20000
    image, copy = tmp_path / "image.raw", tmp_path / "copy.raw"
    hash_offset = make_image(image, n, PART_OFFSET, random.Random(11), contiguous=MiB)
    length = n * BLOCK + tree_size_blocks(n) * BLOCK
    extract(image, PART_OFFSET, length, copy)
    attach = ["losetup", "--find", "--show", f"--offset={PART_OFFSET}", f"--sizelimit={length}", str(image)]
    res = subprocess.run(attach, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no loop device here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        salt = random_salt()
        p = format_verity(dev, data_offset=0, data_blocks=n, hash_offset=n * BLOCK, salt=salt)
        assert verify_tree(dev, p, data_offset=0)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
    assert p.root_hexdigest == vs_format(copy, n, n * BLOCK, salt)
    assert pread(image, hash_offset, p.tree_blocks * BLOCK) == pread(copy, n * BLOCK, p.tree_blocks * BLOCK)
    assert str(image) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert hash_offset == PART_OFFSET + n * BLOCK
