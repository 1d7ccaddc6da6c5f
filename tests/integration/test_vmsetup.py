"""The provisioner's setup before the steps, against the original's (src/pkg/provisioner/provisioner.go, setup):
a tmpfs on /root, then `docker-credential-gcr configure-docker`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import privilege

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for mount namespaces"),
]

PREPARE = """
import json, sys
from pathlib import Path
from cos_customizer.provisioner import vmsetup
from cos_customizer.provisioner.target import Target
said = []
vmsetup.prepare(Target(root=Path(sys.argv[1]), chroot=True), said.append)
print(json.dumps(said))
"""


def prepare(root: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "HOME": "/nonexistent"}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--fork", sys.executable, "-c", PREPARE, str(root)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip


def test_the_images_credential_helper_configures_docker_with_home_on_a_tmpfs(tmp_path: Path) -> None:
    root = tmp_path / "root-fs"
    for directory in ("bin", "usr/bin", "root", "proc", "var"):
        (root / directory).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "stat", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    helper = root / "usr/bin/docker-credential-gcr"
    helper.write_text('#!/bin/sh\necho "$* HOME=$HOME $(stat -f -c %T "$HOME")" > /var/helper.log\necho configured\n')
    helper.chmod(0o755)
    result = prepare(root, "/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert (root / "var/helper.log").read_text() == "configure-docker HOME=/root tmpfs\n"
    assert json.loads(result.stdout) == ["Configuring docker with /usr/bin/docker-credential-gcr", "configured"]
    assert not any((root / "root").iterdir())  # the tmpfs went with the namespace; nothing written under it


def test_without_a_credential_helper_the_build_goes_on_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "root-fs"
    (root / "root").mkdir(parents=True)
    result = prepare(root, "/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "docker-credential-gcr is not on this image: docker gets no Google registry credentials"
    ]
