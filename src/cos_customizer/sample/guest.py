"""The bootable sample's guest: a Debian systemd root laid out as COS, a Debian kernel and its initramfs.

`sample-image -bootable` puts this guest in the sample image: the root tree becomes ROOT-A (with the
same dm-verity tree as the plain sample), the kernel and initramfs go on EFI-SYSTEM as
`/syslinux/vmlinuz.A` and `/syslinux/initrd.A`, and grub.cfg's entries get an `initrd` line. The
qemu executor then boots it as COS's GRUB would (`executors.qemu.boot`).

The guest (built once, cached under ~/.cache/cos-customizer/sample-guest/KEY; KEY is `RECIPE` and a
digest of the os-release the image carries):

- root: `debootstrap --variant=minbase` of Debian bookworm from this machine's apt mirror, with
  systemd, udev, cloud-init and dmsetup (gdisk, a hard dependency of cloud-init, is purged: COS has
  no sgdisk). The kernel's modules are pruned to what a VM needs (`VM_MODULES` and their
  dependencies) and indexed with the root's depmod.
- COS's runtime layout as units: `/` read-only (the verity device), `/etc` writable and stateless
  (an overlay with a tmpfs upper, made by the initramfs), STATE on /mnt/stateful_partition by
  `mnt-stateful_partition.mount`, `/var` and `/home` bind mounts of its `var_overlay` and `home`,
  OEM on /usr/share/oem by `usr-share-oem.mount`, `/tmp` a noexec tmpfs (`tmp.mount`), /mnt/disks
  a small tmpfs. `/var` is noexec, as on COS, so /var/lib/cloud is bind-mounted exec over itself
  (cloud-init executes the scripts it writes there).
- `rootdev`: a shell stand-in for COS's tool (`rootdev -s` prints the partition under the root's
  device-mapper device, /dev/sda3 when booted from ROOT-A).
- cloud-init with the GCE datasource only, in one stage (cloud-init.service; -local, -config and
  -final are masked) running write_files, runcmd and scripts_user on every boot (frequency
  `always`), as COS does; systemd-networkd DHCP on the virtio NIC; units a VM does not need masked.
- kernel: the Debian linux-image-6.1 amd64 package (`apt-get download`, cached under
  ~/.cache/cos-customizer/debian-kernel). The initramfs (busybox, dmsetup and blkid with their
  libraries, the modules of `INITRD_MODULES`) sets up the devices of `dm="..."` (ChromeOS form, N
  devices) or `dm-mod.create="..."` (upstream form) with dmsetup, mounts `root=` read-only, and
  switches to `init=`. A verity device or root that cannot be set up or read stops the boot with
  `cos-initrd: FATAL:` on the console and powers off: it never falls back to the unverified partition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.runner import require_tool, run

log = logging.getLogger(__name__)

RECIPE = "1"  # change it when the guest's recipe changes: the cached guest is rebuilt
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "e2fsprogs", "util-linux", "mount", "fdisk", "cloud-init",
            "python3-cffi-backend", "dmsetup")  # fmt: skip
KERNEL_PACKAGE = r"linux-image-6\.1\.0-(\d+)-amd64"  # Debian 12's kernel, not -cloud or -rt
BUSYBOX = Path("/bin/busybox")
# Loaded by the initramfs, in dependency order: the boot disk, the verified root, /etc's overlay, the NIC.
INITRD_MODULES = ("crc32c_generic", "crct10dif_generic", "virtio_pci", "virtio_scsi", "sd_mod", "dm_mod",
                  "dm_verity", "ext4", "overlay", "virtio_net")  # fmt: skip
# Kept in the root's /lib/modules (with their dependencies), for udev and mount to load.
VM_MODULES = (
    *INITRD_MODULES,
    "virtio_blk", "virtio_rng", "virtio_balloon", "virtio_console", "sg", "sr_mod", "vfat", "msdos", "nls_cp437",
    "nls_ascii", "nls_iso8859_1", "nls_utf8", "loop", "squashfs", "isofs", "fuse", "autofs4", "efivarfs", "tun",
    "veth", "bridge", "br_netfilter", "ip_tables", "iptable_filter", "iptable_nat", "xt_MASQUERADE",
    "xt_conntrack", "xt_addrtype", "nf_nat", "nf_conntrack", "dm_crypt", "sha256_ssse3",
)  # fmt: skip
# Units a VM does not need (or that would slow every boot of a stateless /etc), masked.
MASKED = (
    "getty.target", "getty@.service", "serial-getty@.service", "getty-static.service", "console-getty.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-pstore.service", "systemd-journal-flush.service", "systemd-random-seed.service",
    "systemd-sysusers.service", "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-fsck-root.service", "systemd-hwdb-update.service", "ldconfig.service",
    "systemd-journal-catalog-update.service", "systemd-update-done.service", "systemd-logind.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "systemd-tmpfiles-clean.timer",
    "cloud-init-local.service", "cloud-config.service", "cloud-final.service", "cloud-init-hotplugd.socket",
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


def configure(root: Path, os_release: str) -> None:
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
        "169.254.169.254 metadata.google.internal metadata\n"
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


# ---------------------------------------------------------------------------------------------------------------
# The initramfs's scripts

# /proc/cmdline as the kernel splits it: one parameter a line, double quotes removed (`dm="a b"` and
# GRUB's `"dm=a b"` both give `dm=a b`).
CMDLINE_AWK = r"""{
  n = length($0); word = ""; quoted = 0; have = 0
  for (i = 1; i <= n; i++) {
    c = substr($0, i, 1)
    if (c == "\"") { quoted = !quoted; have = 1; continue }
    if (!quoted && (c == " " || c == "\t")) { if (have) print word; word = ""; have = 0; continue }
    word = word c; have = 1
  }
  if (have) print word
}
"""

# The ChromeOS `dm="N DEVICE[,DEVICE...]"`, DEVICE = `NAME UUID ro|rw TABLES,TABLE[,TABLE...]`, as a plan:
# `dev NAME FLAGS` then one `table START SECTORS TARGET ARGS` line per table, verity's key=value
# arguments turned into the kernel's positional ones (format 0, 4096-byte blocks).
DM_AWK = r"""function fail(message) { print "error " message; exit 1 }
function verity(t, w, n,    i, eq, p, salt, alg, start) {
  for (i = 4; i <= n; i++) { eq = index(w[i], "="); if (eq) p[substr(w[i], 1, eq - 1)] = substr(w[i], eq + 1) }
  if (!("payload" in p) || !("hashtree" in p) || !("root_hexdigest" in p))
    fail("dm= verity table without payload=, hashtree= or root_hexdigest=: " t)
  salt = ("salt" in p) ? p["salt"] : "-"
  alg = ("alg" in p) ? p["alg"] : "sha256"
  start = ("hashstart" in p) ? p["hashstart"] : w[2]
  return w[1] " " w[2] " verity 0 " p["payload"] " " p["hashtree"] " 4096 4096 " int(w[2] / 8) " " \
    int(start / 8) " " alg " " p["root_hexdigest"] " " salt
}
function table(t,    w, n) {
  n = split(t, w, " ")
  if (n < 3) fail("dm= table is not START SECTORS TARGET ...: " t)
  if (w[3] == "verity" && index(w[4], "=")) return verity(t, w, n)
  return t
}
{
  count = $1
  if (count !~ /^[0-9]+$/) fail("dm= does not start with its number of devices: " $0)
  parts = split(substr($0, index($0, count) + length(count)), part, ",")
  i = 1
  for (d = 0; d < count; d++) {
    if (split(part[i++], h, " ") != 4 || h[4] !~ /^[0-9]+$/) fail("dm= device " d + 1 " is not NAME UUID FLAGS TABLES")
    print "dev " h[1] " " h[3]
    for (t = 0; t < h[4]; t++) {
      if (i > parts) fail("dm= device " h[1] " has fewer tables than " h[4])
      print "table " table(part[i++])
    }
  }
}
"""

# The upstream `dm-mod.create="NAME,UUID,MINOR,FLAGS,TABLE[,TABLE...][;...]"`, as the same plan.
DM_MOD_AWK = r"""{
  devices = split($0, dev, ";")
  for (d = 1; d <= devices; d++) {
    fields = split(dev[d], f, ",")
    if (fields < 5) { print "error dm-mod.create device is not NAME,UUID,MINOR,FLAGS,TABLE: " dev[d]; exit 1 }
    name = f[1]; gsub(/^ +| +$/, "", name)
    print "dev " name " " f[4]
    for (i = 5; i <= fields; i++) print "table " f[i]
  }
}
"""

INIT = r"""#!/bin/busybox sh
# /init of cos-customizer's bootable sample image (see cos_customizer/sample/guest.py): set up the
# verified root from dm="..." or dm-mod.create="..." as COS's kernel does, mount root= read-only,
# make /etc writable and stateless, switch to init=. Never falls back to an unverified root.
/bin/busybox mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc -o nosuid,nodev,noexec proc /proc
/bin/busybox mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin DM_DISABLE_UDEV=1

