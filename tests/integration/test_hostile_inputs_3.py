"""Inputs that crashed or misled (issue 20, points 11 and 12): each is now refused with one clear line.

Point 11: a .tar.gz source whose headers are huge (a GNU long name or long link name, a pax header, a
sparse map) is refused before the header is read into memory; the dry run of such an archive runs in a
child process whose peak memory is measured against the dry run of a tiny archive. A GNU long name that
is "disk.raw" followed by anything but NULs is not disk.raw.

Point 12: deep YAML nesting, huge integers (YAML and SOURCE_DATE_EPOCH), NULs and lone surrogates in
values, newlines and terminal controls in values and keys, a damaged build context archive in the
workspace, and a full disk while a script writes: one line each, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from cos_customizer import images, privilege
from cos_customizer.errors import CustomizerError
from tests.conftest import CLI, Result, sh

MiB = 1 << 20
TIMEOUT = 120  # seconds: a child that hangs is killed and fails the test
BOMB = 128 * MiB  # the size a huge header declares
# What the tool may add to its peak memory over the dry run of a tiny archive, reading a huge header:
# the largest thing it keeps is a sparse map of at most 2**18 runs (4 MiB).
MEMORY_MARGIN = 32 * MiB
HINT = (
    "a GCE image archive holds one regular file disk.raw (tar --format=oldgnu -Sczf IMAGE.tar.gz disk.raw writes one)"
)


# Archives written by hand: the headers a real tar writes, with the sizes an attacker chooses.


def header(name: bytes, kind: bytes, size: int, *, link: bytes = b"", fields: dict[int, bytes] | None = None) -> bytes:
    """One GNU tar header block with a correct checksum."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[157 : 157 + len(link)] = link
    block[257:265] = b"ustar  \0"
    for offset, data in (fields or {}).items():
        block[offset : offset + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def zeros(size: int) -> Iterator[bytes]:
    while size > 0:
        yield bytes(min(MiB, size))
        size -= MiB


def write_gz(path: Path, pieces: Iterable[bytes]) -> Path:
    """`pieces` gzip-compressed (fast: the bombs are mostly zeros)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as out:
        for piece in pieces:
            out.write(compressor.compress(piece))
        out.write(compressor.compress(bytes(1024)) + compressor.flush())
    return path


def long_record(kind: bytes, content: bytes, size: int) -> Iterator[bytes]:
    """A GNU long name or long link record declaring `size` bytes: `content`, then NULs."""
    yield header(b"././@LongLink", kind, size)
    yield content
    yield from zeros(size - len(content))
    yield bytes(-size % 512)


def record_length(rest: int) -> int:
    """The length of a pax record whose text after its length field is `rest` bytes (the length counts itself)."""
    return rest + len(str(rest + len(str(rest))))


def pax_record(keyword: str, value: bytes) -> bytes:
    body = f" {keyword}=".encode() + value + b"\n"
    return str(record_length(len(body))).encode() + body


def gnu_long_name_bomb(path: Path) -> tuple[Path, str]:
    write_gz(path, [*long_record(b"L", b"disk.raw\0", BOMB), header(b"disk.raw", b"0", 512), b"\1" * 512])
    return path, f"a GNU long name of {BOMB} bytes (at most 4096)"


def gnu_long_link_bomb(path: Path) -> tuple[Path, str]:
    write_gz(path, [*long_record(b"K", b"/etc/shadow\0", BOMB), header(b"disk.raw", b"2", 0, link=b"x")])
    return path, f"a GNU long link name of {BOMB} bytes (at most 4096)"


def pax_header_bomb(path: Path) -> tuple[Path, str]:
    """A pax header naming disk.raw, then a comment record of BOMB bytes (NULs: a value may hold any byte)."""
    name = pax_record("path", b"disk.raw")
    length = record_length(len(" comment=") + BOMB + 1)
    size = len(name) + length

    def pieces() -> Iterator[bytes]:
        yield header(b"./PaxHeaders/disk.raw", b"x", size)
        yield name + str(length).encode() + b" comment="
        yield from zeros(BOMB)
        yield b"\n" + bytes(-size % 512)
        yield header(b"disk.raw", b"0", 512)
        yield b"\1" * 512

    write_gz(path, pieces())
    return path, f"a pax extended header of {size} bytes (at most 65536)"


RUNS = (1 << 18) + 50_000  # more runs of data than a sparse member may have


def gnu_sparse_map_bomb(path: Path) -> tuple[Path, str]:
    """An old GNU sparse member ('S') whose extension blocks list more runs than allowed (in order, in the file)."""

    def entries(start: int, count: int) -> bytes:
        return b"".join(b"%011o\0%011o\0" % (2 * index, 1) for index in range(start, start + count))

    def pieces() -> Iterator[bytes]:
        fields = {386: entries(0, 4), 482: b"\1", 483: b"%011o\0" % (2 * RUNS)}
        yield header(b"disk.raw", b"S", RUNS, fields=fields)
        for start in range(4, RUNS, 21):
            count = min(21, RUNS - start)
            yield entries(start, count).ljust(504, b"\0") + (b"\1" if start + count < RUNS else b"\0") + bytes(7)

    write_gz(path, pieces())
    return path, f"a sparse file of more than {1 << 18} runs of data"


def pax_sparse_map_bomb(path: Path) -> tuple[Path, str]:
    """A GNU pax sparse 1.0 member whose map, at the start of its data, lists more runs than allowed."""
    lines = b"%d\n" % RUNS + b"".join(b"%d\n1\n" % (2 * index) for index in range(RUNS))
    map_size = len(padded(lines))
    pax = b"".join(
        pax_record(keyword, value)
        for keyword, value in (
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"disk.raw"),
            ("GNU.sparse.realsize", b"%d" % (2 * RUNS)),
        )
    )
    write_gz(
        path,
        [
            header(b"./PaxHeaders/disk.raw", b"x", len(pax)),
            padded(pax),
            header(b"./GNUSparseFile.0/disk.raw", b"0", map_size + RUNS),
            padded(lines),
            padded(b"\1" * RUNS),
        ],
    )
    return path, f"a sparse file of more than {1 << 18} runs of data"


def child_env(home: Path, workspace_root: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "COS_CUSTOMIZER_WORKDIR": str(workspace_root),
        "PATH": os.environ["PATH"],
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }


# Runs the real command line in a fresh interpreter and records its own peak resident memory (VmHWM: this
# process's memory only, not the test process's that forked it).
PEAK = """
import sys
from cos_customizer.cli.main import main
code = main(sys.argv[2:])
with open("/proc/self/status") as status, open(sys.argv[1], "w") as out:
    out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
sys.exit(code)
"""


def measured(argv: list[str], env: dict[str, str], tmp_path: Path) -> tuple[Result, int]:
    """cos-customizer ARGV in a child process: its result and its peak resident memory in bytes."""
    peak = tmp_path / "peak"
    try:
        done = subprocess.run([sys.executable, "-c", PEAK, str(peak), *argv], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"cos-customizer {' '.join(argv)} ran for more than {TIMEOUT} s")
    return Result(done.returncode, done.stdout, done.stderr), int(peak.read_text()) * 1024


@pytest.mark.parametrize(
    "make",
    [gnu_long_name_bomb, gnu_long_link_bomb, pax_header_bomb, gnu_sparse_map_bomb, pax_sparse_map_bomb],
    ids=["gnu-long-name", "gnu-long-link", "pax-header", "gnu-sparse-map", "pax-sparse-map"],
)
def test_huge_tar_headers_are_refused_before_they_are_read(
    cli: CLI, tmp_path: Path, home: Path, workspace_root: Path, make: object
) -> None:
    assert callable(make)
    context = tmp_path / "context"
    context.mkdir()
    env = child_env(home, workspace_root)
    output = tmp_path / "out.raw"
    # The baseline: the same dry run refusing a tiny archive (its member is not disk.raw).
    tiny = write_gz(tmp_path / "tiny.tar.gz", [header(b"other.raw", b"0", 0)])
    assert cli("start-image-build", f"-build-context={context}", f"-image-file={tiny}").code == 0
    baseline, baseline_peak = measured(["finish-image-build", f"-output={output}", "-dry-run"], env, tmp_path)
    assert (baseline.code, baseline.err) == (
        1,
        f"cos-customizer: error: {tiny}: the archive's member other.raw is not a regular file named disk.raw: "
        "a GCE image archive holds one regular file disk.raw\n",
    )
    bomb, what = make(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 8 * MiB  # a small download
    assert cli("start-image-build", f"-build-context={context}", f"-image-file={bomb}").code == 0
    result, peak = measured(["finish-image-build", f"-output={output}", "-dry-run"], env, tmp_path)
    assert (result.code, result.out, result.err) == (
        1,
        "",
        f"cos-customizer: error: {bomb}: the archive holds {what}: {HINT}\n",
    )
    assert peak - baseline_peak < MEMORY_MARGIN, (peak, baseline_peak)
    assert not output.exists()


def small_disk_archive(path: Path, long_name: bytes) -> Path:
    """A .tar.gz whose one member, 64 KiB of data, is named by a GNU long name record holding `long_name`."""
    data = b"\x5a" * (64 << 10)
    return write_gz(
        path,
        [header(b"././@LongLink", b"L", len(long_name)), padded(long_name), header(b"ignored", b"0", len(data)), data],
    )


def test_a_long_name_is_disk_raw_only_when_it_is_exactly_disk_raw(cli: CLI, tmp_path: Path) -> None:
    exact = small_disk_archive(tmp_path / "exact.tar.gz", b"disk.raw\0")
    assert images.virtual_size(exact) == 64 << 10  # what GNU tar writes: the name and one NUL
    source = small_disk_archive(tmp_path / "forged.tar.gz", b"disk.raw\0/../../etc/passwd\0")
    with pytest.raises(CustomizerError):
        images.virtual_size(source)
    context = tmp_path / "context"
    context.mkdir()
    assert cli("start-image-build", f"-build-context={context}", f"-image-file={source}").code == 0
    result = cli("finish-image-build", f"-output={tmp_path / 'out.raw'}", "-dry-run")
    assert (result.code, result.out, result.err) == (
        1,
        "",
        f"cos-customizer: error: {source} is a corrupt or truncated .tar.gz (not a valid tar archive: a GNU long "
        "name with more bytes after its end): export or download the image again\n",
    )


# Point 12: one line for each, no traceback


def one_line(result: Result) -> str:
    assert "Traceback" not in result.err and result.out == ""
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), result.err
    return result.err


def build_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("source: " + "[" * 5000 + "]" * 5000 + "\n", 1),  # flow nesting
        ("finish: {output: o.raw}\nsource:\n" + "- " * 1400 + "x\n", 3),  # block nesting
    ],
    ids=["flow-5000", "block-1400"],
)
def test_deep_nesting_in_a_build_file_is_one_line(cli: CLI, tmp_path: Path, text: str, line: int) -> None:
    path = build_file(tmp_path, text)
    result = cli("build", "-dry-run", str(path))
    assert result.code == 2
    assert one_line(result) == (
        f"cos-customizer: error: {path}:{line}: lists and mappings nested more than 16 deep are not accepted in a "
        "build file (it needs 5 levels at most): write each step as '- run-script: {script: a.sh}'\n"
    )


def test_a_huge_integer_in_a_build_file_is_one_line(cli: CLI, tmp_path: Path) -> None:
    path = build_file(
        tmp_path, "source: {image-file: x.raw}\nfinish: {output: o.raw, disk-size-gb: " + "9" * 5000 + "}\n"
    )
    result = cli("build", "-dry-run", str(path))
    assert result.code == 2
    assert one_line(result) == (
        f'cos-customizer: error: {path}:2: finish.disk-size-gb: invalid value "{"9" * 40}"... (4960 more characters) '
        "for flag -disk-size-gb: value out of range\n"
    )


def test_a_huge_source_date_epoch_is_one_line(local_build: CLI, tmp_path: Path) -> None:
    epoch = "9" * 5000
    result = local_build("finish-image-build", f"-output={tmp_path / 'out.raw'}", "-dry-run",
                         env={"SOURCE_DATE_EPOCH": epoch})  # fmt: skip
    assert result.code == 2
    assert one_line(result) == (
        f"cos-customizer: error: SOURCE_DATE_EPOCH='{epoch}' is not a time this build can record: set it to whole "
        "seconds since 1970 up to 2147483647 (2038-01-19), e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct), or "
        "unset it\n"
    )


NUL = "a NUL character cannot be passed to a program, a file name or an environment variable"
SURROGATE = "it holds a lone surrogate, which is not text: write the character itself"


@pytest.mark.parametrize(
    ("source", "finish", "where", "message"),
    [
        (r'"x\0.raw"', "o.raw", "1: source.image-file", r'invalid value "x\x00.raw" for flag -image-file: ' + NUL),
        ("x.raw", r'"o\0.raw"', "2: finish.output", r'invalid value "o\x00.raw" for flag -output: ' + NUL),
        (r'"x\ud800.raw"', "o.raw", "1: source.image-file", r'invalid value "x\ud800.raw" for flag -image-file: '
         + SURROGATE),
    ],
    ids=["nul-image-file", "nul-output", "lone-surrogate"],
)  # fmt: skip
def test_values_no_file_name_can_hold_are_one_line(
    cli: CLI, tmp_path: Path, source: str, finish: str, where: str, message: str
) -> None:
    path = build_file(tmp_path, f"source: {{image-file: {source}}}\nfinish: {{output: {finish}}}\n")
    result = cli("build", "-dry-run", str(path))
    assert result.code == 1
    assert one_line(result) == f"cos-customizer: error: {path}:{where}: {message}\n"


@pytest.mark.parametrize(
    ("env", "where", "code", "message"),
    [
        (r'["A=x\0y"]', "steps[0].run-script.env", 2, r'invalid value "A=x\x00y" for flag -env: ' + NUL),
        (r'{A: "x\0y"}', "steps[0].run-script.env.A", 2, r'invalid value "x\x00y": ' + NUL),
    ],
    ids=["list", "mapping"],
)
def test_a_dry_run_refuses_an_env_value_with_a_nul(
    cli: CLI, tmp_path: Path, context_dir: Path, where: str, env: str, code: int, message: str
) -> None:
    text = (f"source: {{image-file: x.raw}}\nbuild-context: {context_dir}\n"
            f"steps:\n  - run-script: {{script: preload.sh, env: {env}}}\nfinish: {{output: o.raw}}\n")  # fmt: skip
    path = build_file(tmp_path, text)
    result = cli("build", "-dry-run", str(path))
    assert result.code == code
    assert one_line(result) == f"cos-customizer: error: {path}:4: {where}: {message}\n"


FORGED = "\ncos-customizer: error: forged"


def test_a_newline_in_image_file_is_quoted(cli: CLI, context_dir: Path) -> None:
    result = cli("start-image-build", f"-build-context={context_dir}", f"-image-file=/nonexistent{FORGED}")
    assert result.code == 1
    assert one_line(result) == (
        r'cos-customizer: error: -image-file="/nonexistent\ncos-customizer: error: forged": no such file; '
        "give a raw, .qcow2 or .tar.gz COS disk image\n"
    )


def test_a_newline_in_build_context_is_quoted(cli: CLI, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(4096))
    result = cli("start-image-build", f"-build-context={tmp_path}/ctx{FORGED}", f"-image-file={image}")
    assert result.code == 1
    assert one_line(result) == (
        rf'cos-customizer: error: build context "{tmp_path}/ctx\ncos-customizer: error: forged" does not exist: '
        "pass -build-context=DIR, the directory holding your scripts and files\n"
    )


def test_a_newline_in_script_is_quoted(local_build: CLI) -> None:
    result = local_build("run-script", f"-script=missing.sh{FORGED}")
    assert result.code == 1
    assert one_line(result) == (
        r'cos-customizer: error: could not find "missing.sh\ncos-customizer: error: forged" in the build context; '
        "the build context is the -build-context of start-image-build, and paths are relative to it\n"
    )


def test_a_newline_in_output_is_quoted(local_build: CLI, tmp_path: Path) -> None:
    result = local_build("finish-image-build", f"-output={tmp_path}/none{FORGED}/out.raw", "-dry-run")
    assert result.code == 1
    forged = r"\ncos-customizer: error: forged"
    assert one_line(result) == (
        f'cos-customizer: error: -output="{tmp_path}/none{forged}/out.raw": the directory "{tmp_path}/none{forged}" '
        "does not exist\n"
    )


def test_a_newline_in_an_env_value_makes_no_line_of_the_plan(local_build: CLI, tmp_path: Path) -> None:
    # A value any process can receive (no NUL), shown in the dry run's plan: escaped, so it forges no line there.
    result = local_build("run-script", "-script=preload.sh", f"-env=A=1{FORGED}\x1b[2J")
    assert result.code == 0, result.err
    result = local_build("finish-image-build", f"-output={tmp_path}/out.raw", "-dry-run")
    assert result.code == 0, result.err
    steps = [line for line in result.err.splitlines() if "run-script" in line]
    assert steps == [r'    1. run-script preload.sh (env: "A=1\ncos-customizer: error: forged\x1b[2J")']
    assert "forged" not in result.err.replace(steps[0], "")
    assert "\x1b" not in result.err


def test_terminal_controls_in_keys_and_values_are_escaped(cli: CLI, tmp_path: Path) -> None:
    path = build_file(tmp_path, 'source: {"im\\e[31mage\\a\\r": x}\nfinish: {output: o.raw}\n')
    result = cli("build", "-dry-run", str(path))
    assert result.code == 2
    key = r'"im\x1b[31mage\x07\r"'
    assert one_line(result) == (
        f"cos-customizer: error: {path}:1: source.{key}: start-image-build has no flag -{key}; "
        "see cos-customizer start-image-build --help\n"
    )
    path = build_file(tmp_path, 'source: {image-file: "/x\\e]0;title\\a\\r.raw"}\nfinish: {output: o.raw}\n')
    result = cli("build", "-dry-run", str(path))
    assert result.code == 1
    assert result.err.endswith(
        rf'cos-customizer: error: {path}:1: source: -image-file="/x\x1b]0;title\x07\r.raw": no such file; '
        "give a raw, .qcow2 or .tar.gz COS disk image\n"
    )
    assert "\x1b" not in result.err and "\x07" not in result.err and "\r" not in result.err


def test_a_damaged_build_context_archive_is_one_line(local_build: CLI, workspace_root: Path) -> None:
    archive = workspace_root / "user_build_context.tar"
    archive.write_bytes(b"garbage " * 1000)
    result = local_build("run-script", "-script=preload.sh")
    assert result.code == 1
    assert one_line(result) == (
        f"cos-customizer: error: cannot read the build context archive {archive} (invalid header): "
        "run start-image-build again\n"
    )


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="needs root: a tmpfs mount, a real build")
def test_no_space_while_a_script_writes_is_one_line(cli: CLI, tmp_path: Path, sample_raw: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "fill.sh").write_text("head -c 600M /dev/zero > /var/lib/big; echo written\n")
    assert cli("start-image-build", f"-build-context={context}", f"-image-file={sample_raw}").code == 0
    assert cli("run-script", "-script=fill.sh").code == 0
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", small)  # room for the working copy, not for 600 MiB more
    try:
        result = cli("finish-image-build", f"-output={small / 'out.raw'}")
        assert list(small.iterdir()) == []
    finally:
        sh("umount", small)
    assert result.code == 1
    *progress, last = result.err.splitlines()
    assert last == (
        f"cos-customizer: error: No space left on device in {small} while the scripts ran (the working copy grows "
        "with what they write): free some space there or choose an -output on a larger file system"
    )
    assert [line for line in progress if not line.startswith(("==> ", "[run-script fill.sh] "))] == []
    assert "Traceback" not in result.err
