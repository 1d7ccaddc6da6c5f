"""The bootable sample's guest: a Debian systemd root laid out as COS, a Debian kernel and its initramfs.

`sample-image -bootable` puts this guest in the sample image: the root tree becomes ROOT-A (with the
same dm-verity tree as the plain sample), the kernel and initramfs go on EFI-SYSTEM as
`/syslinux/vmlinuz.A` and `/syslinux/initrd.A`, and grub.cfg's entries get an `initrd` line. The
qemu executor then boots it as COS's GRUB would (`executors.qemu.boot`).

The guest (built once, cached under ~/.cache/cos-customizer/sample-guest/KEY; KEY is `RECIPE` and a
digest of the os-release the image carries):

- root: `debootstrap --variant=minbase` of Debian bookworm from this machine's apt mirror, with
  systemd, udev, cloud-init, dmsetup, sudo and apparmor's parser (docker loads its profile with it)
  (gdisk, a hard dependency of cloud-init, is purged: COS has no sgdisk). The kernel's modules are
  pruned to what a VM needs (`VM_MODULES` and their dependencies) and indexed with the root's depmod.
  /etc/resolv.conf is debootstrap's copy of the building machine's (QEMU's own forwarder at
  169.254.0.3 timed out every lookup here, 6 s each, and cloud-init makes several).
- COS's runtime layout as units: `/` read-only (the verity device), `/etc` writable and stateless
  (an overlay with a tmpfs upper, made by the initramfs), STATE on /mnt/stateful_partition by
  `mnt-stateful_partition.mount`, `/var` and `/home` bind mounts of its `var_overlay` and `home`,
  OEM on /usr/share/oem by `usr-share-oem.mount`, `/tmp` a noexec tmpfs (`tmp.mount`), /mnt/disks
  a small tmpfs. `/var` is noexec, as on COS, so /var/lib/cloud is bind-mounted exec over itself
  (cloud-init executes the scripts it writes there).
- units named as COS's, for checks written for COS: `update-engine.service` (a stand-in that updates
  nothing, masked by disable-auto-update's `systemd.mask=`) and `gcr-online.target` (the network is up).
  With `-with-containers`, `enable_containers` starts the runtime at boot and mounts its data
  directories on STATE executable at /var/lib/docker and /var/lib/containerd, as COS does.
- `rootdev`: a shell stand-in for COS's tool (`rootdev -s` prints the partition under the root's
  device-mapper device, /dev/sda3 when booted from ROOT-A).
- cloud-init with the GCE datasource only, in one stage (cloud-init.service; -local, -config and
  -final are masked) running write_files, runcmd and scripts_user on every boot (frequency
  `always`), as COS does; systemd-networkd DHCP on the virtio NIC; units a VM does not need masked.
- kernel: the Debian linux-image-6.1 amd64 package (`apt-get download`, cached under
  ~/.cache/cos-customizer/debian-kernel). The initramfs (`sample.initramfs`: busybox, dmsetup and blkid
  with their libraries, the modules of `INITRD_MODULES`) sets up the devices of `dm="..."` (ChromeOS form, N
  devices) or `dm-mod.create="..."` (upstream form) with dmsetup, mounts `root=` read-only, and
  switches to `init=`. A verity device or root that cannot be set up or read stops the boot with
  `cos-initrd: FATAL:` on the console and powers off: it never falls back to the unverified partition.

`prepare(..., arch=Arch.ARM64)` builds the same guest from Debian's arm64 packages on this x86-64 machine
(cached apart, under arm64-RECIPE_ARM64-DIGEST): debootstrap's second stage, the chroot commands and the
root's own apt-get (fetching Debian's arm64 kernel and busybox-static) run under qemu-aarch64-static
(`binfmt.emulation`); the serial console is ttyAMA0 and GCE's ports 2-4 are /dev/ttyAMA1..3
(`sample.guest_arm64`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import re
import shutil
import time
from pathlib import Path

from cos_customizer import binfmt, privilege
from cos_customizer.arch import Arch
from cos_customizer.cache import home as cache_home
from cos_customizer.cache import locked as cache_lock
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run
from cos_customizer.sample import guest_arm64, initramfs

log = logging.getLogger(__name__)

RECIPE = "3"  # change it when the guest's recipe changes: the cached guest is rebuilt
RECIPE_ARM64 = "2"  # the same for the arm64 guest
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "e2fsprogs", "util-linux", "mount", "fdisk", "cloud-init",
            "python3-cffi-backend", "dmsetup", "sudo", "apparmor")  # fmt: skip
KERNEL_PACKAGE = r"linux-image-6\.1\.0-(\d+)-amd64"  # Debian 12's kernel, not -cloud or -rt
# Kept in the root's /lib/modules (with their dependencies), for udev and mount to load.
VM_MODULES = (
    *initramfs.INITRD_MODULES,
    "virtio_blk", "virtio_rng", "virtio_balloon", "virtio_console", "sg", "sr_mod", "vfat", "msdos", "nls_cp437",
    "nls_ascii", "nls_iso8859_1", "nls_utf8", "loop", "squashfs", "isofs", "fuse", "autofs4", "efivarfs", "tun",
    "veth", "bridge", "br_netfilter", "ip_tables", "iptable_filter", "iptable_nat", "xt_MASQUERADE",
    "xt_conntrack", "xt_addrtype", "nf_nat", "nf_conntrack", "dm_crypt", "sha256_ssse3",
)  # fmt: skip
# Units a VM does not need (or that would slow every boot of a stateless /etc), masked.
MASKED = (
    "getty@.service", "getty-static.service", "console-getty.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-pstore.service", "systemd-journal-flush.service", "systemd-random-seed.service",
    "systemd-sysusers.service", "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-fsck-root.service", "systemd-hwdb-update.service", "ldconfig.service",
    "systemd-journal-catalog-update.service", "systemd-update-done.service", "systemd-logind.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "systemd-tmpfiles-clean.timer",
    "cloud-init-local.service", "cloud-config.service", "cloud-final.service", "cloud-init-hotplugd.socket",
    "apparmor.service",  # docker loads its docker-default profile itself, when it first runs a container
)  # fmt: skip
# Generators a VM with a verified root and no /etc/fstab does not need (gpt-auto would automount the EFI
# partition on /boot); cloud-init's runs ds-identify at every boot, for the one datasource it may use.
MASKED_GENERATORS = ("systemd-gpt-auto-generator", "systemd-cryptsetup-generator", "systemd-integritysetup-generator",
                     "systemd-veritysetup-generator", "systemd-hibernate-resume-generator", "systemd-sysv-generator",
                     "systemd-rc-local-generator", "cloud-init-generator")  # fmt: skip
# Tools the provisioner may not count on finding on COS; removed if a dependency brought them in.
NOT_ON_COS = ("gdisk",)

# ---------------------------------------------------------------------------------------------------------------
# Units and configuration of the root

_MOUNTS = {
    "mnt-stateful_partition.mount": (
        "COS stateful partition (STATE)", "", "/dev/disk/by-partlabel/STATE", "/mnt/stateful_partition", "ext4",
        "rw,nosuid,nodev,noexec,commit=30",
    ),
    "var.mount": (
        "/var from the stateful partition", "mnt-stateful_partition.mount", "/mnt/stateful_partition/var_overlay",
        "/var", "none", "bind,nosuid,nodev,noexec",
    ),
    "var-lib-cloud.mount": (
        "cloud-init's scripts, executable on the noexec /var", "var.mount", "/var/lib/cloud", "/var/lib/cloud",
        "none", "bind,nosuid,nodev,exec",
    ),
    "home.mount": (
        "/home from the stateful partition", "mnt-stateful_partition.mount", "/mnt/stateful_partition/home",
        "/home", "none", "bind,nosuid,nodev,noexec",
    ),
    "usr-share-oem.mount": (
        "COS OEM partition", "", "/dev/disk/by-partlabel/OEM", "/usr/share/oem", "ext4", "rw,nosuid,nodev,noexec",
    ),
    "tmp.mount": (
        "Temporary directory /tmp (noexec, as on COS)", "", "tmpfs", "/tmp", "tmpfs",
        "mode=1777,strictatime,nosuid,nodev,noexec,size=50%,nr_inodes=1m",
    ),
    "mnt-disks.mount": (
        "A writable /mnt/disks for mount points, as on COS", "", "tmpfs", "/mnt/disks", "tmpfs",
        "mode=0755,nosuid,nodev,noexec,size=256k",
    ),
}  # fmt: skip

ROOTDEV = """#!/bin/sh
# rootdev: a stand-in for COS's rootdev(1), written by cos-customizer's bootable sample image.
# Prints the block device of the root file system: /dev/dm-0 for a verified root; with -s, the
# partition under that device-mapper device (/dev/sda3 when booted from ROOT-A), as COS's
# `rootdev -s` does; with -d, the whole disk of the result.
set -eu
strip=no disk=no
for arg in "$@"; do
  case "$arg" in
    -s) strip=yes ;;
    -d) disk=yes ;;
    -h|--help) echo "usage: rootdev [-s] [-d]"; exit 0 ;;
    *) echo "rootdev: unknown option $arg" >&2; exit 2 ;;
  esac
