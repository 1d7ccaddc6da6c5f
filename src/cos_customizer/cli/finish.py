"""`finish-image-build`: validate everything, then preload with the chosen executor.

Validation happens before anything is touched. `-dry-run` stops after it
and prints the plan: human text on stderr, one JSON document on stdout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cos_customizer import images, plan, provisioner_build, report, workspace
from cos_customizer import output as output_file
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.disk import planner, reproducible
from cos_customizer.disk.gpt import SECTOR
from cos_customizer.disk.planner import DiskPlan
from cos_customizer.errors import ValidationError, escaped, shown
from cos_customizer.executors import STEP_COMMANDS, Executor, check_supported, executor_for, sbom, workflow
from cos_customizer.executors.gce import preload
from cos_customizer.executors.local import build as local
from cos_customizer.executors.qemu import rehearsal
from cos_customizer.images import ImageFormat
from cos_customizer.provisioner.config import InstallGPUArgs, ProvisionerConfig, Step, StepType
from cos_customizer.units import GiB, format_duration, parse_size

log = logging.getLogger(__name__)

FLAG_FORMATTERS = {Kind.DURATION: format_duration}
BUILD_DIR = "<build-dir>"
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
    Flag("machine-type", Kind.STRING, "Machine type to use during the build.", default="n1-standard-1"),
    Flag("service-account", Kind.STRING, "Service account to be used by the preload VM.", default="default"),
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


@dataclasses.dataclass(frozen=True)
class Output:
    path: Path
    format: str

    @classmethod
    def from_flag(cls, value: str) -> Output:
        path = Path(value).absolute()
        if value.endswith(".tar.gz"):
            return cls(path, "tar.gz")
        if value.endswith(".qcow2"):
            return cls(path, "qcow2")
        return cls(path, "raw")


@dataclasses.dataclass(frozen=True)
class FinishPlan:
    executor: Executor
    source: SourceImage
    build: BuildConfig
    provisioner: ProvisionerConfig
    output: Output | None = None
    output_image: dict[str, Any] | None = None
    disk_plan: DiskPlan | None = None
    provisioner_binary: Path | None = None  # GCE: -provisioner-binary; None: build-provisioner's
    prebuilt: Path | None = None  # GCE without -provisioner-binary: the step image's checked prebuilt provisioner
    containers: str | None = None  # local builds: -containers
    sbom: dict[str, Any] | None = None  # local builds: the -sbom-input-path document, written beside the output
    epoch: int | None = None  # local builds: SOURCE_DATE_EPOCH, for a reproducible output (disk.reproducible)

    def workflow_image(self) -> workflow.OutputImage:
        """The output image as the workflow names it (GCE builds and rehearsals)."""
        assert self.output_image is not None
        image = self.output_image
        return workflow.OutputImage(
            image["Name"], image["Project"], image["Family"], tuple(image["Labels"].items()), tuple(image["Licenses"])
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "executor": self.executor.value,
            "source_image": self.source.model_dump(mode="json"),
            "build_config": self.build.model_dump(mode="json"),
            "provisioner_config": self.provisioner.to_json(),
            "disk_plan": self.disk_plan.to_json()
            if self.disk_plan is not None
            else {
                "before": {},
                "after": {},
                "planned_on": "the preload VM: the provisioner plans the partitions against the resized boot disk",
            },
        }
        if self.output is not None:
            doc["output"] = {"path": str(self.output.path), "format": self.output.format}
        if self.containers is not None:
            doc["containers"] = self.containers
        if self.epoch is not None:
            doc["source_date_epoch"] = self.epoch
        if self.output_image is not None:
            doc["output_image"] = self.output_image
            if self.output_image["InheritLabels"]:
                doc["inherited_labels"] = INHERITED_LABELS
            image = self.workflow_image()
            files = {name: f"{BUILD_DIR}/{name}" for name in ("startup.yaml", "cidata.tar.gz", "scratch.tar.gz")}
            doc["workflow"] = workflow.workflow(self.build, self.provisioner, image, files["startup.yaml"])
            doc["daisy_args"] = workflow.daisy_args(
                self.build,
                self.provisioner,
                rehearsal.workflow_source(self.source) if self.source.is_local else self.source,
                image,
                cidata=files["cidata.tar.gz"],
                scratch=files["scratch.tar.gz"],
                workflow_path=f"{BUILD_DIR}/build_image.wf.json",
            )
            doc["build_files"] = f"{BUILD_DIR} is a temporary directory made at build time"
            doc["cidata_provisioner"] = describe_binary(self.provisioner_binary, self.prebuilt)
        return doc


INHERITED_LABELS = "the source image's labels are read when the build starts (-labels wins); the dry run reads none"


def describe_binary(binary: Path | None, prebuilt: Path | None = None) -> str:
    """Which provisioner executable goes on the CIDATA disk."""
    if binary is not None:
        return f"{binary} (-provisioner-binary)"
    if prebuilt is not None:
        return f"{prebuilt} (prebuilt for this cos-customizer, checked against its manifest)"
    return f"build-provisioner's executable for {preload.PROVISIONER_ARCH} (built at build time, or from its cache)"


def _check_gce_flags(args: Parsed) -> None:
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
    _check_provisioner_binary(args)


def _check_provisioner_binary(args: Parsed) -> None:
    """-provisioner-binary's file, checked as the build checks the copy it ships (`provisioner_build.ship`)."""
    if args["provisioner-binary"]:
        provisioner_build.check_binary(Path(args["provisioner-binary"]).absolute())


