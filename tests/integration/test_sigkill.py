"""SIGKILL of the real command line at each phase of a local build: nothing of the build is left.

The tool (`python -m cos_customizer finish-image-build`) is killed when its output shows the phase
(copy, apply, a resize on a loop device, a script, a script's daemon, a running container, the
offline steps, the write), and nothing is started afterwards. Then, looked at from outside with the
stock tools: the output's directory lists exactly what it did before (no work directory, no lock file,
no partial output), no process of the build runs or has its directory as cwd, `losetup --list` has no
device backed by a file of the build, mountinfo has no mount of it, and the build's cgroups are gone.
Then the next build in the same workspace and directory succeeds, with nothing to sweep.

Needs root (loop devices, mounts, namespaces): CI runs as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer import output, privilege, runner
from tests import registry
from tests.integration.test_containers import inner_processes
from tests.integration.test_faults import FINISH_SIZES, MARK, NOTE, STEPS_OK, Setup, leftovers, loops_of, peak_memory
from tests.integration.test_faults import setup as setup  # the fixture

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def marked(token: str) -> list[int]:
    """The processes of the build: with its marker in their environment (every host-side process) or its token
    in their command line (its scripts, named after it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                environ, cmdline = (entry / "environ").read_bytes(), (entry / "cmdline").read_bytes()
                if f"{MARK}={token}".encode() in environ or token.encode() in cmdline:
                    found.append(int(entry.name))
    return found


def build_cgroups(token: str) -> set[Path]:
    """The cgroups of the running build: those its processes are in (below a cos-customizer-* directory), and
    those named by the reaper's command line, in every hierarchy."""
    names: set[str] = set()
    paths: set[Path] = set()
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if " - cgroup" in line]
    for pid in marked(token):
        with contextlib.suppress(OSError):
            argv = (Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")).split("\0")
            if "cos_customizer.executors.local.reaper" in argv:
                names.update(arg for arg in argv if arg.startswith("cos-customizer-"))
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                path = line.split(":", 2)[2]
                parts = path.split("/")
                for at, part in enumerate(parts):
                    if part.startswith("cos-customizer-"):
                        names.add(part)
                        paths.update(Path(m) / "/".join(parts[1 : at + 1]) for m in mounts)
                        break
    for name in names:
        paths.update(CGROUP_ROOT.glob(f"**/{name}"))
    return {p for p in paths if p.is_dir()}


def cwd_in(tmp: Path) -> list[str]:
    """Processes whose working directory is in the test's directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cwd = os.readlink(entry / "cwd")
                if cwd.startswith(str(tmp)):
                    found.append(f"{entry.name} {cwd}")
    return found


def wait_for_a_loop_device(tmp: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not loops_of(tmp):
        if time.monotonic() > deadline:
            pytest.fail("the build attached no loop device to kill it with")
        time.sleep(0.01)


def kill_at(
    proc: subprocess.Popen[str], marker: str, setup: Setup, *, with_a_loop: bool = False, seconds: float = 240
) -> tuple[list[str], set[Path]]:
    """Read the tool's output until a line holds `marker` (and, `with_a_loop`, until a loop device of the build
    is attached), note the build's cgroups, SIGKILL the tool; its output (read to the end: every process
    holding it is gone then) and the cgroups it had."""
    assert proc.stdout is not None
    watchdog = threading.Timer(seconds, proc.kill)
    watchdog.start()
    lines: list[str] = []
    cgroups: set[Path] = set()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                if with_a_loop:
                    wait_for_a_loop_device(setup.tmp)
                cgroups = build_cgroups(setup.token)
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the build never reached the point to kill it at:\n" + "\n".join(lines))
        lines += [line.rstrip("\n") for line in proc.stdout]
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, lines
    return lines, cgroups


def assert_nothing_left(token: str, tmp: Path, outdir: Path, before: list[str], cgroups: set[Path]) -> None:
    assert sorted(os.listdir(outdir)) == before  # no work directory, no lock file, no partial output
    assert leftovers(token, tmp) == []  # processes by marker or command line, loop devices, mounts
    assert cwd_in(tmp) == []
    assert sorted(p for p in cgroups if p.exists()) == []


def next_build_succeeds(setup: Setup) -> None:
    setup.start([["run-script", "-script=ok.sh"]])  # the next build in the same workspace and output directory
    result = setup.cli("finish-image-build", f"-output={setup.outdir / 'out.tar.gz'}")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if NOTE.search(line)] == []  # nothing to sweep
    assert sorted(os.listdir(setup.outdir)) == ["out.tar.gz"]
    assert (setup.outdir / "out.tar.gz").stat().st_size > 0
    assert leftovers(setup.token, setup.tmp) == []


# Where to kill a build, by its output lines; each with the steps of the killed build.
PHASES = {
    "copy": ("==> copy ", STEPS_OK),
    "apply": ("==> apply the disk plan", STEPS_OK),
    "resize2fs-on-a-loop-device": ("    resizing the OEM file system", STEPS_OK),
    "script": ("looping", [["run-script", "-script={loop}"]]),
    "script-with-a-daemon": ("daemon started", [["run-script", "-script={daemon}"]]),
    "offline-steps": ("==> offline steps and checks", STEPS_OK),
    "write": ("==> write out.tar.gz", STEPS_OK),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_at_each_phase_leaves_nothing(setup: Setup, phase: str) -> None:
    marker, steps = PHASES[phase]
    setup.start([[arg.format(loop=setup.loop_script, daemon=setup.daemon_script) for arg in s] for s in steps])
    before = sorted(os.listdir(setup.outdir))
    proc = setup.finish("out.tar.gz", *FINISH_SIZES)
    lines, cgroups = kill_at(proc, marker, setup, with_a_loop=phase == "resize2fs-on-a-loop-device")
    if phase in ("script", "script-with-a-daemon"):
        assert cgroups, "no cgroup of the build was found: the test proves nothing about them\n" + "\n".join(lines)
    assert_nothing_left(setup.token, setup.tmp, setup.outdir, before, cgroups)
    next_build_succeeds(setup)


# A container running in the image's dockerd when the tool is killed.


@pytest.fixture(scope="module")
def loaded_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox as a `docker save` archive (tag loaded:1)."""
    directory = tmp_path_factory.mktemp("images")
    registry.busybox_layer(directory / "busybox.tar")
    registry.docker_archive(directory / "loaded.tar", "loaded:1", [directory / "busybox.tar"])
    return directory / "loaded.tar"


