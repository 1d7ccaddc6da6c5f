"""What a build ships, booted with `cos-customizer boot` and checked from inside the guest (issue 22).

The source is `sample-image -bootable -with-containers`. One build script writes to /var/lib, STATE and
OEM and pulls a container image from a registry on this machine's loopback (`-allow-host-loopback`),
tagged `ubuntu`; then `seal-oem` and `disable-auto-update`, `-oem-size=1G -disk-size-gb=12`, through the
local executor, written as GCE's `.tar.gz`. The same build through the qemu executor is booted with the
same checks in tests/guest/test_rehearsal.py (its preload VM loads the image from the build context).

The oracle is the booted guest: a cloud-config unit writing `TestStatus:` lines and `TestPass` or
`TestFail` to serial port 2, with the checks COS users run on real COS VMs (the files, `docker images`,
`docker run --pull=never`, the OEM mounted read-only from its verity device /dev/dm-1 with the grown size,
STATE's size, `usr-share-oem.mount` and `update-engine.service` masked, the build's workspace gone, /home).
A sealed OEM with one flipped byte in a file's block (found with stock debugfs) must fail the guest's
read. Every booted file is bit-identical afterwards. A guest that panics is reported as hung.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import gpt
from tests import registry
from tests.conftest import data_digest, sh
from tests.guest.conftest import left_in
from tests.integration.test_local_build import cli, copy_of, start

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root (debootstrap, the sample's guest)"),
]

# The files test_rehearsal.SCRIPT writes too, and an image pulled from a registry on this machine's loopback.
PRELOAD = """set -o errexit
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "in the OEM" > /usr/share/oem/hello
docker pull "$REGISTRY/ubuntu:latest"
docker tag "$REGISTRY/ubuntu:latest" ubuntu:latest
docker rmi "$REGISTRY/ubuntu:latest"
docker images
"""
STEPS = [["seal-oem"], ["disable-auto-update"]]
FINISH = ["-oem-size=1G", "-disk-size-gb=12"]

# The checks, as COS users write them for real COS VMs: a unit started from runcmd, its output on serial port 2.
CHECKS = """#cloud-config
write_files:
  - path: /tmp/checks/run.sh
    permissions: '0644'
    content: |
      set -o pipefail
      RESULT=pass
      check() { if eval "$2"; then echo "$1 pass"; else echo "$1 fail"; RESULT=fail; fi; }
      all() {
        check oemDevice 'test -b /dev/dm-1 && sudo mount -o ro /dev/dm-1 /usr/share/oem'
        check oemReadOnlyFromVerity '[[ $(findmnt -no MAJ:MIN /usr/share/oem | tr -d " ") == "$(cat /sys/block/dm-1/dev)" &&
          ,$(findmnt -no OPTIONS /usr/share/oem), == *,ro,* && $(dmsetup table "$(cat /sys/block/dm-1/dm/name)") == *" verity "* ]]'
        check stateHello '[[ "$(cat /mnt/stateful_partition/hello)" == "kept on STATE" ]]'
        check varLibHello '[[ "$(cat /var/lib/hello)" == "hello from the build" ]]'
        check oemHello '[[ "$(cat /usr/share/oem/hello)" == "in the OEM" ]]'
        check dockerImages '[[ "$(docker images --format {{.Repository}})" == ubuntu ]]'
        check dockerRun '[[ "$(docker run --pull=never --rm ubuntu echo ran)" == ran ]]'
        check homeDir '[[ "$(ls /home)" == chronos ]]'
        check workdirGone '[[ ! -e /var/lib/.cos-customizer ]]'
        check oemSize '(( $(df --output=size --block-size=1M /usr/share/oem | tail -n 1) > 800 ))'
        check stateSize '(( $(df --output=size --block-size=1M /mnt/stateful_partition | tail -n 1) > 7168 ))'
        check oemMountMasked '[[ "$(systemctl show -p LoadState --value usr-share-oem.mount)" == masked ]]'
        check autoUpdateMasked '! sudo systemctl -q status update-engine.service >/dev/null'
        check entropySource '[[ $(cat /sys/class/misc/hw_random/rng_current) == virtio_rng.* ]]'
        check osRelease '(. /etc/os-release && [[ $ID == cos && -n $VERSION_ID && -n $BUILD_ID ]])'
        [[ $RESULT == pass ]]
      }
      if all 2>&1 | sed "s/^/TestStatus: /"; then echo "TestPass: all checks passed"; else echo "TestFail: a check failed"; fi
  - path: /etc/systemd/system/checks.service
    permissions: '0644'
    content: |
      [Unit]
      Wants=network-online.target gcr-online.target docker.service
      After=network-online.target gcr-online.target docker.service
      [Service]
      Type=oneshot
      ExecStart=/bin/bash /tmp/checks/run.sh
      StandardOutput=tty
      StandardError=tty
      TTYPath=/dev/ttyS1
runcmd:
  - systemctl daemon-reload
  - systemctl --no-block start checks.service
