"""The GCE executor: Daisy on Compute Engine.

This version records GCE builds and plans them (`-dry-run`); the calls to
Compute Engine, GCS and daisy are seams, named here, that the GCE executor
fills in. They never reach the network in this version.
"""

from __future__ import annotations

from cos_customizer.config import SourceImage
from cos_customizer.errors import NotAvailableError

NOT_YET = (
    "this version of cos-customizer does not run GCE builds yet; "
    "use -dry-run to see the plan, or start a local build with -image-file"
)


def resolve_source_image(requested: SourceImage, compute_endpoint: str = "") -> SourceImage:
    """Seam for source resolution (by name, family or milestone).

    Until the GCE executor lands, the request is recorded as given: a name
    is kept as is, a family or milestone stays unresolved in the config.
    """
    del compute_endpoint
    return requested


def valid_driver_versions() -> list[str]:
    """Seam for `install-gpu -get-valid-drivers` (lists NVIDIA's public GCS bucket)."""
    raise NotAvailableError(f"-get-valid-drivers needs Google Cloud Storage: {NOT_YET}")


def build() -> None:
    """Seam for the preload: workflow, CIDATA disk, uploads, daisy."""
    raise NotAvailableError(NOT_YET)