def choose_executor(source: SourceImage, value: str) -> Executor:
    """The executor: the source's (local or gce), or -executor=qemu for a local source."""
    executor = executor_for(source)
    if not value or value == executor.value:
        return executor
    if value not in {e.value for e in Executor}:
        raise ValidationError(f"-executor={value}: use local or qemu (gce is chosen by starting from a GCE image)")
    if executor is Executor.LOCAL and value == Executor.QEMU.value:
        return Executor.QEMU
    if executor is Executor.GCE:
        raise ValidationError(
            f"-executor={value}: this build starts from a Compute Engine image, so it runs on GCE; "
            "-executor is for builds started with -image-file"
        )
    raise ValidationError(f"-executor={value}: a build started with -image-file runs with local or qemu")


def _check_local_flags(args: Parsed, source: SourceImage, workspace_root: Path, executor: Executor) -> Output:
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
    output = Output.from_flag(args["output"])
    if output.path.resolve() == Path(source.ImageFile).resolve():
        raise ValidationError(
            f"-output={shown(args['output'])} is the source image; the source is never written, choose another name"
        )
    if workspace.contains(workspace_root, output.path):
        raise ValidationError(
            f"-output={shown(args['output'])} is inside the workspace {shown(workspace_root)}, which "
            "finish-image-build removes when it ends: write the image outside the workspace"
        )
    _check_output_absent(output, args["output"])
    if not output.path.parent.is_dir():
        raise ValidationError(
            f"-output={shown(args['output'])}: the directory {shown(output.path.parent)} does not exist"
        )
    return output


def _check_output_absent(output: Output, flag_value: str) -> None:
    if output.path.exists() or output.path.is_symlink():
        raise ValidationError(f"-output={shown(flag_value)} already exists: remove it or choose another name")


def make_plan(context: Context, args: Parsed) -> FinishPlan:
    """Everything finish-image-build will do, validated; nothing is touched."""
    ws = context.workspace
    source, build, config = ws.source_image(), ws.build(), ws.provisioner()
    executor = choose_executor(source, args["executor"])
    output = _check_local_flags(args, source, context.workspace_root, executor) if source.is_local else None
    if executor is Executor.QEMU:
        _check_provisioner_binary(args)
    if executor is Executor.GCE:
        _check_gce_flags(args)
        if args["allow-backing-file"]:
            raise ValidationError("-allow-backing-file is for local builds (started with a .qcow2 -image-file)")
        for name in sorted(SANDBOX_FLAGS & args.given):
            raise ValidationError(f"-{name} is for local builds (started with -image-file)")
        if context.compute_endpoint:
            workflow.compute_endpoint(context.compute_endpoint)  # one value for the client and daisy, or refused
    if args["timeout"] <= 0:
        raise ValidationError(f"-timeout={format_duration(args['timeout'])}: give a positive duration such as 1h0m0s")
    boot_disk = plan.resolve_boot_disk(config, args["oem-size"], args["disk-size-gb"])
    config = dataclasses.replace(config, boot_disk=boot_disk)
    check_supported(executor, config)
    build = build.model_copy(update={"DiskSize": args["disk-size-gb"], "Timeout": format_duration(args["timeout"])})
    if executor is Executor.LOCAL:
        assert output is not None
        config = dataclasses.replace(config, build_contexts=(("user", str(ws.build_context_archive)),))
        images.check_room(Path(source.ImageFile), output.path.parent)  # a gzip bomb, before any extraction
        disk_plan = local_disk_plan(source, config, args["disk-size-gb"], allow_backing_file=args["allow-backing-file"])
        data = sbom.load_input(ws.build_context_archive, args["sbom-input-path"]) if args["sbom-input-path"] else None
        epoch = reproducible.epoch_from(context.environ)
        return FinishPlan(executor, source, build, config, output=output, disk_plan=disk_plan,
                          containers=args["containers"], sbom=data, epoch=epoch)  # fmt: skip
    binary = Path(args["provisioner-binary"]).absolute() if args["provisioner-binary"] else None
    if executor is Executor.QEMU:
        # The rehearsal ships what a GCE build ships: its dry run checks the prebuilt provisioner as the run does.
        prebuilt = provisioner_build.prebuilt(context.environ) if binary is None else None
        return _qemu_plan(source, build, config, args, output, binary, prebuilt)
    build = build.model_copy(
        update={
            "Project": args["project"],
            "Zone": args["zone"],
            "MachineType": args["machine-type"],
            "ServiceAccount": args["service-account"],
            "DiskType": args["disk-type"],
            "Network": args["network"],
            "Subnet": args["subnet"],
            "GPUType": args["gpu-type"] or build.GPUType,
            "GCEEndpoint": context.compute_endpoint,
        }
    )
    base_name = source.Name or f"<image of family {source.Family or source.Milestone}>"
    output_image = {
        "Name": args["image-name"] or base_name + args["image-suffix"],
        "Project": args["image-project"],
        "Family": args["image-family"],
        "Labels": dict(sorted(args["labels"].items())),
        "Licenses": [item for item in args["licenses"] if item],
        "InheritLabels": args["inherit-labels"],
    }
    if binary is None and source.Name:
        preload.check_architecture(source.Name, preload.architecture_from_name(source.Name))
    prebuilt = provisioner_build.prebuilt(context.environ) if binary is None else None  # a stale one: refused
    return FinishPlan(
        executor,
        source,
        build,
        workflow.guest_provisioner(config, build),
        output_image=output_image,
        provisioner_binary=binary,
        prebuilt=prebuilt,
    )


