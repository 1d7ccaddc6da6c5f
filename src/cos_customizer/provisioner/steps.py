"""What each provisioner step does on the target; a registry maps step type to runner.

SealOEM always runs after every other step (it seals what they wrote).
Standard library only.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cos_customizer.disk import ext, grub
from cos_customizer.disk.gpt import read_table
from cos_customizer.disk.planner import OEM
from cos_customizer.disk.verity import format_verity, random_salt
from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner.config import (
    InstallGPUArgs,
    InstallPackagesArgs,
    RunScriptArgs,
    Step,
    StepArgs,
    StepType,
)
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from cos_customizer.runner import run

EFI = 12
GRUB_CFG = "efi/boot/grub.cfg"
# The environment of a script run in a chroot (the local executor, tests); on a VM scripts get the VM's.
SCRIPT_ENV_BASE = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


class StepFailed(CustomizerError):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _run(ctx: Context, workdir: str, argv: list[str], env: dict[str, str]) -> int:
    command, cwd = ctx.target.command(workdir, argv)
    return run(command, cwd=Path(cwd) if cwd else None, env=env, on_line=ctx.say, check=False).returncode


@dataclass(frozen=True)
class Context:
    target: Target
    state: State
    say: Callable[[str], None]
    progress: Callable[[int, int], None] | None = None
    # What steps report back (the OEM verity parameters), for a build summary.
    results: dict[str, object] = field(default_factory=dict)

    def context_dir(self, name: str) -> str:
        """The build context `name` as a path of the target."""
        return f"/var/lib/.cos-customizer/{name}"


def ordered(steps: tuple[Step, ...]) -> list[Step]:
    """The order steps run in: as configured, with SealOEM last."""
    return [s for s in steps if s.type is not StepType.SEAL_OEM] + [s for s in steps if s.type is StepType.SEAL_OEM]


def run_script(ctx: Context, args: StepArgs) -> None:
    assert isinstance(args, RunScriptArgs)
    env = dict(os.environ) if not ctx.target.chroot else dict(SCRIPT_ENV_BASE)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    status = _run(ctx, ctx.context_dir(args.build_context), ["/bin/bash", args.path], env)
    if status != 0:
        raise StepFailed(f"script {args.path} failed with exit status {status}", status)


def edit_grub(ctx: Context, edit: Callable[[str], str]) -> None:
    """Mount EFI-SYSTEM, rewrite grub.cfg with `edit`, unmount."""
    table = read_table(ctx.target.disk)
    efi = table.partition(EFI)
    if ctx.target.efi_access == "mtools":
        offset = efi.first * 512
        grub.write_grub_cfg(ctx.target.disk, offset, edit(grub.read_grub_cfg(ctx.target.disk, offset)))
        return
    with tempfile.TemporaryDirectory(prefix="cos-customizer-efi.") as tmp:
        mountpoint = Path(tmp)
        ctx.target.mount_partition(EFI, efi.first, efi.size, mountpoint)
        try:
            cfg = mountpoint / GRUB_CFG
            cfg.write_text(edit(cfg.read_text()))
            os.sync()
        finally:
            ctx.target.unmount(mountpoint)


def disable_auto_update(ctx: Context, _args: StepArgs) -> None:
    ctx.say("Disabling auto updates")
    edit_grub(ctx, lambda cfg: grub.mask_units(cfg, grub.UPDATE_ENGINE))


def seal_oem(ctx: Context, _args: StepArgs) -> None:
    fs_4k = ctx.state.config.boot_disk.oem_fs_size_4k
    if not fs_4k:
        raise StepFailed("OEMFSSize4K is not set: finish-image-build sets it when seal-oem is configured")
    # grub.cfg must have a verity line to add the OEM to: checked (read only) before anything is written.
    efi = read_table(ctx.target.disk).partition(EFI)
    if ctx.target.efi_access == "mtools":
        current = grub.read_grub_cfg(ctx.target.disk, efi.first * 512)
    else:
        with tempfile.TemporaryDirectory(prefix="cos-customizer-efi.") as tmp:
            ctx.target.mount_partition(EFI, efi.first, efi.size, Path(tmp), "ro")
            try:
                current = (Path(tmp) / GRUB_CFG).read_text()
            finally:
                ctx.target.unmount(Path(tmp))
    grub.check_oem_verity(current)
    ctx.say("Sealing the OEM partition with dm-verity")
    ctx.target.systemctl_run("stop", "usr-share-oem.mount")
    ctx.target.unmount(ctx.target.path("/usr/share/oem"))
    oem = read_table(ctx.target.disk).partition(OEM)
    offset = oem.first * 512
    ext.check(ctx.target.disk, offset)
    size = ext.info(ctx.target.disk, offset).size
    if size != fs_4k * 4096:
        raise StepFailed(f"the OEM file system is {size} bytes, not the {fs_4k * 4096} bytes to seal")
    params = format_verity(
        ctx.target.disk,
        data_offset=offset,
        data_blocks=fs_4k,
        hash_offset=offset + fs_4k * 4096,
        salt=random_salt(),
        progress=ctx.progress,
    )
    ctx.results["oem_verity"] = params
    ctx.say(f"OEM verity root hash {params.root_hexdigest}")

    def edit(cfg: str) -> str:
        sealed = grub.add_oem_verity(
            cfg,
            partuuid=str(oem.guid).upper(),
            fs_size_4k=fs_4k,
            root_hexdigest=params.root_hexdigest,
            salt=params.salt_hex,
        )
        # As the original: update-engine masked first, then the OEM mount, each right after cros_efi.
        return grub.mask_units(sealed, grub.UPDATE_ENGINE, grub.OEM_MOUNT)

    edit_grub(ctx, edit)


_RUN_VERSION = re.compile(r"-([0-9]+(?:\.[0-9]+)+)\.run$")

SETUP_GPU = """#!/bin/bash
# Written by cos-customizer. Run it at every boot to load the NVIDIA drivers installed on this image.
set -o errexit
set -o pipefail
NVIDIA_DRIVER_VERSION={version}
NVIDIA_DRIVER_MD5SUM={md5sum}
NVIDIA_INSTALL_DIR_HOST={install_dir}
COS_NVIDIA_INSTALLER_CONTAINER={container}
NVIDIA_DRIVER_DOWNLOAD_URL={download_url}
mkdir -p "${{NVIDIA_INSTALL_DIR_HOST}}"
mount --bind "${{NVIDIA_INSTALL_DIR_HOST}}" "${{NVIDIA_INSTALL_DIR_HOST}}"
mount -o remount,exec "${{NVIDIA_INSTALL_DIR_HOST}}"
docker run --rm --privileged --net=host --pid=host \\
  --volume "${{NVIDIA_INSTALL_DIR_HOST}}":/usr/local/nvidia \\
  --volume /dev:/dev --volume /:/root \\
  --env NVIDIA_DRIVER_VERSION="${{NVIDIA_DRIVER_VERSION}}" \\
  --env NVIDIA_DRIVER_MD5SUM="${{NVIDIA_DRIVER_MD5SUM}}" \\
  --env NVIDIA_DRIVER_DOWNLOAD_URL="${{NVIDIA_DRIVER_DOWNLOAD_URL}}" \\
  "${{COS_NVIDIA_INSTALLER_CONTAINER}}"
