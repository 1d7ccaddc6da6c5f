"""Benchmark: `cos-customizer boot` of the bootable sample, under TCG, N times; where a boot's time goes.

Run (as root, unless IMAGE is given): .venv/bin/python benchmarks/bench_boot.py [-boots N] [IMAGE]

IMAGE is a bootable image file to boot; without it `sample-image -bootable -with-containers` builds
one (the guest root is cached under ~/.cache/cos-customizer/sample-guest after the first time). It
is booted N times (default 3) by `boot -serial-port=2 -success-match=TestPass -failure-match=TestFail
-status-match=TestStatus -timeout=5m` with a cloud-config whose runcmd says its uptime on the guest's
ttyS1 (serial port 2) and starts a transient unit that waits for the boot to finish
(`systemctl is-system-running --wait`: `systemd-analyze` needs it), then says `systemd-analyze`,
`systemd-analyze blame | head -n 8`, cloud-init.service's start, the kernel's "Run /init" line,
`/proc/uptime` and `TestPass`. $COS_CUSTOMIZER_QEMU_ACCEL is tcg unless set.

Reported, per boot and as min/median/max: the host's wall time to the success match (the line read
from the command's output as it comes), the command's own and whole times; from inside the guest:
QEMU start and the direct kernel load (the wall time to the match minus the guest's uptime then),
kernel (to /init, dmesg), initrd (/init to systemd: the sample's initramfs is busybox, so
systemd-analyze counts it in its "kernel"), userspace, cloud-init's start and runcmd (uptime). There
is no firmware stage: the qemu executor boots the kernel directly (QEMU -kernel), as COS's GRUB would
choose it. Target: every boot passes, with no reboot, hang or failure (`-boots 20` is issue 22's check
that repeated boots under TCG do not hang); the times are for scale.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "cos_customizer"]
ACCEL_ENV = "COS_CUSTOMIZER_QEMU_ACCEL"
STOP_GRACE_SECONDS = 60.0
USER_DATA = """#cloud-config
write_files:
- path: /tmp/bench-runcmd.sh
  permissions: '0644'
  content: |
    echo "TestStatus: runcmd at uptime $(cut -d ' ' -f 1 /proc/uptime)" >/dev/ttyS1
- path: /tmp/bench-report.sh
  permissions: '0644'
  content: |
    exec >/dev/ttyS1 2>&1
    systemctl is-system-running --wait >/dev/null 2>&1
    echo "TestStatus: state $(systemctl is-system-running 2>&1)"
    systemd-analyze 2>&1 | head -n 1 | sed 's/^/TestStatus: analyze: /'
    systemd-analyze blame 2>&1 | head -n 8 | sed 's/^ */TestStatus: blame: /'
    echo "TestStatus: cloud-init started: $(systemctl show -P InactiveExitTimestampMonotonic cloud-init.service)"
    echo "TestStatus: init: $(dmesg | grep -m 1 -E 'Run .* as init process')"
    echo "TestStatus: uptime: $(cat /proc/uptime)"
    echo "TestPass: reported"
