"""The boot plan of a GCE-like QEMU instance: GRUB's kernel choice, QEMU's argv, and QEMU accepting it."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cos_customizer.disk import gpt, grub
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu.boot import BootChoice, BootError, InstanceSpec, Qmp, choose_kernel, qemu_argv
from cos_customizer.sample import image as sample_image
from tests.conftest import SAMPLE_FIXTURES

# dims/cos-tools src/cmd/cos_image_analyzer/internal/testdata/image1/efi/efi/boot/grub.cfg, verbatim: a real COS
# grub.cfg (its long runs of spaces included).
REAL_GRUB_CFG = """\
defaultA=2
defaultB=3
gptpriority $grubdisk 2 prioA
gptpriority $grubdisk 4 prioB

if [ $prioA -lt $prioB ]; then
  set default=$defaultB
else
  set default=$defaultA
fi

set timeout=0

# NOTE: These magic grub variables are a Chrome OS hack. They are not portable.

menuentry "local image A" {
  linux /syslinux/vmlinuz.A init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  i915.modeset=1 cros_efi       root=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E
}

menuentry "local image B" {
  linux /syslinux/vmlinuz.B init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  i915.modeset=1 cros_efi       root=PARTUUID=BA6C8ED3-DD99-F046-BF74-3E2CF0F06234
}

menuentry "verified image A" {
  linux /syslinux/vmlinuz.A init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  dm_verity.error_behavior=3 dm_verity.max_bios=-1 dm_verity.dev_wait=1       i915.modeset=1 cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 2539520 verity payload=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashtree=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashstart=2539520 alg=sha256 root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"
}

menuentry "verified image B" {
  linux /syslinux/vmlinuz.B init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  dm_verity.error_behavior=3 dm_verity.max_bios=-1 dm_verity.dev_wait=1       i915.modeset=1 cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 2539520 verity payload=PARTUUID=BA6C8ED3-DD99-F046-BF74-3E2CF0F06234 hashtree=PARTUUID=BA6C8ED3-DD99-F046-BF74-3E2CF0F06234 hashstart=2539520 alg=sha256 root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"
}

# FIXME: usb doesn't support verified boot for now
menuentry "Alternate USB Boot" {
  linux (hd0,3)/boot/vmlinuz init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  root=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E i915.modeset=1 cros_efi
}
"""

# The command lines of its entries, copied by hand from that file (the oracle: the rest of each `linux` line).
REAL_VERIFIED_A = 'init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  dm_verity.error_behavior=3 dm_verity.max_bios=-1 dm_verity.dev_wait=1       i915.modeset=1 cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 2539520 verity payload=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashtree=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashstart=2539520 alg=sha256 root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"'
REAL_VERIFIED_B = 'init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  dm_verity.error_behavior=3 dm_verity.max_bios=-1 dm_verity.dev_wait=1       i915.modeset=1 cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 2539520 verity payload=PARTUUID=BA6C8ED3-DD99-F046-BF74-3E2CF0F06234 hashtree=PARTUUID=BA6C8ED3-DD99-F046-BF74-3E2CF0F06234 hashstart=2539520 alg=sha256 root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"'
REAL_LOCAL_A = "init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  i915.modeset=1 cros_efi       root=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E"


def cos_table(prio_a: int, prio_b: int) -> gpt.Table:
    """The 10 GiB COS table with the given KERN-A (2) and KERN-B (4) priorities."""
    table = gpt.new_table(10 * 2097152, sample_image.partitions(10 * 2097152))
    return with_priorities(table, prio_a, prio_b)


def with_priorities(table: gpt.Table, prio_a: int, prio_b: int) -> gpt.Table:
    return table.replace(
        table.partition(2).with_chromeos(priority=prio_a), table.partition(4).with_chromeos(priority=prio_b)
    )


PRIORITIES = [pytest.param(2, 1, "A", id="A>B"), pytest.param(1, 2, "B", id="B>A"), pytest.param(1, 1, "A", id="A=B")]


@pytest.mark.parametrize(("prio_a", "prio_b", "side"), PRIORITIES)
def test_real_grub_cfg_boots_the_verified_entry_of_the_higher_kernel(prio_a: int, prio_b: int, side: str) -> None:
    choice = choose_kernel(cos_table(prio_a, prio_b), REAL_GRUB_CFG)
    cmdline = {"A": REAL_VERIFIED_A, "B": REAL_VERIFIED_B}[side]
    index = {"A": 2, "B": 3}[side]
    assert choice == BootChoice(index, f"verified image {side}", f"/syslinux/vmlinuz.{side}", cmdline)
    assert choice.append == f"BOOT_IMAGE=/syslinux/vmlinuz.{side} {cmdline}"
    assert '  i915.modeset=1 cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 2539520 verity' in choice.cmdline


def test_default_indices_come_from_the_file() -> None:
    cfg = REAL_GRUB_CFG.replace("defaultA=2", "defaultA=0").replace("defaultB=3", "defaultB=4")
    assert choose_kernel(cos_table(2, 1), cfg) == BootChoice(0, "local image A", "/syslinux/vmlinuz.A", REAL_LOCAL_A)
    usb = choose_kernel(cos_table(1, 2), cfg)
    assert (usb.title, usb.kernel) == ("Alternate USB Boot", "(hd0,3)/boot/vmlinuz")
    # The partitions compared come from the file too: compare KERN-C (6) instead of KERN-B.
    swapped = REAL_GRUB_CFG.replace("gptpriority $grubdisk 4 prioB", "gptpriority $grubdisk 6 prioB")
    table = cos_table(1, 9)
    assert choose_kernel(table, swapped).title == "verified image A"
    table = table.replace(table.partition(6).with_chromeos(priority=5))
    assert choose_kernel(table, swapped).title == "verified image B"


def test_default_by_title_initrd_and_nested_if() -> None:
    cfg = """\
