"""`cos-customizer sample-image`: a small COS-shaped disk image, made offline.

Same partition table as a real 10 GiB COS image (numbers, names, types,
sector positions, kernel priority bits); ROOT-A is a small runnable system
(bash, coreutils, grep, sed and their libraries, taken from this machine)
with a real dm-verity tree whose root hash and salt are in grub.cfg (as
`dm="..."` or, with grub_format="dm-mod", `dm-mod.create="..."`); STATE,
OEM and EFI-SYSTEM carry the file systems and directories COS has. The file
systems are written straight into the sparse image at their offsets
(`mke2fs -E offset`, `mkfs.vfat --offset`, mtools), so no root, loop device
or mount is needed, and the output is written atomically.

With `bootable=True` (`sample-image -bootable`), ROOT-A is instead a Debian systemd root laid out
as COS (`sample_guest`: built once with debootstrap and cached; needs root), EFI-SYSTEM carries a
Debian kernel and initramfs as `/syslinux/vmlinuz.A|B` and `/syslinux/initrd.A|B`, and each grub.cfg
entry has an `initrd` line; the partition table, ROOT-A's geometry and verity tree, STATE and OEM
are the same, so the image boots under QEMU as COS would (`executors.qemu.boot`).

With `with_containers=True` (`sample-image -with-containers`), ROOT-A also has this machine's container
runtime (Debian's docker.io, containerd, runc and legacy iptables with their libraries) at COS's paths,
with COS-shaped systemd units and a docker group (`sample_containers`). With both, that runtime goes
into a copy of the guest's root, its units start at boot, and its data directories on STATE
(var_overlay/lib/docker and lib/containerd) are mounted executable at /var/lib/docker and
/var/lib/containerd, so what a build preloads is there when the image boots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from cos_customizer.arch import Arch
from cos_customizer.disk import grub
from cos_customizer.disk.gpt import (
    BIOS_BOOT,
    CHROMEOS_KERNEL,
    CHROMEOS_RESERVED,
    CHROMEOS_ROOT,
    EFI_SYSTEM,
    LINUX_DATA,
    SECTOR,
    Partition,
    new_table,
    write_table,
)
from cos_customizer.disk.verity import format_verity, random_salt
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run
from cos_customizer.sample import containers as sample_containers
from cos_customizer.sample import guest as sample_guest
from cos_customizer.sample import userland as sample_userland

GiB = 1 << 30
ROOT_FS_BLOCKS = 516096  # 2 GiB less 32 MiB: the hash tree follows the file system in ROOT-A
VERSION = "113.18244.85.59"
MILESTONE = "113"
CONSOLE = {Arch.AMD64: "ttyS0", Arch.ARM64: "ttyAMA0"}  # the first serial port (as GCE's VMs name it)
# How grub.cfg declares the root's verity device: ChromeOS `dm="..."`, or upstream `dm-mod.create="..."`.
GRUB_FORMATS = ("dm", "dm-mod")

# number, name, first, last (None: to the end of the disk), type, file system
LAYOUT: tuple[tuple[int, str, int, int | None, uuid.UUID], ...] = (
    (1, "STATE", 8704000, None, LINUX_DATA),
    (2, "KERN-A", 20480, 53247, CHROMEOS_KERNEL),
    (3, "ROOT-A", 4509696, 8703999, CHROMEOS_ROOT),
    (4, "KERN-B", 53248, 86015, CHROMEOS_KERNEL),
    (5, "ROOT-B", 315392, 4509695, CHROMEOS_ROOT),
    (6, "KERN-C", 16448, 16448, CHROMEOS_KERNEL),
    (7, "ROOT-C", 16449, 16449, CHROMEOS_ROOT),
    (8, "OEM", 86016, 118783, LINUX_DATA),
    (9, "reserved", 16450, 16450, CHROMEOS_RESERVED),
    (10, "reserved", 16451, 16451, CHROMEOS_RESERVED),
    (11, "RWFW", 64, 16447, BIOS_BOOT),
    (12, "EFI-SYSTEM", 249856, 315391, EFI_SYSTEM),
)

# Commands a customization script commonly uses; their libraries come along.
TOOLS = (
    "bash", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "dirname", "basename", "du", "echo",
    "env", "false", "grep", "head", "id", "install", "ln", "ls", "md5sum", "mkdir", "mktemp", "mv", "printf",
    "pwd", "readlink", "realpath", "rm", "rmdir", "sed", "seq", "sha256sum", "sleep", "sort", "stat", "sync",
    "tail", "tee", "test", "touch", "tr", "true", "uname", "uniq", "wc", "whoami", "xargs", "yes",
)  # fmt: skip


def partitions(disk_sectors: int) -> list[Partition]:
    """The COS layout for a disk of `disk_sectors`, with fresh GUIDs."""
    result = []
    for number, name, first, last, type_guid in LAYOUT:
        end = disk_sectors - 34 if last is None else last
        part = Partition(number, type_guid, uuid.uuid4(), first, end, 0, name)
        if name == "KERN-A":
            part = part.with_chromeos(priority=1, tries=0, successful=True)
        result.append(part)
    return result


def grub_cfg(
    root_a: Partition,
    root_b: Partition,
    root_hexdigest: str,
    salt: str,
    grub_format: str = "dm",
    *,
    initrd: bool = False,
    arch: Arch = Arch.AMD64,
) -> str:
    """A grub.cfg of the COS shape: local and verified entries for A and B, each line with cros_efi.

    `grub_format` is how the verified entries declare the root's verity device: "dm" (ChromeOS
    `dm="1 vroot none ro 1,..."`) or "dm-mod" (upstream `dm-mod.create="vroot,,,ro,..."`, newer COS).
    With `initrd`, each entry also loads `/syslinux/initrd.A` (or `.B`): the bootable sample's.
    The console is the machine's first serial port: ttyS0 on x86-64, the PL011 ttyAMA0 on arm64.
    """
    _check_grub_format(grub_format)
    console = CONSOLE[arch]
    common = f"init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 console={console}"
    sectors = ROOT_FS_BLOCKS * 8

    def dm(part: Partition) -> str:
        uid = str(part.guid).upper()
        if grub_format == "dm-mod":
            return (
                f'root=/dev/dm-0 dm-mod.create="vroot,,,ro,0 {sectors} verity 0 PARTUUID={uid} PARTUUID={uid} '
                f'4096 4096 {ROOT_FS_BLOCKS} {ROOT_FS_BLOCKS} sha256 {root_hexdigest} {salt}"'
            )
        return (
            f'root=/dev/dm-0 dm="1 vroot none ro 1,0 {sectors} verity payload=PARTUUID={uid} '
            f"hashtree=PARTUUID={uid} hashstart={sectors} alg=sha256 root_hexdigest={root_hexdigest} "
            f'salt={salt}"'
        )

    def entry(title: str, kernel: str, root: str) -> str:
        load = f"  initrd /syslinux/initrd.{kernel}\n" if initrd else ""
        return f'menuentry "{title}" {{\n  linux /syslinux/vmlinuz.{kernel} {common} cros_efi {root}\n{load}}}\n'

    return (
        "defaultA=2\ndefaultB=3\ngptpriority $grubdisk 2 prioA\ngptpriority $grubdisk 4 prioB\n\n"
        "if [ $prioA -lt $prioB ]; then\n  set default=$defaultB\nelse\n  set default=$defaultA\nfi\n\n"
        "set timeout=0\n\n"
        + entry("local image A", "A", f"root=PARTUUID={str(root_a.guid).upper()}")
        + "\n"
        + entry("local image B", "B", f"root=PARTUUID={str(root_b.guid).upper()}")
        + "\n"
        + entry("verified image A", "A", dm(root_a))
        + "\n"
        + entry("verified image B", "B", dm(root_b))
    )


def _libraries(binaries: list[Path]) -> set[Path]:
    ldd = require_tool("ldd", "libc-bin")
    found: set[Path] = set()
    for binary in binaries:
        result = run([ldd, str(binary)], check=False)
        for line in result.stdout.decode().splitlines():
            words = line.split()
            path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
            if path.startswith("/"):
                found.add(Path(path))
    return found


def _place(src: Path, root: Path) -> None:
    """Copy `src` to the same path under `root` (following links to the real file)."""
    target = root / str(src).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy2(src.resolve(), target)


def os_release() -> str:
    """The sample's /etc/os-release, as COS's."""
    return (
        f'NAME="Container-Optimized OS"\nID=cos\nPRETTY_NAME="Container-Optimized OS from Google"\n'
        f'HOME_URL="https://cloud.google.com/container-optimized-os/docs"\nVERSION={MILESTONE}\n'
        f"VERSION_ID={MILESTONE}\nBUILD_ID={VERSION.split('.', 1)[1]}\n"
    )


def _place_unpacked(source: Path, arch: Arch, binaries: list[Path], root: Path) -> None:
    """Copy the libraries `binaries` (files of the unpacked tree `source`) need from `source` into `root`
    (/lib's under /usr, as the root's /lib links there), leaving those `root` already has."""
    for library in sample_userland.needed(source, arch, binaries):
        relative = str(library).lstrip("/")
        target = root / ("usr/" + relative if relative.startswith(("lib/", "lib64/")) else relative)
        if not sample_userland.inside(root, library).exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sample_userland.inside(source, library), target)


def _tools(source: Path, arch: Arch) -> list[Path]:
    """`TOOLS` as files: this machine's (`source` is /) or those of the unpacked tree `source` for `arch`."""
    found = []
    for name in TOOLS:
        if arch is Arch.host():
            path = shutil.which(name, path="/usr/bin:/bin")
            if path is None:
                raise ValidationError(
                    f"{name} is not on this machine; sample-image copies it from here (apt-get install it)"
                )
        else:
            path = str(sample_userland.inside(source, f"/usr/bin/{name}"))
            if not os.path.exists(path):
                raise CustomizerError(f"{name} is not in Debian's {arch.debian} packages unpacked in {source}")
        found.append(Path(path))
    return found


