"""The build context: the user's directory (or file) archived at start.

The archive is a plain tar whose member names are relative to the context
(`run.sh`, `lib/`, `lib/mylib.sh`) as in the Go original. File modes are
kept and symlinks are stored as links, never followed.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Collection, Iterator
from pathlib import Path

from cos_customizer.errors import CustomizerError, ValidationError, shown


def create_archive(source: Path, destination: Path, exclude: Collection[Path] = ()) -> int:
    """Archive `source` (a directory or a regular file) into `destination`.

    Paths in `exclude` (the workspace) are left out if they lie inside the
    context. Returns the number of members written.
    """
    if not source.exists() and not source.is_symlink():
        raise ValidationError(
            f"build context {shown(source)} does not exist: pass -build-context=DIR, "
            "the directory holding your scripts and files"
        )
    if not (source.is_dir() or source.is_file()):
        raise ValidationError(f"build context {shown(source)} is neither a directory nor a regular file")
    excluded = {path.resolve() for path in exclude}
    count = 0
    try:
        with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as tar:
            if source.is_file():
                tar.add(source, arcname=source.name, recursive=False)
                return 1
            for path in _walk(source, excluded):
                tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
                count += 1
    except OSError as err:
        raise CustomizerError(f"cannot archive build context {shown(source)}: {err.strerror or err}") from err
    return count


def _walk(root: Path, excluded: set[Path]) -> Iterator[Path]:
    """Every entry below `root` in a stable order, without following links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            path = base / name
            if path.resolve() in excluded:
                continue
            yield path
            if not path.is_symlink():
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            yield base / name


def normalize_member(path: str, flag: str) -> str:
    """The archive member name for a user-given path inside the context."""
    if not path:
        raise ValidationError(f"{flag} must be set")
    if path.startswith("/"):
        raise ValidationError(f"{flag}={shown(path)}: give a path relative to the build context, not an absolute path")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise ValidationError(f"{flag}={shown(path)}: the path leaves the build context")
    return normal


def find_member(archive: Path, name: str) -> tarfile.TarInfo | None:
    """The archive's entry for `name` (a file, link or directory), if any.

    The archive is the plain tar start-image-build wrote: it is opened as one (mode "r:"), so a damaged one
    is one error, not one per compression method tried.
    """
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                if member.name.rstrip("/") == name:
                    return member
                if name == "." or member.name.startswith(name + "/"):
                    return _implicit_dir(name)
    except (OSError, tarfile.TarError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())
        raise CustomizerError(
            f"cannot read the build context archive {shown(archive)} ({detail or type(err).__name__}): "
            "run start-image-build again"
        ) from err
    return None


def _implicit_dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
