"""The local workspace that carries a build from step to step.

Layout (as in the Go original):

    config/source_image      JSON, the source image
    config/build             JSON, the build config
    config/provisioner       JSON, the provisioner config
    user_build_context.tar   the build context archive

Every write is atomic (temporary file, fsync, rename), so a crash never
leaves a half-written config; `start-image-build` builds a new workspace
beside the old one and swaps it in.

A command that changes or consumes the workspace (`start-image-build`,
`finish-image-build`) holds an exclusive flock on `.cos-customizer.lock`
inside it for its whole run; a second one fails at once naming the holder.

Only a workspace this tool made is ever replaced or removed: a directory the
tool created, owned by this user, holding the marker `.cos-customizer-workspace`
(a regular file, not a link, with a fixed text). Anything else given as the
workspace is refused with one line and left as it is; an empty directory is
taken over (replaced by the tool's own). Even in a marked workspace only the
files the layout names are removed, through directory descriptors that never
follow a link, and the directory itself only once it is empty: whatever a user
put there stays, named in one line.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic

from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import ConfigError, CustomizerError, WorkspaceError
from cos_customizer.provisioner.config import ProvisionerConfig

DEFAULT_WORKDIR = ".cos-customizer-workdir"
WORKDIR_ENV = "COS_CUSTOMIZER_WORKDIR"

SOURCE_IMAGE = "config/source_image"
BUILD = "config/build"
PROVISIONER = "config/provisioner"
BUILD_CONTEXT_ARCHIVE = "user_build_context.tar"
LOCK = ".cos-customizer.lock"
MARKER = ".cos-customizer-workspace"
MARKER_TEXT = (
    b"cos-customizer workspace: made by start-image-build, which replaces it; finish-image-build removes it.\n"
)
CONFIG = "config"
CONFIG_FILES = frozenset(Path(name).name for name in (SOURCE_IMAGE, BUILD, PROVISIONER))
# write_json_atomic's temporary files, left in config/ by a crash.
_CONFIG_TEMPORARY = re.compile(r"\.(?:source_image|build|provisioner)\..+\.tmp")
# The entries of a workspace's top directory, all regular files but config/.
TOP_FILES = frozenset({BUILD_CONTEXT_ARCHIVE, LOCK, MARKER})

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_root(flag_value: str | None, environ: Mapping[str, str]) -> Path:
    """The workspace directory: the flag, else $COS_CUSTOMIZER_WORKDIR, else the default.

    Relative names are under $HOME, absolute ones are used as they are.
    """
    name = flag_value if flag_value is not None else environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR
    path = Path(name)
    if path.is_absolute():
        return path
    home = environ.get("HOME")
    if not home:
        raise WorkspaceError(
            f"HOME is not set, so the workspace {name} has no place: set HOME or pass an absolute path"
        )
    return Path(home) / path


def contains(root: Path, path: Path) -> bool:
    """Whether `path` is `root` or lies inside it, both resolved (every symlink followed)."""
    real_root, real = root.resolve(), path.resolve()
    return real == real_root or real.is_relative_to(real_root)


@contextlib.contextmanager
def hold_lock(path: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path` (made if needed, removed at the end).

    Fails at once, with `busy("pid N")` as the message, when another process holds it. The file
    holds the holder's pid. Removing it at the end is safe: a process that opened the old file
    finds, once it has the lock, that the name no longer leads to that file, and starts over.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            mapped = _write_error(path, err)
            if mapped is not err:
                raise mapped from err
            raise CustomizerError(f"cannot make the lock file {path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else ""
            os.close(fd)
            if holder:
                raise WorkspaceError(busy(holder)) from None
            raise CustomizerError(f"cannot lock {path}: {err.strerror}") from err
        if _same_file(path, fd):
            break
        os.close(fd)  # the previous holder removed it between our open and our lock
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise _write_error(path, err) from err
        yield
    finally:
        if _same_file(path, fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """ "pid N" of the process that holds the lock on `fd` (it writes its pid right after locking)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.05)
    return "pid unknown"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so readers see the old or the new file, never a mix.

    A full or read-only file system, or a path through a regular file, is one clear WorkspaceError.
    """
    try:
        _write_json_atomic(path, data)
    except OSError as err:
        raise _write_error(path, err) from err


def _write_error(path: Path, err: OSError) -> Exception:
    """One clear line for a workspace file the file system refuses (full, read-only, a file in the path)."""
    why = {
        errno.ENOSPC: "free some space there",
        errno.EDQUOT: "free some space there",
        errno.EROFS: "make it writable",
        errno.ENOTDIR: "a part of its path is a regular file, not a directory",
        errno.EEXIST: "a part of its path is a regular file, not a directory",
    }.get(err.errno or 0)
    if why is None:
        return err
    return WorkspaceError(
        f"cannot write the workspace file {path}: {os.strerror(err.errno or 0)}; {why}, "
        "or choose another -local-state-workdir, and run the step again"
    )


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, sort_keys=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def source_image_path(self) -> Path:
        return self.root / SOURCE_IMAGE

    @property
    def build_path(self) -> Path:
        return self.root / BUILD

    @property
    def provisioner_path(self) -> Path:
        return self.root / PROVISIONER

    @property
    def build_context_archive(self) -> Path:
        return self.root / BUILD_CONTEXT_ARCHIVE

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK

    def lock(self) -> AbstractContextManager[None]:
        """Hold the workspace for this command; another command holding it makes this one fail at once."""
        if not (self.root / MARKER).is_file() and not self.source_image_path.is_file():
            return contextlib.nullcontext()  # not a workspace: nothing to hold; require() says what is missing
        return hold_lock(
            self.lock_path,
            lambda holder: (
                f"the workspace {self.root} is in use by another cos-customizer ({holder}): wait for "
                "it to finish, or give this build its own -local-state-workdir"
            ),
        )

    # Reading

    def require(self) -> None:
        """Fail with a clear message unless a build has been started here."""
        if not self.root.is_dir():
            raise WorkspaceError(f"no image build in progress in {self.root}: run start-image-build first")
        for path in (self.source_image_path, self.build_path, self.provisioner_path, self.build_context_archive):
            if not path.is_file():
                raise WorkspaceError(
                    f"the workspace {self.root} is incomplete ({path.relative_to(self.root)} is missing): "
                    "run start-image-build again"
                )

    def _load(self, path: Path, parse: Callable[[Any], T]) -> T:
        self.require()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise self._corrupted(path, "not UTF-8 text") from err
        except json.JSONDecodeError as err:
            raise self._corrupted(path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
        except OSError as err:
            raise WorkspaceError(f"cannot read {path}: {err.strerror}") from err
        try:
            return parse(data)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            raise self._corrupted(path, f"{where}: {first['msg']}") from err
        except ConfigError as err:
            raise self._corrupted(path, str(err)) from err

    def _corrupted(self, path: Path, why: str) -> WorkspaceError:
        return WorkspaceError(
            f"the workspace file {path} is corrupted ({why}): run start-image-build again to start a fresh build"
        )

    def source_image(self) -> SourceImage:
        return self._load(self.source_image_path, SourceImage.model_validate)

    def build(self) -> BuildConfig:
        return self._load(self.build_path, BuildConfig.model_validate)

    def provisioner(self) -> ProvisionerConfig:
        return self._load(
            self.provisioner_path, lambda data: ProvisionerConfig.from_json(data, "the provisioner config")
        )

    # Writing

    def save_build(self, build: BuildConfig) -> None:
        write_json_atomic(self.build_path, build.model_dump(mode="json"))

    def save_provisioner(self, config: ProvisionerConfig) -> None:
        write_json_atomic(self.provisioner_path, config.to_json())

    def remove(self) -> None:
        """Remove this workspace if this tool made it: its own files, then the directory once empty.

        Never fails (finish-image-build calls it whatever happened): what is left, and why, is one note.
        """
        left = _remove_own(self.root.parent, self.root.name)
        if left:
            log.warning("note: left the workspace %s: %s", self.root, left)


class Existing(enum.Enum):
    """What start-image-build finds where the new workspace goes."""

    NOTHING = "nothing"
    EMPTY = "an empty directory"
    WORKSPACE = "a workspace this tool made"


def check_replaceable(root: Path, home: str | None = None) -> Existing:
    """What is at `root`, refusing (one WorkspaceError line) all but nothing, an empty directory, or a
    workspace this tool made that holds only its own files. `home` ($HOME) is never a workspace."""
    if home and os.path.realpath(root) == os.path.realpath(home):
        raise WorkspaceError(
            f"the workspace {root} is your home directory: a relative -local-state-workdir is under $HOME; "
            f"name a directory of its own, such as {Path(home) / DEFAULT_WORKDIR} (the default)"
        )
    try:
        info = os.lstat(root)
    except (FileNotFoundError, NotADirectoryError):
        return Existing.NOTHING  # making it says what is in the way
    if stat.S_ISLNK(info.st_mode):
        raise WorkspaceError(
            f"the workspace {root} is a symbolic link, and cos-customizer never replaces or removes through a "
            "link: give the directory itself, or a new one, as -local-state-workdir"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise WorkspaceError(f"the workspace {root} is not a directory: choose another -local-state-workdir")
    fd = _open_directory(root)
    try:
        names = os.listdir(fd)
        if not names:
            if root.parent != root and os.stat(root.parent).st_dev != info.st_dev:
                raise WorkspaceError(
                    f"the workspace {root} is a mount point, and start-image-build replaces the workspace's "
                    "directory: give a directory inside it as -local-state-workdir"
                )
            return Existing.EMPTY
        if not _marked(fd):
            raise WorkspaceError(
                f"the workspace {root} is not empty and not one cos-customizer made (it has no {MARKER} of its "
                "own), and cos-customizer replaces and removes only its own: give a new or empty directory as "
                "-local-state-workdir"
            )
        foreign = _foreign(fd, names)
    finally:
        os.close(fd)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise WorkspaceError(
            f"the workspace {root} holds {shown}, which cos-customizer did not put there and start-image-build "
            "would remove: move it out of the workspace, or choose another -local-state-workdir"
        )
    return Existing.WORKSPACE


def _open_directory(path: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of the directory `path` (its last part never a link: ELOOP or ENOTDIR then)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _marked(fd: int) -> bool:
    """Whether the directory open as `fd` is a workspace this tool made: owned by this user and holding the
    marker, a regular file of this user (no link, one name) with the fixed text."""
    if os.fstat(fd).st_uid != os.geteuid():
        return False
    try:
        marker = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        info = os.fstat(marker)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
            return False
        return os.pread(marker, len(MARKER_TEXT) + 1, 0) == MARKER_TEXT
    finally:
        os.close(marker)


def _is_file(fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _own_config_file(config_fd: int, name: str) -> bool:
    return (name in CONFIG_FILES or bool(_CONFIG_TEMPORARY.fullmatch(name))) and _is_file(config_fd, name)


def _foreign(fd: int, names: list[str]) -> list[str]:
    """The entries of the workspace open as `fd` (its top-level `names`) that the tool does not write, sorted."""
    foreign = []
    for name in sorted(names):
        if name == CONFIG and stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            config = _open_directory(CONFIG, fd)
            try:
                foreign += [f"{CONFIG}/{n}" for n in sorted(os.listdir(config)) if not _own_config_file(config, n)]
            finally:
                os.close(config)
        elif name not in TOP_FILES or not _is_file(fd, name):
            foreign.append(name)
    return foreign


def _remove_own(parent: Path, name: str) -> str:
    """Remove the workspace `parent/name` if this tool made it; "" once it is gone, else why something is left.

    Only the files the layout names go, through descriptors (never following a link), the marker last and the
    directories only once empty (rmdir): a link, a mount or a user's file in it are never reached. Never
    fails: it runs at the end of a build, whatever happened.
    """
    try:
        return _remove_own_at(parent, name)
    except OSError as err:
        return f"cannot remove it: {err.strerror or err}"


def _remove_own_at(parent: Path, name: str) -> str:
    try:
        parent_fd = _open_directory(parent)
    except FileNotFoundError:
        return ""
    try:
        try:
            fd = _open_directory(name, parent_fd)
        except FileNotFoundError:
            return ""
        except OSError:
            return "it is not a directory cos-customizer made, so nothing was removed"
        try:
            if not _marked(fd):
                return f"it is not a workspace this cos-customizer made (no {MARKER} of its own); nothing was removed"
            left = _remove_own_files(fd)
        finally:
            os.close(fd)
        if left:
            return f"it holds {', '.join(left)}, which cos-customizer did not make; only its own files were removed"
        os.rmdir(name, dir_fd=parent_fd)
        return ""
    finally:
        os.close(parent_fd)


def _remove_own_files(fd: int) -> list[str]:
    """Unlink the workspace's own files in the directory open as `fd`; returns the entries left that it did not
    make. The marker goes only when nothing else is left, so a workspace with a user's file stays marked."""
    if CONFIG in os.listdir(fd):
        with contextlib.suppress(OSError):  # a link or a user's file there: left, and named below
            config = _open_directory(CONFIG, fd)
            try:
                for name in os.listdir(config):
                    if _own_config_file(config, name):
                        os.unlink(name, dir_fd=config)
            finally:
                os.close(config)
            os.rmdir(CONFIG, dir_fd=fd)  # only when empty
    for name in (BUILD_CONTEXT_ARCHIVE, LOCK):
        if _is_file(fd, name):
            os.unlink(name, dir_fd=fd)
    left = _foreign(fd, [name for name in os.listdir(fd) if name != MARKER])
    if not left:
        os.unlink(MARKER, dir_fd=fd)
    return left