def root_tree(root: Path, *, with_containers: bool = False, arch: Arch | None = None) -> None:
    """A small runnable COS-like root file system; `with_containers`: with `sample_containers`' runtime.

    `arch` (default: this machine's): another machine's commands and libraries come from Debian's
    packages for it (`sample_userland`), found without running them.
    """
    arch = arch or Arch.host()
    native = arch is Arch.host()
    source = Path("/") if native else sample_userland.prepare(arch)
    for directory in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/share/oem", "etc", "proc", "sys",
                      "dev", "run", "tmp", "var", "home", "root", "mnt/stateful_partition", "mnt/disks"):  # fmt: skip
        (root / directory).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (root / link).symlink_to(target)
    binaries = _tools(source, arch)
    for name, path in zip(TOOLS, binaries, strict=True):
        shutil.copy2(path.resolve() if native else path, root / "usr/bin" / name)
    (root / "etc/group").write_text("root:x:0:\nchronos:x:1000:\n")
    if with_containers:
        binaries += sample_containers.install(root, source, arch)
    if native:
        for library in _libraries(binaries):
            _place(library, root / "usr" if str(library).startswith(("/lib", "/lib64")) else root)
    else:
        _place_unpacked(source, arch, binaries, root)
    (root / "usr/bin/sh").symlink_to("bash")
    (root / "etc/os-release").write_text(os_release())
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")  # as COS's
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nchronos:x:1000:1000:chronos:/home/chronos:/bin/bash\n"
    )


