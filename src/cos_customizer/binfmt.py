"""Running another machine's binaries here: binfmt_misc and Debian's qemu-user-static, for one build.

An arm64 image's scripts, an arm64 Debian root's second stage and the arm64 provisioner's freeze run
on an x86-64 machine through the kernel's binfmt_misc, which hands every arm64 ELF to
`qemu-aarch64-static`. The registration needs the F flag (the kernel opens the emulator once, when it
is registered), so it works inside a sandbox or chroot whose root has no emulator.

`emulation(arch)` makes sure such a registration exists for the time of a build:
- the host's own machine needs none;
- an enabled registration with the F flag for the machine's ELF header is used as it is;
- otherwise the tool registers its own, `cos-customizer-<machine>-<pid>` (the kernel tries the newest
  registration first, so it takes precedence over one without F), and removes it afterwards. One a
  killed run left (its pid is gone) is removed by the next run. A registration the tool did not make
  is never changed;
- binfmt_misc is mounted at /proc/sys/fs/binfmt_misc for the time of the build when it is not, and
  unmounted afterwards.
A host without the emulator or without binfmt_misc gets one line naming the Debian package to install.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from cos_customizer import linux
from cos_customizer.arch import Arch
from cos_customizer.errors import ValidationError

log = logging.getLogger("cos_customizer")

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
OWN_PREFIX = "cos-customizer-"
FLAGS = "F"
# Debian's qemu-user-static magic and mask for each machine's 64-bit little-endian executables (binfmt.d).
MAGIC = {
    Arch.ARM64: (
        "7f454c460201010000000000000000000200b700",
        "ffffffffffffff00fffffffffffffffffeffffff",
    ),
    Arch.AMD64: (
        "7f454c4602010100000000000000000002003e00",
        "fffffffffffefe00fffffffffffffffffeffffff",
    ),
}


def _escaped(hexstring: str) -> str:
    return "".join(f"\\x{hexstring[i : i + 2]}" for i in range(0, len(hexstring), 2))


def registration_line(arch: Arch, name: str) -> str:
    """What is written to binfmt_misc's register file for `arch` under `name`."""
    magic, mask = MAGIC[arch]
    return f":{name}:M::{_escaped(magic)}:{_escaped(mask)}:{arch.qemu_user}:{FLAGS}"


def _parse_entry(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line in ("enabled", "disabled"):
            fields["state"] = line
        elif " " in line:
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def usable(entry_text: str, arch: Arch) -> bool:
    """Whether a binfmt_misc entry (its file's text) runs `arch`'s executables from any root."""
    fields = _parse_entry(entry_text)
    magic, mask = MAGIC[arch]
    return (
        fields.get("state") == "enabled"
        and "F" in fields.get("flags:", "")
        and fields.get("magic", "").lower() == magic
        and fields.get("mask", mask).lower() == mask
    )


def entries(root: Path = BINFMT_MISC) -> dict[str, str]:
    """Every registration (name → its file's text), the register and status files left out."""
    found: dict[str, str] = {}
    for path in sorted(root.iterdir()):
        if path.name in ("register", "status"):
            continue
        with contextlib.suppress(OSError):
            found[path.name] = path.read_text()
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(root: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        (root / name).write_text("-1")


def _remove_stale(root: Path, names: list[str]) -> None:
    for name in names:
        pid = name.rsplit("-", 1)[-1]
        if name.startswith(OWN_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            log.debug("removing binfmt_misc entry %s, left by a run that is gone", name)
            _remove(root, name)


def require_emulator(arch: Arch) -> None:
    if not os.access(arch.qemu_user, os.X_OK):
        raise ValidationError(
            f"running {arch.debian} binaries on this {Arch.host().debian} machine needs {arch.qemu_user}: "
            "apt-get install qemu-user-static"
        )


@contextlib.contextmanager
def _mounted(root: Path) -> Iterator[None]:
    if (root / "register").exists():
        yield
        return
    try:
        linux.mount("binfmt_misc", str(root), "binfmt_misc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    except OSError as err:
        hint = "run as root" if err.errno == errno.EPERM else "apt-get install binfmt-support (or modprobe binfmt_misc)"
        raise ValidationError(
            f"binfmt_misc cannot be mounted at {root} ({os.strerror(err.errno or 0)}), and running another "
            f"machine's binaries needs it: {hint}"
        ) from err
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            linux.umount(str(root))


@contextlib.contextmanager
def emulation(arch: Arch, root: Path = BINFMT_MISC) -> Iterator[str | None]:
    """For the time of the block, `arch`'s executables run here; yields the registration's name (None: native)."""
    if arch is Arch.host():
        yield None
        return
    require_emulator(arch)
    with _mounted(root):
        status = (root / "status").read_text().strip()
        if status != "enabled":
            raise ValidationError(
                f"binfmt_misc is {status} on this machine, and running {arch.debian} binaries needs it: "
                f"echo 1 > {root}/status"
            )
        present = entries(root)
        _remove_stale(root, list(present))
        for name, text in present.items():
            if not name.startswith(OWN_PREFIX) and usable(text, arch):
                log.debug("%s binaries run through binfmt_misc entry %s", arch.debian, name)
                yield name
                return
        name = f"{OWN_PREFIX}{arch.uname}-{os.getpid()}"
        try:
            (root / "register").write_text(registration_line(arch, name))
        except OSError as err:
            raise ValidationError(
                f"cannot register {arch.qemu_user} with binfmt_misc ({os.strerror(err.errno or 0)}): run as root"
            ) from err
        log.debug("registered binfmt_misc entry %s for %s binaries", name, arch.debian)
        try:
            yield name
        finally:
            _remove(root, name)
