"""A local build of an arm64 image on this x86-64 machine (issue 23), checked with standard tools.

The source is `sample-image -arch=arm64 -with-containers` (Debian's arm64 programs and container runtime).
Its script runs under qemu-aarch64-static through a binfmt_misc registration the tool makes for the
build and removes afterwards; the image's own arm64 dockerd pulls a two-architecture image from a
registry on this machine's loopback and must pick the arm64 one. The output passes the checks an
x86-64 build's does (test_local_build): sgdisk, veritysetup with grub.cfg's parameters, debugfs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cos_customizer import linux, privilege
from cos_customizer.disk import ext, gpt, grub
from tests import registry
from tests.conftest import data_digest, sh
from tests.integration.test_local_build import cat, cli, copy_of, exists, leaks, start, verity_verify

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
]

BINFMT = Path("/proc/sys/fs/binfmt_misc")
SCRIPT = """set -e
echo "machine: $(uname -m)"
echo "arm64 was here" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "in the OEM" > /usr/share/oem/hello
sha256sum /var/lib/hello | cut -c1-16 > /var/lib/sum
docker pull -q "$IMAGE" > /dev/null
echo "pulled: $(docker image inspect --format '{{.Architecture}}' "$IMAGE")"
docker image inspect --format '{{range .RootFS.Layers}}{{.}}{{end}}' "$IMAGE" > /var/lib/pulled-layer
echo "step done"
"""


@contextmanager
def binfmt_view() -> Iterator[Path]:
    """binfmt_misc, mounted here for the time of the block if it is not (then unmounted)."""
    if (BINFMT / "register").exists():
        yield BINFMT
        return
    linux.mount("binfmt_misc", str(BINFMT), "binfmt_misc")
    try:
        yield BINFMT
    finally:
        linux.umount(str(BINFMT))


def registrations() -> tuple[bool, dict[str, str]]:
    """Whether binfmt_misc is mounted, and every registration but those of other cos-customizer runs."""
    mounted = (BINFMT / "register").exists()
    with binfmt_view() as root:
        found = {p.name: p.read_text() for p in sorted(root.iterdir()) if p.name not in ("register", "status")}
    return mounted, found


def arch_layer(path: Path, arch: str) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("data")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        data = f"{arch}\n".encode()
        info = tarfile.TarInfo("data/arch")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sample_arm64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample-arm64") / "arm64.raw"
    code, _, err = cli(dict(os.environ), "sample-image", "-arch=arm64", "-with-containers", str(path))
    assert code == 0, err
    return path


def test_an_arm64_image_is_built_here_under_emulation(sample_arm64: Path, tmp_path: Path) -> None:
    # Oracle for the machine: the ELF header of the sample's own programs, read by `file` (not by our reader).
    bash = sh("debugfs", "-R", "dump /usr/bin/bash " + str(tmp_path / "bash"),
              ext.device(sample_arm64, gpt.read_table(sample_arm64).partition(3).first * 512))  # fmt: skip
    assert bash.returncode == 0
    assert "ARM aarch64" in sh("file", "-b", tmp_path / "bash").stdout
    before = registrations()
    for arch in ("amd64", "arm64"):
        arch_layer(tmp_path / f"{arch}.tar", arch)
    with registry.Registry(tmp_path / "registry") as reg:
        registry.push_index(reg, "multi", "1", {a: [tmp_path / f"{a}.tar"] for a in ("amd64", "arm64")})
        image = f"{reg.host}/multi:1"
        started = start(tmp_path, copy_of(sample_arm64, tmp_path), {"build.sh": SCRIPT},
                        [["run-script", "-script=build.sh", f"-env=IMAGE={image}"], ["seal-oem"],
                         ["disable-auto-update"]])  # fmt: skip
        output = tmp_path / "out.raw"
        code, out, err = cli(started.env, "finish-image-build", f"-output={output}", "-oem-size=1G",
                             "-disk-size-gb=12", "-allow-host-loopback", "-containers=on")  # fmt: skip
    assert code == 0, err
    assert "Build succeeded" in out
    assert "[run-script build.sh] machine: aarch64" in err
    assert "[run-script build.sh] pulled: arm64" in err
    assert "dockerd runs with --iptables=false: iptables cannot run under qemu-user emulation" in err
    assert "[run-script build.sh] step done" in err
    registered = re.search(r"binfmt_misc (cos-customizer-aarch64-\d+-\d+)", err)
    assert registered, err
    # The host's registrations as they were: the build's own is gone, nobody else's changed.
    after = registrations()
    assert after[0] == before[0]
    assert registered.group(1) not in after[1]
    assert {k: v for k, v in after[1].items() if not k.startswith("cos-customizer-")} == {
        k: v for k, v in before[1].items() if not k.startswith("cos-customizer-")
    }
    # The output, by stock tools: the table, both verity devices, the files.
    assert "No problems found" in sh("sgdisk", "-v", output).stdout
    table = gpt.read_table(output)
    assert table.disk_sectors == 12 * 2097152
    oem, state, root_b = table.partition(8), table.partition(1), table.partition(5)
    cfg = grub.read_grub_cfg(output, table.partition(12).first * 512)
    entries = grub.read_dm(cfg)
    assert [[t.name for t in line] for line in entries] == [["vroot", "oemroot"], ["vroot", "oemroot"]]
    assert verity_verify(output, root_b, entries[1][0]).returncode == 0
    verified = verity_verify(output, oem, entries[0][1])
    assert verified.returncode == 0, verified.stderr
    s, o = state.first * 512, oem.first * 512
    assert cat(output, s, "/var_overlay/lib/hello") == "arm64 was here\n"
    assert cat(output, s, "/hello") == "kept on STATE\n"
    assert cat(output, o, "/hello") == "in the OEM\n"
    assert cat(output, s, "/var_overlay/lib/sum") == hashlib.sha256(b"arm64 was here\n").hexdigest()[:16] + "\n"
    # The arm64 layer, not the amd64 one: its diff_id is the sha256 of the layer tar pushed.
    arm64_layer = hashlib.sha256((tmp_path / "arm64.tar").read_bytes()).hexdigest()
    assert cat(output, s, "/var_overlay/lib/pulled-layer") == f"sha256:{arm64_layer}\n"
    assert not exists(output, s, "/var_overlay/lib/.cos-customizer")
    ext.check(output, s)
    ext.check(output, o)
    assert leaks(tmp_path) == ([], [])
    assert data_digest(started.source) == started.digest
