"""Benchmark: one GCE build rehearsed with `-executor=qemu`, against the same build with the local executor.

Run (as root): .venv/bin/python benchmarks/bench_rehearsal.py

The build is the README's sealed one (a script writing to /var/lib, STATE and the OEM; seal-oem;
disable-auto-update; -oem-size=1G -disk-size-gb=12; raw output) on `sample-image -bootable`. The
rehearsal boots the guest four times (switch root, shrink ROOT-A, relocation at shutdown, the
steps). Reported: wall time, boots and guest time (QEMU running) as the tool's summary states
them, and the local executor's time for the same build. The target is loose, a regression guard
for this 2-core machine under TCG: the whole rehearsal within 10 minutes. With KVM the boots take a
few seconds each instead of ~20 s, see the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cos_customizer import provisioner_build
from cos_customizer.sample import image as sample_image

TARGET_SECONDS = 600.0
SCRIPT = """set -e
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "sealed in the OEM" > /usr/share/oem/hello
"""
STEPS = [["run-script", "-script=preload.sh"], ["seal-oem"], ["disable-auto-update"]]


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "cos_customizer", *argv], env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv[:1])} failed:\n{result.stderr[-3000:]}")
    return result


def build(work: Path, source: Path, provisioner: Path, executor: str) -> tuple[float, str]:
    work.mkdir()
    (work / "ctx").mkdir()
    (work / "ctx" / "preload.sh").write_text(SCRIPT)
    env = {**os.environ, "COS_CUSTOMIZER_WORKDIR": str(work / "ws"), "COS_CUSTOMIZER_QEMU_ACCEL": "tcg"}
    cli(env, "start-image-build", f"-build-context={work / 'ctx'}", f"-image-file={source}")
    for step in STEPS:
        cli(env, *step)
    extra = [f"-executor={executor}", f"-provisioner-binary={provisioner}"] if executor == "qemu" else []
    began = time.monotonic()
    result = cli(env, "finish-image-build", f"-output={work / 'out.raw'}", "-oem-size=1G", "-disk-size-gb=12",
                 "-timeout=30m", *extra)  # fmt: skip
    return time.monotonic() - began, result.stdout


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, loop devices)")
    with tempfile.TemporaryDirectory(prefix="bench-rehearsal.") as tmp:
        work = Path(tmp)
        began = time.monotonic()
        source = sample_image.build(work / "bootable.raw", bootable=True).path
        print(f"sample-image -bootable: {time.monotonic() - began:.1f}s (the guest root cached after the first)")
        provisioner, _ = provisioner_build.build(work / "provisioner", dict(os.environ))
        local_seconds, _ = build(work / "local", source, provisioner, "local")
        qemu_seconds, summary = build(work / "qemu", source, provisioner, "qemu")
    found = re.search(r"Guest: (\d+) boot\(s\), ([\d.]+)s of guest time \((\w+)\)", summary)
    if found is None:
        sys.exit(f"no guest line in the summary:\n{summary}")
    boots, guest, accel = int(found.group(1)), float(found.group(2)), found.group(3)
    print(f"rehearsal ({accel}): {qemu_seconds:.1f}s wall, {boots} boots, {guest:.1f}s guest time "
          f"({guest / boots:.1f}s a boot)")  # fmt: skip
    print(f"local executor, same build: {local_seconds:.1f}s")
    if qemu_seconds > TARGET_SECONDS:
        print(f"MISSED: the rehearsal took more than {TARGET_SECONDS:.0f}s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
