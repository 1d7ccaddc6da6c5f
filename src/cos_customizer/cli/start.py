"""`start-image-build`: a fresh workspace for a new build."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cos_customizer import buildcontext, images, workspace
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import ValidationError, shown
from cos_customizer.executors.gce import compute as gce
from cos_customizer.provisioner.config import ProvisionerConfig

log = logging.getLogger(__name__)

GCE_SOURCE_FLAGS = ("image-project", "image-name", "image-milestone", "image-family", "gcs-bucket", "gcs-workdir")

FLAGS = (
    Flag(
        "build-context",
        Kind.STRING,
        "Path to the build context (a directory or a file).",
        default=".",
        empty="give the build context's path (the original fails on an empty path too)",
    ),
    Flag("gcs-bucket", Kind.STRING, "GCS bucket to use for scratch space."),
    Flag("gcs-workdir", Kind.STRING, "GCS directory to use for scratch space."),
    Flag("image-project", Kind.STRING, "Source image project."),
    Flag(
        "image-name",
        Kind.STRING,
        "Source image name. Mutually exclusive with 'image-milestone' and 'image-family'.",
    ),
    Flag(
        "image-milestone",
        Kind.INT,
        "Source image milestone. Mutually exclusive with 'image-name' and 'image-family'. "
        "Can only be used if 'image-project' is cos-cloud.",
    ),
    Flag(
        "image-family",
        Kind.STRING,
        "Source image family. Mutually exclusive with 'image-name' and 'image-milestone'.",
    ),
    Flag(
        "image-file",
        Kind.STRING,
        "Local source image: a raw disk, a .qcow2, or a .tar.gz holding disk.raw. The build then runs "
        "offline with the local executor; no GCS or project flag is needed.",
        ours=True,
    ),
)


def _requested_source(args: Parsed, root: Path) -> SourceImage:
    if args["image-file"]:
        for name in GCE_SOURCE_FLAGS:
            if name in args.given:
                raise ValidationError(
                    f"-image-file and -{name} are mutually exclusive: a build starts either from a local "
                    "image file (local executor) or from a Compute Engine image (gce executor)"
                )
        return SourceImage(ImageFile=str(_check_image_file(Path(args["image-file"]), root)))
    chosen = [name for name in ("image-name", "image-milestone", "image-family") if args[name]]
    if len(chosen) != 1:
        raise ValidationError(
            "exactly one of -image-name, -image-milestone, -image-family must be set "
            "(or -image-file=PATH for a local build)"
        )
    milestone = args["image-milestone"]
    if milestone < 0:
        raise ValidationError(f"-image-milestone must be a positive milestone number such as 113, not {milestone}")
    if milestone and args["image-project"] != "cos-cloud":
        raise ValidationError(
            "-image-milestone can only be used if -image-project is set to cos-cloud "
            f'(image-milestone: {milestone}, image-project: "{args["image-project"]}")'
        )
    for name in ("gcs-bucket", "gcs-workdir", "image-project"):
        if not args[name]:
            raise ValidationError(f"-{name} must be set for a GCE build (or use -image-file=PATH for a local build)")
    return SourceImage(
        Name=args["image-name"], Project=args["image-project"], Family=args["image-family"], Milestone=milestone
    )


def _check_image_file(path: Path, root: Path) -> Path:
    """A regular file outside the workspace; found with stat alone (a FIFO or a device is never opened)."""
    what = images.kind(path)
    if what == images.MISSING:
        raise ValidationError(f"-image-file={shown(path)}: no such file; give a raw, .qcow2 or .tar.gz COS disk image")
    if what != images.REGULAR:
        raise ValidationError(
            f"-image-file={shown(path)}: {what}, not a file; give a raw, .qcow2 or .tar.gz COS disk image"
        )
    if not os.access(path, os.R_OK):
        raise ValidationError(f"-image-file={shown(path)}: not readable by this user")
    if workspace.contains(root, path):
        raise ValidationError(
            f"-image-file={shown(path)} is inside the workspace {shown(root)}, which start-image-build replaces and "
            "finish-image-build removes: move the image out of it, or choose another -local-state-workdir"
        )
    return path.resolve()


def handle(context: Context, args: Parsed) -> int:
    root = context.workspace_root
    requested = _requested_source(args, root)
    home = context.environ.get("HOME")
    workspace.check_replaceable(root, home)  # before anything is written there, even a lock file
    source = requested if requested.is_local else gce.resolve_source_image(requested, context.compute_endpoint)
    build_context = Path(args["build-context"])
    members = 0

    def fill(new: workspace.Workspace) -> None:
        nonlocal members
        new.root.mkdir(parents=True, exist_ok=True)
        members = buildcontext.create_archive(build_context, new.build_context_archive, exclude=(root, new.root))
        workspace.write_json_atomic(new.source_image_path, source.model_dump(mode="json"))
        new.save_build(BuildConfig(GCSBucket=args["gcs-bucket"], GCSDir=args["gcs-workdir"]))
        new.save_provisioner(ProvisionerConfig())

    with context.workspace.lock():  # a finish-image-build still running on the old workspace keeps it
        workspace.create(root, fill, home)
    log.info(
        "Started an image build from %s (build context %s: %d %s; state in %s)",
        source.describe(),
        build_context,
        members,
        "entry" if members == 1 else "entries",
        root,
    )
    return 0


COMMAND = Command(
    name="start-image-build",
    synopsis="Start a COS image build.",
    description=(
        "Start a COS image build: record the source image and archive the build context in a fresh "
        "workspace (replacing a previous one this tool made; any other directory but an empty one is refused). "
        "Creates no cloud resource."
    ),
    flags=FLAGS,
    handler=handle,
)