done
majmin=$(mountpoint -d /)
dev=$(basename "$(readlink -f "/sys/dev/block/$majmin")")
if [ "$strip" = yes ] && [ -d "/sys/block/$dev/slaves" ]; then
  for slave in "/sys/block/$dev/slaves/"*; do
    [ -e "$slave" ] && { dev=$(basename "$slave"); break; }
  done
fi
if [ "$disk" = yes ] && [ -e "/sys/class/block/$dev/partition" ]; then
  dev=$(basename "$(dirname "$(readlink -f "/sys/class/block/$dev")")")
fi
echo "/dev/$dev"
"""

CLOUD_CFG = """# cos-customizer's bootable sample image: cloud-init as COS runs it.
# GCE's datasource only; one stage (cloud-init.service) runs write_files, runcmd and scripts_user
# on every boot, as on COS (a startup cloud-config writes to the stateless /tmp and /etc).
datasource_list: [ GCE ]
datasource:
  GCE:
    retries: 5
    sec_between_retries: 1
network:
  config: disabled
preserve_hostname: true
manual_cache_clean: false
cloud_init_modules:
 - [write_files, always]
 - [runcmd, always]
 - [scripts_user, always]
cloud_config_modules: []
cloud_final_modules: []
system_info:
  distro: debian
  paths:
    cloud_dir: /var/lib/cloud/
    templates_dir: /etc/cloud/templates/
