"""Hard faults of a local build: SIGTERM and -timeout at any moment, huge output, full and read-only
file systems, an output on another file system, the sweep of what older or killed builds left.
SIGKILL at each phase: tests/integration/test_sigkill.py (which uses the helpers here).

Each test asserts the host side: no process, loop device or mount of the build left (only the
build's own objects are looked at: other work may run on this machine), nothing beside the output,
and exactly one `cos-customizer: error:` line naming the problem.

Needs root (loop devices, mounts, namespaces): CI runs as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import output, privilege, runner
from cos_customizer.executors.local import build as local
from cos_customizer.images import ImageFormat
from tests.conftest import data_digest, sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
]

MiB = 1 << 20
FS_MOUNT, FS_IMAGE = ".fs", ".fs.img"  # the test's own small file systems: the mount point, the ext4 image
MARK = "COS_FAULTS_TEST"  # set in the tool's environment: every host-side process of the build inherits it
NOTE = re.compile(r"note: removed (\S+), left behind by a killed build \(cos-customizer build, process \d+\)")
STEPS_OK = [["run-script", "-script=ok.sh"], ["seal-oem"], ["disable-auto-update"]]
FINISH_SIZES = ["-oem-size=1G", "-disk-size-gb=12"]


# What a build may leave on the host, found by what it owns: its token (in every script's name and in
# the daemon's argv), its directory (in the stage's command lines, loop devices and mounts) and the
# marker in its environment (every host-side process).


def processes_of(token: str, tmp: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if token in cmdline or str(tmp) in cmdline or f"{MARK}={token}".encode() in environ:
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def loops_of(tmp: Path) -> list[str]:
    """Loop devices backed by files under `tmp`, but for the test's own small file systems (`*.img`)."""
    listing = json.loads(sh("losetup", "--json", "--list").stdout or '{"loopdevices": []}')
    return [
        f"{device['name']} {device.get('back-file')}"
        for device in listing.get("loopdevices", [])
        if str(tmp) in str(device.get("back-file") or "") and not str(device.get("back-file")).endswith(FS_IMAGE)
    ]


def mounts_of(tmp: Path) -> list[str]:
    """Mounts on or under `tmp`, but for the test's own small file systems (mounted on `*.fs`)."""
    return [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(tmp) in line and not line.split()[4].endswith(FS_MOUNT)
    ]