gptpriority $grubdisk 2 a
gptpriority $grubdisk 4 b
if [ $a -gt 3 ]; then
  if [ $b -eq 0 ]; then
    set default="never"
  fi
else
  set default=two
  if [ $b -ge 1 ]; then
    menuentry 'two' {
      linux /k2 console=ttyS0 x="a b"
      initrd /i2
    }
  fi
fi
menuentry "one" {
  insmod gzio
  linux /k1
}
"""
    assert choose_kernel(cos_table(1, 1), cfg) == BootChoice(0, "two", "/k2", 'console=ttyS0 x="a b"', "/i2")
    assert choose_kernel(cos_table(5, 1), cfg) == BootChoice(0, "one", "/k1", "")  # no default: entry 0
    with pytest.raises(BootError, match="default='never' names no menu entry"):
        choose_kernel(cos_table(5, 0), cfg)
    with pytest.raises(BootError, match="default='two' names no menu entry"):
        choose_kernel(cos_table(1, 0), cfg)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ("set default=0\n", "no menuentry"),
        ('set default=5\nmenuentry "a" {\n linux /k\n}\n', "only 1 menu entries"),
        ('menuentry "a" {\n echo\n}\n', "has no linux line"),
        ("if [ 1 -lt 2 ]; then\n", "ends inside"),
        ("fi\n", "'fi' without 'if'"),
        ("if [ x -lt 2 ]; then\nfi\n", "not a number"),
        ("if [ 1 -xx 2 ]; then\nfi\n", "-xx"),
        ("if true; then\nfi\n", "condition this reader does not know"),
        ("gptpriority $grubdisk B x\n", "gptpriority DISK PARTITION VARIABLE"),
    ],
)
def test_what_cannot_be_followed_is_refused(cfg: str, message: str) -> None:
    with pytest.raises(BootError, match=re.escape(message)):
        choose_kernel(cos_table(1, 0), cfg)


def test_a_missing_partition_is_named() -> None:
    with pytest.raises(gpt.GptError, match="partition 4 does not exist"):
        choose_kernel(gpt.Table(uuid.uuid4(), 100, ()), "gptpriority $grubdisk 4 prioB\n")


@pytest.mark.parametrize("grub_format", ["dm", "dm-mod"])
@pytest.mark.parametrize(("prio_a", "prio_b", "side"), PRIORITIES)
def test_sample_image_grub_cfg(
    request: pytest.FixtureRequest, grub_format: str, prio_a: int, prio_b: int, side: str
) -> None:
    image: Path = request.getfixturevalue(SAMPLE_FIXTURES[grub_format])
    table = gpt.read_table(image)
    cfg = grub.read_grub_cfg(image, table.partition(12).first * gpt.SECTOR)
    assert choose_kernel(table, cfg).title == "verified image A"  # as written: KERN-A 1, KERN-B 0
    choice = choose_kernel(with_priorities(table, prio_a, prio_b), cfg)
    # Oracle: the file's own verified line for that side, minus `linux KERNEL `.
    kernel = f"/syslinux/vmlinuz.{side}"
    line = next(s.strip() for s in cfg.splitlines() if f"linux {kernel} " in s and "root=/dev/dm-0" in s)
    assert choice == BootChoice({"A": 2, "B": 3}[side], f"verified image {side}", kernel, line.split(" ", 2)[2])
    root = table.partition(3 if side == "A" else 5)
    verity = 'dm="1 vroot none ro 1,0 ' if grub_format == "dm" else 'dm-mod.create="vroot,,,ro,0 '
    assert verity in choice.cmdline
    assert f"PARTUUID={str(root.guid).upper()}" in choice.cmdline
    assert choice.cmdline.endswith('"')


# ---------------------------------------------------------------------------------------------------------------
# QEMU's command line


def test_qemu_argv_of_a_gce_like_instance() -> None:
    spec = InstanceSpec(
        disks=(Path("/w/boot.raw"), Path("/w/cidata.raw"), Path("/w/scratch,1.raw")),
        serial_port3=Path("/w/port3.log"),
        qmp_socket=Path("/w/qmp.sock"),
        metadata_socket=Path("/w/md.x/http.sock"),
        console=Path("/w/console.log"),
        kernel=Path("/w/vmlinuz.A"),
        initrd=Path("/w/initrd.A"),
        append='BOOT_IMAGE=/syslinux/vmlinuz.A root=/dev/dm-0 dm="1 vroot none ro 1,0 8 verity"',
        memory_mb=2048,
        cpus=2,
        accel="tcg",
    )
    assert qemu_argv(spec) == [
        "qemu-system-x86_64",
        "-name", "cos-customizer,debug-threads=on",  # QEMU's threads named ("CPU 0/TCG"), for a hung guest's report
        "-machine", "q35",
        "-accel", "tcg",
        "-m", "2048",
        "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", "if=none,id=d0,file=/w/boot.raw,format=raw,discard=unmap,detect-zeroes=unmap",
        "-device", "scsi-hd,drive=d0,bus=scsi0.0,scsi-id=0,lun=0",
        "-drive", "if=none,id=d1,file=/w/cidata.raw,format=raw,discard=unmap,detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=d1",
        "-drive", "if=none,id=d2,file=/w/scratch,,1.raw,format=raw,discard=unmap,detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=d2",
        "-kernel", "/w/vmlinuz.A",
        "-initrd", "/w/initrd.A",
        "-append", 'BOOT_IMAGE=/syslinux/vmlinuz.A root=/dev/dm-0 dm="1 vroot none ro 1,0 8 verity"',
        "-chardev", "file,id=serial1,path=/w/console.log", "-serial", "chardev:serial1",
        "-chardev", "null,id=serial2", "-serial", "chardev:serial2",
        "-chardev", "file,id=serial3,path=/w/port3.log", "-serial", "chardev:serial3",
        "-chardev", "null,id=serial4", "-serial", "chardev:serial4",
        "-netdev", "user,id=n0,net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-cmd:socat - UNIX-CONNECT:/w/md.x/http.sock",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
        "-smbios", "type=1,manufacturer=Google,product=Google Compute Engine",
        "-chardev", "socket,id=qmp,path=/w/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-no-reboot",
    ]  # fmt: skip


def test_qemu_argv_choices() -> None:
    base = InstanceSpec(disks=(Path("b"),), serial_port3=Path("p3"), qmp_socket=Path("q"), metadata_socket=Path("m"))
    argv = qemu_argv(base)
    assert "-kernel" not in argv and "-append" not in argv and "-cpu" not in argv
    assert argv[argv.index("-chardev") + 1] == "null,id=serial1"
    assert "-no-reboot" not in qemu_argv(dataclasses.replace(base, no_reboot=False))
    # QEMU's chardev syntax (qemu-options: `-chardev file,...,append=on`; a second `-mon ...,mode=control`).
    more = qemu_argv(dataclasses.replace(base, serial_append=True, events_socket=Path("e")))
    assert "file,id=serial3,path=p3,append=on" in more
    assert more[-5:-1] == [
        "-chardev",
        "socket,id=events,path=e,server=on,wait=off",
        "-mon",
        "chardev=events,mode=control",
    ]
    kvm = qemu_argv(dataclasses.replace(base, accel="kvm"))
    assert kvm[:9] == ["qemu-system-x86_64", "-name", "cos-customizer,debug-threads=on", "-machine", "q35", "-accel",
                       "kvm", "-cpu", "host"]  # fmt: skip
    bad: list[tuple[dict[str, Any], str]] = [
        ({"disks": ()}, "boot disk"),
        ({"accel": "hvf"}, "use one of kvm, tcg"),
        ({"append": "x"}, "needs a kernel"),
        ({"forwards": (("169.254.169.252", 0, Path("g")),)}, "not a TCP port"),
        ({"metadata_socket": Path("/tmp/a b/http.sock")}, "letters, digits"),
        ({"forwards": (("169.254.169.252", 80, Path("/tmp/x,y:z")),)}, "letters, digits"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(base, **change)


def test_kvm_usable_is_false_without_a_kvm_device(tmp_path: Path) -> None:
    assert not qemu_boot.kvm_usable(str(tmp_path / "kvm"))
    assert not qemu_boot.kvm_usable("/dev/null")


def _qemu_stand_in(directory: Path, body: str) -> Path:
    path = directory / "qemu"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_kvm_runs_is_false_where_kvm_opens_but_qemu_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on this project's CI machine: /dev/kvm opens, QEMU aborts at its start; every QEMU start then uses TCG."""
    monkeypatch.setattr(qemu_boot, "kvm_usable", lambda device="/dev/kvm": True)
    qemu = _qemu_stand_in(tmp_path, 'echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0" >&2\nexit 1')
    started = time.monotonic()
    assert not qemu_boot.kvm_runs(tmp_path / "vmlinuz", tmp_path, qemu=str(qemu))
    assert time.monotonic() - started < 5  # QEMU ended: the probe does not wait out its timeout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qemu"]  # its serial log is removed


