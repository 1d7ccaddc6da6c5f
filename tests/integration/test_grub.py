"""grub.cfg edits: pure functions against expected text, and the FAT round trip."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import gpt, grub
from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner import steps
from cos_customizer.provisioner.config import ProvisionerConfig, SealOEMArgs
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from tests.conftest import data_digest

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


# The upstream form, and the original's appendDMEntryToGRUB as the oracle (seal_oem_partition.go).
# A real "verified image A" line (dims/cos-tools, cos_image_analyzer testdata image1), in both forms.
REAL_HEAD = (
    "  linux /syslinux/vmlinuz.A init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 "
    "noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false "
    "systemd.legacy_systemd_cgroup_controller=false csm.disabled=1  dm_verity.error_behavior=3 "
    "dm_verity.max_bios=-1 dm_verity.dev_wait=1       i915.modeset=1 cros_efi root=/dev/dm-0 "
)
REAL_DM = (
    REAL_HEAD + 'dm="1 vroot none ro 1,0 2539520 verity payload=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E '
    "hashtree=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashstart=2539520 alg=sha256 "
    "root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be "
    'salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"'
)
REAL_DM_MOD = (
    REAL_HEAD + 'dm-mod.create="vroot,,,ro,0 2539520 verity 0 PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E '
    "PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E 4096 4096 317440 317440 sha256 "
    "f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be "
    '096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b"'
)
# The seal's inputs: OEM PARTUUID, veritysetup's root hash and salt (the examples in the original's
# comments), OEMFSSize4K for -oem-size=1G.
SEAL_UUID = "9DB2AE75-98DC-5B4F-A38B-B3CB0B80B17F"
SEAL_HASH = "d6b862d01e01e6417a1b5e7eb0eed2a2189594b74325dd0749cd83bbf78f5dc8"
SEAL_SALT = "9cd7ba29a1771b2097a7d72be8c13b29766d7617c3b924eb0cf23ff5071fee47"


def seal(cfg: str) -> str:
    return grub.add_oem_verity(cfg, partuuid=SEAL_UUID, fs_size_4k=262144, root_hexdigest=SEAL_HASH, salt=SEAL_SALT)


# What appendDMEntryToGRUB("oemroot", SEAL_UUID, SEAL_HASH, SEAL_SALT, 262144) writes for each line,
# worked out by hand from the Go source.
ORIGINAL_DM = (
    REAL_HEAD + 'dm="2 vroot none ro 1,0 2539520 verity payload=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E '
    "hashtree=PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E hashstart=2539520 alg=sha256 "
    "root_hexdigest=f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be "
    "salt=096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b,"
    "oemroot none ro 1, 0 2097152 verity payload=PARTUUID=9DB2AE75-98DC-5B4F-A38B-B3CB0B80B17F "
    "hashtree=PARTUUID=9DB2AE75-98DC-5B4F-A38B-B3CB0B80B17F hashstart=2097152 alg=sha256 "
    "root_hexdigest=d6b862d01e01e6417a1b5e7eb0eed2a2189594b74325dd0749cd83bbf78f5dc8 "
    'salt=9cd7ba29a1771b2097a7d72be8c13b29766d7617c3b924eb0cf23ff5071fee47"'
)
ORIGINAL_DM_MOD = (
    REAL_HEAD + 'dm-mod.create="vroot,,,ro,0 2539520 verity 0 PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E '
    "PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E 4096 4096 317440 317440 sha256 "
    "f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be "
    "096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b;"
    "oemroot,,,ro,0 2097152 verity 0 PARTUUID=9DB2AE75-98DC-5B4F-A38B-B3CB0B80B17F "
    "PARTUUID=9DB2AE75-98DC-5B4F-A38B-B3CB0B80B17F 4096 4096 262144 262144 sha256 "
    "d6b862d01e01e6417a1b5e7eb0eed2a2189594b74325dd0749cd83bbf78f5dc8 "
    '9cd7ba29a1771b2097a7d72be8c13b29766d7617c3b924eb0cf23ff5071fee47"'
)


def wrap(line: str) -> str:
    return f'menuentry "verified image A" {{\n{line}\n}}\n'


@pytest.mark.parametrize(("line", "original"), [(REAL_DM, ORIGINAL_DM), (REAL_DM_MOD, ORIGINAL_DM_MOD)])
def test_add_oem_verity_is_the_originals_line(line: str, original: str) -> None:
    out = seal(wrap(line))
    assert out == wrap(original)
    assert seal(out) == out


def test_add_oem_verity_each_line_in_its_own_form() -> None:
    """The original keeps the form of the first dm-mod.create line for every later line; each line keeps its own."""
    cfg = wrap(REAL_DM_MOD) + "\n" + wrap(REAL_DM) + "\n" + wrap(REAL_DM_MOD)
    assert seal(cfg) == wrap(ORIGINAL_DM_MOD) + "\n" + wrap(ORIGINAL_DM) + "\n" + wrap(ORIGINAL_DM_MOD)


def test_add_oem_verity_inside_the_quote_not_at_the_end_of_the_line() -> None:
    """The original drops the line's last character, assuming it is the closing quote; we find the quote."""
    out = seal(wrap(REAL_DM_MOD + " quiet"))
    assert out == wrap(ORIGINAL_DM_MOD + " quiet")
    out = seal(wrap(REAL_DM + " quiet"))
    assert out == wrap(ORIGINAL_DM + " quiet")


