"""`cos-customizer build-provisioner`: the provisioner as one static executable.

COS has no Python, so the provisioner ships as a single file that needs
nothing from the machine it runs on: PyInstaller bundles the interpreter and
the (standard-library-only) provisioner into one executable, then staticx
bundles the C libraries and the loader, so it runs in a chroot holding only
busybox (it needs /proc and a writable /tmp to unpack itself).

Reproducible: PyInstaller runs with SOURCE_DATE_EPOCH and a fixed hash seed,
and staticx's embedded archive gets fixed times and owners, so the same
sources and tools give the same bytes. Builds are cached by a hash of the
sources and tool versions.

Two machines (`Arch`): x86-64 (amd64, the default) and arm64. The other machine's
executable (arm64 on an x86-64 machine) is frozen by the same steps inside a Debian
root of that machine, under qemu-user-static (`provisioner_root`); its cache key adds
the machine and the root. Each machine has its prebuilt (`prebuilt_location`):
$COS_CUSTOMIZER_PROVISIONER or /usr/lib/cos-customizer/provisioner for x86-64,
$COS_CUSTOMIZER_PROVISIONER_ARM64 or /usr/lib/cos-customizer/provisioner-arm64 for
arm64, its manifest recording "arch" ("x86-64" or "arm64"); a prebuilt or a
-provisioner-binary of the other machine is refused with one line.

A prebuilt executable (the step image has one, so a GCE build does not build
it on the Cloud Build worker) is named by $COS_CUSTOMIZER_PROVISIONER, or sits
at /usr/lib/cos-customizer/provisioner. Beside it, `provisioner.json` (its
manifest, written by `python -m cos_customizer.provisioner_build DIR`) records
the package version, the digest of the package's sources it was built from,
and the executable's own sha256. It is used only when all three match this
package and the file: it is checked by reading it, never by running it, and a
stale or altered one is refused with one line, never shipped silently.

What a build ships (`ship`) is read once, through one descriptor, into the
build's own directory, and checked as it is copied: the sha256 compared with
the manifest is that of the copied bytes, so swapping the file after the check
changes nothing that is shipped. The file and its manifest are opened without
blocking and without following a final symlink, must be regular files of
bounded size, and neither they nor any directory on their (resolved) path may
be changed by another user: owned by root or by us, and not writable by every
user (a sticky directory such as /tmp is accepted, as there only the owner of
an entry can rename it, and the entry on the path is checked to be ours or
root's). `-provisioner-binary` (no manifest) is read and copied the same way.
Dry runs make the same checks on the same code path, writing no copy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import cos_customizer
from cos_customizer import provisioner_root
from cos_customizer.arch import ELF_MAGIC, Arch, elf_arch
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run

log = logging.getLogger("cos_customizer")

EPOCH = "1700000000"
MAX_SIZE = 40 << 20
BINARY_MAX_SIZE = 256 << 20  # -provisioner-binary: the user's own build, bounded all the same
MANIFEST_MAX_SIZE = 64 << 10
PREBUILT_ENV = "COS_CUSTOMIZER_PROVISIONER"
PREBUILT_PATH = Path("/usr/lib/cos-customizer/provisioner")
PREBUILT_ENV_ARM64 = "COS_CUSTOMIZER_PROVISIONER_ARM64"
PREBUILT_PATH_ARM64 = Path("/usr/lib/cos-customizer/provisioner-arm64")
MANIFEST_SUFFIX = ".json"  # the manifest of PATH is PATH.json
# A manifest's "arch", and how messages name an executable's machine ("x86-64" as manifests always had it).
ARCH_NAMES = {Arch.AMD64: "x86-64", Arch.ARM64: "arm64"}
ENTRY = "import sys\nfrom cos_customizer.provisioner.main import main\nsys.exit(main())\n"
# Runs staticx with its archive members normalized (times, owners), so the output is reproducible.
STATICX_DRIVER = f"""
import sys, tarfile
from staticx import api
_addfile = tarfile.TarFile.addfile
def addfile(self, tarinfo, fileobj=None):
    tarinfo.mtime = {EPOCH}
    tarinfo.uid = tarinfo.gid = 0
    tarinfo.uname = tarinfo.gname = ""
    return _addfile(self, tarinfo, fileobj)
