"""Idmapped copies of mounts (Linux 5.12+): the image's files as the container daemons' user namespace sees them.

The daemons run as root of the build's inner user namespace, which is a high host uid
(`sandbox.INNER_BASE`), not 0. An idmapped mount of a file system, with that namespace as its idmap,
shows a file owned by uid N on disk as owned by the namespace's uid N, and a file the namespace's
root creates is owned by uid 0 on disk: the preloaded images have exactly the owners a booted COS
would give them. Made with open_tree(OPEN_TREE_CLONE), mount_setattr(MOUNT_ATTR_IDMAP) and
move_mount, on a detached copy, so the original mount is not changed. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

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
