"""An empty value (`-flag=`, as an empty Cloud Build substitution gives) for each string flag with a default.

Go's flag package stores "", and what the original does with it decides here (docs/steps-and-flags.md,
"Empty string values"): where the original ends with the default anyway, "" is the default; where it
could only fail later, "" is refused with one line. The original's outcomes, from its source and daisy's:
daisy's disk.go gives a disk with no type `pd-standard`, its instance.go a VM with no machine type
`n1-standard-1`; the provisioner's InstallGPUStep.setDefaults gives "" the install dir /var/lib/nvidia and
its validate refuses an empty NvidiaInstallerContainer; fs.CreateBuildContextArchive stats "" and fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compute_standin import Compute
from tests.conftest import CLI, snapshot

FINISH = ["finish-image-build", "-zone=us-central1-a", "-project=my-proj", "-image-project=my-proj",
          "-image-name=out", "-dry-run"]  # fmt: skip


def start(cli: CLI, compute: Compute, context_dir: Path, architecture: str = "X86_64") -> None:
    compute.add_image("my-proj", "source", architecture=architecture)
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=my-proj",
                 "-image-name=source", "-gcs-bucket=b", "-gcs-workdir=w")  # fmt: skip
    assert result.code == 0, result.err


def daisy_var(plan: dict[str, list[str]], name: str) -> str:
    args = plan["daisy_args"]
    return args[args.index(f"-var:{name}") + 1]


def test_an_empty_build_context_is_refused(cli: CLI, workspace_root: Path, context_dir: Path) -> None:
    result = cli("start-image-build", "-build-context=", "-image-project=p", "-image-name=i", "-gcs-bucket=b",
                 "-gcs-workdir=w")  # fmt: skip
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: -build-context is empty: give the build context's path (the original fails on "
        'an empty path too); leave the flag out for the default "."\n',
    )
    assert not (workspace_root / "config").exists()


def test_an_empty_disk_type_is_daisys_default(cli: CLI, compute: Compute, context_dir: Path) -> None:
    start(cli, compute, context_dir)
    result = cli(*FINISH, "-disk-type=")
    assert result.code == 0, result.err
    assert daisy_var(json.loads(result.out), "disk_type") == "pd-standard"


@pytest.mark.parametrize(("architecture", "machine_type"), [("X86_64", "n1-standard-1"), ("ARM64", "t2a-standard-1")])
def test_an_empty_machine_type_is_the_default_for_the_source(
    cli: CLI, compute: Compute, context_dir: Path, architecture: str, machine_type: str
) -> None:
    """x86-64: daisy's own default, as the original gets; arm64: ours (an arm64 image cannot boot on N1)."""
    start(cli, compute, context_dir, architecture)
    result = cli(*FINISH, "-machine-type=")
    assert result.code == 0, result.err
    assert daisy_var(json.loads(result.out), "machine_type") == machine_type


def test_an_empty_service_account_is_refused_before_anything_is_made(
    cli: CLI, compute: Compute, context_dir: Path, workspace_root: Path
) -> None:
    start(cli, compute, context_dir)
    before = snapshot(workspace_root)
    result = cli(*FINISH[:-1], "-service-account=")
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: -service-account is empty: the preload VM would be asked for with a service "
        'account of no name; leave the flag out for the default "default"\n',
    )
    assert snapshot(workspace_root) == before


def test_an_empty_install_dir_is_the_provisioners_default(gce_build: CLI, workspace_root: Path) -> None:
    deps = workspace_root.parent / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("x")
    result = gce_build("install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}",
                       "-install-dir=")  # fmt: skip
    assert result.code == 0, result.err
    (step,) = json.loads((workspace_root / "config/provisioner").read_text())["Steps"]
    assert step["Args"]["NvidiaInstallDirHost"] == "/var/lib/nvidia"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("-gpu-type=", "-gpu-type is empty: the preload VM would get no GPU and the driver install would fail on "
                       'it; leave the flag out for the default "nvidia-tesla-p100"'),
        ("-installer-container=", "-installer-container is empty: the provisioner would have no GPU installer to "
                                  "run (the original's fails on the VM); leave the flag out for the default "
                                  '"gcr.io/cos-cloud/cos-gpu-installer:v20230815"'),
    ],
)  # fmt: skip
def test_an_empty_gpu_value_that_fails_on_the_vm_is_refused(
    gce_build: CLI, workspace_root: Path, tmp_path: Path, flag: str, message: str
) -> None:
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("x")
    before = snapshot(workspace_root)
    result = gce_build("install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}", flag)
    assert (result.code, result.err) == (1, f"cos-customizer: error: {message}\n")
    assert snapshot(workspace_root) == before
