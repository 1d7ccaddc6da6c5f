"""`finish-image-build`'s flags: the table, which executor takes which, and the checks of flags alone.

The checks here read only the parsed flags (and the executor they go to); what needs the workspace
or the source image is checked where the plan is made (`cli.finish_plan`).
"""

from __future__ import annotations

from pathlib import Path

from cos_customizer import plan, provisioner_build
from cos_customizer.arch import Arch
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.errors import ValidationError
from cos_customizer.executors import Executor, sbom
from cos_customizer.executors.gce.preload import DEFAULT_MACHINE_TYPES
from cos_customizer.units import format_duration

FLAG_FORMATTERS = {Kind.DURATION: format_duration}
DEFAULT_TIMEOUT = 3600 * 10**9
# -containers: the image's own containerd and dockerd for a local build's scripts (executors.local.containers).
CONTAINERS_TEXT = {
    "auto": "auto (the image's containerd and dockerd, if it has them, start when a script first uses them)",
    "on": "on (the image's containerd and dockerd start when a script first uses them; the build fails without them)",
    "off": "off (no container daemons for scripts)",
}


def _check_containers(value: str) -> None:
    if value not in CONTAINERS_TEXT:
        raise ValueError(f"use one of {', '.join(CONTAINERS_TEXT)}")


FLAGS = (
    Flag("image-project", Kind.STRING, "Output image project."),
    Flag("image-name", Kind.STRING, "Output image name. Mutually exclusive with 'image-suffix'."),
    Flag(
        "image-suffix",
        Kind.STRING,
        "Construct the output image name from the input image name and this suffix. "
        "Mutually exclusive with 'image-name'.",
    ),
    Flag("image-family", Kind.STRING, "Output image family."),
    Flag(
        "deprecate-old-images",
        Kind.BOOL,
        "Deprecate old images in the output image family. Can only be used if 'image-family' is set.",
    ),
    Flag(
        "old-image-ttl",
        Kind.INT,
        "Time-to-live in seconds for old images that are deprecated. After this period of time, old images "
        "will enter the deleted state. Can only be used if 'deprecate-old-images' is set. '0' indicates no "
        "time-to-live.",
    ),
    Flag("zone", Kind.STRING, "Zone to make GCE resources in."),
    Flag("project", Kind.STRING, "Project to make GCE resources in."),
    Flag(
        "machine-type",
        Kind.STRING,
        f"Machine type to use during the build (for an arm64 source: {DEFAULT_MACHINE_TYPES[Arch.ARM64]}).",
        default=DEFAULT_MACHINE_TYPES[Arch.AMD64],
    ),
    Flag(
        "service-account",
        Kind.STRING,
        "Service account to be used by the preload VM.",
        default="default",
        empty="the preload VM would be asked for with a service account of no name",
    ),
    Flag("gpu-type", Kind.STRING, "GPU type attached to the preload VM, e.g. 'nvidia-tesla-t4'."),
    Flag(
        "network",
        Kind.STRING,
        "Network to use during the build. The network must have access to Google Cloud Storage. If not "
        "specified, the network named default is used.",
    ),
    Flag(
        "subnet",
        Kind.STRING,
        "SubNetwork to use during the build. Must belong to -network; required for custom-mode networks.",
    ),
    Flag(
        "labels",
        Kind.MAP,
        "Image labels to apply to the result image. Format is 'key1=value1,key2=value2,...'. "
        "Example: -labels=hello=world,foo=bar",
    ),
    Flag(
        "licenses",
        Kind.LIST,
        "Image licenses to apply to the result image. Format is 'license1,license2,...' or "
        "'-licenses=license1 -licenses=license2'.",
    ),
    Flag(
        "inherit-labels",
        Kind.BOOL,
        "Indicates if the result image should inherit labels from the source image. Labels specified "
        "through the '-labels' flag take precedence over inherited labels.",
    ),
    Flag(
        "oem-size",
        Kind.STRING,
        "Size of the new OEM partition, can be a number with unit like 10G, 10M, 10K or 10B, or without "
        "unit indicating the number of 512B sectors. At least 16M.",
        check=plan.check_oem_size,
    ),
    Flag("disk-type", Kind.STRING, "The disk type to use when creating the image.", default="pd-standard"),
    Flag(
        "disk-size-gb",
        Kind.INT,
        "The disk size to use when creating the image in GB. Value of '0' indicates the default size.",
    ),
    Flag(
        "timeout",
        Kind.DURATION,
        "Timeout value of the image build process. Must be formatted according to Golang's time.Duration "
        "string format.",
        default=DEFAULT_TIMEOUT,
    ),
    Flag("enable-cleanup", Kind.BOOL, "Enable cleanup of old VM instances created by COS-Customizer."),
    Flag("sbom-input-path", Kind.STRING, "The path to the SBOM input file."),
    Flag("sbom-output-path", Kind.STRING, "The GCS path to store the output SBOM file."),
    Flag(
        "output",
        Kind.STRING,
        "Local builds: where to write the customized image. The format follows the name: .tar.gz (GCE "
        "import format, a tar holding a sparse disk.raw), .qcow2, anything else raw.",
        ours=True,
    ),
    Flag(
        "provisioner-binary",
        Kind.STRING,
        "GCE and qemu builds: the provisioner executable for the CIDATA disk (default: build-provisioner's, "
        "built or taken from its cache).",
        ours=True,
    ),
    Flag(
        "executor",
        Kind.STRING,
        "Builds started with -image-file: 'local' (the default: offline, on the image file) or 'qemu' (rehearse "
        "the GCE build: its Daisy workflow and provisioner, run in a local QEMU VM that boots the image).",
        ours=True,
    ),
    Flag(
        "dry-run",
        Kind.BOOL,
        "Validate everything and print the plan (text on stderr, JSON on stdout); change nothing.",
        ours=True,
    ),
    Flag(
        "allow-backing-file",
        Kind.BOOL,
        "Local builds: accept a .qcow2 source that names a backing file or an external data file (their "
        "bytes, files of this machine, are read into the image). Refused without it.",
        ours=True,
    ),
    Flag(
        "allow-host-loopback",
        Kind.BOOL,
        "Local builds: let scripts and the image's container daemons reach the services listening on this "
        "machine's loopback when the build starts, at the same addresses (127.0.0.1:PORT, [::1]:PORT; also "
        "10.0.2.2:PORT), e.g. a local registry for docker pull. Refused without it.",
        ours=True,
    ),
    Flag(
        "containers",
        Kind.STRING,
        "Local builds: the image's own containerd and dockerd for scripts (docker pull, load, run, build; ctr), "
        "started when a script first uses them. 'auto' (when the image has them), 'on' (fail if it has not) "
        "or 'off'.",
        default="auto",
        check=_check_containers,
        ours=True,
    ),
)

