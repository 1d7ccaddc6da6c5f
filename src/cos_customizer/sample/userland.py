"""The plain sample's programs for another machine (`sample-image -arch=arm64` on x86-64): Debian's, unpacked.

The plain sample's ROOT-A holds a few commands and their libraries. For this machine's architecture they
are copied from this machine; for another one they come from Debian's packages for that architecture:
the first stage of `debootstrap --foreign --variant=minbase`, which downloads and unpacks Debian's
essential packages without running any of them (no emulation, ~20 s), plus the container runtime's
packages (`RUNTIME`, with their dependencies, unpacked with dpkg-deb) for `-with-containers`. The tree
is cached once per machine and architecture under ~/.cache/cos-customizer/sample-userland/ARCH-RECIPE.

Shared libraries are found without running the binaries: `needed` follows readelf's NEEDED entries
and program interpreter through the tree's library directories.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from cos_customizer import cache, privilege
from cos_customizer.arch import Arch
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run
from cos_customizer.sample import guest as sample_guest

log = logging.getLogger(__name__)

RECIPE = "2"  # change it when the tree's recipe changes: the cached one is rebuilt
RUNTIME = ("docker.io", "containerd", "runc", "iptables", "tini")
USR_MERGED = ("bin", "sbin", "lib", "lib64")  # links to usr/... in Debian 12's roots
MULTIARCH = {Arch.AMD64: "x86_64-linux-gnu", Arch.ARM64: "aarch64-linux-gnu"}


def check_host(arch: Arch) -> None:
    if not privilege.is_root():
        raise ValidationError(
            f"sample-image -arch={arch.debian} unpacks Debian's {arch.debian} packages with debootstrap: run it as root"
        )
    require_tool("debootstrap", "debootstrap")
    require_tool("dpkg-deb", "dpkg")
    require_tool("readelf", "binutils")


def _build(arch: Arch, target: Path) -> None:
    mirror = sample_guest.apt_mirror()
    log.info("Unpacking Debian %s's %s packages for the sample (debootstrap's first stage, once)...",
             sample_guest.SUITE, arch.debian)  # fmt: skip
    run([require_tool("debootstrap", "debootstrap"), "--foreign", f"--arch={arch.debian}", "--variant=minbase",
         f"--include={','.join(RUNTIME)}", sample_guest.SUITE, str(target), mirror],
        hint=f"debootstrap --foreign of Debian {sample_guest.SUITE} {arch.debian} from {mirror}")  # fmt: skip
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    required = set((target / "debootstrap/required").read_text().split())
    for deb in sorted((target / "var/cache/apt/archives").glob("*.deb")):
        if deb.name.split("_", 1)[0] not in required:  # the first stage unpacked those
            unpacked = target / "debootstrap/unpacked"
            run([dpkg_deb, "-x", str(deb), str(unpacked)])
            _merge(unpacked, target)
            shutil.rmtree(unpacked)
        deb.unlink()


def _merge(unpacked: Path, target: Path) -> None:
    """Move a package's files into the tree, /bin, /sbin and /lib* going under /usr as the tree's links say
    (dpkg-deb -x into the tree itself would replace those links with directories)."""
    for directory, subdirectories, names in os.walk(unpacked):
        links = [name for name in subdirectories if (Path(directory) / name).is_symlink()]
        for name in sorted({*names, *links}):
            source = Path(directory) / name
            relative = source.relative_to(unpacked)
            if relative.parts[0] in USR_MERGED:
                relative = Path("usr", *relative.parts)
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.is_symlink() or destination.exists():
                destination.unlink()
            os.rename(source, destination)


def prepare(arch: Arch, cache_dir: Path | None = None) -> Path:
    """The unpacked tree for `arch`, from the cache or made into it."""
    check_host(arch)
    base = cache_dir or cache.home() / "sample-userland"
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"{arch.debian}-{RECIPE}"
    with cache.locked(base / ".lock", f"Debian's {arch.debian} packages for the sample"):
        if not (final / ".done").exists():
            partial = base / f"{final.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                _build(arch, partial)
                (partial / ".done").write_text(f"recipe {RECIPE}\n")
                shutil.rmtree(final, ignore_errors=True)
                partial.rename(final)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return final


def inside(tree: Path, path: str | Path) -> Path:
    """`path` (absolute, as on the target) resolved inside `tree`: its symlinks, absolute ones too, stay in it."""
    parts = list(Path(str(path).lstrip("/")).parts)
    current = tree
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != tree else tree
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise CustomizerError(f"too many symbolic links resolving {path} in {tree}")
            target = Path(candidate.readlink())
            if target.is_absolute():
                current = tree
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            continue
        current = candidate
    return current


def _dynamic(binary: Path) -> tuple[list[str], str]:
    """(NEEDED sonames, program interpreter or "") of an ELF file, as readelf reads them."""
    text = run([require_tool("readelf", "binutils"), "-d", "-l", "-W", str(binary)], check=False).stdout.decode()
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^]]+)\]", text)
    interpreter = re.search(r"Requesting program interpreter: ([^]]+)\]", text)
    return needed, interpreter.group(1) if interpreter else ""


def needed(tree: Path, arch: Arch, binaries: Iterable[Path]) -> set[Path]:
    """The shared libraries (paths inside `tree`, absolute as on the target) that `binaries` need, transitively."""
    directories = [f"/usr/lib/{MULTIARCH[arch]}", f"/lib/{MULTIARCH[arch]}", "/usr/lib", "/lib"]
    found: set[Path] = set()
    queue = list(binaries)
    while queue:
        names, interpreter = _dynamic(queue.pop())
        wanted = [interpreter] if interpreter else []
        for name in names:
            where = next((f"{d}/{name}" for d in directories if inside(tree, f"{d}/{name}").exists()), None)
            if where is None:
                raise CustomizerError(f"the {arch.debian} library {name} is not in {tree}")
            wanted.append(where)
        for path in map(Path, wanted):
            if path not in found:
                found.add(path)
                queue.append(inside(tree, path))
    return found
