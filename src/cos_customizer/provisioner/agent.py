"""The provisioner's run: boot disk, steps, stop services, cleanup. Exit 3 means "reboot me".

Order (04-provisioner.md): switch the root to B (copy ROOT-A to ROOT-B,
prioritize KERN-B: reboot), shrink ROOT-A (reboot), wait for the disk to
grow when the workflow resizes it, relocate partitions in a systemd unit at
shutdown, growing the file systems there (reboot); then the steps, stopping services
and the cleanup. Every check looks at the disk itself or at the persisted
state, so a reboot at any point is safe. Standard library only.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from cos_customizer.arch import Arch
from cos_customizer.disk import apply, blockdev, ext, gpt, mover, planner
from cos_customizer.disk.gpt import SECTOR
from cos_customizer.disk.planner import OEM, STATE
from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner import cleanup, download, steps, vmsetup
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from cos_customizer.units import human_size, parse_size

REBOOT = 3
RESIZE_WAIT_SECONDS = 180
WAITING_LINE = "waiting for the boot disk size to change"
LAYOUT_PLAN = "/tmp/cos-customizer-layout.json"
LAYOUT_UNIT = "cos-customizer-disk-layout.service"
# Status lines saying what the disk's data cost (moved, discarded, trimmed): the rehearsal's summary keeps them.
DISK_SPACE = "Disk space:"
SERVICES_TO_STOP = (
    "crash-reporter.service",
    "crash-sender.service",
    "device_policy_manager.service",
    "metrics-daemon.service",
    "update-engine.service",
    "systemd-random-seed.service",
    "systemd-journald-audit.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald.socket",
    "systemd-journald.service",
)
Say = Callable[[str], None]


class RebootRequired(Exception):
    """The disk changed in a way the running system must reboot to see."""


def status_port(machine: Arch | None = None) -> str:
    """Serial port 3, where the build's status lines go: /dev/ttyS2 on x86-64, the third PL011 /dev/ttyAMA2
    on arm64 (the startup script picks the same by `uname -m`, as the original's)."""
    return "/dev/ttyAMA2" if (machine or Arch.host()) is Arch.ARM64 else "/dev/ttyS2"


def state_dir(target: Target) -> Path:
    return target.path(f"/{cleanup.STATE_DIR}")


# The boot disk


def switch_root(target: Target, config: ProvisionerConfig, say: Say) -> None:
    table = gpt.read_table(target.disk)
    root_a = table.partition(planner.ROOT_A)
    if root_a.size <= planner.SHRUNK_ROOT or target.booted_partition() == planner.ROOT_B:
        return
    say("Copying ROOT-A to ROOT-B and booting from B")
    root_b = table.partition(planner.ROOT_B)
    mover.copy_range(target.disk, root_a.first * SECTOR, root_b.first * SECTOR, root_a.size * SECTOR)
    gpt.write_table(target.disk, gpt.prioritize(table, planner.KERN_B, max_priority=planner.KERN_B_PRIORITY))
    raise RebootRequired("the root moves to ROOT-B")


def shrink_root_a(target: Target, say: Say) -> None:
    table = gpt.read_table(target.disk)
    root_a = table.partition(planner.ROOT_A)
    if root_a.size <= planner.SHRUNK_ROOT:
        return
    say("Shrinking ROOT-A")
    gpt.write_table(target.disk, table.replace(root_a.moved(root_a.first, planner.SHRUNK_ROOT)))
    raise RebootRequired("ROOT-A was shrunk")


def wait_for_disk_resize(target: Target, state: State, say: Say, seconds: float = RESIZE_WAIT_SECONDS) -> None:
    if not state.config.boot_disk.wait_for_disk_resize or state.disk_resize_done:
        return
    table = gpt.read_table(target.disk)
    if target.disk_size() > table.disk_sectors * SECTOR:
        state.disk_resize_done = True
        state.save()
        return
    start = target.disk_size()
    say(WAITING_LINE)
    deadline = time.monotonic() + seconds
    while target.disk_size() == start:
        if time.monotonic() > deadline:
            raise CustomizerError(f"the boot disk did not grow within {seconds:.0f} seconds")
        time.sleep(1)
    say(f"The boot disk grew to {target.disk_size()} bytes")
    state.disk_resize_done = True
    state.save()


def layout_inputs(target: Target, config: ProvisionerConfig) -> dict[str, object]:
    boot = config.boot_disk
    return {
        "disk": str(target.disk),
        "disk_sectors": target.disk_size() // SECTOR,
        "reclaim_sda3": boot.reclaim_sda3,
        "oem_size": parse_size(boot.oem_size) if boot.oem_size else 0,
        "oem_fs_size_4k": boot.oem_fs_size_4k,
        **({"full_copy": True} if boot.full_copy_relocation else {}),
    }


def plan_from(inputs: dict[str, object]) -> planner.DiskPlan:
    return planner.plan(
        gpt.read_table(Path(str(inputs["disk"]))),
        disk_sectors=int(str(inputs["disk_sectors"])),
        reclaim_sda3=bool(inputs["reclaim_sda3"]),
        oem_size=int(str(inputs["oem_size"])),
        oem_fs_size_4k=int(str(inputs["oem_fs_size_4k"])),
    )


def relocate(target: Target, state: State, say: Say) -> None:
    """Schedule the new layout for shutdown (partitions are mounted now); reboot into it.

    As the original: with neither ReclaimSDA3 nor an OEM size, the partition table is left
    alone (a larger disk is not worth a reboot: COS grows STATE into it on first boot)."""
    boot = state.config.boot_disk
    if not boot.reclaim_sda3 and not boot.oem_size:
        say("ReclaimSDA3 is not set and no OEM size is requested: the partition table stays as it is")
        return
    table = gpt.read_table(target.disk)
    if state.layout is not None:
        done = {str(p.number): [p.first, p.last] for p in table.partitions} == state.layout["after"]
        if not done:
            raise CustomizerError("the partition layout was scheduled but is not in place after the reboot")
        _check_grown(target, table, state.layout.get("fs", {}))
        return
    inputs = layout_inputs(target, state.config)
    plan = plan_from(inputs)
    for warning in plan.warnings:
        say(f"warning: {warning}")
    state.layout = {
        "after": {str(p.number): [p.first, p.last] for p in plan.after.partitions},
        "fs": {str(n): size for n, size in ((OEM, plan.oem_fs_bytes), (STATE, plan.state_fs_bytes)) if size},
    }
    if not plan.changed:
        state.save()
        return
    plan_file = target.path(LAYOUT_PLAN)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(inputs))
    unit = target.path(f"/etc/systemd/system/{LAYOUT_UNIT}")
    unit.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join([*vmsetup.install_handler(target), "handle-disk-layout", f"--plan={LAYOUT_PLAN}"])
    unit.write_text(
        "[Unit]\nDescription=cos-customizer: relocate partitions once file systems are unmounted\n"
        "DefaultDependencies=false\nConflicts=shutdown.target\n"
        "Before=mnt-stateful_partition.mount usr-share-oem.mount\nAfter=tmp.mount\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=true\nExecStart=/bin/true\n"
        f"ExecStop=/bin/bash -c '{command} 2>&1 | sed \"s/^/BuildStatus: /\"'\n"
        f"TimeoutStopSec=600\nStandardOutput=tty\nStandardError=tty\nTTYPath={status_port()}\n"
    )
    state.save()
    target.systemctl_run("daemon-reload")
    target.systemctl_run("start", "--no-block", LAYOUT_UNIT)
    vmsetup.stop_journald(target, say)
    say("Partitions will be relocated at shutdown")
    raise RebootRequired("partitions are relocated at shutdown")


