"""SBOM (`-sbom-input-path`, `-sbom-output-path`): an SPDX 2.2 JSON document for the output image.

The input (a JSON file in the build context, the original's schema) names
the creators, optionally the output name and version, a supplier, SPDX
packages, external SBOM documents and extracted licensing infos. The
document's root package is the output image; it DESCRIBES the root, which
CONTAINS the listed packages and refers to the external documents. Fields
left out get NOASSERTION. It is written to `<output path>/<name>[-<version>]_sbom.spdx.json`: a GCE
build's `-sbom-output-path` (`executors.gce.preload`), a local build's output directory (`write_local`).
"""

from __future__ import annotations

import datetime
import json
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cos_customizer import __version__, buildcontext, workspace
from cos_customizer.errors import ValidationError

NOASSERTION = "NOASSERTION"
SUFFIX = "sbom.spdx.json"
# The step image's name, set by its Dockerfile (deploy/cloudbuild.yaml passes it): the original's creator
# is its image, "Tool: gcr.io/cos-cloud/cos-customizer" (sbomutil.go).
STEP_IMAGE_ENV = "COS_CUSTOMIZER_STEP_IMAGE"
# SPDX's own example form of a namespace, https://spdx.org/spdxdocs/NAME-UUID.
NAMESPACE_BASE = "https://spdx.org/spdxdocs/"


def creator_tool(environ: Mapping[str, str]) -> str:
    """The tool among the creators: the step image when it names itself, else the package and its version."""
    image = environ.get(STEP_IMAGE_ENV, "")
    return f"Tool: {image}" if image else f"Tool: cos-customizer-{__version__}"


def _split(value: str, what: str, kinds: str) -> str:
    kind, sep, name = value.partition(": ")
    if not sep or not kind or not name:
        raise ValidationError(f'SBOM input: invalid {what} "{value}": write it as "{kinds}: name"')
    return value


def load_input(archive: Path, path: str) -> dict[str, Any]:
    """The SBOM input from the build context, checked before the build starts."""
    name = buildcontext.normalize_member(path, "-sbom-input-path")
    member = buildcontext.find_member(archive, name)
    if member is None or not member.isfile():
        raise ValidationError(f"-sbom-input-path={path}: not found in the build context")
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        try:
            data = json.loads(handle.read())
        except json.JSONDecodeError as err:
            raise ValidationError(f"-sbom-input-path={path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict) or not isinstance(data.get("creators"), list) or not data["creators"]:
        raise ValidationError(f'-sbom-input-path={path}: "creators" is required (a list like ["Organization: X"])')
    for creator in data["creators"]:
        _split(str(creator), "creator", "Person/Organization/Tool")
    if data.get("supplier"):
        _split(str(data["supplier"]), "supplier", "Person/Organization")
    return data


def check_output_path(path: str) -> None:
    if not path.startswith("gs://") or len(path) <= len("gs://"):
        raise ValidationError(f"-sbom-output-path={path}: give a GCS directory such as gs://bucket/sboms")


def generate(data: dict[str, Any], image_name: str, now: datetime.datetime, tool: str) -> tuple[str, dict[str, Any]]:
    """(document name, document) for the output image `image_name`, valid SPDX 2.2 (`pyspdxtools`).

    The namespace ends in a UUID made from the document itself: two builds differ in it (their `created`
    differs), and a reproducible build (SOURCE_DATE_EPOCH) writes the same bytes again.
    """
    name = data.get("outputImageName") or image_name
    version = data.get("outputImageVersion", "") if data.get("outputImageName") else ""
    document_name = f"{name}-{version}_{SUFFIX}" if version else f"{name}_{SUFFIX}"
    root_id = f"SPDXRef-{name}"
    root = {
        "name": name,
        "SPDXID": root_id,
        "versionInfo": version or "0",
        "filesAnalyzed": False,
        "supplier": data.get("supplier") or NOASSERTION,
        "downloadLocation": NOASSERTION,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
    }
    packages = [root]
    relationships = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relatedSpdxElement": root_id, "relationshipType": "DESCRIBES"}
    ]
    for package in data.get("SPDXPackages") or []:
        filled = {"downloadLocation": NOASSERTION, "supplier": NOASSERTION, "licenseConcluded": NOASSERTION,
                  "licenseDeclared": NOASSERTION, "copyrightText": NOASSERTION, **package}  # fmt: skip
        packages.append(filled)
        relationships.append({"spdxElementId": root_id, "relatedSpdxElement": package["SPDXID"],
                              "relationshipType": "CONTAINS"})  # fmt: skip
    external = []
    for ref in data.get("SBOMPackages") or []:
        ref_id = f"DocumentRef-{ref['name']}"
        checksum = {"algorithm": ref["algorithm"], "checksumValue": ref["checksumValue"]}
        external.append({"externalDocumentId": ref_id, "spdxDocument": ref["spdxDocument"], "checksum": checksum})
        relationships.append({"spdxElementId": root_id, "relatedSpdxElement": f"{ref_id}:SPDXRef-DOCUMENT",
                              "relationshipType": "CONTAINS"})  # fmt: skip
    document: dict[str, Any] = {
        "spdxVersion": "SPDX-2.2",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": document_name,
        "documentNamespace": "",
        "creationInfo": {"created": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "creators": [tool, *data["creators"]]},
        "packages": packages,
        "relationships": relationships,
    }
    if external:
        document["externalDocumentRefs"] = external
    if data.get("hasExtractedLicensingInfos"):
        document["hasExtractedLicensingInfos"] = data["hasExtractedLicensingInfos"]
    content = json.dumps(document, sort_keys=True, separators=(",", ":"))
    unique = uuid.uuid5(uuid.NAMESPACE_URL, NAMESPACE_BASE + content)
    document["documentNamespace"] = f"{NAMESPACE_BASE}{document_name.removesuffix('.json')}-{unique}"
    return document_name, document


def write_local(data: dict[str, Any], output: Path, tool: str, epoch: int | None = None) -> Path:
    """The SPDX document of a local build, beside its output (the output file's name without its format
    suffix names the image when the input does not), written atomically; created at `epoch` when set."""
    image_name = output.name
    for suffix in (".tar.gz", ".qcow2", ".raw"):
        image_name = image_name.removesuffix(suffix)
    now = datetime.datetime.now(datetime.UTC) if epoch is None else datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    name, document = generate(data, image_name, now, tool)
    path = output.parent / name
    workspace.write_json_atomic(path, document)
    return path
