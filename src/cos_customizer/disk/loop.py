"""Loop devices and mounts, each held by a context manager.

`losetup -P` creates no partition nodes on every machine, so a partition
is attached on its own with `--offset`/`--sizelimit`. Every device and
mount is released when the `with` block ends, however it ends. Only what
this process attached or mounted is ever detached or unmounted.

A device is attached in one step (LOOP_CONFIGURE) with the kernel's
autoclear flag, through a descriptor this process holds until the block
ends: the kernel detaches it at its last close, so a SIGKILL cannot leave
it attached either. Kernels before 5.8 get `losetup` (no such guarantee).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from cos_customizer import privilege
from cos_customizer.errors import CustomizerError
from cos_customizer.runner import CommandError, require_tool, run


def _need_root(what: str) -> None:
    if not privilege.can_mount():
        raise CustomizerError(f"{what} needs root (loop devices and mounts): run as root, for example with sudo")


_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: fd, block_size, struct loop_info64 (device, inode, rdevice, offset, sizelimit, number,
# encrypt_type, encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32], init[2]), reserved[8].
_LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")


@contextlib.contextmanager
def attach(image: Path, *, offset: int = 0, size: int = 0, read_only: bool = False) -> Iterator[Path]:
    """Attach `size` bytes of `image` at `offset` (all of it when 0) to a new loop device, detached when the
    block ends or this process dies."""
    _need_root("attaching a loop device")
    held = _configure(image, offset, size, read_only)
    if held is not None:
        device, fd = held
        try:
            yield device
        finally:
            os.close(fd)  # the last close but for the device's own users: the kernel detaches it (autoclear)
        return
    tool = require_tool("losetup", "mount")
    argv = [tool, "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    device = Path(run([*argv, str(image)]).stdout.decode().strip())
    try:
        yield device
    finally:
        detach(device)


def _configure(image: Path, offset: int, size: int, read_only: bool) -> tuple[Path, int] | None:
    """A free loop device attached to `image` with autoclear, and our descriptor of it; None where the kernel
    has no LOOP_CONFIGURE (before 5.8) or no /dev/loop-control."""
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        backing = os.open(image, mode | os.O_CLOEXEC)
        try:
            flags = _LO_FLAGS_AUTOCLEAR | (_LO_FLAGS_READ_ONLY if read_only else 0)
            name = os.fsencode(str(image))[:63]
            config = _LOOP_CONFIG.pack(backing, 0, 0, 0, 0, offset, size, 0, 0, 0, flags, name, b"", b"", 0, 0,
                                       *([0] * 8))  # fmt: skip
            for _ in range(64):  # another process may take the free device first: ask again
                device = Path(f"/dev/loop{fcntl.ioctl(control, _LOOP_CTL_GET_FREE)}")
                fd = os.open(device, mode | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, _LOOP_CONFIGURE, config)
                except OSError as err:
                    os.close(fd)
                    if err.errno == errno.EBUSY:
                        continue
                    if err.errno in (errno.EINVAL, errno.ENOTTY):
                        return None
                    raise
                return device, fd
            raise OSError(errno.EBUSY, f"no free loop device for {image}")
        finally:
            os.close(backing)
    finally:
        os.close(control)


def detach(device: Path) -> None:
    tool = require_tool("losetup", "mount")
    with contextlib.suppress(CommandError):
        run([tool, "--detach", str(device)])


def attached_to(image: Path) -> list[Path]:
    """The loop devices backed by `image` (to check that nothing was left behind)."""
    tool = require_tool("losetup", "mount")
    listing = json.loads(run([tool, "--json", "--list"]).stdout or b'{"loopdevices": []}')
    target = str(image.resolve())
    return [
        Path(entry["name"])
        for entry in listing.get("loopdevices", [])
        if str(entry.get("back-file") or "").removesuffix(" (deleted)") == target
    ]


@contextlib.contextmanager
def mounted(
    source: Path | str, target: Path, *, fstype: str | None = None, options: Sequence[str] = ()
) -> Iterator[Path]:
    """Mount `source` on `target` for the duration of the block."""
    _need_root("mounting a file system")
    tool = require_tool("mount", "mount")
    argv = [tool]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    if not target.exists():
        target.mkdir(parents=True)  # a file (a bind-mounted file) is a mount point as it is
    run([*argv, str(source), str(target)])
    try:
        yield target
    finally:
        unmount(target)


def unmount(target: Path) -> None:
    """Unmount `target` and everything mounted below it (our own mounts only live there)."""
    tool = require_tool("umount", "mount")
    try:
        run([tool, "--recursive", str(target)])
    except CommandError:
        # Busy (a process still inside): detach lazily rather than leave it mounted.
        run([tool, "--recursive", "--lazy", str(target)], check=False)


@contextlib.contextmanager
def partition_mounted(
    image: Path, *, offset: int, size: int, target: Path, read_only: bool = True, fstype: str | None = None
) -> Iterator[Path]:
    """Attach one partition of `image` and mount it on `target`."""
    with (
        attach(image, offset=offset, size=size, read_only=read_only) as device,
        mounted(device, target, fstype=fstype, options=("ro",) if read_only else ()),
    ):
        yield target