def _qemu_plan(
    source: SourceImage,
    build: BuildConfig,
    config: ProvisionerConfig,
    args: Parsed,
    output: Output | None,
    binary: Path | None,
    prebuilt: Path | None,
) -> FinishPlan:
    """A rehearsal: the GCE build's workflow and provisioner config, with local defaults for what GCE needs."""
    assert output is not None
    images.check_room(Path(source.ImageFile), output.path.parent)
    disk_plan = local_disk_plan(source, config, args["disk-size-gb"], allow_backing_file=args["allow-backing-file"])
    build = build.model_copy(
        update={
            "Project": args["project"] or rehearsal.LOCAL_PROJECT,
            "Zone": args["zone"] or rehearsal.LOCAL_ZONE,
            "MachineType": args["machine-type"],
            "ServiceAccount": args["service-account"],
            "DiskType": args["disk-type"],
            "Network": args["network"],
            "Subnet": args["subnet"],
            "GCSBucket": build.GCSBucket or rehearsal.LOCAL_BUCKET,
        }
    )
    output_image = {
        "Name": args["image-name"] or rehearsal.workflow_source(source).Name + args["image-suffix"],
        "Project": args["image-project"] or build.Project,
        "Family": args["image-family"],
        "Labels": dict(sorted(args["labels"].items())),
        "Licenses": [item for item in args["licenses"] if item],
        "InheritLabels": False,
    }
    return FinishPlan(
        Executor.QEMU, source, build, workflow.guest_provisioner(config, build), output=output,
        output_image=output_image, disk_plan=disk_plan, provisioner_binary=binary, prebuilt=prebuilt,
    )  # fmt: skip


def local_disk_plan(
    source: SourceImage, config: ProvisionerConfig, disk_size_gb: int = 0, *, allow_backing_file: bool = False
) -> DiskPlan:
    """The partition plan for a local build, from the source image's own table."""
    table = images.read_source_table(Path(source.ImageFile), allow_backing_file=allow_backing_file)
    boot = config.boot_disk
    return planner.plan(
        table,
        disk_sectors=disk_size_gb * GiB // SECTOR if disk_size_gb else table.disk_sectors,
        reclaim_sda3=boot.reclaim_sda3,
        oem_size=parse_size(boot.oem_size) if boot.oem_size else 0,
        oem_fs_size_4k=boot.oem_fs_size_4k,
    )


def describe_disk_plan(disk_plan: DiskPlan) -> list[str]:
    before = {p.number: p for p in disk_plan.before.partitions}
    lines = [f"  partitions (sectors; disk {disk_plan.before.disk_sectors} -> {disk_plan.after.disk_sectors}):"]
    for part in disk_plan.after.partitions:
        old = before[part.number]
        change = "" if (old.first, old.size) == (part.first, part.size) else f" -> {part.first:>10} +{part.size}"
        lines.append(f"    {part.number:>2} {part.name:<11} {old.first:>10} +{old.size}{change}")
    lines.extend(f"  moves: {m.kind.value} {m.name} {m.src} -> {m.dst} ({m.sectors} sectors)" for m in disk_plan.moves)
    lines.extend(f"  warning: {w}" for w in disk_plan.warnings)
    return lines