runcmd:
- [bash, /tmp/bench-runcmd.sh]
- [systemd-run, --no-block, --unit=bench-report, bash, /tmp/bench-report.sh]
"""
BOOT_FLAGS = ("-serial-port=2", "-success-match=TestPass", "-failure-match=TestFail", "-status-match=TestStatus",
              "-timeout=5m")  # fmt: skip
SPAN = re.compile(r"([\d.]+)(h|min|ms|us|µs|s)\b")
UNIT_SECONDS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
STAGES = (
    ("wall", "host wall to the match"),
    ("load", "QEMU start + kernel load (wall - uptime at the match)"),
    ("kernel", "kernel (to /init, dmesg)"),
    ("initrd", "initrd (/init to systemd)"),
    ("userspace", "userspace (systemd to the boot's end)"),
    ("finished", "boot finished (uptime)"),
    ("cloud-init", "cloud-init.service started (uptime)"),
    ("runcmd", "runcmd ran (uptime)"),
    ("match", "the match (uptime)"),
    ("command", "the command, cleanup included"),
)


def timespan(text: str) -> float:
    """Seconds of a systemd time span such as `1min 3.402s` or `345ms`."""
    return sum(float(number) * UNIT_SECONDS[unit] for number, unit in SPAN.findall(text))


@dataclass(frozen=True)
class Boot:
    code: int
    error: str
    boots: int
    accel: str
    own: float
    stages: dict[str, float]
    blame: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.code == 0 and self.boots == 1


def parse(code: int, lines: list[tuple[float, str]], command: float) -> Boot:
    """A boot from the command's exit code and output lines (seconds since its start, text)."""
    stages: dict[str, float] = {"command": command}
    blame: dict[str, float] = {}
    error, boots, accel, own = "", 0, "", 0.0
    for at, line in lines:
        text = line.strip()
        if text.startswith("cos-customizer:") and "error" in text:
            error = text
        elif text.startswith("TestPass") and "wall" not in stages:
            stages["wall"] = at
        elif text.startswith("TestStatus: runcmd at uptime "):
            stages["runcmd"] = float(text.rsplit(" ", 1)[1])
        elif text.startswith("TestStatus: analyze: Startup finished in "):
            for span, name in re.findall(r"([\d.][^+=(]*)\((\w+)\)", text):
                stages[f"analyze_{name}"] = timespan(span)
            stages["finished"] = timespan(text.rsplit("=", 1)[1])
        elif text.startswith("TestStatus: blame: "):
            span, _, unit = text.removeprefix("TestStatus: blame: ").rpartition(" ")
            blame[unit] = timespan(span)
        elif text.startswith("TestStatus: cloud-init started: ") and text.rsplit(" ", 1)[1].isdigit():
            stages["cloud-init"] = int(text.rsplit(" ", 1)[1]) / 1e6
        elif found := re.search(r"TestStatus: init: \[\s*([\d.]+)\]", text):
            stages["to_init"] = float(found.group(1))
        elif text.startswith("TestStatus: uptime: "):
            stages["match"] = float(text.split()[2])
        elif found := re.search(r"the guest passed \((\d+) boot\(s\) under (\w+), ([\d.]+) s\)", text):
            boots, accel, own = int(found.group(1)), found.group(2), float(found.group(3))
        elif found := re.search(r"^boot (\d+) \((\w+)\)|; boot (\d+): ", text):
            boots = max(boots, int(found.group(1) or found.group(3)))
            accel = found.group(2) or accel
    if "wall" in stages and "match" in stages:
        stages["load"] = stages["wall"] - stages["match"]
    if "analyze_kernel" in stages:
        # With a systemd initramfs systemd-analyze says (initrd) itself; the sample's is busybox, so its
        # "kernel" runs to systemd's start and the kernel's own part ends at "Run /init".
        if "analyze_initrd" in stages:
            stages["kernel"], stages["initrd"] = stages["analyze_kernel"], stages["analyze_initrd"]
        elif "to_init" in stages:
            stages["kernel"], stages["initrd"] = stages["to_init"], stages["analyze_kernel"] - stages["to_init"]
        else:
            stages["kernel"] = stages["analyze_kernel"]
    if "analyze_userspace" in stages:
        stages["userspace"] = stages["analyze_userspace"]
    if code != 0 and not error:
        error = next((t for _, t in reversed(lines) if t.strip()), "(no output)").strip()
    return Boot(code, error, boots, accel, own, stages, blame)


def boot_once(image: Path, user_data: Path, env: dict[str, str]) -> Boot:
    """One `boot` of `image`, its output read as it comes; the command is stopped if this one is cut short."""
    lines: list[tuple[float, str]] = []
    began = time.monotonic()
    proc = subprocess.Popen([*CLI, "boot", f"-image-file={image}", f"-user-data={user_data}", *BOOT_FLAGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - began, line))
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: SIGTERM makes `boot` stop QEMU and clean up
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return parse(code, lines, time.monotonic() - began)


