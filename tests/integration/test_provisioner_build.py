"""`build-provisioner`: one static executable that runs where there is nothing but busybox."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import privilege
from tests.conftest import CLI


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The executable, and the cache it was built into."""
    tmp = tmp_path_factory.mktemp("provisioner")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
    output = tmp / "provisioner"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cos-customizer"), "build-provisioner", f"-output={output}"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "built" in result.stderr
    return output, tmp / "cache"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_static_and_executable(built: tuple[Path, Path]) -> None:
    output, _ = built
    assert output.stat().st_size < 40 << 20
    assert os.access(output, os.X_OK)
    ldd = subprocess.run(["ldd", str(output)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="needs root for chroot and mounting /proc")
def test_help_runs_in_a_busybox_only_chroot(built: tuple[Path, Path], tmp_path: Path) -> None:
    output, _ = built
    root = tmp_path / "root"
    for directory in ("bin", "proc", "tmp"):
        (root / directory).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    shutil.copy2(output, root / "bin/provisioner")
    assert sorted(p.name for p in (root / "bin").iterdir()) == ["busybox", "provisioner", "sh"]
    script = f"mount -t proc proc {root}/proc && chroot {root} /bin/provisioner --help; status=$?; umount {root}/proc; exit $status"
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for command in ("run", "resume", "handle-disk-layout", "wait-metadata"):
        assert command in result.stdout
    assert not (root / "usr").exists() and not (root / "lib").exists()  # no libc, no Python


def test_cached_and_reproducible(built: tuple[Path, Path], cli: CLI, tmp_path: Path) -> None:
    output, cache = built
    again = tmp_path / "again"
    result = cli("build-provisioner", f"-output={again}", env={"XDG_CACHE_HOME": str(cache)})
    assert result.code == 0, result.err
    assert "from the cache" in result.err
    assert sha256(again) == sha256(output)
    fresh = tmp_path / "fresh"
    result = cli("build-provisioner", f"-output={fresh}", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.code == 0, result.err
    assert "built" in result.err
    assert sha256(fresh) == sha256(output)  # same sources and tools, same bytes


def test_output_directory_must_exist(cli: CLI, tmp_path: Path) -> None:
    result = cli("build-provisioner", f"-output={tmp_path / 'no' / 'p'}")
    assert (result.code, result.err) == (
        1,
        f"cos-customizer: error: {tmp_path / 'no' / 'p'}: the directory {tmp_path / 'no'} does not exist\n",
    )
