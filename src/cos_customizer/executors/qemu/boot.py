"""The boot plan of a GCE-like QEMU instance: which kernel COS's GRUB would boot, and the QEMU command line.

Pure parts (tested against expected values): `choose_kernel` reads a COS grub.cfg and GPT as GRUB
does and returns the menu entry it would boot; `qemu_argv` turns an `InstanceSpec` into QEMU's
argument list. Impure parts are kept apart: `kvm_usable` probes /dev/kvm, and `Qmp` is a small
standard-library client of QEMU's machine protocol (used for `block_resize` on a running guest).

How a real COS image boots
--------------------------
COS boots through GRUB from its EFI-SYSTEM partition; the kernels it loads are the files
`/syslinux/vmlinuz.A` and `/syslinux/vmlinuz.B` on that FAT (not the vboot blobs in KERN-A/KERN-B;
those partitions only carry the priority bits GRUB compares). The runner does what GRUB does,
without GRUB or firmware:

1. read the GPT of the boot disk (`disk.gpt.read_table`) and EFI-SYSTEM's `/efi/boot/grub.cfg`
   with mtools (`disk.grub.read_grub_cfg`);
2. `choose_kernel`: `gptpriority` of partitions 2 and 4, the `-lt` test, `set default=$defaultA|B`,
   the menu entry at that index ("verified image A" or "verified image B");
3. copy the entry's kernel (and its initrd, if the entry has one) out of the FAT with `mcopy`
   (`mcopy -i IMAGE@@OFFSET ::/syslinux/vmlinuz.A HOST_FILE`);
4. start QEMU with `-kernel HOST_FILE -append BootChoice.append`: the entry's command line as
   written, `root=/dev/dm-0` and `dm="1 vroot ..."` (or `dm-mod.create="..."`) intact, behind
   GRUB's `BOOT_IMAGE=/syslinux/vmlinuz.A`. COS entries say `noinitrd`: the COS kernel has
   virtio-scsi, dm-verity and the `dm=` early mapping built in, and finds ROOT-A by PARTUUID on
   the boot disk, which is `/dev/sda` on virtio-scsi as on GCE. GRUB re-quotes an argument
   holding spaces as `"dm=1 vroot ..."`; the kernel parses both spellings to the same value.

Because the choice is re-made before every boot from the disk's current GPT and grub.cfg, a
build that gives KERN-B the higher priority (ReclaimSDA3) or edits grub.cfg (disable-auto-update,
seal-oem) boots the next time exactly as GCE would.

How the sample image boots
--------------------------
`sample-image` writes the same grub.cfg shape and GPT (KERN-A priority 1, KERN-B 0), so the same
code chooses "verified image A". The plain sample has no kernel in `/syslinux` and no init: it is
for offline (local executor) builds only. A bootable sample puts a Debian kernel at
`/syslinux/vmlinuz.A` and, since a Debian kernel needs modules for virtio-scsi and dm-verity, an
`initrd` line in the entry (`BootChoice.initrd`, copied out with mtools like the kernel); its
initrd sets up the verity root from the same `dm=`/`dm-mod.create=` argument before switching to
ROOT-A's systemd.

arm64 images
------------
The kernel chosen says which machine boots it (`kernel_arch`: an arm64 Linux `Image` has "ARM\\x64" at
byte 56). An arm64 one boots under `qemu-system-aarch64`: the `virt` machine with GCE T2A's core
(Neoverse N1), TCG on an x86-64 machine, and the EDK2 firmware of Debian's qemu-efi-aarch64 (`-bios`),
which loads the kernel QEMU is given (`-kernel`, `-initrd`, `-append`: the same direct boot of the
grub.cfg entry; the firmware adds `initrd=initrd` to the command line) and gives the guest the SMBIOS
tables saying "Google Compute Engine" (cloud-init's GCE datasource reads them; without firmware an arm64
kernel has no DMI). The `virt` machine has one PL011 UART, the guest's ttyAMA0: serial port 1. Ports 2
to 4 are PCI 16550 UARTs in fixed slots (`ARM64_SERIAL_SLOTS`: the guest's ttyS0..2), which the arm64
bootable sample links to the names COS on arm64 uses, /dev/ttyAMA1..3 (udev rules of `sample.guest_arm64`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import operator
import os
import re
import socket
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cos_customizer import runner
from cos_customizer.arch import Arch, elf_arch
from cos_customizer.disk import gpt
from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu.loopback_http import SAFE_PATH
from cos_customizer.runner import die_with_us

QEMU = "qemu-system-x86_64"
QEMU_PACKAGES = {Arch.AMD64: "qemu-system-x86", Arch.ARM64: "qemu-system-arm"}
ARM64_FIRMWARE = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")  # Debian's qemu-efi-aarch64
ARM64_CPU = "neoverse-n1"  # the cores of GCE's T2A (Ampere Altra)
# GCE's serial ports 2, 3 and 4 on arm64: PCI 16550 UARTs in these slots of the virt machine's PCIe bus.
ARM64_SERIAL_SLOTS = {2: 0x1D, 3: 0x1E, 4: 0x1F}
ARM64_IMAGE_MAGIC = (56, b"ARM\x64")  # arm64 Linux `Image` header: the magic's offset and value
KERNEL_HEAD = 4096  # bytes of a kernel file read to tell its machine
METADATA_IP = "169.254.169.254"
GUEST_NET = "169.254.0.0/16"
SERIAL_PORTS = 4  # GCE's serial ports 1..4 are the guest's ttyS0..ttyS3
ACCELS = ("kvm", "tcg")
# How much of the KVM probe's serial log is read for the kernel's banner (the guest writes as much as it likes).
PROBE_READ = 1 << 20
_KVM_GET_API_VERSION, _KVM_CREATE_VM, _KVM_API_VERSION = 0xAE00, 0xAE01, 12


class BootError(CustomizerError):
    """The image's boot configuration cannot be followed."""


