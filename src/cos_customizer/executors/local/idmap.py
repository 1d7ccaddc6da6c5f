"""Idmapped copies of mounts (Linux 5.12+): the image's files as the container daemons' user namespace sees them.

The daemons run as root of the build's inner user namespace, which is a high host uid
(`sandbox.INNER_BASE`), not 0. An idmapped mount of a file system, with that namespace as its idmap,
shows a file owned by uid N on disk as owned by the namespace's uid N, and a file the namespace's
root creates is owned by uid 0 on disk: the preloaded images have exactly the owners a booted COS
would give them. Made with open_tree(OPEN_TREE_CLONE), mount_setattr(MOUNT_ATTR_IDMAP) and
move_mount, on a detached copy, so the original mount is not changed. Standard library only.

`make_view` assembles the whole runtime tree again from such copies: the tree the build's scripts
and the container daemons both run in, as root of that namespace (never host uid 0).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Callable
from pathlib import Path

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

SYSCALLS = {
    "x86_64": {"open_tree": 428, "move_mount": 429, "mount_setattr": 442},
    "aarch64": {"open_tree": 428, "move_mount": 429, "mount_setattr": 442},
}

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(name: str, *args: object) -> int:
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown system call number on {platform.machine()}")
    result = int(_libc.syscall(numbers[name], *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def idmapped_copy(source: str, target: str, userns: str) -> None:
    """Mount an idmapped copy of the mount at `source` (not its submounts) on `target`.

    `userns`: a path to the user namespace whose mapping is applied. Raises OSError (EINVAL: the
    file system does not support idmapped mounts, as overlayfs does not).
    """
    tree = _syscall("open_tree", AT_FDCWD, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_IDMAP, 0, 0, ns), 32)
            _syscall("mount_setattr", tree, b"", AT_EMPTY_PATH, attr, 32)
        finally:
            os.close(ns)
        _syscall("move_mount", tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as err:
        raise OSError(err.errno, f"an idmapped copy of {source}: {err.strerror}") from err
    finally:
        os.close(tree)


def mounts_under(root: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of `root` and every mount under it, in the order they were made."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if point == root or point.startswith(root + "/"):
            found.append((point, fields[fields.index("-") + 1]))
    return found


def make_view(
    root: str,
    view: str,
    userns: str,
    *,
    mount: Callable[[str | None, str, str | None, int, str | None], None],
    bind: Callable[[str, str], None],
    owner: int,
) -> None:
    """The runtime tree at `root` again at `view` (as this machine's root, in a private mount namespace).

    The image's file systems (ext4) become idmapped copies through `userns`; the /etc overlay is made
    again over the idmapped lower layer, with its own upper layer owned by `owner` (overlayfs cannot be
    idmapped); every other mount (the size-limited tmpfs, which the stage makes owned by `owner`, and
    the host's resolv.conf, read-only) is bound as it is, which needs no idmapping support of tmpfs.
    """
    os.makedirs(view, exist_ok=True)
    layers = f"{view}.etc"
    for point, fstype in mounts_under(root):
        target = view + point[len(root) :]
        if point != root:
            _mount_point_for(point, target)
        if fstype == "overlay":
            os.makedirs(layers, exist_ok=True)
            mount("tmpfs", layers, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size=16m,uid={owner},gid={owner}")
            for name in ("upper", "work"):
                os.mkdir(f"{layers}/{name}")
                os.chown(f"{layers}/{name}", owner, owner)
            mount("overlay", target, "overlay", 0, f"lowerdir={target},upperdir={layers}/upper,workdir={layers}/work")
        elif fstype in IDMAPPED_TYPES:
            idmapped_copy(point, target, userns)
        else:
            bind(point, target)


MS_NOSUID = 2
MS_NODEV = 4
IDMAPPED_TYPES = ("ext4", "ext3", "ext2")


def _mount_point_for(source: str, target: str) -> None:
    """A directory or a file at `target` to mount `source`'s copy on (the view's own tree, made as root)."""
    if os.path.isdir(source):
        if not os.path.isdir(target) or os.path.islink(target):
            os.makedirs(target, exist_ok=True)
    elif not os.path.isfile(target) or os.path.islink(target):
        if os.path.lexists(target):
            os.unlink(target)
        Path(target).touch()
