"""The GCE executor end to end against stand-ins: gcp-storage-emulator, a Compute stand-in, a daisy stand-in.

Nothing here reaches Google: Compute and GCS are loopback servers started by the tests.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cos_customizer.errors import BuildFailed
from cos_customizer.executors import failed_step, workflow
from cos_customizer.executors.gce import preload
from cos_customizer.provisioner.config import DisableAutoUpdateArgs, ProvisionerConfig, RunScriptArgs
from tests import go_provisioner_config, spdx
from tests.compute_standin import Compute
from tests.conftest import CLI

STANDIN = Path(__file__).parents[1] / "daisy_standin.py"
BUCKET = "builds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[attr-defined]

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    client = storage.Client(project="test", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    yield client
    server.stop()


@pytest.fixture
def daisy(tmp_path: Path) -> tuple[Path, Path]:
    """A daisy executable (the stand-in) and the file it records to."""
    wrapper = tmp_path / "daisy"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, tmp_path / "daisy-record.json"


@pytest.fixture
def started(cli: CLI, context_dir: Path, tmp_path: Path) -> CLI:
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("installer")
    steps = [
        ["start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud", "-image-family=cos-stable",
         f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7"],
        ["run-script", "-script=preload.sh"],
        ["install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}"],
        ["seal-oem"],
    ]  # fmt: skip
    for argv in steps:
        result = cli(*argv)
        assert result.code == 0, result.err
    return cli


def finish(cli: CLI, daisy: tuple[Path, Path], tmp_path: Path, *extra: str, **env: str) -> Any:
    binary = tmp_path / "provisioner-binary"
    binary.write_bytes(b"\x7fELF stand-in provisioner")
    environ = {"COS_CUSTOMIZER_DAISY": str(daisy[0]), "DAISY_STANDIN_RECORD": str(daisy[1]),
               "DAISY_STANDIN_INSPECT": "1", "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"], **env}  # fmt: skip
    return cli("finish-image-build", "-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj",
               "-image-name=custom-1", "-image-family=custom", "-oem-size=1G", "-disk-size-gb=13",
               f"-provisioner-binary={binary}", *extra, env=environ)  # fmt: skip


# The original's managed directory (src/pkg/preloader/gcs.go: WORKDIR joined with "cos-customizer").
MANAGED = "build-7/cos-customizer/"
# What the user keeps under the same workdir: beside the managed directory, and under look-alike names.
USER_OBJECTS = ("build-7/mine.txt", "build-7/cos-customizer-other/keep", "build-7/cos-customizerx", "build-70/x",
                "build-7/sub/cos-customizer/y")  # fmt: skip


def managed(gcs: Any) -> list[str]:
    return sorted(blob.name for blob in gcs.list_blobs(BUCKET, prefix=MANAGED))


def put_user_objects(gcs: Any) -> None:
    for name in USER_OBJECTS:
        gcs.bucket(BUCKET).blob(name).upload_from_string(f"the user's {name}")


def user_objects(gcs: Any) -> dict[str, str]:
    return {name: gcs.bucket(BUCKET).blob(name).download_as_text() for name in USER_OBJECTS
            if gcs.bucket(BUCKET).blob(name).exists()}  # fmt: skip


def test_end_to_end(started: CLI, gcs: Any, compute: Compute, daisy: tuple[Path, Path], tmp_path: Path,
                    workspace_root: Path) -> None:  # fmt: skip
    compute.add_image("my-proj", "custom-0", family="custom", created="2024-01-01T00:00:00Z")
    result = finish(started, daisy, tmp_path, "-labels=team=os,milestone=override", "-inherit-labels",
                    "-deprecate-old-images", "-old-image-ttl=3600")  # fmt: skip
    assert result.code == 0, result.err
    assert result.out == "Build succeeded: image my-proj/custom-1\n"
    assert 'daisy: [build-image]: Step "wait-preload-finished"' in result.err
    record = json.loads(daisy[1].read_text())
    assert record["problems"] == []
    seen = record["inspected"]
    # The uploads were there while daisy ran, and the managed directory is gone now.
    assert seen["gcs_objects"] == [
        "build-7/cos-customizer/gcs_files/NVIDIA-Linux-x86_64-450.51.06.run",
        "build-7/cos-customizer/user_build_context.tar",
    ]
    assert managed(gcs) == []
    # The CIDATA disk: a FAT labelled CIDATA with the provisioner and its final config.
    assert seen["cidata_members"] == ["disk.raw"]
    assert seen["cidata_files"] == ["config.json", "meta-data", "provisioner", "user-data"]
    # The original's CIDATA also holds cloud-init's NoCloud pair: the startup cloud-config and an empty meta-data.
    assert seen["cidata_user-data"] == seen["cloud_config"]
    assert seen["cidata_user-data"].startswith("#cloud-config\n")
    assert seen["cidata_meta-data"] == ""
    assert "CIDATA" in seen["cidata_label"]
    config = seen["cidata_config"]
    assert config["BuildContexts"] == {"user": "gs://builds/build-7/cos-customizer/user_build_context.tar"}
    assert config["BootDisk"] == {
        "OEMSize": "2047M",
        "OEMFSSize4K": 262144,
        "ReclaimSDA3": True,
        "WaitForDiskResize": True,
    }
    gpu = next(step for step in config["Steps"] if step["Type"] == "InstallGPU")
    assert gpu["Args"]["GCSDepsPrefix"] == "gs://builds/build-7/cos-customizer/gcs_files"
    # The original's provisioner reads this config too (its Go types): Env is its comma string.
    as_go = go_provisioner_config.read_config(json.dumps(config))
    assert [step["Type"] for step in as_go["Steps"]] == ["RunScript", "InstallGPU", "SealOEM"]
    assert as_go["Steps"][0]["Args"] == {"BuildContext": "user", "Path": "preload.sh", "Env": ""}
    # Workflow: labels inherited from the source, -labels wins; a scratch disk for install-gpu; the resize.
    workflow = record["workflow"]
    assert workflow["Steps"]["image"]["CreateImages"][0]["labels"] == {"milestone": "override", "team": "os"}
    assert workflow["Steps"]["setup"]["CreateDisks"][0]["Name"] == "scratch-disk"
    assert workflow["Steps"]["resize-disk"] == {"ResizeDisks": [{"Name": "boot-disk", "SizeGb": "13"}]}
    assert record["vars"]["source_image"] == "projects/cos-cloud/global/images/cos-stable-109-17800-66-0"
    assert record["vars"]["host_maintenance"] == "TERMINATE"
    assert record["flags"]["-gcs_path"] == "gs://builds/build-7/cos-customizer"
    # One -compute-endpoint value, the original's API base: the client reached the stand-in through it, and
    # daisy gets the original's override, path.Join(base, "projects") + "/" (preload.go).
    assert record["flags"]["-compute_endpoint_override"] == f"{compute.url}/compute/v1/projects/"
    # Deprecation of the older family member, with the TTL; the workspace is removed.
    deprecated = compute.images["my-proj"]["custom-0"]["deprecated"]
    assert deprecated["state"] == "DEPRECATED"
    assert deprecated["replacement"] == "projects/my-proj/global/images/custom-1"
    assert deprecated["deleted"].endswith("Z")
    assert not workspace_root.exists()


def test_failing_daisy(started: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path) -> None:
    result = finish(started, daisy, tmp_path, DAISY_STANDIN_FAIL="1")
    assert result.code == 1
    assert result.err.endswith(
        "cos-customizer: error: daisy failed with exit status 1 (its output is above); "
        "daisy deleted the resources it made\n"
    )
    assert (
        'daisy: [build-image]: Step "wait-preload-finished" (WaitForInstancesSignal): BuildFailed: boom' in result.err
    )
    assert managed(gcs) == []


def test_output_exists_is_success_without_building(started: CLI, gcs: Any, compute: Compute, daisy: tuple[Path, Path],
                                                  tmp_path: Path) -> None:  # fmt: skip
    compute.add_image("my-proj", "custom-1")
    result = finish(started, daisy, tmp_path)
    assert result.code == 0, result.err
    assert "Result image custom-1 already exists in project my-proj. Exiting." in result.err
    assert not daisy[1].exists()
    assert managed(gcs) == []


def test_enable_cleanup_deletes_old_preload_vms(started: CLI, gcs: Any, compute: Compute, daisy: tuple[Path, Path],
                                               tmp_path: Path) -> None:  # fmt: skip
    compute.add_instance("my-proj", "us-west1-b", "old-vm", {"cos-customizer-cleanup": ""}, "2020-01-01T00:00:00+00:00")
    compute.add_instance("my-proj", "us-west1-b", "new-vm", {"cos-customizer-cleanup": ""}, "2999-01-01T00:00:00+00:00")
    compute.add_instance("my-proj", "us-west1-b", "other", {}, "2020-01-01T00:00:00+00:00")
    result = finish(started, daisy, tmp_path, "-enable-cleanup")
    assert result.code == 0, result.err
    assert sorted(compute.instances["my-proj/us-west1-b"]) == ["new-vm", "other"]


def test_missing_daisy_is_refused_before_anything(started: CLI, gcs: Any, tmp_path: Path, workspace_root: Path) -> None:
    result = finish(started, (tmp_path / "no-daisy", tmp_path / "r.json"), tmp_path)
    assert result.code == 1
    assert f"$COS_CUSTOMIZER_DAISY={tmp_path / 'no-daisy'} is not an executable file" in result.err
    assert workspace_root.exists()
    assert managed(gcs) == []


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (["-image-name=cos-stable-109-17800-66-0"], "cos-stable-109-17800-66-0"),
        (["-image-family=cos-stable"], "cos-stable-109-17800-66-0"),
        (["-image-milestone=109"], "cos-stable-109-17800-66-0"),
    ],
)
def test_source_resolution(cli: CLI, context_dir: Path, workspace_root: Path, flags: list[str], name: str) -> None:
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud", "-gcs-bucket=b",
                 "-gcs-workdir=w", *flags)  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads((workspace_root / "config/source_image").read_text())["name"] == name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-image-name=nope"], "could not find source image nope in project cos-cloud"),
        (["-image-family=nope"], "image family nope in project cos-cloud: not found"),
        (["-image-milestone=42"], "no image found on milestone 42 in cos-cloud"),
    ],
)
def test_source_resolution_refusals(cli: CLI, context_dir: Path, workspace_root: Path, flags: list[str],
                                    message: str) -> None:  # fmt: skip
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud", "-gcs-bucket=b",
                 "-gcs-workdir=w", *flags)  # fmt: skip
    assert result.code == 1
    assert message in result.err
    assert not workspace_root.exists()


SBOM_INPUT = {
    "outputImageName": "custom-image",
    "outputImageVersion": "1.2.3",
    "creators": ["Organization: Example Inc"],
    "supplier": "Organization: Example Inc",
    "SPDXPackages": [{"name": "pkg-a", "SPDXID": "SPDXRef-pkg-a", "versionInfo": "4.5", "filesAnalyzed": False}],
    "SBOMPackages": [{"name": "base", "spdxDocument": "https://example.com/base.spdx.json", "algorithm": "SHA1",
                      "checksumValue": "11d7774ac38f40e009dcee453a760750aea75bbd"}],
    "hasExtractedLicensingInfos": [{"licenseId": "LicenseRef-A", "extractedText": "text"}],
}  # fmt: skip


def check_sbom_document(document: dict[str, Any], tool: str | None = None) -> None:
    """The SPDX document of SBOM_INPUT, as a GCE and a local build write it: valid SPDX 2.2 by the stock
    validator, with the tool first among the creators (the original's form, "Tool: IMAGE", in a step image)."""
    spdx.check_valid(document)
    assert document["spdxVersion"] == "SPDX-2.2" and document["SPDXID"] == "SPDXRef-DOCUMENT"
    assert document["name"] == "custom-image-1.2.3_sbom.spdx.json"
    tool = tool or f"Tool: cos-customizer-{importlib.metadata.version('cos-customizer')}"
    assert document["creationInfo"]["creators"] == [tool, "Organization: Example Inc"]
    assert document["documentNamespace"].startswith("https://spdx.org/spdxdocs/custom-image-1.2.3_sbom.spdx-")
    root, package = document["packages"]
    assert (root["name"], root["versionInfo"], root["supplier"]) == (
        "custom-image",
        "1.2.3",
        "Organization: Example Inc",
    )
    assert package["downloadLocation"] == "NOASSERTION" and package["versionInfo"] == "4.5"
    assert {"spdxElementId": "SPDXRef-DOCUMENT", "relatedSpdxElement": "SPDXRef-custom-image",
            "relationshipType": "DESCRIBES"} in document["relationships"]  # fmt: skip
    assert {"spdxElementId": "SPDXRef-custom-image", "relatedSpdxElement": "SPDXRef-pkg-a",
            "relationshipType": "CONTAINS"} in document["relationships"]  # fmt: skip
    assert document["externalDocumentRefs"][0]["externalDocumentId"] == "DocumentRef-base"
    assert document["hasExtractedLicensingInfos"] == SBOM_INPUT["hasExtractedLicensingInfos"]


def test_sbom_written_to_gcs(cli: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path, context_dir: Path) -> None:
    (context_dir / "sbom.json").write_text(json.dumps(SBOM_INPUT))
    for argv in (["start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                  "-image-name=cos-stable-109-17800-66-0", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7"],
                 ["run-script", "-script=preload.sh"]):  # fmt: skip
        assert cli(*argv).code == 0
    image = "us-docker.pkg.dev/my-proj/cos-customizer/cos-customizer"  # as deploy/cloudbuild.yaml names it
    result = finish(cli, daisy, tmp_path, "-sbom-input-path=sbom.json", f"-sbom-output-path=gs://{BUCKET}/sboms",
                    COS_CUSTOMIZER_STEP_IMAGE=image)  # fmt: skip
    assert result.code == 0, result.err
    blob = gcs.bucket(BUCKET).blob("sboms/custom-image-1.2.3_sbom.spdx.json")
    document = json.loads(blob.download_as_text())
    check_sbom_document(document, tool=f"Tool: {image}")


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        (None, ["-sbom-input-path=missing.json", "-sbom-output-path=gs://b/s"], "-sbom-input-path=missing.json: not found in the build context"),
        ("{", ["-sbom-input-path=sbom.json", "-sbom-output-path=gs://b/s"], "-sbom-input-path=sbom.json: not valid JSON"),
        ('{"creators": []}', ["-sbom-input-path=sbom.json", "-sbom-output-path=gs://b/s"], '"creators" is required'),
        ('{"creators": ["Example"]}', ["-sbom-input-path=sbom.json", "-sbom-output-path=gs://b/s"],
         'SBOM input: invalid creator "Example": write it as "Person/Organization/Tool: name"'),
        ('{"creators": ["Tool: x"]}', ["-sbom-input-path=sbom.json", "-sbom-output-path=/tmp/s"],
         "-sbom-output-path=/tmp/s: give a GCS directory such as gs://bucket/sboms"),
    ],
)  # fmt: skip
def test_sbom_refusals(cli: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path, context_dir: Path,
                       workspace_root: Path, content: str | None, flags: list[str], message: str) -> None:  # fmt: skip
    if content is not None:
        (context_dir / "sbom.json").write_text(content)
    for argv in (["start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                  "-image-name=cos-stable-109-17800-66-0", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7"],):  # fmt: skip
        assert cli(*argv).code == 0
    result = finish(cli, daisy, tmp_path, *flags)
    assert result.code in (1, 2)
    assert message in result.err
    assert not daisy[1].exists()
    assert workspace_root.exists()