LOCAL_FLAGS = {"oem-size", "disk-size-gb", "timeout", "output", "dry-run", "allow-backing-file", "executor",
               "sbom-input-path"}  # fmt: skip
SANDBOX_FLAGS = frozenset({"allow-host-loopback", "containers"})  # the local executor's script sandbox only
GCE_ONLY = tuple(flag.name for flag in FLAGS if flag.name not in LOCAL_FLAGS | SANDBOX_FLAGS)
# The GCE flags a rehearsal takes: they only shape the workflow it renders (or, -provisioner-binary, CIDATA).
QEMU_TAKES = frozenset({
    "image-project", "image-name", "image-suffix", "image-family", "labels", "licenses", "zone", "project",
    "machine-type", "service-account", "disk-type", "network", "subnet", "provisioner-binary",
})  # fmt: skip


def check_gce_flags(args: Parsed) -> None:
    """A GCE build's flags: the output image, the GCE options, and no flag of a local build.

    -provisioner-binary is checked once the source's architecture is known (`check_provisioner_binary`).
    """
    if "output" in args.given:
        raise ValidationError("-output is for local builds (started with -image-file); a GCE build makes a GCE image")
    if not args["image-name"] and not args["image-suffix"]:
        raise ValidationError("one of -image-name or -image-suffix must be set")
    if args["image-name"] and args["image-suffix"]:
        raise ValidationError("-image-name and -image-suffix are mutually exclusive")
    if args["deprecate-old-images"] and not args["image-family"]:
        raise ValidationError("-deprecate-old-images can only be used if -image-family is set")
    if args["old-image-ttl"] and not args["deprecate-old-images"]:
        raise ValidationError("-old-image-ttl can only be used if -deprecate-old-images is set")
    if args["old-image-ttl"] < 0:
        raise ValidationError("-old-image-ttl must be a number of seconds >= 0")
    for name in ("zone", "project"):
        if not args[name]:
            raise ValidationError(f"-{name} must be set for a GCE build")
    if bool(args["sbom-input-path"]) != bool(args["sbom-output-path"]):
        raise ValidationError("-sbom-input-path and -sbom-output-path must be set together")
    if args["sbom-output-path"]:
        sbom.check_output_path(args["sbom-output-path"])
    if args["allow-backing-file"]:
        raise ValidationError("-allow-backing-file is for local builds (started with a .qcow2 -image-file)")
    for name in sorted(SANDBOX_FLAGS & args.given):
        raise ValidationError(f"-{name} is for local builds (started with -image-file)")


def check_provisioner_binary(args: Parsed, arch: Arch = Arch.AMD64) -> None:
    """-provisioner-binary's file, checked as the build checks the copy it ships (`provisioner_build.ship`):
    an executable for `arch`, the source's architecture."""
    if args["provisioner-binary"]:
        provisioner_build.check_binary(Path(args["provisioner-binary"]).absolute(), arch=arch)


def check_local_flags(args: Parsed, executor: Executor) -> None:
    """A build started with -image-file (the local or qemu executor): no flag of another executor, and -output."""
    takes = QEMU_TAKES if executor is Executor.QEMU else frozenset()
    for name in GCE_ONLY:
        if name in args.given and name not in takes:
            raise ValidationError(
                f"-{name} applies to GCE builds only; this build was started with -image-file, "
                f"so it runs with the {executor.value} executor"
            )
    if executor is Executor.QEMU and args["sbom-input-path"]:
        raise ValidationError("-sbom-input-path: a rehearsal writes no SBOM; the local executor and GCE builds do")
    for name in sorted(SANDBOX_FLAGS & args.given) if executor is Executor.QEMU else ():
        raise ValidationError(
            f"-{name} is for the local executor's script sandbox; the qemu executor's VM has its own network "
            "and its own container daemons"
        )
    if not args["output"]:
        raise ValidationError("-output=PATH must be set for a local build: where to write the customized image")


def check_timeout(args: Parsed) -> None:
    if args["timeout"] <= 0:
        raise ValidationError(f"-timeout={format_duration(args['timeout'])}: give a positive duration such as 1h0m0s")
