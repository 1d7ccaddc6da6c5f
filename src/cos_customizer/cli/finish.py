"""`finish-image-build`: validate everything, then preload with the chosen executor.

Validation happens before anything is touched (`cli.finish_plan.make_plan`, over the flags of
`cli.finish_flags`). `-dry-run` stops after it and prints the plan: human text on stderr, one JSON
document on stdout. Otherwise the plan, under the workspace lock (and, for an output file, the output's),
becomes the executor's job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from cos_customizer import images, report
from cos_customizer import output as output_file
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.finish_flags import FLAGS
from cos_customizer.cli.finish_plan import FinishPlan, check_output_absent, describe, make_plan
from cos_customizer.cli.flags import Parsed
from cos_customizer.disk.planner import DiskPlan
from cos_customizer.errors import shown
from cos_customizer.executors import Executor, sbom
from cos_customizer.executors.gce import preload
from cos_customizer.executors.local import build as local
from cos_customizer.executors.qemu import rehearsal
from cos_customizer.images import ImageFormat

log = logging.getLogger(__name__)


def handle(context: Context, args: Parsed) -> int:
    if args["dry-run"]:  # reads only: takes no lock, writes no lock file
        finish = make_plan(context, args)
        sys.stderr.write(describe(finish))
        sys.stdout.write(json.dumps(finish.to_json(), indent=2) + "\n")
        return 0
    with context.workspace.lock():  # held to the end: a second finish on this workspace fails at once
        finish = make_plan(context, args)
        if finish.executor is Executor.GCE:
            return _run_gce(context, finish)
        assert finish.output is not None
        output = finish.output

        def busy(holder: str) -> str:
            return (
                f"-output={shown(output.flag)} is in use by another cos-customizer ({holder}) writing the same "
                "output: wait for it to finish, or choose another -output"
            )

        with (
            output_file.held(output.path, busy),  # no lock file: a name in the kernel, gone with this process
            images.backing_files_allowed(finish.allow_backing_file),
        ):
            check_output_absent(output)  # again, now that no other build can be writing it
            if finish.executor is Executor.QEMU:
                return _run_qemu(context, finish)
            return _run_local(context, finish)


def _run_gce(context: Context, finish: FinishPlan) -> int:
    assert finish.output_image is not None
    image = finish.output_image
    job = preload.GceBuild(
        source=finish.source,
        build=finish.build,
        provisioner=finish.provisioner,
        image=finish.workflow_image(),
        inherit_labels=image["InheritLabels"],
        deprecate_old=finish.deprecate_old,
        old_image_ttl=finish.old_image_ttl,
        enable_cleanup=finish.enable_cleanup,
        build_context=context.workspace.build_context_archive,
        provisioner_binary=finish.provisioner_binary,
        arch=finish.arch,
    )
    if finish.sbom_paths is not None:
        input_path, output_path = finish.sbom_paths
        data = sbom.load_input(context.workspace.build_context_archive, input_path)
        job = dataclasses.replace(job, sbom=(data, output_path))
    preload.daisy_binary(dict(context.environ))  # refuse early, before anything is touched
    try:
        made = preload.finish(job, dict(context.environ), context.compute_endpoint)
    finally:
        context.workspace.remove()  # as the original: the build is over, success or failure
    if made:
        sys.stdout.write(f"Build succeeded: image {image['Project']}/{image['Name']}\n")
    return 0


def _run_local(context: Context, finish: FinishPlan) -> int:
    assert finish.output is not None and finish.disk_plan is not None and finish.containers is not None
    build = local.LocalBuild(
        source=Path(finish.source.ImageFile),
        output=finish.output.path,
        format=ImageFormat(finish.output.format),
        config=finish.provisioner,
        plan=finish.disk_plan,
        timeout=finish.timeout,
        allow_host_loopback=finish.allow_host_loopback,
        containers=finish.containers,
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
        written = sbom.write_local(finish.sbom, finish.output.path, sbom.creator_tool(context.environ), finish.epoch)
        sys.stdout.write(f"SBOM: {written}\n")
    return 0


@dataclasses.dataclass(frozen=True)
class _Rehearsed:
    """A rehearsal's output as the summary describes it."""

    output: Path
    format: ImageFormat
    plan: DiskPlan


def _run_qemu(context: Context, finish: FinishPlan) -> int:
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
        *(f"Disk space: {line}" for line in result.disk_space),
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
