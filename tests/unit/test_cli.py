"""The command line end to end: every step, its effect on the workspace, and its refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cos_customizer import buildcontext
from cos_customizer.cli.main import COMMANDS
from tests.conftest import CLI, snapshot

# Help


def test_help_lists_every_command(cli: CLI) -> None:
    for argv in ([], ["--help"], ["-h"], ["help"]):
        result = cli(*argv)
        assert result.code == 0
        for name, command in COMMANDS.items():
            assert f"  {name:<26} {command.synopsis}" in result.out
    assert len(COMMANDS) == 12  # the original's 7 steps, build, sample-image, build-provisioner, boot, completion


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_step_help_documents_every_flag(cli: CLI, name: str) -> None:
    result = cli(name, "--help")
    assert result.code == 0
    assert f"Usage: cos-customizer [global flags] {name}" in result.out
    for flag in COMMANDS[name].flags:
        assert f"  -{flag.name}" in result.out
    assert "-local-state-workdir" in result.out
    assert cli("help", name).out == result.out


def test_finish_help_shows_go_defaults(cli: CLI) -> None:
    out = cli("finish-image-build", "-help").out
    assert '(default "pd-standard")' in out
    assert "(default 1h0m0s)" in out


def test_unknown_step(cli: CLI) -> None:
    result = cli("make-it-so")
    assert result.code == 2
    assert (
        result.err
        == 'cos-customizer: error: unknown step "make-it-so": run cos-customizer --help for the list of steps\n'
    )


def test_unknown_flag_and_stray_argument(cli: CLI, workspace_root: Path) -> None:
    result = cli("-verbose", "seal-oem")
    assert (result.code, result.err) == (
        2,
        "cos-customizer: error: flag provided but not defined: -verbose (see cos-customizer --help)\n",
    )
    result = cli("seal-oem", "-force")
    assert (result.code, result.err) == (
        2,
        "cos-customizer: error: flag provided but not defined: -force (see cos-customizer seal-oem --help)\n",
    )
    result = cli("run-script", "preload.sh")
    assert result.code == 2
    assert result.err == (
        'cos-customizer: error: unexpected argument "preload.sh": usage: cos-customizer run-script [flags] '
        "(flags are written -name=value)\n"
    )
    assert not workspace_root.exists()


# Exit codes as the original's (google/subcommands): 2 (ExitUsageError) only when Go's flag package cannot
# parse the command line (an unknown flag, a value a typed flag cannot read, a stray argument); every other
# refusal is ExitFailure, 1. String flags take any value in Go, so their checks are refusals (1).
_SYNTAX = re.compile(
    r'^(invalid (boolean )?value "[^"]*" for flag -(?!oem-size:|grub-format:)|flag provided but not defined'
    r"|flag needs an argument|bad flag syntax|unexpected argument)"
)


def exit_code(message: str) -> int:
    return 2 if _SYNTAX.match(message) else 1


# start-image-build


def test_start_local(cli: CLI, context_dir: Path, image_file: Path, workspace_root: Path) -> None:
    result = cli("start-image-build", f"--build-context={context_dir}", "--image-file", str(image_file))
    assert result.code == 0, result.err
    assert "Started an image build from" in result.err
    source = json.loads((workspace_root / "config/source_image").read_text())
    assert source["ImageFile"] == str(image_file)
    build = json.loads((workspace_root / "config/build").read_text())
    assert build["GCSBucket"] == "" and build["DiskSize"] == 0
    prov = json.loads((workspace_root / "config/provisioner").read_text())
    assert prov == {
        "BuildContexts": {},
        "BootDisk": {"OEMSize": "", "OEMFSSize4K": 0, "ReclaimSDA3": False, "WaitForDiskResize": False},
        "Steps": [],
    }
    assert (workspace_root / "user_build_context.tar").is_file()


def test_start_gce_records_what_was_given(cli: CLI, context_dir: Path, workspace_root: Path) -> None:
    result = cli(
        "start-image-build",
        f"-build-context={context_dir}",
        "-image-project=cos-cloud",
        "-image-family=cos-stable",
        "-gcs-bucket=b",
        "-gcs-workdir=w",
    )
    assert result.code == 0, result.err
    source = json.loads((workspace_root / "config/source_image").read_text())
    # The original's shape ({"Project", "name"}: a compute.Image with its project, src/pkg/config/config.go),
    # plus how the image was asked for, which the original ignores.
    assert source == {"Project": "cos-cloud", "name": "cos-stable-109-17800-66-0", "Family": "cos-stable"}
    build = json.loads((workspace_root / "config/build").read_text())
    assert (build["GCSBucket"], build["GCSDir"]) == ("b", "w")


def test_start_uses_home_for_relative_workdir(cli: CLI, context_dir: Path, image_file: Path, home: Path) -> None:
    result = cli(
        "-local-state-workdir=state", "start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}"
    )
    assert result.code == 0, result.err
    assert (home / "state" / "config" / "provisioner").is_file()


def test_global_flag_after_the_step(cli: CLI, context_dir: Path, image_file: Path, tmp_path: Path) -> None:
    where = tmp_path / "elsewhere"
    result = cli(
        "start-image-build",
        f"-build-context={context_dir}",
        f"-image-file={image_file}",
        f"-local-state-workdir={where}",
    )
    assert result.code == 0, result.err
    assert (where / "config" / "source_image").is_file()


def test_start_replaces_the_previous_build(
    local_build: CLI, context_dir: Path, image_file: Path, workspace_root: Path
) -> None:
    assert local_build("seal-oem").code == 0
    result = local_build("start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}")
    assert result.code == 0
    assert json.loads((workspace_root / "config/provisioner").read_text())["Steps"] == []
    assert sorted(p.name for p in workspace_root.parent.iterdir() if p.name.startswith(".ws")) == []


GCE = ["-image-project=cos-cloud", "-gcs-bucket=b", "-gcs-workdir=w"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [*GCE],
            "exactly one of -image-name, -image-milestone, -image-family must be set "
            "(or -image-file=PATH for a local build)",
        ),
        (
            [*GCE, "-image-name=a", "-image-family=b"],
            "exactly one of -image-name, -image-milestone, -image-family must be set "
            "(or -image-file=PATH for a local build)",
        ),
        (
            ["-image-project=my-proj", "-gcs-bucket=b", "-gcs-workdir=w", "-image-milestone=109"],
            '-image-milestone can only be used if -image-project is set to cos-cloud (image-milestone: 109, image-project: "my-proj")',
        ),
        (
            [*GCE, "-image-milestone=-3"],
            "-image-milestone must be a positive milestone number such as 113, not -3",
        ),
        (
            ["-image-project=cos-cloud", "-gcs-workdir=w", "-image-name=x"],
            "-gcs-bucket must be set for a GCE build (or use -image-file=PATH for a local build)",
        ),
        (
            ["-image-project=cos-cloud", "-gcs-bucket=b", "-image-name=x"],
            "-gcs-workdir must be set for a GCE build (or use -image-file=PATH for a local build)",
        ),
        (
            ["-gcs-bucket=b", "-gcs-workdir=w", "-image-name=x"],
            "-image-project must be set for a GCE build (or use -image-file=PATH for a local build)",
        ),
        (["-image-milestone=abc"], 'invalid value "abc" for flag -image-milestone: parse error'),
    ],
)
def test_start_refusals(cli: CLI, context_dir: Path, workspace_root: Path, args: list[str], message: str) -> None:
    result = cli("start-image-build", f"-build-context={context_dir}", *args)
    assert (result.code, result.err) == (exit_code(message), f"cos-customizer: error: {message}\n")
    assert not workspace_root.exists()


def test_start_local_refusals(
    cli: CLI, context_dir: Path, image_file: Path, tmp_path: Path, workspace_root: Path
) -> None:
    result = cli("start-image-build", f"-image-file={image_file}", "-image-name=cos-1")
    assert result.code == 1
    assert result.err == (
        "cos-customizer: error: -image-file and -image-name are mutually exclusive: a build starts either from a "
        "local image file (local executor) or from a Compute Engine image (gce executor)\n"
    )
    missing = tmp_path / "missing.raw"
    result = cli("start-image-build", f"-image-file={missing}")
    assert result.err == (
        f"cos-customizer: error: -image-file={missing}: no such file; give a raw, .qcow2 or .tar.gz COS disk image\n"
    )
    result = cli("start-image-build", f"-image-file={tmp_path}")
    assert result.err.endswith("not a file; give a raw, .qcow2 or .tar.gz COS disk image\n")
    assert not workspace_root.exists()


def test_missing_build_context_keeps_the_previous_build(
    local_build: CLI, image_file: Path, tmp_path: Path, workspace_root: Path
) -> None:
    assert local_build("seal-oem").code == 0
    before = snapshot(workspace_root)
    result = local_build("start-image-build", f"-build-context={tmp_path / 'nope'}", f"-image-file={image_file}")
    assert result.code == 1
    assert result.err == (
        f"cos-customizer: error: build context {tmp_path / 'nope'} does not exist: pass -build-context=DIR, "
        "the directory holding your scripts and files\n"
    )
    assert snapshot(workspace_root) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ws")) == []


# Steps before start-image-build


@pytest.mark.parametrize(
    "argv",
    [
        ["run-script", "-script=a.sh"],
        ["install-gpu", "-version=535.104.05"],
        ["seal-oem"],
        ["disable-auto-update"],
        ["anthos-installer-install", "-pkgspec-url=gs://b/spec"],
        ["finish-image-build", "-output=/tmp/x.raw"],
    ],
)
def test_steps_need_a_started_build(cli: CLI, workspace_root: Path, argv: list[str]) -> None:
    result = cli(*argv)
    assert (result.code, result.err) == (
        1,
        f"cos-customizer: error: no image build in progress in {workspace_root}: run start-image-build first\n",
    )
    assert not workspace_root.exists()


def test_incomplete_and_corrupted_workspace(local_build: CLI, workspace_root: Path) -> None:
    prov = workspace_root / "config/provisioner"
    prov.write_text('{"Steps": [')
    result = local_build("seal-oem")
    assert result.code == 1
    assert result.err == (
        f"cos-customizer: error: the workspace file {prov} is corrupted (invalid JSON at line 1 column 12: "
        "Expecting value): run start-image-build again to start a fresh build\n"
    )
    assert prov.read_text() == '{"Steps": ['
    prov.write_text('{"Steps": [{"Type": "Reboot"}]}')
    result = local_build("seal-oem")
    assert 'corrupted (the provisioner config: Steps[0]: unknown step type "Reboot"; known types:' in result.err
    prov.write_text("{}")
    (workspace_root / "config/build").write_text('{"DiskSize": "big"}')
    result = local_build("install-gpu", "-version=535.104.05")
    assert result.err == (
        f"cos-customizer: error: the workspace file {workspace_root / 'config/build'} is corrupted "
        "(DiskSize: Input should be a valid integer, unable to parse string as an integer): "
        "run start-image-build again to start a fresh build\n"
    )
    prov.unlink()
    result = local_build("seal-oem")
    assert result.err == (
        f"cos-customizer: error: the workspace {workspace_root} is incomplete (config/provisioner is missing): "
        "run start-image-build again\n"
    )


# run-script


def steps_of(workspace_root: Path) -> list[dict[str, object]]:
    return list(json.loads((workspace_root / "config/provisioner").read_text())["Steps"])


def test_run_script(local_build: CLI, workspace_root: Path) -> None:
    assert local_build("run-script", "-script=preload.sh", "-env=B=2,A=1", "-env", "LIST=x,y").code == 0
    assert local_build("run-script", "--script", "./lib/mylib.sh").code == 0
    assert steps_of(workspace_root) == [
        {
            "Type": "RunScript",
            "Args": {"BuildContext": "user", "Path": "preload.sh", "Env": ["A=1", "B=2", "LIST=x,y"]},
        },
        {"Type": "RunScript", "Args": {"BuildContext": "user", "Path": "lib/mylib.sh", "Env": ""}},
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 1, "script not provided for run-script step; -script is required"),
        (
            ["-script=nope.sh"],
            1,
            "could not find nope.sh in the build context; the build context is the -build-context of "
            "start-image-build, and paths are relative to it",
        ),
        (["-script=lib"], 1, "-script=lib is a directory of the build context; give a file in it"),
        (["-script=lib/"], 1, "-script=lib/ is a directory of the build context; give a file in it"),
        (
            ["-script=/etc/passwd"],
            1,
            "-script=/etc/passwd: give a path relative to the build context, not an absolute path",
        ),
        (
            ["-script=a.sh", "-env=oops"],
            2,
            "invalid value \"oops\" for flag -env: item 'oops' is improperly formatted; does it have an '=' character?",
        ),
    ],
)
def test_run_script_refusals(local_build: CLI, workspace_root: Path, args: list[str], code: int, message: str) -> None:
    before = snapshot(workspace_root)
    result = local_build("run-script", *args)
    assert (result.code, result.err) == (code, f"cos-customizer: error: {message}\n")
    assert snapshot(workspace_root) == before


# install-gpu


def test_install_gpu(gce_build: CLI, workspace_root: Path) -> None:
    assert gce_build("install-gpu", "-version=535.104.05", "-md5sum=" + "a" * 32).code == 0
    assert steps_of(workspace_root) == [
        {
            "Type": "InstallGPU",
            "Args": {
                "NvidiaDriverVersion": "535.104.05",
                "NvidiaDriverMD5Sum": "a" * 32,
                "NvidiaInstallDirHost": "/var/lib/nvidia",
                "NvidiaInstallerContainer": "gcr.io/cos-cloud/cos-gpu-installer:v20230815",
                "GCSDepsPrefix": "",
            },
        }
    ]
    build = json.loads((workspace_root / "config/build").read_text())
    assert build["GPUType"] == "nvidia-tesla-p100"
    result = gce_build("install-gpu", "-version=535.104.05")
    assert (result.code, result.err) == (
        1,
        "cos-customizer: error: install-gpu can only be invoked once in an image build process. "
        "Only one driver version can be installed on the image\n",
    )


def test_install_gpu_from_a_run_file(gce_build: CLI, workspace_root: Path, tmp_path: Path) -> None:
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("installer")
    (deps / "toolchain.tar.xz").write_text("tc")
    (deps / "subdir").mkdir()
    result = gce_build(
        "install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}", "-gpu-type=nvidia-tesla-t4"
    )
    assert result.code == 0, result.err
    build = json.loads((workspace_root / "config/build").read_text())
    assert build["GPUType"] == "nvidia-tesla-t4"
    assert build["GCSFiles"] == [str(deps / "NVIDIA-Linux-x86_64-450.51.06.run"), str(deps / "toolchain.tar.xz")]
    assert steps_of(workspace_root)[0]["Args"]["GCSDepsPrefix"] == str(deps)  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        # The provisioner's rule, the original's (install_gpu_step.go): 4 fields split on "-"; the 4th.
        ("NVIDIA-Linux-aarch64-535.run", True),
        ("NVIDIA-Linux-x86_64-450.51.06-grid.run", False),
    ],
)
def test_install_gpu_run_file_names_follow_the_provisioner(
    gce_build: CLI, workspace_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, accepted: bool
) -> None:
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / name).write_text("installer")
    monkeypatch.chdir(tmp_path)
    result = gce_build("install-gpu", f"-version={name}", "-deps-dir=deps")
    if accepted:
        assert result.code == 0, result.err
        # As the original: the -deps-dir value itself (finish-image-build replaces it with the gs:// prefix).
        assert steps_of(workspace_root)[0]["Args"]["GCSDepsPrefix"] == "deps"  # type: ignore[index]
    else:
        assert (result.code, result.err) == (
            1,
            f"cos-customizer: error: -version={name}: cannot read the driver version from the installer name; "
            "expected a name like NVIDIA-Linux-x86_64-450.51.06.run\n",
        )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 1, "-version must be set: a driver version such as 535.104.05, or an NVIDIA .run installer"),
        (
            ["-version=NVIDIA-Linux-x86_64-450.51.06.run"],
            1,
            '"-deps-dir" must be set when the version is specified as an nvidia installer file',
        ),
        (
            ["-version=NVIDIA-Linux-x86_64-450.51.06.run", "-deps-dir={tmp}"],
            1,
            'nvidia installer file at "{tmp}/NVIDIA-Linux-x86_64-450.51.06.run" does not exist',
        ),
        (
            ["-version=latest"],
            1,
            "driver version latest is not valid: give a version such as 535.104.05, or the name of an NVIDIA "
            "installer file in -deps-dir such as NVIDIA-Linux-x86_64-450.51.06.run",
        ),
        (["-version=535.104.05", "-md5sum=xyz"], 1, "-md5sum=xyz: expected 32 hexadecimal digits"),
        (
            ["-version=535.104.05", "-install-dir=var/lib/nvidia"],
            1,
            "-install-dir=var/lib/nvidia: give an absolute path on the image, like /var/lib/nvidia",
        ),
        (
            ["-version=535.104.06"],
            1,
            "driver version 535.104.06 is not valid; valid driver versions are: [390.46 450.51.06 535.104.05] "
            "(or give an NVIDIA .run installer in -deps-dir)",
        ),
    ],
)
def test_install_gpu_refusals(
    gce_build: CLI, workspace_root: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    before = snapshot(workspace_root)
    result = gce_build("install-gpu", *[a.format(tmp=tmp_path) for a in args])
    assert (result.code, result.err) == (code, f"cos-customizer: error: {message.format(tmp=tmp_path)}\n")
    assert snapshot(workspace_root) == before


def test_install_gpu_run_file_is_a_directory(gce_build: CLI, tmp_path: Path) -> None:
    (tmp_path / "NVIDIA-Linux-x86_64-450.51.06.run").mkdir()
    result = gce_build("install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={tmp_path}")
    assert result.err == (
        f'cos-customizer: error: nvidia installer file at "{tmp_path}/NVIDIA-Linux-x86_64-450.51.06.run" is a directory\n'
    )


# seal-oem, disable-auto-update


@pytest.mark.parametrize(("step", "step_type"), [("seal-oem", "SealOEM"), ("disable-auto-update", "DisableAutoUpdate")])
def test_reclaiming_steps(local_build: CLI, workspace_root: Path, step: str, step_type: str) -> None:
    assert local_build(step).code == 0
    prov = json.loads((workspace_root / "config/provisioner").read_text())
    assert prov["BootDisk"]["ReclaimSDA3"] is True
    assert prov["Steps"] == [{"Type": step_type, "Args": {}}]
    result = local_build(step)
    assert result.code == 0
    assert f"{step} is already configured for this build; nothing to change" in result.err
    assert len(steps_of(workspace_root)) == 1


def test_script_after_seal_oem_gets_a_note(local_build: CLI) -> None:
    assert local_build("seal-oem").code == 0
    result = local_build("run-script", "-script=preload.sh")
    assert result.code == 0
    assert "the OEM partition is sealed after every other step, so run-script still runs before it" in result.err


# anthos-installer-install


def test_anthos_installer(local_build: CLI, workspace_root: Path) -> None:
    assert local_build("anthos-installer-install", "-pkgspec-url=pkgspec", "-top-workdir=/var/lib/anthos").code == 0
    assert local_build("anthos-installer-install", "-pkgspec-url=gs://bucket/spec.tar.gz").code == 0
    steps = steps_of(workspace_root)
    assert steps[0] == {
        "Type": "InstallPackages",
        "Args": {
            "BuildContext": "user",
            "PkgSpecURL": "pkgspec",
            "TopWorkDir": "/var/lib/anthos",
            "AnthosInstallerDir": "",
            "AnthosInstallerVersion": "anthos_installer-linux-amd64-v0.0.1-bb7e04e.tar.gz",
            "AnthosInstallerReleaseBucket": "cos-anthos-builds-us",
        },
    }
    assert steps[1]["Args"]["PkgSpecURL"] == "gs://bucket/spec.tar.gz"  # type: ignore[index]
    # install_packages.go: -top-workdir defaults to "" and AnthosInstallerDir is not set (the provisioner's
    # state directory); the provisioner passes -top-workdir= as given.
    assert steps[1]["Args"]["TopWorkDir"] == ""  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 1, "Required package spec is not provided for anthos-installer-install step: set -pkgspec-url"),
        (
            ["-pkgspec-url=ftp://host/spec"],
            1,
            "-pkgspec-url=ftp://host/spec: use a gs://, http:// or https:// address, or a path inside the build context",
        ),
        (
            ["-pkgspec-url=specs"],
            1,
            "could not find specs in the build context; the build context is the -build-context of "
            "start-image-build, and paths are relative to it",
        ),
    ],
)
def test_anthos_refusals(local_build: CLI, workspace_root: Path, args: list[str], code: int, message: str) -> None:
    before = snapshot(workspace_root)
    result = local_build("anthos-installer-install", *args)
    assert (result.code, result.err) == (code, f"cos-customizer: error: {message}\n")
    assert snapshot(workspace_root) == before


# finish-image-build: local


def test_finish_local_dry_run(local_build: CLI, workspace_root: Path, tmp_path: Path, image_file: Path) -> None:
    for argv in (["run-script", "-script=preload.sh"], ["seal-oem"], ["disable-auto-update"]):
        assert local_build(*argv).code == 0
    before = snapshot(workspace_root)
    output = tmp_path / "out.tar.gz"
    result = local_build(
        "finish-image-build", "-oem-size=1G", "-disk-size-gb=12", f"-output={output}", "-timeout=30m", "-dry-run"
    )
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["executor"] == "local"
    assert plan["output"] == {"path": str(output), "format": "tar.gz"}
    assert plan["source_image"]["ImageFile"] == str(image_file)
    assert plan["build_config"]["DiskSize"] == 12
    assert plan["build_config"]["Timeout"] == "30m0s"
    assert plan["provisioner_config"]["BootDisk"] == {
        "OEMSize": "2047M",
        "OEMFSSize4K": 262144,
        "ReclaimSDA3": True,
        "WaitForDiskResize": False,
    }
    assert [s["Type"] for s in plan["provisioner_config"]["Steps"]] == ["RunScript", "SealOEM", "DisableAutoUpdate"]
    disk = plan["disk_plan"]
    assert disk["before"]["3"] == {"name": "ROOT-A", "start": 4509696, "size": 4194304}
    assert disk["after"]["3"] == {"name": "ROOT-A", "start": 4509696, "size": 8}
    assert disk["after"]["8"] == {"name": "OEM", "start": 4513792, "size": 2047 * 2048}
    assert disk["after"]["1"] == {
        "name": "STATE",
        "start": 4513792 + 2047 * 2048,
        "size": 12 * 2097152 - 34 - (4513792 + 2047 * 2048) + 1,
    }
    assert disk["disk_sectors"] == {"before": 20971520, "after": 12 * 2097152}
    assert [m["name"] for m in disk["moves"]] == ["ROOT-B", "OEM", "STATE"]
    assert disk["oem_fs_bytes"] == 1 << 30
    assert "Plan (dry run: nothing was changed)" in result.err
    assert "1. run-script preload.sh\n    2. disable-auto-update\n    3. seal-oem" in result.err
    assert "     8 OEM              86016 +32768 ->    4513792 +4192256" in result.err
    assert snapshot(workspace_root) == before
    assert not output.exists()


@pytest.mark.parametrize(("name", "fmt"), [("out.qcow2", "qcow2"), ("out.raw", "raw"), ("out.img", "raw")])
def test_finish_output_format_follows_the_name(local_build: CLI, tmp_path: Path, name: str, fmt: str) -> None:
    result = local_build("finish-image-build", f"-output={tmp_path / name}", "-dry-run")
    assert json.loads(result.out)["output"]["format"] == fmt


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["-zone=us-west1-b"],
            1,
            "-zone applies to GCE builds only; this build was started with -image-file, so it runs with the local executor",
        ),
        (
            ["-image-name=x"],
            1,
            "-image-name applies to GCE builds only; this build was started with -image-file, so it runs with the local executor",
        ),
        ([], 1, "-output=PATH must be set for a local build: where to write the customized image"),
        (
            ["-output={image}"],
            1,
            "-output={image} is the source image; the source is never written, choose another name",
        ),
        (["-output={tmp}/exists.raw"], 1, "-output={tmp}/exists.raw already exists: remove it or choose another name"),
        (
            ["-output={tmp}/no/dir/out.raw"],
            1,
            "-output={tmp}/no/dir/out.raw: the directory {tmp}/no/dir does not exist",
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=200T"],
            1,
            'invalid value "200T" for flag -oem-size: unknown unit "T"; use a whole number followed by B, K, M or G (for example 500M), or a bare number of 512-byte sectors',
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=-200K"],
            1,
            'invalid value "-200K" for flag -oem-size: a size must start with a digit; use a whole number followed by B, K, M or G (for example 500M), or a bare number of 512-byte sectors',
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=+200K"],
            1,
            'invalid value "+200K" for flag -oem-size: a size must start with a digit; use a whole number followed by B, K, M or G (for example 500M), or a bare number of 512-byte sectors',
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=A45M"],
            1,
            'invalid value "A45M" for flag -oem-size: a size must start with a digit; use a whole number followed by B, K, M or G (for example 500M), or a bare number of 512-byte sectors',
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=8M"],
            1,
            'invalid value "8M" for flag -oem-size: oem-size must be at least 16M (the size of the OEM partition in a COS image)',
        ),
        (
            ["-output={tmp}/o.raw", "-oem-size=1G"],
            1,
            "the default disk size (10 GB) is too small for -oem-size=1G: the disk must be at least 11 GB (10 GB image + 1G OEM, rounded up to whole GB); pass -disk-size-gb=11 or a smaller -oem-size",
        ),
        (["-output={tmp}/o.raw", "-timeout=0s"], 1, "-timeout=0s: give a positive duration such as 1h0m0s"),
        (
            ["-output={tmp}/o.raw", "-timeout=1d"],
            2,
            'invalid value "1d" for flag -timeout: unknown unit "d" in duration "1d"; use Go duration syntax such as "1h0m0s", "90m" or "45s"',
        ),
        (
            ["-output={tmp}/o.raw", "-disk-size-gb=8"],
            1,
            "-disk-size-gb=8: give 0 (keep the image's 10 GB) or at least 10",
        ),
    ],
)
def test_finish_local_refusals(
    local_build: CLI, workspace_root: Path, tmp_path: Path, image_file: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "exists.raw").write_text("precious")
    before = snapshot(workspace_root)
    image_before = image_file.stat()
    fill = {"tmp": tmp_path, "image": image_file}
    result = local_build("finish-image-build", "-dry-run", *[a.format(**fill) for a in args])
    assert (result.code, result.err) == (code, f"cos-customizer: error: {message.format(**fill)}\n")
    assert result.out == ""
    assert snapshot(workspace_root) == before
    assert (tmp_path / "exists.raw").read_text() == "precious"
    assert image_file.stat().st_mtime_ns == image_before.st_mtime_ns


def test_finish_oem_size_edges_through_the_cli(local_build: CLI, tmp_path: Path) -> None:
    assert local_build("seal-oem").code == 0
    out = f"-output={tmp_path / 'o.raw'}"
    refused = local_build("finish-image-build", out, "-oem-size=2G", "-disk-size-gb=12", "-dry-run")
    assert refused.code == 1
    assert "the disk must be at least 13 GB" in refused.err
    accepted = local_build("finish-image-build", out, "-oem-size=2G", "-disk-size-gb=13", "-dry-run")
    assert accepted.code == 0, accepted.err
    assert json.loads(accepted.out)["provisioner_config"]["BootDisk"]["OEMSize"] == "4095M"


@pytest.mark.parametrize(
    ("argv", "step"),
    [
        (["install-gpu", "-version=535.104.05"], "install-gpu"),
        (["anthos-installer-install", "-pkgspec-url=pkgspec"], "anthos-installer-install"),
    ],
)
def test_finish_local_refuses_steps_it_cannot_run(
    local_build: CLI, workspace_root: Path, tmp_path: Path, argv: list[str], step: str
) -> None:
    assert local_build("run-script", "-script=preload.sh").code == 0
    assert local_build(*argv).code == 0
    result = local_build("finish-image-build", f"-output={tmp_path / 'o.raw'}", "-dry-run")
    assert result.code == 1
    assert result.err.startswith(f"cos-customizer: error: step 2 ({step}) cannot run on the local executor: ")
    assert result.err.endswith(
        "; use the gce executor (start-image-build with -image-project and -image-name, -image-family or "
        "-image-milestone)\n"
    )


# finish-image-build: GCE


GCE_FINISH = ["-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj"]


def test_finish_gce_dry_run(gce_build: CLI, workspace_root: Path, tmp_path: Path) -> None:
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("x")
    assert gce_build("install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}").code == 0
    assert gce_build("disable-auto-update").code == 0
    before = snapshot(workspace_root)
    result = gce_build(
        "finish-image-build",
        *GCE_FINISH,
        "-image-suffix=-custom",
        "-image-family=my-family",
        "-labels=b=2,a=1",
        "-licenses=projects/p/global/licenses/l",
        "-disk-size-gb=20",
        "-oem-size=1G",
        "-dry-run",
        env={"COS_CUSTOMIZER_COMPUTE_ENDPOINT": "http://127.0.0.1:9/compute/v1/"},
    )
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["executor"] == "gce"
    assert plan["output_image"] == {
        "Name": "cos-stable-109-17800-66-0-custom",
        "Project": "my-proj",
        "Family": "my-family",
        "Labels": {"a": "1", "b": "2"},
        "Licenses": ["projects/p/global/licenses/l"],
        "InheritLabels": False,
    }
    prov = plan["provisioner_config"]
    assert prov["BuildContexts"] == {"user": "gs://bucket/build-1/cos-customizer/user_build_context.tar"}
    assert prov["BootDisk"] == {"OEMSize": "1023M", "OEMFSSize4K": 0, "ReclaimSDA3": True, "WaitForDiskResize": True}
    assert prov["Steps"][0]["Args"]["GCSDepsPrefix"] == "gs://bucket/build-1/cos-customizer/gcs_files"
    build = plan["build_config"]
    assert (build["Zone"], build["Project"], build["MachineType"], build["DiskType"]) == (
        "us-west1-b",
        "my-proj",
        "n1-standard-1",
        "pd-standard",
    )
    assert build["GPUType"] == "nvidia-tesla-p100"
    assert build["GCEEndpoint"] == "http://127.0.0.1:9/compute/v1/"
    assert plan["workflow"]["Name"] == "build-image"
    assert plan["workflow"]["Steps"]["resize-disk"] == {"ResizeDisks": [{"Name": "boot-disk", "SizeGb": "20"}]}
    args = plan["daisy_args"]
    assert args[0] == "-compute_endpoint_override=http://127.0.0.1:9/compute/v1/projects/"
    assert args[args.index("-var:output_image_name") + 1] == "cos-stable-109-17800-66-0-custom"
    assert args[-1] == "<build-dir>/build_image.wf.json"
    assert snapshot(workspace_root) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-zone=z", "-project=p"], "one of -image-name or -image-suffix must be set"),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-image-suffix=b"],
            "-image-name and -image-suffix are mutually exclusive",
        ),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-deprecate-old-images"],
            "-deprecate-old-images can only be used if -image-family is set",
        ),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-old-image-ttl=60"],
            "-old-image-ttl can only be used if -deprecate-old-images is set",
        ),
        (  # stricter than the original, which passes a negative TTL on to Compute (docs/differences.md)
            [
                "-zone=z",
                "-project=p",
                "-image-name=a",
                "-image-family=f",
                "-deprecate-old-images",
                "-old-image-ttl=-60",
            ],
            "-old-image-ttl must be a number of seconds >= 0",
        ),
        # stricter than the original, which hands daisy a -default_timeout it cannot use (docs/differences.md)
        (
            ["-zone=z", "-project=p", "-image-name=a", "-timeout=0s"],
            "-timeout=0s: give a positive duration such as 1h0m0s",
        ),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-timeout=-5m"],
            "-timeout=-5m0s: give a positive duration such as 1h0m0s",
        ),
        (["-project=p", "-image-name=a"], "-zone must be set for a GCE build"),
        (["-zone=z", "-image-name=a"], "-project must be set for a GCE build"),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-sbom-input-path=s.json"],
            "-sbom-input-path and -sbom-output-path must be set together",
        ),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-output=/tmp/x.raw"],
            "-output is for local builds (started with -image-file); a GCE build makes a GCE image",
        ),
        (
            ["-zone=z", "-project=p", "-image-name=a", "-deprecate-old-images=maybe"],
            'invalid boolean value "maybe" for flag -deprecate-old-images: parse error',
        ),
    ],
)
def test_finish_gce_refusals(gce_build: CLI, workspace_root: Path, args: list[str], message: str) -> None:
    before = snapshot(workspace_root)
    result = gce_build("finish-image-build", "-dry-run", *args)
    assert (result.code, result.err) == (exit_code(message), f"cos-customizer: error: {message}\n")
    assert snapshot(workspace_root) == before


def test_finish_gce_without_daisy_is_refused_before_anything(gce_build: CLI, workspace_root: Path) -> None:
    before = snapshot(workspace_root)
    result = gce_build("finish-image-build", *GCE_FINISH, "-image-name=out")
    assert result.code == 1
    assert result.err == (
        "cos-customizer: error: daisy is not installed: put the daisy binary on PATH or set $COS_CUSTOMIZER_DAISY "
        "(github.com/GoogleCloudPlatform/compute-daisy)\n"
    )
    assert snapshot(workspace_root) == before


# Our extra commands


def test_build_provisioner_validates(cli: CLI) -> None:
    assert cli("build-provisioner").code == 1


# Errors: one line, tracebacks only with -debug


def test_debug_shows_the_traceback(cli: CLI, workspace_root: Path) -> None:
    plain = cli("seal-oem")
    assert "Traceback" not in plain.err
    debug = cli("-debug", "seal-oem")
    assert debug.code == 1
    assert "Traceback (most recent call last)" in debug.err
    assert debug.err.endswith(
        f"cos-customizer: error: no image build in progress in {workspace_root}: run start-image-build first\n"
    )


def test_console_script_exit_codes(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), "PATH": "/usr/bin:/bin"}
    exe = Path(sys.executable).parent / "cos-customizer"
    usage = subprocess.run([exe, "seal-oem", "-x"], env=env, capture_output=True, text=True, check=False)
    assert (usage.returncode, usage.stdout) == (2, "")
    assert (
        usage.stderr
        == "cos-customizer: error: flag provided but not defined: -x (see cos-customizer seal-oem --help)\n"
    )
    failure = subprocess.run([exe, "seal-oem"], env=env, capture_output=True, text=True, check=False)
    assert failure.returncode == 1
    assert failure.stderr.count("\n") == 1
    module = subprocess.run(
        [sys.executable, "-m", "cos_customizer", "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert module.returncode == 0 and "finish-image-build" in module.stdout


# Signals: cleanup runs, the previous workspace stays


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_start_keeps_the_previous_build(
    local_build: CLI,
    workspace_root: Path,
    context_dir: Path,
    image_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    sig: signal.Signals,
    code: int,
    request: pytest.FixtureRequest,
) -> None:
    # SIGINT as a command typed at a terminal gets it: a shell's background job starts with it ignored, and then
    # Python (this process) never turns it into KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    assert local_build("seal-oem").code == 0
    before = snapshot(workspace_root)
    real = buildcontext.create_archive

    def archive_then_signal(*args: object, **kwargs: object) -> int:
        real(*args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal should have stopped the build")

    monkeypatch.setattr(buildcontext, "create_archive", archive_then_signal)
    result = local_build("start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}")
    assert result.code == code
    assert "nothing was left half-written" in result.err
    assert snapshot(workspace_root) == before
    assert sorted(p.name for p in workspace_root.parent.iterdir() if p.name.startswith(".ws")) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_empty_flag_values_are_unset_flags(local_build: CLI, tmp_path: Path) -> None:
    """-oem-size= (an empty Cloud Build substitution) plans exactly what no -oem-size plans, as in the original."""
    assert local_build("seal-oem").code == 0
    out = f"-output={tmp_path / 'o.raw'}"
    plain = local_build("finish-image-build", out, "-dry-run")
    empty = local_build("finish-image-build", out, "-oem-size=", "-image-family=", "-zone=", "-dry-run")
    assert (plain.code, empty.code) == (0, 0), empty.err
    assert json.loads(empty.out)["provisioner_config"] == json.loads(plain.out)["provisioner_config"]
    assert json.loads(empty.out)["disk_plan"] == json.loads(plain.out)["disk_plan"]


def test_gce_dry_run_says_inherited_labels_are_read_at_build_time(gce_build: CLI) -> None:
    result = gce_build(
        "finish-image-build", *GCE_FINISH, "-image-name=out", "-inherit-labels", "-labels=a=1", "-dry-run"
    )
    assert result.code == 0, result.err
    said = "the source image's labels are read when the build starts (-labels wins); the dry run reads none"
    assert json.loads(result.out)["inherited_labels"] == said
    assert f"  labels:    {said}\n" in result.err


# A workspace as the original's start-image-build, run-script and seal-oem write it (encoding/json of its
# config.Image, config.Build and provisioner.Config: no omitempty on Build, nil slices as null, Env a string).
ORIGINAL_WORKSPACE = {
    "config/source_image": '{"name":"cos-stable-109-17800-66-0","Project":"cos-cloud"}',
    "config/build": '{"GCSBucket":"b","GCSDir":"w","Project":"","Zone":"","MachineType":"","ServiceAccount":"",'
    '"DiskType":"","DiskSize":0,"GPUType":"","Timeout":"","GCSFiles":null,"GCEEndpoint":"","Network":"","Subnet":""}',
    "config/provisioner": '{"BuildContexts":null,"BootDisk":{"OEMSize":"","OEMFSSize4K":0,"ReclaimSDA3":true,'
    '"WaitForDiskResize":false},"Steps":[{"Type":"RunScript","Args":{"BuildContext":"user","Path":"a.sh",'
    '"Env":"A=1,B=2"}},{"Type":"SealOEM","Args":null}]}',
}


def test_a_workspace_the_original_wrote_is_finished_here(cli: CLI, workspace_root: Path, context_dir: Path) -> None:
    for name, text in ORIGINAL_WORKSPACE.items():
        (workspace_root / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace_root / name).write_text(text)
    subprocess.run(["tar", "-cf", str(workspace_root / "user_build_context.tar"), "-C", str(context_dir), "."],
                   check=True)  # fmt: skip
    result = cli("finish-image-build", *GCE_FINISH, "-image-name=out", "-dry-run")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["source_image"] == {"Project": "cos-cloud", "name": "cos-stable-109-17800-66-0"}
    assert plan["provisioner_config"]["Steps"][0]["Args"]["Env"] == "A=1,B=2"
    assert plan["daisy_args"][plan["daisy_args"].index("-var:source_image") + 1] == (
        "projects/cos-cloud/global/images/cos-stable-109-17800-66-0"
    )


@pytest.fixture(autouse=True)
def _drivers(driver_bucket: str) -> str:
    """install-gpu checks plain versions against NVIDIA's bucket, as the original: an emulator stands in."""
    return driver_bucket


def test_get_valid_drivers_lists_the_originals_set(gce_build: CLI, workspace_root: Path) -> None:
    """The original's validDriverVersions: 390.46, plus the second path element of each object under tesla/."""
    before = snapshot(workspace_root)
    result = gce_build("install-gpu", "-get-valid-drivers")
    assert result.code == 0, result.err
    assert result.out == "390.46\n450.51.06\n535.104.05\n"
    assert "Valid driver versions are: [390.46 450.51.06 535.104.05]" in result.err
    assert snapshot(workspace_root) == before
