"""The provisioner's build root for another machine (arm64 on x86-64), and freezing the provisioner in it.

PyInstaller and staticx bundle the interpreter, the C libraries and the loader of the machine they run
on, so the arm64 provisioner is frozen by arm64 tools: a Debian root of that machine, made once on this
one, whose binaries run under `qemu-user-static` through binfmt_misc (`binfmt.emulation`).

The root (cached under ~/.cache/cos-customizer/provisioner-root-<arch>/KEY; KEY is `RECIPE` and a
digest of what goes in it):
- `debootstrap --variant=minbase --arch=<arch>` of Debian bookworm from this machine's apt mirror (its
  second stage under emulation), with Debian's python3 (3.11, as this machine's), python3-venv,
  libpython3.11 and binutils (PyInstaller), patchelf (staticx), and gcc, libc6-dev, musl-tools and scons:
  staticx publishes no aarch64 wheel, so it is built from its sdist, whose bootloader is compiled with
  musl-gcc, as its own wheels are;
- a virtualenv, /opt/provisioner-build, with PyInstaller, staticx and their dependencies pip-installed at
  the versions this Python has (`pins`), from PyPI, trusting the CA certificates this machine trusts.
It is built into KEY.partial and renamed when complete (a half-built root is never used), under a lock
(a second process waits for the first); `done` records the root's Python and packages.

Every command in the root runs in a private mount namespace (`unshare --mount`) that mounts /proc and
binds /dev for it: nothing stays mounted on this machine when it ends, even if it is killed; its
programs run under `binfmt.emulation`.

`freeze` copies the package's sources into a fresh directory of the root, runs the same PyInstaller and
staticx steps as for this machine (the caller's entry script, staticx driver and environment), and
checks the result: an ELF executable of the root's machine, of bounded size, that starts (`--help`)
under emulation outside the root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from cos_customizer import binfmt, cache, privilege
from cos_customizer.arch import Arch, path_arch
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run

log = logging.getLogger("cos_customizer")

RECIPE = "1"  # change it when the root's recipe changes: the cached root is rebuilt
SUITE = "bookworm"  # Debian 12: this machine's Python 3.11
PACKAGES = ("python3", "python3-venv", "libpython3.11", "binutils", "patchelf", "gcc", "libc6-dev", "musl-tools",
            "scons", "ca-certificates")  # fmt: skip
TOOLS = ("pyinstaller", "staticx")  # pip-installed with their dependencies, pinned to this Python's versions
VENV = "/opt/provisioner-build"
BASE_DONE = "debootstrapped"  # in KEY.partial: its root's debootstrap is complete (a failed build resumes there)
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
ROOT_CA = "/etc/ssl/certs/cos-customizer-host-ca.crt"  # the CA bundle this machine trusts, for pip in the root
ENV = {"PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
       "PIP_ROOT_USER_ACTION": "ignore", "BOOTLOADER_CC": "musl-gcc"}  # fmt: skip
CD = 'cd "$0" && exec "$@"'  # sh -c CD DIR ARGV...: ARGV run in DIR
# Runs in the root's namespace: /proc and /dev for the command, then the command chrooted into the root.
ENTER = 'set -e; mount -t proc proc "$1/proc"; mount --bind /dev "$1/dev"; root=$1; shift; exec chroot "$root" "$@"'


@dataclasses.dataclass(frozen=True)
class FreezeFiles:
    """What the freeze runs: PyInstaller's entry script and the staticx driver (`python -c`, IN OUT)."""

    entry: str
    staticx_driver: str


@dataclasses.dataclass(frozen=True)
class Root:
    """A built root: its directory (the chroot) and machine, its cache key, and its `done` record."""

    path: Path
    arch: Arch
    key: str
    record: str

    @property
    def identity(self) -> str:
        """What a provisioner frozen in it depends on besides the sources: the key and the record."""
        return f"{self.key}\n{self.record}"


