"""CreateInstances and WaitForInstancesSignal on real QEMU, with a fake guest instead of COS.

The guest is a Debian kernel (fetched once with `apt-get download` by `sample_guest.fetch_kernel`,
cached under ~/.cache/cos-customizer/debian-kernel/) and a busybox initramfs made here, put on a sample image's
EFI FAT as `/syslinux/vmlinuz.A` and `/syslinux/initrd.A` with an `initrd` line in grub.cfg. Its
/init loads virtio-scsi and vfat, prints `BuildStatus: booted N` (N from `fakeboot=N` on the kernel
command line) to /dev/ttyS2; on boot 1 it edits grub.cfg on the EFI partition to say `fakeboot=2`
and reboots, so the second boot only says 2 if the runner planned it again from the disk; on boot 2
it prints `BuildSucceeded: done` and powers off (or, with `fakefail`, prints `BuildFailed: boom`
and stays up, so the runner must stop it).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer.disk import gpt, grub
from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu.instances import QemuInstances
from cos_customizer.executors.qemu.resources import Resources
from cos_customizer.images import ImageFormat
from cos_customizer.sample import guest as sample_guest
from cos_customizer.sample import image as sample_image
from cos_customizer.sample import initramfs as sample_initramfs

MODULES = ("crct10dif_generic", "virtio_pci", "virtio_scsi", "sd_mod", "vfat", "nls_cp437", "nls_ascii")
BUSYBOX = Path("/bin/busybox")

INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /modules/order); do insmod /modules/$m 2>/dev/null; done
n=$(sed -n 's/.*fakeboot=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "BuildStatus: booted $n" > /dev/ttyS2
if grep -q fakefail /proc/cmdline; then
  echo "BuildFailed: boom" > /dev/ttyS2
  sleep 600
fi
if [ "$n" = 1 ]; then
  i=0; while [ ! -b /dev/sda12 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
  mount -t vfat /dev/sda12 /mnt && sed -i 's/fakeboot=1/fakeboot=2/g' /mnt/efi/boot/grub.cfg && umount /mnt
  sync
  echo "BuildStatus: rebooting" > /dev/ttyS2
  reboot -f
fi
echo "BuildSucceeded: done" > /dev/ttyS2
poweroff -f
"""


def _kernel() -> tuple[Path, Path]:
    """(vmlinuz, /lib/modules/VERSION) of the cached Debian kernel (sample_guest fetches it on first use)."""
    try:
        return sample_guest.fetch_kernel()
    except CustomizerError as err:
        pytest.skip(f"cannot fetch a Debian kernel: {err}")


def _initramfs(modules: Path) -> bytes:
    directory, executable = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    order = sample_initramfs.module_order(modules, MODULES)
    entries = [(d, directory, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "modules")]
    entries += [("bin/busybox", executable, BUSYBOX.read_bytes()), ("init", executable, INIT.encode())]
    entries += [(f"modules/{ko.name}", stat.S_IFREG | 0o644, ko.read_bytes()) for ko in order]
    entries.append(("modules/order", stat.S_IFREG | 0o644, "\n".join(ko.name for ko in order).encode() + b"\n"))
    return sample_initramfs.cpio(entries)