def _check_grown(target: Target, table: gpt.Table, sizes: dict[str, int]) -> None:
    """After the relocation reboot: the shutdown handler also grew the file systems (the table alone is not
    proof: a handler that failed after writing it leaves the old file-system sizes, found only at sealing)."""
    for number, size in sizes.items():
        part = table.partition(int(number))
        fs = ext.info(target.disk, part.first * SECTOR)
        if fs.size != size - size % fs.block_size:  # resize2fs makes whole blocks
            raise CustomizerError(
                f"the partitions were relocated at shutdown but the {part.name} file system is {fs.size} bytes, not "
                f"{size}: the shutdown handler did not finish (its lines precede this boot on serial port 3)"
            )


def handle_disk_layout(plan_file: Path, say: Say) -> None:
    """The shutdown handler: with the file systems unmounted, move the data, write the new table,
    and grow OEM and STATE offline (online growth needs CAP_SYS_RESOURCE and a reread table).
    Only e2fsck and resize2fs run (on loop devices: losetup), as in the Go original: a COS image may lack e2image."""
    inputs = json.loads(plan_file.read_text())
    blockdev.drop_cache(Path(str(inputs["disk"])))  # STATE and OEM were written through their own devices
    plan = plan_from(inputs)
    began = time.monotonic()
    moved = apply.apply(Path(inputs["disk"]), plan, report=say, full_copy=bool(inputs.get("full_copy")))
    seconds = time.monotonic() - began
    copied, discarded = human_size(moved.copied), human_size(moved.zeroed)
    say(f"{DISK_SPACE} the relocation copied {copied} and discarded {discarded} in {seconds:.1f} s")
    say("Partitions relocated")