def check_host(arch: Arch) -> None:
    """Refuse, in one line, a machine that cannot build or use `arch`'s root."""
    if not privilege.is_root():
        raise ValidationError(
            f"building the {arch.debian} provisioner makes a Debian {arch.debian} root with debootstrap and chroot: "
            "run it as root"
        )
    for tool, package in (("debootstrap", "debootstrap"), ("unshare", "util-linux"), ("chroot", "coreutils")):
        require_tool(tool, package)
    binfmt.require_emulator(arch)


def pins(packages: tuple[str, ...] = TOOLS) -> dict[str, str]:
    """`packages` and every distribution they require (as installed here) with this Python's versions."""
    found: dict[str, str] = {}
    todo = list(packages)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker does not apply here (or an extra's)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[^A-Za-z0-9._-]", requirement.strip(), maxsplit=1)[0])
    return dict(sorted(found.items()))


def root_key(arch: Arch, pinned: Mapping[str, str]) -> str:
    recipe = "\n".join([arch.debian, SUITE, *PACKAGES, *(f"{n}=={v}" for n, v in pinned.items())])
    return f"{RECIPE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def cache_dir(arch: Arch, environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "/root")) / ".cache")
    return Path(base) / "cos-customizer" / f"provisioner-root-{arch.debian}"


def prepare(arch: Arch, versions: Mapping[str, str], environ: Mapping[str, str]) -> Root:
    """`arch`'s build root, from the cache or built into it (once; a second process waits for the first).

    `versions` are this Python's PyInstaller and staticx, which the root must have too."""
    check_host(arch)
    pinned = pins()
    for name, version in versions.items():
        if pinned.get(name) != version:
            raise CustomizerError(f"{name} {version} is installed, but its metadata says {pinned.get(name)}")
    base = cache_dir(arch, environ)
    base.mkdir(parents=True, exist_ok=True)
    final = base / root_key(arch, pinned)
    if not (final / "done").exists():
        with cache.locked(base / ".lock", f"the {arch.debian} provisioner's build root"):
            if not (final / "done").exists():
                partial = base / f"{final.name}.partial"
                for stale in base.glob("*.partial"):
                    if stale != partial or not (stale / BASE_DONE).exists():
                        shutil.rmtree(stale)
                started = time.monotonic()
                try:
                    _build(partial, arch, pinned)
                    partial.rename(final)
                except BaseException:
                    if not (partial / BASE_DONE).exists():  # a complete debootstrap is kept for the next try
                        shutil.rmtree(partial, ignore_errors=True)
                    raise
                log.info("Built the %s provisioner's build root %s in %.0f s", arch.debian, final,
                         time.monotonic() - started)  # fmt: skip
    return Root(final / "root", arch, final.name, (final / "done").read_text())


def _namespaced(argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace: whatever it mounts goes when it ends."""
    return [require_tool("unshare", "util-linux"), "--mount", "--propagation=private", "--", *argv]


def in_root(
    root: Path, argv: list[str], *, env: Mapping[str, str] | None = None, hint: str = ""
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` chrooted into `root` with /proc and /dev, in a private mount namespace (emulation on)."""
    sh = require_tool("sh", "dash")
    return run(_namespaced([sh, "-c", ENTER, "enter", str(root), "/usr/bin/env", "-i",
                     *(f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()), *argv]), hint=hint)  # fmt: skip


def _build(directory: Path, arch: Arch, pinned: Mapping[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # Imported here: the sample image's modules need the package's run-time dependencies, which the step
    # image's build virtualenv (freezing natively) does not have.
    from cos_customizer.sample.guest import apt_mirror

    root = directory / "root"
    mirror = apt_mirror()
    with binfmt.emulation(arch):
        if not (directory / BASE_DONE).exists():
            log.info("Building the %s provisioner's build root: debootstrap %s from %s under emulation (once, "
                     "minutes)...", arch.debian, SUITE, mirror)  # fmt: skip
            shutil.rmtree(root, ignore_errors=True)
            run(_namespaced([require_tool("debootstrap", "debootstrap"), "--variant=minbase", f"--arch={arch.debian}",
                             f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror]),
                hint=f"debootstrap --arch={arch.debian} of Debian {SUITE} from {mirror}; "
                     f"its log: {root}/debootstrap/debootstrap.log")  # fmt: skip
            (directory / BASE_DONE).write_text(f"{mirror}\n")
        shutil.copyfile(os.environ.get("SSL_CERT_FILE") or HOST_CA, root / ROOT_CA.lstrip("/"))
        in_root(root, ["python3", "-m", "venv", "--clear", VENV])
        requirements = [f"{name}=={version}" for name, version in pinned.items()]
        log.info("Installing %s in the %s build root (staticx from its sources)...", " ".join(requirements),
                 arch.debian)  # fmt: skip
        in_root(root, [f"{VENV}/bin/pip", "install", "-q", *requirements], env={"PIP_CERT": ROOT_CA},
                hint="pip install in the build root (PyPI must be reachable)")  # fmt: skip
        python = in_root(root, [f"{VENV}/bin/python", "-c", "import sys; print(sys.version)"])
        freeze = in_root(root, [f"{VENV}/bin/pip", "freeze", "--all"])
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*", "usr/share/doc/*", "usr/share/man/*"):
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    record = f"recipe {RECIPE}\npython {python.stdout.decode().strip()}\n{freeze.stdout.decode()}"
    (directory / "done").write_text(record)


def freeze(root: Root, package: Path, work: Path, files: FreezeFiles, env: Mapping[str, str], limit: int) -> Path:
    """The provisioner frozen in `root` from the sources of `package` (the cos_customizer directory),
    written to `work`/provisioner-static; `env` is the freeze's (SOURCE_DATE_EPOCH, the hash seed)."""
    base = root.path / "var/tmp"
    inside = Path(tempfile.mkdtemp(prefix="cos-customizer-freeze.", dir=base))
    try:
        name = "/" + str(inside.relative_to(root.path))
        shutil.copytree(package, inside / "src" / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (inside / "provisioner.py").write_text(files.entry)
        (inside / "staticx_driver.py").write_text(files.staticx_driver)
        freeze_env = {**env, "PYTHONPATH": f"{name}/src", "HOME": name, "TMPDIR": name}
        python = f"{VENV}/bin/python"
        started = time.monotonic()
        with binfmt.emulation(root.arch):
            in_root(root.path, ["sh", "-c", CD, name, python, "-m", "PyInstaller", "--onefile",
                                "--name", "provisioner", "--noconfirm", "--clean", "--log-level", "WARN",
                                "--distpath", f"{name}/dist", "--workpath", f"{name}/build", "--specpath", name,
                                f"{name}/provisioner.py"], env=freeze_env)  # fmt: skip
            in_root(root.path, ["sh", "-c", CD, name, python, f"{name}/staticx_driver.py",
                                f"{name}/dist/provisioner", f"{name}/provisioner-static"], env=freeze_env)  # fmt: skip
            static = work / "provisioner-static"
            shutil.copyfile(inside / "provisioner-static", static)
            static.chmod(0o755)
            log.info("Froze the %s provisioner in %.0f s", root.arch.debian, time.monotonic() - started)
            _check(static, root.arch, limit)
            run([str(static), "--help"], env={"PATH": "/usr/bin:/bin"})  # it must at least start, outside the root
        return static
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def _check(static: Path, arch: Arch, limit: int) -> None:
    size = static.stat().st_size
    if size > limit:
        raise CustomizerError(f"the provisioner executable is {size >> 20} MiB, over the {limit >> 20} MiB limit")
    if path_arch(static) is not arch:
        raise CustomizerError(f"the {arch.debian} build root made {static}: not an {arch.debian} ELF executable")
