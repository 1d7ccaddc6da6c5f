"""Benchmark: our dm-verity tree (cos_customizer.disk.verity) against `veritysetup format`.

Run: .venv/bin/python benchmarks/bench_verity.py

Scenario (the seal-oem case): a 1 GiB sparse file holding an ext4 made by
`mkfs.ext4 -q -F -d DIR` from 20 MiB of random files, the hash tree to follow
the file system in the same file. Both tools hash identical copies; the root
hashes and the tree bytes must be equal. Target: ours >= 5x faster. A fully
written (dense) region is measured too, for information.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cos_customizer.disk.verity import BLOCK, format_verity, random_salt, tree_size_blocks

TARGET = 5.0
ROUNDS = 3
VERITYSETUP = shutil.which("veritysetup") or "/usr/sbin/veritysetup"


def veritysetup_format(path: Path, n: int, salt: bytes) -> str:
    cmd = [
        VERITYSETUP,
        "format",
        "--format=0",
        "--no-superblock",
        "--hash=sha256",
        "--data-block-size=4096",
        "--hash-block-size=4096",
        f"--salt={salt.hex()}",
        f"--data-blocks={n}",
        f"--hash-offset={n * BLOCK}",
        str(path),
        str(path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("Root hash:"))


def tree_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(n * BLOCK)
        return f.read(tree_size_blocks(n) * BLOCK)


def compare(name: str, image: Path, n: int) -> float:
    """Time both tools on copies of `image` (best of ROUNDS), check they agree; return the speed ratio."""
    ours_copy, theirs_copy = image.with_suffix(".ours"), image.with_suffix(".theirs")
    subprocess.run(["cp", "--sparse=always", str(image), str(ours_copy)], check=True)
    subprocess.run(["cp", "--sparse=always", str(image), str(theirs_copy)], check=True)
    salt = random_salt()
    ours_t, theirs_t = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        params = format_verity(ours_copy, data_offset=0, data_blocks=n, hash_offset=n * BLOCK, salt=salt)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        root = veritysetup_format(theirs_copy, n, salt)
        theirs_t.append(time.perf_counter() - t0)
    if root != params.root_hexdigest:
        raise SystemExit(f"{name}: root hashes differ: ours {params.root_hexdigest}, veritysetup {root}")
    if tree_bytes(ours_copy, n) != tree_bytes(theirs_copy, n):
        raise SystemExit(f"{name}: hash trees differ")
    ours, theirs = min(ours_t), min(theirs_t)
    used = os.stat(image).st_blocks * 512 / (1 << 20)
    print(
        f"{name}: {n} blocks ({n * BLOCK / (1 << 30):.2f} GiB, {used:.0f} MiB allocated), root {root[:16]}...\n"
        f"  cos_customizer.disk.verity: {ours * 1000:8.1f} ms\n"
        f"  veritysetup format:         {theirs * 1000:8.1f} ms\n"
        f"  ratio: {theirs / ours:.1f}x"
    )
    return theirs / ours


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-verity-") as tmp:
        root = Path(tmp)
        files = root / "files"
        files.mkdir()
        for i in range(20):
            (files / f"blob{i:02d}.bin").write_bytes(os.urandom(1 << 20))

        n = (1 << 30) // BLOCK
        image = root / "oem.raw"
        with open(image, "wb") as f:
            f.truncate((n + tree_size_blocks(n)) * BLOCK)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(files), str(image), str(n)], check=True)
        ratio = compare("sparse 1 GiB ext4 + 20 MiB of files", image, n)

        dense_n = (256 << 20) // BLOCK
        dense = root / "dense.raw"
        with open(dense, "wb") as f:
            for _ in range(dense_n * BLOCK // (4 << 20)):
                f.write(os.urandom(4 << 20))
            f.truncate((dense_n + tree_size_blocks(dense_n)) * BLOCK)
        compare("dense 256 MiB of random bytes (information only)", dense, dense_n)

    verdict = "OK" if ratio >= TARGET else "BELOW TARGET"
    print(f"sparse ratio {ratio:.1f}x, target >= {TARGET:.0f}x: {verdict}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