@pytest.fixture
def container_setup(setup: Setup, loaded_tar: Path) -> Iterator[Setup]:
    shutil.copy2(loaded_tar, setup.context / "loaded.tar")
    (setup.context / f"{setup.token}-container.sh").write_text(
        "set -e\ndocker load < loaded.tar\ndocker run -d --name keep loaded:1 sleep 100000\n"
        "echo container started\nsleep 100000\n"
    )
    yield setup


@pytest.mark.skipif(
    not all(Path(p).exists() for p in (registry.DOCKERD, registry.CONTAINERD)),
    reason="needs Debian's docker.io and containerd (scripts/setup installs them)",
)
def test_sigkill_while_a_container_runs_leaves_nothing(container_setup: Setup, containers_raw: Path) -> None:
    setup = container_setup
    setup.source.unlink()
    subprocess.run(["cp", "--sparse=always", containers_raw, setup.source], check=True)
    setup.start([["run-script", f"-script={setup.token}-container.sh"]])
    before = sorted(os.listdir(setup.outdir))
    proc = setup.finish("out.raw")
    lines, cgroups = kill_at(proc, "container started", setup)
    assert cgroups, "\n".join(lines)
    assert_nothing_left(setup.token, setup.tmp, setup.outdir, before, cgroups)
    assert inner_processes() == []  # nothing runs as the daemons' root either (their processes carry no marker)
    next_build_succeeds(setup)


def test_the_output_lock_is_no_file_and_names_its_holder(tmp_path: Path) -> None:
    """A second writer of the same output (by another spelling of its path) is refused with the holder's pid; the
    lock leaves no file, and it is free the moment its holder is killed."""
    out = tmp_path / "out.raw"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom cos_customizer import output\n"
         "with output.held(Path(sys.argv[1]), lambda who: who):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert os.listdir(tmp_path) == []
        (tmp_path / "sub").mkdir()
        with pytest.raises(output.OutputError) as caught, output.held(tmp_path / "sub" / ".." / "out.raw", str):
            pass
        assert str(caught.value) == f"pid {holder.pid}"
    finally:
        holder.kill()
        holder.wait()
    with output.held(out, str):  # free again, with nothing to clean
        pass
    assert os.listdir(tmp_path) == ["sub"]