class QmpError(CustomizerError):
    """QEMU's machine protocol failed or refused a command."""


# ---------------------------------------------------------------------------------------------------------------
# Which kernel GRUB boots


@dataclasses.dataclass(frozen=True)
class BootChoice:
    """The menu entry GRUB would boot: its index, title, kernel (and initrd) path on the FAT, command line."""

    index: int
    title: str
    kernel: str
    cmdline: str
    initrd: str | None = None

    @property
    def append(self) -> str:
        """The command line as GRUB hands it to the kernel (it puts `BOOT_IMAGE=` first)."""
        return f"BOOT_IMAGE={self.kernel} {self.cmdline}".rstrip()


_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "-lt": operator.lt,
    "-le": operator.le,
    "-gt": operator.gt,
    "-ge": operator.ge,
    "-eq": operator.eq,
    "-ne": operator.ne,
}
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_ASSIGN = re.compile(r"^(?:set\s+)?(\w+)=(\S*)$")
_IF = re.compile(r"^if\s+\[\s+(\S+)\s+(-\w\w)\s+(\S+)\s+\]\s*;\s*then$")
_MENUENTRY = re.compile(r"""^menuentry\s+(?:"([^"]*)"|'([^']*)')[^{]*\{$""")


def _expand(text: str, variables: dict[str, str]) -> str:
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def _unquote(word: str) -> str:
    """A word without its surrounding quotes, as GRUB's lexer reads it (`"a"` and `'a'` are `a`)."""
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1]
    return word