say() { echo "cos-initrd: $*"; }
fatal() {
  echo "cos-initrd: FATAL: $*"
  echo "cos-initrd: FATAL: not booting: the root is not set up as grub.cfg says, and there is no fallback"
  sync
  sleep 1
  poweroff -f
  sleep 3600
}

for m in $(cat /modules/order); do
  insmod "/modules/$m" || fatal "cannot load the kernel module $m"
done

awk -f /cmdline.awk /proc/cmdline > /tmp/cmdline
arg() { awk -v k="$1" 'index($0, k "=") == 1 { v = substr($0, length(k) + 2) } END { print v }' /tmp/cmdline; }

# The partitions' GPT unique GUIDs (lower case): "GUID /dev/sdXN" lines in /tmp/partuuids.
scan() {
  devices=
  for part in /sys/class/block/*; do
    [ -e "$part/partition" ] && devices="$devices /dev/${part##*/}"
  done
  : > /tmp/partuuids
  [ -n "$devices" ] || return 0
  blkid -p -s PART_ENTRY_UUID -o export $devices 2>/dev/null |
    awk -F= '$1 == "DEVNAME" { d = $2 } $1 == "PART_ENTRY_UUID" { print tolower($2), d }' > /tmp/partuuids
}
# PARTUUID=X -> /dev/sdXN, waiting up to 20 s for the disk to appear.
resolve() {
  want=$(echo "${1#PARTUUID=}" | tr A-F a-f)
  tries=0
  while :; do
    dev=$(awk -v u="$want" '$1 == u { print $2; exit }' /tmp/partuuids 2>/dev/null)
    [ -n "$dev" ] && { echo "$dev"; return 0; }
    [ $tries -ge 100 ] && return 1
    [ $tries -gt 0 ] && sleep 0.2
    scan
    tries=$((tries + 1))
  done
}

