"""The optional steps: each adds one step to the provisioner config.

`run-script`, `install-gpu`, `seal-oem`, `disable-auto-update` and
`anthos-installer-install` only edit the workspace, as in the original.
"""

from __future__ import annotations

import logging
import re
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from cos_customizer import buildcontext
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.errors import ValidationError, quoted, shown
from cos_customizer.executors import STEP_COMMANDS
from cos_customizer.executors.gce import compute as gce
from cos_customizer.provisioner import gpu
from cos_customizer.provisioner.config import (
    DisableAutoUpdateArgs,
    InstallGPUArgs,
    InstallPackagesArgs,
    ProvisionerConfig,
    RunScriptArgs,
    SealOEMArgs,
    StepArgs,
    StepType,
)
from cos_customizer.workspace import Workspace

log = logging.getLogger(__name__)

USER_CONTEXT = "user"
# Steps that may write to /usr/share/oem, and so must run before sealing.
WRITES_OEM = frozenset({StepType.RUN_SCRIPT, StepType.INSTALL_GPU, StepType.INSTALL_PACKAGES})
DEFAULT_INSTALLER_CONTAINER = "gcr.io/cos-cloud/cos-gpu-installer:v20230815"
ANTHOS_INSTALLER_VERSION = "anthos_installer-linux-amd64-v0.0.1-bb7e04e.tar.gz"
ANTHOS_INSTALLER_RELEASE_BUCKET = "cos-anthos-builds-us"


def _add_step(context: Context, make: Callable[[ProvisionerConfig], ProvisionerConfig | None]) -> int:
    """Load the provisioner config, let `make` change it, save it atomically (holding the workspace)."""
    ws = context.workspace
    with ws.lock():
        return _edit_steps(ws, make)


def _edit_steps(ws: Workspace, make: Callable[[ProvisionerConfig], ProvisionerConfig | None]) -> int:
    config = ws.provisioner()
    changed = make(config)
    if changed is not None:
        if config.has_step(StepType.SEAL_OEM) and changed.steps[-1].type in WRITES_OEM:
            log.warning(
                "note: seal-oem was configured earlier; the OEM partition is sealed after every other step, "
                "so %s still runs before it",
                STEP_COMMANDS[changed.steps[-1].type],
            )
        ws.save_provisioner(changed)
    return 0


def _script_member(context: Context, path: str, flag: str, *, kinds: tuple[bytes, ...]) -> str:
    name = buildcontext.normalize_member(path, flag)
    member = buildcontext.find_member(context.workspace.build_context_archive, name)
    if member is not None and member.isdir() and tarfile.DIRTYPE not in kinds:
        raise ValidationError(f"{flag}={shown(path)} is a directory of the build context; give a file in it")
    if member is None or member.type not in kinds:
        raise ValidationError(
            f"could not find {shown(path)} in the build context; the build context is the -build-context "
            "of start-image-build, and paths are relative to it"
        )
    return name


# run-script


def handle_run_script(context: Context, args: Parsed) -> int:
    if not args["script"]:
        raise ValidationError("script not provided for run-script step; -script is required")
    context.workspace.require()
    path = _script_member(context, args["script"], "-script", kinds=(tarfile.REGTYPE, tarfile.SYMTYPE))
    env = tuple(f"{key}={value}" for key, value in sorted(args["env"].items()))
    return _add_step(context, lambda c: c.with_step(RunScriptArgs(build_context=USER_CONTEXT, path=path, env=env)))


RUN_SCRIPT = Command(
    name="run-script",
    synopsis="Configure the image build with a script to run.",
    description=(
        "Configure the image build with a script to run. Scripts run in the order given, as /bin/bash "
        "SCRIPT, with the build context as working directory."
    ),
    flags=(
        Flag("script", Kind.STRING, "Name of script to run (a path inside the build context)."),
        Flag(
            "env",
            Kind.MAP,
            "Env vars to set before running the script, as K=V,K2=V2; repeatable. A piece without '=' "
            "continues the previous value, so -env=LIST=a,b gives LIST the value 'a,b'.",
        ),
    ),
    handler=handle_run_script,
)


# install-gpu

_DRIVER_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


