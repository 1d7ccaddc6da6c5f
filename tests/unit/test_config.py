"""Config models: JSON round trips, the step registry, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cos_customizer import workspace
from cos_customizer.config import BuildConfig, SourceImage
from cos_customizer.errors import ConfigError, WorkspaceError
from cos_customizer.provisioner.config import (
    STEP_ARGS,
    BootDisk,
    DisableAutoUpdateArgs,
    InstallGPUArgs,
    InstallPackagesArgs,
    ProvisionerConfig,
    RunScriptArgs,
    SealOEMArgs,
    StepType,
)

FULL = (
    ProvisionerConfig(build_contexts=(("user", "gs://b/d/user_build_context.tar"),))
    .with_boot_disk(oem_size="2047M", oem_fs_size_4k=262144, reclaim_sda3=True, wait_for_disk_resize=True)
    .with_step(RunScriptArgs(build_context="user", path="a.sh", env=("A=1", "LIST=x,y")))
    .with_step(InstallGPUArgs(nvidia_driver_version="535.104.05", gcs_deps_prefix="gs://b/d/gcs_files"))
    .with_step(InstallPackagesArgs(build_context="user", pkg_spec_url="gs://b/spec.tar.gz", top_work_dir="/var/x"))
    .with_step(DisableAutoUpdateArgs())
    .with_step(SealOEMArgs())
)


def test_registry_covers_every_step_type() -> None:
    assert set(STEP_ARGS) == set(StepType)
    for step_type, cls in STEP_ARGS.items():
        assert cls.TYPE is step_type


def test_round_trip() -> None:
    data = FULL.to_json()
    assert json.loads(json.dumps(data)) == data
    assert ProvisionerConfig.from_json(data) == FULL


# The original's JSON field names: its Go struct fields (src/pkg/provisioner/config.go, run_script_step.go,
# install_gpu_step.go, install_packages_step.go), which encoding/json uses as keys.
GO_FIELDS = {
    "Config": {"BuildContexts", "BootDisk", "Steps"},
    "BootDisk": {"OEMSize", "OEMFSSize4K", "ReclaimSDA3", "WaitForDiskResize"},
    "Step": {"Type", "Args"},
    "RunScript": {"BuildContext", "Path", "Env"},
    "InstallGPU": {
        "NvidiaDriverVersion",
        "NvidiaDriverMD5Sum",
        "NvidiaInstallDirHost",
        "NvidiaInstallerContainer",
        "GCSDepsPrefix",
    },
    "InstallPackages": {
        "BuildContext",
        "PkgSpecURL",
        "TopWorkDir",
        "AnthosInstallerDir",
        "AnthosInstallerVersion",
        "AnthosInstallerReleaseBucket",
    },
}


def test_json_keys_are_the_originals() -> None:
    data = FULL.to_json()
    assert set(data) == GO_FIELDS["Config"]
    assert set(data["BootDisk"]) == GO_FIELDS["BootDisk"]
    for step in data["Steps"]:
        assert set(step) == GO_FIELDS["Step"]
        assert set(step["Args"] or {}) <= GO_FIELDS.get(step["Type"], set()), step["Type"]
    for step_type in ("RunScript", "InstallGPU", "InstallPackages"):
        args = next(step["Args"] for step in data["Steps"] if step["Type"] == step_type)
        assert set(args) == GO_FIELDS[step_type]


def test_json_shape_env_is_a_list_in_our_config() -> None:
    """Ours: `Env` is a list, so values may hold commas (the original's is one comma-separated string, which
    `test_reads_a_config_written_by_the_go_original` shows we read)."""
    data = FULL.to_json()
    assert data["BuildContexts"] == {"user": "gs://b/d/user_build_context.tar"}
    assert data["BootDisk"] == {
        "OEMSize": "2047M",
        "OEMFSSize4K": 262144,
        "ReclaimSDA3": True,
        "WaitForDiskResize": True,
    }
    assert data["Steps"][0] == {
        "Type": "RunScript",
        "Args": {"BuildContext": "user", "Path": "a.sh", "Env": ["A=1", "LIST=x,y"]},
    }
    assert data["Steps"][1]["Args"]["NvidiaInstallDirHost"] == "/var/lib/nvidia"
    assert [step["Type"] for step in data["Steps"]] == [
        "RunScript",
        "InstallGPU",
        "InstallPackages",
        "DisableAutoUpdate",
        "SealOEM",
    ]


def test_reads_a_config_written_by_the_go_original() -> None:
    go = {
        "BuildContexts": None,
        "BootDisk": {"OEMSize": "", "OEMFSSize4K": 0, "ReclaimSDA3": True, "WaitForDiskResize": False},
        "Steps": [
            {"Type": "RunScript", "Args": {"BuildContext": "user", "Path": "a.sh", "Env": "A=1,B=2"}},
            {"Type": "SealOEM", "Args": None},
        ],
    }
    config = ProvisionerConfig.from_json(go)
    assert config.steps[0].args == RunScriptArgs(build_context="user", path="a.sh", env=("A=1", "B=2"))
    assert config.steps[1].type is StepType.SEAL_OEM
    assert config.boot_disk == BootDisk(reclaim_sda3=True)


def _steps(*steps: object) -> dict[str, object]:
    return {"Steps": list(steps)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _steps({"Type": "SealOEM"}, {"Type": "Reboot", "Args": {}}),
            'config: Steps[1]: unknown step type "Reboot"; known types: RunScript, InstallGPU, DisableAutoUpdate, '
            "SealOEM, InstallPackages",
        ),
        (
            _steps({"Type": "RunScript", "Args": {"BuildContext": "user"}}),
            'config: Steps[0] (RunScript): missing required field "Path"',
        ),
        (
            _steps({"Type": "InstallGPU", "Args": {}}),
            'config: Steps[0] (InstallGPU): missing required field "NvidiaDriverVersion"',
        ),
        (
            _steps({"Type": "RunScript", "Args": {"BuildContext": "user", "Path": 3}}),
            "config: Steps[0] (RunScript): Path must be a string, not 3",
        ),
        (
            _steps({"Type": "RunScript", "Args": {"BuildContext": "u", "Path": "a", "Evn": []}}),
            'config: Steps[0] (RunScript): unknown field "Evn"; known fields: BuildContext, Env, Path',
        ),
        ({"BootDisk": {"OEMFSSize4K": -1}}, "config: BootDisk: OEMFSSize4K must be a whole number >= 0, not -1"),
        ({"BootDisk": {"ReclaimSDA3": "yes"}}, "config: BootDisk: ReclaimSDA3 must be true or false, not 'yes'"),
        ({"Steps": {}}, "config: Steps must be a list"),
        (_steps({"Args": {}}), 'config: Steps[0]: missing required field "Type"'),
        ([], "config must be a JSON object, not list"),
        (_steps("RunScript"), "config: Steps[0] must be a JSON object, not str"),
        ({"BuildContexts": {"user": 1}}, "config: BuildContexts.user must be a string"),
    ],
)
def test_errors_name_the_place(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ProvisionerConfig.from_json(data, "config")
    assert str(err.value) == message


def test_source_and_build_round_trip() -> None:
    source = SourceImage(Name="cos-109", Project="cos-cloud")
    assert SourceImage.model_validate_json(source.model_dump_json()) == source
    assert source.url == "projects/cos-cloud/global/images/cos-109"
    build = BuildConfig(GCSBucket="b", GCSDir="d", DiskSize=12, GCSFiles=("/deps/a.run",), Timeout="1h0m0s")
    assert BuildConfig.model_validate_json(build.model_dump_json()) == build


# The workspace


def test_resolve_root(tmp_path: Path) -> None:
    home = {"HOME": "/home/me"}
    assert workspace.resolve_root(None, home) == Path("/home/me/.cos-customizer-workdir")
    assert workspace.resolve_root("state", home) == Path("/home/me/state")
    assert workspace.resolve_root("/abs/state", home) == Path("/abs/state")
    env = {**home, "COS_CUSTOMIZER_WORKDIR": "/tmp/isolated"}
    assert workspace.resolve_root(None, env) == Path("/tmp/isolated")
    assert workspace.resolve_root("flag-wins", env) == Path("/home/me/flag-wins")
    with pytest.raises(WorkspaceError, match="HOME is not set"):
        workspace.resolve_root(None, {})


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "config" / "build"
    workspace.write_json_atomic(target, {"a": 1})
    workspace.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["build"]


def test_atomic_write_keeps_the_old_file_when_serialising_fails(tmp_path: Path) -> None:
    target = tmp_path / "build"
    workspace.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        workspace.write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["build"]


def test_create_replaces_and_keeps_old_on_failure(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    archive = "user_build_context.tar"  # a file of the workspace's own layout (a user's file would stop a start)

    def fill(marker: str):
        def write(new: workspace.Workspace) -> None:
            new.root.mkdir(parents=True, exist_ok=True)
            (new.root / archive).write_text(marker)

        return write

    workspace.create(root, fill("one"))
    workspace.create(root, fill("two"))
    assert (root / archive).read_text() == "two"

    def failing(new: workspace.Workspace) -> None:
        fill("three")(new)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        workspace.create(root, failing)
    assert (root / archive).read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]
