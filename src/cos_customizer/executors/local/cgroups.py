"""The build's own cgroup, delegated to the container daemons' user namespace.

runc puts every container in a cgroup. The daemons get one subtree per hierarchy, made here as a
child of this process's own cgroup (cgroup v1: one per mounted hierarchy, as on this machine;
cgroup v2: one), owned by the daemons' root (`sandbox.INNER_BASE`) as systemd delegates a subtree
to a rootless engine. Inside their sandbox, a cgroup namespace rooted there shows them only that
subtree. `remove` kills whatever is left in it and removes it bottom-up, so no cgroup outlives
the build; `remove` by name also serves after a killed stage. Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "cos-customizer-"
NAME = re.compile(r"cos-customizer-[A-Za-z0-9_.-]{1,64}")


def name_for(work: Path) -> str:
    """The build's cgroup name, from its work directory (`.OUTPUT.work-XXXXXXXX`): cos-customizer-XXXXXXXX."""
    return PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", work.name.rsplit("-", 1)[-1])[:64]


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    mount: str  # where it is mounted on the host
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: str  # the mount data inside a sandbox: "memory", "none,name=systemd", "" for cgroup2
    here: str  # this process's cgroup in it, "/" for the root

    @property
    def label(self) -> str:
        """The directory name under /sys/fs/cgroup inside the sandbox ("memory", "systemd", "unified")."""
        if self.fstype == "cgroup2":
            return ""
        return self.options.removeprefix("none,name=")


def hierarchies() -> list[Hierarchy]:
    """The host's cgroup hierarchies as this process sees them (from /proc/self/mountinfo and /proc/self/cgroup),
    all of them: a hybrid host's cgroup2 too, so that no process of the build stays in a cgroup of the host
    there (a cgroup namespace made from it would show the host's whole tree)."""
    mine: dict[frozenset[str], str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, listed, path = line.split(":", 2)
        mine[frozenset() if number == "0" else frozenset(listed.split(","))] = path
    found: list[Hierarchy] = []
    seen: set[frozenset[str]] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3]
        if fstype not in ("cgroup", "cgroup2") or fields[3] != "/":
            continue
        point = _unescape(fields[4])
        if fstype == "cgroup2":
            key, data = frozenset[str](), ""
        else:
            wanted: list[str] = [
                o for o in options.split(",") if o not in ("rw", "ro") and not o.startswith("release_agent")
            ]
            names: list[str] = [o for o in wanted if o.startswith("name=")]
            controllers = sorted(
                o for o in wanted if o not in names and "=" not in o and o not in ("noprefix", "xattr")
            )
            key = frozenset(controllers + names)
            data = ",".join(controllers) if controllers else "none," + names[0] if names else ""
        if key in seen or key not in mine or (not data and fstype == "cgroup"):
            continue
        seen.add(key)
        found.append(Hierarchy(point, fstype, data, mine[key]))
    return found


def for_containers(found: Sequence[Hierarchy]) -> list[Hierarchy]:
    """The hierarchies runc is shown: hybrid hosts' containers use the v1 ones, as docker does there."""
    v1 = [h for h in found if h.fstype == "cgroup"]
    return v1 if v1 else list(found)


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


@dataclasses.dataclass(frozen=True)
class BuildCgroup:
    name: str
    hierarchies: tuple[Hierarchy, ...]

    def paths(self) -> list[Path]:
        return [Path(h.mount) / h.here.lstrip("/") / self.name for h in self.hierarchies]

    def enter(self, pid: int) -> None:
        for path in self.paths():
            (path / "cgroup.procs").write_text(f"{pid}\n")


def create(name: str, owner: int) -> BuildCgroup:
    """The build's cgroup in every hierarchy, delegated to `owner` (uid and gid)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"not a build cgroup name: {name!r}")
    group = BuildCgroup(name, tuple(hierarchies()))
    if not group.hierarchies:
        raise OSError(errno.ENOENT, "no cgroup file system is mounted on this machine (/sys/fs/cgroup)")
    made: list[Path] = []
    try:
        for hierarchy, path in zip(group.hierarchies, group.paths(), strict=True):
            path.mkdir()
            made.append(path)
            if "cpuset" in hierarchy.options.split(","):
                for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 leaves them empty: no task could join
                    (path / knob).write_text((path.parent / knob).read_text())
            os.chown(path, owner, owner)
            for entry in path.iterdir():
                if entry.name.startswith("cgroup.") and entry.is_file():
                    os.chown(entry, owner, owner)
    except OSError:
        _remove_paths(made)
        raise
    return group


def remove(name: str, *, seconds: float = 10.0) -> list[str]:
    """Kill what is left in the build's cgroups called `name` and remove them; the paths that remain."""
    if not NAME.fullmatch(name):
        raise ValueError(f"not a build cgroup name: {name!r}")
    group = BuildCgroup(name, tuple(hierarchies()))
    return _remove_paths([p for p in group.paths() if p.is_dir()], seconds)


def _remove_paths(paths: list[Path], seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    left: list[str] = []
    for top in paths:
        while True:
            for directory in _bottom_up(top):
                _kill_all(directory)
                try:
                    directory.rmdir()
                except OSError as err:
                    if err.errno not in (errno.EBUSY, errno.ENOENT):
                        raise
            if not top.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if top.exists():
            left.append(str(top))
    return left


def _bottom_up(top: Path) -> list[Path]:
    found = [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _kill_all(directory: Path) -> None:
    try:
        pids = (directory / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
