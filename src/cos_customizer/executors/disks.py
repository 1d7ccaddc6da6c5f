"""The two disks a preload VM gets beside its boot disk, for the GCE and qemu executors: CIDATA (the
provisioner, its config and cloud-init's NoCloud pair, on FAT) and SCRATCH (an empty ext4), each a
`.tar.gz` holding `disk.raw`, as Compute Engine imports it.

CIDATA holds one provisioner, `/provisioner`, built for the source image's architecture (the original
ships one per architecture, `provisioner_amd64` and `provisioner_arm64`, and picks by `uname -m`): the VM
boots the source, so its machine is the source's, and the startup script runs that one file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cos_customizer import output
from cos_customizer.executors import startup
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.runner import require_tool, run

CIDATA_MARGIN = 16 << 20


def cidata_disk(work: Path, binary: Path, config: ProvisionerConfig) -> Path:
    """The CIDATA FAT disk as a `.tar.gz` holding disk.raw.

    `binary` is the build's own file in `work` (`provisioner_build.ship`'s checked copy, or `build`'s): what
    is checked is what is shipped, never a file another path names.
    """
    if binary.parent != work:
        raise AssertionError(f"the provisioner shipped must be the build's own copy in {work}, not {binary}")
    directory = work / "cidata"
    directory.mkdir()
    disk = directory / "disk.raw"
    config_file = work / "config.json"
    config_file.write_text(json.dumps(config.to_json(), indent=2))
    size_kib = (binary.stat().st_size + CIDATA_MARGIN) // 1024 // 1024 * 1024 + 1024
    run([require_tool("mkfs.vfat", "dosfstools"), "-n", "CIDATA", "-C", str(disk), str(size_kib)])
    mcopy = require_tool("mcopy", "mtools")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run([mcopy, "-i", str(disk), str(binary), "::/provisioner"], env=env)
    run([mcopy, "-i", str(disk), str(config_file), "::/config.json"], env=env)
    # As the original's CIDATA (its Dockerfile): cloud-init's NoCloud pair, the startup cloud-config as
    # user-data and an empty meta-data, so a VM that boots it without metadata still provisions.
    user_data, meta_data = work / "user-data", work / "meta-data"
    user_data.write_text(startup.cloud_config())
    meta_data.write_text("")
    run([mcopy, "-i", str(disk), str(user_data), "::/user-data"], env=env)
    run([mcopy, "-i", str(disk), str(meta_data), "::/meta-data"], env=env)
    archive = work / "cidata.tar.gz"
    output.tar_gz(disk, archive)
    return archive


def scratch_disk(work: Path) -> Path:
    directory = work / "scratch"
    directory.mkdir()
    disk = directory / "disk.raw"
    run([require_tool("mke2fs", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-L", "SCRATCH", str(disk), "64M"])
    archive = work / "scratch.tar.gz"
    output.tar_gz(disk, archive)
    return archive
