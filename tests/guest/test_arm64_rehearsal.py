"""The arm64 provisioner where it runs (issue 23): a rehearsal of an arm64 source under qemu-system-aarch64.

`finish-image-build -executor=qemu` of `sample-image -arch=arm64 -bootable`: the workflow's own
cloud-config starts the arm64 static provisioner (`build-provisioner -arch=arm64`'s, shipped on CIDATA)
under systemd as PID 1; it runs a script and, for the larger disk, asks for one reboot (the partitions are relocated at shutdown), then says `BuildSucceeded:` on serial port 3, which
the arm64 guest names /dev/ttyAMA2. Then the output boots with `cos-customizer boot` and a check passes
from inside. Under TCG on this x86-64 machine: about 3 minutes for the rehearsal, 1 for the boot.

Oracles: the guest's own `uname -m` and systemd, sgdisk, debugfs, and the guest's own view of the output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import gpt
from tests.conftest import data_digest, sh
from tests.guest.conftest import left_in
from tests.guest.test_boot_outputs import boot
from tests.integration.test_local_build import cat, cli, copy_of, leaks, start

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root (loop devices, debootstrap, binfmt_misc)"),
]

SCRIPT = """set -e
echo "machine $(uname -m), PID 1 $(cat /proc/1/comm)"
uname -m > /var/lib/machine
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "step done"
"""
CHECK = """#cloud-config
write_files:
- path: /tmp/check.sh
  permissions: '0644'
  content: |
    exec >/dev/ttyAMA1 2>&1
    echo "TestStatus: machine $(uname -m); built on $(cat /var/lib/machine)"
    if [ "$(uname -m)" = aarch64 ] && [ "$(cat /var/lib/machine)" = aarch64 ] \\
       && [ "$(cat /mnt/stateful_partition/hello)" = "kept on STATE" ]; then
      echo "TestPass: the rehearsed arm64 output"
    else
      echo "TestFail: the rehearsed arm64 output"
    fi
runcmd:
- [bash, /tmp/check.sh]
"""


def test_the_arm64_provisioner_builds_an_arm64_image_and_the_output_boots(
    bootable_arm64_raw: Path, tmp_path: Path
) -> None:
    started = start(tmp_path, copy_of(bootable_arm64_raw, tmp_path), {"build.sh": SCRIPT},
                    [["run-script", "-script=build.sh"]])  # fmt: skip
    (tmp_path / "t").mkdir()
    env = {**started.env, "TMPDIR": str(tmp_path / "t"), "COS_CUSTOMIZER_QEMU_ACCEL": "tcg"}
    output = tmp_path / "out.raw"
    code, out, err = cli(env, "finish-image-build", "-executor=qemu", f"-output={output}", "-oem-size=64M",
                         "-disk-size-gb=11", "-timeout=25m")  # fmt: skip
    assert code == 0, err[-4000:]
    # The arm64 provisioner ran under systemd in an aarch64 guest and reported on serial port 3.
    assert "BuildStatus: machine aarch64, PID 1 systemd" in err, err[-4000:]
    assert "BuildStatus: step done" in err
    assert "BuildSucceeded:" in err
    guest = re.search(r"Guest: (\d+) boot\(s\)", out + err)
    assert guest is not None and int(guest.group(1)) == 2, out  # one reboot: the relocation at shutdown
    # The output, by stock tools.
    assert "No problems found" in sh("sgdisk", "-v", output).stdout
    table = gpt.read_table(output)
    assert table.disk_sectors == 11 * 2097152
    state = table.partition(1).first * 512
    assert cat(output, state, "/var_overlay/lib/machine") == "aarch64\n"
    assert cat(output, state, "/hello") == "kept on STATE\n"
    assert leaks(tmp_path) == ([], [])
    assert left_in(tmp_path / "t") == []
    assert data_digest(started.source) == started.digest
    # The output boots (under qemu-system-aarch64 again) and passes a check from inside.
    checks = tmp_path / "checks.cfg"
    checks.write_text(CHECK)
    before = data_digest(output)
    booted = boot(output, checks, tmpdir=tmp_path / "t")
    assert booted.returncode == 0, booted.stdout + booted.stderr
    assert "TestStatus: machine aarch64; built on aarch64" in booted.stderr
    assert "TestPass: the rehearsed arm64 output" in booted.stderr
    assert data_digest(output) == before
    assert left_in(tmp_path / "t") == []
    assert not os.listdir(tmp_path / "t")
