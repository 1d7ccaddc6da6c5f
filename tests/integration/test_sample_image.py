"""`cos-customizer sample-image`: checked with sgdisk, veritysetup, e2fsck and a chroot."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from cos_customizer.disk import ext, gpt, grub, loop
from cos_customizer.errors import ValidationError
from cos_customizer.sample import image as sample_image
from tests.conftest import CLI, SAMPLE_FIXTURES
from tests.integration.test_gpt import COS_LAYOUT

# The table of 03-cos-disk.md for 10 GiB: number, name, first, last; and the types.
SPEC = [(n, name, first, 20971486 if last is None else last) for n, name, first, last, _ in COS_LAYOUT]
GPT_TYPES = {name: type_guid for _, name, _, _, type_guid in COS_LAYOUT}


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_partition_table_is_the_cos_table(sample_raw: Path) -> None:
    assert "No problems found" in sh("sgdisk", "-v", str(sample_raw))
    table = gpt.read_table(sample_raw)
    assert table.disk_sectors == 10 * 2097152
    assert [(p.number, p.name, p.first, p.last) for p in table.partitions] == SPEC
    for part in table.partitions:
        assert part.type_guid == GPT_TYPES[part.name]
    kern_a, kern_b = table.partition(2), table.partition(4)
    assert kern_a.priority > kern_b.priority
    assert kern_a.successful
    listed = [line.split() for line in sh("sgdisk", "-p", str(sample_raw)).splitlines()]
    rows = [(int(w[0]), w[-1], int(w[1]), int(w[2])) for w in listed if len(w) >= 7 and w[0].isdigit()]
    assert rows == sorted(SPEC)


def test_sparse_and_small(sample_raw: Path) -> None:
    assert sample_raw.stat().st_size == 10 << 30
    assert sample_raw.stat().st_blocks * 512 < 300 << 20


@pytest.mark.parametrize("grub_format", ["dm", "dm-mod"])
def test_root_a_verifies_against_grub_cfg(request: pytest.FixtureRequest, grub_format: str, tmp_path: Path) -> None:
    sample_raw: Path = request.getfixturevalue(SAMPLE_FIXTURES[grub_format])
    table = gpt.read_table(sample_raw)
    cfg = grub.read_grub_cfg(sample_raw, table.partition(12).first * 512)
    entries = grub.read_dm(cfg)
    assert len(entries) == 2
    vroot_a, vroot_b = entries[0][0], entries[1][0]
    root_a, root_b = table.partition(3), table.partition(5)
    # The verity argument in the form asked for, exactly (kernel dm-mod.create and verity table syntax).
    uid_a, digest, salt = str(root_a.guid).upper(), vroot_a.params["root_hexdigest"], vroot_a.params["salt"]
    verified_a = next(line for line in cfg.splitlines() if "vmlinuz.A" in line and "dm-0" in line)
    if grub_format == "dm-mod":
        assert "dm=" not in cfg
        assert verified_a.endswith(
            f'cros_efi root=/dev/dm-0 dm-mod.create="vroot,,,ro,0 4128768 verity 0 PARTUUID={uid_a} '
            f'PARTUUID={uid_a} 4096 4096 516096 516096 sha256 {digest} {salt}"'
        )
    else:
        assert "dm-mod.create=" not in cfg
        assert verified_a.endswith(
            f'cros_efi root=/dev/dm-0 dm="1 vroot none ro 1,0 4128768 verity payload=PARTUUID={uid_a} '
            f'hashtree=PARTUUID={uid_a} hashstart=4128768 alg=sha256 root_hexdigest={digest} salt={salt}"'
        )
    assert vroot_a.form == vroot_b.form == grub_format
    assert vroot_a.params["payload"] == f"PARTUUID={str(root_a.guid).upper()}"
    assert vroot_b.params["payload"] == f"PARTUUID={str(root_b.guid).upper()}"
    assert vroot_a.params["root_hexdigest"] == vroot_b.params["root_hexdigest"]
    assert all("cros_efi" in line for line in cfg.splitlines() if line.strip().startswith("linux"))
    # veritysetup on ROOT-A, extracted to its own sparse file (no loop device needed).
    part = tmp_path / "root-a.raw"
    sh("dd", f"if={sample_raw}", f"of={part}", "bs=1M", f"skip={root_a.first * 512}", f"count={root_a.size * 512}",
       "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none")  # fmt: skip
    blocks = vroot_a.sectors // 8
    result = subprocess.run(
        ["veritysetup", "verify", "--format=0", "--no-superblock", "--hash=sha256", "--data-block-size=4096",
         "--hash-block-size=4096", f"--data-blocks={blocks}", f"--hash-offset={int(vroot_a.params['hashstart']) * 512}",
         f"--salt={vroot_a.params['salt']}", str(part), str(part), vroot_a.params["root_hexdigest"]],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # One changed byte in the file system breaks it.
    with open(part, "r+b") as f:
        f.seek(4096 * 3)
        byte = f.read(1)
        f.seek(4096 * 3)
        f.write(bytes([byte[0] ^ 1]))
    broken = subprocess.run([*result.args[:-1], result.args[-1]], capture_output=True, check=False)
    assert broken.returncode != 0


def test_file_systems(sample_raw: Path) -> None:
    table = gpt.read_table(sample_raw)
    for number, label in ((1, "STATE"), (3, "ROOT-A"), (8, "OEM")):
        offset = table.partition(number).first * 512
        ext.check(sample_raw, offset)
        assert ext.info(sample_raw, offset).label == label
    state = ext.device(sample_raw, table.partition(1).first * 512)
    listing = sh("debugfs", "-R", "ls -p /var_overlay", state) + sh("debugfs", "-R", "ls -p /", state)
    for name in ("lib", "log", "cache", "tmp", "home", "dev_image"):
        assert f"/{name}/" in listing
    assert "/chronos/" in sh("debugfs", "-R", "ls -p /home", state)
    assert ext.info(sample_raw, table.partition(8).first * 512).size == 16 << 20
    label = sh("mlabel", "-s", "-i", f"{sample_raw}@@{table.partition(12).first * 512}", "::")
    assert "EFI-SYSTEM" in label


@pytest.mark.root
def test_chroot_into_root_a_runs_a_pipeline(sample_raw: Path, tmp_path: Path) -> None:
    if subprocess.run(["id", "-u"], capture_output=True, text=True, check=True).stdout.strip() != "0":
        pytest.skip("needs root for a loop device and a mount")
    root_a = gpt.read_table(sample_raw).partition(3)
    target = tmp_path / "root"
    with loop.partition_mounted(sample_raw, offset=root_a.first * 512, size=root_a.size * 512, target=target):
        out = sh("chroot", str(target), "bash", "-c", "echo ok | sed s/ok/fine/ | grep fine")
        os_release = (target / "etc/os-release").read_text()
        passwd = (target / "etc/passwd").read_text()
    assert out == "fine\n"
    assert 'NAME="Container-Optimized OS"' in os_release and "ID=cos" in os_release
    assert "BUILD_ID=" in os_release and "VERSION=" in os_release
    assert passwd.startswith("root:") and "\nchronos:" in passwd
    assert loop.attached_to(sample_raw) == []
    assert str(target) not in Path("/proc/mounts").read_text()


def test_bigger_disk_extends_state(tmp_path: Path) -> None:
    sample = sample_image.build(tmp_path / "big.raw", 20)
    table = gpt.read_table(sample.path)
    assert table.partition(1).last == 20 * 2097152 - 34
    assert [(p.number, p.first, p.last) for p in table.partitions][1:] == [(n, f, la) for n, _, f, la in SPEC][1:]
    assert "No problems found" in sh("sgdisk", "-v", str(sample.path))


def test_cli_writes_atomically_and_refuses_to_overwrite(cli: CLI, tmp_path: Path) -> None:
    out = tmp_path / "s.raw"
    result = cli("sample-image", str(out))
    assert result.code == 0, result.err
    assert "ROOT-A verity root hash" in result.err
    before = (out.stat().st_mtime_ns, out.stat().st_size, gpt.read_table(out))
    again = cli("sample-image", str(out))
    assert (again.code, again.err) == (
        1,
        f"cos-customizer: error: {out} already exists: remove it or choose another name\n",
    )
    assert (out.stat().st_mtime_ns, out.stat().st_size, gpt.read_table(out)) == before
    missing = cli("sample-image", str(tmp_path / "no" / "s.raw"))
    assert missing.code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "s.raw"]


def test_cli_grub_format(cli: CLI, tmp_path: Path) -> None:
    out = tmp_path / "s.raw"
    result = cli("sample-image", str(out), "-grub-format=dm-mod")
    assert result.code == 0, result.err
    cfg = grub.read_grub_cfg(out, gpt.read_table(out).partition(12).first * 512)
    assert [[(t.name, t.form) for t in line] for line in grub.read_dm(cfg)] == [[("vroot", "dm-mod")]] * 2
    bad = cli("sample-image", str(tmp_path / "t.raw"), "-grub-format=dm-verity")
    assert (bad.code, bad.err) == (
        1,
        'cos-customizer: error: invalid value "dm-verity" for flag -grub-format: use one of dm, dm-mod\n',
    )
    assert not (tmp_path / "t.raw").exists()
    bad = cli("sample-image", str(tmp_path / "t.raw"), "-arch=riscv64")
    assert (bad.code, bad.err) == (
        1,
        "cos-customizer: error: invalid value \"riscv64\" for flag -arch: unknown architecture 'riscv64': "
        "use amd64 or arm64\n",
    )
    assert not (tmp_path / "t.raw").exists()
    with pytest.raises(ValidationError, match="-grub-format=dmmod: use one of dm, dm-mod"):
        sample_image.build(tmp_path / "u.raw", grub_format="dmmod")


def test_failure_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample_image, "format_verity", broken)
    with pytest.raises(OSError):
        sample_image.build(tmp_path / "s.raw")
    assert list(tmp_path.iterdir()) == []


def test_fresh_guids_each_time(tmp_path: Path) -> None:
    a = {p.guid for p in sample_image.partitions(20971520)}
    b = {p.guid for p in sample_image.partitions(20971520)}
    assert not a & b
    assert all(isinstance(g, uuid.UUID) for g in a)