def _check_gpu_version(version: str, deps_dir: str) -> None:
    if not version:
        raise ValidationError("-version must be set: a driver version such as 535.104.05, or an NVIDIA .run installer")
    if version.endswith(".run"):
        if not deps_dir:
            raise ValidationError('"-deps-dir" must be set when the version is specified as an nvidia installer file')
        installer = Path(deps_dir) / version
        if not installer.exists():
            raise ValidationError(f"nvidia installer file at {quoted(installer)} does not exist")
        if installer.is_dir():
            raise ValidationError(f"nvidia installer file at {quoted(installer)} is a directory")
        if gpu.driver_version(version) is None:
            raise ValidationError(
                f"-version={shown(version)}: cannot read the driver version from the installer name; "
                "expected a name like NVIDIA-Linux-x86_64-450.51.06.run"
            )
    elif not _DRIVER_VERSION.match(version):
        raise ValidationError(
            f"driver version {shown(version)} is not valid: give a version such as 535.104.05, or the name of an "
            "NVIDIA installer file in -deps-dir such as NVIDIA-Linux-x86_64-450.51.06.run"
        )
    else:  # as the original: a version must be one NVIDIA's public bucket has
        valid = gce.valid_driver_versions()
        if version not in valid:
            raise ValidationError(
                f"driver version {shown(version)} is not valid; valid driver versions are: [{' '.join(valid)}] "
                "(or give an NVIDIA .run installer in -deps-dir)"
            )


def _deps_files(deps_dir: str) -> tuple[str, ...]:
    directory = Path(deps_dir)
    if not directory.is_dir():
        raise ValidationError(f"-deps-dir={shown(deps_dir)}: not a directory")
    return tuple(str(path.resolve()) for path in sorted(directory.iterdir()) if path.is_file())


def handle_install_gpu(context: Context, args: Parsed) -> int:
    if args["get-valid-drivers"]:
        versions = gce.valid_driver_versions()
        log.info("Valid driver versions are: [%s]", " ".join(versions))
        sys.stdout.write("".join(f"{version}\n" for version in versions))
        return 0
    ws = context.workspace
    config = ws.provisioner()
    version, deps_dir = args["version"], args["deps-dir"]
    if config.has_step(StepType.INSTALL_GPU):
        raise ValidationError(
            "install-gpu can only be invoked once in an image build process. "
            "Only one driver version can be installed on the image"
        )
    _check_gpu_version(version, deps_dir)
    if args["md5sum"] and not _MD5.match(args["md5sum"]):
        raise ValidationError(f"-md5sum={shown(args['md5sum'])}: expected 32 hexadecimal digits")
    if not args["install-dir"].startswith("/"):
        raise ValidationError(
            f"-install-dir={shown(args['install-dir'])}: give an absolute path on the image, like /var/lib/nvidia"
        )
    build = ws.build()
    files = _deps_files(deps_dir) if deps_dir else ()
    step = InstallGPUArgs(
        nvidia_driver_version=version,
        nvidia_driver_md5sum=args["md5sum"],
        nvidia_install_dir_host=args["install-dir"],
        nvidia_installer_container=args["installer-container"],
        # As the original: the -deps-dir value; finish-image-build replaces it with the uploaded gs:// prefix.
        gcs_deps_prefix=deps_dir,
    )
    # The provisioner config is written last: a failure before leaves the build as it was.
    ws.save_build(build.model_copy(update={"GPUType": args["gpu-type"], "GCSFiles": (*build.GCSFiles, *files)}))
    return _add_step(context, lambda c: c.with_step(step))