"""


def gpu_script(args: InstallGPUArgs) -> str:
    """setup_gpu.sh for these arguments, every value shell-quoted."""
    version, url = args.nvidia_driver_version, ""
    match = _RUN_VERSION.search(version)
    if version.endswith(".run") and match:
        if args.gcs_deps_prefix:
            url = deps_url(args.gcs_deps_prefix, version)
        version = match.group(1)
    return SETUP_GPU.format(
        version=shlex.quote(version),
        md5sum=shlex.quote(args.nvidia_driver_md5sum),
        install_dir=shlex.quote(args.nvidia_install_dir_host or "/var/lib/nvidia"),
        container=shlex.quote(args.nvidia_installer_container),
        download_url=shlex.quote(url),
    )


def deps_url(prefix: str, name: str) -> str:
    """The download address of `name` under a deps prefix (gs:// becomes the public GCS endpoint)."""
    if prefix.startswith("gs://"):
        bucket, _, path = prefix[len("gs://") :].partition("/")
        return f"https://storage.googleapis.com/{bucket}/{path.rstrip('/') + '/' if path else ''}{name}"
    return f"{prefix.rstrip('/')}/{name}"


def install_gpu(ctx: Context, args: StepArgs) -> None:
    assert isinstance(args, InstallGPUArgs)
    install_dir = args.nvidia_install_dir_host or "/var/lib/nvidia"
    directory = ctx.target.path(install_dir)
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "setup_gpu.sh"
    script.write_text(gpu_script(args))
    script.chmod(0o755)
    ctx.say(f"Installing GPU drivers with {install_dir}/setup_gpu.sh")
    status = _run(ctx, install_dir, ["/bin/bash", f"{install_dir}/setup_gpu.sh"], dict(os.environ))
    if status != 0:
        raise StepFailed(f"setup_gpu.sh failed with exit status {status}")


def install_packages(ctx: Context, args: StepArgs) -> None:
    assert isinstance(args, InstallPackagesArgs)
    workdir = args.top_work_dir or "/var/lib/anthos-installer"
    directory = ctx.target.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    bucket = args.anthos_installer_release_bucket
    source = bucket if "://" in bucket else f"gs://{bucket}"
    archive = directory / "installer.tar.gz"
    fetch(deps_url(source, args.anthos_installer_version), archive)
    run(["tar", "-xzf", str(archive), "-C", str(directory)])
    spec = args.pkg_spec_url
    if "://" not in spec:
        spec = f"{ctx.context_dir(args.build_context)}/{spec}"
    installer = [f"{workdir}/anthos_installer", "install", f"--pkgspec-url={spec}", f"--top-workdir={workdir}"]
    status = _run(ctx, workdir, installer, dict(os.environ))
    if status != 0:
        raise StepFailed(f"the Anthos installer failed with exit status {status}")


def fetch(url: str, destination: Path) -> None:
    """Download `url` (http(s):// or file://) to `destination`."""
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(destination, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as err:
        raise StepFailed(f"cannot download {url}: {err}") from err


RUNNERS: dict[StepType, Callable[[Context, StepArgs], None]] = {
    StepType.RUN_SCRIPT: run_script,
    StepType.INSTALL_GPU: install_gpu,
    StepType.DISABLE_AUTO_UPDATE: disable_auto_update,
    StepType.SEAL_OEM: seal_oem,
    StepType.INSTALL_PACKAGES: install_packages,
}