name=
create() {
  [ -n "$name" ] || return 0
  ro=
  [ "$flags" = ro ] && ro=--readonly
  say "device-mapper $name ($flags): $(cat /tmp/table)"
  dmsetup create "$name" $ro --noudevsync < /tmp/table || fatal "dmsetup cannot create $name from grub.cfg's table"
  if grep -q " verity " /tmp/table; then
    # dm-verity checks a block against the root hash when it is read: read the first one now.
    dd if="/dev/mapper/$name" of=/dev/null bs=4096 count=1 2>/dev/null ||
      fatal "dm-verity: $name does not match the root hash in grub.cfg (see the device-mapper lines above)"
  fi
}

dmmod=$(arg dm-mod.create)
dm=$(arg dm)
if [ -n "$dmmod" ]; then
  echo "$dmmod" | awk -f /dm-mod.awk > /tmp/dm.plan || true
elif [ -n "$dm" ]; then
  echo "$dm" | awk -f /dm.awk > /tmp/dm.plan || true
else
  : > /tmp/dm.plan
fi
while read -r kind rest; do
  case "$kind" in
    error) fatal "$rest" ;;
    dev)
      create
      set -- $rest
      name=$1 flags=$2
      : > /tmp/table
      ;;
    table)
      line=
      for word in $rest; do
        case "$word" in
          PARTUUID=*)
            dev=$(resolve "$word") || fatal "no partition of the boot disk has the $word of grub.cfg"
            word=$dev
            ;;
        esac
        line="$line $word"
      done
      echo "${line# }" >> /tmp/table
      ;;
  esac
