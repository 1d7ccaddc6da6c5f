"""Benchmark: moving a mostly-empty 6 GB STATE, ours against `sfdisk --move-data`.

Run (as root, for the loop device): .venv/bin/python benchmarks/bench_mover.py

Scenario (the disable-auto-update case on a 10 GiB COS disk): STATE, an ext4
of 12267487 sectors at sector 8704000 holding 200 MiB of files, moves left
to sector 4513792 (an overlapping move). Both tools work on identical sparse
copies of one image; afterwards each copy's STATE must pass `e2fsck -fn`
and hold the same files. Target: ours >= 20x faster. The allocated size of
each result is printed too (ours stays sparse; sfdisk writes every byte).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cos_customizer.disk import apply, ext, gpt, loop, mover
from cos_customizer.sample.image import partitions

TARGET = 20.0
SECTOR = 512
NEW_START = 4513792
DATA_MIB = 200
METHODS = {
    "shift": "ours: shift the image's tail",
    "copy": "ours: copy_range (SEEK_DATA)",
    "used": "ours: used blocks, on a loop device",
}


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def make_image(work: Path) -> Path:
    image = work / "disk.raw"
    disk_sectors = 10 * (1 << 30) // SECTOR
    with open(image, "wb") as out:
        out.truncate(disk_sectors * SECTOR)
    table = gpt.new_table(disk_sectors, partitions(disk_sectors))
    root_a = table.partition(3)
    table = table.replace(root_a.moved(root_a.first, 8))  # as disable-auto-update leaves it
    gpt.write_table(image, table)
    state = table.partition(1)
    tree = work / "tree"
    rng = random.Random(1)
    for index in range(DATA_MIB // 4):
        path = tree / f"dir{index % 10}" / f"file{index}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(4 << 20))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "STATE", "-d", str(tree), "-E",
       f"offset={state.first * SECTOR},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
       str(image), str(state.size * SECTOR // 4096))  # fmt: skip
    shutil.rmtree(tree)
    return image


def copy(image: Path, name: str) -> Path:
    target = image.with_name(name)
    sh("cp", "--sparse=always", str(image), str(target))
    return target


def ours(image: Path, method: str) -> float:
    """Move STATE as the local executor does (`shift`), by copying its data extents (`copy`), or as the
    provisioner does on a VM's disk (`used`: a loop device, the blocks the ext bitmaps call used)."""
    table = gpt.read_table(image)
    state = table.partition(1)
    size = image.stat().st_size
    started = time.perf_counter()
    src, dst = state.first * SECTOR, NEW_START * SECTOR
    if method == "shift":
        # STATE is the last partition: shift the file's tail (extent maps only), then restore the size.
        if not mover.shift_tail(image, src, dst - src):
            raise SystemExit("this file system cannot collapse ranges; run on ext4 or XFS")
        os.truncate(image, size)
    elif method == "copy":
        mover.copy_range(image, src, dst, state.size * SECTOR)
    else:
        with loop.attach(image) as device:
            apply.move_partition(device, "STATE", src, dst, state.size * SECTOR)
    gpt.write_table(image, table.replace(state.moved(NEW_START, state.size)))
    return time.perf_counter() - started


def stock(image: Path) -> float:
    started = time.perf_counter()
    sh("sfdisk", "--move-data", "-q", "-N", "1", str(image), stdin=f"start={NEW_START}\n")
    return time.perf_counter() - started


def check(image: Path) -> str:
    state = gpt.read_table(image).partition(1)
    if state.first != NEW_START:
        raise SystemExit(f"{image.name}: STATE is at {state.first}, not {NEW_START}")
    ext.check(image, state.first * SECTOR)
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /dir3", ext.device(image, state.first * SECTOR)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(
        sorted(line.split()[-1] + " " + line.split()[-4] for line in listing.splitlines() if "file" in line)
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-mover.", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        base = make_image(Path(tmp))
        stock_copy = copy(base, "stock.raw")
        t_stock = stock(stock_copy)
        expected = check(stock_copy)
        alloc_stock = stock_copy.stat().st_blocks * SECTOR
        stock_copy.unlink()
        results = {}
        for method in METHODS:
            image = copy(base, f"{method}.raw")
            elapsed = ours(image, method)
            if check(image) != expected:
                raise SystemExit(f"{method}: the result holds different files from sfdisk's")
            results[method] = (elapsed, image.stat().st_blocks * SECTOR)
            image.unlink()
    print(f"move a 6 GB STATE ({DATA_MIB} MiB used) left by 2 GiB, overlapping; same image, same run:")
    print(f"  {'sfdisk --move-data':<34} {t_stock:8.3f} s   allocated {alloc_stock / 2**20:6.0f} MiB")
    for method, (elapsed, alloc) in results.items():
        print(
            f"  {METHODS[method]:<34} {elapsed:8.3f} s   allocated {alloc / 2**20:6.0f} MiB   "
            f"{t_stock / elapsed:7.1f}x faster"
        )
    ratio = t_stock / results["shift"][0]
    print(f"  the executor's way (shift): {ratio:.1f}x faster than sfdisk (target >= {TARGET:.0f}x)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
