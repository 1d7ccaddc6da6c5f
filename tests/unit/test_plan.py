"""The -oem-size / -disk-size-gb rules of 02-cli.md, tested at their edges."""

from __future__ import annotations

import pytest

from cos_customizer.errors import ValidationError
from cos_customizer.plan import need_disk_resize, resolve_boot_disk
from cos_customizer.provisioner.config import (
    BootDisk,
    DisableAutoUpdateArgs,
    ProvisionerConfig,
    RunScriptArgs,
    SealOEMArgs,
)

PLAIN = ProvisionerConfig().with_step(RunScriptArgs(build_context="user", path="a.sh"))
NO_UPDATE = PLAIN.with_boot_disk(reclaim_sda3=True).with_step(DisableAutoUpdateArgs())
SEALED = PLAIN.with_boot_disk(reclaim_sda3=True).with_step(SealOEMArgs())


@pytest.mark.parametrize(
    ("config", "oem", "refused_gb", "accepted_gb", "result"),
    [
        # seal-oem: disk >= 10G + 2 x oem - 2046M, rounded up to GB.
        (SEALED, "2G", 12, 13, BootDisk("4095M", 524288, True)),
        (SEALED, "1G", 10, 11, BootDisk("2047M", 262144, True)),
        (SEALED, "1025M", 10, 11, BootDisk("2049M", 262400, True)),
        (SEALED, "1024G", 2056, 2057, BootDisk("2097151M", 268435456, True)),
        # no seal-oem, no reclaim: disk >= 10G + oem.
        (PLAIN, "1G", 10, 11, BootDisk("1023M", 0, False)),
        (PLAIN, "1025M", 11, 12, BootDisk("1024M", 0, False)),
        (PLAIN, "2097152", 10, 11, BootDisk("1023M", 0, False)),
        # disable-auto-update: disk >= 10G + oem - 2046M.
        (NO_UPDATE, "3G", 11, 12, BootDisk("3071M", 0, True)),
        (NO_UPDATE, "3070M", 10, 11, BootDisk("3069M", 0, True)),
        (NO_UPDATE, "3071M", 11, 12, BootDisk("3070M", 0, True)),
    ],
)
def test_table_edges(config: ProvisionerConfig, oem: str, refused_gb: int, accepted_gb: int, result: BootDisk) -> None:
    with pytest.raises(ValidationError, match=f"the disk must be at least {accepted_gb} GB"):
        resolve_boot_disk(config, oem, refused_gb)
    assert resolve_boot_disk(config, oem, accepted_gb) == result


def test_reclaimed_space_is_enough_on_the_default_disk() -> None:
    # 1G - 2046M < 0: nothing beyond the image is needed.
    assert resolve_boot_disk(NO_UPDATE, "1G", 0) == BootDisk("1023M", 0, True)
    assert resolve_boot_disk(NO_UPDATE, "2046M", 10) == BootDisk("2045M", 0, True)


def test_sealed_without_oem_size_uses_the_reclaimed_space() -> None:
    assert resolve_boot_disk(SEALED, "", 0) == BootDisk("32M", 4096, True)
    assert resolve_boot_disk(SEALED, "", 10) == BootDisk("32M", 4096, True)


def test_no_oem_size_leaves_the_oem_alone() -> None:
    assert resolve_boot_disk(PLAIN, "", 20) == BootDisk("", 0, False)
    assert resolve_boot_disk(NO_UPDATE, "", 0) == BootDisk("", 0, True)


def test_minimum_oem_size() -> None:
    assert resolve_boot_disk(PLAIN, "16M", 11) == BootDisk("15M", 0, False)
    with pytest.raises(ValidationError) as err:
        resolve_boot_disk(PLAIN, "8M", 11)
    assert str(err.value) == (
        'invalid value "8M" for flag -oem-size: oem-size must be at least 16M (the size of the OEM partition in a COS image)'
    )


def test_message_names_the_numbers() -> None:
    with pytest.raises(ValidationError) as err:
        resolve_boot_disk(SEALED, "2G", 12)
    assert str(err.value) == (
        "-disk-size-gb=12 is too small for -oem-size=2G: the disk must be at least 13 GB "
        "(10 GB image + 2 x 2G OEM (file system and hash tree) - 2046 MB reclaimed, rounded up to whole GB); "
        "pass -disk-size-gb=13 or a smaller -oem-size"
    )
    with pytest.raises(ValidationError) as err:
        resolve_boot_disk(PLAIN, "1G", 0)
    assert str(err.value) == (
        "the default disk size (10 GB) is too small for -oem-size=1G: the disk must be at least 11 GB "
        "(10 GB image + 1G OEM, rounded up to whole GB); pass -disk-size-gb=11 or a smaller -oem-size"
    )
    with pytest.raises(ValidationError) as err:
        resolve_boot_disk(NO_UPDATE, "4G", 11)
    assert "(10 GB image + 4G OEM - 2046 MB reclaimed, rounded up to whole GB)" in str(err.value)


@pytest.mark.parametrize("size", [-1, 1, 9])
def test_disk_size_below_the_image(size: int) -> None:
    with pytest.raises(ValidationError) as err:
        resolve_boot_disk(PLAIN, "", size)
    assert str(err.value) == f"-disk-size-gb={size}: give 0 (keep the image's 10 GB) or at least 10"


def test_need_disk_resize_follows_the_original() -> None:
    assert not need_disk_resize(BootDisk("1023M"), 10)
    assert need_disk_resize(BootDisk("1023M"), 11)
    assert need_disk_resize(BootDisk("", 0, True), 11)
    assert not need_disk_resize(BootDisk(""), 20)
