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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
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
        if not self.root.is_dir():
            return contextlib.nullcontext()  # nothing to hold: require() says what is missing
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
        shutil.rmtree(self.root, ignore_errors=True)


def create(root: Path, fill: Callable[[Workspace], None]) -> Workspace:
    """Make a fresh workspace at `root`, replacing any previous one.

    `fill` writes the new workspace's files; it works in a staging
    directory beside `root`, so a failure leaves the previous workspace as
    it was.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.new.", dir=root.parent))
    try:
        fill(Workspace(staging))
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            os.replace(root, old / "workspace")
            os.replace(staging, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Workspace(root)
