"""Write the finished disk in the requested format, atomically, leaving nothing behind whatever happens.

- raw: the working copy itself becomes the output (it is already sparse);
- qcow2: `qemu-img convert` (holes are skipped);
- tar.gz: the format Compute Engine imports: a tar holding one member
  `disk.raw`, stored sparse (GNU tar `--sparse --format=oldgnu`, which only
  reads data extents), gzip-compressed (pigz when installed, on every core).

Every file is made without a name (`unnamed`: O_TMPFILE in the output's
directory) and given the output's name only once it is complete (`link`:
linkat through /proc/self/fd). Until then no directory lists it, and the
kernel frees it with its last descriptor: a failure, Ctrl-C or SIGKILL at
any moment leaves nothing beside the output. A working copy that has a
name (another caller's) is renamed into place; across file systems (EXDEV)
it is copied, sparse, into an unnamed file beside the output.

Where the output's file system cannot make unnamed files (some network and
FUSE file systems), the result is written under a temporary name beside
the working copy (the local build's work directory, which the next build
sweeps if this one was killed) or beside the output, and renamed at the
end. A full or read-only file system is one clear error naming it.

`held` is the lock of an output while a build writes it: an abstract unix
socket (a name in the kernel, not a file) derived from the output's
directory and name, released by the kernel when its holder dies, however.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cos_customizer.disk import mover
from cos_customizer.errors import CustomizerError
from cos_customizer.images import ImageFormat
from cos_customizer.runner import CommandError, die_with_us, require_tool, run

log = logging.getLogger("cos_customizer")

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
_COPY_CHUNK = 4 << 20
# What open(O_TMPFILE) fails with where the file system cannot make unnamed files (EISDIR: kernels before 3.11).
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
_LOCK_PREFIX = "cos-customizer/output/"


class OutputError(CustomizerError):
    """The output could not be written (a full or read-only file system, a mount point in the way)."""


def partial_name(output: Path, directory: Path | None = None) -> Path:
    """Where `output` is written before it is renamed into place, where no unnamed file can be made: in
    `directory` (default: beside it)."""
    return (directory or output.parent) / f".{output.name}.partial"


def compressor() -> list[str]:
    """pigz (or gzip) at level 1, storing no file name and no time in the header (-n), so equal input
    gives equal output."""
    pigz = shutil.which("pigz")
    return [pigz, "-1", "-n"] if pigz else [require_tool("gzip", "gzip"), "-1", "-n"]


# Unnamed files


def unnamed(directory: Path) -> int | None:
    """A new empty file without a name in `directory` (O_TMPFILE), open for reading and writing, its mode
    the one a new file gets (0666 less the umask); None where the file system cannot make one."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno in _NO_TMPFILE:
            return None
        raise


