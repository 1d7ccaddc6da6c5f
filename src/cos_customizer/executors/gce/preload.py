"""The GCE executor's finish: GCS uploads, the CIDATA disk, the workflow, and daisy.

1. delete leftover preload VMs (`-enable-cleanup`);
2. if the output image exists: say so and stop (exit 0), as the original;
3. inherit the source's labels (`-labels` wins);
4. upload the build context and the deps files to the managed GCS directory;
5. make the CIDATA disk (FAT labelled CIDATA: the provisioner executable for
   the source's architecture and its final `config.json`) and the SCRATCH
   disk, each a `.tar.gz` holding `disk.raw`; write the startup cloud-config
   and the workflow;
6. run daisy, its output streamed with a prefix; `-timeout` is daisy's `-default_timeout` (each step's limit,
   enforced by daisy), and our own bound on the whole run (`workflow.run_bound`) is longer than daisy's
   (on expiry or Ctrl-C daisy gets SIGINT, so it deletes what it created);
7. deprecate older images of the family (`-deprecate-old-images`);
and, whatever happens, delete the managed GCS directory.

The source's architecture (`source_arch`: Compute's `architecture`, else its name) is decided when the plan
is made; it picks the provisioner shipped and, unless -machine-type is given, the machine type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cos_customizer import provisioner_build, runner
from cos_customizer.arch import Arch
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import BuildFailed, CustomizerError
from cos_customizer.executors import disks, failed_step, sbom, startup, workflow
from cos_customizer.executors.gce import compute as gce
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.runner import MissingToolError

log = logging.getLogger("cos_customizer")

DAISY_ENV = "COS_CUSTOMIZER_DAISY"
STOP_GRACE_SECONDS = 600.0
# The preload VM's machine type when -machine-type is not given: the original's n1-standard-1 for x86-64; for
# arm64 (no N1 machine is), Tau T2A's smallest, which takes the workflow's pd-standard disks (Axion C4A's do not).
DEFAULT_MACHINE_TYPES = {Arch.AMD64: "n1-standard-1", Arch.ARM64: "t2a-standard-1"}


@dataclasses.dataclass(frozen=True)
class GceBuild:
    source: SourceImage
    build: BuildConfig
    provisioner: ProvisionerConfig
    image: workflow.OutputImage
    inherit_labels: bool
    deprecate_old: bool
    old_image_ttl: int
    enable_cleanup: bool
    build_context: Path
    provisioner_binary: Path | None
    sbom: tuple[dict[str, Any], str] | None = None  # (the SBOM input, the gs:// directory to write to)
    arch: Arch = Arch.AMD64  # the source's (`source_arch`): the provisioner shipped is built for it


def daisy_binary(environ: dict[str, str]) -> str:
    configured = environ.get(DAISY_ENV)
    if configured:
        if not (Path(configured).is_file() and os.access(configured, os.X_OK)):
            raise MissingToolError(f"${DAISY_ENV}={configured} is not an executable file")
        return configured
    path = shutil.which("daisy")
    if path is None:
        raise MissingToolError(
            f"daisy is not installed: put the daisy binary on PATH or set ${DAISY_ENV} "
            "(github.com/GoogleCloudPlatform/compute-daisy)"
        )
    return path


def _storage_client(project: str) -> Any:
    from google.auth import exceptions as auth_exceptions
    from google.cloud import storage  # type: ignore[attr-defined]

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "test", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    try:
        return storage.Client(project=project or None)
    except auth_exceptions.DefaultCredentialsError as err:
        raise CustomizerError(f"Cloud Storage: {gce.NO_CREDENTIALS}") from err


@contextlib.contextmanager
def managed_directory(build: BuildConfig) -> Iterator[Any]:
    """The managed GCS directory's bucket; everything under the directory is deleted at the end."""
    from google.api_core import exceptions

    client = _storage_client(build.Project)
    bucket = client.bucket(build.GCSBucket)
    try:
        yield bucket
    finally:
        try:
            # The trailing slash: `WORKDIR/cos-customizer-other/...` is the user's, not ours.
            blobs = list(client.list_blobs(build.GCSBucket, prefix=f"{workflow.managed_prefix(build)}/"))
            for blob in blobs:
                blob.delete()
            log.info("Deleted the managed directory %s (%d objects)", workflow.managed_dir(build), len(blobs))
        except exceptions.GoogleAPIError as err:
            log.warning("warning: could not delete %s: %s", workflow.managed_dir(build), err)


