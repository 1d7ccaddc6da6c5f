"""The local executor: a complete offline build of a COS image file.

1. preflight: root, Linux, tools, free space (steps were checked already);
2. a sparse working copy of the source next to the output (the source is
   only ever opened read-only);
3. the disk plan, applied offline (`disk.apply`);
4. the stage (`executors.runtime`) in a private mount namespace: the COS
   runtime layout, the scripts, the cleanup;
5. the offline steps, last: disable-auto-update, then seal-oem;
6. the output, written under a temporary name and renamed;
7. the summary.

Any failure, Ctrl-C or SIGTERM stops the stage's whole process group, and
removes the working copy and any partial output; the stage's mounts and
loop devices vanish with its mount namespace.

A SIGKILL cannot be caught, so the kernel does the rest: every link of the
stage's process chain dies with its parent (`runner.die_with_parent` for
the stage and every command, unshare's `--kill-child` for the process
after each fork, and a script's own PID namespace takes the daemons it
started with it). What remains is the work directory
`.OUTPUT.work-XXXXXXXX` beside the output: it holds a lock file (`owner`,
locked as long as its build runs), and the next build in that directory
removes every such directory whose lock is free (`sweep`), with a note.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cos_customizer import images, output, report, runner
from cos_customizer.disk import apply, ext, loop, reproducible
from cos_customizer.disk.gpt import SECTOR, Table
from cos_customizer.disk.planner import OEM, ROOT_A, ROOT_B, STATE, DiskPlan
from cos_customizer.disk.verity import VerityParams
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.executors import STEP_COMMANDS, cgroups
from cos_customizer.executors.runtime import Region, Script, StageSpec
from cos_customizer.images import ImageFormat
from cos_customizer.provisioner import steps
from cos_customizer.provisioner.config import ProvisionerConfig, RunScriptArgs, StepType
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from cos_customizer.report import Summary
from cos_customizer.runner import require_tool

log = logging.getLogger("cos_customizer")

EFI = 12
TOOLS = (
    ("e2fsck", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("unshare", "util-linux"),
    ("tar", "tar"),
    ("mtype", "mtools"),
    ("mcopy", "mtools"),
)
SPACE_MARGIN = 256 << 20
# The work directory of a build: `.OUTPUT.work-` and mkdtemp's 8 characters; `owner` is its lock.
WORK_NAME = re.compile(r"\..+\.work-[a-z0-9_]{8}")
OWNER = "owner"
OWNER_NEW = ".owner.new"
# A full file system: less than this is free after the stage.
FULL_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class LocalBuild:
    source: Path
    output: Path
    format: ImageFormat
    config: ProvisionerConfig
    plan: DiskPlan
    timeout: float  # seconds
    allow_host_loopback: bool = False  # scripts may reach the host's 127.0.0.1 (-allow-host-loopback)
    containers: str = "auto"  # the image's container daemons for scripts (-containers)
    epoch: int | None = None  # SOURCE_DATE_EPOCH: what the build records is made reproducible (disk.reproducible)


class BuildFailed(CustomizerError):
    """The build ran and failed (a script, a tool); nothing was left behind."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # the failed step's index in the build's steps (the order they were added), if one did


def preflight(build: LocalBuild) -> None:
    """Everything that can be checked before the build touches anything."""
    if not sys.platform.startswith("linux"):
        raise ValidationError("local builds need Linux (loop devices, mount namespaces)")
    if os.geteuid() != 0:
        raise ValidationError(
            "a local build needs root (it mounts file systems from loop devices): run finish-image-build as root, "
            "for example with sudo"
        )
    tools = list(TOOLS)
    if images.detect(build.source) is ImageFormat.QCOW2 or build.format is ImageFormat.QCOW2:
        tools.append(("qemu-img", "qemu-utils"))
    if _scripts(build.config):
        tools.append(("slirp4netns", "slirp4netns"))  # the scripts' network (the sandbox's own namespace)
    for name, package in tools:
        require_tool(name, package)
    sweep(build.output.parent)
    if build.format is ImageFormat.TAR_GZ and shutil.which("pigz") is None:
        require_tool("gzip", "gzip")
    needed = _space_needed(build)
    try:
        stats = os.statvfs(build.output.parent)
    except OSError as err:
        raise ValidationError(f"cannot use the -output directory {build.output.parent}: {err.strerror}") from err
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise ValidationError(
            f"not enough free space in {build.output.parent}: the build needs about {needed >> 20} MiB "
            f"(working copy and output), {free >> 20} MiB are free; free some space or choose another -output"
        )