def _mark(directory: Path) -> None:
    """Write the marker into a directory this tool just made."""
    path = directory / MARKER
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, MARKER_TEXT)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from err


def create(root: Path, fill: Callable[[Workspace], None], home: str | None = None) -> Workspace:
    """Make a fresh workspace at `root`, replacing a previous one this tool made (see `check_replaceable`).

    `fill` writes the new workspace's files; it works in a staging directory of the tool's own beside `root`,
    so a failure leaves the previous workspace as it was. The new one is marked and renamed into place: onto
    nothing or an empty directory (the kernel refuses the rename onto anything else), or swapped with the
    previous workspace, which is then removed as `Workspace.remove` does.
    """
    existing = check_replaceable(root, home)
    root = _located(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.new.", dir=root.parent))
    try:
        fill(Workspace(staging))
        _mark(staging)
        if existing is Existing.WORKSPACE:
            _swap(root, staging)
        else:
            try:
                os.rename(staging, root)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise _changed(root) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Workspace(root)


def _located(root: Path) -> Path:
    """`root` with its parent resolved (links and '..' followed) and its last part kept as it is: moving the
    workspace aside then cannot change what the other paths name (as it did for ws/../ws)."""
    if root.name in ("", ".", ".."):
        return Path(os.path.realpath(root))
    return Path(os.path.realpath(root.parent)) / root.name


def _changed(root: Path) -> WorkspaceError:
    return WorkspaceError(
        f"the workspace {root} changed while start-image-build ran; it was left as it is: run it again"
    )


def _swap(root: Path, staging: Path) -> None:
    """Put `staging` in place of the workspace `root` (checked to be one this tool made) and remove the old one."""
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
    moved = old / "workspace"
    os.rename(root, moved)
    fd = _open_directory(moved)
    try:
        ours = _marked(fd)
    finally:
        os.close(fd)
    if not ours:  # another directory took its name since it was checked: put that one back, untouched
        os.rename(moved, root)
        os.rmdir(old)
        raise _changed(root)
    try:
        os.rename(staging, root)
    except BaseException:
        os.rename(moved, root)
        os.rmdir(old)
        raise
    left = _remove_own(old, "workspace")
    if left:
        log.warning("note: left the previous workspace as %s: %s", moved, left)
    else:
        os.rmdir(old)
