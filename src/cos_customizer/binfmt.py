"""Running another machine's binaries here: binfmt_misc and Debian's qemu-user-static, for one build.

An arm64 image's scripts, an arm64 Debian root's second stage and the arm64 provisioner's freeze run
on an x86-64 machine through the kernel's binfmt_misc, which hands every arm64 ELF to
`qemu-aarch64-static`. The registration needs the F flag (the kernel opens the emulator once, when it
is registered), so it works inside a sandbox or chroot whose root has no emulator.

`emulation(arch)` makes sure such a registration exists for the time of a build:
- the host's own machine needs none;
- an enabled registration with the F and P flags for the machine's ELF header is used as it is;
- otherwise the tool registers its own, `cos-customizer-<machine>-<pid>-<n>` (the kernel tries the newest
  registration first, so it takes precedence over one without them), and removes it afterwards. One a
  killed run left (its pid is gone) is removed by the next run. A registration the tool did not make
  is never changed;
- binfmt_misc is mounted at /proc/sys/fs/binfmt_misc (source `cos-customizer`) when it is not, and
  that mount is unmounted by the last run to leave it: unmounting binfmt_misc drops every
  registration (Linux 6.7 and later), so each run holds it open (a descriptor of its status file) for
  its whole block, and a run unmounts only a mount of ours with no registration left (another run
  that holds it makes the unmount fail, EBUSY, and unmounts it itself when it ends). A binfmt_misc
  mounted by anyone else stays as it is.
A host without the emulator or without binfmt_misc gets one line naming the Debian package to install.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
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
# As Debian's binfmt.d entries: P (the program's own argv[0] reaches it: dockerd re-executes itself under
# another name), O (the kernel opens the program: an executable it may not read runs too), F (the emulator
# is opened at registration, so it runs from any root).
FLAGS = "POF"
NEEDED_FLAGS = "PF"
PACKAGE = "binfmt-support"  # Debian's package that mounts binfmt_misc
MOUNT_SOURCE = "cos-customizer"  # the source of a binfmt_misc mount this tool made (in /proc/self/mountinfo)
_SERIAL = itertools.count(1)  # one registration per emulation block, even two in one process
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


def interpreter(arch: Arch) -> str:
    """Debian's name of the emulator for binfmt_misc's P flag (a link to it), else the emulator itself."""
    debian = f"/usr/libexec/qemu-binfmt/{arch.uname}-binfmt-P"
    return debian if os.path.exists(debian) else arch.qemu_user


def registration_line(arch: Arch, name: str) -> str:
    """What is written to binfmt_misc's register file for `arch` under `name`."""
    magic, mask = MAGIC[arch]
    return f":{name}:M::{_escaped(magic)}:{_escaped(mask)}:{interpreter(arch)}:{FLAGS}"


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
        and all(flag in fields.get("flags:", "") for flag in NEEDED_FLAGS)
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
        pid = name.rsplit("-", 2)[-2] if name.count("-") >= 3 else ""
        if name.startswith(OWN_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            log.debug("removing binfmt_misc entry %s, left by a run that is gone", name)
            _remove(root, name)


def require_emulator(arch: Arch) -> None:
    if not os.access(arch.qemu_user, os.X_OK):
        raise ValidationError(
            f"running {arch.debian} binaries on this {Arch.host().debian} machine needs {arch.qemu_user}: "
            "apt-get install qemu-user-static"
        )


def _hold(root: Path) -> int | None:
    """A descriptor of binfmt_misc's status file (None when binfmt_misc is not mounted at `root`): while it
    is open, binfmt_misc cannot be unmounted, and an unmount would drop every registration with it."""
    try:
        return os.open(root / "status", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _mounted_by_us(root: Path) -> bool:
    """Whether the binfmt_misc at `root` is one this tool mounted (its source is `MOUNT_SOURCE`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ", 1)
            if len(fields) == 2 and fields[0].split()[4] == str(root):
                kind, source = [*fields[1].split(), "", ""][:2]
                if kind == "binfmt_misc" and source == MOUNT_SOURCE:
                    return True
    return False


@contextlib.contextmanager
def _mounted(root: Path) -> Iterator[None]:
    """binfmt_misc at `root`, held mounted for the block (mounted first when it is not). Afterwards a mount
    this tool made is unmounted when no registration is left and no other run holds it (EBUSY)."""
    fd = _hold(root)
    if fd is None:
        try:
            linux.mount(MOUNT_SOURCE, str(root), "binfmt_misc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        except OSError as err:
            hint = "run as root" if err.errno == errno.EPERM else f"apt-get install {PACKAGE} (or modprobe binfmt_misc)"
            raise ValidationError(
                f"binfmt_misc cannot be mounted at {root} ({os.strerror(err.errno or 0)}), and running another "
                f"machine's binaries needs it: {hint}"
            ) from err
        fd = _hold(root)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
        if _mounted_by_us(root) and not entries(root):
            with contextlib.suppress(OSError):  # EBUSY: another run holds it; that run unmounts it
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
        name = f"{OWN_PREFIX}{arch.uname}-{os.getpid()}-{next(_SERIAL)}"
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
