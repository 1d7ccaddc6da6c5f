"""binfmt.emulation against the kernel's own binfmt_misc: what it registers, what it leaves alone.

The oracle for the registration is Debian's own entry for qemu-user-static (/usr/lib/binfmt.d), and
the proof that it works is an arm64 program of Debian's running here from a root with no emulator.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer import binfmt, linux, privilege
from cos_customizer.arch import Arch
from cos_customizer.errors import ValidationError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root to register with binfmt_misc"),
]

DEBIAN_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")


@pytest.fixture
def binfmt_misc() -> Iterator[Path]:
    """binfmt_misc mounted (only for the test if it was not), with the entries the test made removed after."""
    root = binfmt.BINFMT_MISC
    mounted = (root / "register").exists()
    if not mounted:
        linux.mount("binfmt_misc", str(root), "binfmt_misc")
    try:
        yield root
    finally:
        for entry in root.glob("test-cos-customizer-*"):
            entry.write_text("-1")
        if not mounted:
            linux.umount(str(root))


def test_the_registration_matches_debians_own(tmp_path: Path) -> None:
    # Debian's line: :qemu-aarch64:M::MAGIC:MASK:INTERPRETER:FLAGS (binfmt.d(5), Documentation/admin-guide/binfmt-misc).
    debian = DEBIAN_CONF.read_text().strip().split(":")
    ours = binfmt.registration_line(Arch.ARM64, "x").split(":")
    assert ours[2:6] == debian[2:6]  # type M, offset, magic, mask
    assert ours[6] == debian[6]  # Debian's P-flag link to qemu-aarch64-static
    assert sorted(ours[7]) == sorted(debian[7])  # the same flags: O, P, F


def test_emulation_registers_its_own_entry_and_removes_it(binfmt_misc: Path) -> None:
    # A host entry for the same programs without P (dockerd's re-execution needs it): left exactly as it
    # is, and not used. It has F, so other programs that run meanwhile still run from any root.
    host_line = (
        f":test-cos-customizer-host:M::{DEBIAN_CONF.read_text().split(':')[4]}:"
        f"{DEBIAN_CONF.read_text().split(':')[5]}:/usr/bin/qemu-aarch64-static:F"
    )
    (binfmt_misc / "register").write_text(host_line)
    host_before = (binfmt_misc / "test-cos-customizer-host").read_text()
    # An entry a killed run left (no such process): removed.
    dead = 2**22 + 1  # above the kernel's pid_max
    (binfmt_misc / "register").write_text(binfmt.registration_line(Arch.ARM64, f"cos-customizer-aarch64-{dead}-1"))
    with binfmt.emulation(Arch.ARM64) as name:
        assert name is not None and name.startswith(f"cos-customizer-aarch64-{os.getpid()}-")
        text = (binfmt_misc / name).read_text()
        assert "enabled" in text.splitlines()
        assert re.search(r"^flags: (?=.*P)(?=.*O)(?=.*F)", text, re.MULTILINE), text
        assert not (binfmt_misc / f"cos-customizer-aarch64-{dead}-1").exists()
    assert not (binfmt_misc / name).exists()
    assert (binfmt_misc / "test-cos-customizer-host").read_text() == host_before


def test_an_arm64_program_runs_from_a_root_without_the_emulator(binfmt_misc: Path, tmp_path: Path) -> None:
    # Debian's arm64 busybox is not on this machine; the sample's arm64 tree (Debian's packages) has bash.
    from cos_customizer.sample import userland

    tree = userland.prepare(Arch.ARM64)
    root = tmp_path / "root"
    for library in userland.needed(tree, Arch.ARM64, [userland.inside(tree, "/usr/bin/uname")]) | {
        Path("/usr/bin/uname")
    }:
        target = root / str(library).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(userland.inside(tree, library), target)
    (root / "lib").mkdir(exist_ok=True)
    assert not (root / "usr/bin/qemu-aarch64-static").exists()
    with binfmt.emulation(Arch.ARM64):
        ran = subprocess.run(["chroot", str(root), "/usr/bin/uname", "-m"], capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (0, "aarch64\n"), ran.stderr


def test_this_machines_programs_need_no_registration() -> None:
    with binfmt.emulation(Arch.host()) as name:
        assert name is None


def test_a_missing_emulator_is_one_line_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValidationError) as caught, binfmt.emulation(Arch.ARM64):
        pass
    assert str(caught.value) == (
        "running arm64 binaries on this amd64 machine needs /usr/bin/qemu-aarch64-static: apt-get install qemu-user-static"
    )


def test_a_run_ending_first_leaves_binfmt_misc_to_the_run_still_going() -> None:
    """Two runs overlapping (A starts, B starts, A ends, B ends): B's registration works until B ends, and
    binfmt_misc is mounted afterwards exactly when it was before (a mount of ours goes with the last run)."""
    root = binfmt.BINFMT_MISC
    mounted_before = (root / "register").exists()
    first, second = binfmt.emulation(Arch.ARM64), binfmt.emulation(Arch.ARM64)
    name_a = first.__enter__()
    try:
        name_b = second.__enter__()
    except BaseException:
        first.__exit__(None, None, None)
        raise
    try:
        assert name_a != name_b
        first.__exit__(None, None, None)
        assert (root / "register").exists()
        assert name_b is not None and binfmt.usable((root / name_b).read_text(), Arch.ARM64)
        assert name_a is not None and not (root / name_a).exists()
    finally:
        second.__exit__(None, None, None)
    assert (root / "register").exists() == mounted_before
