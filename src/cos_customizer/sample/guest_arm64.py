"""What the bootable sample's guest needs for arm64, built on an x86-64 machine: Debian's arm64 packages and
the guest's serial port names.

`sample.guest.prepare(..., arch=Arch.ARM64)` debootstraps Debian's arm64 packages with the second stage
running under `qemu-aarch64-static` (`binfmt.emulation`), then takes from this module:

- `download`: the kernel (`linux-image-6.1.0-N-arm64`, the newest the root's own apt lists name) and
  `busybox-static` (for the initramfs), fetched with the arm64 root's own `apt-get download` (under the
  same emulation), so this machine's apt configuration (amd64 lists only) is never changed. They are
  unpacked with dpkg-deb, not installed: the root's package set is the x86-64 guest's;
- `MODULES`, `INITRD_MODULES`: the arm64 kernel's modules kept besides the x86-64 guest's (the SHA-2
  instructions' module, so dm-verity hashes with them; the rest, PL011 and the PCI 16550 driver among
  them, is built into Debian's arm64 kernel);
- `SERIAL_RULES`: GCE's serial ports 2 to 4 as /dev/ttyAMA1..3, the names COS on arm64 gives them (the
  startup script writes to /dev/ttyAMA2). QEMU 7.2's `virt` machine has one PL011 (ttyAMA0, port 1):
  the qemu executor adds ports 2 to 4 as PCI 16550 UARTs in fixed slots (`executors.qemu.boot`), which
  the kernel calls ttyS0..2, and these udev rules link the COS names to them.
"""

from __future__ import annotations

import re
from pathlib import Path

from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu.boot import ARM64_SERIAL_SLOTS
from cos_customizer.runner import require_tool, run

KERNEL_PACKAGE = r"linux-image-6\.1\.0-(\d+)-arm64"  # Debian 12's arm64 kernel, not -rt or -cloud
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = "bin/busybox"  # in the unpacked busybox-static package
MODULES = ("sha2_ce", "sha256_arm64", "crct10dif_ce")
INITRD_MODULES = ("sha2_ce",)  # before dm_verity's first hash, so it uses the SHA-2 instructions
CONSOLE = "ttyAMA0"  # the PL011 of QEMU's virt machine, GCE's serial port 1 on arm64
# The serial console's root shell: bash started by agetty in /, not by login(1), which would make its working
# directory /root. Under TCG an arm64 guest is slow enough for the console's login to come after the provisioner
# has mounted its tmpfs on /root: the shell's working directory then held that mount, and the provisioner's
# umount of /root at its end failed ("target is busy").
AUTOLOGIN = """[Service]
Environment=HOME=/root
ExecStart=
ExecStart=-/sbin/agetty --skip-login --login-program /bin/bash --login-options -l --noclear \\
  --keep-baud 115200,57600,38400,9600 - $TERM
"""
SERIAL_RULES = (
    "# cos-customizer's arm64 sample image: GCE's serial ports 2 to 4 under the names COS on arm64 gives them.\n"
    "# QEMU's virt machine has one PL011 (ttyAMA0, port 1); the qemu executor adds ports 2 to 4 as PCI 16550\n"
    "# UARTs in these slots (the kernel's ttyS0..2).\n"
    + "".join(
        f'SUBSYSTEM=="tty", KERNELS=="0000:00:{slot:02x}.0", SYMLINK+="ttyAMA{port - 1}"\n'
        for port, slot in ARM64_SERIAL_SLOTS.items()
    )
)
SERIAL_RULES_FILE = "etc/udev/rules.d/60-cos-serial-ports.rules"


def _packages(root: Path) -> set[str]:
    """The package names of the root's apt lists (debootstrap leaves the suite's Packages index there)."""
    names: set[str] = set()
    for index in (root / "var/lib/apt/lists").glob("*_Packages"):
        names.update(re.findall(r"^Package: (\S+)$", index.read_text(errors="replace"), re.MULTILINE))
    return names


def kernel_package(root: Path) -> str:
    """The newest `linux-image-6.1.0-N-arm64` the root's apt lists name."""
    abis = [(int(m.group(1)), name) for name in _packages(root) if (m := re.fullmatch(KERNEL_PACKAGE, name))]
    if not abis:
        raise CustomizerError(f"{root}: the arm64 root's apt lists name no linux-image-6.1.0-N-arm64 package")
    return max(abis)[1]


def download(root: Path, into: Path) -> tuple[Path, Path]:
    """(the kernel's .deb, busybox-static's .deb), fetched by the root's apt-get into `into` (a directory
    inside `root`). Runs arm64 programs: call it under `binfmt.emulation(Arch.ARM64)`."""
    kernel = kernel_package(root)
    into.mkdir(parents=True, exist_ok=True)
    inside = "/" + str(into.relative_to(root))
    chroot = require_tool("chroot", "coreutils")
    script = f'cd "{inside}" && exec apt-get -q -o APT::Sandbox::User=root download {kernel} {BUSYBOX_PACKAGE}'
    result = run([chroot, str(root), "/bin/sh", "-c", script], check=False)
    debs = {name: sorted(into.glob(f"{name}_*.deb")) for name in (kernel, BUSYBOX_PACKAGE)}
    if result.returncode != 0 or not all(debs.values()):
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise CustomizerError(
            f"cannot fetch Debian's arm64 kernel with apt-get download {kernel} {BUSYBOX_PACKAGE} in the arm64 "
            f"root: {detail[-1] if detail else 'no package'} (the apt mirror must be reachable)"
        )
    return debs[kernel][-1], debs[BUSYBOX_PACKAGE][-1]


def configure(root: Path) -> None:
    """The arm64 guest's serial port names (`SERIAL_RULES`)."""
    rules = root / SERIAL_RULES_FILE
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(SERIAL_RULES)
