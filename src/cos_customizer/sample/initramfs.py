"""The bootable sample's initramfs: busybox, dmsetup and blkid, the boot modules, and an /init that sets up
the verified root as COS's kernel does.

`initramfs(root, modules)` makes it (a gzip-compressed cpio "newc" archive, `cpio`) from the guest's root
(`sample.guest`: dmsetup and blkid with their libraries, by the root's own ldd) and its kernel's modules
(`INITRD_MODULES` and their dependencies, in load order: `module_order`). Its /init sets up the devices of
`dm="..."` (ChromeOS form, N devices) or `dm-mod.create="..."` (upstream form) with dmsetup, mounts `root=`
read-only, makes /etc writable and stateless (an overlay with a tmpfs upper) and switches to `init=`. A
verity device or root that cannot be set up or read stops the boot with `cos-initrd: FATAL:` on the console
and powers off: it never falls back to the unverified partition.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from cos_customizer.runner import require_tool, run

BUSYBOX = Path("/bin/busybox")
# Loaded by the initramfs, in dependency order: the boot disk, the verified root, /etc's overlay, the NIC.
INITRD_MODULES = ("crc32c_generic", "crct10dif_generic", "virtio_pci", "virtio_scsi", "sd_mod", "dm_mod",
                  "dm_verity", "ext4", "overlay", "virtio_net")  # fmt: skip

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
# The boot modules and the archive


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


def initramfs(root: Path, modules: Path, *, busybox: Path = BUSYBOX, wanted: Iterable[str] = INITRD_MODULES) -> bytes:
    """The gzip-compressed initramfs: `busybox` (a static one), dmsetup and blkid of `root`, the boot modules
    (`wanted` and their dependencies, in load order), /init. Another machine's root: run it under
    `binfmt.emulation` (the root's ldd runs)."""
    entries = [CpioEntry(d, _DIR) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                                            "run", "tmp", "newroot", "modules", "lib", "lib64", "etc")]  # fmt: skip
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", _EXEC, busybox.read_bytes()))
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
    order = module_order(modules, wanted)
    entries += [CpioEntry(f"modules/{ko.name}", _FILE, ko.read_bytes()) for ko in order]
    entries.append(CpioEntry("modules/order", _FILE, "".join(f"{ko.name}\n" for ko in order).encode()))
    entries.append(CpioEntry("init", _EXEC, INIT.encode()))
    entries.append(CpioEntry("dm.awk", _FILE, DM_AWK.encode()))
    entries.append(CpioEntry("dm-mod.awk", _FILE, DM_MOD_AWK.encode()))
    entries.append(CpioEntry("cmdline.awk", _FILE, CMDLINE_AWK.encode()))
    return gzip.compress(cpio(entries), compresslevel=6, mtime=0)
