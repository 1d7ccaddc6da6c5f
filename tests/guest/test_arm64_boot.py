"""`cos-customizer boot` of an arm64 image (issue 23): `sample-image -arch=arm64 -bootable` under qemu-system-aarch64.

The virt machine under TCG on this x86-64 machine, the firmware's SMBIOS saying Google Compute Engine, the
verified root set up by the arm64 initramfs; a COS-style check on serial port 2, which the arm64 guest names
/dev/ttyAMA1 (as COS on arm64 does; the startup script writes to /dev/ttyAMA2, port 3). About 40 s to the
check on an idle machine here, 70-85 s with other guests or emulated builds beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import CLI, data_digest
from tests.guest.conftest import left_in

USER_DATA = """#cloud-config
write_files:
- path: /tmp/check.sh
  permissions: '0644'
  content: |
    exec >/dev/ttyAMA1 2>&1
    echo "TestStatus: machine $(uname -m), kernel $(uname -r), PID 1 $(cat /proc/1/comm)"
    echo "TestStatus: root $(findmnt -n -o SOURCE /), product $(cat /sys/class/dmi/id/product_name)"
    echo "TestStatus: port 3 is $(readlink -f /dev/ttyAMA2), the console $(cat /sys/class/tty/console/active)"
    if [ "$(uname -m)" = aarch64 ] && grep -q " /mnt/stateful_partition " /proc/mounts; then
      echo "TestPass: the checks ran"
    else
      echo "TestFail: not an arm64 guest with STATE mounted"
    fi
runcmd:
- [bash, /tmp/check.sh]
"""


def test_an_arm64_image_boots_and_passes_a_check_from_inside(
    cli: CLI, bootable_arm64_raw: Path, private_tmp: Path, tmp_path: Path
) -> None:
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text(USER_DATA)
    before = data_digest(bootable_arm64_raw)
    started = time.monotonic()
    result = cli("boot", f"-image-file={bootable_arm64_raw}", f"-user-data={user_data}", "-serial-port=2",
                 "-success-match=TestPass", "-failure-match=TestFail", "-status-match=TestStatus",
                 "-timeout=8m")  # fmt: skip
    seconds = time.monotonic() - started
    output = result.out + result.err
    assert result.code == 0, output
    assert "boot 1 (TCG): verified image A (/syslinux/vmlinuz.A)" in output
    assert "TestStatus: machine aarch64, kernel 6.1.0-" in output and "-arm64, PID 1 systemd" in output
    assert "TestStatus: root /dev/dm-0, product Google Compute Engine" in output, output
    assert "TestStatus: port 3 is /dev/ttyS1" in output  # the PCI UART in port 3's slot, linked as ttyAMA2
    assert 'Serial port 2 said "TestPass: the checks ran": the guest passed (1 boot(s) under TCG' in output
    assert data_digest(bootable_arm64_raw) == before  # the image file is only read
    assert left_in(private_tmp) == []
    print(f"arm64 boot to the check: {seconds:.1f} s")
