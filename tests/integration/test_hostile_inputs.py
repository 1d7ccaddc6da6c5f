"""Source images are untrusted: nothing they hold reaches outside the build, and every refusal is one line.

`.tar.gz` members other than one regular `disk.raw`, corrupt and truncated gzip, gzip bombs, qcow2 backing
and external data files, image paths that are FIFOs, sockets or devices, disks shorter than their GPT, and
scripts named like options. Each runs the real command line in its own process (a hang fails the test
through a timeout) and checks the host: files, mounts, loop devices and the build's temp files.
"""

from __future__ import annotations

import gzip
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import images, privilege
from tests.conftest import CLI, Result, data_digest, sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root: device nodes, mounts, loop devices"),
]

TIMEOUT = 120  # seconds; a command that hangs (a FIFO opened for reading) fails the test
SECRET = b"HOST-SECRET-7f3a9c-not-for-any-image"
SECRET_OFFSET = 34 * 512  # the sector after the primary GPT: no partition, so the table still reads
GiB = 1 << 30


@dataclass(frozen=True)
class Host:
    """What a build may touch on this machine, to compare before and after."""

    tmp: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.tmp),
            "COS_CUSTOMIZER_WORKDIR": str(self.tmp / "ws"),
            "PATH": os.environ["PATH"],
            "TMPDIR": str(self.tmp / "tmpdir"),  # the build's own temp files land here, and must not stay
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        }

    def cli(self, *argv: str) -> Result:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "cos_customizer", *argv],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"cos-customizer {' '.join(argv)} hung for {TIMEOUT} s")
        return Result(result.returncode, result.stdout, result.stderr)

    def state(self) -> tuple[list[tuple[str, int, int]], list[str], list[str]]:
        """Every entry under tmp (name, kind, size; not inside the workspace, whose snapshot is taken
        apart), and the loop devices and mounts that name tmp."""
        entries = []
        for path in sorted(self.tmp.rglob("*")):
            st = path.lstat()
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            entries.append((str(path.relative_to(self.tmp)), stat.S_IFMT(st.st_mode), size))
        loops = [line for line in sh("losetup", "-a").stdout.splitlines() if str(self.tmp) in line]
        mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(self.tmp) in line]
        return entries, loops, mounts


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "tmpdir").mkdir()
    (tmp_path / "context").mkdir()
    (tmp_path / "context" / "ok.sh").write_text("true\n")
    yield Host(tmp_path)


def start(host: Host, image: Path, *steps: list[str]) -> None:
    result = host.cli("start-image-build", f"-build-context={host.tmp / 'context'}", f"-image-file={image}")
    assert result.code == 0, result.err
    for step in steps:
        result = host.cli(*step)
        assert result.code == 0, result.err


def assert_refused_by_finish(host: Host, message: str, *extra: str) -> None:
    """finish-image-build, dry run and real, fails with exactly `message` and changes nothing on the host."""
    before = host.state()
    output = host.tmp / "out.raw"
    for dry in (["-dry-run"], []):
        result = host.cli("finish-image-build", f"-output={output}", *extra, *dry)
        assert (result.code, result.out, result.err) == (1, "", f"cos-customizer: error: {message}\n"), dry
        assert host.state() == before, dry
    assert not output.exists()
    assert list((host.tmp / "tmpdir").iterdir()) == []


def assert_refused_by_the_build(host: Host, message: str) -> None:
    """The real build (its dry run cannot see it) fails with one line ending in `message`, leaves no output,
    and changes nothing on the host but the workspace it removes, as every finished build does."""
    before = host.state()
    output = host.tmp / "out.raw"
    result = host.cli("finish-image-build", f"-output={output}")
    assert result.code == 1
    assert result.err.endswith(f"cos-customizer: error: {message}\n")
    assert result.err.count("cos-customizer: error:") == 1 and "Traceback" not in result.err
    assert not output.exists()
    assert host.state()[0] == [e for e in before[0] if not e[0].startswith("ws")]
    assert host.state()[1:] == before[1:]
    assert list((host.tmp / "tmpdir").iterdir()) == []


def sparse_copy(source: Path, target: Path) -> Path:
    sh("cp", "--sparse=always", source, target)
    return target


