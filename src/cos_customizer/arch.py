"""The two machines COS images are built for (x86-64 and arm64), and reading one from an ELF header.

One enum carries every name a machine goes by: the original's and Debian's (`amd64`, `arm64`), the
kernel's (`uname -m`: `x86_64`, `aarch64`), Compute Engine's (`X86_64`, `ARM64`), the ELF e_machine
number, QEMU's system and user emulators, and `file`'s wording. Standard library only: the provisioner
imports it too.
"""

from __future__ import annotations

import enum
import os
import platform
import struct
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
ELF_HEADER = 20  # e_ident (16) + e_type (2) + e_machine (2)


class Arch(enum.Enum):
    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def debian(self) -> str:
        """Debian's and the original's name (`amd64`, `arm64`): debootstrap --arch, -arch flags."""
        return self.value

    @property
    def uname(self) -> str:
        return _UNAME[self]

    @property
    def gce(self) -> str:
        """Compute Engine's `architecture` of an image."""
        return _GCE[self]

    @property
    def elf_machine(self) -> int:
        return _ELF_MACHINE[self]

    @property
    def elf_name(self) -> str:
        """How `file` and readelf name the machine."""
        return _ELF_NAME[self]

    @property
    def qemu_user(self) -> str:
        """Debian's qemu-user-static emulator of this machine (for running its binaries here)."""
        return f"/usr/bin/qemu-{self.uname}-static"

    @property
    def qemu_system(self) -> str:
        return f"qemu-system-{self.uname}"

    @classmethod
    def parse(cls, name: str) -> Arch:
        """Any of the names above (case-insensitive), e.g. `arm64`, `aarch64`, `ARM64`, `x86-64`."""
        key = name.strip().lower().replace("-", "_")
        for arch in cls:
            if key in {arch.value, arch.uname, arch.gce.lower()}:
                return arch
        raise ValueError(f"unknown architecture {name!r}: use amd64 or arm64")

    @classmethod
    def host(cls) -> Arch:
        return cls.parse(platform.machine())

    @classmethod
    def from_elf_machine(cls, machine: int) -> Arch | None:
        for arch in cls:
            if arch.elf_machine == machine:
                return arch
        return None


_UNAME = {Arch.AMD64: "x86_64", Arch.ARM64: "aarch64"}
_GCE = {Arch.AMD64: "X86_64", Arch.ARM64: "ARM64"}
_ELF_MACHINE = {Arch.AMD64: 62, Arch.ARM64: 183}  # EM_X86_64, EM_AARCH64
_ELF_NAME = {Arch.AMD64: "x86-64", Arch.ARM64: "ARM aarch64"}


def elf_machine(header: bytes) -> int | None:
    """The e_machine of a 64-bit little-endian ELF header, or None when `header` is not one."""
    if len(header) < ELF_HEADER or header[:4] != ELF_MAGIC or header[4:6] != b"\x02\x01":
        return None
    return int(struct.unpack_from("<H", header, 18)[0])


def elf_arch(header: bytes) -> Arch | None:
    """The machine of a 64-bit little-endian ELF header (x86-64 or arm64), else None."""
    machine = elf_machine(header)
    return None if machine is None else Arch.from_elf_machine(machine)


def file_arch(f: BinaryIO) -> Arch | None:
    """The machine of an open ELF file (read from its start), else None."""
    f.seek(0)
    return elf_arch(f.read(ELF_HEADER))


def path_arch(path: str | os.PathLike[str]) -> Arch | None:
    with open(path, "rb") as f:
        return file_arch(f)
