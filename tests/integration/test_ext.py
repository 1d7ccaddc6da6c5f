"""ext file systems: our superblock reader against dumpe2fs, our resize-inode removal against tune2fs,
and growth with resize2fs (what it does alone, and what `ext.resize` does) checked with e2fsck."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, gpt
from cos_customizer.errors import CustomizerError

MiB, GiB = 1 << 20, 1 << 30
root_only = pytest.mark.skipif(not privilege.can_mount(), reason="needs root for a loop device")


def dumpe2fs(image: Path, offset: int) -> dict[str, str]:
    """The ORACLE: `dumpe2fs -h`, as a dictionary of its fields."""
    out = subprocess.run(["dumpe2fs", "-h", ext.device(image, offset)], capture_output=True, text=True, check=True)
    fields = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def make_ext(
    image: Path,
    offset: int,
    blocks: int,
    *options: str,
    fstype: str = "ext4",
    block_size: int = 4096,
    extended: str = "",
    tree: Path | None = None,
) -> None:
    """A file system as sample-image makes the OEM's (by default ext4, 4K blocks), `blocks` blocks long."""
    extended = f"offset={offset},lazy_itable_init=1,lazy_journal_init=1,nodiscard" + (
        f",{extended}" if extended else ""
    )
    argv = ["mke2fs", "-q", "-F", "-t", fstype, "-b", str(block_size), "-L", "OEM", "-E", extended, *options]
    subprocess.run([*argv, *(["-d", str(tree)] if tree else []), str(image), str(blocks)], check=True)


def read_file(image: Path, offset: int, name: str) -> bytes:
    result = subprocess.run(["debugfs", "-R", f"cat {name}", ext.device(image, offset)], capture_output=True)
    return result.stdout


def fsck_clean(image: Path, offset: int) -> bool:
    return subprocess.run(["e2fsck", "-fn", ext.device(image, offset)], capture_output=True).returncode == 0


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        out.truncate(size)
    return path


def assert_same_as_dumpe2fs(image: Path, offset: int) -> None:
    info, fields = ext.info(image, offset), dumpe2fs(image, offset)
    label = fields["Filesystem volume name"]
    assert info.label == ("" if label == "<none>" else label)
    assert info.uuid == fields["Filesystem UUID"]
    assert info.block_count == int(fields["Block count"])
    assert info.block_size == int(fields["Block size"])
    assert info.free_blocks == int(fields["Free blocks"])
    assert list(info.features) == fields["Filesystem features"].split()
    assert info.blocks_per_group == int(fields["Blocks per group"])
    assert info.desc_size == int(fields.get("Group descriptor size", "32"))
    assert info.reserved_gdt_blocks == int(fields.get("Reserved GDT blocks", "0"))


def test_info_reads_the_sample_images_file_systems_as_dumpe2fs_does(sample_raw: Path) -> None:
    table = gpt.read_table(sample_raw)
    for number in (1, 3, 8):  # STATE (ext4), ROOT-A (ext2), OEM (ext4)
        assert_same_as_dumpe2fs(sample_raw, table.partition(number).first * 512)
    assert ext.info(sample_raw, table.partition(8).first * 512).size == 16 * MiB


