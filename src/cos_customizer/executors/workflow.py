"""The Daisy workflow `build-image` and daisy's argument list, as pure functions.

Semantically equal to the Go original's for the same inputs: the same vars,
sources, steps and dependencies; a scratch disk only when a step needs one
(install-gpu); the two forms of `wait-for-resize`/`resize-disk` (a real
resize when the disk grows and partitions move, placeholders otherwise);
one guest accelerator when a GPU type is set.
"""

from __future__ import annotations

import dataclasses
import posixpath
import urllib.parse
from typing import Any

from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import ValidationError
from cos_customizer.plan import IMAGE_SIZE_GB, need_disk_resize
from cos_customizer.provisioner.config import InstallGPUArgs, ProvisionerConfig, Step, StepType
from cos_customizer.units import MINUTE, format_duration, parse_duration

SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write", "https://www.googleapis.com/auth/cloud-platform"]
CLEANUP_LABEL = "cos-customizer-cleanup"
LICENSE_PREFIX = "https://www.googleapis.com/compute/v1/"
RESIZE_LINE = "waiting for the boot disk size to change"
DEFAULT_COMPUTE = "compute.googleapis.com/compute/v1"


@dataclasses.dataclass(frozen=True)
class OutputImage:
    name: str
    project: str
    family: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    licenses: tuple[str, ...] = ()


def needs_scratch_disk(config: ProvisionerConfig) -> bool:
    return config.has_step(StepType.INSTALL_GPU)


def sanitize_licenses(licenses: tuple[str, ...]) -> list[str]:
    return [item.removeprefix(LICENSE_PREFIX) for item in licenses if item]


def _var(description: str, *, required: bool = False, value: str = "") -> dict[str, Any]:
    return {"Required": True, "Description": description} if required else {"Value": value, "Description": description}


def _wait_status(port_match: str) -> dict[str, Any]:
    return {"WaitForInstancesSignal": [{"Name": "preload-vm", "Interval": "10s",
                                        "SerialOutput": {"Port": 3, "SuccessMatch": port_match}}]}  # fmt: skip


