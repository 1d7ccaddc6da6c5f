"""Benchmark: `build-provisioner` for x86-64 and for arm64 (under emulation), cold and cached.

Run (as root): .venv/bin/python benchmarks/bench_provisioner.py [-skip-cold-root]

Each build runs the CLI with its own empty XDG_CACHE_HOME (nothing cached), then again with the same
one (cached). For arm64 the cold build makes the arm64 Debian build root (debootstrap under
qemu-user-static, pip, staticx from its sources) and then freezes; a third build, with an empty
provisioner cache but the root of the cold build, is what CI pays whenever a .py file changes (the
freeze alone). `-skip-cold-root` takes the root from this machine's own cache instead of making one
(the cold arm64 build is then not measured). The arm64 executables of the freeze and of the cold build
must be the same bytes (reproducible), and each output is checked with `file`.

No stock tool does this; the target is a regression guard for this 2-core machine: cached builds
within 2 s, the arm64 freeze within 10 minutes, the arm64 root within 20 minutes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cos_customizer.arch import Arch
from cos_customizer.provisioner_root import cache_dir

CACHED_TARGET = 2.0
FREEZE_TARGET = 600.0
ROOT_TARGET = 1200.0


def build(cache: Path, output: Path, arch: str) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cos_customizer", "build-provisioner", f"-arch={arch}",
                             f"-output={output}"], env=env, capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.monotonic() - began
    if result.returncode != 0:
        sys.exit(f"build-provisioner -arch={arch} failed:\n{result.stderr[-3000:]}")
    return seconds


def described(path: Path) -> str:
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, chroot, binfmt_misc)")
    skip_cold_root = "-skip-cold-root" in sys.argv[1:]
    missed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-provisioner.") as tmp:
        work = Path(tmp)
        cold = build(work / "x86-cache", work / "x86", "amd64")
        cached = build(work / "x86-cache", work / "x86-again", "amd64")
        print(f"x86-64: cold {cold:.1f}s, cached {cached:.1f}s; {described(work / 'x86')[:60]}...")
        if cached > CACHED_TARGET:
            missed.append(f"the cached x86-64 build took more than {CACHED_TARGET:.0f}s")

        arm_cache = work / "arm-cache"
        if skip_cold_root:
            arm_cache.joinpath("cos-customizer").mkdir(parents=True)
            cache_dir(Arch.ARM64, {**os.environ, "XDG_CACHE_HOME": str(arm_cache)}).symlink_to(
                cache_dir(Arch.ARM64, os.environ)
            )
        else:
            cold = build(arm_cache, work / "arm-cold", "arm64")
            print(f"arm64: cold (the build root, then the freeze) {cold:.1f}s")
            if cold > ROOT_TARGET + FREEZE_TARGET:
                missed.append(f"the cold arm64 build took more than {ROOT_TARGET + FREEZE_TARGET:.0f}s")
        root = cache_dir(Arch.ARM64, {**os.environ, "XDG_CACHE_HOME": str(arm_cache)})
        freeze_cache = work / "arm-freeze-cache"
        freeze_cache.joinpath("cos-customizer").mkdir(parents=True)
        cache_dir(Arch.ARM64, {**os.environ, "XDG_CACHE_HOME": str(freeze_cache)}).symlink_to(root.resolve())
        freeze = build(freeze_cache, work / "arm-freeze", "arm64")
        cached = build(freeze_cache, work / "arm-again", "arm64")
        print(f"arm64: the freeze alone (a source change) {freeze:.1f}s, cached {cached:.1f}s; "
              f"{described(work / 'arm-freeze')[:70]}...")  # fmt: skip
        if "ARM aarch64" not in described(work / "arm-freeze"):
            missed.append("the arm64 build is not an aarch64 executable")
        if not skip_cold_root and sha256(work / "arm-cold") != sha256(work / "arm-freeze"):
            missed.append("two freezes of the same sources in the same root made different bytes")
        if freeze > FREEZE_TARGET:
            missed.append(f"the arm64 freeze took more than {FREEZE_TARGET:.0f}s")
        if cached > CACHED_TARGET:
            missed.append(f"the cached arm64 build took more than {CACHED_TARGET:.0f}s")
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