def _describe_step(step: Step) -> str:
    name = STEP_COMMANDS[step.type]
    if step.type is StepType.RUN_SCRIPT:
        env = getattr(step.args, "env", ())
        shown_env = ", ".join(shown(item) for item in env)
        return f"{name} {shown(getattr(step.args, 'path', ''))}" + (f" (env: {shown_env})" if env else "")
    if isinstance(step.args, InstallGPUArgs):
        return f"{name} {step.args.nvidia_driver_version}"
    if step.type is StepType.INSTALL_PACKAGES:
        return f"{name} {getattr(step.args, 'pkg_spec_url', '')}"
    return name


def describe(finish: FinishPlan) -> str:
    build = finish.build
    sealed = finish.provisioner.has_step(StepType.SEAL_OEM)
    lines = ["Plan (dry run: nothing was changed)", f"  executor:  {finish.executor.value}"]
    lines.append(f"  source:    {finish.source.describe()}")
    if finish.output is not None:
        lines.append(f"  output:    {finish.output.path} ({finish.output.format})")
    if finish.output_image is not None:
        image = finish.output_image
        lines.append(
            f"  output:    image {image['Project']}/{image['Name']}"
            + (f" in family {image['Family']}" if image["Family"] else "")
        )
        if image["InheritLabels"]:
            lines.append(f"  labels:    {INHERITED_LABELS}")
        lines.append(f"  build in:  project {build.Project}, zone {build.Zone}, {build.MachineType}")
        lines.append(f"  CIDATA:    {describe_binary(finish.provisioner_binary, finish.prebuilt)}")
    size = f"{build.DiskSize} GB" if build.DiskSize else f"{plan.IMAGE_SIZE_GB} GB (the image's size)"
    lines.append(f"  disk:      {size}; {plan.describe_boot_disk(finish.provisioner.boot_disk, sealed)}")
    lines.append(f"  timeout:   {build.Timeout}")
    if finish.containers is not None:
        lines.append(f"  containers: {CONTAINERS_TEXT[finish.containers]}")
    if finish.epoch is not None:
        lines.append(f"  reproducible: {reproducible.EPOCH_ENV}={finish.epoch} (every time the build records)")
    lines.append("  steps:" if finish.provisioner.steps else "  steps:     none (the output equals the source)")
    ordered = [s for s in finish.provisioner.steps if s.type is not StepType.SEAL_OEM]
    ordered += [s for s in finish.provisioner.steps if s.type is StepType.SEAL_OEM]
    lines.extend(f"    {number}. {_describe_step(step)}" for number, step in enumerate(ordered, 1))
    if finish.disk_plan is not None:
        lines.extend(describe_disk_plan(finish.disk_plan))
    else:
        lines.append("  partitions: planned on the preload VM")
    return "".join(escaped(line) + "\n" for line in lines)  # a value's newline or ESC never makes a line of its own


def handle(context: Context, args: Parsed) -> int:
    if args["dry-run"]:  # reads only: takes no lock, writes no lock file
        finish = make_plan(context, args)
        sys.stderr.write(describe(finish))
        sys.stdout.write(json.dumps(finish.to_json(), indent=2) + "\n")
        return 0
    with context.workspace.lock():  # held to the end: a second finish on this workspace fails at once
        finish = make_plan(context, args)
        if finish.executor is Executor.GCE:
            return _run_gce(context, finish, args)
        assert finish.output is not None
        output = finish.output

        def busy(holder: str) -> str:
            return (
                f"-output={shown(args['output'])} is in use by another cos-customizer ({holder}) writing the same "
                "output: wait for it to finish, or choose another -output"
            )

        with (
            output_file.held(output.path, busy),  # no lock file: a name in the kernel, gone with this process
            images.backing_files_allowed(args["allow-backing-file"]),
        ):
            _check_output_absent(output, args["output"])  # again, now that no other build can be writing it
            if finish.executor is Executor.QEMU:
                return _run_qemu(context, finish, args)
            return _run_local(context, finish, args)


