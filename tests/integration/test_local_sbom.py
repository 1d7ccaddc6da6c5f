"""The SBOM of a local build: `-sbom-input-path` (a JSON file of the build context, the original's input
schema) gives an SPDX 2.2 document beside the output, the same document a GCE build uploads
(tests/unit/test_gce_build.py checks that one).

Oracles: the input the test wrote, and the SPDX 2.2 fields the original fills; the document is read back
with json from the file system.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from cos_customizer import privilege
from tests import spdx
from tests.conftest import CLI
from tests.unit.test_gce_build import SBOM_INPUT, check_sbom_document

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="a local build needs root (loop devices, mounts)"),
]


def start(cli: CLI, context_dir: Path, image_file: Path, data: Mapping[str, object]) -> None:
    (context_dir / "sbom.json").write_text(json.dumps(data))
    for argv in (["start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}"],
                 ["run-script", "-script=preload.sh"]):  # fmt: skip
        result = cli(*argv)
        assert result.code == 0, result.err


def test_a_local_build_writes_its_sbom_beside_the_output(
    cli: CLI, context_dir: Path, image_file: Path, tmp_path: Path
) -> None:
    start(cli, context_dir, image_file, SBOM_INPUT)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("finish-image-build", f"-output={out / 'custom.tar.gz'}", "-sbom-input-path=sbom.json")
    assert result.code == 0, result.err
    path = out / "custom-image-1.2.3_sbom.spdx.json"
    assert result.out.endswith(f"SBOM: {path}\n")
    assert sorted(p.name for p in out.iterdir()) == ["custom-image-1.2.3_sbom.spdx.json", "custom.tar.gz"]
    document = json.loads(path.read_text())
    check_sbom_document(document)  # the same document a GCE build uploads
    assert document["dataLicense"] == "CC0-1.0"
    package = document["packages"][1]
    assert package["name"] == "pkg-a" and package["downloadLocation"] == "NOASSERTION"
    assert document["externalDocumentRefs"][0]["spdxDocument"] == "https://example.com/base.spdx.json"


def test_without_a_name_in_the_input_the_output_file_names_the_image(
    cli: CLI, context_dir: Path, image_file: Path, tmp_path: Path
) -> None:
    start(cli, context_dir, image_file, {"creators": ["Person: Someone"]})
    result = cli("finish-image-build", f"-output={tmp_path / 'fleet-node.raw'}", "-sbom-input-path=sbom.json")
    assert result.code == 0, result.err
    document = json.loads((tmp_path / "fleet-node_sbom.spdx.json").read_text())
    spdx.check_valid(document)
    assert document["packages"][0]["name"] == "fleet-node"
    assert document["packages"][0]["versionInfo"] == "0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-sbom-input-path=missing.json"], "-sbom-input-path=missing.json: not found in the build context"),
        (["-sbom-input-path=sbom.json", "-sbom-output-path=gs://b/s"],
         "-sbom-output-path applies to GCE builds only; this build was started with -image-file, so it runs with "
         "the local executor"),
        (["-sbom-input-path=sbom.json", "-executor=qemu"],
         "-sbom-input-path: a rehearsal writes no SBOM; the local executor and GCE builds do"),
    ],
)  # fmt: skip
def test_refused_before_the_build(
    cli: CLI, context_dir: Path, image_file: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    start(cli, context_dir, image_file, SBOM_INPUT)
    result = cli("finish-image-build", f"-output={tmp_path / 'o.raw'}", "-dry-run", *flags)
    assert result.code == 1
    assert result.err == f"cos-customizer: error: {message}\n"
    assert not (tmp_path / "o.raw").exists()