# .tar.gz sources: one regular file disk.raw, nothing else, no archive name ever used as a host path


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def write_tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("members", "refused"),
    [
        ([("/disk.raw", tarfile.REGTYPE, "")], "/disk.raw"),
        ([("../disk.raw", tarfile.REGTYPE, "")], "../disk.raw"),
        ([(".//disk.raw", tarfile.REGTYPE, "")], ".//disk.raw"),
        ([("disk.raw", tarfile.SYMTYPE, "{victim}")], "disk.raw (a symlink to {victim})"),
        ([("disk.raw", tarfile.LNKTYPE, "{victim}")], "disk.raw (a hard link to {victim})"),
        ([("disk.raw", tarfile.CHRTYPE, "")], "disk.raw (a device)"),
        ([("disk.raw", tarfile.BLKTYPE, "")], "disk.raw (a device)"),
        ([("disk.raw", tarfile.FIFOTYPE, "")], "disk.raw (a FIFO)"),
        ([("disk.raw", tarfile.DIRTYPE, "")], "disk.raw (a directory)"),
        ([("other.raw", tarfile.REGTYPE, "")], "other.raw"),
        ([("x\ndisk.raw", tarfile.REGTYPE, "")], '"x\\ndisk.raw"'),
    ],
    ids=[
        "absolute",
        "dotdot",
        "double-slash",
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "dir",
        "other",
        "newline",
    ],
)
def test_tar_gz_members_other_than_a_regular_disk_raw_are_refused_by_name(
    host: Host, sample_raw: Path, members: list[tuple[str, bytes, str]], refused: str
) -> None:
    victim = host.tmp / "victim.raw"  # a file of the user's, named by the archive
    sparse_copy(sample_raw, victim)
    beside = host.tmp / "disk.raw"  # where "../disk.raw" of the working directory leads
    beside.write_bytes(b"the user's own disk.raw beside the output\n")
    digests = {path: data_digest(path) for path in (victim, beside)}
    root_disk_raw = os.path.lexists("/disk.raw")
    with open(victim, "rb") as f:
        head = f.read(1 << 20)  # a valid GPT head, so only the member's kind can be refused
    source = write_tar_gz(
        host.tmp / "bad.tar.gz",
        [member(name, kind, head, link.format(victim=victim)) for name, kind, link in members],
    )
    start(host, source)
    assert_refused_by_finish(
        host,
        f"{source}: the archive's member {refused.format(victim=victim)} is not a regular file named disk.raw: "
        "a GCE image archive holds one regular file disk.raw",
    )
    assert {path: data_digest(path) for path in (victim, beside)} == digests
    assert os.path.lexists("/disk.raw") == root_disk_raw


def test_tar_gz_with_a_second_member_is_refused_when_extracting(host: Host, sample_raw: Path) -> None:
    """Only the first header is read while planning (a dry run reads no image data); the build refuses it."""
    staging = host.tmp / "staging"
    staging.mkdir()
    sparse_copy(sample_raw, staging / "disk.raw")
    (staging / "extra").write_text("a second member\n")
    source = host.tmp / "two.tar.gz"
    sh("tar", "--sparse", "--format=oldgnu", "-czf", source, "-C", staging, "disk.raw", "extra")
    sh("rm", "-r", staging)
    start(host, source)
    assert_refused_by_the_build(
        host,
        f"{source}: the archive's member extra is not a regular file named disk.raw "
        "after disk.raw: a GCE image archive holds one regular file disk.raw",
    )


@pytest.mark.parametrize("fmt", ["oldgnu", "posix"])
def test_tar_gz_extraction_is_sparse_and_exact(host: Host, sample_raw: Path, fmt: str) -> None:
    """`./disk.raw` in GNU and PAX sparse formats: streamed into the file we name, byte for byte, still sparse."""
    staging = host.tmp / "staging"
    staging.mkdir()
    sparse_copy(sample_raw, staging / "disk.raw")
    source = host.tmp / "src.tar.gz"
    sh("tar", "--sparse", f"--format={fmt}", "-czf", source, "-C", staging, "./disk.raw")
    sh("rm", "-r", staging)
    work = host.tmp / "work"
    work.mkdir()
    images.working_copy(source, work / "copy.raw")
    assert [p.name for p in work.iterdir()] == ["copy.raw"]
    copy = work / "copy.raw"
    assert copy.stat().st_size == sample_raw.stat().st_size
    assert data_digest(copy) == data_digest(sample_raw)
    assert copy.stat().st_blocks <= sample_raw.stat().st_blocks + (16 << 20) // 512


def gce_archive(host: Host, sample_raw: Path) -> bytes:
    staging = host.tmp / "staging"
    staging.mkdir()
    sparse_copy(sample_raw, staging / "disk.raw")
    archive = host.tmp / "good.tar.gz"
    sh("tar", "--sparse", "--format=oldgnu", "-czf", archive, "-C", staging, "disk.raw")
    sh("rm", "-r", staging)
    data = archive.read_bytes()
    archive.unlink()
    return data


