"""The preload VM's startup script with the shipped provisioner, on COS's noexec /tmp.

Each test runs in a private mount namespace: `/tmp` becomes a noexec tmpfs as
on COS, `/mnt` and `/run` fresh tmpfs, so nothing of the host changes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.executors import startup
from cos_customizer.provisioner.vmsetup import REBOOT_MARKER
from tests.shipped import shipped_provisioner

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for mount namespaces"),
]


def in_namespace(script: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    env.pop("TMPDIR", None)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--fork", "bash", "-c", script],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip


def test_the_shipped_binary_starts_on_a_noexec_tmp_only_with_the_startup_scripts_tmpdir() -> None:
    binary = shipped_provisioner()
    script = f"""
    mount -t tmpfs tmpfs /mnt && cp {binary} /mnt/provisioner
    mount -t tmpfs -o nosuid,nodev,noexec tmpfs /tmp
    /mnt/provisioner --help > /dev/null 2> /mnt/err
    echo "without: $?"; cat /mnt/err
    {startup.LOADER_SETUP}
    /mnt/provisioner --help > /dev/null
    echo "with: $?"
    """
    result = in_namespace(script)
    # The defect, reproduced: the loader unpacks into the noexec /tmp and exits 3 before main.
    assert "without: 3\n" in result.stdout
    assert "Permission denied" in result.stdout
    assert "with: 0\n" in result.stdout, result.stdout + result.stderr


def provision(tmp_path: Path, provisioner: str) -> subprocess.CompletedProcess[str]:
    """The startup script's `provision run` with a stand-in provisioner, reboot and poweroff."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("reboot", "poweroff"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} called"\nkill -9 $PPID\n')
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    stand_in = tmp_path / "provisioner"
    stand_in.write_text(provisioner)
    functions = startup.SCRIPT.split("if [ -e /dev/disk/by-label/SCRATCH ]")[0]
    script = f"""
    mount -t tmpfs tmpfs /mnt && mount -t tmpfs tmpfs /run && mkdir -p /mnt/disks/cidata
    cp {stand_in} {startup.PROVISIONER} && chmod 755 {startup.PROVISIONER}
    {functions}
    provision run --config={startup.CONFIG}
    """
    return in_namespace(script, f"{bin_dir}:{os.environ['PATH']}")


def test_exit_3_with_the_reboot_request_reboots(tmp_path: Path) -> None:
    result = provision(tmp_path, f"#!/bin/sh\necho > {REBOOT_MARKER}\nexit 3\n")
    assert "BuildStatus: rebooting to continue\nreboot called\n" in result.stdout, result.stdout + result.stderr
    assert "BuildFailed" not in result.stdout


def test_exit_3_without_the_reboot_request_is_a_loader_failure_not_a_reboot(tmp_path: Path) -> None:
    result = provision(tmp_path, "#!/bin/sh\necho 'Failed to execv() /tmp/staticx-x/provisioner' >&2\nexit 3\n")
    assert "BuildFailed: the provisioner could not start" in result.stdout, result.stdout + result.stderr
    assert "reboot called" not in result.stdout
    assert "poweroff called" in result.stdout
