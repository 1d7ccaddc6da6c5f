"""One boot of a COS VM for the provisioner tests, with the shipped provisioner (run in a private mount namespace).

GRUB's choice (the kernel partition with the higher priority) picks the root;
the runtime layout of the local executor stands in for systemd's mounts
(its /tmp is a noexec tmpfs, as on COS). The shipped static provisioner runs
against that tree and the disk image, started as the startup script starts it
(its loaders unpack into the startup script's TMPDIR); an exit 3 counts as a
reboot request only with the provisioner's reboot marker, as in the startup
script. When a disk-layout unit was started, the shutdown is simulated: every
file system but /tmp is unmounted, then the unit's ExecStop line is executed
as written, chrooted into a root whose /tmp is the VM's /tmp (where the
provisioner copied itself) and whose tools are this machine's.

Usage: python -m tests.vm_boot SPEC.json   (under unshare --mount --propagation private --fork)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from cos_customizer.disk import gpt, loop
from cos_customizer.executors.local.runtime import Region, StageSpec, layout
from cos_customizer.executors.startup import LOADER_SETUP
from cos_customizer.provisioner.agent import LAYOUT_UNIT
from cos_customizer.provisioner.target import Target
from cos_customizer.provisioner.vmsetup import JOURNALD_OVERRIDE, REBOOT_MARKER

# What the "VM" gives the provisioner in its environment; scripts must see exactly this, not the loaders' values.
VM_ENV = {"LD_LIBRARY_PATH": "/vm/lib", "VM_MARKER": "from-the-vm"}


def region(table: gpt.Table, number: int) -> Region:
    part = table.partition(number)
    return Region(part.first * 512, part.size * 512)


def shutdown(work: Path, kept_tmp: Path, image: Path, exec_stop: str) -> int:
    """Run the unit's ExecStop as written, in a root holding the VM's /tmp, with the file systems unmounted."""
    root = work / "shutdown"
    root.mkdir()
    with ExitStack() as stack:
        stack.enter_context(loop.mounted("tmpfs", root, fstype="tmpfs"))
        (root / "usr").mkdir()
        stack.enter_context(loop.mounted("/usr", root / "usr", options=("bind", "ro")))
        for name in ("bin", "sbin", "lib", "lib64"):
            (root / name).symlink_to(os.readlink(f"/{name}"))
        for name in ("proc", "dev", "tmp"):
            (root / name).mkdir()
        stack.enter_context(loop.mounted("proc", root / "proc", fstype="proc"))
        stack.enter_context(loop.mounted("/dev", root / "dev", options=("rbind",)))
        subprocess.run(["mount", "--move", str(kept_tmp), str(root / "tmp")], check=True)
        disk = root / str(image).lstrip("/")  # the disk at the path the plan names
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.touch()
        stack.enter_context(loop.mounted(str(image), disk, options=("bind",)))
        argv = shlex.split(exec_stop)
        print(f"vm_boot: at shutdown, {LAYOUT_UNIT} runs {argv}", flush=True)
        return subprocess.run(["chroot", str(root), *argv], check=False, env={"PATH": "/usr/sbin:/usr/bin"}).returncode


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    image, work = Path(spec["image"]), Path(spec["workdir"])
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt"], check=True)  # this namespace's /mnt/disks
    table = gpt.read_table(image)
    booted = 5 if table.partition(4).priority > table.partition(2).priority else 3
    print(f"vm_boot: booting from partition {booted}", flush=True)
    stage = StageSpec(
        str(image), region(table, booted), region(table, 1), region(table, 8), str(work / "boot"), {}, (), ""
    )
    systemctl_log = Path(spec["systemctl_log"])
    exec_stop = None
    kept_tmp = work / "kept-tmp"
    kept_tmp.mkdir()
    with layout(stage) as root:
        for name in ("dev", "sys"):  # a VM has its own; the local executor's stage gives scripts private ones
            subprocess.run(["mount", "--rbind", f"/{name}", str(root / name)], check=True)
        target = Target(root=root, disk=image, partition_template="", root_partition=booted,
                        systemctl=(spec["systemctl"],), chroot=True, efi_access="mtools")  # fmt: skip
        target_file = work / "target.json"
        target_file.write_text(json.dumps(target.to_json()))
        command = ["run", f"--config={spec['config']}"] if spec["mode"] == "run" else ["resume"]
        provisioner = shlex.join([spec["provisioner"], f"--target={target_file}", *command])
        env = {**os.environ, **VM_ENV}
        env.pop("TMPDIR", None)
        code = subprocess.run(["bash", "-c", f"{LOADER_SETUP}\nexec {provisioner}"], env=env, check=False).returncode
        if code == 3 and not target.path(REBOOT_MARKER).exists():
            print("vm_boot: exit 3 without a reboot request: the provisioner did not start", flush=True)
            return 1
        override = target.path(JOURNALD_OVERRIDE)
        if override.exists():
            print(f"vm_boot: {JOURNALD_OVERRIDE}: {override.read_text()!r}", flush=True)
        started_unit = systemctl_log.exists() and LAYOUT_UNIT in systemctl_log.read_text()
        if code == 3 and started_unit:
            unit = target.path(f"/etc/systemd/system/{LAYOUT_UNIT}").read_text()
            exec_stop = next(line for line in unit.splitlines() if line.startswith("ExecStop="))[len("ExecStop=") :]
            subprocess.run(["mount", "--bind", str(root / "tmp"), str(kept_tmp)], check=True)
    if exec_stop is not None:  # shutdown: the file systems are unmounted; the unit's ExecStop runs
        if shutdown(work, kept_tmp, image, exec_stop) != 0:
            print("vm_boot: the disk-layout unit's ExecStop failed", flush=True)
            return 1
        systemctl_log.write_text("")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
