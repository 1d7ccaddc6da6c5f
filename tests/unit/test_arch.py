"""The machines' names and reading one from an ELF header (cos_customizer.arch), and finding a file's first
bytes inside an ext file system image with debugfs (disk.ext.file_head)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from cos_customizer.arch import Arch, elf_arch, elf_machine, path_arch
from cos_customizer.disk import ext


def elf_header(machine: int, elf_class: int = 2, data: int = 1) -> bytes:
    """An ELF header's first 20 bytes as the ELF specification lays them out (e_machine at offset 18)."""
    return b"\x7fELF" + bytes([elf_class, data, 1]) + bytes(9) + struct.pack("<HH", 2, machine)


@pytest.mark.parametrize(
    ("name", "arch"),
    [("amd64", Arch.AMD64), ("x86_64", Arch.AMD64), ("X86_64", Arch.AMD64), ("x86-64", Arch.AMD64),
     ("arm64", Arch.ARM64), ("aarch64", Arch.ARM64), ("ARM64", Arch.ARM64)],
)  # fmt: skip
def test_every_name_of_a_machine_parses(name: str, arch: Arch) -> None:
    assert Arch.parse(name) is arch


def test_an_unknown_machine_is_refused_with_the_names_to_use() -> None:
    with pytest.raises(ValueError, match=r"^unknown architecture 'riscv64': use amd64 or arm64$"):
        Arch.parse("riscv64")


def test_names_as_the_tools_spell_them() -> None:
    # Debian's and the original's (`amd64`, `arm64`), the kernel's `uname -m`, Compute Engine's architecture.
    assert [(a.debian, a.uname, a.gce) for a in Arch] == [("amd64", "x86_64", "X86_64"), ("arm64", "aarch64", "ARM64")]
    assert Arch.ARM64.qemu_user == "/usr/bin/qemu-aarch64-static"
    assert Arch.ARM64.qemu_system == "qemu-system-aarch64"


def test_elf_headers_name_their_machine() -> None:
    # e_machine 62 is EM_X86_64, 183 EM_AARCH64 (the ELF specification's numbers).
    assert elf_arch(elf_header(62)) is Arch.AMD64
    assert elf_arch(elf_header(183)) is Arch.ARM64
    assert elf_arch(elf_header(40)) is None  # EM_ARM: 32-bit arm is not a COS machine
    assert elf_arch(elf_header(183, elf_class=1)) is None  # a 32-bit ELF
    assert elf_arch(elf_header(183, data=2)) is None  # big-endian
    assert elf_arch(b"#!/bin/sh\n" + bytes(20)) is None
    assert elf_arch(elf_header(183)[:19]) is None
    assert elf_machine(elf_header(8)) == 8


def test_this_machines_own_programs_are_its_machine() -> None:
    # The oracle is the kernel's own name for this machine (uname -m), and a program it runs.
    machine = subprocess.run(["uname", "-m"], capture_output=True, text=True, check=True).stdout.strip()
    assert Arch.host() is Arch.parse(machine)
    assert path_arch("/bin/true") is Arch.host()


def _ext_image(tmp: Path, tree: Path) -> Path:
    image = tmp / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "8M"], check=True)
    return image


def test_file_head_follows_links_inside_the_file_system(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "bin").symlink_to("usr/bin")
    program = Path("/bin/true").read_bytes()
    (tree / "usr/bin/bash").write_bytes(program)
    (tree / "usr/bin/sh").symlink_to("bash")
    (tree / "usr/bin/abs").symlink_to("/usr/bin/sh")
    (tree / "usr/bin/long").symlink_to("/usr/bin/" + "x/../" * 20 + "bash")  # over 60 bytes: a slow link
    (tree / "usr/bin/loop").symlink_to("loop")
    (tree / "usr/bin/dir").symlink_to("/usr")
    (tree / "usr/bin/dangling").symlink_to("/nowhere")
    image = _ext_image(tmp_path, tree)
    for name in ("/bin/sh", "/usr/bin/bash", "/usr/bin/abs", "/usr/bin/long"):
        assert ext.file_head(image, 0, name) == program[:32], name
    for name in ("/usr/bin/loop", "/usr/bin/dir", "/usr/bin/dangling", "/missing", "/usr"):
        assert ext.file_head(image, 0, name) is None, name


def test_file_head_reads_a_file_system_at_an_offset(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/sh").write_bytes(elf_header(183) + bytes(100))
    fs = _ext_image(tmp_path, tree)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as out:
        out.truncate(1 << 20)
        out.seek(1 << 20)
        out.write(fs.read_bytes())
    head = ext.file_head(disk, 1 << 20, "/bin/sh")
    assert head is not None and elf_arch(head) is Arch.ARM64
    assert os.path.getsize(disk) > 1 << 20
