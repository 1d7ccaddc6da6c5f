"""Every Linux call this package makes through ctypes, the C library loaded once (here).

Mounts and namespaces (mount, unshare, setns, pivot_root), idmapped copies of mounts (open_tree,
mount_setattr, move_mount: Linux 5.12+), prctl (parent-death signal, bounding set, no_new_privs) and
fallocate. Each is a small typed function that raises OSError with the kernel's errno when the call
fails. Standard library only: the sandbox helper (run as a file, before any package import) and the
provisioner (a small static executable) import it too.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20

# The system calls the C library has no wrapper for (in every version this runs with), by machine.
SYSCALLS = {
    "x86_64": {"pivot_root": 155, "open_tree": 428, "move_mount": 429, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "open_tree": 428, "move_mount": 429, "mount_setattr": 442},
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _check(result: int, what: str, path: str = "") -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)


def _number(name: str) -> int:
    number = SYSCALLS.get(platform.machine(), {}).get(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown system call number on {platform.machine()}")
    return number


def _syscall(name: str, *args: object) -> int:
    result = int(_libc.syscall(_number(name), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


# --- namespaces and mounts ---


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(path_or_fd: str | int, nstype: int) -> None:
    """Join the namespace at a path (an ns file) or held by a descriptor."""
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC) if isinstance(path_or_fd, str) else path_or_fd
    try:
        _check(_libc.setns(fd, nstype), "setns", str(path_or_fd))
    finally:
        if isinstance(path_or_fd, str):
            os.close(fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {fstype or ''}", target)


def bind(source: str, target: str, flags: int = 0) -> None:
    """Bind `source` on `target`, then remount the bind with `flags` (MS_RDONLY, MS_NOSUID...) if any."""
    mount(source, target, None, MS_BIND)
    if flags:
        mount(None, target, None, MS_REMOUNT | MS_BIND | flags)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _number("pivot_root")
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()), "pivot_root", new_root)


def pivot_into(root: str) -> None:
    """Make the mount at `root` this mount namespace's root and detach the old one (as bubblewrap does:
    pivot_root(".", ".") stacks the old root on the new, then a lazy unmount of "." drops it)."""
    os.chdir(root)
    pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


# --- idmapped copies of mounts ---


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """A descriptor of the mount at `path` (OPEN_TREE_CLONE: a detached copy of it)."""
    return _syscall("open_tree", dirfd, path.encode(), flags)


def mount_setattr_idmap(fd: int, userns_fd: int) -> None:
    """Give the detached mount held by `fd` the id mapping of the user namespace held by `userns_fd`."""
    # struct mount_attr: attr_set, attr_clr, propagation, userns_fd (MOUNT_ATTR_SIZE_VER0 = 32 bytes).
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns_fd), 32)
    _syscall("mount_setattr", fd, b"", AT_EMPTY_PATH, attr, 32)


def move_mount(from_fd: int, to_dirfd: int, to_path: str, flags: int) -> None:
    """Attach the mount held by `from_fd` (MOVE_MOUNT_F_EMPTY_PATH) at `to_path`."""
    _syscall("move_mount", from_fd, b"", to_dirfd, to_path.encode(), flags)


# --- prctl ---


def set_parent_death_signal(sig: int) -> None:
    """The kernel sends `sig` to this process when its parent (thread) dies; cleared by a change of credentials."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl")


def drop_bounding_capability(number: int) -> None:
    _check(_libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0), "prctl")


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")


# --- files ---


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with FALLOC_FL_* `mode` (punch a hole, collapse or insert a range)."""
    result = _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


FITRIM = 0xC0185879  # _IOWR('X', 121, struct fstrim_range), linux/fs.h


def fitrim(path: str) -> int:
    """Discard the free blocks of the file system mounted on `path` (what `fstrim` does); returns the bytes
    the file system trimmed. Raises OSError (EOPNOTSUPP) where its device cannot discard."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        request = bytearray(struct.pack("QQQ", 0, 2**64 - 1, 0))  # start, len, minlen
        fcntl.ioctl(fd, FITRIM, request)
        return int(struct.unpack("QQQ", request)[1])
    finally:
        os.close(fd)