def _run_gce(context: Context, finish: FinishPlan, args: Parsed) -> int:
    assert finish.output_image is not None
    image = finish.output_image
    job = preload.GceBuild(
        source=finish.source,
        build=finish.build,
        provisioner=finish.provisioner,
        image=finish.workflow_image(),
        inherit_labels=args["inherit-labels"],
        deprecate_old=args["deprecate-old-images"],
        old_image_ttl=args["old-image-ttl"],
        enable_cleanup=args["enable-cleanup"],
        build_context=context.workspace.build_context_archive,
        provisioner_binary=finish.provisioner_binary,
    )
    if args["sbom-input-path"]:
        data = sbom.load_input(context.workspace.build_context_archive, args["sbom-input-path"])
        job = dataclasses.replace(job, sbom=(data, args["sbom-output-path"]))
    preload.daisy_binary(dict(context.environ))  # refuse early, before anything is touched
    try:
        made = preload.finish(job, dict(context.environ), context.compute_endpoint)
    finally:
        context.workspace.remove()  # as the original: the build is over, success or failure
    if made:
        sys.stdout.write(f"Build succeeded: image {image['Project']}/{image['Name']}\n")
    return 0


def _run_local(context: Context, finish: FinishPlan, args: Parsed) -> int:
    assert finish.output is not None and finish.disk_plan is not None
    build = local.LocalBuild(
        source=Path(finish.source.ImageFile),
        output=finish.output.path,
        format=ImageFormat(finish.output.format),
        config=finish.provisioner,
        plan=finish.disk_plan,
        timeout=args["timeout"] / 1e9,
        allow_host_loopback=args["allow-host-loopback"],
        containers=args["containers"],
        epoch=finish.epoch,
    )
    local.preflight(build)
    for warning in finish.disk_plan.warnings:
        log.warning("warning: %s", warning)
    try:
        summary = local.run_build(build, dict(finish.provisioner.build_contexts))
    finally:
        context.workspace.remove()  # as the original: the build is over, success or failure
    sys.stdout.write(report.summary(build, summary))
    if finish.sbom is not None:
        written = local_sbom(finish.sbom, finish.output.path, finish.epoch)
        sys.stdout.write(f"SBOM: {written}\n")
    return 0


def local_sbom(data: dict[str, Any], output: Path, epoch: int | None = None) -> Path:
    """The SPDX document of a local build, beside its output (the output file's name without its format
    suffix names the image when the input does not), written atomically; created at `epoch` when set."""
    image_name = output.name
    for suffix in (".tar.gz", ".qcow2", ".raw"):
        image_name = image_name.removesuffix(suffix)
    now = datetime.datetime.now(datetime.UTC) if epoch is None else datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    name, document = sbom.generate(data, image_name, now)
    path = output.parent / name
    workspace.write_json_atomic(path, document)
    return path


@dataclasses.dataclass(frozen=True)
class _Rehearsed:
    """A rehearsal's output as the summary describes it."""

    output: Path
    format: ImageFormat
    plan: DiskPlan


def _run_qemu(context: Context, finish: FinishPlan, args: Parsed) -> int:
    assert finish.output is not None and finish.disk_plan is not None
    job = rehearsal.Rehearsal(
        source=finish.source,
        build=finish.build,
        provisioner=finish.provisioner,
        image=finish.workflow_image(),
        output=finish.output.path,
        format=ImageFormat(finish.output.format),
        build_context=context.workspace.build_context_archive,
        provisioner_binary=finish.provisioner_binary,
        timeout=args["timeout"] / 1e9,
        accel=context.environ.get(rehearsal.ACCEL_ENV, ""),
    )
    for warning in finish.disk_plan.warnings:
        log.warning("warning: %s", warning)
    try:
        result = rehearsal.run(job, dict(context.environ), lambda line: log.info("%s", line))
    finally:
        context.workspace.remove()  # as the original: the build is over, success or failure
    after = result.table or finish.disk_plan.after
    built = _Rehearsed(finish.output.path, job.format, dataclasses.replace(finish.disk_plan, after=after))
    notes = [
        f"Guest: {result.boots} boot(s), {result.guest_seconds:.1f}s of guest time ({result.accel.upper()})",
        *(f"Reboot {n}: {why}" for n, why in enumerate(result.reboot_reasons, 1)),
    ]
    summary = report.Summary(phases=[("guest (QEMU)", result.guest_seconds)], steps=result.steps, notes=notes)
    sys.stdout.write(report.summary(built, summary))
    return 0


COMMAND = Command(
    name="finish-image-build",
    synopsis="Complete the COS image build and generate a GCE image.",
    description=(
        "Complete the COS image build: run the configured steps on a copy of the source and produce the "
        "result (a GCE image, or with a local build the -output file). The workspace is removed at the end."
    ),
    flags=FLAGS,
    handler=handle,
)