@pytest.fixture(scope="module")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample image whose "verified image A" entry boots the fake guest with `fakeboot=1`."""
    for tool in (qemu_boot.QEMU, "socat", "mcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed: the fake guest's initramfs needs /bin/busybox")
    vmlinuz, modules = _kernel()
    work = tmp_path_factory.mktemp("guest")
    image = sample_image.build(work / "sample.img").path
    efi = next(p for p in gpt.read_table(image).partitions if p.type_guid == gpt.EFI_SYSTEM)
    offset = efi.first * gpt.SECTOR
    (work / "initrd").write_bytes(_initramfs(modules))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for local, target in ((vmlinuz, "vmlinuz.A"), (work / "initrd", "initrd.A")):
        subprocess.run(["mcopy", "-o", "-i", f"{image}@@{offset}", str(local), f"::/syslinux/{target}"], env=env,
                       check=True)  # fmt: skip
    cfg = grub.read_grub_cfg(image, offset)
    cfg, count = re.subn(r"(\n\s*linux /syslinux/vmlinuz\.A )([^\n]*)",
                         r"\1fakeboot=1 \2\n  initrd /syslinux/initrd.A", cfg)  # fmt: skip
    assert count == 2
    grub.write_grub_cfg(image, offset, cfg)
    (work / "initrd").unlink()
    return image


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qi.") as path:
        yield Path(path)


def _document() -> dict[str, object]:
    signal = {"Port": 3, "SuccessMatch": "BuildSucceeded", "FailureMatch": ["BuildFailed"],
              "StatusMatch": "BuildStatus"}  # fmt: skip
    return {
        "Name": "fake-guest",
        "Steps": {
            "disk": {"CreateDisks": [{"Name": "boot-disk", "SourceImage": "src-image"}]},
            "run": {
                "CreateInstances": [
                    {"Name": "vm", "Disks": [{"Source": "boot-disk"}], "Metadata": {"user-data": "#cloud-config\n"}}
                ]
            },
            "wait": {"WaitForInstancesSignal": [{"Name": "vm", "SerialOutput": signal}], "Timeout": "50s"},
            "off": {"WaitForInstancesSignal": [{"Name": "vm", "Stopped": True}], "Timeout": "20s"},
        },
        "Dependencies": {"run": ["disk"], "wait": ["run"], "off": ["wait"]},
    }


def _run(short_dir: Path, image: Path, fail: bool) -> tuple[QemuInstances, list[daisy_local.StepEvent]]:
    if fail:  # the failing guest: boot 1 already says BuildFailed
        efi = next(p for p in gpt.read_table(image).partitions if p.type_guid == gpt.EFI_SYSTEM)
        cfg = grub.read_grub_cfg(image, efi.first * gpt.SECTOR)
        grub.write_grub_cfg(image, efi.first * gpt.SECTOR, cfg.replace("fakeboot=1", "fakeboot=1 fakefail"))
    (short_dir / "work").mkdir()
    (short_dir / "run").mkdir()
    events: list[daisy_local.StepEvent] = []
    with Resources(short_dir / "work", gcs_path="gs://bucket/dir", output_path=short_dir / "out.raw",
                   output_format=ImageFormat.RAW, source_images={"src-image": image}) as resources:  # fmt: skip
        # TCG: on this machine a KVM guest of this kernel printed nothing within 20 s (nested virtualisation).
        instances = QemuInstances(resources, accel="tcg", memory_mb=256, cpus=1, rundir=short_dir / "run")
        wf = daisy_local.load(_document(), {}, autovars=resources.autovars())
        try:
            daisy_local.run(wf, {**resources.handlers(), **instances.handlers()}, default_timeout=60.0,
                            deadline=None, on_event=events.append)  # fmt: skip
        finally:
            machine = instances.machines.get("vm")
            pids = machine.pids if machine else []
            for pid in pids:  # a QEMU left behind is a failure, but not one this test leaves running
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, 9)
                    pytest.fail(f"QEMU {pid} was still running after the workflow")
    return instances, events


def _assert_nothing_left(short_dir: Path, instances: QemuInstances) -> None:
    assert list((short_dir / "work").iterdir()) == []
    assert list((short_dir / "run").iterdir()) == []
    for pid in instances.machines["vm"].pids:
        assert not Path(f"/proc/{pid}").exists()


def test_a_guest_that_reboots_then_powers_off(short_dir: Path, guest_image: Path) -> None:
    image = short_dir / "src.img"
    subprocess.run(["cp", "--sparse=always", str(guest_image), str(image)], check=True)
    instances, events = _run(short_dir, image, fail=False)
    machine = instances.machines["vm"]
    status = [e.detail for e in events if e.kind == "status"]
    # The status lines as they came, then the line the wait ended on.
    assert status == ["BuildStatus: booted 1", "BuildStatus: rebooting", "BuildStatus: booted 2",
                      "BuildSucceeded: done"], events  # fmt: skip
    assert machine.boots == 2
    assert machine.reasons == ["guest-reset", "guest-shutdown"]
    assert machine.error == ""
    assert [e.step for e in events if e.kind == "finished"] == ["disk", "run", "wait", "off"]
    assert len(set(machine.pids)) == 2
    _assert_nothing_left(short_dir, instances)


def test_a_failure_match_fails_the_step_and_stops_qemu(short_dir: Path, guest_image: Path) -> None:
    image = short_dir / "src.img"
    subprocess.run(["cp", "--sparse=always", str(guest_image), str(image)], check=True)
    with pytest.raises(
        daisy_local.WorkflowStepFailed, match=r"step wait .*FailureMatch found: BuildFailed: boom"
    ) as caught:
        _run(short_dir, image, fail=True)
    assert caught.value.step.name == "wait"
    assert list((short_dir / "work").iterdir()) == []
    assert list((short_dir / "run").iterdir()) == []
