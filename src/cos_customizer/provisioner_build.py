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

A prebuilt executable (the step image has one, so a GCE build does not build
it on the Cloud Build worker) is named by $COS_CUSTOMIZER_PROVISIONER, or sits
at /usr/lib/cos-customizer/provisioner. Beside it, `provisioner.json` (its
manifest, written by `python -m cos_customizer.provisioner_build DIR`) records
the package version, the digest of the package's sources it was built from,
and the executable's own sha256. It is used only when all three match this
package and the file: it is checked by reading it, never by running it, and a
stale or altered one is refused with one line, never shipped silently.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import cos_customizer
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run

log = logging.getLogger("cos_customizer")

EPOCH = "1700000000"
MAX_SIZE = 40 << 20
PREBUILT_ENV = "COS_CUSTOMIZER_PROVISIONER"
PREBUILT_PATH = Path("/usr/lib/cos-customizer/provisioner")
MANIFEST_SUFFIX = ".json"  # the manifest of PATH is PATH.json
ELF_X86_64 = (b"\x7fELF\x02\x01", 62)  # 64-bit little-endian ELF, e_machine EM_X86_64
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


def check_toolchain() -> None:
    if not sys.base_prefix.startswith("/usr"):
        raise ValidationError(
            f"build-provisioner needs Debian's own Python (staticx refuses the interpreter at {sys.base_prefix}): "
            "run it from the virtualenv that scripts/setup makes with /usr/bin/python3"
        )
    for package in ("pyinstaller", "staticx"):
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise ValidationError(
                f"{package} is not installed in this Python: pip install 'cos-customizer[provisioner]' "
                "(scripts/setup does)"
            ) from None
    require_tool("patchelf", "patchelf")


def _hash_sources(digest: hashlib._Hash) -> None:
    package = Path(cos_customizer.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())


def package_digest() -> str:
    """The package's own sources (every .py file): what a prebuilt executable's manifest must name."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    return digest.hexdigest()[:32]


def source_digest() -> str:
    """What the executable depends on: every source file and the tool versions (the cache's key)."""
    digest = hashlib.sha256()
    _hash_sources(digest)
    for package_name in ("pyinstaller", "staticx"):
        digest.update(f"{package_name}={importlib.metadata.version(package_name)}".encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:32]


def cache_root(environ: dict[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "/root")) / ".cache")
    return Path(base) / "cos-customizer" / "provisioner"


def _compile(work: Path) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONHASHSEED": "0"}
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


def build(output: Path, environ: dict[str, str]) -> tuple[Path, bool]:
    """Write the executable to `output`; returns (output, whether it came from the cache)."""
    check_toolchain()
    cached = cache_root(environ) / source_digest() / "provisioner"
    hit = cached.exists()
    if not hit:
        log.info("Building the provisioner executable (PyInstaller, then staticx)...")
        with tempfile.TemporaryDirectory(prefix="cos-customizer-provisioner.") as tmp:
            static = _compile(Path(tmp))
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


def manifest(binary: Path) -> dict[str, str]:
    """The manifest of `binary` as this package writes it: version, sources digest, the file's sha256."""
    return {
        "cos_customizer": cos_customizer.__version__,
        "sources": package_digest(),
        "sha256": _file_sha256(binary),
        "arch": "x86-64",
    }