@pytest.mark.parametrize("line", [ORIGINAL_DM, ORIGINAL_DM_MOD])
def test_read_dm_same_shape_for_both_forms(line: str) -> None:
    (vroot, oemroot), *rest = grub.read_dm(wrap(line))
    assert rest == []
    assert (vroot.name, vroot.start, vroot.sectors, vroot.target) == ("vroot", 0, 2539520, "verity")
    assert (oemroot.name, oemroot.start, oemroot.sectors, oemroot.target) == ("oemroot", 0, 2097152, "verity")
    assert {k: vroot.params[k] for k in ("payload", "hashtree", "hashstart", "alg", "root_hexdigest", "salt")} == {
        "payload": "PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E",
        "hashtree": "PARTUUID=E5822204-E5B9-2848-8A90-37790091EA3E",
        "hashstart": "2539520",
        "alg": "sha256",
        "root_hexdigest": "f24f966c2c8e2dab5caeffd2ca4c406f31d3a7f4ffb3bcf578bd96c535bc01be",
        "salt": "096198c60913c02972a43985fc8bb97ceb5359e75389d7ce7e3238139dd2078b",
    }
    assert {k: oemroot.params[k] for k in ("payload", "hashtree", "hashstart", "alg", "root_hexdigest", "salt")} == {
        "payload": f"PARTUUID={SEAL_UUID}",
        "hashtree": f"PARTUUID={SEAL_UUID}",
        "hashstart": "2097152",
        "alg": "sha256",
        "root_hexdigest": SEAL_HASH,
        "salt": SEAL_SALT,
    }
    assert vroot.form == oemroot.form == ("dm-mod" if "dm-mod.create" in line else "dm")


def test_read_dm_mod_hash_start_in_hash_blocks() -> None:
    value = "v,,,ro,0 64 verity 1 /dev/a /dev/b 4096 1024 8 3 sha256 00 -"
    (entry,) = grub.parse_dm_mod(value)
    assert (entry.params["data_blocks"], entry.params["hash_start_block"], entry.params["hashstart"]) == ("8", "3", "6")


@pytest.mark.parametrize(
    "value", ["vroot,,,0 8 verity", "vroot,,,ro,0 8", "vroot,,,ro,0 8 verity 0 a b 4096 4096 1", ",,,ro,0 8 linear"]
)
def test_parse_dm_mod_refuses_malformed(value: str) -> None:
    with pytest.raises(CustomizerError, match=re.escape("cannot parse dm-mod.create=")):
        grub.parse_dm_mod(value)