# Build contexts


def unpack_contexts(target: Target, state: State, say: Say) -> None:
    for name, url in state.config.build_contexts:
        destination = state.directory / name
        if destination.exists():
            continue
        say(f"Unpacking build context {name} from {url}")
        archive = state.directory / f"{name}.tar"
        download.fetch(url, archive)  # gs:// with the VM's service account
        partial = state.directory / f".{name}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(partial)
        partial.rename(destination)
        archive.unlink()


# The run


def execute(target: Target, state: State, say: Say) -> None:
    config = state.config
    if config.boot_disk.reclaim_sda3:
        switch_root(target, config, say)
        shrink_root_a(target, say)
    wait_for_disk_resize(target, state, say)
    relocate(target, state, say)
    unpack_contexts(target, state, say)
    target.systemctl_run("stop", "update-engine.service")
    vmsetup.prepare(target, say)
    order = steps.ordered(config.steps)
    context = steps.Context(target, state, say)
    while state.current_step < len(order):
        index = state.current_step
        step = order[index]
        say(f"Step {index + 1} of {len(order)}: {step.type.value}")
        try:
            steps.RUNNERS[step.type](context, step.args)
        except CustomizerError as err:
            raise CustomizerError(f"step {config.steps.index(step)} ({step.type.value}): {err}") from err
        state.current_step += 1
        state.save()
    say("Stopping services")
    for service in SERVICES_TO_STOP:
        target.systemctl_run("stop", service)
    say("Cleaning up machine state")
    for line in cleanup.clean(target.root):
        say(line)
    # The tmpfs never reaches the image; a process left with its directory there (a script's, a console's login
    # shell) must not fail the build: detached lazily.
    target.unmount(target.path("/root"), lazy=True)
    for line in cleanup.trim(target.root):  # last: nothing writes to STATE after this
        say(f"{DISK_SPACE} {line}")


def start(target: Target, config: ProvisionerConfig) -> State:
    return State.create(state_dir(target), config)


def resume_state(target: Target) -> State:
    return State.load(state_dir(target))


def console_writer(target: Target) -> Callable[[str], None]:
    stream = open(target.console, "a", buffering=1) if target.console else sys.stdout  # noqa: SIM115

    def say(line: str) -> None:
        stream.write(f"BuildStatus: {line}\n")
        stream.flush()

    return say


def finish(target: Target, make_state: Callable[[], State]) -> int:
    """Run to the end or to the next reboot, speaking the serial protocol; returns the exit status."""
    say = console_writer(target)
    try:
        state = make_state()
        execute(target, state, say)
    except RebootRequired as reboot:
        say(f"Reboot required: {reboot}")
        vmsetup.request_reboot(target)
        return REBOOT
    except (CustomizerError, OSError) as err:
        fail(target, str(err))
        return 1
    _final(target, "BuildSucceeded: the image is provisioned")
    return 0


def fail(target: Target, reason: str) -> None:
    console_writer(target)(f"error: {reason}")
    _final(target, f"BuildFailed: {reason}")


def _final(target: Target, line: str) -> None:
    stream = open(target.console, "a") if target.console else sys.stdout  # noqa: SIM115
    stream.write(line + "\n")
    stream.flush()
    os.sync()