def test_a_lock_name_another_user_squats_stops_no_build(tmp_path: Path) -> None:
    """Any local user can bind an abstract name: `nobody` holding the output's lock name (listening, as a build
    would) does not keep root's build from its output."""
    out = tmp_path / "out.raw"
    squat = (
        "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(bytes.fromhex(sys.argv[1]))\n"
        "s.listen(1)\nprint('bound', flush=True)\ntime.sleep(60)\n"
    )
    name = output.lock_name(out).encode("latin-1").hex()  # public facts: the directory and the name
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", squat, name]
    squatter = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "bound\n"
        with output.held(out, str):
            pass
    finally:
        squatter.kill()
        squatter.wait()


# Children started outside runner.run die with the tool too: qemu-img (a qcow2 source), daisy (SIGINT, so that it
# deletes what it made), the KVM probe. Each is a stand-in on PATH that notes its pid and waits.

WAITER = '#!/bin/bash\necho $$ > "{pidfile}"\n{body}\n'


def stand_in(directory: Path, name: str, pidfile: Path, body: str = "exec sleep 1000") -> Path:
    path = directory / name
    path.write_text(WAITER.format(pidfile=pidfile, body=body))
    path.chmod(0o755)
    return path


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_the_tool_once_started(code: str, pidfile: Path, env: dict[str, str] | None = None) -> int:
    """Run `code` in a new Python as the tool; once the stand-in wrote its pid, SIGKILL the tool; the stand-in's
    pid."""
    tool = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert tool.poll() is None, tool.communicate()[1]
            assert time.monotonic() < deadline, "the stand-in never started"
            time.sleep(0.02)
    finally:
        tool.kill()
        tool.wait()
    return int(pidfile.read_text())