NO_VERITY_MESSAGE = (
    "grub.cfg has no dm= or dm-mod.create= verity line to add the OEM to: "
    "seal-oem needs the verified boot entries of a COS image's efi/boot/grub.cfg"
)


def test_check_oem_verity() -> None:
    for good in (CFG, wrap(REAL_DM), wrap(REAL_DM_MOD), wrap(ORIGINAL_DM), wrap(ORIGINAL_DM_MOD)):
        grub.check_oem_verity(good)
    local_only = "\n".join(line for line in CFG.splitlines() if "dm=" not in line)
    with pytest.raises(CustomizerError) as caught:
        grub.check_oem_verity(local_only)
    assert str(caught.value) == NO_VERITY_MESSAGE
    with pytest.raises(CustomizerError, match=re.escape('grub.cfg has dm="3 vroot none ro 1,...": seal-oem adds')):
        grub.check_oem_verity('linux cros_efi dm="3 vroot none ro 1,0 8 verity,a none ro 1,0 8 verity,b none ro 1,0"')


def test_sealed_line_tokens_are_the_originals() -> None:
    """seal-oem's grub.cfg edits on a line, against the original's: appendDMEntryToGRUB, then AddCmdToGRUB of
    update-engine.service, then of usr-share-oem.mount (each inserted as " CMD " right after cros_efi)."""
    for line, appended in ((REAL_DM, ORIGINAL_DM), (REAL_DM_MOD, ORIGINAL_DM_MOD)):
        ours = grub.mask_units(seal(line), grub.UPDATE_ENGINE, grub.OEM_MOUNT)
        original = appended.replace(
            "cros_efi ", "cros_efi systemd.mask=usr-share-oem.mount  systemd.mask=update-engine.service  ", 1
        )
        assert ours.split() == original.split()
        tokens = ours.split()
        after = tokens.index("cros_efi")
        assert tokens[after : after + 4] == [
            "cros_efi", "systemd.mask=usr-share-oem.mount", "systemd.mask=update-engine.service", "root=/dev/dm-0"
        ]  # fmt: skip


@pytest.mark.parametrize("access", ["mtools", "mount"])
def test_seal_without_a_verity_line_fails_first_and_changes_nothing(
    tmp_path: Path, sample_raw: Path, access: str
) -> None:
    """Nothing is sealed, masked, unmounted or written when grub.cfg has no verity line to add the OEM to."""
    if access == "mount" and (not privilege.can_mount() or "vfat" not in Path("/proc/filesystems").read_text()):
        pytest.skip("mounting the EFI partition needs root and the vfat file system in this kernel")
    image = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(sample_raw), str(image)], check=True)
    efi = gpt.read_table(image).partition(12).first * 512
    local_only = "\n".join(line for line in grub.read_grub_cfg(image, efi).splitlines() if "dm=" not in line)
    grub.write_grub_cfg(image, efi, local_only)
    before = data_digest(image)
    calls = tmp_path / "systemctl-calls"
    target = Target(root=tmp_path / "root", disk=image, partition_template="", efi_access=access,
                    systemctl=("sh", "-c", f'echo "$@" >> {calls}', "systemctl"))  # fmt: skip
    config = ProvisionerConfig().with_boot_disk(oem_fs_size_4k=4096, reclaim_sda3=True)
    context = steps.Context(target, State(tmp_path / "state", config), lambda _line: None)
    with pytest.raises(CustomizerError) as caught:
        steps.seal_oem(context, SealOEMArgs())
    assert str(caught.value) == NO_VERITY_MESSAGE
    assert data_digest(image) == before
    assert grub.read_grub_cfg(image, efi) == local_only
    assert not calls.exists()
    assert context.results == {}
