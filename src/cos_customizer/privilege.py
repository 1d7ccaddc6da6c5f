"""Whether this process may do what only root does here (mount file systems, attach loop devices), asked of
the kernel rather than guessed from its uid.

As osbuild does before it needs a mount: the capability is read from /proc/self/status, then the operation
is tried in a forked child, so a seccomp filter or a security module that refuses what the capability would
allow (an unprivileged container's root) is seen too. Standard library only.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from cos_customizer import linux

CAP_SYS_ADMIN = 21


def effective_capabilities() -> int:
    """This process's effective capabilities, a mask (bit N: capability N), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@functools.cache
def can_mount() -> bool:
    """Whether this process can mount file systems and attach loop devices (CAP_SYS_ADMIN, not refused).

    CAP_SYS_ADMIN in its effective set (when /proc tells), and a forked child can make a mount namespace of
    its own and make every mount in it private (tried there: nothing of this process changes). Asked once.
    """
    with contextlib.suppress(OSError, ValueError):
        if not effective_capabilities() >> CAP_SYS_ADMIN & 1:
            return False
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: the calls tried, then its status
        status = 1
        try:
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def is_root() -> bool:
    """Whether this process runs as uid 0: what debootstrap and the package scripts it runs in a chroot
    check for themselves (the uid, not a capability), so a probe of the operation would not answer for them."""
    return os.geteuid() == 0
