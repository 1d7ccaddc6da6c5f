"""Symbolic links in an untrusted image where the local build's stage mounts, binds, makes and unpacks.

The stage runs as this machine's root, and mount(2), mkdir and tar follow links: a STATE whose
/var_overlay is a link to "/" gave scripts this machine's root file system as /var, and the cleanup then
emptied this machine's /lib/systemd and /tmp (found by this test's first version, on this machine).
Each such path is now refused with one line naming it.

The links point at DECOYS, directories of the test shaped like what an attacker would aim at, with
marker files: if a guard ever fails again, the decoy changes (and the test fails), not this machine.
The links are made with stock debugfs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, gpt
from tests.conftest import sh, snapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
]

STATE = 1


def with_link(source: Path, target: Path, path: str, points_to: Path) -> None:
    """A copy of `source` whose STATE has `path` replaced by a symbolic link to `points_to`."""
    sh("cp", "--sparse=always", source, target)
    device = ext.device(target, gpt.read_table(target).partition(STATE).first * 512)
    sh("debugfs", "-w", "-R", f"unlink {path}", device)
    sh("debugfs", "-w", "-R", f"symlink {path} {points_to}", device)
    assert "Type: symlink" in sh("debugfs", "-R", f"stat {path}", device).stdout


def decoy(directory: Path) -> Path:
    """A tree shaped like a root file system, as a link in the image would aim at this machine's."""
    for relative in ("tmp/keep", "lib/systemd/keep", "var/lib/systemd/keep", "var/tmp/keep", "etc/keep",
                     "lib/keep", "systemd/keep", "google/keep", "cloud/keep", "docker/keep", "user/keep"):  # fmt: skip
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{relative}\n")
    return directory


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/var_overlay", "/var_overlay in STATE"),  # /var of the scripts would be this machine's /
        ("/var_overlay/lib", "/var/lib/google in the image"),  # the exec binds and the cleanup under /var/lib
        ("/var_overlay/lib/docker", "/var/lib/docker in the image"),
        ("/var_overlay/lib/.cos-customizer", "/var/lib/.cos-customizer/user in the image"),  # tar -x as root
    ],
)
def test_a_link_where_the_stage_works_as_root_is_refused(
    tmp_path: Path, sample_raw: Path, path: str, refused: str
) -> None:
    target = decoy(tmp_path / "decoy")
    before = snapshot(target), sorted(target.rglob("*"))
    source = tmp_path / "linked.raw"
    with_link(sample_raw, source, path, target)
    context = tmp_path / "context"
    context.mkdir()
    (context / "s.sh").write_text("echo ran; touch /var/lib/google/written /var/written\n")
    env = {**os.environ, "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws")}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cos_customizer", *argv], env=env, capture_output=True,
                              text=True, check=False, timeout=300)  # fmt: skip

    assert cli("start-image-build", f"-build-context={context}", f"-image-file={source}").returncode == 0
    assert cli("run-script", "-script=s.sh").returncode == 0
    result = cli("finish-image-build", f"-output={tmp_path / 'out.raw'}")
    assert (
        snapshot(target),
        sorted(target.rglob("*")),
    ) == before  # the decoy: what this machine's files would have suffered
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cos-customizer: error: {refused} is or goes through a symbolic link: refused (the build mounts it)"
    )
    assert "] ran" not in result.stderr
    assert not (tmp_path / "out.raw").exists()
