"""Benchmark: a full local build, ours against the naive stock-tool path, in one run.

Run (as root): .venv/bin/python benchmarks/bench_build.py

The build is the README's: on the sample image, a script writing to
/var/lib, /mnt/stateful_partition and /usr/share/oem; seal-oem;
disable-auto-update; -oem-size=1G -disk-size-gb=12; a .tar.gz output.

The naive path does the same with stock tools, the best a user would do
with them: `cp --sparse=always`; truncate and `sgdisk -e`; `dd
conv=sparse` ROOT-A to ROOT-B; `sfdisk --move-data` for STATE and OEM;
`sfdisk` for sizes and kernel priority bits; resize2fs; the script in a
chroot of loop mounts; `veritysetup format`; grub.cfg through mtools; `tar
--format=oldgnu -Sczf` (GCE's documented import recipe, sparse-aware).
Both grub.cfg forms of the sample image (`dm=`, `dm-mod.create=`) are
built. Targets: ours >= 10x faster, its disk >= 50x smaller in allocated
bytes. Then: extending the OEM to 1024G on a 1034 GB disk must take at
most twice as long as to 1G.
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

from cos_customizer.disk import grub
from cos_customizer.sample.image import LAYOUT

SPEED_TARGET = 10.0
SIZE_TARGET = 50.0
SCALE_TARGET = 2.0
SECTOR = 512
SCRIPT = """set -e
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "sealed in the OEM" > /usr/share/oem/hello
"""
START = {name: first for _, name, first, _, _ in LAYOUT}


def sh(*argv: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed: {result.stderr.strip()}")
    return result.stdout


def cc(env: dict[str, str], *argv: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cos_customizer", *map(str, argv)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"cos-customizer {argv[0]} failed: {result.stderr.strip()}")


def ours(work: Path, source: Path, steps: list[list[str]], finish: list[str], output: Path) -> float:
    env = {**os.environ, "HOME": str(work), "COS_CUSTOMIZER_WORKDIR": str(work / "ws")}
    started = time.perf_counter()
    cc(env, "start-image-build", f"-build-context={work / 'context'}", f"-image-file={source}")
    for step in steps:
        cc(env, *step)
    cc(env, "finish-image-build", f"-output={output}", *finish)
    return time.perf_counter() - started


def naive(work: Path, source: Path, output: Path) -> tuple[float, int]:
    """The sealed 1G / 12 GB build with stock tools; returns (seconds, allocated bytes of its disk)."""
    disk = work / "disk.raw"
    root_a, root_b = START["ROOT-A"], START["ROOT-B"]
    p = root_a + 4096
    oem_sectors = 2047 * 2048
    new_state = p + oem_sectors
    started = time.perf_counter()
    sh("cp", "--sparse=always", source, disk)
    sh("truncate", "-s", "12G", disk)
    sh("sgdisk", "-e", disk)
    mib = 1 << 20
    sh("dd", f"if={disk}", f"of={disk}", "bs=4M", "conv=sparse,notrunc", "status=none", "iflag=skip_bytes,count_bytes",
       "oflag=seek_bytes", f"skip={root_a * SECTOR}", f"seek={root_b * SECTOR}", f"count={2048 * mib}")  # fmt: skip
    sh("sfdisk", "-q", "--no-reread", "-N", "3", disk, stdin=f"{root_a},8\n")
    sh("sfdisk", "-q", "--no-reread", "--move-data", "-N", "1", disk, stdin=f"{new_state},+\n")
    sh("sfdisk", "-q", "--no-reread", "--move-data", "-N", "8", disk, stdin=f"{p},{32768}\n")
    sh("sfdisk", "-q", "--no-reread", "-N", "8", disk, stdin=f"{p},{oem_sectors}\n")
    sh("sfdisk", "-q", "--no-reread", "--part-attrs", disk, "4", "48,49,56")  # KERN-B priority 3, successful
    with Loops() as loops:
        state_dev = loops.attach(disk, new_state, 0)
        sh("e2fsck", "-fp", state_dev)
        sh("resize2fs", state_dev)
        oem_dev = loops.attach(disk, p, oem_sectors)
        sh("e2fsck", "-fp", oem_dev)
        sh("resize2fs", oem_dev, f"{1 << 18}")
        root = work / "root"
        root.mkdir()
        root_dev = loops.attach(disk, root_b, 4194304, read_only=True)
        loops.mount(root_dev, root, "ro")
        loops.mount(state_dev, root / "mnt/stateful_partition")
        loops.mount(str(root / "mnt/stateful_partition/var_overlay"), root / "var", "bind")
        loops.mount(oem_dev, root / "usr/share/oem")
        loops.mount("tmpfs", root / "tmp", fstype="tmpfs")
        (root / "tmp/script.sh").write_text(SCRIPT)
        sh("chroot", root, "/bin/bash", "/tmp/script.sh")
        loops.unmount_all()
        salt = os.urandom(32).hex()
        out = sh("veritysetup", "format", "--format=0", "--no-superblock", f"--salt={salt}", "--data-blocks=262144",
                 f"--hash-offset={1 << 30}", oem_dev, oem_dev)  # fmt: skip
        root_hash = next(line.split(":")[1].strip() for line in out.splitlines() if line.startswith("Root hash"))
    efi = START["EFI-SYSTEM"] * SECTOR
    cfg = grub.read_grub_cfg(disk, efi)
    cfg = grub.add_oem_verity(cfg, partuuid="00000000-0000-0000-0000-000000000000", fs_size_4k=262144,
                              root_hexdigest=root_hash, salt=salt)  # fmt: skip
    grub.write_grub_cfg(disk, efi, grub.mask_units(cfg, grub.UPDATE_ENGINE, grub.OEM_MOUNT))
    sh("tar", "--format=oldgnu", "-Sczf", output, "-C", work, "disk.raw")
    elapsed = time.perf_counter() - started
    return elapsed, disk.stat().st_blocks * SECTOR


class Loops:
    """Loop devices and mounts of the naive path, released at the end whatever happens."""

    def __init__(self) -> None:
        self.devices: list[str] = []
        self.mounts: list[Path] = []

    def __enter__(self) -> Loops:
        return self

    def attach(self, image: Path, first: int, sectors: int, read_only: bool = False) -> str:
        argv = ["losetup", "--find", "--show", "--offset", str(first * SECTOR)]
        if sectors:
            argv += ["--sizelimit", str(sectors * SECTOR)]
        if read_only:
            argv.append("--read-only")
        device = sh(*argv, image).strip()
        self.devices.append(device)
        return device

    def mount(self, source: str, target: Path, option: str = "", fstype: str = "") -> None:
        argv = ["mount"] + (["-t", fstype] if fstype else []) + (["-o", option] if option else [])
        sh(*argv, source, target)
        self.mounts.append(target)

    def unmount_all(self) -> None:
        while self.mounts:
            subprocess.run(["umount", str(self.mounts.pop())], check=False)

    def __exit__(self, *_: object) -> None:
        self.unmount_all()
        for device in self.devices:
            subprocess.run(["losetup", "--detach", device], check=False)


FORMS = {"dm": "dm=", "dm-mod": "dm-mod.create="}  # sample-image -grub-format, and the form it writes
GRUB_FORMATS = tuple(FORMS)


def compare(work: Path, grub_format: str) -> tuple[bool, Path]:
    """The sealed build, ours and naive, on a sample image with this grub.cfg form; returns (met, sample)."""
    sample = work / f"sample-{grub_format}.raw"
    subprocess.run([sys.executable, "-m", "cos_customizer", "sample-image", str(sample), f"-grub-format={grub_format}"],
                   check=True, capture_output=True)  # fmt: skip
    sealed = [["run-script", "-script=preload.sh"], ["seal-oem"], ["disable-auto-update"]]
    t_ours = ours(work, sample, sealed, ["-oem-size=1G", "-disk-size-gb=12"], work / "ours.tar.gz")
    ours_disk = work / "ours.raw"
    ours(work, sample, sealed, ["-oem-size=1G", "-disk-size-gb=12"], ours_disk)
    alloc_ours = ours_disk.stat().st_blocks * SECTOR
    ours_disk.unlink()
    naive_dir = work / "naive"
    naive_dir.mkdir()
    t_naive, alloc_naive = naive(naive_dir, sample, work / "naive.tar.gz")
    shutil.rmtree(naive_dir)
    gz_ours, gz_naive = ((work / n).stat().st_size for n in ("ours.tar.gz", "naive.tar.gz"))
    for name in ("ours.tar.gz", "naive.tar.gz"):
        (work / name).unlink()
    speed, size = t_naive / t_ours, alloc_naive / alloc_ours
    print(
        f"sealed build, -oem-size=1G -disk-size-gb=12, .tar.gz, grub.cfg {FORMS[grub_format]}; same sample, same run:"
    )
    for name, seconds, alloc, gz in (("ours", t_ours, alloc_ours, gz_ours), ("naive", t_naive, alloc_naive, gz_naive)):
        print(
            f"  {name + ':':<6} {seconds:7.2f} s  disk allocated {alloc / 2**20:8.1f} MiB  tar.gz {gz / 2**20:7.1f} MiB"
        )
    print(f"  ours is {speed:.1f}x faster (target >= {SPEED_TARGET:.0f}x), ", end="")
    print(f"its disk {size:.0f}x smaller (target >= {SIZE_TARGET:.0f}x)", flush=True)
    return speed >= SPEED_TARGET and size >= SIZE_TARGET, sample


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root: both paths use loop devices and mounts")
    with tempfile.TemporaryDirectory(prefix="bench-build.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "context").mkdir()
        (work / "context/preload.sh").write_text(SCRIPT)
        met = [compare(work, grub_format) for grub_format in GRUB_FORMATS]
        sample = met[0][1]
        script = [["run-script", "-script=preload.sh"]]
        t_small = ours(work, sample, script, ["-oem-size=1G", "-disk-size-gb=11"], work / "small.raw")
        (work / "small.raw").unlink()
        t_huge = ours(work, sample, script, ["-oem-size=1024G", "-disk-size-gb=1034"], work / "huge.raw")
        (work / "huge.raw").unlink()
    scale = t_huge / t_small
    print("OEM growth (run-script only, raw output):")
    print(f"  -oem-size=1G    -disk-size-gb=11:   {t_small:6.2f} s")
    print(f"  -oem-size=1024G -disk-size-gb=1034: {t_huge:6.2f} s   ({scale:.2f}x; target <= {SCALE_TARGET:.0f}x)")
    return 0 if all(ok for ok, _ in met) and scale <= SCALE_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