def fd_path(fd: int) -> Path:
    """A path of this process's descriptor `fd` that every process of this machine's root can open."""
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def link(fd: int, output: Path) -> None:
    """Give the unnamed file `fd` the name `output`, at once; an existing `output` is replaced."""
    directory = os.open(output.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(f"/proc/self/fd/{fd}", output.name, dst_dir_fd=directory, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        # Something is there (the command line refuses an existing -output, but a file may have appeared since):
        # a temporary name for the instant of the rename, which replaces it atomically.
        temporary = f".{output.name}.{secrets.token_hex(4)}.partial"
        os.link(f"/proc/self/fd/{fd}", temporary, dst_dir_fd=directory, follow_symlinks=True)
        try:
            os.replace(temporary, output.name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            if err.errno == errno.EBUSY:
                raise _mount_point(output) from err
            raise
    finally:
        os.close(directory)


def _mount_point(output: Path) -> OutputError:
    return OutputError(
        f"cannot replace {output}: it is a mount point (Device or resource busy); choose an -output that is not "
        "mounted on"
    )


# Writing


def write(disk: Path | int, output: Path, fmt: ImageFormat, epoch: int | None = None) -> None:
    """Turn the raw working copy `disk` into `output`: a path, or the descriptor of an unnamed file in the
    output's directory (`unnamed`). `disk` is consumed for raw output. With `epoch` (SOURCE_DATE_EPOCH) the
    file's mtime, and in a tar.gz the member's, is the epoch."""
    source = fd_path(disk) if isinstance(disk, int) else disk
    try:
        if epoch is not None:  # holes where the content is zero, and only there; the epoch as mtime
            mover.sparsify(source)
            os.utime(source, (epoch, epoch))
        if fmt is ImageFormat.RAW:
            if isinstance(disk, int):
                _link_or_copy(disk, output)
            else:
                place(disk, output)
            return
        out = unnamed(output.parent)
        if out is None:
            _write_named(source, output, fmt, epoch, None if isinstance(disk, int) else disk.parent)
            return
        try:
            _convert(source, out, fmt, epoch)
            link(out, output)
        finally:
            os.close(out)
    except (OSError, CommandError) as err:
        failure = explain(err, output, f"writing {output}")
        if failure is None:
            raise
        raise failure from err


def _convert(source: Path, out: int, fmt: ImageFormat, epoch: int | None) -> None:
    """qcow2 or tar.gz of `source` into the empty file `out`, synced to disk."""
    if fmt is ImageFormat.QCOW2:
        qemu_img = require_tool("qemu-img", "qemu-utils")
        run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(source), str(fd_path(out))])
        if epoch is not None:  # qemu-img leaves preallocated (unwritten) ranges: holes where the content is zero
            mover.sparsify(fd_path(out))
    else:
        tar_gz(source, out, epoch)
    os.fsync(out)
    if epoch is not None:
        os.utime(out, (epoch, epoch))


def _write_named(source: Path, output: Path, fmt: ImageFormat, epoch: int | None, beside: Path | None) -> None:
    """Where no unnamed file can be made: a temporary name in `beside` (else beside the output), renamed."""
    partial = partial_name(output, beside)
    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            _convert(source, fd, fmt, epoch)
        finally:
            os.close(fd)
        place(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _link_or_copy(fd: int, output: Path) -> None:
    """The unnamed file `fd` named `output`; copied (sparse) into a new unnamed file where it cannot be linked
    there (it is on another file system)."""
    try:
        link(fd, output)
        return
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    _copy_into_place(fd, output)


def place(source: Path, output: Path) -> None:
    """Rename `source` to `output`; across file systems (EXDEV), copy it beside `output` first."""
    try:
        os.replace(source, output)
        return
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise _mount_point(output) from err
        if err.errno != errno.EXDEV:
            raise
    with open(source, "rb") as src:
        _copy_into_place(src.fileno(), output)
    source.unlink()


def _copy_into_place(src: int, output: Path) -> None:
    """A sparse copy of file `src` at `output`: written unnamed and linked, or under a temporary name and renamed."""
    fd = unnamed(output.parent)
    if fd is not None:
        try:
            sparse_copy(src, fd)
            link(fd, output)
        finally:
            os.close(fd)
        return
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as dst:
            sparse_copy(src, dst.fileno())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sparse_copy(src: int, dst: int) -> None:
    """Copy file `src` to `dst` (both descriptors), data extents only: holes stay holes."""
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    for offset, length in mover.data_extents(src, 0, size):
        done = 0
        while done < length:
            data = os.pread(src, min(_COPY_CHUNK, length - done), offset + done)
            if not data:
                raise OSError(errno.EIO, f"short read at byte {offset + done}")
            written = 0
            while written < len(data):
                written += os.pwrite(dst, data[written:], offset + done + written)
            done += len(data)
    os.fsync(dst)


def explain(err: BaseException, where: Path, doing: str) -> OutputError | None:
    """One clear error for a full or read-only file system at `where` while `doing`; None for other errors."""
    directory = where if where.is_dir() else where.parent
    code = err.errno if isinstance(err, OSError) else None
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or NO_SPACE in text or os.strerror(errno.EDQUOT) in text:
        return OutputError(
            f"{NO_SPACE} in {directory} while {doing}: free some space there or choose a place on a larger file system"
        )
    if code == errno.EROFS or os.strerror(errno.EROFS) in text:
        return OutputError(
            f"{directory} is on a read-only file system (while {doing}): choose a place on a writable file system"
        )
    return None


def tar_gz(disk: Path, out: Path | int, epoch: int | None = None) -> None:
    """A GCE image archive of `disk` into `out` (a path, or an open empty file): one sparse member named
    disk.raw whatever `disk` is called (a /proc/PID/fd path is followed), owned by root (dated `epoch` when
    set), gzip-compressed."""
    dated = [f"--mtime=@{epoch}"] if epoch is not None else []
    tar = [require_tool("tar", "tar"), "--sparse", "--format=oldgnu", "--owner=0", "--group=0", "--numeric-owner",
           *dated, "--dereference", "--transform=s|.*|disk.raw|", "-C", str(disk.parent), "-cf", "-",
           disk.name]  # fmt: skip
    gzip = compressor()
    with contextlib.ExitStack() as stack:
        target = out if isinstance(out, int) else stack.enter_context(open(out, "wb")).fileno()
        archiver = subprocess.Popen(tar, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_us())
        assert archiver.stdout is not None
        packer = subprocess.Popen(
            gzip, stdin=archiver.stdout, stdout=target, stderr=subprocess.PIPE, preexec_fn=die_with_us()
        )
        archiver.stdout.close()
        _, pack_err = packer.communicate()
        _, tar_err = archiver.communicate()
        # The compressor first: when it fails (a full disk), tar only sees a broken pipe.
        if packer.returncode != 0:
            raise CommandError(gzip, packer.returncode, pack_err.decode(errors="replace"))
        if archiver.returncode != 0:
            raise CommandError(tar, archiver.returncode, tar_err.decode(errors="replace"))
        os.fsync(target)


# The output's lock


@contextlib.contextmanager
def held(output: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold `output` for this process: no other cos-customizer writes it meanwhile.

    The lock is an abstract unix socket (no file: nothing to remove, ever) named after the output's
    directory (device and inode) and its name; the kernel frees the name with the socket when this process
    ends, however it ends. Taken, it fails at once with `busy("pid N")` naming the holder. Abstract names are
    per network namespace: builds in different network namespaces do not see each other's.
    """
    name = lock_name(output)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(name)
            sock.listen(16)  # what a second build connects to, to name the holder
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise OutputError(f"cannot lock -output={output}: {err.strerror}") from err
            holder, uid = _holder(name)
            if uid in (os.geteuid(), 0):
                raise OutputError(busy(holder)) from None
            # Any local user can bind an abstract name: one held by another user (neither ours nor root's) is
            # no build of ours, so it stops nothing. The output is linked into place whole (`link`), so two
            # writers still cannot mix their bytes.
            log.debug("the lock name of %s is held by %s, not by us: ignored", output, holder)
        yield
    finally:
        sock.close()


def lock_name(output: Path) -> str:
    """The abstract socket name of `output`'s lock: the same for every spelling of the path to it."""
    stats = os.stat(output.parent)
    key = f"{stats.st_dev}:{stats.st_ino}/".encode() + os.fsencode(output.name)
    return "\0" + _LOCK_PREFIX + hashlib.sha256(key).hexdigest()


def _holder(name: str) -> tuple[str, int | None]:
    """Who holds the lock `name`: "pid N" (its pid as this process sees it, and its uid if not ours), and its uid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(name)
            pid, uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return "a process that did not answer", None
    who = f"pid {pid}" if pid else "a process of another PID namespace"
    return (who if uid == os.geteuid() else f"{who}, user id {uid}"), uid
