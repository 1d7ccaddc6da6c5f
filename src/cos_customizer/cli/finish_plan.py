"""`finish-image-build`'s plan: everything the build will do, validated before anything is touched, and its text.

`make_plan` checks the flags (`cli.finish_flags`), the workspace and the source, and returns a `FinishPlan`:
all an executor's job is made from. `-dry-run` prints it (`describe` on stderr, `FinishPlan.to_json` on stdout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cos_customizer import images, plan, provisioner_build, workspace
from cos_customizer.arch import Arch
from cos_customizer.cli import finish_flags
from cos_customizer.cli.command import Context
from cos_customizer.cli.flags import Parsed
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.disk import planner, reproducible
from cos_customizer.disk.gpt import SECTOR
from cos_customizer.disk.planner import DiskPlan
from cos_customizer.errors import ValidationError, escaped, shown
from cos_customizer.executors import STEP_COMMANDS, Executor, check_supported, executor_for, sbom, workflow
from cos_customizer.executors.gce import preload
from cos_customizer.executors.qemu import rehearsal
from cos_customizer.provisioner.config import InstallGPUArgs, ProvisionerConfig, Step, StepType
from cos_customizer.units import GiB, format_duration, parse_size

BUILD_DIR = "<build-dir>"


@dataclasses.dataclass(frozen=True)
class Output:
    path: Path
    format: str
    flag: str = ""  # the -output value as given, for messages

    @classmethod
    def from_flag(cls, value: str) -> Output:
        path = Path(value).absolute()
        if value.endswith(".tar.gz"):
            return cls(path, "tar.gz", value)
        if value.endswith(".qcow2"):
            return cls(path, "qcow2", value)
        return cls(path, "raw", value)


@dataclasses.dataclass(frozen=True)
class FinishPlan:
    executor: Executor
    source: SourceImage
    build: BuildConfig
    provisioner: ProvisionerConfig
    timeout: float  # seconds: -timeout
    output: Output | None = None
    output_image: dict[str, Any] | None = None
    disk_plan: DiskPlan | None = None
    provisioner_binary: Path | None = None  # GCE: -provisioner-binary; None: build-provisioner's
    prebuilt: Path | None = None  # GCE without -provisioner-binary: the step image's checked prebuilt provisioner
    containers: str | None = None  # local builds: -containers
    sbom: dict[str, Any] | None = None  # local builds: the -sbom-input-path document, written beside the output
    epoch: int | None = None  # local builds: SOURCE_DATE_EPOCH, for a reproducible output (disk.reproducible)
    allow_backing_file: bool = False  # local and qemu builds: -allow-backing-file
    allow_host_loopback: bool = False  # local builds: -allow-host-loopback
    deprecate_old: bool = False  # GCE: -deprecate-old-images
    old_image_ttl: int = 0  # GCE: -old-image-ttl (seconds)
    enable_cleanup: bool = False  # GCE: -enable-cleanup
    # GCE: (-sbom-input-path, -sbom-output-path); the input is read from the build context when the build starts.
    sbom_paths: tuple[str, str] | None = None
    # GCE and qemu: the source's architecture (`preload.source_arch`, `rehearsal.source_arch`): the provisioner's
    arch: Arch = Arch.AMD64
    arch_reason: str = ""  # GCE and qemu: what said so

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
            doc["cidata_provisioner"] = describe_binary(self.provisioner_binary, self.prebuilt, self.arch)
        if self.arch_reason:
            doc["architecture"] = {"arch": self.arch.debian, "gce": self.arch.gce, "from": self.arch_reason}
        return doc


INHERITED_LABELS = "the source image's labels are read when the build starts (-labels wins); the dry run reads none"


def describe_binary(binary: Path | None, prebuilt: Path | None = None, arch: Arch = Arch.AMD64) -> str:
    """Which provisioner executable goes on the CIDATA disk (as /provisioner), for the source's `arch`."""
    if binary is not None:
        return f"{binary} (-provisioner-binary)"
    if prebuilt is not None:
        return f"{prebuilt} (prebuilt for this cos-customizer, checked against its manifest)"
    name = provisioner_build.ARCH_NAMES[arch]
    return f"build-provisioner's executable for {name} (built at build time, or from its cache)"


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


def check_output(args: Parsed, source: SourceImage, workspace_root: Path) -> Output:
    """-output of a build started with -image-file (its flags checked by `finish_flags.check_local_flags`)."""
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
    check_output_absent(output)
    if not output.path.parent.is_dir():
        raise ValidationError(
            f"-output={shown(args['output'])}: the directory {shown(output.path.parent)} does not exist"
        )
    return output


def check_output_absent(output: Output) -> None:
    if output.path.exists() or output.path.is_symlink():
        raise ValidationError(f"-output={shown(output.flag)} already exists: remove it or choose another name")


