"""The local executor's stage: the COS runtime layout, the scripts, the cleanup.

Runs as its own process inside a private mount namespace (started by
`executors.local` through `unshare --mount --propagation private`), so every
mount vanishes with the process, and every partition is mounted with
`mount -o loop,offset=,sizelimit=`, whose loop device the kernel frees when
the mount goes: no mount or loop device can outlive the build, even after
SIGKILL.

The layout is the one of 03-cos-disk.md: the root read-only; STATE at
/mnt/stateful_partition with /var and /home bound from it (/var noexec,
/var/lib/{google,docker,toolbox} exec); OEM at /usr/share/oem; /etc writable
through an overlay whose upper layer is discarded; size-limited tmpfs on
/tmp, /run, /mnt/disks and /var/lib/cloud (`large_tmpfs_size`, `SMALL_TMPFS`); the host's
resolv.conf. Each script runs as `/bin/bash FILE` in the sandbox of
`executors.local.sandbox` (its own /proc, /dev and read-only /sys, pivot_root into
the build's idmapped view of that tree, root of the build's inner user
namespace, the build's cgroups and network namespace with slirp4netns), in
the build context directory, its output streamed line by line; its `-env`
reaches only the sandbox. After the scripts the stage goes through nothing a
script could have replaced by a link to this machine's files (descriptors
held from before them, `unlink` at them; the cleanup resolves every parent).

The stage leaves nothing on the host's file systems: the working copy is the
local executor's unnamed file (`image` is a /proc/PID/fd path), the spec and
the result are memory files it inherits (/proc/self/fd paths), and the
directory of its mount points (`workdir`, an empty directory shared by every
build) gets a tmpfs of its own in this mount namespace (`private_workdir`).

Usage: python -m cos_customizer.executors.local.runtime SPEC.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cos_customizer.disk import loop
from cos_customizer.executors.local import cgroups, containers, daemon_units, idmap, relay, sandbox
from cos_customizer.provisioner import steps
from cos_customizer.provisioner.cleanup import STATE_DIR, clean, trim
from cos_customizer.provisioner.config import ProvisionerConfig, RunScriptArgs
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from cos_customizer.runner import CommandError, require_tool, run

TAIL_LINES = 20
EXEC_DIRS = ("google", "docker", "toolbox")
MiB = 1 << 20
GiB = 1 << 30
SMALL_TMPFS = 64 * MiB  # /run, /var/lib/cloud, the /etc overlay's upper layer
# The tree's tmpfs belong to the sandbox's root (a high host uid, `sandbox.INNER_BASE`): scripts and daemons
# see them through plain binds in the view, and their content is never part of the image.
OWNED = (f"uid={sandbox.INNER_BASE}", f"gid={sandbox.INNER_BASE}")


def large_tmpfs_size() -> int:
    """/tmp and /mnt/disks: a quarter of the machine's memory, at most 1 GiB each."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(64 * MiB, min(GiB, pages // 4))


@dataclasses.dataclass(frozen=True)
class Region:
    offset: int
    size: int


@dataclasses.dataclass(frozen=True)
class Script:
    name: str  # for the log: "run-script preload.sh"
    context: str
    path: str
    env: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    image: str
    root: Region
    state: Region
    oem: Region
    workdir: str  # a private directory for mount points
    contexts: dict[str, str]  # build context name -> archive path
    scripts: tuple[Script, ...]
    result: str  # where the stage writes its result (JSON)
    allow_host_loopback: bool = False  # scripts may reach the host's loopback services (at 127.0.0.1 and 10.0.2.2)
    containers: str = "auto"  # the image's containerd and dockerd for scripts: auto, on, off (-containers)
    cgroup: str = ""  # the build's cgroup name (cgroups.NAME), for the daemons' containers
    reproducible: bool = False  # SOURCE_DATE_EPOCH is set: STATE and OEM allocate blocks deterministically
    emulated: bool = False  # the image is another machine's: its programs run under qemu-user (binfmt)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageSpec:
        return cls(
            image=data["image"],
            root=Region(**data["root"]),
            state=Region(**data["state"]),
            oem=Region(**data["oem"]),
            workdir=data["workdir"],
            contexts=dict(data["contexts"]),
            scripts=tuple(Script(**{**s, "env": tuple(s["env"])}) for s in data["scripts"]),
            result=data["result"],
            allow_host_loopback=bool(data.get("allow_host_loopback", False)),
            containers=str(data.get("containers", "auto")),
            cgroup=str(data.get("cgroup", "")),
            reproducible=bool(data.get("reproducible", False)),
            emulated=bool(data.get("emulated", False)),
        )