"""
CHECK_NAMES = ("oemDevice", "oemReadOnlyFromVerity", "stateHello", "varLibHello", "oemHello", "dockerImages",
               "dockerRun", "homeDir", "workdirGone", "oemSize", "stateSize", "oemMountMasked", "autoUpdateMasked",
               "osRelease")  # fmt: skip

# Reading a file of a tampered sealed OEM through its verity device.
TAMPERED = """#cloud-config
runcmd:
  - [bash, -c, "exec >/dev/ttyS1 2>&1; mount -o ro /dev/dm-1 /usr/share/oem && echo 'TestStatus: mounted';
     if out=$(cat /usr/share/oem/hello 2>&1); then echo \\"TestPass: read $out\\";
     else echo \\"TestFail: $out\\"; fi"]
"""

# A guest that stops making progress: a kernel panic (no reboot), after one line on serial port 2.
HANG = """#cloud-config
runcmd:
  - [bash, -c, "echo 'TestStatus: hanging now' >/dev/ttyS1; echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger"]
"""


def boot(image: Path, user_data: Path, *flags: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cos_customizer", "boot", f"-image-file={image}", f"-user-data={user_data}",
            "-serial-port=2", "-success-match=TestPass", "-failure-match=TestFail", "-status-match=TestStatus",
            "-timeout=8m", *flags]  # fmt: skip
    env = {**os.environ, "COS_CUSTOMIZER_QEMU_ACCEL": "tcg", **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=env, timeout=600)


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checks") / "checks.cfg"
    path.write_text(CHECKS)
    return path


@pytest.fixture(scope="module")
def sealed_local(tmp_path_factory: pytest.TempPathFactory, bootable_raw: Path) -> Path:
    """The sealed local build, written as GCE's `.tar.gz` (the format users upload)."""
    tmp = tmp_path_factory.mktemp("local")
    registry.busybox_layer(tmp / "busybox.tar")
    with registry.Registry(tmp_path_factory.mktemp("registry")) as reg:
        registry.push_image(reg, "ubuntu", "latest", [tmp / "busybox.tar"])
        steps = [["run-script", "-script=preload.sh", f"-env=REGISTRY={reg.host}"], *STEPS]
        started = start(tmp, copy_of(bootable_raw, tmp), {"preload.sh": PRELOAD}, steps)
        code, _, err = cli(started.env, "finish-image-build", f"-output={tmp / 'out.tar.gz'}", "-allow-host-loopback",
                           *FINISH)  # fmt: skip
    assert code == 0, err
    return tmp / "out.tar.gz"


def passed(result: subprocess.CompletedProcess[str]) -> None:
    """Every check of CHECKS passed inside the guest (boot reports the status lines on stderr)."""
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CHECK_NAMES:
        assert f"TestStatus: {name} pass\n" in result.stderr, result.stderr
    assert "TestPass: all checks passed" in result.stderr


def test_a_sealed_local_build_as_a_gce_tar_gz_passes_cos_checks_from_inside(
    sealed_local: Path, checks: Path, bootable_raw: Path
) -> None:
    before, source_before = data_digest(sealed_local), data_digest(bootable_raw)
    passed(boot(sealed_local, checks))
    assert (data_digest(sealed_local), data_digest(bootable_raw)) == (before, source_before)


def test_a_tampered_sealed_oem_fails_the_guests_read(sealed_local: Path, tmp_path: Path, private_tmp: Path) -> None:
    sh("tar", "-xSzf", sealed_local, "-C", tmp_path)
    tampered = tmp_path / "disk.raw"
    oem = next(p for p in gpt.read_table(tampered).partitions if p.name == "OEM")
    # The OEM file system's block of /hello, as stock debugfs maps it; its first byte flipped.
    block = int(sh("debugfs", "-R", "bmap /hello 0", f"{tampered}?offset={oem.first * 512}").stdout.split()[-1])
    with open(tampered, "r+b") as file:
        file.seek(oem.first * 512 + block * 4096)
        byte = file.read(1)
        assert byte == b"i"  # "in the OEM"
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    user_data = tmp_path / "tampered.cfg"
    user_data.write_text(TAMPERED)
    before = data_digest(tampered)
    result = boot(tampered, user_data, tmpdir=private_tmp)
    assert "TestStatus: mounted\n" in result.stderr, result.stderr
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        1,
        "cos-customizer: error: serial port 2 matched -failure-match: "
        "TestFail: cat: /usr/share/oem/hello: Input/output error",
    )
    assert data_digest(tampered) == before
    assert left_in(private_tmp) == []  # a failed boot leaves nothing: files, QEMU, socat


def test_a_hung_guest_is_reported_with_its_console(bootable_raw: Path, tmp_path: Path) -> None:
    user_data = tmp_path / "hang.cfg"
    user_data.write_text(HANG)
    result = boot(bootable_raw, user_data, "-hang-timeout=20s")
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 1, result.stderr
    assert last.startswith(
        "cos-customizer: error: instance vm: the guest made no progress for 20s (no serial output, no disk I/O): "
        "it hangs; the console's last lines: "
    ), last
    assert "Kernel panic - not syncing: sysrq triggered crash" in last
    # Where it hangs, for whoever looks for a cause: the vCPUs' instruction pointers, QEMU's threads.
    assert re.search(r"instance vm hangs: vCPUs: 0 at [0-9a-f]+.*, 1 at [0-9a-f]+.*; QEMU's threads: .*CPU 1/TCG [RS]",
                     result.stderr), result.stderr  # fmt: skip
    assert last.endswith(
        "; serial port 2's last lines: TestStatus: hanging now; "
        "if it may be that quiet, raise -hang-timeout (0 waits for -timeout)"
    ), last
