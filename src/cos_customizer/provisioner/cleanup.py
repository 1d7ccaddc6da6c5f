"""Clean machine state before the image is taken, so the image is generic.

The list is the one of 03-cos-disk.md. `root` is the target's root
directory: `/` on a VM, the assembled mount tree in the local executor.
Paths never leave `root` (symlinks inside it are not followed out).
Standard library only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from cos_customizer import linux
from cos_customizer.provisioner.target import is_mountpoint
from cos_customizer.units import human_size

STATE_DIR = "var/lib/.cos-customizer"

REMOVE = (STATE_DIR, "mnt/stateful_partition/etc", "etc/docker/key.json", "var/lib/systemd/random-seed")
# Directories emptied (the directory itself stays), with the entries they keep.
EMPTY: tuple[tuple[str, frozenset[str]], ...] = (
    ("var/cache", frozenset({"apt", "debconf"})),
    ("var/lib/systemd", frozenset({"deb-systemd-helper-enabled"})),
    ("var/tmp", frozenset()),
    ("var/lib/crash_reporter", frozenset()),
    ("var/lib/metrics", frozenset()),
    ("var/lib/update_engine", frozenset()),
    ("var/lib/whitelist", frozenset()),
    ("var/lib/cloud", frozenset()),
    ("var/log/journal", frozenset()),
    ("var/log/audit", frozenset()),
    ("etc/netplan", frozenset()),
    ("tmp", frozenset()),
)
TRUNCATE_UNDER = "var/log"
SSH_HOST_KEYS = ("etc/ssh", "ssh_host_*")
# The writable file systems whose free blocks go back to the disk before the image is made.
TRIMMED = ("mnt/stateful_partition", "usr/share/oem")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _inside(root: Path, relative: str) -> Path | None:
    """`root/relative` if it resolves inside `root` (a symlink may not lead out)."""
    path = root / relative
    try:
        path.parent.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return path


def clean(root: Path) -> list[str]:
    """Apply the cleanup list under `root`; returns what was done, for the log."""
    done: list[str] = []
    for relative in REMOVE:
        path = _inside(root, relative)
        if path is not None and (path.exists() or path.is_symlink()):
            _remove(path)
            done.append(f"removed /{relative}")
    for relative, keep in EMPTY:
        path = _inside(root, relative)
        if path is None or path.is_symlink() or not path.is_dir():
            continue
        entries = [entry for entry in path.iterdir() if entry.name not in keep]
        for entry in entries:
            _remove(entry)
        if entries:
            done.append(f"emptied /{relative} ({len(entries)} entries)")
    logs = _inside(root, TRUNCATE_UNDER)
    if logs is not None and logs.is_dir() and not logs.is_symlink():
        count = 0
        for path in logs.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size:
                path.write_bytes(b"")
                count += 1
        if count:
            done.append(f"truncated {count} files under /{TRUNCATE_UNDER}")
    ssh = _inside(root, SSH_HOST_KEYS[0])
    if ssh is not None and ssh.is_dir() and not ssh.is_symlink():
        for key in sorted(ssh.glob(SSH_HOST_KEYS[1])):
            key.unlink()
            done.append(f"removed /{SSH_HOST_KEYS[0]}/{key.name}")
    return done


def trim(root: Path, relatives: tuple[str, ...] = TRIMMED) -> list[str]:
    """Discard the free blocks of each file system mounted on `root/relative` (FITRIM, as `fstrim`): on a
    persistent disk they are unmapped and the image is made of data only; on a loop device over a file, they
    become holes. Where a device cannot discard, it says so and goes on."""
    done: list[str] = []
    for relative in relatives:
        path = _inside(root, relative)
        if path is None or not is_mountpoint(Path(os.path.realpath(path))):
            continue
        try:
            trimmed = linux.fitrim(str(path))
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            done.append(f"/{relative} was not trimmed: its device cannot discard ({os.strerror(err.errno)})")
            continue
        done.append(f"trimmed {human_size(trimmed)} of free space on /{relative}")
    return done