class StageError(Exception):
    """The stage failed; `info` goes to the result file."""

    def __init__(self, message: str, **info: Any) -> None:
        super().__init__(message)
        self.info = {"message": message, **info}


def _mount(stack: ExitStack, source: str, target: Path, *options: str, fstype: str | None = None) -> Path:
    return stack.enter_context(loop.mounted(source, target, fstype=fstype, options=options))


def _bind(stack: ExitStack, source: Path, target: Path, *flags: str) -> None:
    _mount(stack, str(source), target, "bind")
    if flags:
        run([require_tool("mount", "mount"), "-o", ",".join(("remount", "bind", *flags)), str(target)])


def _real(base: Path, relative: str, what: str = "the image") -> Path:
    """`base/relative`, refused if a part of `relative` is a symbolic link: the stage mounts, binds and makes
    these as this machine's root, and a link in an untrusted image could lead to this machine's files."""
    path = base / relative
    if path.resolve() != base.resolve() / relative:
        raise StageError(f"/{relative} in {what} is or goes through a symbolic link: refused (the build mounts it)")
    return path


def _mountpoint(root: Path, relative: str) -> Path:
    path = _real(root, relative)
    if not path.is_dir():
        raise StageError(f"the root file system has no /{relative} directory: is this a COS image?")
    return path


def _partition(stack: ExitStack, image: str, region: Region, target: Path, *options: str) -> None:
    # Always the ext4 driver (it reads COS's ext2 root too): only it allows the idmapped copies of `containers`.
    _mount(stack, image, target, "loop", f"offset={region.offset}", f"sizelimit={region.size}", *options, fstype="ext4")


# Where the ext4 block allocator would depend on timing, for a reproducible build's writable file systems:
# delayed allocation (blocks chosen at writeback, by flusher threads, when they run), the per-CPU locality
# groups of small files (which CPU the writer ran on), and the block bitmaps read ahead in the background
# (a group is searched early only once its bitmap is in). Without them, blocks are chosen in the write()
# calls, in the scripts' order, from bitmaps read when needed.
DETERMINISTIC_MOUNT = ("nodelalloc", "no_prefetch_block_bitmaps", "mb_optimize_scan=0")
DETERMINISTIC_TUNABLES = {"mb_group_prealloc": "0", "mb_prefetch": "0"}


