"""arm64 images under qemu-system-aarch64: which machine a kernel is for, the virt machine's argv, QEMU accepting it."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer.arch import Arch
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu.boot import InstanceSpec, Qmp, kernel_arch_of, qemu_argv
from cos_customizer.executors.qemu.instances import image_arch
from cos_customizer.sample import guest_arm64


def _arm64_image() -> bytes:
    """The head of an arm64 Linux `Image` (Documentation/arch/arm64/booting.rst): code0/1, text_offset,
    image_size, flags, res2-4, the magic "ARM\\x64", res5."""
    return struct.pack("<IIQQQQQQ4sI", 0x5A4D, 0x14000000, 0, 33 << 20, 0xA, 0, 0, 0, b"ARM\x64", 0x40).ljust(
        4096, b"\0"
    )


def _bzimage() -> bytes:
    head = bytearray(4096)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    return bytes(head)


def _elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, machine) + bytes(44)


def _pe(machine: int) -> bytes:
    head = bytearray(4096)
    head[:2] = b"MZ"
    head[0x3C:0x40] = (0x80).to_bytes(4, "little")
    head[0x80:0x86] = b"PE\0\0" + machine.to_bytes(2, "little")
    return bytes(head)


def test_the_kernel_says_which_machine_boots_it() -> None:
    assert kernel_arch_of(_arm64_image()) is Arch.ARM64
    assert kernel_arch_of(gzip.compress(_arm64_image())[:2048]) is Arch.ARM64  # Image.gz, read from its head
    assert kernel_arch_of(_pe(0xAA64)) is Arch.ARM64  # an EFI application for arm64
    assert kernel_arch_of(_elf(183)) is Arch.ARM64  # an arm64 vmlinux
    assert kernel_arch_of(_bzimage()) is Arch.AMD64
    assert kernel_arch_of(_pe(0x8664)) is Arch.AMD64
    assert kernel_arch_of(_elf(62)) is Arch.AMD64
    assert kernel_arch_of(b"") is Arch.AMD64  # what does not say is booted as before: x86-64
    assert kernel_arch_of(b"\x1f\x8b damaged") is Arch.AMD64


def test_qemu_argv_of_an_arm64_instance() -> None:
    spec = InstanceSpec(
        disks=(Path("/w/boot.raw"), Path("/w/cidata.raw")),
        serial_port3=Path("/w/port3.log"),
        qmp_socket=Path("/w/qmp.sock"),
        metadata_socket=Path("/w/md.x/http.sock"),
        console=Path("/w/console.log"),
        kernel=Path("/w/vmlinuz.A"),
        initrd=Path("/w/initrd.A"),
        append="BOOT_IMAGE=/syslinux/vmlinuz.A console=ttyAMA0 root=/dev/dm-0",
        accel="tcg",
        arch=Arch.ARM64,
        serial_ports=((2, Path("/w/port2.log")),),
    )
    assert qemu_argv(spec) == [
        "qemu-system-aarch64",
        "-name", "cos-customizer,debug-threads=on",
        "-machine", "virt",
        "-accel", "tcg",
        "-cpu", "neoverse-n1",  # GCE T2A's cores
        "-bios", "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",  # SMBIOS for cloud-init; it loads -kernel as given
        "-m", "2048",
        "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", "if=none,id=d0,file=/w/boot.raw,format=raw,discard=unmap,detect-zeroes=unmap",
        "-device", "scsi-hd,drive=d0,bus=scsi0.0,scsi-id=0,lun=0",
        "-drive", "if=none,id=d1,file=/w/cidata.raw,format=raw,discard=unmap,detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=d1",
        "-kernel", "/w/vmlinuz.A",
        "-initrd", "/w/initrd.A",
        "-append", "BOOT_IMAGE=/syslinux/vmlinuz.A console=ttyAMA0 root=/dev/dm-0",
        # Port 1 is the machine's PL011 (ttyAMA0); 2 to 4 are PCI 16550s in the slots the guest's udev rules name.
        "-chardev", "file,id=serial1,path=/w/console.log", "-serial", "chardev:serial1",
        "-chardev", "file,id=serial2,path=/w/port2.log", "-device", "pci-serial,chardev=serial2,addr=0x1d",
        "-chardev", "file,id=serial3,path=/w/port3.log", "-device", "pci-serial,chardev=serial3,addr=0x1e",
        "-chardev", "null,id=serial4", "-device", "pci-serial,chardev=serial4,addr=0x1f",
        "-netdev", "user,id=n0,net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-cmd:socat - UNIX-CONNECT:/w/md.x/http.sock",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
        "-smbios", "type=1,manufacturer=Google,product=Google Compute Engine",
        "-chardev", "socket,id=qmp,path=/w/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-no-reboot",
    ]  # fmt: skip


def test_the_guest_names_the_slots_the_executor_uses() -> None:
    for port, slot in qemu_boot.ARM64_SERIAL_SLOTS.items():
        assert f'KERNELS=="0000:00:{slot:02x}.0", SYMLINK+="ttyAMA{port - 1}"' in guest_arm64.SERIAL_RULES


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qa.") as path:
        yield Path(path)


def test_qemu_system_aarch64_accepts_the_argv(short_dir: Path) -> None:
    if shutil.which(Arch.ARM64.qemu_system) is None or not qemu_boot.ARM64_FIRMWARE.exists():
        pytest.skip("qemu-system-aarch64 or its firmware is not installed (scripts/setup installs them)")
    disk = short_dir / "boot.raw"
    with open(disk, "wb") as out:
        out.truncate(1 << 20)
    spec = InstanceSpec(
        disks=(disk,),
        serial_port3=short_dir / "port3.log",
        qmp_socket=short_dir / "qmp.sock",
        metadata_socket=short_dir / "md.sock",
        console=short_dir / "console.log",
        memory_mb=256,
        cpus=1,
        arch=Arch.ARM64,
    )
    with open(short_dir / "qemu.err", "wb") as err:
        proc = subprocess.Popen([*qemu_argv(spec), "-S"], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        qmp = Qmp.connect(spec.qmp_socket, alive=lambda: proc.poll() is None)
        try:
            assert qmp.execute("query-status")["status"] == "prelaunch"
            slots = [
                device["slot"]
                for bus in qmp.execute("query-pci")
                for device in bus["devices"]
                if device["class_info"]["class"] == 0x0700  # a 16550-compatible serial controller
            ]
            assert sorted(slots) == sorted(qemu_boot.ARM64_SERIAL_SLOTS.values())
            chardevs = {c["label"] for c in qmp.execute("query-chardev")}
            assert {"serial1", "serial2", "serial3", "serial4"} <= chardevs
            qmp.execute("quit")
            assert proc.wait(timeout=30) == 0, (short_dir / "qemu.err").read_text()
        finally:
            qmp.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_image_says_which_machine_boots_it(bootable_arm64_raw: Path, tmp_path: Path) -> None:
    """What a rehearsal reads before anything runs (`rehearsal.source_arch`): raw in place, a qcow2 up to EFI-SYSTEM."""
    work = tmp_path / "work"
    work.mkdir()
    assert image_arch(bootable_arm64_raw, work) is Arch.ARM64
    qcow2 = tmp_path / "arm64.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(bootable_arm64_raw), str(qcow2)], check=True)
    assert image_arch(qcow2, work) is Arch.ARM64
    assert list(work.iterdir()) == []  # the kernel and the disk's head copied there are gone