@pytest.mark.parametrize(
    ("damage", "detail"), [("truncated", "it ends too early"), ("crc", "its compressed data is damaged")]
)
def test_corrupt_or_truncated_gzip_is_one_line(host: Host, sample_raw: Path, damage: str, detail: str) -> None:
    data = gce_archive(host, sample_raw)
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # the gzip trailer's CRC32: only reading to the end finds it
        data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]
    source = host.tmp / "damaged.tar.gz"
    source.write_bytes(data)
    start(host, source)
    assert_refused_by_the_build(
        host, f"{source} is a corrupt or truncated .tar.gz ({detail}): export or download the image again"
    )


def test_gzip_that_is_not_a_tar_is_one_line(host: Host) -> None:
    source = host.tmp / "junk.tar.gz"
    with open(source, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
        gz.write(b"\x01" * 4096)
    start(host, source)
    assert_refused_by_finish(
        host,
        f"{source} is a corrupt or truncated .tar.gz (not a valid tar archive: invalid header): "
        "export or download the image again",
    )


def test_gzip_bomb_is_refused_before_extracting(host: Host) -> None:
    """A member declaring more data than the output's file system has free is refused before anything is written."""
    staging = host.tmp / "staging"
    staging.mkdir()
    disk = staging / "disk.raw"
    sh("truncate", "-s", "128M", disk)
    sh("sgdisk", "-o", "-n", "1:2048:+64M", disk)  # a real GPT: only the size can be refused
    with open(disk, "r+b") as f:  # non-sparse, non-zero data: a plain tar stores all of it; it compresses to little
        f.seek(80 << 20)
        f.write(b"A" * (32 << 20))
    source = host.tmp / "bomb.tar.gz"
    sh("tar", "-czf", source, "-C", staging, "disk.raw")
    sh("rm", "-r", staging)
    assert source.stat().st_size < (1 << 20)
    small = host.tmp / "small"
    small.mkdir()
    start(host, source)
    sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", small)
    try:
        blocks, block_size = sh("stat", "-f", "-c", "%a %S", small).stdout.split()
        free = int(blocks) * int(block_size)
        before = host.state()
        output = small / "out.raw"
        for dry in (["-dry-run"], []):
            result = host.cli("finish-image-build", f"-output={output}", *dry)
            assert (result.code, result.out, result.err) == (
                1,
                "",
                f"cos-customizer: error: {source}: its disk.raw declares {128 << 20} bytes of data, more than the "
                f"{free} bytes free in {small}: free some space or write -output on a larger file system\n",
            )
            assert host.state() == before
            assert list(small.iterdir()) == []
    finally:
        sh("umount", small)


# qcow2: a backing file or an external data file is a host file read into the image


def secret_disk(sample_raw: Path, path: Path) -> Path:
    sparse_copy(sample_raw, path)
    with open(path, "r+b") as f:
        f.seek(SECRET_OFFSET)
        f.write(SECRET)
    return path


def files_holding_secret(root: Path, allowed: set[Path]) -> list[Path]:
    found = sh("grep", "-rlaF", SECRET.decode(), root, check=False).stdout.splitlines()
    return sorted(Path(p) for p in found if Path(p) not in allowed)


@pytest.mark.parametrize("kind", ["backing file", "external data file"])
def test_qcow2_with_a_host_file_behind_it_needs_allow_backing_file(host: Host, sample_raw: Path, kind: str) -> None:
    behind = host.tmp / "host-file.raw"
    top = host.tmp / "top.qcow2"
    size = str(sample_raw.stat().st_size)
    if kind == "backing file":
        secret_disk(sample_raw, behind)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", behind, "-F", "raw", top)
    else:  # qemu-img create zeroes the data file: the secret disk is written into it afterwards
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={behind},data_file_raw=on", top, size)
        sh("cp", "--sparse=always", secret_disk(sample_raw, host.tmp / "secret.raw"), behind)
        (host.tmp / "secret.raw").unlink()
    article = "a" if kind == "backing file" else "an"
    start(host, top)
    assert_refused_by_finish(
        host,
        f"{top} is a qcow2 image with {article} {kind} {behind}: building it would read that file of this machine "
        "into the image; flatten it (qemu-img convert -O qcow2) or, if you trust it, pass -allow-backing-file to "
        "finish-image-build",
    )
    assert files_holding_secret(host.tmp, {behind}) == []
    # Allowed, the host file's bytes are the image's: the secret is in the output (so the search above can see it).
    output = host.tmp / "out.raw"
    result = host.cli("finish-image-build", f"-output={output}", "-allow-backing-file")
    assert result.code == 0, result.err
    assert files_holding_secret(host.tmp, {behind}) == [output]
    assert list((host.tmp / "tmpdir").iterdir()) == []
    assert host.state()[1:] == ([], [])


def test_allow_backing_file_is_for_local_builds(gce_build: CLI) -> None:
    result = gce_build(
        "finish-image-build", "-zone=z", "-project=p", "-image-name=n", "-allow-backing-file", "-dry-run"
    )
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: -allow-backing-file is for local builds (started with a .qcow2 -image-file)\n",
    )


