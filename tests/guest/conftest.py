"""Fixtures of the guest tier: the bootable samples the tests boot (each built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
def bootable_raw_dm_mod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bootable sample with `dm-mod.create="..."`, so both forms of grub.cfg boot through a rehearsal."""
    _tools()
    path = tmp_path_factory.mktemp("bootable") / "cos.raw"
    sample_image.build(path, bootable=True, grub_format="dm-mod")
    return path