def upload(bucket: Any, build: BuildConfig, build_context: Path) -> None:
    from google.api_core import exceptions

    uploads = {build_context: workflow.managed_object(build, workflow.CONTEXT_OBJECT)}
    uploads.update(
        {Path(f): workflow.managed_object(build, f"{workflow.DEPS_DIR}/{Path(f).name}") for f in build.GCSFiles}
    )
    for local, name in uploads.items():
        try:
            bucket.blob(name).upload_from_filename(str(local))
        except (exceptions.GoogleAPIError, OSError) as err:
            raise CustomizerError(f"cannot upload {local} to gs://{build.GCSBucket}/{name}: {err}") from err
        log.info("Uploaded %s to gs://%s/%s", local.name, build.GCSBucket, name)


def write_sbom(data: dict[str, Any], directory: str, image_name: str, project: str, tool: str) -> str:
    from google.api_core import exceptions

    name, document = sbom.generate(data, image_name, datetime.datetime.now(datetime.UTC), tool)
    bucket, _, prefix = directory[len("gs://") :].partition("/")
    blob_name = f"{prefix.rstrip('/')}/{name}" if prefix else name
    try:
        blob = _storage_client(project).bucket(bucket).blob(blob_name)
        blob.upload_from_string(json.dumps(document, indent=2), content_type="application/json")
    except exceptions.GoogleAPIError as err:
        raise CustomizerError(f"the image is built, but the SBOM could not be written to {directory}: {err}") from err
    log.info("Wrote the SBOM to gs://%s/%s", bucket, blob_name)
    return f"gs://{bucket}/{blob_name}"


def architecture_from_name(name: str) -> str:
    """What a COS image name says of its architecture (`cos-arm64-stable-...`): "ARM64" or ""."""
    return "ARM64" if "arm64" in name.split("-") else ""


@dataclasses.dataclass(frozen=True)
class SourceArch:
    """The source image's architecture and what said so (for the plan)."""

    arch: Arch
    reason: str


def source_arch(source: SourceImage, compute_endpoint: str, *, dry_run: bool = False) -> SourceArch:
    """The architecture of the GCE source image: Compute's `architecture` field; when Compute says nothing,
    its name (`cos-arm64-...`); else x86-64, as Compute takes an image that does not say.

    A build needs Compute's answer (a failed call is one line); a dry run that cannot ask goes by the name.
    """
    if not source.Name:
        return _by_name(source.Name, "the source has no image name yet")
    try:
        field = gce.image_architecture(gce.images_client(compute_endpoint), source.Project, source.Name)
    except CustomizerError as err:
        if not dry_run:
            raise
        return _by_name(source.Name, f"Compute could not be asked: {err}")
    try:
        arch = Arch.parse(field) if field else None
    except ValueError:
        arch = None
    if arch is not None:
        return SourceArch(arch, f"Compute: architecture {field}")
    return _by_name(source.Name, f"Compute gives no architecture ({field or 'none'})")


def _by_name(name: str, why: str) -> SourceArch:
    if architecture_from_name(name):
        return SourceArch(Arch.ARM64, f"the name says arm64; {why}")
    return SourceArch(Arch.AMD64, f"{why}; x86-64, as Compute takes an image that does not say")


def machine_type(given: str | None, arch: Arch) -> str:
    """-machine-type when given, else the default for the source's architecture."""
    return given if given else DEFAULT_MACHINE_TYPES[arch]


