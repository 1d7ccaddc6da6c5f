"""`build-provisioner -arch=arm64` on this x86-64 machine: an aarch64 static executable, checked with stock tools.

The arm64 build root is built once per machine (a few minutes) into the usual cache,
~/.cache/cos-customizer/provisioner-root-arm64, and the executable is cached there too by its sources: CI
freezes it again whenever a .py file changes. `file` and `readelf` are the oracles of what was made;
`qemu-aarch64-static` runs it, with no arm64 library on this machine to lean on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import binfmt, privilege
from cos_customizer.arch import Arch
from tests.conftest import CLI

QEMU = "/usr/bin/qemu-aarch64-static"
ARM64_LIBRARIES = (Path("/usr/lib/aarch64-linux-gnu"), Path("/lib/aarch64-linux-gnu"))
ARM64_LOADER = Path("/lib/ld-linux-aarch64.so.1")


def _why_not() -> str | None:
    if not privilege.can_mount():
        return "the arm64 build root is made with debootstrap and chroot: it needs root"
    for path, package in ((QEMU, "qemu-user-static"), ("/usr/sbin/debootstrap", "debootstrap")):
        if not Path(path).exists():
            return f"{path} is missing: apt-get install {package}"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cos-customizer build-provisioner -arch=arm64`, with this machine's cache (its root built once)."""
    output = tmp_path_factory.mktemp("arm64") / "provisioner-arm64"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cos-customizer"), "build-provisioner", "-arch=arm64", f"-output={output}"],
        capture_output=True, text=True, check=False, timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def test_file_and_readelf_call_it_a_static_aarch64_executable(built: Path) -> None:
    described = subprocess.run(["file", "-b", str(built)], capture_output=True, text=True, check=True).stdout
    assert described.startswith("ELF 64-bit LSB "), described
    assert "ARM aarch64" in described, described
    assert "statically linked" in described, described
    header = subprocess.run(["readelf", "-h", str(built)], capture_output=True, text=True, check=True).stdout
    assert any(line.split() == ["Machine:", "AArch64"] for line in header.splitlines()), header
    assert built.stat().st_size < 40 << 20
    assert os.access(built, os.X_OK)


def test_help_runs_under_qemu_user_with_no_arm64_libraries_here(built: Path, tmp_path: Path) -> None:
    """Run directly by qemu-aarch64-static, with an empty library prefix, on a machine with no arm64 library.

    The executable unpacks itself and starts what it unpacked (PyInstaller's and staticx's bootloaders
    both exec): those execs go through binfmt_misc, for the time of the run."""
    for directory in ARM64_LIBRARIES:
        assert not directory.exists() or not any(directory.iterdir()), f"{directory} holds arm64 libraries"
    assert not ARM64_LOADER.exists()
    empty = tmp_path / "no-libraries"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "QEMU_LD_PREFIX": str(empty), "TMPDIR": str(tmp_path)}
    with binfmt.emulation(Arch.ARM64):
        result = subprocess.run([QEMU, str(built), "--help"], env=env, capture_output=True, text=True, check=False,
                                timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("run", "resume", "handle-disk-layout", "wait-metadata"):
        assert command in result.stdout


def test_a_second_build_comes_from_the_cache_with_the_same_bytes(built: Path, cli: CLI, tmp_path: Path) -> None:
    again = tmp_path / "again"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")  # the `built` fixture's
    result = cli("build-provisioner", "-arch=arm64", f"-output={again}", env={"XDG_CACHE_HOME": cache})
    assert result.code == 0, result.err
    assert "from the cache" in result.err
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(built.read_bytes()).digest()