def workflow(build: BuildConfig, config: ProvisionerConfig, output: OutputImage, cloud_config: str) -> dict[str, Any]:
    """The workflow document; `cloud_config` is the path of the startup file."""
    scratch = needs_scratch_disk(config)
    accelerators: list[dict[str, Any]] = []
    if build.GPUType:
        accelerators.append({
            "acceleratorType": f"projects/{build.Project}/zones/{build.Zone}/acceleratorTypes/{build.GPUType}",
            "acceleratorCount": 1,
        })  # fmt: skip
    if need_disk_resize(config.boot_disk, build.DiskSize):
        resize: dict[str, Any] = {"ResizeDisks": [{"Name": "boot-disk", "SizeGb": str(build.DiskSize)}]}
        wait_resize: dict[str, Any] = {"WaitForInstancesSignal": [{"Name": "preload-vm", "Interval": "10s",
            "SerialOutput": {"Port": 3, "SuccessMatch": RESIZE_LINE, "FailureMatch": "BuildFailed:"}}]}  # fmt: skip
    else:
        resize = wait_resize = _wait_status("BuildStatus:")
    boot = {"Name": "boot-disk", "SourceImage": "${source_image}", "Type": "${disk_type}", "SizeGb": "${disk_size_gb}"}
    disks = [boot, {"Name": "cidata-disk", "SourceImage": "cidata", "Type": "${disk_type}"}]
    attached = [{"Source": "boot-disk"}, {"Source": "cidata-disk"}]
    if scratch:
        disks.insert(0, {"Name": "scratch-disk", "SourceImage": "scratch", "Type": "${disk_type}", "SizeGb": "10"})
        attached.insert(1, {"Source": "scratch-disk"})
    return {
        "Name": "build-image",
        "Vars": {
            "source_image": _var("URL of the source image to preload.", required=True),
            "output_image_name": _var("Name of output image.", required=True),
            "output_image_family": _var("Family of output image."),
            "output_image_project": _var("Project of output image.", required=True),
            "cidata_img": _var("The CIDATA disk (provisioner and its config), as a .tar.gz image.", required=True),
            "scratch_img": _var("The SCRATCH ext4 disk, as a .tar.gz image.", required=True),
            "disk_type": _var("The disk type to use for preloading.", value="pd-standard"),
            "disk_size_gb": _var("The disk size to use for preloading.", value=str(IMAGE_SIZE_GB)),
            "host_maintenance": _var("VM behavior when there is maintenance.", value="MIGRATE"),
            "machine_type": _var("Machine type of the preload VM.", required=True),
            "network": _var("Network to use for preload VM."),
            "subnet": _var("Subnetwork used for the preload VM."),
            "service_account": _var("Service account used for the preload VM.", value="default"),
        },
        "Sources": {
            "cloud-config": cloud_config,
            "scratch.tar.gz_": "${scratch_img}",
            "cidata.tar.gz_": "${cidata_img}",
        },
        "Steps": {
            "copy-gcs": {"CopyGCSObjects": [
                {"Source": "${SOURCESPATH}/cidata.tar.gz_", "Destination": "${SOURCESPATH}/cidata.tar.gz"},
                {"Source": "${SOURCESPATH}/scratch.tar.gz_", "Destination": "${SOURCESPATH}/scratch.tar.gz"},
            ]},
            "create-images": {"CreateImages": [
                {"Name": "cidata", "RawDisk": {"Source": "${SOURCESPATH}/cidata.tar.gz"}},
                {"Name": "scratch", "RawDisk": {"Source": "${SOURCESPATH}/scratch.tar.gz"}},
            ]},
            "setup": {"CreateDisks": disks},
            "run": {"CreateInstances": [{
                "Name": "preload-vm",
                "Disks": attached,
                "Labels": {CLEANUP_LABEL: ""},
                "ServiceAccounts": [{"Email": "${service_account}", "Scopes": [SCOPES[1], SCOPES[0]]}],
                "MachineType": "${machine_type}",
                "guestAccelerators": accelerators,
                "scheduling": {"onHostMaintenance": "${host_maintenance}"},
                "networkInterfaces": [{"network": "${network}", "subnetwork": "${subnet}"}],
                "Metadata": {"user-data": "${SOURCE:cloud-config}", "block-project-ssh-keys": "TRUE",
                             "cos-update-strategy": "update_disabled"},
                "Scopes": SCOPES,
            }]},
            "wait-preload-finished": {"WaitForInstancesSignal": [{"Name": "preload-vm", "Interval": "30s",
                "SerialOutput": {"Port": 3, "FailureMatch": "BuildFailed:", "SuccessMatch": "BuildSucceeded:",
                                 "StatusMatch": "BuildStatus:"}}]},
            "send-logging-end-msg": {"UpdateInstancesMetadata": [{"Instance": "preload-vm",
                                                                  "Metadata": {"DaisyEnd": "ack"}}]},
            "wait-vm-shutdown": {"WaitForInstancesSignal": [{"Name": "preload-vm", "Interval": "2s", "Stopped": True}]},
            "wait-for-resize": wait_resize,
            "resize-disk": resize,
            "image": {"CreateImages": [{
                "RealName": "${output_image_name}",
                "Project": "${output_image_project}",
                "NoCleanup": True,
                "SourceDisk": "boot-disk",
                "labels": dict(output.labels),
                "description": "Derivative of ${source_image}.",
                "family": "${output_image_family}",
                "licenses": sanitize_licenses(output.licenses) or None,
            }]},
        },
        "Dependencies": {
            "create-images": ["copy-gcs"],
            "setup": ["create-images"],
            "run": ["setup"],
            "wait-preload-finished": ["run"],
            "wait-for-resize": ["run"],
            "resize-disk": ["wait-for-resize"],
            "send-logging-end-msg": ["wait-preload-finished", "resize-disk"],
            "wait-vm-shutdown": ["send-logging-end-msg"],
            "image": ["wait-vm-shutdown"],
        },
    }  # fmt: skip


def daisy_args(
    build: BuildConfig,
    config: ProvisionerConfig,
    source: SourceImage,
    output: OutputImage,
    *,
    cidata: str,
    scratch: str,
    workflow_path: str,
) -> list[str]:
    """daisy's arguments for this build (the order of the original's)."""
    args: list[str] = []
    if build.GCEEndpoint and DEFAULT_COMPUTE not in build.GCEEndpoint:
        args.append(f"-compute_endpoint_override={compute_endpoint(build.GCEEndpoint).daisy}")
    boot = config.boot_disk
    if not boot.oem_size and build.DiskSize > IMAGE_SIZE_GB and not boot.reclaim_sda3:
        args += ["-var:disk_size_gb", str(build.DiskSize)]
    if output.family:
        args += ["-var:output_image_family", output.family]
    host_maintenance = "TERMINATE" if build.GPUType else "MIGRATE"
    args += [
        "-var:source_image", source.url,
        "-var:output_image_name", output.name,
        "-var:output_image_project", output.project,
        "-var:cidata_img", cidata,
        "-var:scratch_img", scratch,
        "-var:machine_type", build.MachineType,
        "-var:service_account", build.ServiceAccount,
        "-var:disk_type", build.DiskType,
        "-var:host_maintenance", host_maintenance,
        "-var:network", build.Network,
        "-var:subnet", build.Subnet,
        "-gcs_path", managed_dir(build),
        "-project", build.Project,
        "-zone", build.Zone,
        "-default_timeout", build.Timeout,
        "-disable_gcs_logging",
        workflow_path,
    ]  # fmt: skip
    return args


