"""What each provisioner step does on the target; a registry maps step type to runner.

SealOEM always runs after every other step (it seals what they wrote).
Standard library only.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cos_customizer.disk import blockdev, ext, grub
from cos_customizer.disk.gpt import read_table
from cos_customizer.disk.planner import OEM
from cos_customizer.disk.verity import derived_salt, format_verity, random_salt
from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner import cleanup, download, gpu
from cos_customizer.provisioner.cleanup import STATE_DIR
from cos_customizer.provisioner.config import (
    InstallGPUArgs,
    InstallPackagesArgs,
    RunScriptArgs,
    Step,
    StepArgs,
    StepType,
)
from cos_customizer.provisioner.environment import child_env
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target
from cos_customizer.runner import run

EFI = 12
GRUB_CFG = "efi/boot/grub.cfg"
# The environment of a script in the local executor; on a VM scripts get the VM's (environment.child_env).
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
    # SOURCE_DATE_EPOCH of a reproducible local build: a derived verity salt, FAT times at the epoch.
    epoch: int | None = None

    def context_dir(self, name: str) -> str:
        """The build context `name` as a path of the target."""
        return f"/var/lib/.cos-customizer/{name}"


def ordered(steps: tuple[Step, ...]) -> list[Step]:
    """The order steps run in: as configured, with SealOEM last."""
    return [s for s in steps if s.type is not StepType.SEAL_OEM] + [s for s in steps if s.type is StepType.SEAL_OEM]


def run_script(ctx: Context, args: StepArgs) -> None:
    assert isinstance(args, RunScriptArgs)
    extra = {key: value for key, _, value in (item.partition("=") for item in args.env)}
    env = {**SCRIPT_ENV_BASE, **extra} if ctx.target.fixed_env else child_env(extra)
    workdir = ctx.context_dir(args.build_context)
    # An absolute path inside the build context (the original's filepath.Join(buildContext, Path)), so a
    # script named like an option (--version, -i) is never read by bash as one.
    script = posixpath.normpath(posixpath.join(workdir, args.path.lstrip("/")))
    argv = ["/bin/bash", script if ctx.target.chroot else str(ctx.target.path(script))]
    status = _run(ctx, workdir, argv, env)
    if status != 0:
        raise StepFailed(f"script {args.path} failed with exit status {status}", status)


def edit_grub(ctx: Context, edit: Callable[[str], str]) -> None:
    """Mount EFI-SYSTEM, rewrite grub.cfg with `edit`, unmount."""
    table = read_table(ctx.target.disk)
    efi = table.partition(EFI)
    if ctx.target.efi_access == "mtools":
        offset = efi.first * 512
        grub.write_grub_cfg(ctx.target.disk, offset, edit(grub.read_grub_cfg(ctx.target.disk, offset)), ctx.epoch)
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
    for line in cleanup.trim(ctx.target.root, ("usr/share/oem",)):  # free blocks read as zeros in the hash tree
        ctx.say(line)
    ctx.target.systemctl_run("stop", "usr-share-oem.mount")
    ctx.target.unmount(ctx.target.path("/usr/share/oem"))
    blockdev.drop_cache(ctx.target.disk)  # what the OEM's own device wrote, not /dev/sda's stale pages
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
        salt=random_salt() if ctx.epoch is None else derived_salt(ctx.target.disk, offset, fs_4k, ctx.epoch),
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


def install_gpu(ctx: Context, args: StepArgs) -> None:
    """Write setup_gpu.sh into the install directory and run it, with the deps' download addresses."""
    assert isinstance(args, InstallGPUArgs)
    version = gpu.driver_version(args.nvidia_driver_version)
    if version is None:
        raise StepFailed(
            f"malformed nvidia installer: {args.nvidia_driver_version!r}; "
            "expected a name like NVIDIA-Linux-x86_64-450.51.06.run"
        )
    install_dir = args.nvidia_install_dir_host or gpu.DEFAULT_INSTALL_DIR
    script_path = posixpath.join(install_dir, gpu.SCRIPT_NAME)
    script = ctx.target.path(script_path)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(gpu.setup_script(args, version))
    script.chmod(0o744)
    ctx.say(f"Installing GPU driver {version} with {script_path}")
    status = _run(ctx, install_dir, ["/bin/bash", script_path], child_env(gpu.installer_env(args)))
    if status != 0:
        raise StepFailed(f"installing GPU drivers failed: {script_path} exited with status {status}", status)
    ctx.say("Done installing GPU drivers")


# Where the Anthos installer is unpacked when the step does not say: the state directory, which the
# cleanup removes, so that only what the installer installs stays in the image.
INSTALLER_DIR = f"/{STATE_DIR}"
REMOTE_SCHEMES = ("http", "https", "gs")


def installer_argv(ctx: Context, args: InstallPackagesArgs, bin_dir: str) -> list[str]:
    """The Anthos installer's command line: a pkgspec path is inside the build context."""
    context_dir = ctx.context_dir(args.build_context)
    spec = args.pkg_spec_url
    if urllib.parse.urlparse(spec).scheme not in REMOTE_SCHEMES:
        spec = posixpath.normpath(f"{context_dir}/{spec}")
    return [
        f"{bin_dir}/anthos_installer",
        "install",
        f"-pkgspec-url={spec}",
        f"-build-contextdir={context_dir}",
        f"-top-workdir={args.top_work_dir}",
    ]


def install_packages(ctx: Context, args: StepArgs) -> None:
    """Fetch the Anthos installer release, unpack it, and run it on the pkgspec from an exec bin/."""
    assert isinstance(args, InstallPackagesArgs)
    ctx.say(f"Installing packages from {args.pkg_spec_url}")
    installer_dir = args.anthos_installer_dir or INSTALLER_DIR
    directory = ctx.target.path(installer_dir)
    directory.mkdir(parents=True, exist_ok=True)
    bucket, version = args.anthos_installer_release_bucket, args.anthos_installer_version
    archive = directory / posixpath.basename(version)
    download.fetch(f"{(bucket if '://' in bucket else f'gs://{bucket}').rstrip('/')}/{version}", archive)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(directory)
    except (tarfile.TarError, OSError) as err:
        raise StepFailed(f"cannot unpack the Anthos installer {version}: {err}") from err
    if not (directory / "anthos_installer").is_file():
        raise StepFailed(f"the Anthos installer release {version} has no anthos_installer")
    bin_dir = posixpath.join(installer_dir, "bin")
    host_bin = ctx.target.path(bin_dir)
    host_bin.mkdir(exist_ok=True)
    shutil.copyfile(directory / "anthos_installer", host_bin / "anthos_installer")
    (host_bin / "anthos_installer").chmod(0o755)
    # The state directory is on /var, mounted noexec on COS: bin/ gets a bind mount of its own, exec.
    run(["mount", "--bind", str(host_bin), str(host_bin)])
    try:
        run(["mount", "-o", "remount,bind,exec", str(host_bin)])
        status = _run(ctx, installer_dir, installer_argv(ctx, args, bin_dir), child_env())
    finally:
        run(["umount", str(host_bin)])
    if status != 0:
        raise StepFailed(f"the Anthos installer failed with exit status {status}", status)
    ctx.say(f"Done installing the packages from {args.pkg_spec_url}")


RUNNERS: dict[StepType, Callable[[Context, StepArgs], None]] = {
    StepType.RUN_SCRIPT: run_script,
    StepType.INSTALL_GPU: install_gpu,
    StepType.DISABLE_AUTO_UPDATE: disable_auto_update,
    StepType.SEAL_OEM: seal_oem,
    StepType.INSTALL_PACKAGES: install_packages,
}
