"""Benchmark: what emulation costs a local build of an arm64 image on this x86-64 machine.

Run (as root): .venv/bin/python benchmarks/bench_arm64_build.py [-repeat N]

The same build, N times each, on `sample-image` (this machine's amd64 programs) and on
`sample-image -arch=arm64` (Debian's arm64 programs, run by qemu-aarch64-static through binfmt_misc):
a script that writes to /var/lib, STATE and the OEM and hashes 64 MiB with the image's own sha256sum;
seal-oem; disable-auto-update; -oem-size=1G -disk-size-gb=12; raw output. Then the same pair with
`-with-containers` samples and a script that starts the image's own containerd and dockerd (`docker
info`): the emulated daemons' start. Prints each build's wall time (start, run-script, finish) and the
ratio. Target: the arm64 build (no containers) within 5x the amd64 one, as emulation costs only the
scripts' own CPU time, not the disk work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 5.0
SCRIPT = """set -e
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "sealed in the OEM" > /usr/share/oem/hello
head -c 67108864 /dev/zero | sha256sum > /var/lib/sum
"""
CONTAINERS = "set -e\ndocker info --format '{{.Architecture}}' > /var/lib/arch\n"


def cc(env: dict[str, str], *argv: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cos_customizer", *map(str, argv)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"cos-customizer {argv[0]} failed: {result.stderr.strip()[-2000:]}")


def build(work: Path, source: Path, script: str, finish: list[str]) -> float:
    context = work / "context"
    context.mkdir(parents=True)
    (context / "s.sh").write_text(script)
    env = {**os.environ, "COS_CUSTOMIZER_WORKDIR": str(work / "ws")}
    began = time.monotonic()
    cc(env, "start-image-build", f"-build-context={context}", f"-image-file={source}")
    cc(env, "run-script", "-script=s.sh")
    cc(env, "seal-oem")
    cc(env, "disable-auto-update")
    cc(env, "finish-image-build", f"-output={work / 'out.raw'}", "-oem-size=1G", "-disk-size-gb=12", *finish)
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run it as root (loop devices, mounts, namespaces, binfmt_misc)")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-arm64.") as tmp:
        base = Path(tmp)
        for arch in ("amd64", "arm64"):
            for containers in (False, True):
                sample = base / f"{arch}-{containers}.raw"
                began = time.monotonic()
                cc(dict(os.environ), "sample-image", f"-arch={arch}", *(["-with-containers"] if containers else []),
                   sample)  # fmt: skip
                print(f"sample-image -arch={arch}{' -with-containers' if containers else ''}: "
                      f"{time.monotonic() - began:.1f} s")  # fmt: skip
                key = f"{arch}{' + containers' if containers else ''}"
                for run in range(args.repeat):
                    work = base / f"{key.replace(' ', '')}-{run}"
                    script, finish = (CONTAINERS, ["-containers=on"]) if containers else (SCRIPT, [])
                    times.setdefault(key, []).append(build(work, sample, script, finish))
    for key, values in times.items():
        print(f"{key:>20}: median {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(times["arm64"]) / statistics.median(times["amd64"])
    with_containers = statistics.median(times["arm64 + containers"]) / statistics.median(times["amd64 + containers"])
    print(f"arm64 / amd64: {ratio:.2f}x (target <= {TARGET}x); with the daemons started: {with_containers:.2f}x")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