def shown(boot: Boot, key: str) -> str:
    return f"{boot.stages[key]:.1f}" if key in boot.stages else "-"


def describe(index: int, boot: Boot) -> str:
    if boot.passed:
        head = f"boot {index}: passed ({boot.accel}, its own {boot.own:.1f} s)"
    elif boot.code == 0:
        head = f"boot {index}: passed, but in {boot.boots} boots (a reboot)"
    else:
        head = f"boot {index}: FAILED (exit {boot.code}): {boot.error}"
    parts = ", ".join(f"{key} {shown(boot, key)}" for key, _ in STAGES)
    return f"{head}\n  {parts}"


def report(runs: list[Boot]) -> None:
    passed = [run for run in runs if run.passed]
    print(f"{len(runs)} boot(s), {len(passed)} passed" + ("; seconds over the boots that passed:" if passed else ""))
    if passed:
        print(f"  {'':<56} {'min':>7} {'median':>7} {'max':>7}")
    for key, title in STAGES:
        values = [run.stages[key] for run in passed if key in run.stages]
        if values:
            print(f"  {title:<56} {min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}")
    units: dict[str, list[float]] = {}
    for run in passed:
        for unit, seconds in run.blame.items():
            units.setdefault(unit, []).append(seconds)
    slowest = sorted(units.items(), key=lambda item: -statistics.median(item[1]))[:8]
    if slowest:
        print("  slowest units (systemd-analyze blame; median, in how many boots' top 8):")
        for unit, values in slowest:
            print(f"    {statistics.median(values):7.1f} {unit} ({len(values)}/{len(passed)})")
    print("  no firmware stage: the qemu executor boots the kernel directly (QEMU -kernel), as COS's GRUB would "
          "choose it; the match comes after the boot finished (systemd-analyze needs it)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-boots", "--boots", type=int, default=3, help="boots of the image (default 3)")
    parser.add_argument("image", nargs="?", type=Path, help="a bootable image file (default: build the sample)")
    args = parser.parse_args()
    if args.boots < 1:
        parser.error("-boots must be at least 1")
    if args.image is None and os.geteuid() != 0:
        sys.exit("run as root (sample-image: debootstrap, loop devices), or give a bootable image file")
    env = {**os.environ, ACCEL_ENV: os.environ.get(ACCEL_ENV, "tcg"), "PYTHONUNBUFFERED": "1"}
    runs: list[Boot] = []
    with tempfile.TemporaryDirectory(prefix="bench-boot.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        image = args.image.resolve() if args.image is not None else work / "bootable.raw"
        if args.image is None:
            began = time.monotonic()
            result = subprocess.run([*CLI, "sample-image", "-bootable", "-with-containers", str(image)], env=env,
                                    capture_output=True, text=True, check=False)  # fmt: skip
            if result.returncode != 0:
                sys.exit(f"sample-image failed:\n{result.stderr[-3000:]}")
            print(f"sample-image -bootable -with-containers: {time.monotonic() - began:.1f}s "
                  "(the guest root cached after the first)", flush=True)  # fmt: skip
        user_data = work / "user-data.yaml"
        user_data.write_text(USER_DATA)
        for index in range(1, args.boots + 1):
            runs.append(boot_once(image, user_data, env))
            print(describe(index, runs[-1]), flush=True)
    report(runs)
    bad = [index for index, run in enumerate(runs, 1) if not run.passed]
    hung = [index for index in bad if re.search(r"made no progress|within -timeout", runs[index - 1].error)]
    if bad:
        print(f"MISSED: boot(s) {', '.join(map(str, bad))} did not pass"
              + (f" (hung: {', '.join(map(str, hung))})" if hung else ""))  # fmt: skip
        return 1
    print("no boot hung, failed or rebooted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
