"""The page cache of a whole-disk block device, made to agree with what its partitions' devices wrote.

Linux caches a block device's data per device: /dev/sda and /dev/sda8 each
have their own page cache. What a file system mounted from /dev/sda8 writes
reaches the disk, but pages of /dev/sda read before stay as they were. The
provisioner reads partitions through the whole disk (superblocks, the OEM it
hashes for dm-verity, the partitions it moves at shutdown), so after a
partition was written through its own device, reads through /dev/sda may
return stale data. Found by a rehearsed build: the OEM's verity tree was
computed over a stale superblock and the sealed OEM failed verification.
`drop_cache` writes back and invalidates the disk's cache (BLKFLSBUF, as
`blockdev --flushbufs` does) so the next reads come from the disk. A regular
file (an image, in tests and the local executor) has one page cache: nothing
to do. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

BLKFLSBUF = 0x1261  # _IO(0x12, 97), linux/fs.h


def drop_cache(disk: Path) -> None:
    """Write back and drop `disk`'s cached pages, when it is a block device."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)
