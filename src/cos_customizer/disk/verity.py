"""The dm-verity hash tree, in pure Python, byte-identical to `veritysetup format`.

The parameters are fixed to what COS uses: format 0 (the ChromeOS format), no
superblock, sha256, 4096-byte data and hash blocks. Format facts (checked against
cryptsetup's lib/verity/verity_hash.c and the kernel's dm-verity target):

* A block's digest is ``sha256(block + salt)``: format 0 appends the salt
  (format 1 would prepend it).
* A hash block holds 128 digests packed back to back; the unused tail of the
  last block of a level is zero.
* With N data blocks there are L levels, the least L with ``(N - 1) >> 7L == 0``.
  Level i (0 = leaves, next to the data) has ``ceil(N / 128**(i + 1))`` blocks.
  On the hash device the top level (one block) comes first at the hash offset,
  the leaf level last.
* The root hash is the digest of the top hash block. With a single data block
  there are no levels: nothing is written and the root hash is that block's
  own digest.

Speed comes from sparseness: blocks in holes of the file are never read (their
digest is the known zero-block digest), a leaf hash block whose 128 children are
all zero blocks has a known content and digest, and so on up the tree. Cost
follows the data, not the size of the region.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from cos_customizer.disk.mover import data_extents

BLOCK = 4096
DIGEST = 32
FANOUT = BLOCK // DIGEST  # 128 digests per hash block
_SPAN = 8  # leaf hash blocks handled per step when data is present (8 * 128 blocks = 4 MiB of data)
_BULK = 256  # hash blocks per write when writing runs of identical blocks
_ZERO = bytes(BLOCK)

Emit = Callable[[int, bytes | bytearray | memoryview], None]


@dataclass(frozen=True)
class VerityParams:
    data_blocks: int
    hash_offset: int
    salt: bytes
    root_hash: bytes
    tree_blocks: int

    @property
    def root_hexdigest(self) -> str:
        return self.root_hash.hex()

    @property
    def salt_hex(self) -> str:
        return self.salt.hex()


def random_salt() -> bytes:
    """32 random bytes, the salt size COS uses."""
    return os.urandom(32)


def derived_salt(path: str | os.PathLike[str], data_offset: int, data_blocks: int, epoch: int) -> bytes:
    """A salt for a reproducible build: 32 bytes derived from the data and `epoch` (SOURCE_DATE_EPOCH).

    The sha256 of a fixed label, the epoch, and every block that is not all zeros with its index: the same
    content gives the same salt whether its zeros are holes or written, and other content another salt.
    """
    digest = hashlib.sha256(b"cos-customizer verity salt\0" + str(epoch).encode() + b"\0")
    end = data_offset + data_blocks * BLOCK
    done = data_offset  # blocks before this one are hashed (an extent may end within a block)
    with open(path, "rb") as f:
        for start, length in data_extents(f.fileno(), data_offset, end):
            first = max(done, start - (start - data_offset) % BLOCK)
            for at in range(first, min(end, start + length), BLOCK):
                block = os.pread(f.fileno(), BLOCK, at)
                if block.strip(b"\0"):
                    digest.update(((at - data_offset) // BLOCK).to_bytes(8, "little") + block)
                done = at + BLOCK
    return digest.digest()


def _level_sizes(data_blocks: int) -> list[int]:
    """Blocks per level, index 0 = leaf level; empty for a single data block."""
    sizes: list[int] = []
    span = FANOUT
    while (data_blocks - 1) >= span // FANOUT:
        sizes.append(-(-data_blocks // span))
        span *= FANOUT
    return sizes


def tree_size_blocks(data_blocks: int) -> int:
    """Number of 4096-byte hash blocks the tree of `data_blocks` data blocks takes."""
    if data_blocks < 1:
        raise ValueError(f"data_blocks must be at least 1, got {data_blocks}")
    return sum(_level_sizes(data_blocks))


def _digest(block: bytes | bytearray | memoryview, salt: bytes) -> bytes:
    h = hashlib.sha256(block)
    h.update(salt)
    return h.digest()


def _block_ranges(fd: int, data_offset: int, data_blocks: int) -> list[tuple[int, int]]:
    """Data block index ranges [a, b) that touch data, merged and sorted."""
    out: list[tuple[int, int]] = []
    for s, length in data_extents(fd, data_offset, data_offset + data_blocks * BLOCK):
        a, b = (s - data_offset) // BLOCK, -(-(s + length - data_offset) // BLOCK)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _pack(digests: bytes | bytearray, salt: bytes, zero_block: bytes, zero_digest: bytes) -> tuple[bytes, bytearray]:
    """Digests -> (zero-padded hash blocks, digest of each hash block)."""
    blocks = bytes(digests) + bytes(-len(digests) % BLOCK)
    out = bytearray()
    for i in range(0, len(blocks), BLOCK):
        chunk = blocks[i : i + BLOCK]  # a bytes copy: comparing bytes is a memcmp, comparing memoryviews is not
        out += zero_digest if chunk == zero_block else _digest(chunk, salt)
    return blocks, out


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    buf = os.pread(fd, size, offset)
    while len(buf) < size:
        more = os.pread(fd, size - len(buf), offset + len(buf))
        if not more:
            raise OSError(errno.EIO, f"short read at byte {offset + len(buf)}: the data region ends early")
        buf += more
    return buf


def _hash_data(
    fd: int, data_offset: int, first: int, count: int, digests: bytearray, pos: int, salt: bytes, z0: bytes
) -> None:
    """Put the digests of data blocks [first, first + count) into `digests` at byte `pos`."""
    chunk_blocks = _SPAN * FANOUT
    for start in range(first, first + count, chunk_blocks):
        n = min(chunk_blocks, first + count - start)
        data = _pread_exact(fd, n * BLOCK, data_offset + start * BLOCK)
        at = pos + (start - first) * DIGEST
        for i in range(n):
            block = data[i * BLOCK : (i + 1) * BLOCK]
            digests[at + i * DIGEST : at + (i + 1) * DIGEST] = z0 if block == _ZERO else _digest(block, salt)


def _build(
    fd: int,
    data_offset: int,
    data_blocks: int,
    hash_offset: int,
    salt: bytes,
    emit: Emit,
    progress: Callable[[int, int], None] | None,
) -> bytes:
    """Compute the tree, hand each run of hash blocks to `emit(offset, bytes)`, return the root hash."""
    n = data_blocks
    sizes = _level_sizes(n)
    ranges = _block_ranges(fd, data_offset, n)
    # zd[k]: digest of a level-(k-1) block whose children are all zero blocks (zd[0]: of a zero data block);
    # zb[k]: content of a full level-k hash block made of zd[k].
    zd = [_digest(_ZERO, salt)]
    zb: list[bytes] = []
    for _ in range(max(1, len(sizes))):
        zb.append(zd[-1] * FANOUT)
        zd.append(_digest(zb[-1], salt))
    if not sizes:  # one data block, no tree: the root hash is the block's digest
        one = bytearray(zd[0])
        if ranges:
            _hash_data(fd, data_offset, 0, 1, one, 0, salt, zd[0])
        return bytes(one)
    starts: list[int] = [0] * len(sizes)  # byte offset of each level, top level first on disk
    at = hash_offset
    for level in range(len(sizes) - 1, -1, -1):
        starts[level] = at
        at += sizes[level] * BLOCK

    # Leaf level: walk leaf hash blocks, whole runs of hole-only ones at once.
    leaves = sizes[0]
    upper = bytearray()  # digests of leaf hash blocks = content of level 1
    bulk = zb[0] * _BULK
    ri = 0
    j = 0
    while j < leaves:
        lo = j * FANOUT
        while ri < len(ranges) and ranges[ri][1] <= lo:
            ri += 1
        next_data = ranges[ri][0] if ri < len(ranges) else n
        run = min(next_data, n) // FANOUT - j  # full leaf hash blocks with no data at all
        if run > 0:
            for k in range(0, run, _BULK):
                m = min(_BULK, run - k)
                emit(starts[0] + (j + k) * BLOCK, memoryview(bulk)[: m * BLOCK])
            upper += zd[1] * run
            j += run
        else:
            end = min(n, (j + _SPAN) * FANOUT)
            digests = bytearray(zd[0] * (end - lo))
            r = ri
            while r < len(ranges) and ranges[r][0] < end:
                a, b = max(ranges[r][0], lo), min(ranges[r][1], end)
                _hash_data(fd, data_offset, a, b - a, digests, (a - lo) * DIGEST, salt, zd[0])
                r += 1
            blocks, sums = _pack(digests, salt, zb[0], zd[1])
            emit(starts[0] + j * BLOCK, blocks)
            upper += sums
            j += len(blocks) // BLOCK
        if progress is not None:
            progress(min(n, j * FANOUT), n)

    # Upper levels: small, held in memory.
    for level in range(1, len(sizes)):
        blocks, upper = _pack(upper, salt, zb[level], zd[level + 1])
        emit(starts[level], blocks)
    assert len(upper) == DIGEST
    return bytes(upper)


def _open_checked(path: str | os.PathLike[str], flags: int, data_offset: int, data_blocks: int) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        if data_offset + data_blocks * BLOCK > size:
            raise ValueError(
                f"{os.fspath(path)}: data region of {data_blocks} blocks at byte {data_offset} "
                f"ends past the end ({size} bytes)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_args(data_offset: int, data_blocks: int, hash_offset: int, salt: bytes) -> None:
    if data_blocks < 1:
        raise ValueError(f"data_blocks must be at least 1, got {data_blocks}")
    if data_offset < 0 or data_offset % 512:
        raise ValueError(f"data_offset must be a non-negative multiple of 512, got {data_offset}")
    if hash_offset < 0 or hash_offset % 512:
        raise ValueError(f"hash_offset must be a non-negative multiple of 512, got {hash_offset}")
    if len(salt) > 256:
        raise ValueError(f"salt is at most 256 bytes, got {len(salt)}")
    data_end = data_offset + data_blocks * BLOCK
    hash_end = hash_offset + tree_size_blocks(data_blocks) * BLOCK
    if hash_end > hash_offset and hash_offset < data_end and data_offset < hash_end:
        raise ValueError(f"hash area [{hash_offset}, {hash_end}) overlaps data area [{data_offset}, {data_end})")


def format_verity(
    path: str | os.PathLike[str],
    *,
    data_offset: int,
    data_blocks: int,
    hash_offset: int,
    salt: bytes,
    progress: Callable[[int, int], None] | None = None,
) -> VerityParams:
    """Write the hash tree of `data_blocks` blocks at `data_offset` to `hash_offset` (bytes) of the same file.

    A regular file grows if the tree ends past its end, as with veritysetup; a block device must be big enough.
    """
    _check_args(data_offset, data_blocks, hash_offset, salt)
    fd = _open_checked(path, os.O_RDWR, data_offset, data_blocks)
    try:

        def write(offset: int, buf: bytes | bytearray | memoryview) -> None:
            view = memoryview(buf)
            while view:
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done

        root = _build(fd, data_offset, data_blocks, hash_offset, salt, write, progress)
        os.fsync(fd)
    finally:
        os.close(fd)
    return VerityParams(data_blocks, hash_offset, bytes(salt), root, tree_size_blocks(data_blocks))


def verify_tree(path: str | os.PathLike[str], params: VerityParams, *, data_offset: int) -> bool:
    """Recompute the tree from the data and compare it with the stored tree and root hash."""
    _check_args(data_offset, params.data_blocks, params.hash_offset, params.salt)
    fd = _open_checked(path, os.O_RDONLY, data_offset, params.data_blocks)
    same = True
    try:

        def compare(offset: int, buf: bytes | bytearray | memoryview) -> None:
            nonlocal same
            if same and os.pread(fd, len(buf), offset) != bytes(buf):
                same = False

        root = _build(fd, data_offset, params.data_blocks, params.hash_offset, params.salt, compare, None)
    finally:
        os.close(fd)
    return same and root == params.root_hash and params.tree_blocks == tree_size_blocks(params.data_blocks)