def test_kvm_runs_once_the_kernel_prints_its_banner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    banner = 'for a; do case "$a" in file,id=s,path=*) echo "Linux version 6.1.0" > "${a#file,id=s,path=}";; esac; done'
    qemu = _qemu_stand_in(tmp_path, f"{banner}\nexec sleep 60")
    monkeypatch.setattr(qemu_boot, "kvm_usable", lambda device="/dev/kvm": False)
    assert not qemu_boot.kvm_runs(tmp_path / "vmlinuz", tmp_path, qemu=str(qemu))  # no KVM: QEMU is not even tried
    monkeypatch.setattr(qemu_boot, "kvm_usable", lambda device="/dev/kvm": True)
    assert qemu_boot.kvm_runs(tmp_path / "vmlinuz", tmp_path, qemu=str(qemu))


# ---------------------------------------------------------------------------------------------------------------
# QEMU accepts the argv (paused before the first instruction, inspected over QMP)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (a unix socket path must stay under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="qb.") as path:
        yield Path(path)


def _serial_chardevs(qmp: Qmp) -> dict[int, str]:
    """iobase -> chardev of every isa-serial device of the machine."""
    found: dict[int, str] = {}
    for child in qmp.execute("qom-list", path="/machine/unattached"):
        if child["type"] == "child<isa-serial>":
            path = f"/machine/unattached/{child['name']}"
            found[qmp.execute("qom-get", path=path, property="iobase")] = qmp.execute(
                "qom-get", path=path, property="chardev"
            )
    return found


