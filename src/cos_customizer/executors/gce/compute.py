"""Compute Engine calls of the GCE executor (google-cloud-compute).

The endpoint is overridable (`-compute-endpoint` or
$COS_CUSTOMIZER_COMPUTE_ENDPOINT); a plain `http://` endpoint, such as a
loopback stand-in in tests, is used without credentials. Errors become one
line that says what Compute Engine answered.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from cos_customizer.config import SourceImage
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.executors.workflow import compute_endpoint

log = logging.getLogger("cos_customizer")

COS_PROJECT = "cos-cloud"
CLEANUP_LABEL = "cos-customizer-cleanup"
CLEANUP_AGE = datetime.timedelta(days=1)
T = TypeVar("T")


class GceError(CustomizerError):
    """Compute Engine refused or failed a call."""


NO_CREDENTIALS = (
    "no Google credentials: run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
)


# Where the original looks up driver versions (install_gpu.go, validDriverVersions): the second path element of
# every object under tesla/ in NVIDIA's public bucket, read anonymously, plus one version it always accepts.
DRIVER_BUCKET = "nvidia-drivers-us-public"
DRIVER_PREFIX = "tesla/"
ALWAYS_VALID_DRIVER = "390.46"


def valid_driver_versions() -> list[str]:
    """The driver versions install-gpu accepts, sorted (the original's set; STORAGE_EMULATOR_HOST for tests)."""
    from google.api_core import exceptions
    from google.cloud import storage  # type: ignore[attr-defined]

    try:
        client = storage.Client.create_anonymous_client()
        names = [blob.name for blob in client.list_blobs(DRIVER_BUCKET, prefix=DRIVER_PREFIX)]
    except exceptions.GoogleAPIError as err:
        raise GceError(f"cannot list the GPU driver versions in gs://{DRIVER_BUCKET}/{DRIVER_PREFIX}: {err}") from err
    found = {ALWAYS_VALID_DRIVER}
    found.update(parts[1] for name in names if len(parts := name.split("/", 2)) > 1)
    return sorted(found)


@contextmanager
def _api(what: str) -> Iterator[None]:
    import requests
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    try:
        yield
    except exceptions.NotFound as err:
        raise GceError(f"{what}: not found ({err.message})") from err
    except exceptions.GoogleAPIError as err:
        raise GceError(f"{what}: Compute Engine answered: {err}") from err
    except auth_exceptions.DefaultCredentialsError as err:
        raise GceError(f"{what}: {NO_CREDENTIALS}") from err
    except requests.exceptions.RequestException as err:  # the REST transport's own: no answer at all
        raise GceError(f"{what}: Compute Engine did not answer ({type(err).__name__})") from err


def _options(endpoint: str) -> dict[str, Any]:
    if not endpoint:
        return {}
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    options: dict[str, Any] = {"client_options": ClientOptions(api_endpoint=compute_endpoint(endpoint).client)}
    if endpoint.startswith("http://"):
        options["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return options


def images_client(endpoint: str) -> Any:
    from google.cloud import compute_v1

    with _api("Compute Engine"):  # the client looks for credentials as it is made
        return compute_v1.ImagesClient(**_options(endpoint))


def instances_client(endpoint: str) -> Any:
    from google.cloud import compute_v1

    with _api("Compute Engine"):
        return compute_v1.InstancesClient(**_options(endpoint))


def _call(what: str, call: Callable[[], T]) -> T:
    with _api(what):
        return call()


def resolve_source_image(requested: SourceImage, compute_endpoint: str = "") -> SourceImage:
    """The source image by name (it must exist), family (latest active) or milestone (latest on cos-cloud)."""
    images = images_client(compute_endpoint)
    project = requested.Project
    if requested.Milestone:
        name = latest_on_milestone(images, requested.Milestone)
        return requested.model_copy(update={"Name": name})
    if requested.Family:
        image = _call(
            f"image family {requested.Family} in project {project}",
            lambda: images.get_from_family(project=project, family=requested.Family),
        )
        log.info("Using image %s from family %s", image.name, requested.Family)
        return requested.model_copy(update={"Name": image.name})
    if not image_exists(images, project, requested.Name):
        raise ValidationError(f"could not find source image {requested.Name} in project {project}")
    return requested


# How the original reads a cos-cloud image name (src/pkg/gce/gce.go, imageNameRegex): the milestone follows a
# lower-case word (stable, beta, dev, ...), then the build number's three parts. Searched, not anchored.
_IMAGE_NAME = re.compile(r"[a-z0-9-]+-[a-z]+-([0-9]+)-([0-9]+)-([0-9]+)-([0-9]+)")


def decode_image_name(name: str) -> tuple[int, tuple[int, int, int]] | None:
    """(milestone, build number) of a cos-cloud image name, or None when the original would not read it."""
    match = _IMAGE_NAME.search(name)
    if match is None:
        return None
    milestone, *build = (int(group) for group in match.groups())
    return milestone, (build[0], build[1], build[2])


def newest_on_milestone(names: list[str], milestone: int) -> tuple[str, int] | None:
    """The name with the highest build number on `milestone`, and how many names were on it (deprecated or not,
    as in the original's ResolveMilestone)."""
    candidates = [
        (decoded[1], name) for name in names if (decoded := decode_image_name(name)) and decoded[0] == milestone
    ]
    if not candidates:
        return None
    return max(candidates)[1], len(candidates)


def latest_on_milestone(images: Any, milestone: int) -> str:
    listed = _call(f"images of {COS_PROJECT}", lambda: list(images.list(project=COS_PROJECT)))
    found = newest_on_milestone([str(image.name) for image in listed], milestone)
    if found is None:
        raise ValidationError(f"no image found on milestone {milestone} in {COS_PROJECT}")
    name, count = found
    log.info(
        "Using image %s: the highest build number among the %d %s images on milestone %d "
        "(deprecated images count, as in the original)",
        name, count, COS_PROJECT, milestone,
    )  # fmt: skip
    return name


def image_exists(images: Any, project: str, name: str) -> bool:
    from google.api_core import exceptions

    try:
        with _api(f"image {name} in project {project}"):
            images.get(project=project, image=name)
    except GceError as err:
        if isinstance(err.__cause__, exceptions.NotFound):
            return False
        raise
    return True


def image_architecture(images: Any, project: str, name: str) -> str:
    """The image's `architecture` field ("X86_64", "ARM64"; empty when the image does not say)."""
    image = _call(f"image {name} in project {project}", lambda: images.get(project=project, image=name))
    return str(image.architecture or "")


def image_labels(images: Any, project: str, name: str) -> dict[str, str]:
    image = _call(f"image {name} in project {project}", lambda: images.get(project=project, image=name))
    return dict(image.labels)


def deprecate_in_family(images: Any, project: str, family: str, new_name: str, ttl_seconds: int) -> list[str]:
    """Deprecate every other image of `family` (replacement: the new image), deleted after the TTL if given."""
    from google.cloud import compute_v1

    status: dict[str, Any] = {"state": "DEPRECATED", "replacement": f"projects/{project}/global/images/{new_name}"}
    if ttl_seconds:
        deleted = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=ttl_seconds)
        status["deleted"] = deleted.isoformat(timespec="seconds").replace("+00:00", "Z")
    listed = _call(f"images of project {project}", lambda: list(images.list(project=project)))
    done = []
    for image in listed:
        if image.family != family or image.name == new_name or (image.deprecated and image.deprecated.state):
            continue
        _deprecate(images, project, image.name, compute_v1.DeprecationStatus(**status))
        done.append(image.name)
    return done


def _deprecate(images: Any, project: str, name: str, status: Any) -> None:
    _call(
        f"deprecating {name}",
        lambda: images.deprecate_unary(project=project, image=name, deprecation_status_resource=status),
    )


def cleanup_old_vms(instances: Any, project: str, zone: str, now: datetime.datetime | None = None) -> list[str]:
    """Delete preload VMs of earlier builds (label cos-customizer-cleanup) older than a day."""
    from google.cloud import compute_v1

    now = now or datetime.datetime.now(datetime.UTC)
    request = compute_v1.ListInstancesRequest(project=project, zone=zone, filter=f"labels.{CLEANUP_LABEL}:*")
    deleted = []
    for instance in _call(f"instances in {project}/{zone}", lambda: list(instances.list(request=request))):
        if CLEANUP_LABEL not in instance.labels:
            continue
        created = datetime.datetime.fromisoformat(instance.creation_timestamp)
        if now - created < CLEANUP_AGE:
            continue
        _delete_instance(instances, project, zone, instance.name)
        deleted.append(instance.name)
    return deleted


def _delete_instance(instances: Any, project: str, zone: str, name: str) -> None:
    _call(f"deleting {name}", lambda: instances.delete_unary(project=project, zone=zone, instance=name))
