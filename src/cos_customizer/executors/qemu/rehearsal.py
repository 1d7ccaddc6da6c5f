"""The qemu executor: a GCE build rehearsed on this machine, the workflow run by `daisy_local`.

`finish-image-build -executor=qemu` on a build started with `-image-file` makes what a GCE build
makes, with the GCE build's own code: the provisioner config as the preload VM sees it
(`workflow.guest_provisioner`), the CIDATA disk (the shipped static provisioner and its config) and the
SCRATCH disk (`disks.cidata_disk`, `disks.scratch_disk`), the startup cloud-config
(`startup.cloud_config`), the `build-image` workflow and daisy's argument list (`workflow.workflow`,
`workflow.daisy_args`). The argument list is then read back as daisy reads it (`daisy_invocation`),
and the document runs with `daisy_local.run` against local resources:

- GCS is a directory tree (`qemu_resources.Resources`); the build context and the install-gpu deps
  are put where the GCE build uploads them; the guest reads them through `GcsServer`, which asks
  for the metadata server's token as GCS asks for a service account's; both servers listen on unix
  sockets in the run's private directory (`loopback_http`), so no other local user reaches them;
- images and disks are sparse files; the source image is the `-image-file`;
- the preload VM is QEMU (`qemu_instances`), booted as COS's GRUB boots it, with a metadata server
  at 169.254.169.254 and the GCS server at `GCS_ADDRESS`; the guest's systemd gets
  `STORAGE_EMULATOR_HOST` pointing there (`systemd.setenv=` on the kernel command line, so every
  unit, the provisioner's included, sees it: the one change to what a VM on GCE is given);
- the `image` step's `CreateImages` writes `-output` (raw, qcow2 or tar.gz).

The source's machine (`qemu_instances.image_arch`: that of the kernel its grub.cfg boots) picks the
provisioner shipped on CIDATA (`provisioner_build.ship`/`build` for that arch) and the QEMU that boots it.

Every workflow step is reported as it starts and ends, the serial `BuildStatus:` lines are
streamed, and every boot of the guest is reported with the line that preceded it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cos_customizer import provisioner_build, runner
from cos_customizer.arch import Arch
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.disk import gpt
from cos_customizer.errors import BuildFailed, CustomizerError
from cos_customizer.executors import disks, failed_step, startup, workflow
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu import loopback_http
from cos_customizer.executors.qemu.boot import BootChoice
from cos_customizer.executors.qemu.daisy import StepContext, StepEvent
from cos_customizer.executors.qemu.gcs_server import GcsServer
from cos_customizer.executors.qemu.instances import Machine, QemuInstances, image_arch
from cos_customizer.executors.qemu.resources import Resources
from cos_customizer.images import ImageFormat
from cos_customizer.provisioner.agent import DISK_SPACE
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.units import parse_duration

log = logging.getLogger("cos_customizer")

GCS_ADDRESS = "169.254.169.252"  # the guest's GCS endpoint (port 80), inside QEMU's 169.254.0.0/16 user network
LOCAL_PROJECT = "cos-customizer-local"
LOCAL_ZONE = "local-zone-a"
LOCAL_BUCKET = "cos-customizer-local"
ACCEL_ENV = "COS_CUSTOMIZER_QEMU_ACCEL"  # "kvm" or "tcg" to force one; unset: KVM when a kernel runs under it
REBOOT_REASON = "Reboot required:"  # the provisioner's line before it exits 3 (provisioner.main)
SOCKET_BASE_MAX = loopback_http.SOCKET_BASE_MAX  # characters of $TMPDIR that leave room for the sockets below it
INSTANCE_MEMORY_MB = 2048
INSTANCE_CPUS = 2
HANG_AFTER = 600.0  # seconds a preload VM may show no serial output and no disk I/O before it is called hung
# The daisy flags `workflow.daisy_args` writes: with a value, and without.
_VALUED = ("-gcs_path", "-project", "-zone", "-default_timeout")
_SWITCHES = ("-disable_gcs_logging",)


@dataclasses.dataclass(frozen=True)
class Rehearsal:
    source: SourceImage  # a local source (`ImageFile`)
    build: BuildConfig
    provisioner: ProvisionerConfig  # as the preload VM sees it
    image: workflow.OutputImage
    output: Path
    format: ImageFormat
    build_context: Path
    provisioner_binary: Path | None
    accel: str = ""  # "kvm" or "tcg"; empty: KVM when it works, else TCG


@dataclasses.dataclass(frozen=True)
class DaisyInvocation:
    """What daisy would take from its argument list."""

    vars: dict[str, str]
    gcs_path: str
    project: str
    zone: str
    default_timeout: str
    workflow_path: str


def daisy_invocation(args: list[str]) -> DaisyInvocation:
    """Read daisy's argument list (`workflow.daisy_args`) as daisy's flag parser does; refuse what we cannot honour."""
    variables: dict[str, str] = {}
    options: dict[str, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-var:") or arg in _VALUED:
            if index + 1 >= len(args):
                raise BuildFailed(f"daisy argument {arg} has no value")
            value = args[index + 1]
            if arg.startswith("-var:"):
                variables[arg[len("-var:") :]] = value
            else:
                options[arg] = value
            index += 2
            continue
        if arg.startswith("-compute_endpoint_override="):
            raise BuildFailed("-compute-endpoint has no meaning for the qemu executor (it uses no Compute API)")
        if arg.startswith("-") and arg not in _SWITCHES:
            raise BuildFailed(f"daisy argument {arg} is not understood by the qemu executor")
        if not arg.startswith("-"):
            rest.append(arg)
        index += 1
    if len(rest) != 1:
        raise BuildFailed(f"daisy arguments name {len(rest)} workflow files, expected one")
    return DaisyInvocation(
        variables, options.get("-gcs_path", ""), options.get("-project", ""), options.get("-zone", ""),
        options.get("-default_timeout", ""), rest[0],
    )  # fmt: skip


def workflow_source(source: SourceImage) -> SourceImage:
    """The source as the workflow names it: a local image file becomes an image of the local project."""
    name = "".join(ch if ch.isalnum() else "-" for ch in Path(source.ImageFile).name.lower()).strip("-")
    return source.model_copy(update={"Project": LOCAL_PROJECT, "Name": name or "source-image"})


@dataclasses.dataclass
class Result:
    """What the rehearsal did, for the summary."""

    steps: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # workflow steps, in finishing order
    boots: int = 0
    reboot_reasons: list[str] = dataclasses.field(default_factory=list)
    guest_seconds: float = 0.0
    table: gpt.Table | None = None  # the boot disk's partition table when the image was made
    disk_space: list[str] = dataclasses.field(default_factory=list)  # the provisioner's DISK_SPACE lines
    accel: str = ""


class _Progress:
    """Reports the workflow's steps, the guest's status lines and its boots; keeps what the summary needs."""

    def __init__(self, result: Result, say: Callable[[str], None]) -> None:
        self.result = result
        self.say = say
        self.started: dict[str, float] = {}
        self.reboot_reason = ""

    def event(self, event: StepEvent) -> None:
        if event.kind == "started":
            self.started[event.step] = time.monotonic()
            self.say(f"workflow step {event.step} ({event.type}) started")
        elif event.kind == "finished":
            seconds = time.monotonic() - self.started.get(event.step, time.monotonic())
            self.result.steps.append((event.step, seconds))
            self.say(f"workflow step {event.step} ({event.type}) finished in {seconds:.1f}s")
        elif event.kind == "status":
            if REBOOT_REASON in event.detail:  # the provisioner's own words for why it asks for a reboot
                self.reboot_reason = event.detail.split(REBOOT_REASON, 1)[1].strip()
            if DISK_SPACE in event.detail:  # what the relocation and the trims moved and discarded
                self.result.disk_space.append(event.detail.split(DISK_SPACE, 1)[1].strip())
            self.say(f"  {event.detail}")
        elif event.kind in ("failed", "cancelled"):
            self.say(
                f"workflow step {event.step} ({event.type}) {event.kind}" + (f": {event.detail}" * bool(event.detail))
            )
        elif event.kind == "cleanup":
            log.debug("qemu: cleanup: %s", event.detail)

    def boot(self, machine: Machine, choice: BootChoice) -> None:
        name = machine.instance.name
        if machine.boots == 1:
            self.say(f"{name}: boot 1 ({machine.accel.upper()}): {choice.title} ({choice.kernel})")
            return
        why = machine.reasons[-1] if machine.reasons else "?"
        reason = self.reboot_reason or "the provisioner gave no reason"
        self.reboot_reason = ""
        self.result.reboot_reasons.append(reason)
        self.say(f"{name}: the guest rebooted (QEMU: {why}): {reason}")
        self.say(f"{name}: boot {machine.boots}: {choice.title} ({choice.kernel})")


def _capture_table(resources: Resources, handler: daisy_local.Handler, result: Result) -> daisy_local.Handler:
    """`CreateImages`, reading the source disk's partition table first (the summary's "after")."""

    def create_images(step: str, body: Any, context: StepContext) -> None:
        for spec in body if isinstance(body, list) else []:
            disk = str(daisy_local.field(spec, "SourceDisk") or "") if isinstance(spec, dict) else ""
            if disk and disk in resources.disks:
                result.table = gpt.read_table(resources.disks[disk])
        handler(step, body, context)

    return create_images


def _upload_inputs(resources: Resources, build: BuildConfig, build_context: Path) -> None:
    """What `preload.upload` puts in the managed directory, put in the local GCS tree."""
    resources.upload(build_context, f"gs://{build.GCSBucket}/{workflow.managed_object(build, workflow.CONTEXT_OBJECT)}")
    for name in build.GCSFiles:
        url = f"gs://{build.GCSBucket}/{workflow.managed_object(build, f'{workflow.DEPS_DIR}/{Path(name).name}')}"
        resources.upload(Path(name), url)


def socket_parent() -> str:
    """Where the run's private directory goes: it holds QEMU's unix sockets (`DIR/cos-qemu.X/cos-vm.Y/events.sock`)
    and the servers' (`DIR/cos-qemu.X/md.Y/http.sock`), whose paths may not exceed 107 bytes and are passed to
    socat as they are; a long $TMPDIR gave "AF_UNIX path too long", so then /tmp (`loopback_http.socket_base`)."""
    return loopback_http.socket_base()


def check_tools() -> None:
    for tool, package in ((qemu_boot.QEMU, "qemu-system-x86"), ("socat", "socat"), ("mcopy", "mtools"),
                          ("mkfs.vfat", "dosfstools"), ("mke2fs", "e2fsprogs")):  # fmt: skip
        runner.require_tool(tool, package)


def source_arch(source: Path) -> Arch:
    """The machine the source image boots (`image_arch`); its QEMU (and firmware) must be installed. A source
    whose kernel cannot be read is taken for x86-64: its boot then fails as it did before arm64 was known."""
    with tempfile.TemporaryDirectory(prefix="cos-customizer-arch.") as tmp:
        try:
            arch = image_arch(source, Path(tmp))
        except CustomizerError as err:
            log.debug("qemu: the source's machine is taken for x86-64: %s", err)
            arch = Arch.AMD64
    if arch is not Arch.AMD64:
        qemu_boot.require_machine(arch)
    return arch


def run(job: Rehearsal, environ: Mapping[str, str], say: Callable[[str], None]) -> Result:
    """Rehearse the GCE build of `job`; the output file exists only when it succeeded."""
    check_tools()
    if job.accel not in ("", "kvm", "tcg"):
        raise BuildFailed(f"${ACCEL_ENV}={job.accel}: use kvm or tcg, or leave it unset")
    arch = source_arch(Path(job.source.ImageFile))
    # What CIDATA will hold, checked before anything is made (a stale prebuilt one is refused); the copy
    # shipped is made and checked again below.
    provisioner_build.check_choice(job.provisioner_binary, environ, arch=arch)
    result = Result()
    progress = _Progress(result, say)
    build = job.build
    source = workflow_source(job.source)
    with (
        tempfile.TemporaryDirectory(prefix="cos-customizer-qemu.") as tmp,
        tempfile.TemporaryDirectory(prefix="cos-qemu.", dir=socket_parent()) as run_dir,
    ):
        work = Path(tmp)
        binary = provisioner_build.ship(work / "provisioner", job.provisioner_binary, environ, arch=arch)
        if binary is None:
            binary, _ = provisioner_build.build(work / "provisioner", dict(environ), arch=arch)
        cidata, scratch = disks.cidata_disk(work, binary, job.provisioner), disks.scratch_disk(work)
        cloud = work / "startup.yaml"
        cloud.write_text(startup.cloud_config())
        wf_file = work / "build_image.wf.json"
        wf_file.write_text(json.dumps(workflow.workflow(build, job.provisioner, job.image, str(cloud)), indent=2))
        args = workflow.daisy_args(build, job.provisioner, source, job.image, cidata=str(cidata),
                                   scratch=str(scratch), workflow_path=str(wf_file))  # fmt: skip
        invocation = daisy_invocation(args)
        (work / "resources").mkdir()
        with Resources(
            work / "resources",
            gcs_path=invocation.gcs_path,
            output_path=job.output,
            output_format=job.format,
            source_images={source.url: Path(job.source.ImageFile)},
            project=invocation.project,
            zone=invocation.zone,
            sockets=Path(run_dir),
        ) as resources, GcsServer(resources.gcs, resources.token, socket_parent=Path(run_dir)) as gcs:  # fmt: skip
            document = json.loads(Path(invocation.workflow_path).read_text())
            wf = daisy_local.load(document, invocation.vars, workflow_dir=work, autovars=resources.autovars())
            _upload_inputs(resources, build, job.build_context)
            resources.upload_sources(wf)
            instances = QemuInstances(
                resources,
                accel=job.accel or None,
                memory_mb=INSTANCE_MEMORY_MB,
                cpus=INSTANCE_CPUS,
                rundir=Path(run_dir),
                hang_after=HANG_AFTER,
                extra_append=f"systemd.setenv=STORAGE_EMULATOR_HOST=http://{GCS_ADDRESS}",
                forwards=((GCS_ADDRESS, 80, gcs.socket),),
                on_boot=progress.boot,
            )
            handlers = {**resources.handlers(), **instances.handlers()}
            handlers["CreateImages"] = _capture_table(resources, handlers["CreateImages"], result)
            say(f"Rehearsing the GCE workflow {wf.name} locally in QEMU (its serial port 3 follows)")
            try:
                # -timeout is each step's limit (daisy's -default_timeout); the run's bound lies past them all.
                bound = workflow.run_bound(document, invocation.default_timeout)
                daisy_local.run(
                    wf,
                    handlers,
                    default_timeout=parse_duration(invocation.default_timeout) / 1e9,
                    deadline=time.monotonic() + bound.seconds,
                    on_event=progress.event,
                )
            except daisy_local.DeadlineExceeded as err:
                raise BuildFailed(f"{bound.exceeded('the rehearsal')}: {err}") from err
            except daisy_local.WorkflowStepFailed as err:
                raise BuildFailed(
                    f"the rehearsed build failed in workflow step {err.step.name} ({err.step.type}): {err.reason}",
                    failed_step(err.reason, job.provisioner),
                ) from err
            except daisy_local.WorkflowError as err:
                raise BuildFailed(f"the rehearsed build failed: {err}") from err
            finally:
                result.accel = instances.accel
                for machine in instances.machines.values():
                    result.boots += machine.boots
                    result.guest_seconds += machine.guest_seconds
    return result
