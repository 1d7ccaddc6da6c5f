"""The Daisy workflow and daisy arguments, for a matrix of inputs, checked by the daisy stand-in."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import ValidationError
from cos_customizer.executors import startup, workflow
from cos_customizer.provisioner.config import (
    DisableAutoUpdateArgs,
    InstallGPUArgs,
    ProvisionerConfig,
    RunScriptArgs,
)

STANDIN = Path(__file__).parents[1] / "daisy_standin.py"
SOURCE = SourceImage(Name="cos-stable-109", Project="cos-cloud")


def build_config(**changes: Any) -> BuildConfig:
    base = BuildConfig(GCSBucket="bucket", GCSDir="dir", Project="proj", Zone="us-west1-b", MachineType="n1-standard-1",
                       ServiceAccount="default", DiskType="pd-standard", Timeout="1h0m0s")  # fmt: skip
    return base.model_copy(update=changes)


def provisioner_config(*, gpu: bool, reclaim: bool, oem: str) -> ProvisionerConfig:
    config = ProvisionerConfig().with_step(RunScriptArgs(build_context="user", path="a.sh"))
    if gpu:
        config = config.with_step(InstallGPUArgs(nvidia_driver_version="535.104.05"))
    if reclaim:
        config = config.with_boot_disk(reclaim_sda3=True).with_step(DisableAutoUpdateArgs())
    return config.with_boot_disk(oem_size=oem)


def render(
    tmp: Path, build: BuildConfig, config: ProvisionerConfig, output: workflow.OutputImage
) -> tuple[dict[str, Any], list[str]]:
    cloud = tmp / "startup.yaml"
    cloud.write_text(startup.cloud_config())
    document = workflow.workflow(build, config, output, str(cloud))
    path = tmp / "build_image.wf.json"
    path.write_text(json.dumps(document))
    for name in ("cidata.tar.gz", "scratch.tar.gz"):
        (tmp / name).write_bytes(b"")
    args = workflow.daisy_args(build, config, SOURCE, output, cidata=str(tmp / "cidata.tar.gz"),
                               scratch=str(tmp / "scratch.tar.gz"), workflow_path=str(path))  # fmt: skip
    return document, args


def standin(args: list[str], record: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(STANDIN), *args], env={"DAISY_STANDIN_RECORD": str(record), **env},
                          capture_output=True, text=True, check=False)  # fmt: skip


MATRIX = list(itertools.product([False, True], [False, True], ["", "1023M"], [0, 20], [False, True], [False, True]))


@pytest.mark.parametrize(("gpu", "reclaim", "oem", "disk", "family", "network"), MATRIX)
def test_matrix(tmp_path: Path, gpu: bool, reclaim: bool, oem: str, disk: int, family: bool, network: bool) -> None:
    build = build_config(
        DiskSize=disk,
        GPUType="nvidia-tesla-t4" if gpu else "",
        Network="global/networks/vpc" if network else "",
        Subnet="regions/us-west1/subnetworks/sub" if network else "",
    )
    config = provisioner_config(gpu=gpu, reclaim=reclaim, oem=oem)
    output = workflow.OutputImage("out", "out-proj", "fam" if family else "", (("a", "1"),),
                                  ("https://www.googleapis.com/compute/v1/projects/p/global/licenses/l", ""))  # fmt: skip
    document, args = render(tmp_path, build, config, output)
    result = standin(args, tmp_path / "record.json")
    assert result.returncode == 0, result.stderr
    steps = document["Steps"]
    # Scratch disk only with install-gpu.
    disk_names = [d["Name"] for d in steps["setup"]["CreateDisks"]]
    assert disk_names == (["scratch-disk"] if gpu else []) + ["boot-disk", "cidata-disk"]
    attached = [d["Source"] for d in steps["run"]["CreateInstances"][0]["Disks"]]
    assert attached == ["boot-disk", *(["scratch-disk"] if gpu else []), "cidata-disk"]
    # Accelerator and host maintenance follow the GPU type.
    accelerators = steps["run"]["CreateInstances"][0]["guestAccelerators"]
    expected_acc = [{"acceleratorType": "projects/proj/zones/us-west1-b/acceleratorTypes/nvidia-tesla-t4",
                     "acceleratorCount": 1}] if gpu else []  # fmt: skip
    assert accelerators == expected_acc
    assert args[args.index("-var:host_maintenance") + 1] == ("TERMINATE" if gpu else "MIGRATE")
    # The two forms of the resize steps.
    resizes = disk > 10 and (bool(oem) or reclaim)
    if resizes:
        assert steps["resize-disk"] == {"ResizeDisks": [{"Name": "boot-disk", "SizeGb": str(disk)}]}
        serial = steps["wait-for-resize"]["WaitForInstancesSignal"][0]["SerialOutput"]
        assert serial == {
            "Port": 3,
            "SuccessMatch": "waiting for the boot disk size to change",
            "FailureMatch": "BuildFailed:",
        }
    else:
        for name in ("resize-disk", "wait-for-resize"):
            assert steps[name]["WaitForInstancesSignal"][0]["SerialOutput"] == {
                "Port": 3,
                "SuccessMatch": "BuildStatus:",
            }
    # The disk is created at the requested size only when it is not resized mid-build.
    created_big = "-var:disk_size_gb" in args
    assert created_big == (disk > 10 and not oem and not reclaim)
    assert ("-var:output_image_family" in args) == family
    assert args[args.index("-var:network") + 1] == ("global/networks/vpc" if network else "")
    image = steps["image"]["CreateImages"][0]
    assert image["labels"] == {"a": "1"}
    assert image["licenses"] == ["projects/p/global/licenses/l"]
    assert image["description"] == "Derivative of ${source_image}."
    tail = [
        "-gcs_path",
        "gs://bucket/dir/cos-customizer",
        "-project",
        "proj",
        "-zone",
        "us-west1-b",
        "-default_timeout",
        "1h0m0s",
    ]
    assert args[-10:-2] == tail
    assert args[-2:] == ["-disable_gcs_logging", str(tmp_path / "build_image.wf.json")]
    recorded = json.loads((tmp_path / "record.json").read_text())
    assert recorded["vars"]["source_image"] == "projects/cos-cloud/global/images/cos-stable-109"


def test_no_labels_or_licenses(tmp_path: Path) -> None:
    document, args = render(tmp_path, build_config(), provisioner_config(gpu=False, reclaim=False, oem=""),
                            workflow.OutputImage("out", "p"))  # fmt: skip
    image = document["Steps"]["image"]["CreateImages"][0]
    assert image["labels"] == {} and image["licenses"] is None
    assert standin(args, tmp_path / "r.json").returncode == 0


def test_dependencies_and_vars_follow_the_original(tmp_path: Path) -> None:
    document, _ = render(tmp_path, build_config(), provisioner_config(gpu=False, reclaim=False, oem=""),
                         workflow.OutputImage("out", "p"))  # fmt: skip
    assert document["Dependencies"] == {
        "create-images": ["copy-gcs"], "setup": ["create-images"], "run": ["setup"],
        "wait-preload-finished": ["run"], "wait-for-resize": ["run"], "resize-disk": ["wait-for-resize"],
        "send-logging-end-msg": ["wait-preload-finished", "resize-disk"],
        "wait-vm-shutdown": ["send-logging-end-msg"], "image": ["wait-vm-shutdown"],
    }  # fmt: skip
    assert sorted(document["Vars"]) == sorted([
        "source_image", "output_image_name", "output_image_family", "output_image_project", "cidata_img",
        "scratch_img", "disk_type", "disk_size_gb", "host_maintenance", "machine_type", "network", "subnet",
        "service_account"])  # fmt: skip
    required = {name for name, spec in document["Vars"].items() if spec.get("Required")}
    assert required == {"source_image", "output_image_name", "output_image_project", "cidata_img", "scratch_img",
                        "machine_type"}  # fmt: skip
    instance = document["Steps"]["run"]["CreateInstances"][0]
    assert instance["Labels"] == {"cos-customizer-cleanup": ""}
    assert instance["Metadata"] == {"user-data": "${SOURCE:cloud-config}", "block-project-ssh-keys": "TRUE",
                                    "cos-update-strategy": "update_disabled"}  # fmt: skip


def test_standin_catches_broken_workflows(tmp_path: Path) -> None:
    document, args = render(tmp_path, build_config(), provisioner_config(gpu=False, reclaim=False, oem=""),
                            workflow.OutputImage("out", "p"))  # fmt: skip
    broken = json.loads(json.dumps(document))
    broken["Dependencies"]["copy-gcs"] = ["image"]
    broken["Steps"]["image"]["CreateImages"][0]["family"] = "${no_such_var}"
    broken["Dependencies"]["ghost"] = ["run"]
    Path(args[-1]).write_text(json.dumps(broken))
    result = standin([a for a in args if a != "-var:machine_type" and a != "n1-standard-1"], tmp_path / "r.json")
    assert result.returncode == 1
    for problem in ("dependency cycle", "${no_such_var} is not defined", "'ghost', which is not a step",
                    "required var machine_type is not given"):  # fmt: skip
        assert problem in result.stderr


def test_endpoint_override_only_when_not_the_default(tmp_path: Path) -> None:
    config = provisioner_config(gpu=False, reclaim=False, oem="")
    _, args = render(tmp_path, build_config(GCEEndpoint="http://127.0.0.1:8000/compute/v1/"), config,
                     workflow.OutputImage("o", "p"))  # fmt: skip
    assert args[0] == "-compute_endpoint_override=http://127.0.0.1:8000/compute/v1/projects/"
    _, args = render(tmp_path, build_config(GCEEndpoint="https://compute.googleapis.com/compute/v1/"), config,
                     workflow.OutputImage("o", "p"))  # fmt: skip
    assert not args[0].startswith("-compute_endpoint_override")


def test_cloud_config_runs_the_provisioner_and_speaks_the_protocol() -> None:
    text = startup.cloud_config()
    assert text.startswith("#cloud-config\n")
    assert '/mnt/disks/cidata/provisioner" "$@"' in text
    assert "provision run --config=/mnt/disks/cidata/config.json" in text and "provision resume" in text
    assert "BuildSucceeded:" in text and "BuildFailed:" in text and "wait-metadata DaisyEnd" in text
    assert "TTYPath=%I" in text and "cos-customizer@${tty}.service" in text
    # The unit's ordering, as the original's src/data/startup.yaml writes it: gcr-online.target is COS's
    # "docker can pull from gcr.io" point.
    unit = next(f["content"] for f in yaml.safe_load(text)["write_files"] if f["path"].endswith("@.service"))
    assert "Wants=network-online.target gcr-online.target docker.service\n" in unit
    assert "After=network-online.target gcr-online.target docker.service\n" in unit
    script = startup.SCRIPT
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


@pytest.mark.parametrize(
    ("value", "client", "daisy"),
    [
        ("http://127.0.0.1:8000/compute/v1/", "http://127.0.0.1:8000", "http://127.0.0.1:8000/compute/v1/projects/"),
        ("http://127.0.0.1:8000/compute/v1", "http://127.0.0.1:8000", "http://127.0.0.1:8000/compute/v1/projects/"),
        ("https://proxy.example/gce/compute/v1/", "https://proxy.example/gce",
         "https://proxy.example/gce/compute/v1/projects/"),
    ],
)  # fmt: skip
def test_one_compute_endpoint_value_serves_the_client_and_daisy(value: str, client: str, daisy: str) -> None:
    """The value is the API base, as the original's `-compute-endpoint` (option.WithEndpoint; daisy gets
    path.Join(base, "projects") + "/"); the Python client appends /compute/v1 itself, so it gets the rest."""
    endpoint = workflow.compute_endpoint(value)
    assert (endpoint.client, endpoint.daisy) == (client, daisy)


@pytest.mark.parametrize("value", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "127.0.0.1:8000/compute/v1/"])
def test_a_compute_endpoint_without_the_api_path_is_refused(value: str) -> None:
    with pytest.raises(ValidationError) as err:
        workflow.compute_endpoint(value)
    assert str(err.value) == (
        f"-compute-endpoint={value}: give the Compute API's base URL, ending in /compute/v1/ "
        "(for example http://127.0.0.1:8080/compute/v1/), as the original takes it"
    )
