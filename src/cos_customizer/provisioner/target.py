"""What the provisioner works on: a root directory, a boot disk, its partitions.

On a COS VM that is `/`, `/dev/sda` and `/dev/sdaN`; in tests it is a mount
tree and a disk image file whose partitions are mounted from loop devices.
Nothing in the step logic names a path of the VM: it all comes from here.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from cos_customizer.errors import CustomizerError
from cos_customizer.runner import run


@dataclasses.dataclass(frozen=True)
class Target:
    root: Path = Path("/")
    disk: Path = Path("/dev/sda")
    # Partition devices: "/dev/sda{n}" on a VM; empty: mount regions of `disk` through loop devices.
    partition_template: str = "/dev/sda{n}"
    # Which partition the running system booted from; 0: ask `rootdev -s`.
    root_partition: int = 0
    systemctl: tuple[str, ...] = ("systemctl",)
    # Where status lines go (the serial port the workflow watches); empty: standard output.
    console: str = ""
    # How a script runs: the VM runs it directly; a test chroots into `root`.
    chroot: bool = False
    # With `chroot`: the argv prefix of a sandbox that runs `--wd=DIR -- ARGV` in `root` (the local
    # executor's, executors/local/sandbox.py); empty: `unshare --root`. The sandbox gets the script's
    # environment its own way: what this process passes reaches only the sandbox's host-side helper.
    sandbox: tuple[str, ...] = ()
    # The environment scripts start from: the one the VM gave the provisioner (less the loaders'
    # variables), or a small fixed one (the local executor: never the builder's environment).
    fixed_env: bool = False
    # How grub.cfg on EFI-SYSTEM is reached: "mount" the FAT (a VM), or "mtools" at the partition's
    # offset (machines without the vfat module, or without mount rights).
    efi_access: str = "mount"

    @classmethod
    def load(cls, path: Path | None) -> Target:
        if path is None:
            return cls()
        data: dict[str, Any] = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise CustomizerError(f"{path}: unknown target field {sorted(unknown)[0]!r}")
        for key in ("root", "disk"):
            if key in data:
                data[key] = Path(data[key])
        for key in ("systemctl", "sandbox"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["root"], data["disk"] = str(self.root), str(self.disk)
        data["systemctl"] = list(self.systemctl)
        data["sandbox"] = list(self.sandbox)
        return data

    def path(self, absolute: str) -> Path:
        """A path of the target system, e.g. `/var/lib` -> ROOT/var/lib."""
        return self.root / absolute.lstrip("/")

    def disk_size(self) -> int:
        """The boot disk's size in bytes, as the kernel sees it now."""
        fd = os.open(self.disk, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def booted_partition(self) -> int:
        if self.root_partition:
            return self.root_partition
        device = run(["rootdev", "-s"]).stdout.decode().strip()
        digits = "".join(ch for ch in device[len(str(self.disk)) :] if ch.isdigit())
        if not digits:
            raise CustomizerError(f"rootdev says the root is {device}, not a partition of {self.disk}")
        return int(digits)

    def mount_partition(self, number: int, first: int, size: int, mountpoint: Path, *options: str) -> None:
        """Mount partition `number` (at sector `first`, `size` sectors) on `mountpoint`."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        if self.partition_template:
            source = self.partition_template.format(n=number)
            opts = list(options)
        else:
            source = str(self.disk)
            opts = ["loop", f"offset={first * 512}", f"sizelimit={size * 512}", *options]
        run(["mount", *(["-o", ",".join(opts)] if opts else []), source, str(mountpoint)])

    def unmount(self, mountpoint: Path, *, lazy: bool = False) -> None:
        """Unmount `mountpoint` if something is mounted there; `lazy`: detach it now even while a process still
        uses it (it goes when the last user does)."""
        if is_mountpoint(mountpoint):
            run(["umount", *(["--lazy"] if lazy else []), str(mountpoint)])

    def mount_tmpfs(self, absolute: str) -> None:
        """A fresh tmpfs on `absolute` (a path of the target), unless one is there already."""
        mountpoint = self.path(absolute)
        mountpoint.mkdir(parents=True, exist_ok=True)
        if not is_mountpoint(mountpoint):
            run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(mountpoint)])

    def remount_exec(self, absolute: str) -> None:
        """Let programs run from the file system mounted on `absolute` (COS mounts /tmp noexec)."""
        run(["mount", "-o", "remount,exec", str(self.path(absolute))])

    def systemctl_run(self, *args: str) -> None:
        run([*self.systemctl, *args], check=False)

    def command(self, workdir: str, argv: list[str]) -> tuple[list[str], str | None]:
        """How to run `argv` in `workdir` (a path of the target): the argv and the cwd to use."""
        if self.chroot and self.sandbox:
            return [*self.sandbox, f"--wd={workdir}", "--", *argv], None
        if self.chroot:
            isolate = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
            return [*isolate, f"--root={self.root}", f"--wd={workdir}", *argv], None
        return argv, str(self.path(workdir))


def is_mountpoint(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines())
