"""setup_gpu.sh: the script InstallGPU leaves in the install directory and runs once at build time.

It runs the COS GPU installer container with the settings of the step; the
user runs it again at every boot (as root, from a systemd unit or
cloud-init) to load the driver. So it must work without anything of the
build around it: no scratch disk, and none of the two download addresses
the build passes in the environment of its own run (`COS_DOWNLOAD_GCS`:
where the installer finds its dependencies, here the uploaded `-deps-dir`;
`GPU_INSTALLER_DOWNLOAD_URL`: the NVIDIA `.run` installer among them).
Everything else is fixed in the script, every value shell-quoted.
Standard library only.
"""

from __future__ import annotations

import shlex

from cos_customizer.provisioner.config import InstallGPUArgs

DEFAULT_INSTALL_DIR = "/var/lib/nvidia"
SCRIPT_NAME = "setup_gpu.sh"
# Where the driver appears inside the container, where the host's root is mounted there, and the
# container's directory for the toolchain it downloads (a scratch disk at build time: it is large).
CONTAINER_INSTALL_DIR = "/usr/local/nvidia"
ROOT_MOUNT_DIR = "/root"
TOOLCHAIN_PKG_DIR = "/toolchain"
SCRATCH_DISK_LOCATION = "/mnt/disks/scratch/gpu"
PUBLIC_GCS = "https://storage.googleapis.com/"
PULL_ATTEMPTS = 10
PULL_PAUSE_SECONDS = 2
# The variables the installer container gets from the script's environment, in this order.
CONTAINER_ENV = (
    "TOOLCHAIN_PKG_DIR",
    "NVIDIA_DRIVER_VERSION",
    "NVIDIA_DRIVER_MD5SUM",
    "NVIDIA_INSTALL_DIR_HOST",
    "COS_NVIDIA_INSTALLER_CONTAINER",
    "NVIDIA_INSTALL_DIR_CONTAINER",
    "ROOT_MOUNT_DIR",
    "COS_DOWNLOAD_GCS",
    "GPU_INSTALLER_DOWNLOAD_URL",
)


def driver_version(version: str) -> str | None:
    """The driver version to install: `version` itself, or read from an NVIDIA installer name
    (NVIDIA-Linux-x86_64-450.51.06.run -> 450.51.06); None for an installer name of another shape."""
    if not version.endswith(".run"):
        return version
    fields = [field for field in version.removesuffix(".run").split("-") if field]
    return fields[3] if len(fields) == 4 else None


def installer_env(args: InstallGPUArgs) -> dict[str, str]:
    """The download addresses the build gives the installer for its run (empty without -deps-dir)."""
    deps = PUBLIC_GCS + args.gcs_deps_prefix.removeprefix("gs://") if args.gcs_deps_prefix else ""
    run_file = f"{deps}/{args.nvidia_driver_version}" if deps and args.nvidia_driver_version.endswith(".run") else ""
    return {"COS_DOWNLOAD_GCS": deps, "GPU_INSTALLER_DOWNLOAD_URL": run_file}


def setup_script(args: InstallGPUArgs, version: str) -> str:
    """The text of setup_gpu.sh for this step, installing driver `version`."""
    settings = {
        "NVIDIA_DRIVER_VERSION": version,
        "NVIDIA_DRIVER_MD5SUM": args.nvidia_driver_md5sum,
        "NVIDIA_INSTALL_DIR_HOST": args.nvidia_install_dir_host or DEFAULT_INSTALL_DIR,
        "COS_NVIDIA_INSTALLER_CONTAINER": args.nvidia_installer_container,
        "NVIDIA_INSTALL_DIR_CONTAINER": CONTAINER_INSTALL_DIR,
        "ROOT_MOUNT_DIR": ROOT_MOUNT_DIR,
        "TOOLCHAIN_PKG_DIR": TOOLCHAIN_PKG_DIR,
        "SCRATCH_DISK_LOCATION": SCRATCH_DISK_LOCATION,
    }
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in settings.items())
    passed = " ".join(f"-e {name}" for name in CONTAINER_ENV)
    return f"""#!/bin/bash
# Written by cos-customizer (install-gpu). Run it as root at every boot to load the NVIDIA driver
# kept in the install directory below. COS_DOWNLOAD_GCS and GPU_INSTALLER_DOWNLOAD_URL, when set in
# the environment, tell the installer where to download from; the image build sets them.
set -o errexit

{exports}
# Programs run from the install directory, which is on a noexec file system (/var) on COS.
mkdir -p "$NVIDIA_INSTALL_DIR_HOST"
mount --bind "$NVIDIA_INSTALL_DIR_HOST" "$NVIDIA_INSTALL_DIR_HOST"
mount -o remount,bind,exec "$NVIDIA_INSTALL_DIR_HOST"

pulled=no
pull_status=1
for ((attempt = 1; attempt <= {PULL_ATTEMPTS}; attempt++)); do
  echo "Pulling $COS_NVIDIA_INSTALLER_CONTAINER (attempt $attempt of {PULL_ATTEMPTS})"
  if docker pull "$COS_NVIDIA_INSTALLER_CONTAINER"; then
    pulled=yes
    break
  else
    pull_status=$?
  fi
  sleep {PULL_PAUSE_SECONDS}
done
if [[ $pulled != yes ]]; then
  echo "Cannot pull $COS_NVIDIA_INSTALLER_CONTAINER; the docker service's journal follows" >&2
  journalctl -u docker.service --no-pager || true
  exit "$pull_status"
fi

volumes=(
  --volume "$NVIDIA_INSTALL_DIR_HOST:$NVIDIA_INSTALL_DIR_CONTAINER"
  --volume /dev:/dev
  --volume "/:$ROOT_MOUNT_DIR"
)
# The toolchain goes to the scratch disk when there is one (the image build); at boot it stays in
# the container, which is removed when it ends.
if [[ -d $SCRATCH_DISK_LOCATION ]]; then
  volumes+=(--volume "$SCRATCH_DISK_LOCATION:$TOOLCHAIN_PKG_DIR")
fi
if ! docker run --rm --privileged --net=host --pid=host "${{volumes[@]}}" \\
    {passed} \\
    "$COS_NVIDIA_INSTALLER_CONTAINER"; then
  echo "The GPU driver installation failed" >&2
  if [[ -f $NVIDIA_INSTALL_DIR_HOST/nvidia-installer.log ]]; then
    echo "The NVIDIA installer's log:" >&2
    cat "$NVIDIA_INSTALL_DIR_HOST/nvidia-installer.log" >&2
  fi
  exit 1
fi

"$NVIDIA_INSTALL_DIR_HOST/bin/nvidia-smi"
if ! pgrep -f nvidia-persistenced >/dev/null; then
  "$NVIDIA_INSTALL_DIR_HOST/bin/nvidia-persistenced" --verbose
fi
# Panic on a soft lockup rather than hang (COS reboots after a panic).
echo 1 > /proc/sys/kernel/softlockup_panic
"""