def check_prebuilt(binary: Path, how: str) -> Path:
    """`binary` if it is a prebuilt provisioner made from this very package; else one ValidationError line.

    Only reads: the file (a regular executable x86-64 ELF of at most MAX_SIZE), its manifest, and this
    package's sources. `how` says how it was chosen, for the message.
    """
    where = f"{binary} ({how})"
    try:
        info = binary.stat()
    except OSError as err:
        raise ValidationError(f"the prebuilt provisioner {where} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & stat.S_IXUSR:
        raise ValidationError(f"the prebuilt provisioner {where} is not an executable file")
    if info.st_size > MAX_SIZE:
        raise ValidationError(f"the prebuilt provisioner {where} is over the {MAX_SIZE >> 20} MiB limit")
    with open(binary, "rb") as f:
        header = f.read(20)
    magic, machine = ELF_X86_64
    if not header.startswith(magic) or int.from_bytes(header[18:20], "little") != machine:
        raise ValidationError(f"the prebuilt provisioner {where} is not an x86-64 ELF executable")
    recorded_path = manifest_path(binary)
    try:
        recorded = json.loads(recorded_path.read_text())
    except OSError as err:
        raise ValidationError(
            f"the prebuilt provisioner {where} has no readable manifest {recorded_path} ({err.strerror}): "
            "make both with python -m cos_customizer.provisioner_build DIR"
        ) from None
    except ValueError:
        raise ValidationError(f"the prebuilt provisioner's manifest {recorded_path} is not JSON") from None
    if not isinstance(recorded, dict) or not all(
        isinstance(recorded.get(key), str) for key in ("cos_customizer", "sources", "sha256")
    ):
        raise ValidationError(
            f"the prebuilt provisioner's manifest {recorded_path} lacks cos_customizer, sources or sha256"
        )
    version, sources = cos_customizer.__version__, package_digest()
    if (recorded["cos_customizer"], recorded["sources"]) != (version, sources):
        raise ValidationError(
            f"the prebuilt provisioner {where} is stale: built from cos-customizer {recorded['cos_customizer']} "
            f"(sources {recorded['sources'][:12]}), this is {version} (sources {sources[:12]}): rebuild it with "
            "python -m cos_customizer.provisioner_build DIR (or rebuild the step image)"
        )
    if _file_sha256(binary) != recorded["sha256"]:
        raise ValidationError(
            f"the prebuilt provisioner {where} is not the file its manifest {recorded_path} describes (sha256 differs)"
        )
    return binary


def prebuilt(environ: Mapping[str, str], default: Path = PREBUILT_PATH) -> Path | None:
    """The prebuilt provisioner to use, checked (`check_prebuilt`), or None when there is none.

    ${PREBUILT_ENV} names one (it must then exist); else `default` is used when it exists.
    """
    named = environ.get(PREBUILT_ENV, "")
    if named:
        return check_prebuilt(Path(os.path.abspath(named)), f"${PREBUILT_ENV}")
    if os.path.lexists(default):
        return check_prebuilt(default, "the prebuilt default")
    return None


def provide(output: Path, environ: Mapping[str, str]) -> tuple[Path, str]:
    """The provisioner executable written to `output`: the prebuilt one if there is one, else `build`'s.

    Returns (output, where it came from: "prebuilt PATH", "from the cache" or "built").
    """
    chosen = prebuilt(environ)
    if chosen is None:
        path, hit = build(output, dict(environ))
        return path, "from the cache" if hit else "built"
    log.info("Using the prebuilt provisioner %s (cos-customizer %s)", chosen, cos_customizer.__version__)
    _copy_executable(chosen, output)
    return output, f"prebuilt {chosen}"


def install(directory: Path, environ: Mapping[str, str]) -> Path:
    """Build the executable into `directory`/provisioner with its manifest beside it (for images)."""
    binary = directory / "provisioner"
    build(binary, dict(environ))
    document = json.dumps(manifest(binary), indent=2, sort_keys=True) + "\n"
    partial = directory / f".provisioner{MANIFEST_SUFFIX}.partial"
    partial.write_text(document)
    partial.replace(manifest_path(binary))
    return binary


def main(argv: list[str] | None = None) -> int:
    """python -m cos_customizer.provisioner_build DIR: build DIR/provisioner and DIR/provisioner.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: python -m cos_customizer.provisioner_build DIR\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = Path(args[0]).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        binary = install(directory, os.environ)
        check_prebuilt(binary, "just built")
    except CustomizerError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"{binary}\n{manifest_path(binary)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