def _space_needed(build: LocalBuild) -> int:
    allocated = build.source.stat().st_blocks * 512
    if images.detect(build.source) is not ImageFormat.RAW:
        allocated *= 4  # compressed sources expand; a rough bound
    copies = 1 if build.format is ImageFormat.RAW else 2
    return allocated * copies + SPACE_MARGIN


@contextmanager
def _phase(summary: Summary, name: str) -> Iterator[None]:
    log.info("==> %s", name)
    started = time.monotonic()
    yield
    summary.phases.append((name, time.monotonic() - started))


def _region(table: Table, number: int) -> Region:
    part = table.partition(number)
    return Region(part.first * SECTOR, part.size * SECTOR)


def _scripts(config: ProvisionerConfig) -> tuple[Script, ...]:
    scripts = []
    for step in config.steps:
        if isinstance(step.args, RunScriptArgs):
            args = step.args
            scripts.append(Script(f"run-script {args.path}", args.build_context, args.path, args.env))
    return tuple(scripts)


class _Stage:
    """The stage process group, stopped as a whole on any failure or signal."""

    def __init__(self, spec_path: Path) -> None:
        unshare = [
            require_tool("unshare", "util-linux"),
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--kill-child",
        ]
        argv = [*unshare, "--", sys.executable, "-m", "cos_customizer.executors.runtime", str(spec_path)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=runner.die_with_us(),  # the stage dies with the tool, even by SIGKILL
        )

    def stream(self, deadline: float, on_line: Callable[[str], None]) -> int:
        """Pass the stage's output on; past `deadline` the stage is stopped and BuildFailed raised."""
        assert self.proc.stdout is not None
        with runner.deadline(deadline - time.monotonic(), self.stop) as expired:
            # The stage cut its lines already (runner.LINE_LIMIT); leave room for its "[run-script NAME] " prefix.
            for line in runner.bounded_lines(self.proc.stdout.fileno(), runner.LINE_LIMIT + 8192):
                on_line(line)
            status = self.proc.wait()
        if expired.is_set():
            raise BuildFailed("the build took longer than -timeout and was stopped")
        return status

    def stop(self) -> None:
        runner.stop_group(self.proc, ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)))