# -timeout is the original's: daisy's -default_timeout, each step's limit, which daisy enforces and cleans up
# after (the original's own timeout test greps the build log for daisy's words).


def test_daisy_gets_the_timeout_and_its_own_timeout_fires_first(
    started: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path
) -> None:
    result = finish(started, daisy, tmp_path, "-timeout=1s", DAISY_STANDIN_STEPS="30")
    assert result.code == 1
    assert json.loads(daisy[1].read_text())["flags"]["-default_timeout"] == "1s"
    assert 'step "step-0" did not complete within the specified timeout of 1s' in result.err
    assert "cleaning up after an interrupt" not in result.err  # daisy's timeout, not ours, ended it
    assert result.err.endswith(
        "cos-customizer: error: a workflow step did not complete within -timeout, daisy's -default_timeout for "
        "each step (its words are above); daisy deleted the resources it made\n"
    )
    assert managed(gcs) == []


def test_steps_that_each_fit_the_timeout_succeed_however_long_together(
    started: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path
) -> None:
    result = finish(started, daisy, tmp_path, "-timeout=1s", DAISY_STANDIN_STEPS="0.7,0.7,0.7")
    assert result.code == 0, result.err
    assert result.out == "Build succeeded: image my-proj/custom-1\n"


def test_our_own_bound_stops_a_daisy_that_never_returns_and_lets_it_clean_up(tmp_path: Path) -> None:
    daisy = tmp_path / "daisy"
    daisy.write_text(f"#!{sys.executable}\nimport signal, sys, time\n"
                     "signal.signal(signal.SIGINT, lambda *_: sys.exit(print('cleaning up after an interrupt')))\n"
                     "time.sleep(60)\n")  # fmt: skip
    daisy.chmod(0o755)
    with pytest.raises(BuildFailed) as failed:
        preload.run_daisy([str(daisy)], workflow.RunBound(1.0, "a test's bound"))
    assert str(failed.value) == (
        "daisy ran past cos-customizer's own bound of 1s (a test's bound); daisy was stopped and cleaned up"
    )