def run_daisy(
    argv: list[str],
    bound: workflow.RunBound,
    env: dict[str, str] | None = None,
    config: ProvisionerConfig | None = None,
) -> None:
    """Run daisy with its output prefixed; at `bound` (ours, past daisy's own per-step timeouts) or on Ctrl-C
    it gets SIGINT and time to clean up.

    Should this process die, however (SIGKILL too), the kernel sends daisy SIGINT (`runner.die_with_us`): it
    deletes what it made and exits. Its lines are read in bounded pieces (`runner.bounded_lines`). When daisy
    fails, the step of `config` that the provisioner's `BuildFailed:` line names (if daisy showed it) is the
    failure's `step`.
    """
    log.info("Running daisy (the preload VM builds the image; its status lines follow)")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=runner.die_with_us(signal.SIGINT))  # fmt: skip
    assert proc.stdout is not None
    stop = ((signal.SIGINT, STOP_GRACE_SECONDS), (signal.SIGKILL, 10.0))  # on SIGINT daisy deletes what it made
    step = None
    timed_out = False
    try:
        with runner.deadline(bound.seconds, lambda: runner.stop_group(proc, stop[:1])) as expired:
            for line in runner.bounded_lines(proc.stdout.fileno()):
                log.info("daisy: %s", line)
                timed_out = timed_out or workflow.TIMEOUT_WORDS in line
                if config is not None and step is None:
                    step = failed_step(line, config)
            status = proc.wait()
    finally:
        runner.stop_group(proc, stop)
    if expired.is_set():
        raise BuildFailed(f"{bound.exceeded('daisy')}; daisy was stopped and cleaned up")
    if status != 0 and timed_out:
        raise BuildFailed(
            "a workflow step did not complete within -timeout, daisy's -default_timeout for each step (its words "
            "are above); daisy deleted the resources it made",
            step,
        )
    if status != 0:
        raise BuildFailed(
            f"daisy failed with exit status {status} (its output is above); daisy deleted the resources it made", step
        )


def finish(job: GceBuild, environ: dict[str, str], compute_endpoint: str) -> bool:
    """Run the GCE build; returns False when the output image already existed (nothing done)."""
    daisy = daisy_binary(environ)
    # What CIDATA will hold, checked before anything is made (a stale prebuilt one is refused); the copy
    # shipped is made and checked again below.
    provisioner_build.check_choice(job.provisioner_binary, environ, arch=job.arch)
    build = job.build
    images = gce.images_client(compute_endpoint)
    if job.enable_cleanup:
        log.info("Deleting old VM instances created by cos-customizer...")
        try:
            deleted = gce.cleanup_old_vms(gce.instances_client(compute_endpoint), build.Project, build.Zone)
            log.info("Deleted %d old VM instances", len(deleted))
        except CustomizerError as err:
            log.warning("warning: failed to delete old instances: %s", err)
    if gce.image_exists(images, job.image.project, job.image.name):
        log.info("Result image %s already exists in project %s. Exiting.", job.image.name, job.image.project)
        return False
    image = job.image
    if job.inherit_labels:
        inherited = gce.image_labels(images, job.source.Project, job.source.Name)
        image = dataclasses.replace(image, labels=tuple({**inherited, **dict(image.labels)}.items()))
    with tempfile.TemporaryDirectory(prefix="cos-customizer-gce.") as tmp, managed_directory(build) as bucket:
        work = Path(tmp)
        binary = provisioner_build.ship(work / "provisioner", job.provisioner_binary, environ, arch=job.arch)
        if binary is None:
            binary, _ = provisioner_build.build(work / "provisioner", dict(environ), arch=job.arch)
        upload(bucket, build, job.build_context)
        cidata, scratch = disks.cidata_disk(work, binary, job.provisioner), disks.scratch_disk(work)
        cloud = work / "startup.yaml"
        cloud.write_text(startup.cloud_config())
        wf = work / "build_image.wf.json"
        document = workflow.workflow(build, job.provisioner, image, str(cloud))
        wf.write_text(json.dumps(document, indent=2))
        args = workflow.daisy_args(build, job.provisioner, job.source, image, cidata=str(cidata),
                                   scratch=str(scratch), workflow_path=str(wf))  # fmt: skip
        run_daisy([daisy, *args], workflow.run_bound(document, build.Timeout), dict(environ), job.provisioner)
    if job.sbom is not None:
        write_sbom(job.sbom[0], job.sbom[1], image.name, build.Project, sbom.creator_tool(environ))
    if job.deprecate_old:
        done = gce.deprecate_in_family(images, image.project, image.family, image.name, job.old_image_ttl)
        log.info("Deprecated %d older images of family %s", len(done), image.family)
    return True