INSTALL_GPU = Command(
    name="install-gpu",
    synopsis="Configure the image build with GPU drivers.",
    description=(
        "Configure the image build with GPU drivers, installed with the COS GPU installer; a setup_gpu.sh "
        "in the install directory must then run at every boot. At most once per build. Runs on the gce "
        "executor only."
    ),
    flags=(
        Flag(
            "version",
            Kind.STRING,
            "Driver version to install. Can also be the name of an nvidia installer present in the directory "
            "specified by '-deps-dir'; e.g., NVIDIA-Linux-x86_64-450.51.06.run.",
        ),
        Flag("md5sum", Kind.STRING, "Md5sum of the driver to install."),
        Flag("install-dir", Kind.STRING, "Location to install drivers on the image.", default="/var/lib/nvidia"),
        Flag(
            "gpu-type",
            Kind.STRING,
            "This flag is deprecated, please use the same flag in step 'finish-image-build'.",
            default="nvidia-tesla-p100",
            empty="the preload VM would get no GPU and the driver install would fail on it",
        ),
        Flag(
            "get-valid-drivers",
            Kind.BOOL,
            "Print the list of supported GPU driver versions. If this flag is given, no other actions will be taken.",
        ),
        Flag(
            "deps-dir",
            Kind.STRING,
            "If provided, the local directory to search for cos-gpu-installer data dependencies; its files are "
            "uploaded with the build.",
        ),
        Flag(
            "installer-container",
            Kind.STRING,
            "Use the provided cos-gpu-installer-v1 container, for e.g. gcr.io/cos-cloud/cos-gpu-installer:latest",
            default=DEFAULT_INSTALLER_CONTAINER,
            empty="the provisioner would have no GPU installer to run (the original's fails on the VM)",
        ),
    ),
    handler=handle_install_gpu,
)


# seal-oem and disable-auto-update: no flags, set ReclaimSDA3.


def _reclaiming_step(args_type: type[StepArgs], command: str) -> Callable[[Context, Parsed], int]:
    def handle(context: Context, _args: Parsed) -> int:
        def change(config: ProvisionerConfig) -> ProvisionerConfig | None:
            if config.has_step(args_type.TYPE):
                log.info("%s is already configured for this build; nothing to change", command)
                return None
            return config.with_boot_disk(reclaim_sda3=True).with_step(args_type())

        return _add_step(context, change)

    return handle


SEAL_OEM = Command(
    name="seal-oem",
    synopsis="Seal the OEM partition.",
    description=(
        "Seal the OEM partition (/usr/share/oem) with dm-verity. The partition doubles in size to hold the "
        "hash tree; auto-update is disabled and ROOT-A's space reclaimed. Sealing runs after every other step."
    ),
    flags=(),
    handler=_reclaiming_step(SealOEMArgs, "seal-oem"),
)

DISABLE_AUTO_UPDATE = Command(
    name="disable-auto-update",
    synopsis="Disable auto-update service.",
    description=(
        "Disable the auto-update service (mask update-engine.service on the kernel command line) and "
        "reclaim the 2046 MB of the unused root partition."
    ),
    flags=(),
    handler=_reclaiming_step(DisableAutoUpdateArgs, "disable-auto-update"),
)


# anthos-installer-install

_REMOTE = re.compile(r"^(gs|https?)://[^/]+")


def handle_anthos(context: Context, args: Parsed) -> int:
    url = args["pkgspec-url"]
    if not url:
        raise ValidationError(
            "Required package spec is not provided for anthos-installer-install step: set -pkgspec-url"
        )
    context.workspace.require()
    if "://" in url:
        if not _REMOTE.match(url):
            raise ValidationError(
                f"-pkgspec-url={shown(url)}: use a gs://, http:// or https:// address, or a path inside the build "
                "context"
            )
    else:
        url = _script_member(context, url, "-pkgspec-url", kinds=(tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE))
    step = InstallPackagesArgs(
        build_context=USER_CONTEXT,
        pkg_spec_url=url,
        top_work_dir=args["top-workdir"],
        anthos_installer_version=ANTHOS_INSTALLER_VERSION,
        anthos_installer_release_bucket=ANTHOS_INSTALLER_RELEASE_BUCKET,
    )
    return _add_step(context, lambda c: c.with_step(step))


ANTHOS_INSTALLER_INSTALL = Command(
    name="anthos-installer-install",
    synopsis="Installs packages specified by pkgspec files.",
    description=(
        "Install packages described by pkgspec files with the Anthos installer. Runs on the gce executor only."
    ),
    flags=(
        Flag(
            "pkgspec-url",
            Kind.STRING,
            "URL path that points to the package spec: a directory or archive in the build context, "
            "or a gs://, http:// or https:// address.",
        ),
        Flag(
            "top-workdir",
            Kind.STRING,
            "Path to the top working directory, used to hold package spec and package tarballs.",
        ),
    ),
    handler=handle_anthos,
)