def test_our_bound_lies_past_every_step_at_its_limit() -> None:
    document = {"Steps": {"a": {}, "b": {"Timeout": "2h"}, "c": {}}}
    bound = workflow.run_bound(document, "1h0m0s")
    assert bound.seconds > 4 * 3600  # a, c at -timeout, b at its own
    assert bound.why == (
        "the workflow's 3 steps one after another, each at its limit (-timeout=1h0m0s), plus 10m0s; daisy's own "
        "timeout fires first"
    )


# -- arm64 sources: the architecture comes from Compute (else the name); CIDATA gets that architecture's
# provisioner, the machine type defaults to one Compute has for it, a -provisioner-binary for another is refused.

EM_X86_64, EM_AARCH64 = 62, 183  # the ELF specification's e_machine numbers (oracle: not our constants)
ARM64_SOURCES = [("cos-cloud", "cos-arm64-stable-109-17800-66-0"), ("my-proj", "my-arm")]


def elf_file(path: Path, machine: int) -> Path:
    """An executable that starts with a 64-bit little-endian ELF header for `machine`."""
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"  # ELFCLASS64, ELFDATA2LSB, EV_CURRENT
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header) + b"provisioner stand-in")
    path.chmod(0o755)
    return path


def e_machine(data: bytes) -> int:
    assert data[:6] == b"\x7fELF\x02\x01", data[:6]
    return int.from_bytes(data[18:20], "little")