def _rw_partition(stack: ExitStack, spec: StageSpec, region: Region, target: Path) -> None:
    """STATE or OEM, writable. noinit_itable: the kernel's background zeroing of unused inode tables would
    mark (or not, as time allows) the groups it reached: not the build's business, and a reproducible
    build's bytes depend on it."""
    options = ("noinit_itable", *(DETERMINISTIC_MOUNT if spec.reproducible else ()))
    _partition(stack, spec.image, region, target, *options)
    if spec.reproducible:
        device = os.stat(target).st_dev
        name = Path(os.path.realpath(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")).name
        for tunable, value in DETERMINISTIC_TUNABLES.items():
            Path(f"/sys/fs/ext4/{name}/{tunable}").write_text(value)


@contextmanager
def layout(spec: StageSpec) -> Iterator[Path]:
    """Assemble the runtime tree; everything is unmounted when the block ends."""
    work = Path(spec.workdir)
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        _partition(stack, spec.image, spec.root, root, "ro")
        stateful = _mountpoint(root, "mnt/stateful_partition")
        _rw_partition(stack, spec, spec.state, stateful)
        for name in ("var_overlay", "home"):
            _real(stateful, name, "STATE").mkdir(exist_ok=True)
        _bind(stack, stateful / "var_overlay", _mountpoint(root, "var"), "nosuid", "nodev", "noexec")
        _bind(stack, stateful / "home", _mountpoint(root, "home"), "nosuid", "nodev", "noexec")
        for name in EXEC_DIRS:
            path = _real(root, f"var/lib/{name}")
            path.mkdir(parents=True, exist_ok=True)
            _bind(stack, path, path, "nosuid", "nodev", "exec")
        _real(root, "var/lib/cloud").mkdir(parents=True, exist_ok=True)
        _mount(stack, "tmpfs", root / "var/lib/cloud", "mode=0755", f"size={SMALL_TMPFS}", *OWNED, fstype="tmpfs")
        _rw_partition(stack, spec, spec.oem, _mountpoint(root, "usr/share/oem"))
        layers = work / "etc-layers"
        layers.mkdir(exist_ok=True)
        _mount(stack, "tmpfs", layers, "mode=0755", f"size={SMALL_TMPFS}", fstype="tmpfs")
        (layers / "upper").mkdir()
        (layers / "work").mkdir()
        etc = _mountpoint(root, "etc")
        overlay = f"lowerdir={etc},upperdir={layers / 'upper'},workdir={layers / 'work'}"
        _mount(stack, "overlay", etc, overlay, fstype="overlay")
        resolv = etc / "resolv.conf"
        if Path("/etc/resolv.conf").exists():
            if resolv.is_symlink() or resolv.exists():
                resolv.unlink()
            resolv.touch()
            _bind(stack, Path("/etc/resolv.conf").resolve(), resolv, "ro")
        large = large_tmpfs_size()
        for relative, size, options in (
            ("tmp", large, ("nosuid", "nodev", "noexec")),
            ("run", SMALL_TMPFS, ("nosuid", "nodev")),
            ("mnt/disks", large, ()),
        ):
            mode = "mode=1777" if relative == "tmp" else "mode=0755"
            _mount(stack, "tmpfs", _mountpoint(root, relative), mode, f"size={size}", *OWNED, *options, fstype="tmpfs")
        for relative in ("dev", "sys", "proc"):  # each script's sandbox mounts its own
            _mountpoint(root, relative)
        yield root


def unpack_contexts(root: Path, contexts: dict[str, str]) -> None:
    tar = require_tool("tar", "tar")
    for name, archive in contexts.items():
        target = _real(root, f"{STATE_DIR}/{name}")  # tar runs as this machine's root: never through a link
        target.mkdir(parents=True, exist_ok=True)
        run([tar, "-xpf", archive, "-C", str(target)])


def _daemons(spec: StageSpec, root: Path) -> tuple[daemon_units.Daemon, ...]:
    if spec.containers == "off" or not spec.cgroup:
        return ()
    found = containers.find(root, emulated=spec.emulated)
    if not found and spec.containers == "on":
        raise StageError(
            "-containers=on, but the image has no containerd or dockerd (no unit file names one and none is on "
            "/usr/bin, /usr/sbin, /bin, /sbin): use -containers=auto or off, or an image with them"
        )
    return found


@dataclasses.dataclass(frozen=True)
class Services:
    spaces: sandbox.Namespaces
    view: Path  # the runtime tree as the scripts and the daemons see it (`idmap.make_view`)
    cgroups: tuple[str, ...]  # the build's cgroup directories, one per hierarchy, that each script joins


@contextmanager
def build_services(spec: StageSpec, root: Path) -> Iterator[Services]:
    """The build's namespaces, its view of the tree and its cgroups, the image's container daemons (waiting
    for first use), slirp4netns and, with -allow-host-loopback, the host's loopback services; all stopped
    when the block ends.

    The daemons' host is forked before any thread of this process starts (the forwarder's)."""
    work = Path(spec.workdir)
    spaces = sandbox.make_namespaces(work / "ns")
    daemons = _daemons(spec, root)
    with ExitStack() as stack:
        view = work / "view"
        stack.callback(_unmount_view, view)
        idmap.make_view(str(root), str(view), spaces.inner, owner=sandbox.INNER_BASE)
        group = _build_cgroups(spec)
        if group is not None:
            stack.callback(_remove_cgroups, spec.cgroup)
        if daemons and group is None and spec.containers == "on":
            raise StageError("-containers=on, but this machine cannot run the image's daemons: no cgroup file system")
        if daemons and group is not None:
            try:
                host = containers.DaemonHost(root, view, spaces, work / "daemons", group, daemons, _say)
            except OSError as err:  # this machine cannot host them (an old kernel)
                if spec.containers == "on":
                    raise StageError(f"-containers=on, but this machine cannot run the image's daemons: {err}") from err
                _say(f"cos-customizer: note: no container daemons for scripts on this machine: {err}")
            else:
                stack.callback(_stop_daemons, host)
        network = sandbox.Network(
            spaces, allow_host_loopback=spec.allow_host_loopback, tool=require_tool("slirp4netns", "slirp4netns")
        )
        stack.callback(network.close)
        if spec.allow_host_loopback:
            stack.callback(relay.LoopbackForwarder(spaces.net).close)
        yield Services(spaces, view, tuple(str(p) for p in group.paths()) if group is not None else ())


def _build_cgroups(spec: StageSpec) -> cgroups.BuildCgroup | None:
    """The build's cgroups in every hierarchy, delegated to the sandbox's root; None where there are none."""
    if not spec.cgroup:
        return None
    try:
        return cgroups.create(spec.cgroup, sandbox.INNER_BASE)
    except OSError as err:
        _say(f"cos-customizer: note: the build runs in no cgroup of its own: {err}")
        return None


def _remove_cgroups(name: str) -> None:
    left = cgroups.remove(name)
    if left:
        raise StageError(f"the build's cgroup {left[0]} could not be removed")


def _unmount_view(view: Path) -> None:
    for path in (view, view.with_name(f"{view.name}.etc")):
        if os.path.ismount(path):
            loop.unmount(path)


def _say(line: str) -> None:
    print(line, flush=True)


def _stop_daemons(host: containers.DaemonHost) -> None:
    for note in host.stop():
        _say(f"cos-customizer: {note}")
    if host.failed:
        raise StageError(host.failed)


def run_script(root: Path, services: Services, script: Script, work: Path) -> None:
    """`/bin/bash FILE` by the provisioner's own step code, in the sandbox on `root`, output streamed with its name.

    The step's -env goes to the sandbox in its spec file, never into the environment of a host-side process.
    """
    tail: list[str] = []

    def say(line: str) -> None:
        print(f"[{script.name}] {line}", flush=True)
        tail.append(line)
        del tail[:-TAIL_LINES]

    extra = {key: value for key, _, value in (item.partition("=") for item in script.env)}
    spec_path = work / "sandbox.json"
    sandbox.SandboxSpec(
        root=str(services.view),
        user=services.spaces.inner,
        net=services.spaces.net,
        env={**steps.SCRIPT_ENV_BASE, **extra},
        cgroups=list(services.cgroups),
    ).write(spec_path)
    target = Target(
        root=root,
        disk=root,
        partition_template="",
        chroot=True,
        fixed_env=True,
        sandbox=tuple(sandbox.command(spec_path)),
    )
    context = steps.Context(target, State(root / STATE_DIR, ProvisionerConfig()), say)
    try:
        steps.run_script(context, RunScriptArgs(build_context=script.context, path=script.path, env=()))
    except steps.StepFailed as err:
        raise StageError(f"{script.name} failed with exit status {err.status}", status=err.status, tail=tail) from err


def stage(spec: StageSpec) -> dict[str, Any]:
    timings: list[dict[str, Any]] = []
    work = Path(spec.workdir)
    with layout(spec) as root:
        unpack_contexts(root, spec.contexts)
        if spec.scripts:
            with build_services(spec, root) as services:
                for index, script in enumerate(spec.scripts):
                    started = time.monotonic()
                    try:
                        run_script(root, services, script, work)
                    except StageError as err:
                        err.info["index"] = index
                        raise
                    timings.append({"name": script.name, "seconds": round(time.monotonic() - started, 3)})
        cleaned = clean(root) + trim(root)
    return {"ok": True, "steps": timings, "cleanup": cleaned}


def private_workdir(path: Path) -> None:
    """A tmpfs on `path` in this process's mount namespace, which must be its own: the stage's mount points,
    the namespaces' bind mounts, the daemons' logs and the sandbox's spec live there and vanish with the
    namespace, whatever ends the stage. Nothing is written to the directory itself."""
    try:
        shared = os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        shared = False  # PID 1 is not ours to look at (another PID namespace)
    if shared:
        raise StageError("the stage runs in this machine's mount namespace: start it with unshare --mount")
    options = f"mode=0700,size={large_tmpfs_size()}"
    run([require_tool("mount", "mount"), "-t", "tmpfs", "-o", options, "cos-customizer", str(path)])


def _inherited(path: str) -> int | None:
    """The descriptor number of a /proc/self/fd/N path (what the local executor passes), else None."""
    number = path.removeprefix("/proc/self/fd/")
    return int(number) if number != path and number.isdigit() else None


def main(argv: list[str]) -> int:
    spec = StageSpec.from_json(json.loads(Path(argv[0]).read_text()))
    # No program the stage runs gets the spec (every script's -env) or the result file.
    if (spec_fd := _inherited(argv[0])) is not None:
        os.close(spec_fd)
    if (result_fd := _inherited(spec.result)) is not None:
        os.set_inheritable(result_fd, False)
    try:
        private_workdir(Path(spec.workdir))
        result = stage(spec)
    except StageError as err:
        result = {"ok": False, **err.info}
    except (CommandError, OSError, containers.ContainersError) as err:
        result = {"ok": False, "message": str(err)}
    # Read by the local executor once this process has ended: written in place (a memory file it gave us).
    Path(spec.result).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
