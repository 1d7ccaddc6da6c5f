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
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cos_customizer
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run

log = logging.getLogger("cos_customizer")

EPOCH = "1700000000"
MAX_SIZE = 40 << 20
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


def source_digest() -> str:
    """What the executable depends on: every source file and the tool versions."""
    digest = hashlib.sha256()
    package = Path(cos_customizer.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
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
    partial = output.with_name(f".{output.name}.partial")
    try:
        shutil.copyfile(cached, partial)
        partial.chmod(0o755)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return output, hit
