"""What a build script can reach of this machine through the image's container daemons: nothing.

Real local builds of the sample image with this machine's docker.io and containerd, whose scripts
attack the host the way a hostile build script would, with a static C probe (tests/sandbox_probe.c)
for what bash cannot do. Every check looks at the host afterwards: its sysctls, its files.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from cos_customizer import privilege
from tests import registry
from tests.integration.test_containers import Build, build, images, run  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the probe"),
    pytest.mark.skipif(
        not all(Path(p).exists() for p in (registry.DOCKERD, registry.CONTAINERD)),
        reason="needs Debian's docker.io and containerd (scripts/setup installs them)",
    ),
]

PROBE_SOURCE = Path(__file__).parents[1] / "sandbox_probe.c"
SYSCTL = Path("/proc/sys/kernel/printk_ratelimit")  # host-wide, harmless, restored by the test if it changed


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-o", binary, PROBE_SOURCE], check=True)
    return binary


def _image_of(binary: Path) -> bytes:
    """A root file system holding only /probe, for `docker import`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname="probe")
        info.mode, info.uid, info.gid = 0o755, 0, 0
        with binary.open("rb") as data:
            tar.addfile(info, data)
    return out.getvalue()


PROC_FD = """set -x
cp probe /mnt/disks/probe
mkdir -p /var/lib/handover
/mnt/disks/probe recv-sysctl /var/lib/handover/s sys/kernel/printk_ratelimit {value} &
docker import probe.tar probe:1
docker run --rm --network=none --security-opt systempaths=unconfined -v /var/lib/handover:/out probe:1 /probe send-proc /out/s
wait
"""


def test_a_proc_a_container_hands_over_changes_no_sysctl_of_the_host(
    build: Build,  # noqa: F811
    containers_raw: Path,
    probe: Path,
) -> None:
    # A container with an unmasked /proc sends the script a descriptor of it; the script writes a host-wide
    # sysctl through it. That works for a process that is uid 0 on the host; the script must not be one.
    before = SYSCTL.read_text()
    value = str(int(before) + 7)
    shutil.copy(probe, build.context / "probe")
    (build.context / "probe.tar").write_bytes(_image_of(probe))
    (build.context / "attack.sh").write_text(PROC_FD.format(value=value))
    build.steps(containers_raw, "attack.sh")
    try:
        code, out = run(build.finish(build.tmp / "out.raw"))
    finally:
        after = SYSCTL.read_text()
        if after != before:
            SYSCTL.write_text(before)
    assert after == before
    assert "RESULT send-proc ok" in out, out  # the attack did take place: the descriptor reached the script
    assert "RESULT recv-proc ok" in out, out
    assert "RESULT proc-fd-sysctl-write EACCES" in out, out
    assert code == 0, out


def test_a_link_planted_at_run_containerd_deletes_nothing_of_the_host(
    build: Build,  # noqa: F811
    containers_raw: Path,
) -> None:
    # The script, never using docker, swaps /run/containerd for a link to a directory of this machine; when
    # the build ends, the tool (this machine's root) removes the build's containerd socket: never through it.
    decoy = build.tmp / "host-run-containerd"
    decoy.mkdir()
    host_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_socket.bind(str(decoy / "containerd.sock"))
    (decoy / "other").write_text("a file of this machine\n")
    script = f"set -e\nrm -rf /run/containerd\nln -s {decoy} /run/containerd\nls -l /run/containerd\necho planted\n"
    (build.context / "plant.sh").write_text(script)
    build.steps(containers_raw, "plant.sh")
    try:
        code, out = run(build.finish(build.tmp / "out.raw"))
    finally:
        host_socket.close()
    assert "planted" in out
    assert code == 0, out
    assert sorted(p.name for p in decoy.iterdir()) == ["containerd.sock", "other"]
    assert (decoy / "other").read_text() == "a file of this machine\n"