def start_from(cli: CLI, compute: Compute, context_dir: Path, project: str, name: str, architecture: str) -> None:
    compute.add_image(project, name, architecture=architecture)
    start = cli("start-image-build", f"-build-context={context_dir}", f"-image-project={project}",
                f"-image-name={name}", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7")  # fmt: skip
    assert start.code == 0, start.err


FINISH_OUT = ["finish-image-build", "-zone=us-central1-a", "-project=my-proj", "-image-project=my-proj",
              "-image-name=out"]  # fmt: skip


def test_an_arm64_dry_run_names_the_architecture_its_provisioner_and_an_arm64_machine_type(
    cli: CLI, compute: Compute, context_dir: Path, tmp_path: Path, workspace_root: Path
) -> None:  # fmt: skip
    """Compute's `architecture` decides, not the name: `my-arm` says nothing of arm64."""
    start_from(cli, compute, context_dir, "my-proj", "my-arm", "ARM64")
    dry = cli(*FINISH_OUT, "-dry-run")
    assert dry.code == 0, dry.err
    plan = json.loads(dry.out)
    assert plan["architecture"] == {"arch": "arm64", "gce": "ARM64", "from": "Compute: architecture ARM64"}
    assert plan["build_config"]["MachineType"] == "t2a-standard-1"
    args = plan["daisy_args"]
    assert args[args.index("-var:machine_type") + 1] == "t2a-standard-1"
    built = "build-provisioner's executable for arm64 (built at build time, or from its cache)"
    assert plan["cidata_provisioner"] == built
    assert "  arch:      arm64 (aarch64; Compute: architecture ARM64)\n" in dry.err
    assert "  build in:  project my-proj, zone us-central1-a, t2a-standard-1\n" in dry.err
    assert f"  CIDATA:    {built}\n" in dry.err
    # A given -machine-type is kept; a -provisioner-binary for arm64 is named.
    binary = elf_file(tmp_path / "provisioner-arm64", EM_AARCH64)
    given = cli(*FINISH_OUT, "-machine-type=c4a-standard-2", f"-provisioner-binary={binary}", "-dry-run")
    assert given.code == 0, given.err
    plan = json.loads(given.out)
    assert plan["build_config"]["MachineType"] == "c4a-standard-2"
    assert plan["cidata_provisioner"] == f"{binary} (-provisioner-binary)"
    assert f"  CIDATA:    {binary} (-provisioner-binary)\n" in given.err
    # -machine-type= (an empty substitution) is no -machine-type, as in the original: the arm64 default.
    empty = cli(*FINISH_OUT, "-machine-type=", "-dry-run")
    assert json.loads(empty.out)["build_config"]["MachineType"] == "t2a-standard-1"
    assert workspace_root.exists()


@pytest.mark.parametrize(
    ("architecture", "name", "endpoint", "arch", "said"),
    [
        ("", "cos-arm64-stable-109-17800-66-0", None, "arm64",
         "the name says arm64; Compute gives no architecture (none)"),
        ("", "my-arm", None, "amd64",
         "Compute gives no architecture (none); x86-64, as Compute takes an image that does not say"),
        ("X86_64", "cos-arm64-stable-109-17800-66-0", None, "amd64", "Compute: architecture X86_64"),
        ("ARM64", "cos-arm64-stable-109-17800-66-0", "http://127.0.0.1:9/compute/v1/", "arm64",
         "the name says arm64; Compute could not be asked: image cos-arm64-stable-109-17800-66-0 in project "
         "cos-cloud: Compute Engine did not answer (ConnectionError)"),
    ],
)  # fmt: skip
def test_the_name_decides_only_when_compute_says_nothing(
    cli: CLI, compute: Compute, context_dir: Path, architecture: str, name: str, endpoint: str | None, arch: str,
    said: str,
) -> None:  # fmt: skip
    start_from(cli, compute, context_dir, "cos-cloud", name, architecture)
    dry = cli(*FINISH_OUT, "-dry-run", env={"COS_CUSTOMIZER_COMPUTE_ENDPOINT": endpoint} if endpoint else None)
    assert dry.code == 0, dry.err
    plan = json.loads(dry.out)
    assert plan["architecture"]["arch"] == arch
    assert plan["architecture"]["from"] == said
    assert plan["build_config"]["MachineType"] == {"arm64": "t2a-standard-1", "amd64": "n1-standard-1"}[arch]


def test_a_build_that_cannot_ask_compute_is_refused_with_one_line(
    cli: CLI, compute: Compute, context_dir: Path, daisy: tuple[Path, Path], workspace_root: Path
) -> None:  # fmt: skip
    start_from(cli, compute, context_dir, "my-proj", "my-arm", "ARM64")
    environ = {
        "COS_CUSTOMIZER_DAISY": str(daisy[0]),
        "COS_CUSTOMIZER_COMPUTE_ENDPOINT": "http://127.0.0.1:9/compute/v1/",
    }
    result = cli(*FINISH_OUT, env=environ)
    assert (result.code, result.err) == (1, "cos-customizer: error: image my-arm in project my-proj: Compute Engine "
                                            "did not answer (ConnectionError)\n")  # fmt: skip
    assert not daisy[1].exists()
    assert workspace_root.exists()


def keeping_cidata(daisy: tuple[Path, Path], kept: Path) -> tuple[Path, Path]:
    """The daisy stand-in behind a wrapper that first copies the CIDATA archive it is given to `kept`."""
    wrapper = daisy[0].with_name("daisy-keeping-cidata")
    wrapper.write_text(
        "#!/bin/sh\nprev=\n"
        f'for arg in "$@"; do [ "$prev" = -var:cidata_img ] && cp "$arg" {kept}; prev=$arg; done\n'
        f'exec {daisy[0]} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper, daisy[1]


def cidata_provisioner(archive: Path, tmp: Path) -> tuple[list[str], bytes]:
    """The files of the CIDATA disk in `archive` (mdir) and its /provisioner's bytes (mcopy)."""
    import subprocess
    import tarfile

    tmp.mkdir()
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["disk.raw"]
        member = tar.extractfile("disk.raw")
        assert member is not None
        (tmp / "disk.raw").write_bytes(member.read())
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(["mdir", "-b", "-i", str(tmp / "disk.raw"), "::/"], capture_output=True, text=True,
                             env=env, check=True)  # fmt: skip
    files = sorted(line.strip().removeprefix("::/") for line in listing.stdout.splitlines() if line.strip())
    subprocess.run(["mcopy", "-n", "-i", str(tmp / "disk.raw"), "::/provisioner", str(tmp / "provisioner")],
                   env=env, check=True)  # fmt: skip
    return files, (tmp / "provisioner").read_bytes()


@pytest.mark.parametrize(
    ("architecture", "machine", "machine_type"),
    [("ARM64", EM_AARCH64, "t2a-standard-1"), ("X86_64", EM_X86_64, "n1-standard-1")],
)
@pytest.mark.parametrize("how", ["binary", "prebuilt", "built"])
def test_cidata_carries_the_sources_provisioner_and_the_machine_type_is_one_for_it(
    cli: CLI, compute: Compute, gcs: Any, daisy: tuple[Path, Path], context_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, architecture: str, machine: int, machine_type: str, how: str,
) -> None:  # fmt: skip
    from cos_customizer import provisioner_build
    from cos_customizer.arch import Arch

    start_from(cli, compute, context_dir, "my-proj", "my-source", architecture)
    kept = tmp_path / "cidata-kept.tar.gz"
    wrapper, record = keeping_cidata(daisy, kept)
    environ = {"COS_CUSTOMIZER_DAISY": str(wrapper), "DAISY_STANDIN_RECORD": str(record),
               "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}  # fmt: skip
    extra = []
    if how == "binary":
        extra.append(f"-provisioner-binary={elf_file(tmp_path / 'given', machine)}")
    elif how == "prebuilt":  # the step image's, for the source's architecture, with its manifest
        arch = Arch.parse(architecture)
        (tmp_path / "prebuilt").mkdir()
        binary = elf_file(tmp_path / "prebuilt" / "provisioner", machine)
        document = provisioner_build.manifest(binary, arch=arch)
        provisioner_build.manifest_path(binary).write_text(json.dumps(document))
        environ[provisioner_build.prebuilt_location(arch)[0]] = str(binary)
    else:  # no provisioner given or prebuilt: the build makes one for the source (not here: a stand-in)
        asked: list[Arch] = []

        def build(output: Path, _environ: dict[str, str], *, arch: Arch = Arch.AMD64) -> tuple[Path, bool]:
            asked.append(arch)
            elf_file(output, machine)
            return output, True

        monkeypatch.setattr(provisioner_build, "build", build)
        monkeypatch.setattr(provisioner_build, "prebuilt_location", lambda arch: ("UNSET", tmp_path / "none"))
    result = cli(*FINISH_OUT, *extra, env=environ)
    assert result.code == 0, result.err
    files, provisioner = cidata_provisioner(kept, tmp_path / "cidata")
    assert files == ["config.json", "meta-data", "provisioner", "user-data"]
    assert e_machine(provisioner) == machine
    assert json.loads(record.read_text())["vars"]["machine_type"] == machine_type
    if how == "built":
        assert asked == [Arch.parse(architecture)]
    # A given -machine-type is kept, whatever the architecture (the workspace is gone: start again).
    start_from(cli, compute, context_dir, "my-proj", "my-source", architecture)
    given = cli(*FINISH_OUT, *extra, "-machine-type=e2-custom-4-8192", env=environ)
    assert given.code == 0, given.err
    assert json.loads(record.read_text())["vars"]["machine_type"] == "e2-custom-4-8192"


@pytest.mark.parametrize(("project", "name"), ARM64_SOURCES)
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_provisioner_binary_for_another_machine_is_refused_with_one_line_before_anything(
    cli: CLI, compute: Compute, gcs: Any, daisy: tuple[Path, Path], context_dir: Path, tmp_path: Path,
    workspace_root: Path, project: str, name: str, dry_run: bool,
) -> None:  # fmt: skip
    start_from(cli, compute, context_dir, project, name, "ARM64")
    binary = elf_file(tmp_path / "provisioner-x86", EM_X86_64)
    environ = {"COS_CUSTOMIZER_DAISY": str(daisy[0]), "DAISY_STANDIN_RECORD": str(daisy[1]),
               "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}  # fmt: skip
    result = cli(*FINISH_OUT, f"-provisioner-binary={binary}", *(["-dry-run"] if dry_run else []), env=environ)
    assert result.code == 1
    assert result.err.startswith(f"cos-customizer: error: -provisioner-binary={binary} ")
    assert result.err.count("\n") == 1 and result.err.endswith("\n")  # one line, and nothing before it
    assert "arm64" in result.err
    assert not daisy[1].exists()
    assert list(gcs.list_blobs(BUCKET)) == []  # nothing was uploaded
    assert workspace_root.exists()


@pytest.mark.parametrize("fail", [False, True])
def test_only_the_managed_directory_is_deleted(started: CLI, gcs: Any, daisy: tuple[Path, Path], tmp_path: Path,
                                             fail: bool) -> None:  # fmt: skip
    """The user's objects under the same workdir survive a build, successful or not; ours are all gone."""
    put_user_objects(gcs)
    gcs.bucket(BUCKET).blob(MANAGED + "left-by-an-earlier-build").upload_from_string("ours")
    result = finish(started, daisy, tmp_path, **({"DAISY_STANDIN_FAIL": "1"} if fail else {}))
    assert result.code == (1 if fail else 0), result.err
    assert user_objects(gcs) == {name: f"the user's {name}" for name in USER_OBJECTS}
    assert managed(gcs) == []


def test_a_host_only_compute_endpoint_is_refused_with_one_line(cli: CLI, context_dir: Path, compute: Compute) -> None:
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                 "-image-family=cos-stable", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7",
                 env={"COS_CUSTOMIZER_COMPUTE_ENDPOINT": compute.url})  # fmt: skip
    assert (result.code, result.err) == (1, (
        f"cos-customizer: error: -compute-endpoint={compute.url}: give the Compute API's base URL, ending in "
        "/compute/v1/ (for example http://127.0.0.1:8080/compute/v1/), as the original takes it\n"
    ))  # fmt: skip
    assert compute.requests == []


# The original's TestResolveMilestone cases (src/pkg/gce/gce_test.go), and names its imageNameRegex reads or not.
@pytest.mark.parametrize(
    ("names", "milestone", "expected"),
    [
        (["cos-dev-68-10718-0-0", "cos-beta-67-10525-0-0"], 68, "cos-dev-68-10718-0-0"),
        (["cos-dev-68-10718-11-0", "cos-dev-68-10718-0-0", "bad-image"], 68, "cos-dev-68-10718-11-0"),
        ([], 68, None),
        (["bad-image"], 68, None),
        (["cos-arm64-stable-109-17800-66-0", "cos-stable-109-17800-9-0"], 109, "cos-arm64-stable-109-17800-66-0"),
        (["cos-65-10323-0-0"], 65, None),
        (["cos-stable-109-17800-100-0", "cos-stable-109-17800-66-0"], 109, "cos-stable-109-17800-100-0"),
        (["cos-stable-109-9999-0-0", "cos-stable-109-17800-1-0"], 109, "cos-stable-109-17800-1-0"),
    ],
)
def test_milestone_resolution_is_the_originals(names: list[str], milestone: int, expected: str | None) -> None:
    from cos_customizer.executors.gce import compute as gce

    found = gce.newest_on_milestone(names, milestone)
    assert (found[0] if found else None) == expected


def test_milestone_takes_the_highest_build_number_deprecated_or_not(cli: CLI, compute: Compute, context_dir: Path,
                                                                     workspace_root: Path) -> None:  # fmt: skip
    """Not the newest by creation time, and a deprecated image is not skipped (the original skips none)."""
    compute.add_image("cos-cloud", "cos-stable-109-17800-200-0", created="2023-01-01T00:00:00Z", deprecated=True)
    compute.add_image("cos-cloud", "cos-beta-109-17800-100-0", created="2025-01-01T00:00:00Z")
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                 "-image-milestone=109", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7")  # fmt: skip
    assert result.code == 0, result.err
    source = json.loads((workspace_root / "config/source_image").read_text())
    assert source["name"] == "cos-stable-109-17800-200-0"
    # cos-109-17800-0-0 of the stand-in is not a name the original reads: 3 candidates, not 4.
    assert "Using image cos-stable-109-17800-200-0: the highest build number among the 3 cos-cloud images" in result.err


# -- the failing step, as the provisioner names it on the serial port (the line the real provisioner prints in
# tests/guest/test_rehearsal.py::test_a_failing_script_fails_the_rehearsal_and_leaves_nothing)

FAILING_CONFIG = ProvisionerConfig().with_step(DisableAutoUpdateArgs()).with_step(RunScriptArgs("user", "a.sh"))
FAILED_LINE = '[build-image]: Step "wait-preload-finished" (WaitForInstancesSignal): BuildFailed: step 1 (RunScript): '


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (FAILED_LINE + "script a.sh failed with exit status 3", 1),
        ("BuildFailed: step 0 (RunScript): the types differ", None),  # step 0 is DisableAutoUpdate
        ("BuildFailed: step 2 (RunScript): no such step", None),
        ("BuildFailed: the provisioner exited with status 1", None),  # not a step's failure
    ],
)
def test_the_failed_step_is_the_one_the_provisioner_names_if_the_config_has_it(line: str, expected: int | None) -> None:
    assert failed_step(line, FAILING_CONFIG) == expected


def test_a_daisy_failure_carries_the_step_the_provisioner_named(tmp_path: Path) -> None:
    daisy = tmp_path / "daisy"
    daisy.write_text(f"#!/bin/sh\necho '{FAILED_LINE}script a.sh failed'\nexit 1\n")
    daisy.chmod(0o755)
    with pytest.raises(BuildFailed) as failed:
        preload.run_daisy([str(daisy)], workflow.RunBound(60, "test"), config=FAILING_CONFIG)
    assert failed.value.step == 1
    assert str(failed.value) == (
        "daisy failed with exit status 1 (its output is above); daisy deleted the resources it made"
    )


def test_the_sbom_namespace_is_unique_per_build_and_the_same_for_a_reproduced_one() -> None:
    """SPDX asks a unique namespace URI of each document; a reproducible build must write the same bytes."""
    from cos_customizer.executors import sbom

    when = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    _, first = sbom.generate(SBOM_INPUT, "img", when, "Tool: t")
    _, again = sbom.generate(SBOM_INPUT, "img", when, "Tool: t")
    _, later = sbom.generate(SBOM_INPUT, "img", when + datetime.timedelta(seconds=1), "Tool: t")
    assert first == again
    assert later["documentNamespace"] != first["documentNamespace"]
    spdx.check_valid(first)


def test_no_google_credentials_is_one_line(cli: CLI, context_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Without credentials (no GOOGLE_APPLICATION_CREDENTIALS, no gcloud login, not on GCE) the Compute client
    cannot be made: one line saying what to do, not an internal error."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no application-default login there
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google-auth: do not ask a metadata server
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                 "-image-name=cos-stable-109-17800-66-0", "-gcs-bucket=b", "-gcs-workdir=w",
                 env={"COS_CUSTOMIZER_COMPUTE_ENDPOINT": ""})  # fmt: skip
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: Compute Engine: no Google credentials: run `gcloud auth application-default login` "
        "or set GOOGLE_APPLICATION_CREDENTIALS\n",
    )