def _echo(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _run_stage(
    build: LocalBuild, work: Path, disk: Path, contexts: dict[str, str], deadline: float
) -> dict[str, object]:
    table = build.plan.after
    root = ROOT_B if build.config.boot_disk.reclaim_sda3 else ROOT_A
    result_path = work / "result.json"
    spec = StageSpec(
        image=str(disk),
        root=_region(table, root),
        state=_region(table, STATE),
        oem=_region(table, OEM),
        workdir=str(work / "stage"),
        contexts=contexts,
        scripts=_scripts(build.config),
        result=str(result_path),
        allow_host_loopback=build.allow_host_loopback,
        containers=build.containers,
        cgroup=cgroups.name_for(work),
        reproducible=build.epoch is not None,
    )
    spec_path = work / "stage.json"
    spec_path.write_text(json.dumps(spec.to_json()))
    stage = _Stage(spec_path)
    try:
        stage.stream(deadline, _echo)
    finally:
        stage.stop()
    # The scripts' writes go to the sparse working copy: a full file system under it loses them.
    _check_space(work, "the scripts ran (the working copy grows with what they write)")
    if not result_path.exists():
        raise BuildFailed("the build stage stopped without a result (see the output above)")
    result: dict[str, object] = json.loads(result_path.read_text())
    if not result.get("ok"):
        tail = result.get("tail") or []
        quoted = (runner.quote(str(line), 300) for line in tail[-5:])  # type: ignore[index]
        last = "; last output: " + " | ".join(quoted) if tail else ""
        index = result.get("index")
        scripts = [n for n, step in enumerate(build.config.steps) if isinstance(step.args, RunScriptArgs)]
        step = scripts[index] if isinstance(index, int) and 0 <= index < len(scripts) else None
        raise BuildFailed(f"{result.get('message')}{last}", step)
    return result


def _check_space(work: Path, doing: str) -> None:
    stats = os.statvfs(work)
    if stats.f_bfree * stats.f_frsize < FULL_BYTES or stats.f_bavail == 0:
        raise BuildFailed(
            f"{output.NO_SPACE} in {work.parent} while {doing}: free some space there "
            "or choose an -output on a larger file system"
        )


def _offline_steps(build: LocalBuild, disk: Path, work: Path, summary: Summary) -> None:
    """disable-auto-update and seal-oem, by the provisioner's own step code, on the unmounted working copy."""
    target = Target(
        root=work / "offline-root", disk=disk, partition_template="", systemctl=("true",), efi_access="mtools"
    )
    state = State(work / "offline-state", build.config)
    offline = [s for s in steps.ordered(build.config.steps) if s.type is not StepType.RUN_SCRIPT]
    with report.progress_bar("verity") as progress:
        context = steps.Context(target, state, lambda line: log.info("    %s", line), progress, epoch=build.epoch)
        for step in offline:
            started = time.monotonic()
            try:
                steps.RUNNERS[step.type](context, step.args)
            except CustomizerError as err:
                raise BuildFailed(f"{STEP_COMMANDS[step.type]} failed: {err}", build.config.steps.index(step)) from err
            summary.steps.append((STEP_COMMANDS[step.type], time.monotonic() - started))
    verity = context.results.get("oem_verity")
    summary.oem_verity = verity if isinstance(verity, VerityParams) else None


def run_build(build: LocalBuild, contexts: dict[str, str]) -> Summary:
    """Run the whole build; on any failure nothing is left behind but the untouched source."""
    summary = Summary()
    deadline = time.monotonic() + build.timeout
    started = int(time.time()) - 1  # what the build touches has a time from here on (the kernel's clock is coarse)
    doing = f"making the work directory in {build.output.parent}"
    try:
        work, owner = _make_work(build.output)
        try:
            disk = work / "disk.raw"
            doing = f"copying {build.source.name}"
            with _phase(summary, f"copy {build.source.name} (sparse)"), report.progress_bar("copy") as progress:
                images.working_copy(build.source, disk, progress)
            doing = "applying the disk plan"
            with _phase(summary, "apply the disk plan"), report.progress_bar("move") as progress:
                apply.apply(disk, build.plan, report=lambda message: log.info("    %s", message), progress=progress)
            doing = "running the steps"
            with _phase(summary, "run the steps in the COS runtime layout"):
                result = _run_stage(build, work, disk, contexts, deadline)
                summary.steps.extend((str(s["name"]), float(s["seconds"])) for s in result["steps"])  # type: ignore[attr-defined]
                summary.cleanup = [str(item) for item in result["cleanup"]]  # type: ignore[attr-defined]
            if build.epoch is not None:
                doing = "making the file systems reproducible"
                with _phase(summary, f"make reproducible ({reproducible.EPOCH_ENV}={build.epoch})"):
                    for number in (STATE, OEM):
                        first = build.plan.after.partition(number).first * SECTOR
                        reproducible.normalize_ext(disk, first, epoch=build.epoch, since=started)
            doing = "running the offline steps"
            with _phase(summary, "offline steps and checks"):
                _offline_steps(build, disk, work, summary)
                for number in (STATE, OEM):
                    ext.check(disk, build.plan.after.partition(number).first * SECTOR)
            if time.monotonic() > deadline:
                raise BuildFailed("the build took longer than -timeout and was stopped")
            doing = f"writing {build.output}"
            with _phase(summary, f"write {build.output.name} ({build.format.value})"):
                output.write(disk, build.output, build.format, build.epoch)
        finally:
            try:
                _remove_work(work)
            finally:
                os.close(owner)
    except runner.CommandError as err:
        explained = output.explain(err, build.output.parent, doing)
        if explained is None:
            raise
        raise BuildFailed(str(explained)) from err
    except OSError as err:
        explained = output.explain(err, build.output.parent, doing)
        if explained is None:
            raise BuildFailed(f"{err.strerror or err} while {doing}: {err.filename or build.output.parent}") from err
        raise BuildFailed(str(explained)) from err
    return summary


def _make_work(output_path: Path) -> tuple[Path, int]:
    """A fresh work directory beside the output, and its `owner` lock, held (locked) until the descriptor closes.

    The lock file appears under its final name already locked, so a sweep never takes a live build for a dead one.
    """
    work = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.work-", dir=output_path.parent))
    fd = os.open(work / OWNER_NEW, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"cos-customizer build, process {os.getpid()}\n".encode())
        os.rename(work / OWNER_NEW, work / OWNER)
    except BaseException:
        os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, fd


def sweep(directory: Path) -> list[Path]:
    """Remove what killed builds left in `directory`: their work directories, once nothing holds their lock.

    Only directories named as `_make_work` names them and holding its lock
    file are considered; one whose lock is held (a live build) or that
    something is still mounted under is left alone. Each removal is noted.
    """
    swept: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return swept
    for entry in entries:
        if not WORK_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        work = Path(entry.path)
        fd = _open_owner(work)
        if fd is None:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live build
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a build"
            if not _release_leftover(work):
                continue
            _release_cgroups(work)
            shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)
        if not work.exists():
            log.info("note: removed %s, left behind by a killed build (%s)", work, owner)
            swept.append(work)
    return swept