# The image path: only a regular file (or a symlink to one) is ever opened


def make_fifo(path: Path) -> str:
    os.mkfifo(path)
    return "a FIFO"


def make_socket(path: Path) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()  # nobody accepts: a reader would wait
    return "a socket"


def make_char_device(path: Path) -> str:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers: reading it never ends
    return "a character device"


UNUSED_BLOCK_MAJOR = 240  # "local/experimental use": no driver, nothing to read or to create on open


def make_block_device(path: Path) -> str:
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(UNUSED_BLOCK_MAJOR, 0))
    return "a block device"


def make_symlink_to_block_device(path: Path) -> str:
    node = path.with_name("blockdev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(UNUSED_BLOCK_MAJOR, 0))
    path.symlink_to(node)
    return f"a symlink to a block device ({node})"


MAKERS = {
    "fifo": make_fifo,
    "socket": make_socket,
    "chardev": make_char_device,
    "blockdev": make_block_device,
    "symlink-blockdev": make_symlink_to_block_device,
}


@pytest.mark.parametrize("made", list(MAKERS))
def test_image_path_that_is_not_a_regular_file_is_refused_without_hanging(
    host: Host, sample_raw: Path, made: str
) -> None:
    image = sparse_copy(sample_raw, host.tmp / "image.raw")
    start(host, image)
    image.unlink()  # replaced after start-image-build
    what = MAKERS[made](image)
    assert_refused_by_finish(
        host,
        f"the source image {image} is {what}, not a disk image file: give a regular raw, .qcow2 or .tar.gz "
        "image file to start-image-build -image-file",
    )
    result = host.cli("start-image-build", f"-build-context={host.tmp / 'context'}", f"-image-file={image}")
    assert (result.code, result.err) == (
        1,
        f"cos-customizer: error: -image-file={image}: {what}, not a file; give a raw, .qcow2 or .tar.gz COS disk "
        "image\n",
    )


# A disk shorter than its own partition table


@pytest.mark.parametrize("fmt", ["raw", "tar.gz"])
def test_image_shorter_than_its_gpt_is_refused(host: Host, sample_raw: Path, fmt: str) -> None:
    """ "Describes": the disk ends with its backup GPT header (the primary header's AlternateLBA), here the
    sample's full 10 GiB; the copy is cut at 6 GiB, past every partition but STATE."""
    described = sample_raw.stat().st_size
    assert described == 10 * GiB
    cut = sparse_copy(sample_raw, host.tmp / "cut.raw")
    os.truncate(cut, 6 * GiB)
    image, holder = cut, "the file has"
    if fmt == "tar.gz":
        staging = host.tmp / "staging"
        staging.mkdir()
        cut.rename(staging / "disk.raw")
        image, holder = host.tmp / "cut.tar.gz", "its disk.raw has"
        sh("tar", "--sparse", "--format=oldgnu", "-czf", image, "-C", staging, "disk.raw")
        sh("rm", "-r", staging)
    start(host, image)
    assert_refused_by_finish(
        host,
        f"{image}: truncated: the partition table describes {described} bytes, {holder} {6 * GiB}; "
        "the image is incomplete: copy or download it again",
    )


# A script named like an option runs as a script


def debugfs_cat(image: Path, offset: int, name: str) -> str:
    return sh("debugfs", "-R", f"cat {name}", f"{image}?offset={offset}").stdout


def test_scripts_named_like_options_run(host: Host, sample_raw: Path) -> None:
    context = host.tmp / "context"
    (context / "--version").write_text("echo 'ran --version' > /var/lib/dash-version\n")
    (context / "-i").write_text("echo 'ran -i' > /var/lib/dash-i\n")
    image = sparse_copy(sample_raw, host.tmp / "image.raw")
    start(host, image, ["run-script", "-script=--version"], ["run-script", "-script=-i"])
    output = host.tmp / "out.raw"
    result = host.cli("finish-image-build", f"-output={output}")
    assert result.code == 0, result.err
    state = int(sh("sgdisk", "-i", "1", output).stdout.split("First sector: ")[1].split()[0]) * 512
    assert debugfs_cat(output, state, "/var_overlay/lib/dash-version") == "ran --version\n"
    assert debugfs_cat(output, state, "/var_overlay/lib/dash-i") == "ran -i\n"
    assert host.state()[1:] == ([], [])


def test_allow_host_loopback_is_for_local_builds(gce_build: CLI) -> None:
    result = gce_build(
        "finish-image-build", "-zone=z", "-project=p", "-image-name=n", "-allow-host-loopback", "-dry-run"
    )
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: -allow-host-loopback is for local builds (started with -image-file)\n",
    )