def state_tree(root: Path, *, with_containers: bool = False) -> None:
    """STATE's tree; `with_containers` (a bootable sample with the runtime): its data directories too."""
    for directory in ("var_overlay/lib", "var_overlay/log", "var_overlay/cache", "var_overlay/tmp",
                      "home/chronos", "dev_image"):  # fmt: skip
        (root / directory).mkdir(parents=True)
    if with_containers:  # the runtime's data directories, mounted at boot (sample_guest.enable_containers)
        for name in sample_guest.CONTAINER_MOUNTS:
            (root / "var_overlay/lib" / name).mkdir(mode=0o711)
    (root / "var_overlay/lib/sample-image").write_text("this file was on STATE before the build\n")


def oem_tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README").write_text("OEM partition of the cos-customizer sample image\n")


def _mke2fs(
    image: Path, part: Partition, fstype: str, label: str, tree: Path, blocks: int | None = None, *, lazy: bool = True
) -> None:
    """A file system of `tree` at `part`; `lazy=False` initialises inode tables and journal now (a VM
    that mounts it does not pay for it at its next mount: ~2 s under TCG)."""
    tool = require_tool("mke2fs", "e2fsprogs")
    size = blocks if blocks is not None else part.size * SECTOR // 4096
    init = int(lazy)
    extended = f"offset={part.first * SECTOR},lazy_itable_init={init},lazy_journal_init={init},nodiscard"
    run([tool, "-q", "-F", "-t", fstype, "-b", "4096", "-L", label, "-d", str(tree), "-E", extended,
         "-U", "random", str(image), str(size)])  # fmt: skip


