"""One simulated boot of a COS VM for the provisioner tests (run inside a private mount namespace).

GRUB's choice (the kernel partition with the higher priority) picks the root;
the runtime layout of the local executor stands in for systemd's mounts; the
provisioner runs against that tree and the disk image. When it asks for a
reboot with a disk-layout unit started, the shutdown is simulated: every file
system is unmounted, then the unit's handler runs.

Usage: python -m tests.vm_boot SPEC.json   (under unshare --mount --propagation private --fork)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cos_customizer.disk import gpt
from cos_customizer.executors.runtime import Region, StageSpec, layout
from cos_customizer.provisioner.agent import LAYOUT_PLAN, LAYOUT_UNIT
from cos_customizer.provisioner.target import Target


def region(table: gpt.Table, number: int) -> Region:
    part = table.partition(number)
    return Region(part.first * 512, part.size * 512)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    image, work = Path(spec["image"]), Path(spec["workdir"])
    table = gpt.read_table(image)
    booted = 5 if table.partition(4).priority > table.partition(2).priority else 3
    print(f"vm_boot: booting from partition {booted}", flush=True)
    stage = StageSpec(
        str(image), region(table, booted), region(table, 1), region(table, 8), str(work / "boot"), {}, (), ""
    )
    systemctl_log = Path(spec["systemctl_log"])
    plan = None
    with layout(stage) as root:
        target = Target(root=root, disk=image, partition_template="", root_partition=booted,
                        systemctl=(spec["systemctl"],), chroot=True, efi_access="mtools")  # fmt: skip
        target_file = work / "target.json"
        target_file.write_text(json.dumps(target.to_json()))
        command = ["run", f"--config={spec['config']}"] if spec["mode"] == "run" else ["resume"]
        argv = [sys.executable, "-m", "cos_customizer.provisioner", f"--target={target_file}", *command]
        code = subprocess.run(argv, check=False).returncode
        started_unit = systemctl_log.exists() and LAYOUT_UNIT in systemctl_log.read_text()
        plan_file = target.path(LAYOUT_PLAN)
        if code == 3 and started_unit and plan_file.exists():
            plan = plan_file.read_text()
            unit = target.path(f"/etc/systemd/system/{LAYOUT_UNIT}").read_text()
            stop = next(line for line in unit.splitlines() if line.startswith("ExecStop="))
            print(f"vm_boot: at shutdown, {LAYOUT_UNIT} runs {stop}", flush=True)
    if plan is not None:  # shutdown: everything is unmounted; the unit's ExecStop runs
        saved = work / "layout.json"
        saved.write_text(plan)
        handler = [sys.executable, "-m", "cos_customizer.provisioner", "handle-disk-layout", f"--plan={saved}"]
        result = subprocess.run(handler, check=False, capture_output=True, text=True)
        for line in result.stdout.splitlines():
            print(f"BuildStatus: {line}", flush=True)
        if result.returncode != 0:
            print(f"vm_boot: the disk-layout handler failed: {result.stderr}", flush=True)
            return 1
        systemctl_log.write_text("")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
