"""Fixtures of the guest tier: the bootable samples the tests boot (each built once per session)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.sample import image as sample_image
from tests.conftest import sh


def _tools() -> None:
    for tool in ("qemu-system-x86_64", "socat", "debootstrap"):
        if not sh("which", tool, check=False).stdout.strip():
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


@pytest.fixture(scope="session")
def bootable_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sample-image -bootable -with-containers` (`dm="..."`), made by the command; tests must not write it."""
    _tools()
    path = tmp_path_factory.mktemp("bootable") / "cos.raw"
    result = sh(sys.executable, "-m", "cos_customizer", "sample-image", "-bootable", "-with-containers", path,
                check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def bootable_arm64_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sample-image -arch=arm64 -bootable` (Debian's arm64 guest, built under qemu-user-static and cached the first
    time, many minutes), made by the command; tests must not write it."""
    _tools()
    for tool in ("qemu-system-aarch64", "qemu-aarch64-static"):
        if not sh("which", tool, check=False).stdout.strip():
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if not qemu_boot.ARM64_FIRMWARE.exists():
        pytest.skip(f"{qemu_boot.ARM64_FIRMWARE} is not installed (scripts/setup installs qemu-efi-aarch64)")
    path = tmp_path_factory.mktemp("bootable-arm64") / "cos-arm64.raw"
    result = sh(sys.executable, "-m", "cos_customizer", "sample-image", "-arch=arm64", "-bootable", path, check=False)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def bootable_raw_dm_mod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bootable sample with `dm-mod.create="..."`, so both forms of grub.cfg boot through a rehearsal."""
    _tools()
    path = tmp_path_factory.mktemp("bootable") / "cos.raw"
    sample_image.build(path, bootable=True, grub_format="dm-mod")
    return path


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short $TMPDIR of the test's own, so what `boot` makes there (and leaves) can be seen."""
    with tempfile.TemporaryDirectory(prefix="bc.", dir="/tmp") as path:
        monkeypatch.setattr(tempfile, "tempdir", path)
        yield Path(path)


def left_in(private: Path) -> list[str]:
    """Files left in the private $TMPDIR, and processes whose command line names it (QEMU, socat)."""
    found = [str(path) for path in private.iterdir()]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(private).encode() in cmdline:
                shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"process {proc.name}: {shown}")
    return found
