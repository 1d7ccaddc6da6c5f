"""Benchmark: one GCE build rehearsed with `-executor=qemu`, against the same build with the local executor.

Run (as root): .venv/bin/python benchmarks/bench_rehearsal.py

The build is the README's sealed one (a script writing to /var/lib, STATE and the OEM; seal-oem;
disable-auto-update; -oem-size=1G -disk-size-gb=12; raw output) on `sample-image -bootable`. The
rehearsal boots the guest four times (switch root, shrink ROOT-A, relocation at shutdown, the
steps). It runs twice in one run: as shipped (the relocation moves what the file systems use and
discards the rest, issue 24) and with the private `_FullCopyRelocation` switch set in the
workspace's provisioner config (the whole partitions copied, as the original's `sfdisk
--move-data`). Reported for each: wall time, boots and guest time as the tool's summary states
them, what the relocation copied and discarded and its time (the provisioner's `Disk space:`
line), and the output's allocated bytes; and the local executor's time and allocated bytes for the
same build. The target is loose, a regression guard for this 2-core machine under TCG: the
shipped rehearsal within 10 minutes. With KVM the boots take a few seconds each instead of ~20 s,
see the README.
"""

from __future__ import annotations

import json
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
from cos_customizer.workspace import PROVISIONER

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


def build(
    work: Path, source: Path, provisioner: Path, executor: str, full_copy: bool = False
) -> tuple[float, str, int]:
    """(seconds of finish-image-build, its summary, the output's allocated bytes)."""
    work.mkdir()
    (work / "ctx").mkdir()
    (work / "ctx" / "preload.sh").write_text(SCRIPT)
    env = {**os.environ, "COS_CUSTOMIZER_WORKDIR": str(work / "ws"), "COS_CUSTOMIZER_QEMU_ACCEL": "tcg"}
    cli(env, "start-image-build", f"-build-context={work / 'ctx'}", f"-image-file={source}")
    for step in STEPS:
        cli(env, *step)
    if full_copy:  # the private switch: the provisioner config's BootDisk carries it to the shutdown handler
        (config_file,) = (work / "ws").rglob(PROVISIONER)
        config = json.loads(config_file.read_text())
        config["BootDisk"]["_FullCopyRelocation"] = True
        config_file.write_text(json.dumps(config))
    extra = [f"-executor={executor}", f"-provisioner-binary={provisioner}"] if executor == "qemu" else []
    began = time.monotonic()
    result = cli(env, "finish-image-build", f"-output={work / 'out.raw'}", "-oem-size=1G", "-disk-size-gb=12",
                 "-timeout=30m", *extra)  # fmt: skip
    return time.monotonic() - began, result.stdout, (work / "out.raw").stat().st_blocks * 512


def rehearsal_line(name: str, seconds: float, summary: str, allocated: int) -> str:
    found = re.search(r"Guest: (\d+) boot\(s\), ([\d.]+)s of guest time \((\w+)\)", summary)
    moved = re.search(r"^Disk space: the relocation (.*)$", summary, re.M)
    if found is None or moved is None:
        sys.exit(f"{name}: no guest or relocation line in the summary:\n{summary}")
    boots, guest, accel = int(found.group(1)), float(found.group(2)), found.group(3)
    return (f"{name} ({accel}): {seconds:.1f}s wall, {boots} boots, {guest:.1f}s guest time; the relocation "
            f"{moved.group(1)}; output allocated {allocated / 2**20:.1f} MiB")  # fmt: skip


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, loop devices)")
    with tempfile.TemporaryDirectory(prefix="bench-rehearsal.") as tmp:
        work = Path(tmp)
        began = time.monotonic()
        source = sample_image.build(work / "bootable.raw", bootable=True).path
        print(f"sample-image -bootable: {time.monotonic() - began:.1f}s (the guest root cached after the first)")
        provisioner, _ = provisioner_build.build(work / "provisioner", dict(os.environ))
        local_seconds, _, local_allocated = build(work / "local", source, provisioner, "local")
        qemu_seconds, summary, allocated = build(work / "qemu", source, provisioner, "qemu")
        full_seconds, full_summary, full_allocated = build(work / "full", source, provisioner, "qemu", full_copy=True)
    print(rehearsal_line("rehearsal, used blocks (shipped)", qemu_seconds, summary, allocated))
    print(rehearsal_line("rehearsal, whole partitions (before)", full_seconds, full_summary, full_allocated))
    print(f"local executor, same build: {local_seconds:.1f}s, output allocated {local_allocated / 2**20:.1f} MiB")
    if qemu_seconds > TARGET_SECONDS:
        print(f"MISSED: the rehearsal took more than {TARGET_SECONDS:.0f}s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
