"""The local executor: a complete offline build of a COS image file.

1. preflight: root, Linux, tools, free space (steps were checked already);
2. a sparse working copy of the source in the output's directory (the
   source is only ever opened read-only);
3. the disk plan, applied offline (`disk.apply`);
4. the stage (`executors.local.runtime`) in a private mount namespace: the COS
   runtime layout, the scripts, the cleanup;
5. the offline steps, last: disable-auto-update, then seal-oem;
6. the output, given its name only once complete (`output.write`);
7. the summary.

Any failure, Ctrl-C or SIGTERM stops the stage's whole process group, and
removes the build's cgroup; the stage's mounts and loop devices vanish with
its mount namespace.

A SIGKILL at any moment leaves nothing either (`_Work`):

- no file: the working copy and the output are unnamed files in the
  output's directory (O_TMPFILE), which the kernel frees with the last
  process holding them; every process of the build reaches the working copy
  as /proc/PID/fd/N. The stage's small files are memory files it inherits,
  and its mount points are on a tmpfs of its own (`RUN_DIR`). Only a file
  system that cannot make unnamed files gets a work directory
  `.OUTPUT.work-XXXXXXXX` beside the output, holding a lock file (`owner`,
  locked while its build runs);
- no process: every link of the stage's process chain dies with its parent
  (`runner.die_with_parent` for the stage and every command, unshare's
  `--kill-child` for the process after each fork, a script's own PID
  namespace for the daemons it started), and the stage and all it starts
  live in the build's cgroup;
- no loop device: each is attached with autoclear, held by a descriptor
  (`loop.attach`) or by a mount of the stage's namespace;
- no cgroup, no work directory: the reaper (`executors.local.reaper`), started
  first, waits for the tool to end, then kills what is left in the build's
  cgroup and removes it and the work directory, if any. Were it killed too,
  the next build in the directory removes every work directory whose lock
  is free (`sweep`), with a note.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cos_customizer import binfmt, images, output, privilege, report, runner
from cos_customizer.arch import Arch, elf_arch
from cos_customizer.disk import apply, ext, loop, reproducible
from cos_customizer.disk.gpt import SECTOR, Table
from cos_customizer.disk.planner import OEM, ROOT_A, ROOT_B, STATE, DiskPlan
from cos_customizer.disk.verity import VerityParams
from cos_customizer.errors import BuildFailed, CustomizerError, ValidationError, escaped
from cos_customizer.executors import STEP_COMMANDS
from cos_customizer.executors.local import cgroups
from cos_customizer.executors.local.runtime import Region, Script, StageSpec
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
# The work directory of a build whose output's file system cannot make unnamed files: `.OUTPUT.work-` and the
# build's 8 characters (those of older versions: mkdtemp's); `owner` is its lock.
WORK_NAME = re.compile(r"\..+\.work-[a-z0-9_]{8}")
OWNER = "owner"
OWNER_NEW = ".owner.new"
ID_CHARACTERS = string.ascii_lowercase + string.digits
# Where each stage mounts the tmpfs of its mount points, in its own mount namespace: an empty directory of
# root's, made once and shared by every build (none of them writes to it on this machine's side).
RUN_DIR = Path("/run/cos-customizer")
# The offline steps' root and state directory, which they never touch (they work on the disk): no such path.
OFFLINE = Path("/nonexistent/cos-customizer-offline")
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


def preflight(build: LocalBuild) -> None:
    """Everything that can be checked before the build touches anything."""
    if not sys.platform.startswith("linux"):
        raise ValidationError("local builds need Linux (loop devices, mount namespaces)")
    if not privilege.can_mount():
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


class _Work:
    """What a build keeps while it runs, none of which outlives it (see the module's docstring).

    `disk` is the working copy as every process of the build names it (/proc/PID/fd/N of `disk_fd`, an
    unnamed file in the output's directory; a file in `directory` where none can be made); `stage_dir`
    the mount point of the stage's tmpfs; `cgroup` the build's cgroup name.
    """

    def __init__(self, output_path: Path) -> None:
        self.output = output_path
        self.id = "".join(secrets.choice(ID_CHARACTERS) for _ in range(8))
        self.cgroup = cgroups.PREFIX + self.id
        self.directory: Path | None = None
        self._owner: int | None = None
        self._reaper: _Reaper | None = None
        self.group: cgroups.BuildCgroup | None = None
        self.disk_fd = output.unnamed(output_path.parent)
        try:
            if self.disk_fd is None:
                self.directory, self._owner = _make_work(output_path, self.id)
                disk = self.directory / "disk.raw"
                self.disk_fd = os.open(disk, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            self.disk = output.fd_path(self.disk_fd)
            self.stage_dir = _run_dir() or self._stage_dir_beside()
            self._reaper = _Reaper(self.cgroup, self.directory)
        except BaseException:
            self.close()
            raise

    def _stage_dir_beside(self) -> Path:
        if self.directory is None:
            self.directory, self._owner = _make_work(self.output, self.id)
        stage_dir = self.directory / "stage"
        stage_dir.mkdir(mode=0o700)
        return stage_dir

    def named_disk(self) -> Path | int:
        """The working copy for `output.write`: our descriptor of the unnamed file, or the named file's path."""
        assert self.disk_fd is not None
        return self.directory / "disk.raw" if self.directory is not None else self.disk_fd

    def make_cgroup(self) -> None:
        """The build's cgroup, which the stage enters before it runs (none where this machine has none for us)."""
        try:
            self.group = cgroups.create(self.cgroup, 0)
        except OSError as err:
            log.debug("no cgroup of its own for the build: %s", err)

    def close(self) -> None:
        """Everything released, in order: the cgroup (what still runs in it is killed), the loop devices of the
        working copy, the working copy, the work directory, then the reaper, which has nothing left to do."""
        try:
            _release_cgroups(self.cgroup)
        finally:
            try:
                if self.disk_fd is not None:
                    fd, self.disk_fd = self.disk_fd, None
                    try:
                        _release_loops(fd)
                    finally:
                        os.close(fd)
                if self.directory is not None:
                    _remove_work(self.directory)
            finally:
                if self._owner is not None:
                    os.close(self._owner)
                    self._owner = None
                if self._reaper is not None:
                    self._reaper.close()
                    self._reaper = None


def _run_dir() -> Path | None:
    """`RUN_DIR`, made if needed: None unless it is a directory only root can write to (not a link)."""
    try:
        RUN_DIR.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        log.debug("cannot make %s: %s", RUN_DIR, err)
        return None
    info = os.lstat(RUN_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        log.debug("%s is not a directory only root can write to: not used", RUN_DIR)
        return None
    return RUN_DIR


class _Reaper:
    """`executors.local.reaper`, waiting for this process to end (the end of file of a pipe only we hold)."""

    def __init__(self, cgroup: str, directory: Path | None) -> None:
        read, self._write = os.pipe()  # neither end is inherited by any other child
        try:
            argv = [sys.executable, "-m", "cos_customizer.executors.local.reaper", cgroup]
            argv += [str(directory)] if directory is not None else []
            # Its own session: a Ctrl-C or a signal to our process group does not reach it.
            self.proc = subprocess.Popen(argv, stdin=read, stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(self._write)
            raise
        finally:
            os.close(read)

    def close(self) -> None:
        os.close(self._write)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("warning: the build's reaper (pid %d) is still cleaning up", self.proc.pid)


class _Stage:
    """The stage process group, stopped as a whole on any failure or signal."""

    def __init__(self, spec_fd: int, result_fd: int, group: cgroups.BuildCgroup | None) -> None:
        unshare = [
            require_tool("unshare", "util-linux"),
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--kill-child",
        ]
        spec_path = f"/proc/self/fd/{spec_fd}"
        argv = [*unshare, "--", sys.executable, "-m", "cos_customizer.executors.local.runtime", spec_path]
        procs = tuple(str(path / "cgroup.procs") for path in group.paths()) if group is not None else ()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(spec_fd, result_fd),
            # The stage dies with the tool, even by SIGKILL, and it and all it starts live in the build's cgroup.
            preexec_fn=_stage_preexec(os.getpid(), procs),
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


def _stage_preexec(parent: int, procs: tuple[str, ...]) -> Callable[[], None]:
    """A `preexec_fn`: die with `parent`, then join the cgroups whose `cgroup.procs` files are `procs`."""

    def preexec() -> None:
        runner.die_with_parent(parent)
        for path in procs:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # "0": the writing process
                finally:
                    os.close(fd)
            except OSError:
                pass  # the pdeathsig chain still holds; the reaper removes the cgroup by name

    return preexec


def _echo(line: str) -> None:
    """A line of the stage (a script's output among them) on this terminal: tabs kept, every other character a
    terminal would act on (ESC, CR, BEL...) escaped, so a script cannot redraw or forge what the tool says."""
    if not line.isprintable():
        line = "\t".join(escaped(part) for part in line.split("\t"))
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _memory_file(name: str, data: bytes = b"") -> int:
    """A file in memory (memfd) holding `data`: nothing on any file system, gone with its last descriptor."""
    fd = os.memfd_create(name)
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    return fd


def _run_stage(
    build: LocalBuild, work: _Work, contexts: dict[str, str], deadline: float, *, emulated: bool = False
) -> dict[str, object]:
    table = build.plan.after
    root = ROOT_B if build.config.boot_disk.reclaim_sda3 else ROOT_A
    result_fd = _memory_file("cos-customizer-stage-result")
    try:
        spec = StageSpec(
            image=str(work.disk),
            root=_region(table, root),
            state=_region(table, STATE),
            oem=_region(table, OEM),
            workdir=str(work.stage_dir),
            contexts=contexts,
            scripts=_scripts(build.config),
            result=f"/proc/self/fd/{result_fd}",  # the stage's own copy of the descriptor
            allow_host_loopback=build.allow_host_loopback,
            containers=build.containers,
            cgroup=work.cgroup,
            reproducible=build.epoch is not None,
            emulated=emulated,
        )
        spec_fd = _memory_file("cos-customizer-stage-spec", json.dumps(spec.to_json()).encode())
        try:
            stage = _Stage(spec_fd, result_fd, work.group)
        finally:
            os.close(spec_fd)
        try:
            stage.stream(deadline, _echo)
        finally:
            stage.stop()
        with open(f"/proc/self/fd/{result_fd}", "rb") as stored:
            text = stored.read()
    finally:
        os.close(result_fd)
    # The scripts' writes go to the sparse working copy: a full file system under it loses them.
    _check_space(build.output.parent, "the scripts ran (the working copy grows with what they write)")
    try:
        result: dict[str, object] = json.loads(text)
    except ValueError:
        raise BuildFailed("the build stage stopped without a result (see the output above)") from None
    if not result.get("ok"):
        tail = result.get("tail") or []
        quoted = (runner.quote(str(line), 300) for line in tail[-5:])  # type: ignore[index]
        last = "; last output: " + " | ".join(quoted) if tail else ""
        index = result.get("index")
        scripts = [n for n, step in enumerate(build.config.steps) if isinstance(step.args, RunScriptArgs)]
        step = scripts[index] if isinstance(index, int) and 0 <= index < len(scripts) else None
        raise BuildFailed(f"{result.get('message')}{last}", step)
    return result


def _check_space(directory: Path, doing: str) -> None:
    stats = os.statvfs(directory)
    if stats.f_bfree * stats.f_frsize < FULL_BYTES or stats.f_bavail == 0:
        raise BuildFailed(
            f"{output.NO_SPACE} in {directory} while {doing}: free some space there "
            "or choose an -output on a larger file system"
        )


def _offline_steps(build: LocalBuild, disk: Path, summary: Summary) -> None:
    """disable-auto-update and seal-oem, by the provisioner's own step code, on the unmounted working copy."""
    target = Target(root=OFFLINE, disk=disk, partition_template="", systemctl=("true",), efi_access="mtools")
    state = State(OFFLINE, build.config)
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


def _image_arch(build: LocalBuild, disk: Path) -> Arch:
    """The machine the image's programs are for: the ELF header of /bin/sh in the root the steps run in
    (read with debugfs), else this machine's."""
    root = ROOT_B if build.config.boot_disk.reclaim_sda3 else ROOT_A
    head = ext.file_head(disk, build.plan.after.partition(root).first * SECTOR, "/bin/sh")
    return (elf_arch(head) if head else None) or Arch.host()


def run_build(build: LocalBuild, contexts: dict[str, str]) -> Summary:
    """Run the whole build; on any failure nothing is left behind but the untouched source."""
    summary = Summary()
    deadline = time.monotonic() + build.timeout
    started = int(time.time()) - 1  # what the build touches has a time from here on (the kernel's clock is coarse)
    doing = f"making the working copy in {build.output.parent}"
    try:
        work = _Work(build.output)
        try:
            disk = work.disk
            doing = f"copying {build.source.name}"
            with _phase(summary, f"copy {build.source.name} (sparse)"), report.progress_bar("copy") as progress:
                images.working_copy(build.source, build.output, progress, into=work.disk_fd)
            source: dict[int, reproducible.Stamps] = {}
            if build.epoch is not None:  # the source's own times, however recent, are not the build's
                for number in (STATE, OEM):
                    source[number] = reproducible.inode_stamps(disk, build.plan.before.partition(number).first * SECTOR)
            doing = "applying the disk plan"
            with _phase(summary, "apply the disk plan"), report.progress_bar("move") as progress:
                apply.apply(disk, build.plan, report=lambda message: log.info("    %s", message), progress=progress)
            doing = "running the steps"
            arch = _image_arch(build, disk)
            with (
                _phase(summary, f"run the steps in the COS runtime layout ({arch.debian})"),
                binfmt.emulation(arch) as emulated,
            ):
                if emulated is not None:
                    log.info("    the image is %s: its programs run under %s (binfmt_misc %s)", arch.debian,
                             arch.qemu_user, emulated)  # fmt: skip
                work.make_cgroup()
                result = _run_stage(build, work, contexts, deadline, emulated=emulated is not None)
                summary.steps.extend((str(s["name"]), float(s["seconds"])) for s in result["steps"])  # type: ignore[attr-defined]
                summary.cleanup = [str(item) for item in result["cleanup"]]  # type: ignore[attr-defined]
            if build.epoch is not None:
                doing = "making the file systems reproducible"
                with _phase(summary, f"make reproducible ({reproducible.EPOCH_ENV}={build.epoch})"):
                    for number in (STATE, OEM):
                        first = build.plan.after.partition(number).first * SECTOR
                        reproducible.normalize_ext(disk, first, epoch=build.epoch, since=started, source=source[number])
            doing = "running the offline steps"
            with _phase(summary, "offline steps and checks"):
                _offline_steps(build, disk, summary)
                for number in (STATE, OEM):
                    ext.check(disk, build.plan.after.partition(number).first * SECTOR)
            if time.monotonic() > deadline:
                raise BuildFailed("the build took longer than -timeout and was stopped")
            doing = f"writing {build.output}"
            with _phase(summary, f"write {build.output.name} ({build.format.value})"):
                output.write(work.named_disk(), build.output, build.format, build.epoch)
        finally:
            work.close()
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


def _make_work(output_path: Path, name: str | None = None) -> tuple[Path, int]:
    """A fresh work directory beside the output (`.OUTPUT.work-NAME`, NAME random unless given), and its `owner`
    lock, held (locked) until the descriptor closes.

    The lock file appears under its final name already locked, so a sweep never takes a live build for a dead one.
    """
    while True:
        suffix = name or "".join(secrets.choice(ID_CHARACTERS) for _ in range(8))
        work = output_path.parent / f".{output_path.name}.work-{suffix}"
        try:
            work.mkdir(mode=0o700)
            break
        except FileExistsError:
            if name is not None:
                raise
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
            _release_cgroups(cgroups.name_for(work))
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
    for device in _loop_devices():
        backing = str(device.get("back-file") or "").removesuffix(" (deleted)")
        if backing.startswith(prefix):
            loop.detach(Path(str(device["name"])))
    return True


def _loop_devices() -> list[dict[str, object]]:
    tool = require_tool("losetup", "mount")
    argv = [tool, "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"]
    devices: list[dict[str, object]] = json.loads(runner.run(argv).stdout or b'{"loopdevices": []}').get(
        "loopdevices", []
    )
    return devices


def _release_cgroups(name: str) -> None:
    """The build's cgroups: what still runs in them is killed, then they are removed."""
    left = cgroups.remove(name)
    if left:
        raise CustomizerError(f"the build's cgroup {left[0]} cannot be removed: a process of it still runs")


def _release_loops(fd: int, seconds: float = 15.0) -> None:
    """Wait for the kernel to free the stage's loop devices on the working copy `fd` (autoclear, when their
    mounts went with the stage's namespace); detach stragglers. They are backed by our own working copy (its
    device and inode), so detaching them cannot touch anything else."""
    info = os.fstat(fd)
    backing = (f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}", info.st_ino)

    def attached() -> list[Path]:
        return [
            Path(str(device["name"]))
            for device in _loop_devices()
            if (str(device.get("back-maj:min") or "").strip(), device.get("back-ino")) == backing
        ]

    deadline = time.monotonic() + seconds
    while (devices := attached()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for device in devices:
        loop.detach(device)


def _remove_work(work: Path) -> None:
    """Delete the work directory, but never through a mount point (mounts live in the stage's namespace)."""
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounted if m == str(work) or m.startswith(f"{work}/")]
    if inside:
        raise CustomizerError(f"{inside[0]} is still mounted: unmount it, then remove {work}")
    shutil.rmtree(work, ignore_errors=True)