@pytest.mark.parametrize(
    ("fstype", "block_size", "options"),
    [
        ("ext2", 4096, []),
        ("ext3", 1024, []),
        ("ext4", 4096, ["-O", "^64bit,^metadata_csum", "-L", ""]),
        ("ext4", 4096, ["-O", "^resize_inode,quota,project,inline_data,encrypt,large_dir"]),
        ("ext4", 4096, ["-O", "bigalloc", "-C", "65536"]),
    ],
)
def test_info_matches_dumpe2fs(tmp_path: Path, fstype: str, block_size: int, options: list[str]) -> None:
    image = sparse(tmp_path / "disk.raw", 600 * MiB)
    make_ext(image, 8 * MiB, 512 * MiB // block_size, *options, fstype=fstype, block_size=block_size)
    assert_same_as_dumpe2fs(image, 8 * MiB)


def test_the_high_words_count_only_with_the_64bit_feature() -> None:
    sb = bytearray(1024)
    struct.pack_into("<H", sb, 0x38, ext.MAGIC)
    struct.pack_into("<I", sb, 0x04, 5)  # s_blocks_count_lo
    struct.pack_into("<I", sb, 0x0C, 3)  # s_free_blocks_count_lo
    struct.pack_into("<I", sb, 0x18, 2)  # s_log_block_size: 4096
    struct.pack_into("<III", sb, 0x150, 1, 0, 2)  # s_blocks_count_hi, s_r_blocks_count_hi, s_free_blocks_hi
    struct.pack_into("<H", sb, 0xFE, 64)  # s_desc_size
    narrow = ext.parse_superblock(sb)
    assert (narrow.block_count, narrow.free_blocks, narrow.desc_size, narrow.features) == (5, 3, 32, ())
    struct.pack_into("<I", sb, 0x60, ext.INCOMPAT_64BIT)
    wide = ext.parse_superblock(sb)
    assert (wide.block_count, wide.free_blocks, wide.desc_size) == ((1 << 32) + 5, (2 << 32) + 3, 64)
    assert wide.size == ((1 << 32) + 5) * 4096
    assert wide.features == ("64bit",)


def test_info_on_no_file_system(tmp_path: Path) -> None:
    image = sparse(tmp_path / "disk.raw", 8 * MiB)
    with pytest.raises(CustomizerError, match=r"no ext file system at byte 4096 of .*: no ext superblock magic"):
        ext.info(image, 4096)
    with pytest.raises(CustomizerError, match=r"no ext file system at byte 0 of .*missing"):
        ext.info(tmp_path / "missing", 0)


def test_the_sample_oem_keeps_its_resize_inode_up_to_16g(sample_raw: Path) -> None:
    oem = ext.info(sample_raw, gpt.read_table(sample_raw).partition(8).first * 512)
    assert oem.reserved_gdt_blocks == 1
    assert ext.max_growth_with_resize_inode(oem) == 16 * GiB  # mke2fs's 1024 times the first size


@pytest.mark.parametrize("limit_gib", [16])
def test_resize2fs_alone_stops_at_the_reserved_descriptors(tmp_path: Path, limit_gib: int) -> None:
    """What the Go original does (`e2fsck -fp`, then `resize2fs`) grows a 16M OEM to 16G and no further:
    1G more and resize2fs fails, leaving a file system e2fsck must repair (`ext.resize` drops the resize inode)."""
    image = sparse(tmp_path / "oem.raw", (limit_gib + 1) * GiB)
    make_ext(image, 0, 4096)  # at offset 0 of its own file: resize2fs needs no loop device here
    assert ext.max_growth_with_resize_inode(ext.info(image)) == limit_gib * GiB
    subprocess.run(["e2fsck", "-fp", str(image)], check=True, capture_output=True)
    subprocess.run(["resize2fs", str(image), f"{limit_gib * GiB // 4096}"], check=True, capture_output=True)
    assert fsck_clean(image, 0)
    assert ext.info(image).size == limit_gib * GiB
    make_ext(image, 0, 4096)
    failed = subprocess.run(
        ["resize2fs", str(image), f"{(limit_gib + 1) * GiB // 4096}"], capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "Illegal doubly indirect block found" in failed.stderr
    assert not fsck_clean(image, 0)


def test_drop_resize_inode_is_what_tune2fs_and_e2fsck_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORACLE: `tune2fs -O ^resize_inode` then `e2fsck -fy` on an identical copy: the same bytes."""
    monkeypatch.setenv("E2FSPROGS_FAKE_TIME", "1700000000")
    fixed = ["-U", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]
    ours, theirs = sparse(tmp_path / "ours.raw", 64 * MiB), sparse(tmp_path / "theirs.raw", 64 * MiB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "README").write_text("oem\n")
    for image in (ours, theirs):
        make_ext(image, 4 * MiB, 4096, *fixed, extended=f"hash_seed={fixed[1]}", tree=tree)
    assert ours.read_bytes() == theirs.read_bytes()
    assert "resize_inode" in ext.info(ours, 4 * MiB).features
    ext.drop_resize_inode(ours, 4 * MiB)
    subprocess.run(["tune2fs", "-O", "^resize_inode", ext.device(theirs, 4 * MiB)], check=True, capture_output=True)
    assert subprocess.run(["e2fsck", "-fy", ext.device(theirs, 4 * MiB)], capture_output=True).returncode == 1
    assert ours.read_bytes() == theirs.read_bytes()
    info = ext.info(ours, 4 * MiB)
    assert "resize_inode" not in info.features and info.reserved_gdt_blocks == 0
    assert fsck_clean(ours, 4 * MiB)
    assert read_file(ours, 4 * MiB, "/README") == b"oem\n"
    ext.drop_resize_inode(ours, 4 * MiB)  # nothing to do the second time
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.root
@root_only
def test_resize_grows_to_exact_size_and_keeps_the_rest_of_the_image(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hi")
    image = sparse(tmp_path / "disk.raw", 256 * MiB)
    make_ext(image, 8 * MiB, 32 * MiB // 4096, tree=tree)
    tail = os.urandom(4096)
    with open(image, "r+b") as out:
        out.seek(200 * MiB)
        out.write(tail)
    ext.resize(image, 8 * MiB, 100 * MiB)
    assert ext.info(image, 8 * MiB).size == 100 * MiB
    # resize2fs on a plain file would have cut it to 100 MiB: the image keeps its size and its data.
    assert image.stat().st_size == 256 * MiB
    with open(image, "rb") as f:
        f.seek(200 * MiB)
        assert f.read(4096) == tail
    ext.resize(image, 8 * MiB, 40 * MiB)
    assert image.stat().st_size == 256 * MiB
    assert ext.info(image, 8 * MiB).size == 40 * MiB
    assert fsck_clean(image, 8 * MiB)
    assert read_file(image, 8 * MiB, "/hello") == b"hi"


@pytest.mark.root
@root_only
@pytest.mark.parametrize(("size", "keeps_resize_inode"), [(GiB, True), (100 * GiB, False), (1024 * GiB, False)])
def test_resize_grows_a_16m_oem_to_any_size(tmp_path: Path, size: int, keeps_resize_inode: bool) -> None:
    """A 16M OEM made as sample-image makes it grows to 1G, 100G, 1024G; past 16G without the resize inode."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "README").write_text("oem")
    image = sparse(tmp_path / "disk.raw", size + 64 * MiB)
    make_ext(image, 8 * MiB, 4096, tree=tree)
    ext.resize(image, 8 * MiB, size)
    info = ext.info(image, 8 * MiB)
    assert info.size == size
    assert ("resize_inode" in info.features) is keeps_resize_inode
    assert fsck_clean(image, 8 * MiB)
    assert read_file(image, 8 * MiB, "/README") == b"oem"
    assert image.stat().st_size == size + 64 * MiB
    assert_same_as_dumpe2fs(image, 8 * MiB)


@pytest.mark.root
@root_only
def test_check_and_resize_work_on_a_whole_disk_that_is_in_use(tmp_path: Path) -> None:
    """On the VM the shutdown handler grows OEM on /dev/sda while the root's dm-verity device holds a partition
    of it: e2fsck and resize2fs open their device exclusively, and the busy whole disk refuses (seen on a real
    shutdown: "/dev/sda is in use"). Here a block device held with O_EXCL stands for that disk."""
    from cos_customizer.disk import loop

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "README").write_text("oem")
    image = sparse(tmp_path / "disk.raw", 128 * MiB)
    make_ext(image, 8 * MiB, 4096, tree=tree)
    with loop.attach(image) as disk:
        holder = os.open(disk, os.O_RDONLY | os.O_EXCL)  # what the dm device does to the disk under it
        try:
            stock = subprocess.run(["e2fsck", "-f", "-p", ext.device(disk, 8 * MiB)], capture_output=True, text=True)
            assert stock.returncode == 8 and "is in use" in stock.stdout + stock.stderr  # the defect, reproduced
            ext.check(disk, 8 * MiB)
            ext.resize(disk, 8 * MiB, 64 * MiB)
        finally:
            os.close(holder)
    assert dumpe2fs(image, 8 * MiB)["Block count"] == str(64 * MiB // 4096)
    assert fsck_clean(image, 8 * MiB)
    assert read_file(image, 8 * MiB, "/README") == b"oem"