tarfile.TarFile.addfile = addfile
api.generate(sys.argv[1], sys.argv[2])
"""


def check_toolchain(arch: Arch = Arch.AMD64) -> None:
    """Refuse, in one line, a machine that cannot build the provisioner for `arch`."""
    if arch is not Arch.host():
        _tool_versions()  # the arm64 root's tools are pinned to this Python's
        provisioner_root.check_host(arch)
        return
    if not sys.base_prefix.startswith("/usr"):
        raise ValidationError(
            f"build-provisioner needs Debian's own Python (staticx refuses the interpreter at {sys.base_prefix}): "
            "run it from the virtualenv that scripts/setup makes with /usr/bin/python3"
        )
    _tool_versions()
    require_tool("patchelf", "patchelf")


def _tool_versions() -> dict[str, str]:
    """PyInstaller's and staticx's versions in this Python (a foreign machine's root gets the same)."""
    versions = {}
    for package in ("pyinstaller", "staticx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise ValidationError(
                f"{package} is not installed in this Python: pip install 'cos-customizer[provisioner]' "
                "(scripts/setup does)"
            ) from None
    return versions


def _hash_sources(digest: hashlib._Hash) -> None:
    package = Path(cos_customizer.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())


def package_digest() -> str:
    """The package's own sources (every .py file): what a prebuilt executable's manifest must name."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    return digest.hexdigest()[:32]


def source_digest(arch: Arch = Arch.AMD64, root_identity: str = "") -> str:
    """What the executable depends on: every source file and the tool versions (the cache's key); for
    another machine than this one, also the machine and its build root (`provisioner_root.Root.identity`:
    its key, Python and packages). This machine's key is the same as before there were two."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    for package_name in ("pyinstaller", "staticx"):
        digest.update(f"{package_name}={importlib.metadata.version(package_name)}".encode())
    digest.update(sys.version.encode())
    if arch is not Arch.host():
        digest.update(f"\0arch={arch.debian}\0root={root_identity}".encode())
    return digest.hexdigest()[:32]


def cache_root(environ: dict[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "/root")) / ".cache")
    return Path(base) / "cos-customizer" / "provisioner"


def _freeze_env() -> dict[str, str]:
    """What PyInstaller and staticx run with, for the same bytes from the same sources."""
    return {"SOURCE_DATE_EPOCH": EPOCH, "PYTHONHASHSEED": "0"}


def _freeze_files() -> provisioner_root.FreezeFiles:
    return provisioner_root.FreezeFiles(entry=ENTRY, staticx_driver=STATICX_DRIVER)


def _compile(work: Path) -> Path:
    env = {**os.environ, **_freeze_env()}
    entry = work / "provisioner.py"
    entry.write_text(ENTRY)
    run([sys.executable, "-m", "PyInstaller", "--onefile", "--name", "provisioner", "--noconfirm", "--clean",
         "--log-level", "WARN", "--distpath", str(work / "dist"), "--workpath", str(work / "build"),
         "--specpath", str(work), str(entry)], env=env, cwd=work)  # fmt: skip
    static = work / "provisioner-static"
    run([sys.executable, "-c", STATICX_DRIVER, str(work / "dist" / "provisioner"), str(static)], env=env, cwd=work)
    size = static.stat().st_size
    if size > MAX_SIZE:
        raise CustomizerError(f"the provisioner executable is {size >> 20} MiB, over the {MAX_SIZE >> 20} MiB limit")
    run([str(static), "--help"])  # it must at least start
    return static


def build(output: Path, environ: dict[str, str], *, arch: Arch = Arch.AMD64) -> tuple[Path, bool]:
    """Write the executable for `arch` to `output`; returns (output, whether it came from the cache).

    For this machine's own architecture it is frozen with this Python's PyInstaller and staticx; for the
    other one, inside that machine's Debian build root (`provisioner_root`) under emulation."""
    check_toolchain(arch)
    native = arch is Arch.host()
    root = None if native else provisioner_root.prepare(arch, _tool_versions(), environ)
    cached = cache_root(environ) / source_digest(arch, "" if root is None else root.identity) / "provisioner"
    hit = cached.exists()
    if not hit:
        log.info("Building the %s provisioner executable (PyInstaller, then staticx)...", arch.debian)
        with tempfile.TemporaryDirectory(prefix="cos-customizer-provisioner.") as tmp:
            if root is None:
                static = _compile(Path(tmp))
            else:
                package = Path(cos_customizer.__file__).parent
                static = provisioner_root.freeze(root, package, Path(tmp), _freeze_files(), _freeze_env(), MAX_SIZE)
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(".provisioner.partial")
            shutil.copyfile(static, partial)
            partial.chmod(0o755)
            partial.replace(cached)
    _copy_executable(cached, output)
    return output, hit


def _copy_executable(source: Path, output: Path) -> None:
    partial = output.with_name(f".{output.name}.partial")
    try:
        shutil.copyfile(source, partial)
        partial.chmod(0o755)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_path(binary: Path) -> Path:
    return binary.with_name(binary.name + MANIFEST_SUFFIX)


def manifest(binary: Path, arch: Arch = Arch.AMD64) -> dict[str, str]:
    """The manifest of `binary` as this package writes it: version, sources digest, the file's sha256, and
    its machine (`ARCH_NAMES`: "x86-64", as every manifest had it, or "arm64")."""
    return {
        "cos_customizer": cos_customizer.__version__,
        "sources": package_digest(),
        "sha256": _file_sha256(binary),
        "arch": ARCH_NAMES[arch],
    }


def prebuilt_location(arch: Arch = Arch.AMD64) -> tuple[str, Path]:
    """(the environment variable naming the prebuilt provisioner for `arch`, its default path)."""
    if arch is Arch.ARM64:
        return PREBUILT_ENV_ARM64, PREBUILT_PATH_ARM64
    return PREBUILT_ENV, PREBUILT_PATH


def binary_name(arch: Arch = Arch.AMD64) -> str:
    """The executable's file name in a directory holding both (`install`, the step image)."""
    return "provisioner" if arch is Arch.AMD64 else f"provisioner-{arch.debian}"


# Opens never block (a FIFO), never follow a final symlink, and are not kept by children.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_KEEP_APART = "keep it in directories only root or you can write"


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_file(fd: int, subject: str, limit: int, *, kind: str = "a regular file", hint: str = "") -> str:
    """The checks every file we read makes before reading it: a regular file (executable where `kind` says
    so), at most `limit` bytes, no other user able to change it. Returns the "over the limit" message for the
    read that follows; `hint` ends each message."""
    info = os.fstat(fd)
    executable = kind != "a regular file"
    if not stat.S_ISREG(info.st_mode) or (executable and not info.st_mode & stat.S_IXUSR):
        raise ValidationError(f"{subject} is not {kind}{hint}")
    unit, shift = ("KiB", 10) if limit < 1 << 20 else ("MiB", 20)
    over = f"{subject} is over the {limit >> shift} {unit} limit{hint}"
    if info.st_size > limit:
        raise ValidationError(over)
    problem = _file_problem(info)
    if problem:
        raise ValidationError(f"{subject} {problem}")
    return over


def _file_problem(info: os.stat_result) -> str | None:
    """Why another user could change this file, or None."""
    if not _trusted(info.st_uid):
        return f"belongs to uid {info.st_uid}, who could change it: use a copy owned by root or you"
    if info.st_mode & stat.S_IWOTH:
        return "is writable by every user, so anyone could change it: chmod o-w it"
    return None


def _open_directory(directory: str, subject: str) -> int:
    """`directory` (absolute, resolved) opened from / one component at a time, following no symlink.

    Refused when another user could swap what it holds: a directory on the way belongs to a user other
    than root or us, or every user can write it and it is not sticky (in a sticky one only an entry's
    owner can rename it, and each entry on the way is checked to be root's or ours).
    """
    fd = os.open("/", _DIR_FLAGS)
    where = "/"
    try:
        for part in [*Path(directory).parts[1:], ""]:
            info = os.fstat(fd)
            if not _trusted(info.st_uid):
                raise ValidationError(
                    f"{subject} is in {where}, which belongs to uid {info.st_uid}, who could swap the file: "
                    + _KEEP_APART
                )
            if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
                raise ValidationError(
                    f"{subject} is in {where}, which every user can write, so anyone could swap the file: "
                    + _KEEP_APART
                )
            if not part:
                return fd
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, where = child, os.path.join(where, part)
    except BaseException:
        os.close(fd)
        raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _opened(path: Path, subject: str, unreadable: Callable[[OSError], str]) -> Iterator[tuple[int, int, Path]]:
    """(its directory's descriptor, its descriptor, its resolved path) for `path`, symlinks resolved first."""
    resolved = Path(os.path.realpath(path))
    try:
        dir_fd = _open_directory(str(resolved.parent), subject)
    except OSError as err:
        raise ValidationError(unreadable(err)) from err
    try:
        try:
            fd = os.open(resolved.name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as err:
            raise ValidationError(unreadable(err)) from err
        try:
            yield dir_fd, fd, resolved
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _copy_to(into: Path | None) -> Iterator[BinaryIO | None]:
    """A new executable file `into` (none: a check that copies nothing), removed unless the block succeeds."""
    if into is None:
        yield None
        return
    try:
        fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
    except OSError as err:
        raise CustomizerError(f"cannot write the provisioner executable {into}: {err.strerror}") from err
    done = False
    try:
        with open(fd, "wb") as sink:
            os.fchmod(fd, 0o755)
            yield sink
        done = True
    finally:
        if not done:
            into.unlink(missing_ok=True)


def _stream(fd: int, limit: int, sink: BinaryIO | None, over: str) -> tuple[str, bytes]:
    """(sha256, first 20 bytes) of what is read from `fd` and written to `sink`: the same bytes."""
    digest, head, total = hashlib.sha256(), b"", 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > limit:
            raise ValidationError(over)
        head += chunk[: max(0, 20 - len(head))]
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), head


def _read_manifest(dir_fd: int, path: Path, where: str, arch: Arch) -> object:
    """The manifest `path` (in the directory `dir_fd`) as JSON: a regular file of at most MANIFEST_MAX_SIZE."""
    subject = f"the prebuilt provisioner's manifest {path}"
    remake = _remake(arch)
    try:
        fd = os.open(path.name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        raise ValidationError(
            f"the prebuilt provisioner {where} has no readable manifest {path} ({err.strerror}): {remake}"
        ) from err
    try:
        too_big = _check_file(fd, subject, MANIFEST_MAX_SIZE, hint=f": {remake}")
        data = os.read(fd, MANIFEST_MAX_SIZE + 1)
        if len(data) > MANIFEST_MAX_SIZE:
            raise ValidationError(too_big)
    finally:
        os.close(fd)
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValidationError(f"{subject} is not JSON") from err


def _take_prebuilt(binary: Path, how: str, into: Path | None, arch: Arch) -> None:
    """Check the prebuilt `binary` (`check_prebuilt`), copying the bytes checked into `into` when given."""
    where = f"{binary} ({how})"
    subject = f"the prebuilt provisioner {where}"
    with (
        _opened(binary, subject, lambda err: f"{subject} cannot be read: {err.strerror}") as (dir_fd, fd, resolved),
        _copy_to(into) as sink,
    ):
        over = _check_file(fd, subject, MAX_SIZE, kind="an executable file")
        sha256, header = _stream(fd, MAX_SIZE, sink, over)
        if elf_arch(header) is not arch:
            raise ValidationError(f"{subject} is not an {ARCH_NAMES[arch]} ELF executable")
        recorded_path = manifest_path(resolved)
        recorded = _read_manifest(dir_fd, recorded_path, where, arch)
        if not isinstance(recorded, dict) or not all(
            isinstance(recorded.get(key), str) for key in ("cos_customizer", "sources", "sha256")
        ):
            raise ValidationError(
                f"the prebuilt provisioner's manifest {recorded_path} lacks cos_customizer, sources or sha256"
            )
        recorded_arch = recorded.get("arch", ARCH_NAMES[Arch.AMD64])
        if recorded_arch != ARCH_NAMES[arch]:
            raise ValidationError(
                f"{subject} is recorded as built for {str(recorded_arch)[:32]!r} by its manifest {recorded_path}, "
                f"not {ARCH_NAMES[arch]}: {_remake(arch)}"
            )
        version, sources = cos_customizer.__version__, package_digest()
        if (recorded["cos_customizer"], recorded["sources"]) != (version, sources):
            raise ValidationError(
                f"{subject} is stale: built from cos-customizer {recorded['cos_customizer']} "
                f"(sources {recorded['sources'][:12]}), this is {version} (sources {sources[:12]}): rebuild it with "
                f"python -m cos_customizer.provisioner_build{_arch_flag(arch)} DIR (or rebuild the step image)"
            )
        if sha256 != recorded["sha256"]:
            raise ValidationError(f"{subject} is not the file its manifest {recorded_path} describes (sha256 differs)")


def _arch_flag(arch: Arch) -> str:
    """The -arch flag that asks for `arch` (none for amd64, the default)."""
    return "" if arch is Arch.AMD64 else f" -arch={arch.debian}"


def _remake(arch: Arch) -> str:
    return f"make both with python -m cos_customizer.provisioner_build{_arch_flag(arch)} DIR"


def check_prebuilt(binary: Path, how: str, *, arch: Arch = Arch.AMD64) -> Path:
    """`binary` if it is a prebuilt provisioner for `arch` made from this very package; else one
    ValidationError line.

    Only reads: the file (a regular executable ELF of `arch` of at most MAX_SIZE that no other user can
    change), its manifest (whose "arch" must be `arch`'s; a manifest without one is x86-64's), and this
    package's sources. `how` says how it was chosen, for the message. A build ships a copy checked the
    same way as it is made (`ship`), never the file checked here.
    """
    _take_prebuilt(binary, how, None, arch)
    return binary


def _take_binary(binary: Path, into: Path | None, arch: Arch) -> None:
    """Check -provisioner-binary's file (no manifest: a regular file no other user can change, of bounded
    size; an ELF file must be for `arch`, and for arm64 it must be an ELF file), copying what was read
    into `into` when given."""
    subject = f"-provisioner-binary={binary}"

    def unreadable(err: OSError) -> str:
        return f"{subject}: no such file" if err.errno == errno.ENOENT else f"{subject} cannot be read: {err.strerror}"

    with _opened(binary, subject, unreadable) as (_, fd, _), _copy_to(into) as sink:
        _, header = _stream(fd, BINARY_MAX_SIZE, sink, _check_file(fd, subject, BINARY_MAX_SIZE))
        problem = binary_arch_problem(header, arch)
        if problem:
            raise ValidationError(f"{subject} {problem}")


def binary_arch_problem(header: bytes, arch: Arch) -> str | None:
    """Why an executable starting with `header` (its first 20 bytes) cannot be the provisioner of a source
    image of `arch`, or None. For x86-64 only an ELF header of the other machine is refused: any other file
    is left to the user (as it always was)."""
    found = elf_arch(header)
    if found is arch or (arch is Arch.AMD64 and found is None):
        return None
    if found is not None:
        what = f"an {ARCH_NAMES[found]} ELF executable"
    elif header.startswith(ELF_MAGIC):
        what = "an ELF executable for another machine"
    else:
        what = "not an ELF executable"
    return (
        f"is {what}, and the source image is {arch.debian}: give a provisioner built for {arch.debian} "
        f"(cos-customizer build-provisioner{_arch_flag(arch)})"
    )


def check_binary(binary: Path, *, arch: Arch = Arch.AMD64) -> Path:
    """`binary` (-provisioner-binary, absolute) if a build of a source image of `arch` can ship it,
    checked as `ship` checks it."""
    _take_binary(binary, None, arch)
    return binary


def _choose(environ: Mapping[str, str], default: Path | None, arch: Arch) -> tuple[Path, str] | None:
    """The prebuilt provisioner for `arch` named (its variable, `prebuilt_location`; else `default`, by
    default the arch's fixed path, when it exists) and how; not checked."""
    variable, fixed = prebuilt_location(arch)
    named = environ.get(variable, "")
    if named:
        return Path(os.path.abspath(named)), f"${variable}"
    default = fixed if default is None else default
    if os.path.lexists(default):
        return default, "the prebuilt default"
    return None


def prebuilt(environ: Mapping[str, str], default: Path | None = None, *, arch: Arch = Arch.AMD64) -> Path | None:
    """The prebuilt provisioner for `arch` to use, checked (`check_prebuilt`), or None when there is none.

    ${PREBUILT_ENV} (${PREBUILT_ENV_ARM64} for arm64) names one (it must then exist); else `default` (by
    default PREBUILT_PATH, or PREBUILT_PATH_ARM64) is used when it exists.
    """
    chosen = _choose(environ, default, arch)
    return None if chosen is None else check_prebuilt(*chosen, arch=arch)


def check_choice(
    binary: Path | None, environ: Mapping[str, str], default: Path | None = None, *, arch: Arch = Arch.AMD64
) -> Path | None:
    """What `ship` would copy, checked as `ship` checks it, copying nothing (dry runs, early refusals):
    `binary` (-provisioner-binary), else the prebuilt provisioner; None when the build makes its own."""
    return check_binary(binary, arch=arch) if binary is not None else prebuilt(environ, default, arch=arch)


def ship(
    into: Path, binary: Path | None, environ: Mapping[str, str], default: Path | None = None, *, arch: Arch = Arch.AMD64
) -> Path | None:
    """The provisioner executable a build of a source image of `arch` puts on CIDATA: `into` (a new file in
    the build's own directory), a copy of `binary` (-provisioner-binary) or of the prebuilt provisioner made
    through one descriptor and checked as it is made; None when there is neither (the build makes its own
    with `build`)."""
    if binary is not None:
        _take_binary(binary, into, arch)
        return into
    chosen = _choose(environ, default, arch)
    if chosen is None:
        return None
    _take_prebuilt(*chosen, into, arch)
    return into


def provide(
    output: Path, environ: Mapping[str, str], default: Path | None = None, *, arch: Arch = Arch.AMD64
) -> tuple[Path, str]:
    """The provisioner executable for `arch` written to `output`: the prebuilt one if there is one, else
    `build`'s.

    Returns (output, where it came from: "prebuilt PATH", "from the cache" or "built").
    """
    chosen = _choose(environ, default, arch)
    if chosen is None:
        path, hit = build(output, dict(environ), arch=arch)
        return path, "from the cache" if hit else "built"
    partial = output.with_name(f".{output.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        _take_prebuilt(*chosen, partial, arch)  # the checked bytes are those written
        log.info("Using the prebuilt provisioner %s (cos-customizer %s)", chosen[0], cos_customizer.__version__)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return output, f"prebuilt {chosen[0]}"


def install(directory: Path, environ: Mapping[str, str], *, arch: Arch = Arch.AMD64) -> Path:
    """Build the executable for `arch` into `directory` (`binary_name`: provisioner, provisioner-arm64)
    with its manifest beside it (for images)."""
    binary = directory / binary_name(arch)
    build(binary, dict(environ), arch=arch)
    document = json.dumps(manifest(binary, arch), indent=2, sort_keys=True) + "\n"
    partial = directory / f".{binary.name}{MANIFEST_SUFFIX}.partial"
    partial.write_text(document)
    partial.replace(manifest_path(binary))
    return binary


USAGE = "usage: python -m cos_customizer.provisioner_build [-arch=amd64|arm64] DIR\n"


def main(argv: list[str] | None = None) -> int:
    """python -m cos_customizer.provisioner_build [-arch=ARCH] DIR: build DIR/provisioner and
    DIR/provisioner.json (amd64, the default), or DIR/provisioner-arm64 and DIR/provisioner-arm64.json."""
    args = sys.argv[1:] if argv is None else argv
    arch = Arch.AMD64
    if args and args[0].startswith(("-arch=", "--arch=")):
        try:
            arch = Arch.parse(args[0].split("=", 1)[1])
        except ValueError as err:
            sys.stderr.write(f"error: {err}\n{USAGE}")
            return 2
        args = args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write(USAGE)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = Path(args[0]).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        binary = install(directory, os.environ, arch=arch)
        check_prebuilt(binary, "just built", arch=arch)
    except CustomizerError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"{binary}\n{manifest_path(binary)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
