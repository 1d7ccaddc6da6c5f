"""Idmapped copies of mounts (Linux 5.12+): the image's files as the container daemons' user namespace sees them.

The daemons run as root of the build's inner user namespace, which is a high host uid
(`sandbox.INNER_BASE`), not 0. An idmapped mount of a file system, with that namespace as its idmap,
shows a file owned by uid N on disk as owned by the namespace's uid N, and a file the namespace's
root creates is owned by uid 0 on disk: the preloaded images have exactly the owners a booted COS
would give them. Made with open_tree(OPEN_TREE_CLONE), mount_setattr(MOUNT_ATTR_IDMAP) and
move_mount, on a detached copy, so the original mount is not changed. Standard library only.

`make_view` assembles the whole runtime tree again from such copies: the tree the build's scripts
and the container daemons both run in, as root of that namespace (never host uid 0).
"""

from __future__ import annotations

import os
from pathlib import Path

from cos_customizer import linux

IDMAPPED_TYPES = ("ext4", "ext3", "ext2")


def idmapped_copy(source: str, target: str, userns: str) -> None:
    """Mount an idmapped copy of the mount at `source` (not its submounts) on `target`.

    `userns`: a path to the user namespace whose mapping is applied. Raises OSError (EINVAL: the
    file system does not support idmapped mounts, as overlayfs does not).
    """
    tree = linux.open_tree(linux.AT_FDCWD, source, linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC)
    try:
        ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.mount_setattr_idmap(tree, ns)
        finally:
            os.close(ns)
        linux.move_mount(tree, linux.AT_FDCWD, target, linux.MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as err:
        raise OSError(err.errno, f"an idmapped copy of {source}: {err.strerror}") from err
    finally:
        os.close(tree)


def mounts_under(root: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of `root` and every mount under it, in the order they were made."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if point == root or point.startswith(root + "/"):
            found.append((point, fields[fields.index("-") + 1]))
    return found


def make_view(root: str, view: str, userns: str, *, owner: int) -> None:
    """The runtime tree at `root` again at `view` (as this machine's root, in a private mount namespace).

    The image's file systems (ext4) become idmapped copies through `userns`; the /etc overlay is made
    again over the idmapped lower layer, with its own upper layer owned by `owner` (overlayfs cannot be
    idmapped); every other mount (the size-limited tmpfs, which the stage makes owned by `owner`, and
    the host's resolv.conf, read-only) is bound as it is, which needs no idmapping support of tmpfs.
    """
    os.makedirs(view, exist_ok=True)
    layers = f"{view}.etc"
    for point, fstype in mounts_under(root):
        target = view + point[len(root) :]
        if point != root:
            _mount_point_for(point, target)
        if fstype == "overlay":
            os.makedirs(layers, exist_ok=True)
            flags = linux.MS_NOSUID | linux.MS_NODEV
            linux.mount("tmpfs", layers, "tmpfs", flags, f"mode=0755,size=16m,uid={owner},gid={owner}")
            for name in ("upper", "work"):
                os.mkdir(f"{layers}/{name}")
                os.chown(f"{layers}/{name}", owner, owner)
            linux.mount(
                "overlay", target, "overlay", 0, f"lowerdir={target},upperdir={layers}/upper,workdir={layers}/work"
            )
        elif fstype in IDMAPPED_TYPES:
            idmapped_copy(point, target, userns)
        else:
            linux.bind(point, target)


def _mount_point_for(source: str, target: str) -> None:
    """A directory or a file at `target` to mount `source`'s copy on (the view's own tree, made as root)."""
    if os.path.isdir(source):
        if not os.path.isdir(target) or os.path.islink(target):
            os.makedirs(target, exist_ok=True)
    elif not os.path.isfile(target) or os.path.islink(target):
        if os.path.lexists(target):
            os.unlink(target)
        Path(target).touch()