def leftovers(token: str, tmp: Path, *, loops: bool = True, seconds: float = 15.0) -> list[str]:
    """Processes, loop devices and mounts of the build, once the kernel had `seconds` to release them."""
    deadline = time.monotonic() + seconds
    while True:
        left = processes_of(token, tmp) + (loops_of(tmp) if loops else []) + mounts_of(tmp)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def force_cleanup(token: str, tmp: Path) -> None:
    """After a failed test: kill what the build left, unmount and detach what it holds (its own objects only)."""
    for line in processes_of(token, tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    time.sleep(0.5)
    for line in reversed(mounts_of(tmp)):
        sh("umount", "-l", line.split()[4], check=False)
    for line in loops_of(tmp):
        sh("losetup", "-d", line.split()[0], check=False)


@dataclass
class Setup:
    tmp: Path
    token: str
    env: dict[str, str]
    context: Path
    source: Path
    outdir: Path

    @property
    def loop_script(self) -> str:
        return f"{self.token}-loop.sh"

    @property
    def daemon_script(self) -> str:
        return f"{self.token}-daemon.sh"

    def cli(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cos_customizer", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def start(self, steps: list[list[str]]) -> None:
        for argv in [["start-image-build", f"-build-context={self.context}", f"-image-file={self.source}"], *steps]:
            result = self.cli(*argv)
            assert result.returncode == 0, result.stderr

    def finish(self, out: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={self.outdir / out}", *extra],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


SCRIPTS = {
    "ok.sh": 'echo hello > /var/lib/hello\necho "script done"\n',
    # Ignores SIGTERM and SIGINT and never ends.
    "{token}-loop.sh": "trap '' TERM INT\necho looping\nwhile :; do sleep 1; done\n",
    # Starts a daemon that leaves the script's session and process group, then never ends.
    "{token}-daemon.sh": (
        "trap '' TERM INT\n"
        "cp setsid /var/lib/google/setsid\n"
        "/var/lib/google/setsid -f bash -c 'exec -a {token}-daemon sleep 100000' </dev/null >/dev/null 2>&1\n"
        "echo daemon started\n"
        "while :; do sleep 1; done\n"
    ),
}


@pytest.fixture
def setup(tmp_path: Path, sample_raw: Path) -> Iterator[Setup]:
    token = f"cosfault{uuid.uuid4().hex[:12]}"
    context = tmp_path / "context"
    context.mkdir()
    for name, text in SCRIPTS.items():
        (context / name.format(token=token)).write_text(text.format(token=token))
    shutil.copy2("/usr/bin/setsid", context / "setsid")
    source = tmp_path / "source.raw"
    sh("cp", "--sparse=always", sample_raw, source)
    outdir = tmp_path / "out"
    outdir.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), MARK: token}
    try:
        yield Setup(tmp_path, token, env, context, source, outdir)
    finally:
        force_cleanup(token, tmp_path)


def kill_when(proc: subprocess.Popen[str], seen: Callable[[str], bool], sig: int, seconds: float = 60) -> list[str]:
    """Read the tool's output until a line satisfies `seen`, then send it `sig`; the lines read (all of them)."""
    assert proc.stdout is not None
    watchdog = threading.Timer(seconds, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if seen(line):
                proc.send_signal(sig)
                break
        else:
            pytest.fail("the build never reached the point to stop it at:\n" + "\n".join(lines))
        lines += [line.rstrip("\n") for line in proc.stdout]
        proc.wait()
    finally:
        watchdog.cancel()
    return lines


@pytest.mark.parametrize("script", ["loop", "daemon"])
def test_sigterm_while_a_script_ignores_it_leaves_nothing(setup: Setup, script: str) -> None:
    name = setup.loop_script if script == "loop" else setup.daemon_script
    setup.start([["run-script", f"-script={name}"]])
    proc = setup.finish("out.raw")
    lines = kill_when(proc, lambda line: "looping" in line or "daemon started" in line, signal.SIGTERM)
    assert proc.returncode == 143, lines
    assert lines[-1] == "cos-customizer: stopped by SIGTERM; nothing was left half-written"
    assert not [line for line in lines if "error" in line], lines
    assert leftovers(setup.token, setup.tmp) == []
    assert list(setup.outdir.iterdir()) == []


def test_timeout_while_a_script_ignores_sigterm_leaves_nothing(setup: Setup) -> None:
    setup.start([["run-script", f"-script={setup.daemon_script}"]])
    result = setup.cli("finish-image-build", f"-output={setup.outdir / 'out.raw'}", "-timeout=4s")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("cos-customizer:")]
    assert errors == ["cos-customizer: error: the build took longer than -timeout and was stopped"]
    assert "daemon started" in result.stderr
    assert leftovers(setup.token, setup.tmp) == []
    assert list(setup.outdir.iterdir()) == []


# Sweeping: only a dead build's own, recognisably named work directories.


def test_sweep_removes_only_dead_builds_work_directories(tmp_path: Path) -> None:
    def work(name: str, owner: bool = True) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "disk.raw").write_bytes(b"x" * 4096)
        if owner:
            (path / local.OWNER).write_text("cos-customizer build, process 999999\n")
        return path

    dead = work(".out.raw.work-abcd1234")
    dead_early = work(".out.qcow2.work-0123abcd", owner=False)  # killed between its lock file's open and rename
    (dead_early / local.OWNER_NEW).write_text("")
    live = work(".out.raw.work-live5678")
    stranger = work(".out.raw.work-zzzz9999", owner=False)  # our name, but not our lock file
    other_name = work(".out.raw.work-toolong123")  # not a name we make
    plain = work("out.raw.work-abcd1234")  # not hidden: not ours
    target = work("elsewhere")
    link = tmp_path / ".out.raw.work-link1234"
    link.symlink_to(target)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(live / local.OWNER)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    device = sh("losetup", "--find", "--show", dead / "disk.raw").stdout.strip()
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert sorted(local.sweep(tmp_path)) == sorted([dead, dead_early])
        assert not dead.exists() and not dead_early.exists()
        for kept in (live, stranger, other_name, plain, target):
            assert (kept / "disk.raw").exists(), kept
        assert link.is_symlink()
        assert loops_of(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
        sh("losetup", "-d", device, check=False)


# Output: bounded memory whatever a script prints.


# ru_maxrss of a process includes what it had before its execve, so a child forked from a big pytest would
# start "big": the measure runs the program from a small wrapper and reads the wrapper's RUSAGE_CHILDREN.
MEASURE = (
    "import resource, subprocess, sys\n"
    "result = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
    "print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stdout.flush()\n"
    "sys.stdout.buffer.write(result.stdout)\n"
)


def peak_memory(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, int, list[str]]:
    """Run `argv`: its exit status, the peak resident memory (KiB) of it and every process it started, its output."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *argv], env=env, capture_output=True, text=True)
    first, *lines = result.stdout.splitlines()
    code, maxrss_kib = map(int, first.split())
    return code, maxrss_kib, lines


def test_run_streams_a_huge_line_in_bounded_memory() -> None:
    code = (
        "from cos_customizer import runner\n"
        "lines = []\n"
        "runner.run(['sh', '-c', 'head -c 268435456 /dev/zero | tr \"\\\\0\" x; echo; echo after'],"
        " on_line=lambda line: lines.append((len(line), line[-60:])))\n"
        "print(lines)\n"
    )
    status, maxrss_kib, lines = peak_memory([sys.executable, "-c", code])
    assert status == 0, lines
    assert maxrss_kib < 100 * 1024, maxrss_kib  # the line is 256 MiB
    mark = runner.CUT_MARK.format(limit=runner.LINE_LIMIT)
    assert lines == [repr([(runner.LINE_LIMIT + len(mark), ("x" * 60 + mark)[-60:]), (5, "after")])]


def test_bounded_lines_cuts_and_marks_long_lines() -> None:
    read, write = os.pipe()
    data = b"short\n" + b"a" * 150 + b"\n" + b"b" * 100 + b"\nc" * 3 + b"\n\xff\xfe tail without newline"

    def writer() -> None:
        with os.fdopen(write, "wb") as out:
            for at in range(0, len(data), 7):  # in pieces that split lines anywhere
                out.write(data[at : at + 7])
                out.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        lines = list(runner.bounded_lines(read, limit=100))
    finally:
        thread.join()
        os.close(read)
    mark = runner.CUT_MARK.format(limit=100)
    assert lines == ["short", "a" * 100 + mark, "b" * 100, "c", "c", "c", "\ufffd\ufffd tail without newline"]


def test_a_script_printing_a_huge_line_keeps_the_build_small(setup: Setup) -> None:
    (setup.context / "big.sh").write_text("head -c 268435456 /dev/zero | tr '\\0' x\necho\necho after\n")
    setup.start([["run-script", "-script=big.sh"]])
    argv = [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={setup.outdir / 'out.raw'}"]
    code, maxrss_kib, output_lines = peak_memory(argv, setup.env)
    assert code == 0, [line[:200] for line in output_lines]
    assert maxrss_kib < 128 * 1024, maxrss_kib  # every process of the build, at its peak; the line is 256 MiB
    lines = [line[:40] + " ... " + line[-60:] + f" ({len(line)})" for line in output_lines]
    mark = runner.CUT_MARK.format(limit=runner.LINE_LIMIT)
    prefix = "[run-script big.sh] "
    cut = f"{prefix}xxxxxxxxxxxxxxxxxxxx ... {('x' * 60 + mark)[-60:]} ({len(prefix) + runner.LINE_LIMIT + len(mark)})"
    assert cut in lines, lines
    assert f"{prefix}after ... {prefix}after ({len(prefix) + 5})" in lines


# Full, read-only and foreign file systems: one clear line each.


@contextlib.contextmanager
def small_fs(path: Path, mib: int, kind: str = "tmpfs") -> Iterator[Path]:
    """A file system of `mib` MiB mounted on `path` (made here), unmounted at the end whatever happens."""
    assert path.name.endswith(FS_MOUNT)
    path.mkdir(parents=True)
    image = path.with_name(path.name + ".img")
    device = ""
    if kind == "tmpfs":
        sh("mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", path)
    else:
        with open(image, "wb") as out:
            out.truncate(mib * MiB)
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", image)
        device = sh("losetup", "--find", "--show", image).stdout.strip()
        sh("mount", device, path)
    try:
        yield path
    finally:
        sh("umount", path, check=False)
        if device:
            sh("losetup", "-d", device, check=False)
        image.unlink(missing_ok=True)


def fill(directory: Path) -> None:
    """Use up every free block of the file system under `directory`."""
    with open(directory / "filler", "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\1" * MiB)
            out.flush()
    with contextlib.suppress(OSError), open(directory / "filler2", "wb") as out:
        while True:
            out.write(b"\1" * 4096)
            out.flush()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cos-customizer:")]


def config_files(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ws / "config").iterdir())}


def test_workspace_full_during_a_step(setup: Setup) -> None:
    with small_fs(setup.tmp / "ws.fs", 4) as fs:
        ws = fs / "ws"
        setup.env["COS_CUSTOMIZER_WORKDIR"] = str(ws)
        setup.start([])
        before = config_files(ws)
        fill(fs)
        result = setup.cli("run-script", "-script=ok.sh")
        assert result.returncode == 1
        assert errors(result.stderr) == [
            f"cos-customizer: error: cannot write the workspace file {ws}/.cos-customizer.lock: No space left on "
            "device; free some space there, or choose another -local-state-workdir, and run the step again"
        ]
        assert config_files(ws) == before  # no half-written config, no temporary file


def test_workspace_on_a_read_only_file_system(setup: Setup) -> None:
    with small_fs(setup.tmp / "ws.fs", 4) as fs:
        ws = fs / "ws"
        setup.env["COS_CUSTOMIZER_WORKDIR"] = str(ws)
        setup.start([])
        before = config_files(ws)
        sh("mount", "-o", "remount,ro", fs)
        result = setup.cli("seal-oem")
        assert result.returncode == 1
        assert errors(result.stderr) == [
            f"cos-customizer: error: cannot write the workspace file {ws}/.cos-customizer.lock: Read-only file "
            "system; make it writable, or choose another -local-state-workdir, and run the step again"
        ]
        assert config_files(ws) == before

        fresh = fs / "fresh"
        result = setup.cli(
            f"-local-state-workdir={fresh}", "start-image-build", f"-build-context={setup.context}",
            f"-image-file={setup.source}",
        )  # fmt: skip
        assert result.returncode == 1
        [line] = errors(result.stderr)
        assert line.startswith("cos-customizer: error: ") and "Read-only file system" in line, line
        assert sorted(p.name for p in fs.iterdir()) == ["ws"]


def test_workspace_under_a_regular_file(setup: Setup) -> None:
    blocker = setup.tmp / "a-file"
    blocker.write_text("mine\n")
    result = setup.cli(
        f"-local-state-workdir={blocker}/ws", "start-image-build", f"-build-context={setup.context}",
        f"-image-file={setup.source}",
    )  # fmt: skip
    assert result.returncode == 1
    [line] = errors(result.stderr)
    assert line.startswith("cos-customizer: error: ") and str(blocker) in line and "not a directory" in line, line
    assert blocker.read_text() == "mine\n"


def test_disk_full_in_the_stage_during_a_script(setup: Setup) -> None:
    (setup.context / "fill.sh").write_text("dd if=/dev/zero of=/var/lib/fill bs=1M count=600 2>&1 | tail -1\nsync\n")
    setup.start([["run-script", "-script=fill.sh"]])
    with small_fs(setup.tmp / "out.fs", 420, kind="ext4") as fs:
        result = setup.cli("finish-image-build", f"-output={fs / 'out.raw'}")
        assert result.returncode == 1
        assert errors(result.stderr) == [
            f"cos-customizer: error: No space left on device in {fs} while the scripts ran (the working copy "
            "grows with what they write): free some space there or choose an -output on a larger file system"
        ]
        assert leftovers(setup.token, setup.tmp) == []
        assert sorted(p.name for p in fs.iterdir()) == ["lost+found"]


def test_disk_full_while_writing_the_tar_gz(setup: Setup) -> None:
    (setup.context / "noise.sh").write_text("head -c 250M /dev/urandom > /var/lib/noise\necho noise written\n")
    setup.start([["run-script", "-script=noise.sh"]])
    with small_fs(setup.tmp / "out.fs", 460, kind="ext4") as fs:
        result = setup.cli("finish-image-build", f"-output={fs / 'out.tar.gz'}")
        assert result.returncode == 1, result.stderr
        assert "noise written" in result.stderr
        assert errors(result.stderr) == [
            f"cos-customizer: error: No space left on device in {fs} while writing {fs / 'out.tar.gz'}: "
            "free some space there or choose a place on a larger file system"
        ]
        assert leftovers(setup.token, setup.tmp) == []
        assert sorted(p.name for p in fs.iterdir()) == ["lost+found"]


def test_a_build_whose_output_is_on_another_file_system_than_its_source(setup: Setup) -> None:
    """copy_file_range cannot cross file systems (EXDEV): the working copy is then copied by reads and writes."""
    setup.start(STEPS_OK)
    with small_fs(setup.tmp / "out.fs", 600) as fs:
        result = setup.cli("finish-image-build", f"-output={fs / 'out.raw'}")
        assert result.returncode == 0, result.stderr
        assert errors(result.stderr) == []
        assert sorted(p.name for p in fs.iterdir()) == ["out.raw"]
        assert (fs / "out.raw").stat().st_blocks * 512 < 200 * MiB  # still sparse
        assert leftovers(setup.token, setup.tmp) == []


@pytest.mark.parametrize("fmt", [ImageFormat.RAW, ImageFormat.TAR_GZ])
def test_output_on_another_file_system_than_the_working_copy(tmp_path: Path, fmt: ImageFormat) -> None:
    with small_fs(tmp_path / "work.fs", 64) as work:
        disk = work / "disk.raw"
        with open(disk, "wb") as out:
            out.truncate(1 << 30)
            out.seek(5 * MiB)
            out.write(os.urandom(MiB))
        digest = data_digest(disk)
        target = tmp_path / ("out.raw" if fmt is ImageFormat.RAW else "out.tar.gz")
        output.write(disk, target, fmt)
        if fmt is ImageFormat.RAW:
            assert data_digest(target) == digest
            assert target.stat().st_blocks * 512 < 4 * MiB  # still sparse
            assert not disk.exists()
        else:
            extracted = tmp_path / "x"
            extracted.mkdir()
            sh("tar", "-xzf", target, "-C", extracted)
            assert data_digest(extracted / "disk.raw") == digest
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        assert sorted(p.name for p in work.iterdir()) == ([] if fmt is ImageFormat.RAW else ["disk.raw"])


def test_output_that_is_a_mount_point(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"new")
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"theirs")
    sh("mount", "--bind", elsewhere, target)
    try:
        with pytest.raises(output.OutputError) as caught:
            output.write(disk, target, ImageFormat.RAW)
    finally:
        sh("umount", target, check=False)
    assert str(caught.value) == (
        f"cannot replace {target}: it is a mount point (Device or resource busy); choose an -output that is not "
        "mounted on"
    )
    assert disk.read_bytes() == b"new" and target.read_bytes() == b"old" and elsewhere.read_bytes() == b"theirs"


def test_sweep_keeps_a_live_builds_work_directory(tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    work, fd = local._make_work(out)
    try:
        assert local.sweep(tmp_path) == []
        assert work.is_dir() and (work / local.OWNER).read_text() == f"cos-customizer build, process {os.getpid()}\n"
        assert not (work / local.OWNER_NEW).exists()
    finally:
        os.close(fd)
    assert local.sweep(tmp_path) == [work]
    assert not work.exists()
