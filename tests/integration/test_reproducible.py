"""Reproducible local builds: with SOURCE_DATE_EPOCH, two builds of the same inputs give the same bytes.

Oracles: the bytes of two independent builds (in different directories, from different copies of the
source), stock tools reading the output (sha256, e2fsck, dumpe2fs, debugfs, veritysetup, tar, qemu-img),
dumpe2fs's list of backup superblocks, a journal mke2fs made, and the epoch the test chose.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, gpt, grub, mover, reproducible, verity
from cos_customizer.errors import UsageError
from tests.conftest import CLI, sh
from tests.integration.test_local_build import cat, cli, copy_of, exists, start, verity_verify

EPOCH = 1700000000  # 2023-11-14 22:13:20 UTC
SCRIPT = """set -e
mkdir -p /var/lib/app/sub
for i in $(seq 1 60); do echo "file $i" > /var/lib/app/f$i; done
for i in $(seq 1 60 | grep 5); do rm /var/lib/app/f$i; done
for d in $(seq 1 100); do  # many small files: what made the kernel's block allocation depend on timing
  mkdir -p /var/lib/many/d$d && for f in $(seq 1 100); do echo "$d/$f" > /var/lib/many/d$d/f$f; done
  rm -f /var/lib/many/d$d/f*0
done
seq 1 200000 > /var/lib/app/sub/big
ln -s f1 /var/lib/app/link && ln /var/lib/app/f2 /var/lib/app/hard
echo scratch > /var/lib/app/gone && rm /var/lib/app/gone
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "in the OEM" > /usr/share/oem/hello
cat /var/lib/sample-image > /dev/null
"""
STEPS = [["run-script", "-script=preload.sh"], ["seal-oem"], ["disable-auto-update"]]
FINISH = ["-oem-size=1G", "-disk-size-gb=12"]


def digest(path: Path) -> str:
    """sha256 of the file's size, where its data is and what it holds: a stricter equality than the bytes
    alone (the holes must match too), with no need to read gigabytes of holes."""
    hashed = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        for offset, length in mover.data_extents(f.fileno(), 0, path.stat().st_size):
            hashed.update(f"{offset}+{length}".encode())
            for at in range(offset, offset + length, 8 << 20):
                hashed.update(os.pread(f.fileno(), min(8 << 20, offset + length - at), at))
    return hashed.hexdigest()


def build(tmp: Path, sample: Path, output_name: str, monkeypatch: pytest.MonkeyPatch, epoch: int | None) -> Path:
    """One whole local build, in its own directory, from its own copy of the sample."""
    tmp.mkdir()
    with monkeypatch.context() as patch:
        if epoch is None:
            patch.delenv(reproducible.EPOCH_ENV, raising=False)
        else:
            patch.setenv(reproducible.EPOCH_ENV, str(epoch))
        patch.setenv("TZ", "UTC")  # FAT keeps local times: mtools turns the epoch into UTC ones here
        started = start(tmp, copy_of(sample, tmp), {"preload.sh": SCRIPT}, STEPS)
    output = tmp / output_name
    code, _, err = cli(started.env, "finish-image-build", f"-output={output}", *FINISH)
    assert code == 0, err
    return output


root = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="a local build needs root (loop devices, mounts)"),
]


@pytest.mark.parametrize("name", ["out.raw", "out.qcow2", "out.tar.gz"])
@pytest.mark.parametrize("_", [pytest.param(None, marks=root)])
def test_two_builds_of_the_same_inputs_are_bit_identical(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, name: str, _: None
) -> None:
    first = build(tmp_path / "a", sample_raw, name, monkeypatch, EPOCH)
    second = build(tmp_path / "b", sample_raw, name, monkeypatch, EPOCH)
    assert digest(first) == digest(second)
    assert first.stat().st_mtime == second.stat().st_mtime == EPOCH
    if name.endswith(".tar.gz"):
        header = first.read_bytes()[:10]
        assert header[3] & 0x08 == 0 and header[4:8] == bytes(4)  # gzip: no file name, no time
        with tarfile.open(first) as archive:
            (member,) = archive.getmembers()
        assert (member.name, member.mtime, member.uid, member.gid) == ("disk.raw", EPOCH, 0, 0)
    elif name.endswith(".qcow2"):
        assert sh("qemu-img", "check", first).returncode == 0


@pytest.mark.parametrize("_", [pytest.param(None, marks=root)])
def test_a_source_written_just_before_the_build_keeps_its_times_and_both_builds_agree(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, _: None
) -> None:
    # A source whose file system was written a moment ago (a sample made, then built at once): an inode the
    # build does not touch has a time at or after the first build's start but before the second's. It is the
    # source's time in both outputs, not the epoch in one of them.
    source = tmp_path / "recent.raw"
    sh("cp", "--sparse=always", sample_raw, source)
    state = ext.device(source, gpt.read_table(source).partition(1).first * gpt.SECTOR)
    recent = int(time.time()) + 2
    for field in ("atime", "ctime", "mtime"):
        sh("debugfs", "-w", "-R", f"sif /var_overlay/cache {field} @{recent}", state)
    first = build(tmp_path / "a", source, "out.raw", monkeypatch, EPOCH)
    while time.time() < recent + 2:  # the second build starts after that time: it is older than the build
        time.sleep(0.2)
    second = build(tmp_path / "b", source, "out.raw", monkeypatch, EPOCH)
    assert digest(first) == digest(second)
    stat = sh(
        "debugfs",
        "-R",
        "stat /var_overlay/cache",
        ext.device(first, gpt.read_table(first).partition(1).first * gpt.SECTOR),
    ).stdout
    assert f"mtime: 0x{recent:08x}:" in stat, stat


@pytest.mark.parametrize("_", [pytest.param(None, marks=root)])
def test_a_reproducible_image_is_sound_and_records_the_epoch(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, _: None
) -> None:
    raw = build(tmp_path / "a", sample_raw, "out.raw", monkeypatch, EPOCH)
    table = gpt.read_table(raw)
    state, oem = (table.partition(n).first * 512 for n in (1, 8))
    for offset in (state, oem):
        ext.check(raw, offset)  # e2fsck -f -n: clean
        header = sh("dumpe2fs", "-h", ext.device(raw, offset)).stdout
        fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
        stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(EPOCH))
        assert fields["Last write time"].strip() == stamp
        assert fields["Last mount time"].strip() == stamp
        assert fields["Last checked"].strip() == stamp
        assert fields["Last mounted on"].strip() == "<not available>"
        assert fields["Mount count"].strip() == "0"
        assert fields["Journal sequence"].strip() == "0x00000001"
        assert fields["Journal start"].strip() == "0"
    # What the script wrote is there, dated at the epoch, with generation 0.
    assert cat(raw, state, "/var_overlay/lib/app/f1") == "file 1\n"
    assert cat(raw, state, "/var_overlay/lib/app/sub/big").splitlines()[-1] == "200000"
    assert not exists(raw, state, "/var_overlay/lib/app/f5")
    assert cat(raw, oem, "/hello") == "in the OEM\n"
    stat = sh("debugfs", "-R", "stat /var_overlay/lib/app/f1", ext.device(raw, state)).stdout
    for name in ("ctime", "atime", "mtime", "crtime"):
        assert f"{name}: 0x{EPOCH:08x}:00000000" in stat.replace(" crtime:", "crtime:").replace("\n", " ")
    assert "Generation: 0 " in stat
    # A file of the source the build only read keeps the source's times but its access time.
    source_state = gpt.read_table(sample_raw).partition(1).first * 512
    source_stat = sh("debugfs", "-R", "stat /var_overlay/lib/sample-image", ext.device(sample_raw, source_state)).stdout
    built_stat = sh("debugfs", "-R", "stat /var_overlay/lib/sample-image", ext.device(raw, state)).stdout
    for name in ("ctime", "mtime", "crtime", "Generation"):
        assert _line(source_stat, name) == _line(built_stat, name)
    # The sealed OEM verifies with the salt and root hash grub.cfg gives (veritysetup).
    cfg = grub.read_grub_cfg(raw, table.partition(12).first * 512)
    oemroot = grub.read_dm(cfg)[0][1]
    verified = verity_verify(raw, table.partition(8), oemroot)
    assert verified.returncode == 0, verified.stderr
    # grub.cfg on EFI-SYSTEM's FAT is dated at the epoch too (mtools' own listing).
    efi = f"{raw}@@{table.partition(12).first * 512}"
    listing = subprocess.run(["mdir", "-i", efi, grub.GRUB_CFG], capture_output=True, text=True, check=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}).stdout  # fmt: skip
    assert time.strftime("%Y-%m-%d  %H:%M", time.gmtime(EPOCH)) in listing, listing


def _line(stat: str, name: str) -> str:
    return next(line.strip() for line in stat.splitlines() if line.strip().startswith(f"{name}:"))


@pytest.mark.parametrize("_", [pytest.param(None, marks=root)])
def test_without_the_epoch_two_builds_differ(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, _: None
) -> None:
    first = build(tmp_path / "a", sample_raw, "out.raw", monkeypatch, None)
    second = build(tmp_path / "b", sample_raw, "out.raw", monkeypatch, None)
    assert digest(first) != digest(second)  # the random verity salt, the times: why the epoch is needed


def test_the_dry_run_says_the_build_is_reproducible(cli: CLI, context_dir: Path, image_file: Path) -> None:
    assert cli("start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}").code == 0
    result = cli("finish-image-build", "-output=/tmp/never.raw", "-dry-run", env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert result.code == 0, result.err
    assert "  reproducible: SOURCE_DATE_EPOCH=1700000000 (every time the build records)\n" in result.err


@pytest.mark.parametrize("value", ["yesterday", "-1", "1.5", "4294967296", " 17"])
def test_a_bad_epoch_is_refused_in_one_line(cli: CLI, context_dir: Path, image_file: Path, value: str) -> None:
    assert cli("start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}").code == 0
    result = cli("finish-image-build", "-output=/tmp/never.raw", "-dry-run", env={"SOURCE_DATE_EPOCH": value})
    assert result.code == 2
    assert result.err == (
        f"cos-customizer: error: SOURCE_DATE_EPOCH={value!r} is not a time this build can record: set it to "
        "whole seconds since 1970 up to 2147483647 (2038-01-19), e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct), "
        "or unset it\n"
    )


def test_epoch_from() -> None:
    assert reproducible.epoch_from({}) is None
    assert reproducible.epoch_from({"SOURCE_DATE_EPOCH": ""}) is None
    assert reproducible.epoch_from({"SOURCE_DATE_EPOCH": "0"}) == 0
    assert reproducible.epoch_from({"SOURCE_DATE_EPOCH": "2147483647"}) == 2147483647
    with pytest.raises(UsageError):
        reproducible.epoch_from({"SOURCE_DATE_EPOCH": "2147483648"})


def mke2fs(path: Path, size: str, *options: str) -> None:
    sh("truncate", "-s", size, path)
    sh("mke2fs", "-q", "-F", "-t", "ext4", *options, path)


@pytest.mark.parametrize(
    ("size", "options"), [("1G", ()), ("300M", ("-b", "1024")), ("200M", ("-O", "^sparse_super,^resize_inode"))]
)
def test_the_superblock_copies_are_where_dumpe2fs_finds_them(
    tmp_path: Path, size: str, options: tuple[str, ...]
) -> None:
    fs = tmp_path / "fs.img"
    mke2fs(fs, size, *options)
    layout = reproducible._Layout.parse(ext._read_superblock(fs, 0))
    listed = sh("dumpe2fs", fs).stdout
    backups = [
        int(line.split("superblock at ")[1].split(",")[0]) for line in listed.splitlines() if "superblock at" in line
    ]
    ours = [group * layout.blocks_per_group + layout.first_data_block for group in layout.superblock_groups()]
    assert ours == backups


@pytest.mark.parametrize("_", [pytest.param(None, marks=root)])
def test_normalizing_a_file_system_the_kernel_wrote(tmp_path: Path, _: None) -> None:
    fs = tmp_path / "fs.img"
    mke2fs(fs, "64M", "-O", "metadata_csum")
    since = int(time.time()) - 1
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    sh("mount", "-o", "loop", fs, mountpoint)
    try:
        for i in range(30):
            (mountpoint / f"f{i}").write_text(f"{i}\n")
        (mountpoint / "dir").mkdir()
        (mountpoint / "f3").unlink()
    finally:
        sh("umount", mountpoint)
    # The journal superblock as the kernel left it: its checksum is the one this code computes.
    layout = reproducible._Layout.parse(ext._read_superblock(fs, 0))
    with open(fs, "rb") as f:
        jsb = os.pread(f.fileno(), 1024, reproducible._journal_blocks(str(fs), layout)[0] * layout.block_size)
    assert struct.unpack_from(">I", jsb, 0x28)[0] & 0x10  # csum v3: the kernel's, with metadata_csum
    assert reproducible._journal_checksum(jsb) == struct.unpack_from(">I", jsb, 0xFC)[0]
    count = reproducible.normalize_ext(fs, 0, epoch=EPOCH, since=since)
    assert count >= 31  # the root, 30 files and a directory, one of them freed
    sh("e2fsck", "-f", "-n", fs)  # raises unless clean
    logdump = sh("debugfs", "-R", "logdump", fs).stdout
    assert "Journal starts at block 0, transaction 1" in logdump
    stat = sh("debugfs", "-R", "stat /f0", fs).stdout
    assert f"mtime: 0x{EPOCH:08x}:00000000" in stat and "Generation: 0 " in stat
    assert "f3" not in sh("debugfs", "-R", "ls -l /", fs).stdout
    sh("mount", "-o", "loop", fs, mountpoint)  # the kernel takes it and writes to it again
    try:
        (mountpoint / "again").write_text("again\n")
    finally:
        sh("umount", mountpoint)
    sh("e2fsck", "-f", "-n", fs)


def test_the_derived_salt_follows_the_content_not_its_holes(tmp_path: Path) -> None:
    holes, written = tmp_path / "holes", tmp_path / "written"
    with open(holes, "wb") as f:
        f.truncate(64 << 20)
        os.pwrite(f.fileno(), b"data" * 1024, 8 << 20)
    with open(written, "wb") as f:
        f.write(bytes(8 << 20) + b"data" * 1024 + bytes((64 << 20) - (8 << 20) - 4096))
    salt = verity.derived_salt(holes, 0, (64 << 20) // 4096, EPOCH)
    assert len(salt) == 32
    assert verity.derived_salt(written, 0, (64 << 20) // 4096, EPOCH) == salt
    assert verity.derived_salt(holes, 0, (64 << 20) // 4096, EPOCH + 1) != salt
    with open(holes, "r+b") as f:
        os.pwrite(f.fileno(), b"x", 20 << 20)
    assert verity.derived_salt(holes, 0, (64 << 20) // 4096, EPOCH) != salt


def test_sparsify_leaves_holes_exactly_where_the_content_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    content = bytearray(1 << 20)
    for block in (0, 3, 4, 200):
        content[block * 4096 + 17] = 1
    path.write_bytes(bytes(content))  # every block written, zeros included
    mover.sparsify(path)
    assert path.read_bytes() == bytes(content)
    with open(path, "rb") as f:
        data = list(mover.data_extents(f.fileno(), 0, len(content)))
    assert data == [(0, 4096), (3 * 4096, 2 * 4096), (200 * 4096, 4096)]


def _seek_data_map(path: Path) -> list[tuple[int, int]]:
    """Where the file system says the data is (lseek SEEK_DATA/SEEK_HOLE, as tar and cp read it)."""
    found, offset, size = [], 0, path.stat().st_size
    with open(path, "rb") as f:
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            found.append((start, offset - start))
    return found


def test_sparsify_makes_preallocated_ranges_holes_whatever_the_page_cache_holds(tmp_path: Path) -> None:
    # qemu-img leaves preallocated (unwritten) ranges in a qcow2: SEEK_DATA calls them holes until their zero
    # pages are cached (a readahead next door), then data. That made two equal outputs' maps differ.
    path = tmp_path / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        os.pwrite(fd, b"x" * 4096, 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    mover.sparsify(path)
    assert path.read_bytes() == bytes(8192) + b"x" * 4096 + bytes((1 << 20) - 12288)  # every page cached now
    assert _seek_data_map(path) == [(8192, 4096)]