def gone_soon(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    return not alive


def test_qemu_img_of_a_qcow2_source_dies_with_the_tool(tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", source, "64M"], check=True)
    bin_dir, pidfile = tmp_path / "bin", tmp_path / "qemu-img.pid"
    bin_dir.mkdir()
    stand_in(bin_dir, "qemu-img", pidfile)
    code = (
        "import sys\nfrom pathlib import Path\nfrom cos_customizer import images\n"
        f"images.working_copy(Path({str(source)!r}), Path({str(tmp_path / 'copy.raw')!r}))\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert gone_soon(kill_the_tool_once_started(code, pidfile, env))


def test_daisy_is_interrupted_when_the_tool_dies(tmp_path: Path) -> None:
    """SIGINT, not SIGKILL: daisy deletes what it made on SIGINT."""
    pidfile, said = tmp_path / "daisy.pid", tmp_path / "interrupted"
    body = f"trap 'echo interrupted > \"{said}\"; exit 130' INT\nwhile :; do sleep 0.1; done"
    daisy = stand_in(tmp_path, "daisy", pidfile, body)
    code = (
        "from cos_customizer.executors import workflow\nfrom cos_customizer.executors.gce import preload\n"
        f"preload.run_daisy([{str(daisy)!r}], workflow.RunBound(600, 'a test'))\n"
    )
    pid = kill_the_tool_once_started(code, pidfile)
    assert gone_soon(pid)
    assert said.read_text() == "interrupted\n"


def test_the_kvm_probe_dies_with_the_tool(tmp_path: Path) -> None:
    from cos_customizer.executors.qemu import boot as qemu_boot

    if not qemu_boot.kvm_usable():
        pytest.skip("needs a usable /dev/kvm (the probe starts only then)")
    pidfile = tmp_path / "qemu.pid"
    qemu = stand_in(tmp_path, "qemu", pidfile)
    code = (
        "from pathlib import Path\nfrom cos_customizer.executors.qemu import boot as qemu_boot\n"
        f"qemu_boot.kvm_runs(Path('/nonexistent-kernel'), Path({str(tmp_path)!r}), timeout=600, qemu={str(qemu)!r})\n"
    )
    assert gone_soon(kill_the_tool_once_started(code, pidfile))


# Lines without an end: memory stays bounded.

HUGE = 256 << 20


def test_a_daisy_line_without_an_end_keeps_the_tool_small(tmp_path: Path) -> None:
    daisy = tmp_path / "daisy"
    daisy.write_text(f"#!/bin/bash\nhead -c {HUGE} /dev/zero | tr '\\0' x\necho\necho after\n")
    daisy.chmod(0o755)
    code = (
        "import logging, sys\nfrom cos_customizer.executors import workflow\nfrom cos_customizer.executors.gce import preload\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)\n"
        "class Length(logging.Filter):\n"
        "    def filter(self, record):\n"
        "        record.msg, record.args = f'{len(record.getMessage())} {record.getMessage()[-40:]}', ()\n"
        "        return True\n"
        "logging.getLogger().handlers[0].addFilter(Length())\n"
        f"preload.run_daisy([{str(daisy)!r}], workflow.RunBound(600, 'a test'))\n"
    )
    status, maxrss_kib, lines = peak_memory([sys.executable, "-c", code])
    assert status == 0, lines
    assert maxrss_kib < 100 * 1024, maxrss_kib  # the line is 256 MiB
    mark = runner.CUT_MARK.format(limit=runner.LINE_LIMIT)
    cut = len("daisy: ") + runner.LINE_LIMIT + len(mark)
    assert [line for line in lines if line.startswith((f"{cut} ", "12 "))] == [
        f"{cut} {('x' * 40 + mark)[-40:]}",
        "12 daisy: after",
    ], lines


def test_the_serial_watcher_keeps_a_line_without_an_end_bounded() -> None:
    from cos_customizer.executors.qemu.daisy import SerialWatcher

    watcher = SerialWatcher({"SuccessMatch": "BuildSucceeded", "StatusMatch": "BuildStatus"})
    piece = "x" * (1 << 20)
    for _ in range(64):  # 64 MiB of one line, and a success string far past the kept start: not matched
        assert watcher.feed(piece) == []
        assert len(watcher.tail) <= runner.LINE_LIMIT
    assert watcher.feed("BuildSucceeded but far too late") == []
    assert watcher.feed("\nBuildStatus: next line\nBuildSucceeded: done\n") == [
        ("status", "BuildStatus: next line"),
        ("success", "BuildSucceeded: done"),
    ]


# A file system that cannot make unnamed files (some network and FUSE ones): the build works in a named work
# directory beside the output; the reaper removes it when the tool is killed. Here the tool is told O_TMPFILE
# fails, whatever this machine's file system can do.

NO_TMPFILE = (
    "import sys\nfrom cos_customizer import output\noutput.unnamed = lambda directory: None\n"
    "from cos_customizer.cli.main import entry\nsys.argv[0] = 'cos-customizer'\nentry()\n"
)


def test_without_unnamed_files_a_killed_build_leaves_nothing_either(setup: Setup) -> None:
    setup.start([["run-script", f"-script={setup.loop_script}"]])
    argv = [sys.executable, "-c", NO_TMPFILE, "finish-image-build", f"-output={setup.outdir / 'out.tar.gz'}"]
    proc = subprocess.Popen(argv, env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "looping" in line:
            break
    works = [p for p in setup.outdir.iterdir() if p.name.startswith(".out.tar.gz.work-")]
    assert len(works) == 1 and (works[0] / "disk.raw").is_file(), "the build did not work in a named directory"
    cgroups = build_cgroups(setup.token)
    proc.kill()
    proc.communicate()
    assert_nothing_left(setup.token, setup.tmp, setup.outdir, [], cgroups)

    setup.start([["run-script", "-script=ok.sh"]])
    argv = [sys.executable, "-c", NO_TMPFILE, "finish-image-build", f"-output={setup.outdir / 'out.tar.gz'}"]
    result = subprocess.run(argv, env=setup.env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(setup.outdir)) == ["out.tar.gz"]
    listed = subprocess.run(["tar", "-tvzf", setup.outdir / "out.tar.gz"], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == ["disk.raw"]
    assert leftovers(setup.token, setup.tmp) == []