def test_qemu_accepts_the_argv(short_dir: Path) -> None:
    if shutil.which(qemu_boot.QEMU) is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)")
    disks = tuple(short_dir / name for name in ("boot.raw", "cidata.raw", "scratch.raw"))
    for disk in disks:
        with open(disk, "wb") as out:
            out.truncate(1 << 20)
    spec = InstanceSpec(
        disks=disks,
        serial_port3=short_dir / "port3.log",
        qmp_socket=short_dir / "qmp.sock",
        metadata_socket=short_dir / "md.sock",
        console=short_dir / "console.log",
        accel="tcg",  # what is checked is the argv; KVM, where /dev/kvm opens, may still fail at start (an MSR)
        memory_mb=256,
        cpus=1,
    )
    with open(short_dir / "qemu.err", "wb") as err:
        proc = subprocess.Popen([*qemu_argv(spec), "-S"], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        qmp = Qmp.connect(spec.qmp_socket, alive=lambda: proc.poll() is None)
        try:
            assert qmp.execute("query-status")["status"] == "prelaunch"
            blocks = {b["device"]: b for b in qmp.execute("query-block")}
            assert {name: b["inserted"]["file"] for name, b in blocks.items()} == {
                f"d{i}": str(disk) for i, disk in enumerate(disks)
            }
            assert all(b["inserted"]["image"]["virtual-size"] == 1 << 20 for b in blocks.values())
            chardevs = {c["label"]: c["filename"] for c in qmp.execute("query-chardev")}
            assert chardevs == {
                "serial1": "file",
                "serial2": "null",
                "serial3": "file",
                "serial4": "null",
                "qmp": f"unix:{spec.qmp_socket},server=on",
            }
            # COM1..COM4: ttyS2 (0x3e8) is GCE's serial port 3, the file.
            assert _serial_chardevs(qmp) == {0x3F8: "serial1", 0x2F8: "serial2", 0x3E8: "serial3", 0x2E8: "serial4"}
            qmp.block_resize("d0", 3 << 20)
            assert os.path.getsize(disks[0]) == 3 << 20
            qmp.execute("quit")
            assert proc.wait(timeout=30) == 0, (short_dir / "qemu.err").read_text()
            assert any(event["event"] == "SHUTDOWN" for event in qmp.events)
        finally:
            qmp.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (short_dir / "port3.log").exists()