def make_plan(context: Context, args: Parsed) -> FinishPlan:
    """Everything finish-image-build will do, validated; nothing is touched."""
    ws = context.workspace
    source, build, config = ws.source_image(), ws.build(), ws.provisioner()
    executor = choose_executor(source, args["executor"])
    output = None
    if source.is_local:
        finish_flags.check_local_flags(args, executor)
        output = check_output(args, source, context.workspace_root)
    qemu_arch = Arch.AMD64
    if executor is Executor.QEMU:  # the machine of the kernel the source boots picks the provisioner
        qemu_arch = rehearsal.source_arch(Path(source.ImageFile))
        finish_flags.check_provisioner_binary(args, qemu_arch)
    if executor is Executor.GCE:
        finish_flags.check_gce_flags(args)
        if context.compute_endpoint:
            workflow.compute_endpoint(context.compute_endpoint)  # one value for the client and daisy, or refused
    finish_flags.check_timeout(args)
    boot_disk = plan.resolve_boot_disk(config, args["oem-size"], args["disk-size-gb"])
    config = dataclasses.replace(config, boot_disk=boot_disk)
    check_supported(executor, config)
    build = build.model_copy(update={"DiskSize": args["disk-size-gb"], "Timeout": format_duration(args["timeout"])})
    timeout = args["timeout"] / 1e9
    if executor is Executor.LOCAL:
        assert output is not None
        config = dataclasses.replace(config, build_contexts=(("user", str(ws.build_context_archive)),))
        images.check_room(Path(source.ImageFile), output.path.parent)  # a gzip bomb, before any extraction
        disk_plan = local_disk_plan(source, config, args["disk-size-gb"], allow_backing_file=args["allow-backing-file"])
        data = sbom.load_input(ws.build_context_archive, args["sbom-input-path"]) if args["sbom-input-path"] else None
        epoch = reproducible.epoch_from(context.environ)
        return FinishPlan(executor, source, build, config, timeout, output=output, disk_plan=disk_plan,
                          containers=args["containers"], sbom=data, epoch=epoch,
                          allow_backing_file=args["allow-backing-file"],
                          allow_host_loopback=args["allow-host-loopback"])  # fmt: skip
    binary = Path(args["provisioner-binary"]).absolute() if args["provisioner-binary"] else None
    if executor is Executor.QEMU:
        # The rehearsal ships what a GCE build ships: its dry run checks the prebuilt provisioner as the run does.
        prebuilt = provisioner_build.prebuilt(context.environ, arch=qemu_arch) if binary is None else None
        return _qemu_plan(source, build, config, args, output, binary, prebuilt, qemu_arch)
    # The source's architecture picks the provisioner (-provisioner-binary must be one for it) and, when
    # -machine-type is not given, the machine type. A dry run asks Compute too, and goes by the name if it cannot.
    source_arch = preload.source_arch(source, context.compute_endpoint, dry_run=args["dry-run"])
    finish_flags.check_provisioner_binary(args, source_arch.arch)
    given_type = args["machine-type"] if "machine-type" in args.given else None
    build = build.model_copy(
        update={
            "Project": args["project"],
            "Zone": args["zone"],
            "MachineType": preload.machine_type(given_type, source_arch.arch),
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
    # A stale or foreign prebuilt one: refused.
    prebuilt = provisioner_build.prebuilt(context.environ, arch=source_arch.arch) if binary is None else None
    sbom_paths = (args["sbom-input-path"], args["sbom-output-path"]) if args["sbom-input-path"] else None
    return FinishPlan(
        executor,
        source,
        build,
        workflow.guest_provisioner(config, build),
        timeout,
        output_image=output_image,
        provisioner_binary=binary,
        prebuilt=prebuilt,
        deprecate_old=args["deprecate-old-images"],
        old_image_ttl=args["old-image-ttl"],
        enable_cleanup=args["enable-cleanup"],
        sbom_paths=sbom_paths,
        arch=source_arch.arch,
        arch_reason=source_arch.reason,
    )


QEMU_ARCH_REASON = "the kernel the source's grub.cfg boots"


def _qemu_plan(
    source: SourceImage,
    build: BuildConfig,
    config: ProvisionerConfig,
    args: Parsed,
    output: Output | None,
    binary: Path | None,
    prebuilt: Path | None,
    arch: Arch,
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
        Executor.QEMU, source, build, workflow.guest_provisioner(config, build), args["timeout"] / 1e9,
        output=output, output_image=output_image, disk_plan=disk_plan, provisioner_binary=binary, prebuilt=prebuilt,
        allow_backing_file=args["allow-backing-file"], arch=arch, arch_reason=QEMU_ARCH_REASON,
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
        if finish.arch_reason:
            lines.append(f"  arch:      {finish.arch.debian} ({finish.arch.uname}; {finish.arch_reason})")
        lines.append(f"  build in:  project {build.Project}, zone {build.Zone}, {build.MachineType}")
        lines.append(f"  CIDATA:    {describe_binary(finish.provisioner_binary, finish.prebuilt, finish.arch)}")
    size = f"{build.DiskSize} GB" if build.DiskSize else f"{plan.IMAGE_SIZE_GB} GB (the image's size)"
    lines.append(f"  disk:      {size}; {plan.describe_boot_disk(finish.provisioner.boot_disk, sealed)}")
    lines.append(f"  timeout:   {build.Timeout}")
    if finish.containers is not None:
        lines.append(f"  containers: {finish_flags.CONTAINERS_TEXT[finish.containers]}")
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