def _open_owner(work: Path) -> int | None:
    for name in (OWNER, OWNER_NEW):
        try:
            return os.open(work / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
    return None


def _release_leftover(work: Path) -> bool:
    """Detach the loop devices backed by files of a dead build's `work`; False if something is mounted under it."""
    prefix = f"{work.resolve()}/"
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounted if m.startswith(prefix)]
    if inside:
        log.warning("note: %s is left: %s is still mounted (unmount it, then remove the directory)", work, inside[0])
        return False
    tool = require_tool("losetup", "mount")
    listing = json.loads(runner.run([tool, "--json", "--list"]).stdout or b'{"loopdevices": []}')
    for device in listing.get("loopdevices", []):
        backing = str(device.get("back-file") or "").removesuffix(" (deleted)")
        if backing.startswith(prefix):
            loop.detach(Path(device["name"]))
    return True


def _release_cgroups(work: Path) -> None:
    """The build's cgroups, if a killed stage left them (their processes died with its PID namespace)."""
    left = cgroups.remove(cgroups.name_for(work))
    if left:
        raise CustomizerError(f"the build's cgroup {left[0]} cannot be removed: a process of it still runs")


def _release_loops(disk: Path, seconds: float = 15.0) -> None:
    """Wait for the kernel to free the stage's loop devices (autoclear is asynchronous); detach stragglers.

    They are backed by our own working copy, so detaching them cannot touch anything else.
    """
    deadline = time.monotonic() + seconds
    while (devices := loop.attached_to(disk)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for device in devices:
        loop.detach(device)


def _remove_work(work: Path) -> None:
    """Delete the work directory, but never through a mount point (mounts live in the stage's namespace)."""
    _release_cgroups(work)
    _release_loops(work / "disk.raw")
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounted if m == str(work) or m.startswith(f"{work}/")]
    if inside:
        raise CustomizerError(f"{inside[0]} is still mounted: unmount it, then remove {work}")
    shutil.rmtree(work, ignore_errors=True)