def _efi(image: Path, part: Partition, cfg: str, files: dict[str, Path] | None = None) -> None:
    """The EFI-SYSTEM FAT with grub.cfg and `files` (name in /syslinux -> local file)."""
    mkfs = require_tool("mkfs.vfat", "dosfstools")
    run([mkfs, "-F", "16", "-n", "EFI-SYSTEM", f"--offset={part.first}", str(image), str(part.size * SECTOR // 1024)])
    mmd = require_tool("mmd", "mtools")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for directory in ("::/efi", "::/efi/boot", "::/syslinux"):
        run([mmd, "-i", f"{image}@@{part.first * SECTOR}", directory], env=env)
    grub.write_grub_cfg(image, part.first * SECTOR, cfg)
    if files:
        mcopy = require_tool("mcopy", "mtools")
        for name, local in files.items():
            run([mcopy, "-i", f"{image}@@{part.first * SECTOR}", str(local), f"::/syslinux/{name}"], env=env)


def _guest_with_containers(guest: sample_guest.Guest, root: Path, arch: Arch) -> None:
    """A copy of the guest's root at `root` (owners and modes kept) with the runtime, started at boot:
    this machine's, or for another `arch` that of Debian's packages for it (`sample_userland`)."""
    cp = require_tool("cp", "coreutils")
    run([cp, "-a", "--reflink=auto", "--", str(guest.root), str(root)])
    if arch is Arch.host():
        for library in _libraries(sample_containers.install(root)):
            _place(library, root)  # only what the guest's own Debian lacks (libip6tc for ip6tables)
    else:
        source = sample_userland.prepare(arch)
        _place_unpacked(source, arch, sample_containers.install(root, source, arch), root)
    sample_guest.enable_containers(root)


def _boot_files(guest: sample_guest.Guest, efi: Partition) -> dict[str, Path]:
    """The kernel and initramfs as A, and as B too when the FAT has room for both (1 MiB kept free)."""
    files = {"vmlinuz.A": guest.kernel, "initrd.A": guest.initrd}
    size = guest.kernel.stat().st_size + guest.initrd.stat().st_size
    if 2 * size + (1 << 20) <= efi.size * SECTOR:
        files.update({"vmlinuz.B": guest.kernel, "initrd.B": guest.initrd})
    return files


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    root_hexdigest: str
    salt: str


@contextlib.contextmanager
def _atomic_output(output: Path) -> Iterator[Path]:
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)


def _check_grub_format(grub_format: str) -> None:
    if grub_format not in GRUB_FORMATS:
        raise ValidationError(f"-grub-format={grub_format}: use one of {', '.join(GRUB_FORMATS)}")


def build(
    output: Path,
    size_gb: int = 10,
    *,
    grub_format: str = "dm",
    bootable: bool = False,
    with_containers: bool = False,
    arch: Arch | None = None,
) -> Sample:
    """Write the sample image to `output` (replaced atomically).

    `grub_format`: "dm" (`dm="1 vroot ..."`, the default) or "dm-mod" (`dm-mod.create="vroot,..."`).
    `bootable`: ROOT-A is `sample_guest`'s systemd root and EFI-SYSTEM has its kernel and initramfs
    (needs root, debootstrap and busybox-static; the guest is built once per machine and cached).
    `with_containers`: ROOT-A also has this machine's container runtime (`sample_containers`).
    `arch` (default: this machine's): the image's machine (another one's programs come from Debian's packages).
    """
    arch = arch or Arch.host()
    _check_grub_format(grub_format)
    if with_containers and arch is Arch.host():
        sample_containers.check_host()
    if size_gb < 10:
        raise ValidationError(f"-size-gb={size_gb}: a sample COS image needs at least 10 GB")
    guest = sample_guest.prepare(os_release(), arch=arch) if bootable else None
    disk_sectors = size_gb * GiB // SECTOR
    table = new_table(disk_sectors, partitions(disk_sectors))
    parts = {p.name: p for p in table.partitions if p.name != "reserved"}
    with tempfile.TemporaryDirectory(prefix="cos-sample.") as tmp, _atomic_output(output) as image:
        staging = Path(tmp)
        with open(image, "wb") as out:
            out.truncate(disk_sectors * SECTOR)
        write_table(image, table)
        root = staging / "root"
        if guest is None:
            root_tree(root, with_containers=with_containers, arch=arch)
        elif with_containers:
            _guest_with_containers(guest, root, arch)
        else:
            root = guest.root
        _mke2fs(image, parts["ROOT-A"], "ext2", "ROOT-A", root, ROOT_FS_BLOCKS, lazy=guest is None)
        root_a = parts["ROOT-A"].first * SECTOR
        params = format_verity(
            image,
            data_offset=root_a,
            data_blocks=ROOT_FS_BLOCKS,
            hash_offset=root_a + ROOT_FS_BLOCKS * 4096,
            salt=random_salt(),
        )
        state_tree(staging / "state", with_containers=with_containers and guest is not None)
        _mke2fs(image, parts["STATE"], "ext4", "STATE", staging / "state", lazy=guest is None)
        oem_tree(staging / "oem")
        _mke2fs(image, parts["OEM"], "ext4", "OEM", staging / "oem", lazy=guest is None)
        cfg = grub_cfg(parts["ROOT-A"], parts["ROOT-B"], params.root_hexdigest, params.salt_hex, grub_format,
                       initrd=guest is not None, arch=arch)  # fmt: skip
        files = _boot_files(guest, parts["EFI-SYSTEM"]) if guest else None
        _efi(image, parts["EFI-SYSTEM"], cfg, files)
    return Sample(output, params.root_hexdigest, params.salt_hex)