done < /tmp/dm.plan
create

root=$(arg root)
case "$root" in
  "") fatal "the kernel command line has no root=" ;;
  PARTUUID=*) root=$(resolve "$root") || fatal "no partition of the boot disk has $(arg root)" ;;
esac
tries=0
while [ ! -b "$root" ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
fstype=$(arg rootfstype)
mount -t "${fstype:-ext2}" -o ro "$root" /newroot ||
  fatal "cannot mount the root $root read-only (a dm-verity error above means ROOT-A does not match grub.cfg)"
init=$(arg init)
init=${init:-/sbin/init}
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fatal "init=$init is not in the root file system"

# /etc: writable and stateless, an overlay of the root's /etc with a tmpfs upper in /run.
mount -t tmpfs -o mode=0755,nosuid,nodev,size=20% tmpfs /newroot/run || fatal "cannot mount /run"
mkdir -p /newroot/run/cos-etc/upper /newroot/run/cos-etc/work
mount -t overlay -o lowerdir=/newroot/etc,upperdir=/newroot/run/cos-etc/upper,workdir=/newroot/run/cos-etc/work \
  overlay /newroot/etc || fatal "cannot make /etc writable (overlay)"
say "root $root mounted read-only; switching to $init"
for fs in dev proc sys; do
  mount --move "/$fs" "/newroot/$fs" || fatal "cannot move /$fs to the root"
done
exec switch_root /newroot "$init"
"""


# ---------------------------------------------------------------------------------------------------------------
# The kernel, its modules, the initramfs


def cache_home() -> Path:
    """~/.cache/cos-customizer (or $XDG_CACHE_HOME/cos-customizer)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cos-customizer"


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
        with _locked(cache / ".lock", "the Debian kernel"):
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


def _modules_by_name(modules: Path) -> dict[str, Path]:
    return {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in modules.rglob("*.ko")}


def module_order(modules: Path, wanted: Iterable[str]) -> list[Path]:
    """The .ko files of `wanted` and their dependencies, each after what it needs (their `depends=` modinfo).

    Names absent from `modules` are built into the kernel and skipped.
    """
    by_name = _modules_by_name(modules)
    order: list[Path] = []

    def visit(name: str) -> None:
        ko = by_name[name]
        if ko in order:
            return
        found = re.search(rb"\0depends=([^\0]*)\0", ko.read_bytes())
        for need in found.group(1).decode().split(",") if found and found.group(1) else []:
            visit(need.replace("-", "_"))
        order.append(ko)

    for name in wanted:
        if name in by_name:
            visit(name)
    return order


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One member of a cpio archive: a directory, regular file, symlink (data: its target) or device node."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio(entries: Iterable[CpioEntry | tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive (the kernel's initramfs format) of `entries`, owned by root, mtime 0."""
    out = bytearray()
    items = [e if isinstance(e, CpioEntry) else CpioEntry(*e) for e in entries]
    for ino, entry in enumerate([*items, CpioEntry("TRAILER!!!", 0)], start=1):
        encoded = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = [ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + entry.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _libraries(root: Path, binaries: Iterable[str]) -> set[str]:
    """The shared libraries (paths inside `root`) the `binaries` of `root` load, by the root's own ldd."""
    found: set[str] = set()
    for binary in binaries:
        result = run([require_tool("chroot", "coreutils"), str(root), "/usr/bin/ldd", binary])
        for line in result.stdout.decode().splitlines():
            words = line.split()
            path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
            if path.startswith("/"):
                found.add(path)
    return found


INIT_TOOLS = ("/usr/sbin/dmsetup", "/usr/sbin/blkid")
_DIR, _EXEC, _FILE = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644


def initramfs(root: Path, modules: Path) -> bytes:
    """The gzip-compressed initramfs: busybox, dmsetup and blkid of `root`, the boot modules, /init."""
    entries = [CpioEntry(d, _DIR) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                                            "run", "tmp", "newroot", "modules", "lib", "lib64", "etc")]  # fmt: skip
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", _EXEC, BUSYBOX.read_bytes()))
    made = {e.path for e in entries}
    for path in sorted({*INIT_TOOLS, *_libraries(root, INIT_TOOLS)}):
        inside = path.lstrip("/")
        parts = inside.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                entries.append(CpioEntry(directory, _DIR))
                made.add(directory)
        entries.append(CpioEntry(inside, _EXEC, (root / inside).resolve().read_bytes()))
    order = module_order(modules, INITRD_MODULES)
    entries += [CpioEntry(f"modules/{ko.name}", _FILE, ko.read_bytes()) for ko in order]
    entries.append(CpioEntry("modules/order", _FILE, "".join(f"{ko.name}\n" for ko in order).encode()))
    entries.append(CpioEntry("init", _EXEC, INIT.encode()))
    entries.append(CpioEntry("dm.awk", _FILE, DM_AWK.encode()))
    entries.append(CpioEntry("dm-mod.awk", _FILE, DM_MOD_AWK.encode()))
    entries.append(CpioEntry("cmdline.awk", _FILE, CMDLINE_AWK.encode()))
    return gzip.compress(cpio(entries), compresslevel=6, mtime=0)


def prune_modules(source: Path, root: Path) -> Path:
    """Copy the modules of `VM_MODULES` (and dependencies) from `source` into `root`; index them with depmod."""
    version = source.name
    target = root / "usr/lib/modules" / version
    for ko in module_order(source, VM_MODULES):
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


def check_host() -> None:
    """Refuse, in one line, a machine that cannot build the guest."""
    if os.geteuid() != 0:
        raise ValidationError("-bootable builds a Debian root with debootstrap and chroot: run it as root")
    for tool, package in (("debootstrap", "debootstrap"), ("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise ValidationError(f"-bootable needs {tool}: apt-get install {package} (scripts/setup does)")
    if not BUSYBOX.exists():
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


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process building %s (%s)...", what, path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def _debootstrap(target: Path, mirror: str) -> None:
    tool = require_tool("debootstrap", "debootstrap")
    try:
        hint = f"debootstrap of Debian {SUITE} from {mirror}; its log: {target}/debootstrap/debootstrap.log"
        run([tool, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(target), mirror], hint=hint)
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


def cache_key(os_release: str) -> str:
    return f"{RECIPE}-{hashlib.sha256(os_release.encode()).hexdigest()[:12]}"


def prepare(os_release: str, *, cache: Path | None = None) -> Guest:
    """The guest, from the cache or built into it (once per machine; a second process waits for the first)."""
    check_host()
    base = cache or cache_home() / "sample-guest"
    base.mkdir(parents=True, exist_ok=True)
    final = base / cache_key(os_release)
    if (final / "done").exists():
        return _guest(final, True)
    with _locked(base / ".lock", "the sample image's guest"):
        if (final / "done").exists():
            return _guest(final, True)
        for stale in base.glob("*.partial"):
            _remove_tree(stale)
        partial = base / f"{final.name}.partial"
        started = time.monotonic()
        try:
            _build(partial, os_release)
            _remove_tree(final)
            partial.rename(final)
        except BaseException:
            with contextlib.suppress(CustomizerError, OSError):
                _remove_tree(partial)
            raise
        log.info("Built the sample image's guest in %s in %.0f s", final, time.monotonic() - started)
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
    (directory / "initrd.img").write_bytes(initramfs(root, pruned))
    (directory / "kernel-version").write_text(modules.name + "\n")
    (directory / "done").write_text(f"recipe {RECIPE}\n")
