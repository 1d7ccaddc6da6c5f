"""grub.cfg edits: pure functions against expected text, and the FAT round trip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cos_customizer.disk import grub
from cos_customizer.errors import CustomizerError

A = "AAAAAAAA-1111-4111-8111-111111111111"
B = "BBBBBBBB-2222-4222-8222-222222222222"
OEM = "CCCCCCCC-3333-4333-8333-333333333333"
HEX = "ab" * 32
SALT = "cd" * 32


def dm(partuuid: str) -> str:
    return (
        f'dm="1 vroot none ro 1,0 4128768 verity payload=PARTUUID={partuuid} hashtree=PARTUUID={partuuid} '
        f'hashstart=4128768 alg=sha256 root_hexdigest={HEX} salt={SALT}"'
    )


CFG = f"""set timeout=0

menuentry "local image A" {{
  linux /syslinux/vmlinuz.A init=/sbin/init boot=local rootwait ro console=ttyS0 cros_efi root=PARTUUID={A}
}}

menuentry "verified image A" {{
  linux /syslinux/vmlinuz.A init=/sbin/init boot=local rootwait ro console=ttyS0 cros_efi root=/dev/dm-0 {dm(A)}
}}

menuentry "verified image B" {{
  linux /syslinux/vmlinuz.B init=/sbin/init boot=local rootwait ro console=ttyS0 cros_efi root=/dev/dm-0 {dm(B)}
}}
"""


def test_mask_units_inserts_after_cros_efi_once_per_line() -> None:
    out = grub.mask_units(CFG, grub.UPDATE_ENGINE)
    lines = [line for line in out.splitlines() if "cros_efi" in line]
    assert len(lines) == 3
    for line in lines:
        assert "cros_efi systemd.mask=update-engine.service root=" in line
        assert line.count("systemd.mask=update-engine.service") == 1
    assert grub.mask_units(out, grub.UPDATE_ENGINE) == out
    assert out.replace(" systemd.mask=update-engine.service", "") == CFG


def test_mask_units_adds_only_what_is_missing() -> None:
    once = grub.mask_units(CFG, grub.UPDATE_ENGINE)
    both = grub.mask_units(once, grub.UPDATE_ENGINE, grub.OEM_MOUNT)
    for line in (line for line in both.splitlines() if "cros_efi" in line):
        assert "cros_efi systemd.mask=usr-share-oem.mount systemd.mask=update-engine.service root=" in line
    assert grub.mask_units(both, grub.UPDATE_ENGINE, grub.OEM_MOUNT) == both


def test_mask_units_ignores_lines_without_the_anchor_and_lookalikes() -> None:
    text = "linux /vmlinuz cros_efix root=x\nset a=cros_efi_b\n"
    assert grub.mask_units(text, grub.UPDATE_ENGINE) == text


def test_add_oem_verity_exact_text() -> None:
    out = grub.add_oem_verity(CFG, partuuid=OEM, fs_size_4k=4096, root_hexdigest="11" * 32, salt="22" * 32)
    expected_tail = (
        f",oemroot none ro 1, 0 32768 verity payload=PARTUUID={OEM} hashtree=PARTUUID={OEM} hashstart=32768 "
        f'alg=sha256 root_hexdigest={"11" * 32} salt={"22" * 32}"'
    )
    verified = [line for line in out.splitlines() if "dm=" in line]
    assert len(verified) == 2
    for line in verified:
        assert 'dm="2 vroot none ro 1,0 4128768 verity' in line
        assert line.endswith(expected_tail)
    assert grub.add_oem_verity(out, partuuid=OEM, fs_size_4k=4096, root_hexdigest="11" * 32, salt="22" * 32) == out
    # The local (non-verified) entry is untouched.
    assert out.splitlines()[3] == CFG.splitlines()[3]


def test_read_dm_back() -> None:
    out = grub.add_oem_verity(CFG, partuuid=OEM, fs_size_4k=4096, root_hexdigest="11" * 32, salt="22" * 32)
    entries = grub.read_dm(out)
    assert [[t.name for t in line] for line in entries] == [["vroot", "oemroot"], ["vroot", "oemroot"]]
    vroot, oemroot = entries[0]
    assert (vroot.start, vroot.sectors, vroot.target) == (0, 4128768, "verity")
    assert vroot.params["payload"] == f"PARTUUID={A}"
    assert vroot.params["root_hexdigest"] == HEX
    assert (oemroot.sectors, oemroot.params["hashstart"], oemroot.params["salt"]) == (32768, "32768", "22" * 32)
    assert entries[1][0].params["payload"] == f"PARTUUID={B}"


@pytest.mark.parametrize("value", ["vroot none ro 1,0 8 verity", "2 vroot none ro 1,0 8 verity", "1 vroot,0 8"])
def test_parse_dm_refuses_malformed(value: str) -> None:
    with pytest.raises(CustomizerError, match="cannot parse dm="):
        grub.parse_dm(value)


def test_fat_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    offset = 1 << 20
    with open(image, "wb") as out:
        out.truncate(64 << 20)
    subprocess.run(
        ["mkfs.vfat", "-n", "EFI-SYSTEM", f"--offset={offset // 512}", str(image), str(32 * 1024)],
        check=True,
        capture_output=True,
    )
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    for directory in ("::/efi", "::/efi/boot"):
        subprocess.run(["mmd", "-i", f"{image}@@{offset}", directory], check=True, env=env)
    grub.write_grub_cfg(image, offset, CFG)
    assert grub.read_grub_cfg(image, offset) == CFG
    edited = grub.mask_units(CFG, grub.UPDATE_ENGINE)
    grub.write_grub_cfg(image, offset, edited)
    assert grub.read_grub_cfg(image, offset) == edited