"""

# Units named as COS's, for checks written for COS: the updater (a stand-in that updates nothing; masked by
# `systemd.mask=update-engine.service`, which disable-auto-update puts on the command line) and the target
# COS reaches once gcr.io answers (here: once the network is up).
COS_UNITS = {
    "update-engine.service": (
        "[Unit]\nDescription=Update Engine (a stand-in of the sample image: it updates nothing)\n"
        "After=network-online.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    "gcr-online.target": (
        "[Unit]\nDescription=Container registry reachable (the sample image: the network is up)\n"
        "Wants=network-online.target\nAfter=network-online.target\n\n[Install]\nWantedBy=multi-user.target\n"
    ),
}
# The serial console (ttyS0, ttyAMA0 on arm64: `cos-customizer boot`'s console mode): root is logged in, no
# password (a test image).
AUTOLOGIN = """[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM
"""
# With -with-containers: the runtime's data on STATE, executable (overlay layers run from there) as on COS,
# and its units started at boot.
CONTAINER_MOUNTS = ("docker", "containerd")
CONTAINER_UNITS = (("multi-user.target.wants", "containerd.service"), ("multi-user.target.wants", "docker.service"),
                   ("sockets.target.wants", "docker.socket"))  # fmt: skip

NETWORK = """[Match]
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""


def _mount_unit(description: str, needs: str, what: str, where: str, fstype: str, options: str) -> str:
    unit = f"[Unit]\nDescription={description}\n"
    if needs:
        unit += f"Requires={needs}\nAfter={needs}\n"
    if where == "/var/lib/cloud":
        unit += "Before=cloud-init.service\n"
    if fstype == "tmpfs":
        unit += "DefaultDependencies=no\nConflicts=umount.target\nBefore=local-fs.target umount.target\n"
    unit += f"\n[Mount]\nWhat={what}\nWhere={where}\nType={fstype}\nOptions={options}\n"
    return unit + "\n[Install]\nWantedBy=local-fs.target\n"


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def configure(root: Path, os_release: str, arch: Arch = Arch.AMD64) -> None:
    """Lay out a debootstrapped root as COS: units, mount points, cloud-init, network, masks, rootdev."""
    units = root / "usr/lib/systemd/system"
    for name, fields in _MOUNTS.items():
        (units / name).write_text(_mount_unit(*fields))
        _symlink(units / "local-fs.target.wants" / name, f"../{name}")
    for directory in ("mnt/stateful_partition", "mnt/disks", "usr/share/oem", "home", "var/lib/cloud"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    etc = root / "etc"
    for name in MASKED:
        _symlink(etc / "systemd/system" / name, "/dev/null")
    for name in MASKED_GENERATORS:
        _symlink(etc / "systemd/system-generators" / name, "/dev/null")
    for wants, name in (("multi-user.target.wants", "cloud-init.target"),  # what cloud-init's generator links
                        ("multi-user.target.wants", "systemd-networkd.service"),
                        ("sockets.target.wants", "systemd-networkd.socket"),
                        ("network-online.target.wants", "systemd-networkd-wait-online.service")):  # fmt: skip
        _symlink(etc / "systemd/system" / wants / name, f"/lib/systemd/system/{name}")
    (etc / "systemd/network").mkdir(parents=True, exist_ok=True)
    (etc / "systemd/network/50-dhcp.network").write_text(NETWORK)
    (etc / "cloud/cloud.cfg").write_text(CLOUD_CFG)
    (etc / "hosts").write_text(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        "127.0.1.1 cos-sample\n169.254.169.254 metadata.google.internal metadata\n"
    )
    (etc / "hostname").write_text("cos-sample\n")
    (etc / "fstab").write_text("# The file systems of the sample image are mounted by systemd units (COS's layout).\n")
    (etc / "machine-id").write_text("")  # each boot of a stateless /etc gets its own
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for name in ("etc/os-release", "usr/lib/os-release"):
        (root / name).unlink(missing_ok=True)
    (root / "usr/lib/os-release").write_text(os_release)
    _symlink(etc / "os-release", "../usr/lib/os-release")
    for name, line in (("passwd", "chronos:x:1000:1000:chronos:/home/chronos:/bin/bash"), ("group", "chronos:x:1000:"),
                       ("shadow", "chronos:*:19000:0:99999:7:::")):  # fmt: skip
        if "\nchronos:" not in "\n" + (etc / name).read_text():
            with open(etc / name, "a") as file:
                file.write(line + "\n")
    rootdev = root / "usr/bin/rootdev"
    rootdev.write_text(ROOTDEV)
    rootdev.chmod(0o755)
    console, autologin = ("ttyS0", AUTOLOGIN) if arch is Arch.AMD64 else (guest_arm64.CONSOLE, guest_arm64.AUTOLOGIN)
    (etc / f"systemd/system/serial-getty@{console}.service.d").mkdir(parents=True, exist_ok=True)
    (etc / f"systemd/system/serial-getty@{console}.service.d/autologin.conf").write_text(autologin)
    if arch is Arch.ARM64:
        guest_arm64.configure(root)
    for name, text in COS_UNITS.items():
        (units / name).write_text(text)
        _symlink(etc / "systemd/system/multi-user.target.wants" / name, f"/lib/systemd/system/{name}")


def enable_containers(root: Path) -> None:
    """Start the container runtime (copied into `root` by `sample.containers.install`) at boot, with its
    data directories on STATE mounted executable (STATE's var_overlay must have lib/docker and lib/containerd)."""
    units = root / "usr/lib/systemd/system"
    for name in CONTAINER_MOUNTS:
        unit = f"var-lib-{name}.mount"
        text = _mount_unit(f"{name}'s data on STATE, executable", "var.mount",
                           f"/mnt/stateful_partition/var_overlay/lib/{name}", f"/var/lib/{name}", "none",
                           "bind,nosuid,nodev,exec")  # fmt: skip
        (units / unit).write_text(text)
        _symlink(units / "local-fs.target.wants" / unit, f"../{unit}")
    for wants, name in CONTAINER_UNITS:
        _symlink(root / "etc/systemd/system" / wants / name, f"/lib/systemd/system/{name}")


# ---------------------------------------------------------------------------------------------------------------
# The kernel and its modules


def _kernel_package() -> str:
    """The newest `linux-image-6.1.0-N-amd64` apt knows (from its local lists: nothing is downloaded)."""
    names = run([require_tool("apt-cache", "apt"), "pkgnames", "linux-image-6.1.0-"]).stdout.decode().split()
    abis = [(int(m.group(1)), name) for name in names if (m := re.fullmatch(KERNEL_PACKAGE, name))]
    if not abis:
        raise CustomizerError("apt knows no linux-image-6.1.0-N-amd64 package: run apt-get update (Debian 12 lists)")
    return max(abis)[1]


def fetch_kernel(cache: Path | None = None) -> tuple[Path, Path]:
    """(vmlinuz, /lib/modules/VERSION) of Debian's linux-image-6.1.0-N-amd64, fetched with apt-get on first use.

    Cached in ~/.cache/cos-customizer/debian-kernel/PACKAGE/tree (the newest one there is used).
    """
    cache = cache or cache_home() / "debian-kernel"
    cache.mkdir(parents=True, exist_ok=True)

    def cached() -> list[Path]:
        found = []
        for vmlinuz in cache.glob("*/tree/boot/vmlinuz-*"):
            if match := re.fullmatch(KERNEL_PACKAGE, vmlinuz.parents[2].name):
                found.append((int(match.group(1)), vmlinuz))
        return [vmlinuz for _, vmlinuz in sorted(found)]

    if not cached():
        with cache_lock(cache / ".lock", "the Debian kernel"):
            if not cached():
                package = _kernel_package()
                directory = cache / package
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir()
                fetched = run([require_tool("apt-get", "apt"), "download", package], cwd=directory, check=False)
                debs = sorted(directory.glob(f"{package}_*.deb"))
                if fetched.returncode != 0 or not debs:
                    detail = fetched.stderr.decode(errors="replace").strip().splitlines()
                    raise CustomizerError(
                        f"cannot fetch the Debian kernel with apt-get download {package}: "
                        f"{detail[-1] if detail else 'no package'} (the apt mirror must be reachable)"
                    )
                partial = directory / "tree.partial"
                run([require_tool("dpkg-deb", "dpkg"), "-x", str(debs[-1]), str(partial)])
                partial.rename(directory / "tree")
    found = cached()
    if not found:
        raise CustomizerError(f"{cache}: the Debian kernel package holds no boot/vmlinuz-*")
    vmlinuz = found[-1]
    return vmlinuz, vmlinuz.parents[1] / "lib" / "modules" / vmlinuz.name.removeprefix("vmlinuz-")


def prune_modules(source: Path, root: Path, wanted: tuple[str, ...] = VM_MODULES) -> Path:
    """Copy the modules of `wanted` (and dependencies) from `source` into `root`; index them with depmod."""
    version = source.name
    target = root / "usr/lib/modules" / version
    for ko in initramfs.module_order(source, wanted):
        copy = target / ko.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ko, copy)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    run([require_tool("chroot", "coreutils"), str(root), "/usr/sbin/depmod", version])
    return target


# ---------------------------------------------------------------------------------------------------------------
# Building and caching


def check_host(arch: Arch = Arch.AMD64) -> None:
    """Refuse, in one line, a machine that cannot build the guest."""
    if not privilege.is_root():
        raise ValidationError("-bootable builds a Debian root with debootstrap and chroot: run it as root")
    for tool, package in (("debootstrap", "debootstrap"), ("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise ValidationError(f"-bootable needs {tool}: apt-get install {package} (scripts/setup does)")
    if arch is not Arch.AMD64:
        binfmt.require_emulator(arch)  # its busybox comes from Debian's packages for it
    elif not initramfs.BUSYBOX.exists():
        raise ValidationError("-bootable needs /bin/busybox for the initramfs: apt-get install busybox-static")


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """This machine's Debian mirror for `SUITE` main (from sources.list and *.sources), or Debian's default."""
    candidates: list[tuple[str, list[str], list[str]]] = []
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb":
                    candidates.append((words[1], [words[2]], words[3:]))
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields = dict(re.findall(r"^(\w[\w-]*):[ \t]*(.*)$", stanza, re.MULTILINE))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    for uri in fields.get("URIs", "").split():
                        candidates.append((uri, fields.get("Suites", "").split(), fields.get("Components", "").split()))
    for uri, suites, components in candidates:
        if SUITE in suites and "main" in components and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _unmount_all(path: Path) -> None:
    """Unmount what debootstrap (ours) left mounted inside `path`; refuse to go on if something stays."""
    if not path.exists():
        return
    umount = require_tool("umount", "mount")
    for point in _mounts_under(path):
        run([umount, point], check=False)
    left = _mounts_under(path)
    if left:
        raise CustomizerError(f"{left[0]} is still mounted inside the guest being built: unmount it, then retry")


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        _unmount_all(path)
        shutil.rmtree(path)


def _debootstrap(target: Path, mirror: str, arch: Arch = Arch.AMD64) -> None:
    tool = require_tool("debootstrap", "debootstrap")
    args = [] if arch is Arch.AMD64 else [f"--arch={arch.debian}"]
    try:
        hint = f"debootstrap of Debian {SUITE} from {mirror}; its log: {target}/debootstrap/debootstrap.log"
        run([tool, *args, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(target), mirror],
            hint=hint)  # fmt: skip
    finally:
        _unmount_all(target)


def _strip(root: Path) -> None:
    """Drop what the image does not need: packages COS does not have, apt's caches and lists, docs."""
    chroot = require_tool("chroot", "coreutils")
    run([chroot, str(root), "dpkg", "--purge", "--force-depends", *NOT_ON_COS])
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*",
                    "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "var/log/*.log"):  # fmt: skip
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


@dataclasses.dataclass(frozen=True)
class Guest:
    """A built guest: the root tree (for ROOT-A), the kernel and the initramfs (for EFI-SYSTEM)."""

    directory: Path
    root: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    cached: bool


def _guest(directory: Path, cached: bool) -> Guest:
    version = (directory / "kernel-version").read_text().strip()
    return Guest(directory, directory / "root", directory / "vmlinuz", directory / "initrd.img", version, cached)


def cache_key(os_release: str, arch: Arch = Arch.AMD64) -> str:
    digest = hashlib.sha256(os_release.encode()).hexdigest()[:12]
    return f"{RECIPE}-{digest}" if arch is Arch.AMD64 else f"{arch.debian}-{RECIPE_ARM64}-{digest}"


def prepare(os_release: str, *, arch: Arch = Arch.AMD64, cache: Path | None = None) -> Guest:
    """The guest for `arch`, from the cache or built into it (once per machine and architecture; a second
    process waits for the first)."""
    check_host(arch)
    base = cache or cache_home() / "sample-guest"
    base.mkdir(parents=True, exist_ok=True)
    final = base / cache_key(os_release, arch)
    if (final / "done").exists():
        return _guest(final, True)
    with cache_lock(base / ".lock", "the sample image's guest"):
        if (final / "done").exists():
            return _guest(final, True)
        for stale in base.glob("*.partial"):
            _remove_tree(stale)
        partial = base / f"{final.name}.partial"
        started = time.monotonic()
        try:
            if arch is Arch.AMD64:
                _build(partial, os_release)
            else:
                _build_foreign(partial, os_release, arch)
            _remove_tree(final)
            partial.rename(final)
        except BaseException:
            with contextlib.suppress(CustomizerError, OSError):
                _remove_tree(partial)
            raise
        log.info("Built the sample image's %s guest in %s in %.0f s", arch.debian, final, time.monotonic() - started)
        return _guest(final, False)


def _build(directory: Path, os_release: str) -> None:
    directory.mkdir(parents=True)
    root = directory / "root"
    vmlinuz, modules = fetch_kernel()
    mirror = apt_mirror()
    log.info("Building the sample image's guest: debootstrap %s from %s (a few minutes, once)...", SUITE, mirror)
    _debootstrap(root, mirror)
    _strip(root)
    configure(root, os_release)
    pruned = prune_modules(modules, root)
    shutil.copy2(vmlinuz, directory / "vmlinuz")
    (directory / "initrd.img").write_bytes(initramfs.initramfs(root, pruned))
    (directory / "kernel-version").write_text(modules.name + "\n")
    (directory / "done").write_text(f"recipe {RECIPE}\n")


def _build_foreign(directory: Path, os_release: str, arch: Arch) -> None:
    """The guest for another machine (arm64 on x86-64): its programs run under qemu-user-static."""
    directory.mkdir(parents=True)
    mirror = apt_mirror()
    log.info("Building the sample image's %s guest: debootstrap %s from %s, its second stage under emulation "
             "(many minutes, once)...", arch.debian, SUITE, mirror)  # fmt: skip
    with binfmt.emulation(arch):
        _debootstrap(directory / "root", mirror, arch)
        _finish_foreign(directory, os_release, arch)


def _finish_foreign(directory: Path, os_release: str, arch: Arch) -> None:
    """`directory`/root, debootstrapped, made the guest: kernel, busybox, configuration, initramfs. It runs the
    root's programs: call it under `binfmt.emulation(arch)`."""
    root = directory / "root"
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    kernel_deb, busybox_deb = guest_arm64.download(root, root / "cos-customizer-debs")
    for deb, into in ((kernel_deb, directory / "kernel"), (busybox_deb, directory / "busybox")):
        run([dpkg_deb, "-x", str(deb), str(into)])
    shutil.rmtree(root / "cos-customizer-debs")
    _strip(root)
    configure(root, os_release, arch)
    vmlinuz = next((directory / "kernel/boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise CustomizerError(f"{kernel_deb.name}: the Debian kernel package holds no boot/vmlinuz-*")
    modules = directory / "kernel/lib/modules" / vmlinuz.name.removeprefix("vmlinuz-")
    pruned = prune_modules(modules, root, (*VM_MODULES, *guest_arm64.MODULES))
    initrd = initramfs.initramfs(root, pruned, busybox=directory / "busybox" / guest_arm64.BUSYBOX,
                                 wanted=(*guest_arm64.INITRD_MODULES, *initramfs.INITRD_MODULES))  # fmt: skip
    # Debian's arm64 vmlinuz is an uncompressed Image (33 MB, more than the sample's 32 MiB EFI-SYSTEM): it is
    # stored gzip-compressed, which QEMU's loader (the one booting it) unpacks.
    with open(vmlinuz, "rb") as image, gzip.GzipFile(directory / "vmlinuz", "wb", 6, mtime=0) as compressed:
        shutil.copyfileobj(image, compressed)
    (directory / "initrd.img").write_bytes(initrd)
    (directory / "kernel-version").write_text(modules.name + "\n")
    shutil.rmtree(directory / "kernel")
    shutil.rmtree(directory / "busybox")
    (directory / "done").write_text(f"recipe {RECIPE_ARM64} {arch.debian}\n")
