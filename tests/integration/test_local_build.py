"""The local executor end to end on the sample image, checked with standard tools.

Needs root (loop devices, mounts, namespaces): CI runs as root.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import privilege, runner
from cos_customizer.cli.main import main
from cos_customizer.disk import ext, gpt, grub, loop
from tests.conftest import SAMPLE_FIXTURES, data_digest, read_until, sh, sigint_as_from_a_terminal, snapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
]

MiB = 1 << 20
SCRIPT = """set -e
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
if [ -w /usr/share/oem ]; then echo "in the OEM" > /usr/share/oem/hello; fi
if touch /usr/forbidden 2>/dev/null; then echo writable > /var/lib/usr-write; else echo read-only > /var/lib/usr-write; fi
echo "$GREETING from $(pwd)" > /var/lib/greeting
mkdir -p /var/log/app && echo "noise" > /var/log/app/app.log
{
  echo "etc: $(echo x > /etc/cos-customizer-test && cat /etc/cos-customizer-test)"
  echo "pid: $$ $(cat /proc/1/comm)"
  echo "dev: $(test -c /dev/null && echo ok)"
  echo "sys: $(test -d /sys/kernel && echo ok)"
  echo "tmp: $(echo t > /tmp/t && cat /tmp/t)"
  echo "resolv: $(md5sum < /etc/resolv.conf | cut -c1-8)"
} > /var/lib/checks
echo "step done"
"""


def leaks(path: Path) -> tuple[list[str], list[str]]:
    """Loop devices and mounts that mention `path`."""
    loops = [line for line in sh("losetup", "-a").stdout.splitlines() if str(path) in line]
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]
    return loops, mounts


def cat(image: Path, offset: int, name: str) -> str:
    result = sh("debugfs", "-R", f"cat {name}", ext.device(image, offset))
    return result.stdout


def exists(image: Path, offset: int, name: str) -> bool:
    result = sh("debugfs", "-R", f"stat {name}", ext.device(image, offset), check=False)
    return "File not found" not in result.stderr and result.stdout.strip() != ""


@dataclass(frozen=True)
class Build:
    source: Path
    source_digest: str
    output: Path
    raw: Path  # the output as a raw disk
    code: int
    out: str
    err: str


def cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "cos_customizer", *argv], env=env, capture_output=True, text=True, check=False
    )
    return result.returncode, result.stdout, result.stderr


@dataclass(frozen=True)
class Started:
    env: dict[str, str]
    source: Path
    digest: str


def start(tmp: Path, source: Path, scripts: dict[str, str | bytes], steps: list[list[str]]) -> Started:
    """A build started on `source` (a copy the test owns) with `scripts` (and other files) as the build context."""
    context = tmp / "context"
    context.mkdir()
    for name, data in scripts.items():
        if isinstance(data, bytes):
            (context / name).write_bytes(data)
        else:
            (context / name).write_text(data)
    env = {**os.environ, "HOME": str(tmp), "COS_CUSTOMIZER_WORKDIR": str(tmp / "ws")}
    digest = data_digest(source)
    code, _, err = cli(env, "start-image-build", f"-build-context={context}", f"-image-file={source}")
    assert code == 0, err
    for step in steps:
        code, _, err = cli(env, *step)
        assert code == 0, err
    return Started(env, source, digest)


def copy_of(sample: Path, tmp: Path) -> Path:
    source = tmp / "source.raw"
    sh("cp", "--sparse=always", sample, source)
    return source


def run_build(tmp: Path, sample: Path, steps: list[list[str]], finish: list[str], output_name: str) -> Build:
    started = start(tmp, copy_of(sample, tmp), {"preload.sh": SCRIPT}, steps)
    env, source, digest = started.env, started.source, started.digest
    output = tmp / output_name
    code, out, err = cli(env, "finish-image-build", f"-output={output}", *finish)
    raw = output
    if code == 0 and output_name.endswith(".tar.gz"):
        with tarfile.open(output) as archive:
            members = archive.getmembers()
        assert [m.name for m in members] == ["disk.raw"]
        assert members[0].issparse()
        (tmp / "extract").mkdir()
        sh("tar", "-xzf", output, "-C", tmp / "extract")
        raw = tmp / "extract" / "disk.raw"
    elif code == 0 and output_name.endswith(".qcow2"):
        assert output.read_bytes()[:4] == b"QFI\xfb"
        raw = tmp / "converted.raw"
        sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", output, raw)
    return Build(source, digest, output, raw, code, out, err)


SEALED = ([["run-script", "-script=preload.sh", "-env=GREETING=hi"], ["seal-oem"], ["disable-auto-update"]],
          ["-oem-size=1G", "-disk-size-gb=12"])  # fmt: skip


@dataclass(frozen=True)
class SealedBuild(Build):
    sample: Path  # the source sample image (session fixture)
    grub_format: str


# (-grub-format of the source sample, output): every output format on the dm= sample, raw on the dm-mod.create= one.
SEALED_CASES = [("dm", "out.raw"), ("dm", "out.tar.gz"), ("dm", "out.qcow2"), ("dm-mod", "out.raw")]


@pytest.fixture(scope="module", params=SEALED_CASES, ids=[f"{fmt}-{out}" for fmt, out in SEALED_CASES])
def sealed_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SealedBuild:
    grub_format, output = request.param
    sample: Path = request.getfixturevalue(SAMPLE_FIXTURES[grub_format])
    tmp = tmp_path_factory.mktemp("sealed")
    build = run_build(tmp, sample, SEALED[0], SEALED[1], output)
    assert build.code == 0, build.err
    return SealedBuild(**vars(build), sample=sample, grub_format=grub_format)


def same_bytes(a_path: Path, a: gpt.Partition, b_path: Path, b: gpt.Partition) -> bool:
    if a.size != b.size:
        return False
    with open(a_path, "rb") as fa, open(b_path, "rb") as fb:
        for offset in range(0, a.size * 512, 64 * MiB):
            fa.seek(a.first * 512 + offset)
            fb.seek(b.first * 512 + offset)
            if fa.read(64 * MiB) != fb.read(64 * MiB):
                return False
    return True


def partition_offset(table: gpt.Table, number: int) -> int:
    return table.partition(number).first * 512


def verity_verify(image: Path, part: gpt.Partition, entry: grub.DmTarget) -> subprocess.CompletedProcess[str]:
    blocks = entry.sectors // 8
    with loop.attach(image, offset=part.first * 512, size=part.size * 512, read_only=True) as device:
        return sh("veritysetup", "verify", "--format=0", "--no-superblock", "--hash=sha256",
                  "--data-block-size=4096", "--hash-block-size=4096", f"--data-blocks={blocks}",
                  f"--hash-offset={int(entry.params['hashstart']) * 512}", f"--salt={entry.params['salt']}",
                  device, device, entry.params["root_hexdigest"], check=False)  # fmt: skip


def kernel_line_tokens_after_anchor(cfg: str) -> list[list[str]]:
    """For each kernel line, the two tokens after cros_efi."""
    found = []
    for line in cfg.splitlines():
        tokens = line.split()
        if "cros_efi" in tokens:
            at = tokens.index("cros_efi")
            found.append(tokens[at + 1 : at + 3])
    return found


def test_sealed_build(sealed_build: SealedBuild) -> None:
    sample_raw = sealed_build.sample
    raw, before = sealed_build.raw, gpt.read_table(sample_raw)
    assert "Build succeeded" in sealed_build.out
    assert "OEM verity root hash" in sealed_build.out
    assert "[run-script preload.sh] step done" in sealed_build.err
    assert "No problems found" in sh("sgdisk", "-v", raw).stdout
    table = gpt.read_table(raw)
    assert table.disk_sectors == 12 * 2097152
    # ROOT-A: 8 sectors at its old start. KERN-B boots first.
    assert (table.partition(3).first, table.partition(3).size) == (4509696, 8)
    # As the original's `cgpt prioritize -P 5 -i 4`: KERN-B 5, KERN-A 4, KERN-C disabled.
    kernels = {p.number: p.priority for p in table.partitions if p.type_guid == gpt.CHROMEOS_KERNEL}
    assert kernels == {2: 4, 4: 5, 6: 0}
    # OEM at P = ROOT-A start + 4096, 2047M; STATE right after it, to the end.
    oem, state = table.partition(8), table.partition(1)
    assert (oem.first, oem.size) == (4513792, 2047 * 2048)
    assert (state.first, state.last) == (oem.last + 1, table.last_usable)
    assert ext.info(raw, oem.first * 512).size == 1 << 30
    assert ext.info(raw, state.first * 512).size == state.size * 512 // 4096 * 4096  # fills it, in whole blocks
    # ROOT-B is byte-identical to the source's ROOT-A.
    src_a, out_b = before.partition(3), table.partition(5)
    assert same_bytes(sample_raw, src_a, raw, out_b)
    # grub.cfg: both masks once per kernel line; ROOT-B and the sealed OEM verify with its parameters.
    cfg = grub.read_grub_cfg(raw, partition_offset(table, 12))
    for line in (line for line in cfg.splitlines() if "cros_efi" in line):
        assert line.split().count("systemd.mask=update-engine.service") == 1
        assert line.split().count("systemd.mask=usr-share-oem.mount") == 1
    # The original's order: update-engine masked first, then the OEM mount, each right after cros_efi.
    assert (
        kernel_line_tokens_after_anchor(cfg)
        == [["systemd.mask=usr-share-oem.mount", "systemd.mask=update-engine.service"]] * 4
    )
    entries = grub.read_dm(cfg)
    assert [[t.name for t in line] for line in entries] == [["vroot", "oemroot"], ["vroot", "oemroot"]]
    assert {t.form for line in entries for t in line} == {sealed_build.grub_format}
    vroot_b = entries[1][0]
    assert vroot_b.params["payload"] == f"PARTUUID={str(out_b.guid).upper()}"
    assert verity_verify(raw, out_b, vroot_b).returncode == 0
    oemroot = entries[0][1]
    assert oemroot.params["payload"] == f"PARTUUID={str(oem.guid).upper()}"
    assert oemroot.sectors == 262144 * 8
    verified = verity_verify(raw, oem, oemroot)
    assert verified.returncode == 0, verified.stderr
    # Files: written by the script, present before, and the state dir gone.
    s, o = state.first * 512, oem.first * 512
    assert cat(raw, s, "/var_overlay/lib/hello") == "hello from the build\n"
    assert cat(raw, s, "/hello") == "kept on STATE\n"
    assert cat(raw, o, "/hello") == "in the OEM\n"
    assert cat(raw, s, "/var_overlay/lib/greeting") == "hi from /var/lib/.cos-customizer/user\n"
    assert cat(raw, s, "/var_overlay/lib/usr-write") == "read-only\n"
    resolv = hashlib.md5(Path("/etc/resolv.conf").read_bytes()).hexdigest()[:8]
    assert cat(raw, s, "/var_overlay/lib/checks").splitlines() == [
        "etc: x",
        "pid: 1 bash",
        "dev: ok",
        "sys: ok",
        "tmp: t",
        f"resolv: {resolv}",
    ]
    assert cat(raw, s, "/var_overlay/lib/sample-image") == "this file was on STATE before the build\n"
    assert cat(raw, o, "/README") == "OEM partition of the cos-customizer sample image\n"
    assert cat(raw, s, "/var_overlay/log/app/app.log") == ""  # logs truncated by the cleanup
    assert not exists(raw, s, "/var_overlay/lib/.cos-customizer")
    ext.check(raw, s)
    ext.check(raw, o)


def test_sealed_build_leaves_nothing_behind(sealed_build: Build) -> None:
    tmp = sealed_build.output.parent
    assert leaks(tmp) == ([], [])
    assert data_digest(sealed_build.source) == sealed_build.source_digest
    assert not (tmp / "ws").exists()  # the workspace is removed, as the original does
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []
    allocated = sealed_build.output.stat().st_blocks * 512
    assert allocated < 200 * MiB


@pytest.mark.parametrize(
    ("grub_format", "steps", "finish", "oem_partition", "reclaimed"),
    [
        # disable-auto-update and a larger OEM, no seal: the OEM file system grows to fill its partition.
        (
            "dm",
            [["run-script", "-script=preload.sh"], ["disable-auto-update"]],
            ["-oem-size=1G", "-disk-size-gb=11"],
            1023 * 2048,
            True,
        ),
        # seal-oem without -oem-size: a 32M OEM partition holding the 16M file system; both grub.cfg forms.
        ("dm", [["run-script", "-script=preload.sh"], ["seal-oem"]], [], 32 * 2048, True),
        ("dm-mod", [["run-script", "-script=preload.sh"], ["seal-oem"]], [], 32 * 2048, True),
        # only a script: ROOT-A stays, nothing moves.
        ("dm", [["run-script", "-script=preload.sh"]], [], 32768, False),
    ],
)
def test_other_builds(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    grub_format: str,
    steps: list[list[str]],
    finish: list[str],
    oem_partition: int,
    reclaimed: bool,
) -> None:
    sample_raw: Path = request.getfixturevalue(SAMPLE_FIXTURES[grub_format])
    build = run_build(tmp_path, sample_raw, steps, finish, "out.raw")
    assert build.code == 0, build.err
    raw = build.raw
    table = gpt.read_table(raw)
    oem, state = table.partition(8), table.partition(1)
    assert oem.size == oem_partition
    assert "No problems found" in sh("sgdisk", "-v", raw).stdout
    sealed = ["seal-oem"] in steps
    cfg = grub.read_grub_cfg(raw, partition_offset(table, 12))
    masked = [line for line in cfg.splitlines() if "systemd.mask=update-engine.service" in line]
    assert bool(masked) == reclaimed
    assert ("oemroot" in cfg) == sealed
    if sealed:
        assert ext.info(raw, oem.first * 512).size == 16 * MiB
        for line in grub.read_dm(cfg):
            assert [(t.name, t.form) for t in line] == [("vroot", grub_format), ("oemroot", grub_format)]
            assert verity_verify(raw, oem, line[1]).returncode == 0
        assert all(
            tokens == ["systemd.mask=usr-share-oem.mount", "systemd.mask=update-engine.service"]
            for tokens in kernel_line_tokens_after_anchor(cfg)
        )
    if reclaimed:
        assert {n: table.partition(n).priority for n in (2, 4, 6)} == {2: 4, 4: 5, 6: 0}
    elif finish:
        assert ext.info(raw, oem.first * 512).size == oem.size * 512
    if reclaimed:
        assert table.partition(3).size == 8
    else:
        src = gpt.read_table(sample_raw)
        assert table.partitions == src.partitions
        assert same_bytes(sample_raw, src.partition(3), raw, table.partition(3))  # the root was mounted read-only
    assert cat(raw, state.first * 512, "/var_overlay/lib/hello") == "hello from the build\n"
    assert cat(raw, state.first * 512, "/var_overlay/lib/usr-write") == "read-only\n"
    ext.check(raw, state.first * 512)
    ext.check(raw, oem.first * 512)
    assert leaks(tmp_path) == ([], [])
    assert data_digest(build.source) == build.source_digest


@pytest.mark.parametrize("fmt", ["qcow2", "tar.gz"])
def test_compressed_sources(tmp_path: Path, sample_raw: Path, fmt: str) -> None:
    """qcow2 and GCE .tar.gz sources are converted or extracted into the working copy."""
    source = tmp_path / f"source.{fmt}"
    if fmt == "qcow2":
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", sample_raw, source)
    else:
        staging = tmp_path / "staging"
        staging.mkdir()
        sh("cp", "--sparse=always", sample_raw, staging / "disk.raw")
        sh("tar", "--sparse", "--format=oldgnu", "-czf", source, "-C", staging, "disk.raw")
        sh("rm", "-r", staging)
    steps = [["run-script", "-script=preload.sh"], ["disable-auto-update"]]
    started = start(tmp_path, source, {"preload.sh": SCRIPT}, steps)
    env, before = started.env, started.digest
    code, out, err = cli(env, "finish-image-build", f"-output={tmp_path / 'out.raw'}", "-oem-size=512M", "-dry-run")
    assert code == 0, err
    assert json.loads(out)["disk_plan"]["after"]["3"]["size"] == 8
    code, out, err = cli(env, "finish-image-build", f"-output={tmp_path / 'out.raw'}", "-oem-size=512M")
    assert code == 0, err
    table = gpt.read_table(tmp_path / "out.raw")
    assert table.partition(8).size == 511 * 2048
    assert (
        cat(tmp_path / "out.raw", table.partition(1).first * 512, "/var_overlay/lib/hello") == "hello from the build\n"
    )
    assert data_digest(source) == before
    assert leaks(tmp_path) == ([], [])


# Sealing runs last (a README decision): what a later step writes into the OEM is sealed with it.

OEM_WRITER = """set -e
echo "written after seal-oem in the step list" > /usr/share/oem/late
"""


@pytest.mark.parametrize("grub_format", ["dm", "dm-mod"])
def test_seal_oem_before_a_script_still_seals_last(
    request: pytest.FixtureRequest, tmp_path: Path, grub_format: str
) -> None:
    sample: Path = request.getfixturevalue(SAMPLE_FIXTURES[grub_format])
    steps = [["seal-oem"], ["run-script", "-script=late.sh"]]
    started = start(tmp_path, copy_of(sample, tmp_path), {"late.sh": OEM_WRITER}, steps)
    output = tmp_path / "out.raw"
    code, _, err = cli(started.env, "finish-image-build", f"-output={output}", "-oem-size=64M")
    assert code == 0, err
    table = gpt.read_table(output)
    oem = table.partition(8)
    assert cat(output, oem.first * 512, "/late") == "written after seal-oem in the step list\n"
    cfg = grub.read_grub_cfg(output, partition_offset(table, 12))
    entries = grub.read_dm(cfg)
    assert [[(t.name, t.form) for t in line] for line in entries] == [
        [("vroot", grub_format), ("oemroot", grub_format)]
    ] * 2
    for line in entries:
        verified = verity_verify(output, oem, line[1])
        assert verified.returncode == 0, verified.stderr
    # The file is inside the verified range: changing its bytes on disk breaks verification.
    block = sh("debugfs", "-R", "bmap /late 0", ext.device(output, oem.first * 512)).stdout.strip()
    block_offset = oem.first * 512 + int(block) * 4096
    with open(output, "r+b") as disk:
        disk.seek(block_offset)
        assert disk.read(7) == b"written"
        disk.seek(block_offset)
        disk.write(b"W")
    assert verity_verify(output, oem, entries[0][1]).returncode != 0


# Failures: nothing is left behind and the source is unchanged.


def assert_clean_failure(tmp: Path, build: Build) -> None:
    assert not build.output.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []
    assert leaks(tmp) == ([], [])
    assert data_digest(build.source) == build.source_digest


def test_failing_script(tmp_path: Path, sample_raw: Path) -> None:
    fail = "echo before the failure\necho oops >&2\nexit 3\n"
    started = start(
        tmp_path, copy_of(sample_raw, tmp_path), {"fail.sh": fail}, [["run-script", "-script=fail.sh"], ["seal-oem"]]
    )
    env, source, digest = started.env, started.source, started.digest
    code, out, err = cli(
        env, "finish-image-build", f"-output={tmp_path / 'out.tar.gz'}", "-oem-size=1G", "-disk-size-gb=12"
    )
    assert code == 1
    assert err.endswith(
        "cos-customizer: error: run-script fail.sh failed with exit status 3; last output: before the failure | oops\n"
    )
    assert "Traceback" not in err
    assert_clean_failure(tmp_path, Build(source, digest, tmp_path / "out.tar.gz", tmp_path, code, out, err))


def test_seal_oem_without_a_verity_line_in_grub_cfg(tmp_path: Path, sample_raw: Path) -> None:
    source = copy_of(sample_raw, tmp_path)
    efi = partition_offset(gpt.read_table(source), 12)
    local_only = "\n".join(line for line in grub.read_grub_cfg(source, efi).splitlines() if "dm=" not in line)
    grub.write_grub_cfg(source, efi, local_only)
    started = start(tmp_path, source, {"preload.sh": SCRIPT}, [["run-script", "-script=preload.sh"], ["seal-oem"]])
    output = tmp_path / "out.raw"
    code, out, err = cli(started.env, "finish-image-build", f"-output={output}")
    assert code == 1
    assert err.endswith(
        "cos-customizer: error: seal-oem failed: grub.cfg has no dm= or dm-mod.create= verity line to add the "
        "OEM to: seal-oem needs the verified boot entries of a COS image's efi/boot/grub.cfg\n"
    )
    assert "Traceback" not in err
    assert_clean_failure(tmp_path, Build(source, started.digest, output, tmp_path, code, out, err))


@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")]
)
def test_signal_during_the_build(tmp_path: Path, sample_raw: Path, sig: signal.Signals, code: int, said: str) -> None:
    slow = "echo started\nsleep 60\necho never\n"
    started = start(tmp_path, copy_of(sample_raw, tmp_path), {"slow.sh": slow}, [["run-script", "-script=slow.sh"]])
    env, source, digest = started.env, started.source, started.digest
    output = tmp_path / "out.raw"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={output}", "-disk-size-gb=11"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    assert proc.stderr is not None
    read_until(proc.stderr, "[run-script slow.sh] started", "the script never started")
    while not leaks(tmp_path)[1]:  # the stage's mounts are not visible here; loops are
        if leaks(tmp_path)[0]:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == code
    assert said in rest
    assert "never" not in rest
    assert_clean_failure(tmp_path, Build(source, digest, output, tmp_path, code, "", rest))


@contextmanager
def started(tmp_path: Path, sample_raw: Path) -> Iterator[dict[str, str]]:
    context = tmp_path / "context"
    context.mkdir()
    (context / "ok.sh").write_text("true\n")
    source = tmp_path / "source.raw"
    sh("cp", "--sparse=always", sample_raw, source)
    env = {"HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), "PATH": os.environ["PATH"]}
    assert main(["start-image-build", f"-build-context={context}", f"-image-file={source}"], env) == 0
    assert main(["run-script", "-script=ok.sh"], env) == 0
    yield env


def test_missing_tool_is_refused_before_anything(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with started(tmp_path, sample_raw) as env:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name in ("e2fsck", "mount", "umount", "unshare", "tar", "mtype", "mcopy", "losetup"):
            found = runner.require_tool(name, "x")
            (bin_dir / name).symlink_to(found)
        monkeypatch.setenv("PATH", str(bin_dir))
        monkeypatch.setattr(runner, "FALLBACK_DIRS", ())
        before = snapshot(tmp_path / "ws")
        capsys.readouterr()
        code = main(["finish-image-build", f"-output={tmp_path / 'out.raw'}"], env)
        err = capsys.readouterr().err
    assert code == 1
    assert err == (
        "cos-customizer: error: resize2fs is not installed: install the Debian package e2fsprogs (scripts/setup does)\n"
    )
    assert snapshot(tmp_path / "ws") == before
    assert not (tmp_path / "out.raw").exists()


def test_not_enough_space_is_refused_before_anything(
    tmp_path: Path, sample_raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    with started(tmp_path, sample_raw) as env, loop.mounted("tmpfs", small, fstype="tmpfs", options=("size=16m",)):
        before = snapshot(tmp_path / "ws")
        capsys.readouterr()
        code = main(["finish-image-build", f"-output={small / 'out.raw'}"], env)
        err = capsys.readouterr().err
        assert list(small.iterdir()) == []
    assert code == 1
    assert err.startswith(f"cos-customizer: error: not enough free space in {small}: the build needs about ")
    assert err.endswith("MiB are free; free some space or choose another -output\n")
    assert snapshot(tmp_path / "ws") == before


def test_timeout_stops_a_silent_script(tmp_path: Path, sample_raw: Path) -> None:
    slow = "sleep 120\n"
    started = start(tmp_path, copy_of(sample_raw, tmp_path), {"slow.sh": slow}, [["run-script", "-script=slow.sh"]])
    output = tmp_path / "out.raw"
    code, out, err = cli(started.env, "finish-image-build", f"-output={output}", "-timeout=3s")
    assert code == 1
    assert err.endswith("cos-customizer: error: the build took longer than -timeout and was stopped\n")
    assert_clean_failure(tmp_path, Build(started.source, started.digest, output, tmp_path, code, out, err))


def test_not_root_is_refused_before_anything(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with started(tmp_path, sample_raw) as env:
        before = snapshot(tmp_path / "ws")
        monkeypatch.setattr(privilege, "can_mount", lambda: False)  # as for a user who is not root
        capsys.readouterr()
        code = main(["finish-image-build", f"-output={tmp_path / 'out.raw'}"], env)
        err = capsys.readouterr().err
    assert code == 1
    assert err == (
        "cos-customizer: error: a local build needs root (it mounts file systems from loop devices): "
        "run finish-image-build as root, for example with sudo\n"
    )
    assert snapshot(tmp_path / "ws") == before
    assert not (tmp_path / "out.raw").exists()


def test_a_source_that_is_not_a_cos_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"not a disk" * 1000)
    context = tmp_path / "context"
    context.mkdir()
    env = {"HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), "PATH": os.environ["PATH"]}
    assert main(["start-image-build", f"-build-context={context}", f"-image-file={junk}"], env) == 0
    capsys.readouterr()
    assert main(["finish-image-build", f"-output={tmp_path / 'out.raw'}", "-dry-run"], env) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cos-customizer: error: {junk} is not a GPT disk: ")
    assert err.endswith("(a COS disk image has a GPT partition table)\n") and err.count("\n") == 1
