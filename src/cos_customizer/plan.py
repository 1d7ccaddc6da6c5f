"""Pure rules of finish-image-build: OEM and disk sizes.

These follow the Go original exactly (its table, its GB rounding and its
1 MB shrink), so a Cloud Build file accepted there is accepted here with
the same resulting `BootDisk`.
"""

from __future__ import annotations

import dataclasses

from cos_customizer.errors import ValidationError
from cos_customizer.provisioner.config import BootDisk, ProvisionerConfig, StepType
from cos_customizer.units import MiB, format_size, gib_round_up, parse_size

# The size of a COS image the original's table assumes, in GB (GiB).
IMAGE_SIZE_GB = 10
# What disable-auto-update/seal-oem reclaim from ROOT-A: 2 GiB less a 2 MiB margin.
RECLAIMED_MB = 2046
RECLAIMED = RECLAIMED_MB * MiB
# The OEM partition of a COS image, and the smallest -oem-size accepted.
DEFAULT_OEM = 16 * MiB
# seal-oem without -oem-size: the 16M file system, in a partition twice as large.
SEALED_DEFAULT_OEM_SIZE = "32M"
SEALED_DEFAULT_OEM_FS_4K = DEFAULT_OEM // 4096


def check_oem_size(text: str) -> int:
    """The bytes of an -oem-size value; raises ValueError with the reason (a flag check)."""
    size = parse_size(text)
    if size < DEFAULT_OEM:
        raise ValueError("oem-size must be at least 16M (the size of the OEM partition in a COS image)")
    return size


def check_disk_size_gb(disk_size_gb: int) -> None:
    if disk_size_gb < 0 or 0 < disk_size_gb < IMAGE_SIZE_GB:
        raise ValidationError(
            f"-disk-size-gb={disk_size_gb}: give 0 (keep the image's {IMAGE_SIZE_GB} GB) or at least {IMAGE_SIZE_GB}"
        )


def resolve_boot_disk(config: ProvisionerConfig, oem_size: str, disk_size_gb: int) -> BootDisk:
    """The final BootDisk for `-oem-size`/`-disk-size-gb`, or a ValidationError if the disk is too small.

    `disk_size_gb` 0 means the default image size.
    """
    check_disk_size_gb(disk_size_gb)
    boot_disk = config.boot_disk
    sealed = config.has_step(StepType.SEAL_OEM)
    if not oem_size:
        if sealed:
            return _replace(boot_disk, SEALED_DEFAULT_OEM_SIZE, SEALED_DEFAULT_OEM_FS_4K)
        return _replace(boot_disk, "", boot_disk.oem_fs_size_4k)
    try:
        requested = check_oem_size(oem_size)
    except ValueError as err:
        raise ValidationError(f'invalid value "{oem_size}" for flag -oem-size: {err}') from None
    fs_size_4k = boot_disk.oem_fs_size_4k
    partition = requested
    if sealed:
        fs_size_4k = requested >> 12
        partition = requested * 2
    extra = partition
    if boot_disk.reclaim_sda3:
        extra = max(0, partition - RECLAIMED)
    needed_gb = IMAGE_SIZE_GB + gib_round_up(extra)
    disk_gb = disk_size_gb or IMAGE_SIZE_GB
    if disk_gb < needed_gb:
        raise ValidationError(_too_small(disk_size_gb, needed_gb, oem_size, sealed, boot_disk.reclaim_sda3))
    # The original shrinks the request (rounded down to MB) by 1 MB so that a
    # disk exactly at the limit still fits.
    return _replace(boot_disk, f"{(partition >> 20) - 1}M", fs_size_4k)


def _replace(boot_disk: BootDisk, oem_size: str, fs_size_4k: int) -> BootDisk:
    return dataclasses.replace(boot_disk, oem_size=oem_size, oem_fs_size_4k=fs_size_4k)


def _too_small(disk_size_gb: int, needed_gb: int, oem_size: str, sealed: bool, reclaim: bool) -> str:
    given = f"-disk-size-gb={disk_size_gb}" if disk_size_gb else f"the default disk size ({IMAGE_SIZE_GB} GB)"
    if sealed:
        rule = (
            f"{IMAGE_SIZE_GB} GB image + 2 x {oem_size} OEM (file system and hash tree) - {RECLAIMED_MB} MB reclaimed"
        )
    elif reclaim:
        rule = f"{IMAGE_SIZE_GB} GB image + {oem_size} OEM - {RECLAIMED_MB} MB reclaimed"
    else:
        rule = f"{IMAGE_SIZE_GB} GB image + {oem_size} OEM"
    return (
        f"{given} is too small for -oem-size={oem_size}: the disk must be at least {needed_gb} GB "
        f"({rule}, rounded up to whole GB); pass -disk-size-gb={needed_gb} or a smaller -oem-size"
    )


def need_disk_resize(boot_disk: BootDisk, disk_size_gb: int) -> bool:
    """Whether the GCE workflow creates the disk at 10 GB and grows it mid-build (as the original)."""
    return disk_size_gb > IMAGE_SIZE_GB and (bool(boot_disk.oem_size) or boot_disk.reclaim_sda3)


def describe_boot_disk(boot_disk: BootDisk, sealed: bool) -> str:
    parts = []
    if boot_disk.oem_size:
        parts.append(f"OEM partition {format_size(parse_size(boot_disk.oem_size))}")
    else:
        parts.append("OEM partition unchanged")
    if sealed:
        parts.append(f"sealed file system of {format_size(boot_disk.oem_fs_size_4k * 4096)}")
    parts.append("ROOT-A reclaimed" if boot_disk.reclaim_sda3 else "ROOT-A kept")
    return ", ".join(parts)