def _integer(text: str, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BootError(f"grub.cfg: {line!r} compares {text!r}, which is not a number") from None


def _menu(cfg: str, table: gpt.Table) -> tuple[dict[str, str], list[BootChoice]]:
    """Run the subset of GRUB script a COS grub.cfg uses: assignments, `gptpriority`, `if [ a -op b ]`, menus."""
    variables: dict[str, str] = {}
    entries: list[BootChoice] = []
    # One frame per open `if`: (this branch runs, the enclosing code runs, the condition held).
    frames: list[tuple[bool, bool, bool]] = []
    entry: dict[str, str] | None = None
    for raw in cfg.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        running = all(frame[0] for frame in frames)
        if entry is not None:  # inside a menuentry body: only the lines that say what to boot
            words = line.split(maxsplit=1)
            if line == "}":
                if running:
                    if "kernel" not in entry:
                        raise BootError(f"grub.cfg: menuentry {entry['title']!r} has no linux line")
                    entries.append(
                        BootChoice(len(entries), entry["title"], entry["kernel"], entry["cmdline"], entry.get("initrd"))
                    )
                entry = None
            elif words[0] == "linux" and len(words) == 2:
                kernel, _, cmdline = words[1].partition(" ")
                entry.update(kernel=kernel, cmdline=cmdline.strip())
            elif words[0] == "initrd" and len(words) == 2:
                entry["initrd"] = words[1].split()[0]
            continue
        if match := _MENUENTRY.match(line):
            entry = {"title": match.group(1) if match.group(1) is not None else match.group(2)}
        elif match := _IF.match(line):
            left, op, right = (_expand(g, variables) for g in match.groups())
            if op not in _COMPARE:
                raise BootError(f"grub.cfg: {line!r} uses the test {op}, which this reader does not know")
            held = running and _COMPARE[op](_integer(left, line), _integer(right, line))
            frames.append((held, running, held))
        elif line == "else":
            if not frames:
                raise BootError("grub.cfg: 'else' without 'if'")
            _, outer, held = frames[-1]
            frames[-1] = (outer and not held, outer, held)
        elif line == "fi":
            if not frames:
                raise BootError("grub.cfg: 'fi' without 'if'")
            frames.pop()
        elif line.startswith(("elif", "if ")):
            raise BootError(f"grub.cfg: {line!r} is a condition this reader does not know")
        elif not running:
            continue
        elif match := _ASSIGN.match(line):
            variables[match.group(1)] = _expand(_unquote(match.group(2)), variables)
        elif line.split()[0] == "gptpriority":
            words = line.split()
            if len(words) != 4 or not words[2].isdigit():
                raise BootError(f"grub.cfg: {line!r} is not 'gptpriority DISK PARTITION VARIABLE'")
            variables[words[3]] = str(table.partition(int(words[2])).priority)
        # Any other command (insmod, search, set timeout ...) does not change which entry boots.
    if entry is not None or frames:
        raise BootError("grub.cfg ends inside a menuentry or an if block")
    return variables, entries


def choose_kernel(table: gpt.Table, grub_cfg: str) -> BootChoice:
    """The menu entry COS's GRUB boots from this GPT and grub.cfg.

    The file's own logic decides: `gptpriority $grubdisk N VAR` reads partition N's ChromeOS priority,
    `if [ $prioA -lt $prioB ]` picks `set default=...`, and `default` indexes the menu entries (from 0)
    or names one by title. Equal priorities take the else branch (A), as GRUB's `-lt` does.
    """
    variables, entries = _menu(grub_cfg, table)
    if not entries:
        raise BootError("grub.cfg has no menuentry with a linux line")
    default = variables.get("default", "0")
    if default.isdigit():
        index = int(default)
        if index >= len(entries):
            raise BootError(f"grub.cfg: default={index}, but there are only {len(entries)} menu entries")
        return entries[index]
    for choice in entries:
        if choice.title == default:
            return choice
    raise BootError(f"grub.cfg: default={default!r} names no menu entry")


# ---------------------------------------------------------------------------------------------------------------
# Which machine boots a kernel


def kernel_arch_of(head: bytes) -> Arch:
    """The machine of a kernel file's first bytes: an arm64 Linux `Image` (or a PE/EFI image for arm64, or an
    arm64 ELF vmlinux, or any of them gzip-compressed) is arm64; anything else (bzImage, x86-64 ELF) x86-64."""
    if head[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            head = zlib.decompressobj(wbits=31).decompress(head, KERNEL_HEAD)
    offset, magic = ARM64_IMAGE_MAGIC
    if head[offset : offset + len(magic)] == magic:
        return Arch.ARM64
    if head[:2] == b"MZ" and len(head) >= 0x40:  # a PE image: its COFF header's machine (0xAA64: arm64)
        pe = int.from_bytes(head[0x3C:0x40], "little")
        if head[pe : pe + 4] == b"PE\0\0" and head[pe + 4 : pe + 6] == b"\x64\xaa":
            return Arch.ARM64
    return elf_arch(head) or Arch.AMD64


def kernel_arch(kernel: Path) -> Arch:
    """The machine `kernel` (a file copied off EFI-SYSTEM) is built for (`kernel_arch_of`); one that cannot be
    read is left to QEMU for x86-64, as before arm64 was known (QEMU then says what is wrong with it)."""
    try:
        with open(kernel, "rb") as file:
            return kernel_arch_of(file.read(KERNEL_HEAD))
    except OSError:
        return Arch.AMD64


def require_machine(arch: Arch) -> str:
    """The QEMU emulating `arch`, refused in one line (naming the Debian package) when it or its firmware is not
    installed."""
    qemu = runner.require_tool(arch.qemu_system, QEMU_PACKAGES[arch])
    if arch is Arch.ARM64 and not ARM64_FIRMWARE.is_file():
        raise runner.MissingToolError(
            f"{ARM64_FIRMWARE} is not installed: install the Debian package qemu-efi-aarch64 (scripts/setup does)"
        )
    return qemu


# ---------------------------------------------------------------------------------------------------------------
# The QEMU command line


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """A GCE-like instance as one QEMU process.

    `disks` are the boot disk then the others (CIDATA, SCRATCH ...): raw files the guest sees as
    /dev/sda, /dev/sdb, ... on virtio-scsi. `serial_port3` receives the guest's /dev/ttyS2 (GCE's
    serial port 3); `console` its /dev/ttyS0 (port 1), discarded when None. The metadata server
    listens on the unix socket `metadata_socket` (in a directory only this uid can enter) and is
    reached as 169.254.169.254:80: QEMU starts `socat - UNIX-CONNECT:SOCKET` per guest connection.
    Nothing listens on the host's TCP ports, which every local user could reach.

    The boot disk is the only SCSI disk (virtio-scsi, `scsi-hd`), the others are virtio-blk
    (/dev/vdX in the guest): Linux names SCSI disks in the order their asynchronous probes run,
    which is not the order of the targets, and with three SCSI disks the CIDATA disk was /dev/sda on
    one boot in a few (seen under TCG). The provisioner needs the boot disk at /dev/sda, as on GCE;
    the startup script finds CIDATA and SCRATCH by label, so their names do not matter.
    """

    disks: tuple[Path, ...]
    serial_port3: Path
    qmp_socket: Path
    metadata_socket: Path
    console: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    memory_mb: int = 2048
    cpus: int = 2
    accel: str = "tcg"
    no_reboot: bool = True
    # Serial files grow across boots (a fresh QEMU per boot appends instead of truncating).
    serial_append: bool = False
    # A second QMP monitor, for a reader of events only (the first one stays free for commands).
    events_socket: Path | None = None
    # More guest services: (guest address, guest port, the host's unix socket), like the metadata one.
    forwards: tuple[tuple[str, int, Path], ...] = ()
    # More serial ports captured: (GCE port number 2 or 4, the file receiving it); the others are discarded.
    serial_ports: tuple[tuple[int, Path], ...] = ()
    # Serial port 1 as a unix socket QEMU listens on (an interactive console), still logged to `console`.
    console_socket: Path | None = None
    qemu: str = ""  # the QEMU program; empty: the arch's (`Arch.qemu_system`)
    socat: str = "socat"
    arch: Arch = Arch.AMD64  # the machine: q35 for x86-64, virt with firmware for arm64 (`kernel_arch`)
    firmware: Path = ARM64_FIRMWARE  # arm64's EDK2 firmware

    def __post_init__(self) -> None:
        if not self.disks:
            raise ValueError("an instance needs a boot disk")
        if self.accel not in ACCELS:
            raise ValueError(f"accel {self.accel!r}: use one of {', '.join(ACCELS)}")
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise ValueError("an initrd or a command line needs a kernel to boot")
        for _address, port, path in ((METADATA_IP, 80, self.metadata_socket), *self.forwards):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not a TCP port")
            # The guestfwd command is split on blanks (glib's shell rules, no shell), and socat's address
            # syntax gives ':', ',' and '!!' a meaning: a path with none of them is passed as it is.
            if not SAFE_PATH.fullmatch(os.fspath(path)):
                raise ValueError(f"socket path {os.fspath(path)!r}: use letters, digits and _./+- only")


def _opt(value: str | os.PathLike[str]) -> str:
    """A value inside a QEMU `key=value,...` option: commas are doubled."""
    return os.fspath(value).replace(",", ",,")


def qemu_argv(spec: InstanceSpec) -> list[str]:
    """QEMU's argument list for `spec` (no shell involved)."""
    arm64 = spec.arch is Arch.ARM64
    machine = "virt" if arm64 else "q35"
    argv = [spec.qemu or spec.arch.qemu_system, "-name", "cos-customizer,debug-threads=on", "-machine", machine,
            "-accel", spec.accel]  # fmt: skip
    if spec.accel == "kvm":
        argv += ["-cpu", "host"]
    elif arm64:
        argv += ["-cpu", ARM64_CPU]
    if arm64:
        argv += ["-bios", os.fspath(spec.firmware)]
    argv += ["-m", str(spec.memory_mb), "-smp", str(spec.cpus), "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for index, disk in enumerate(spec.disks):
        # discard=unmap: the guest's discards (a relocation's, fstrim's) punch holes in the disk's file; and
        # detect-zeroes=unmap: so do the zeros it writes (the kernel's lazy inode-table zeroing of a grown file
        # system is a SCSI WRITE SAME without unmap here), so the files' allocation measures data.
        argv += ["-drive", f"if=none,id=d{index},file={_opt(disk)},format=raw,discard=unmap,detect-zeroes=unmap"]
        if index == 0:
            argv += ["-device", "scsi-hd,drive=d0,bus=scsi0.0,scsi-id=0,lun=0"]
        else:  # see InstanceSpec: only the boot disk is SCSI, so it is /dev/sda on every boot
            argv += ["-device", f"virtio-blk-pci,drive=d{index}"]
    if spec.kernel is not None:
        argv += ["-kernel", os.fspath(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", os.fspath(spec.initrd)]
        if spec.append is not None:
            argv += ["-append", spec.append]
    files = {1: spec.console, 3: spec.serial_port3, **dict(spec.serial_ports)}
    for port in range(1, SERIAL_PORTS + 1):
        path = files.get(port)
        append = ",append=on" if spec.serial_append else ""
        backend = f"file,id=serial{port},path={_opt(path)}{append}" if path is not None else f"null,id=serial{port}"
        if port == 1 and spec.console_socket is not None:
            backend = f"socket,id=serial1,path={_opt(spec.console_socket)},server=on,wait=off"
            if path is not None:
                backend += f",logfile={_opt(path)},logappend={'on' if spec.serial_append else 'off'}"
        argv += ["-chardev", backend]
        if arm64 and port > 1:  # the virt machine has one PL011: the other ports are PCI 16550 UARTs
            argv += ["-device", f"pci-serial,chardev=serial{port},addr={ARM64_SERIAL_SLOTS[port]:#x}"]
        else:
            argv += ["-serial", f"chardev:serial{port}"]
    forwards = ((METADATA_IP, 80, spec.metadata_socket), *spec.forwards)
    guestfwds = "".join(
        f",guestfwd={_opt(f'tcp:{address}:{port}-cmd:{spec.socat} - UNIX-CONNECT:{os.fspath(path)}')}"
        for address, port, path in forwards
    )
    argv += ["-netdev", f"user,id=n0,net={GUEST_NET}{guestfwds}"]
    argv += ["-device", "virtio-net-pci,netdev=n0,romfile="]
    # An entropy source: under TCG the CPU has no RDRAND/RNDR, and a guest's getrandom() then waits on the
    # kernel's jitter entropy, which a loaded host made take minutes (a CI boot hung in it).
    argv += ["-device", "virtio-rng-pci"]
    argv += ["-smbios", "type=1,manufacturer=Google,product=Google Compute Engine"]
    argv += ["-chardev", f"socket,id=qmp,path={_opt(spec.qmp_socket)},server=on,wait=off"]
    argv += ["-mon", "chardev=qmp,mode=control"]
    if spec.events_socket is not None:
        argv += ["-chardev", f"socket,id=events,path={_opt(spec.events_socket)},server=on,wait=off"]
        argv += ["-mon", "chardev=events,mode=control"]
    if spec.no_reboot:
        argv.append("-no-reboot")
    return argv


def kvm_usable(device: str = "/dev/kvm") -> bool:
    """Whether this process can create a KVM virtual machine (else QEMU must use TCG)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0) != _KVM_API_VERSION:
            return False
        os.close(fcntl.ioctl(fd, _KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kvm_runs(kernel: Path, workdir: Path, *, timeout: float = 8.0, qemu: str = QEMU) -> bool:
    """Whether `kernel` gets as far as its banner under KVM: a usable /dev/kvm is not enough where nested
    virtualisation runs real-mode code but no protected-mode kernel (this project's CI machines: the boot
    stub prints, the kernel never does). Costs well under a second where KVM works, `timeout` where not."""
    if not kvm_usable():
        return False
    out = workdir / "kvm-probe.log"
    out.unlink(missing_ok=True)
    append = "earlyprintk=serial,ttyS0 console=ttyS0 panic=-1"
    argv = [qemu, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-display", "none",
            "-no-user-config", "-kernel", os.fspath(kernel), "-append", append,
            "-chardev", f"file,id=s,path={_opt(out)}", "-serial", "chardev:s", "-no-reboot"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_us())  # fmt: skip
    try:
        ends = time.monotonic() + timeout
        while time.monotonic() < ends and proc.poll() is None:
            with contextlib.suppress(OSError), open(out, "rb") as log:
                if b"Linux version" in log.read(PROBE_READ):  # the banner is among the first lines: read no more
                    return True
            time.sleep(0.05)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A QMP client on QEMU's unix socket: `connect`, then `execute`; events are kept in `events`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"the QMP socket did not greet as QMP: {greeting}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, *, timeout: float = 10.0, alive: Callable[[], bool] = lambda: True) -> Qmp:
        """Connect to the socket, waiting up to `timeout` seconds for QEMU to create it while `alive()`."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if not alive() or time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QEMU's QMP socket {path}: {exc.strerror}") from exc
                time.sleep(0.05)
            except BaseException:
                sock.close()
                raise

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its `return` value, or QmpError with QEMU's description."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def next_event(self) -> dict[str, Any] | None:
        """Wait for QEMU's next event on this connection; None once QEMU has closed it (it exited).
        For a monitor that only listens: commands on it would consume events meant for their reply loop."""
        self._sock.settimeout(None)
        while True:
            try:
                message = self._read()
            except (QmpError, OSError, ValueError):
                return None
            if "event" in message:
                return message

    def block_resize(self, device: str, size: int) -> None:
        """Grow the drive `device` (e.g. "d0") to `size` bytes; the guest sees the new capacity by itself."""
        self.execute("block_resize", device=device, size=size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
            self._sock.close()