@dataclasses.dataclass(frozen=True)
class ComputeEndpoint:
    """One -compute-endpoint value (the original's: the API base, `http://HOST/compute/v1/`) as each user needs it."""

    client: str  # google-cloud-compute's api_endpoint: it appends /compute/v1/projects/... itself
    daisy: str  # daisy's -compute_endpoint_override: the base joined with "projects", and a trailing slash


API_PATH = "/compute/v1"


def compute_endpoint(value: str) -> ComputeEndpoint:
    """Split the API base into the client's endpoint and daisy's override, or refuse what no client can serve."""
    parsed = urllib.parse.urlparse(value)
    path = parsed.path.rstrip("/")
    if parsed.scheme not in ("http", "https") or not parsed.netloc or not path.endswith(API_PATH):
        raise ValidationError(
            f"-compute-endpoint={value}: give the Compute API's base URL, ending in {API_PATH}/ "
            f"(for example http://127.0.0.1:8080{API_PATH}/), as the original takes it"
        )
    base = parsed._replace(path=path, params="", query="", fragment="")
    client = base._replace(path=path[: -len(API_PATH)]).geturl()
    return ComputeEndpoint(client=client, daisy=base._replace(path=posixpath.join(path, "projects")).geturl() + "/")


# The one directory under -gcs-workdir the build owns (the original's `managedDir`): daisy's -gcs_path,
# the build context archive, the install-gpu deps. Only objects under it are ever deleted.
MANAGED_DIR = "cos-customizer"
CONTEXT_OBJECT = "user_build_context.tar"
DEPS_DIR = "gcs_files"


def managed_prefix(build: BuildConfig) -> str:
    """The managed directory's object prefix, `WORKDIR/cos-customizer`, joined and cleaned as the original joins it."""
    return posixpath.normpath(posixpath.join(build.GCSDir, MANAGED_DIR))


def managed_object(build: BuildConfig, name: str) -> str:
    """The object name of `name` (a relative path) in the managed directory."""
    return f"{managed_prefix(build)}/{name}"


def managed_dir(build: BuildConfig) -> str:
    return f"gs://{build.GCSBucket}/{managed_prefix(build)}"


def guest_provisioner(config: ProvisionerConfig, build: BuildConfig) -> ProvisionerConfig:
    """The provisioner config as the preload VM sees it (GCE and qemu builds): the build context and the
    GPU deps from the managed GCS directory, and a wait for the boot disk to grow when it will."""
    managed = managed_dir(build)
    steps = []
    for step in config.steps:
        if isinstance(step.args, InstallGPUArgs) and step.args.gcs_deps_prefix:
            step = Step(dataclasses.replace(step.args, gcs_deps_prefix=f"{managed}/{DEPS_DIR}"))
        steps.append(step)
    return dataclasses.replace(
        config.with_boot_disk(wait_for_disk_resize=need_disk_resize(config.boot_disk, build.DiskSize)),
        build_contexts=(("user", f"{managed}/{CONTEXT_OBJECT}"),),
        steps=tuple(steps),
    )


# -- -timeout is daisy's -default_timeout: each step's own limit, which daisy enforces (its words: `step
# "NAME" did not complete within the specified timeout of D`) and after which it cleans up. Our bound on a
# whole run only guards against a daisy that never returns, so it must never fire before daisy's: every step
# one after another at its limit, plus time for daisy's cleanup.

TIMEOUT_WORDS = "did not complete within the specified timeout"
RUN_BOUND_GRACE = 10 * MINUTE  # nanoseconds: daisy's cleanup after its own timeout fired


@dataclasses.dataclass(frozen=True)
class RunBound:
    """cos-customizer's own bound on a whole workflow run, longer than any run daisy lets go on."""

    seconds: float
    why: str

    def exceeded(self, who: str) -> str:
        return f"{who} ran past cos-customizer's own bound of {format_duration(int(self.seconds * 1e9))} ({self.why})"


def run_bound(document: dict[str, Any], default_timeout: str) -> RunBound:
    """The bound for `document` run with `-default_timeout=default_timeout` (a Go duration)."""
    steps = document.get("Steps", {}).values()
    total = sum(parse_duration(str(step.get("Timeout") or default_timeout)) for step in steps)
    why = (
        f"the workflow's {len(steps)} steps one after another, each at its limit (-timeout={default_timeout}), "
        f"plus {format_duration(RUN_BOUND_GRACE)}; daisy's own timeout fires first"
    )
    return RunBound((total + RUN_BOUND_GRACE) / 1e9, why)
