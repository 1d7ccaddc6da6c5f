"""`-executor=qemu` before anything boots: the plan, the refusals, and daisy's arguments read back.

The oracle for the workflow is the GCE build's own rendering (the dry run of a GCE build of the same
steps): a rehearsal must run the same document with the same provisioner steps, differing only in
what names the source, the bucket and the build context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cos_customizer.errors import BuildFailed, ValidationError
from cos_customizer.executors import Executor, check_supported
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu import rehearsal
from cos_customizer.provisioner.config import InstallGPUArgs, ProvisionerConfig, Step
from tests.conftest import CLI


def _steps(cli: CLI, env: dict[str, str] | None = None) -> None:
    for argv in (["run-script", "-script=preload.sh", "-env=A=1,B=x y"], ["seal-oem"], ["disable-auto-update"]):
        result = cli(*argv, env=env)
        assert result.code == 0, result.err


def test_the_dry_run_shows_the_gce_workflow_with_local_names(
    local_build: CLI, context_dir: Path, tmp_path: Path
) -> None:
    _steps(local_build)
    output = tmp_path / "out.tar.gz"
    result = local_build("finish-image-build", "-executor=qemu", "-oem-size=1G", "-disk-size-gb=12",
                         f"-output={output}", "-dry-run")  # fmt: skip
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["executor"] == "qemu"
    assert plan["output"] == {"path": str(output), "format": "tar.gz"}
    args = plan["daisy_args"]
    assert args[args.index("-var:source_image") + 1] == "projects/cos-customizer-local/global/images/cos-raw"
    assert args[args.index("-gcs_path") + 1] == "gs://cos-customizer-local/cos-customizer"
    assert args[args.index("-project") + 1] == "cos-customizer-local"
    config = plan["provisioner_config"]
    assert config["BuildContexts"] == {"user": "gs://cos-customizer-local/cos-customizer/user_build_context.tar"}
    assert config["BootDisk"]["WaitForDiskResize"] is True
    assert "executor:  qemu" in result.err and "partitions (sectors; disk 20971520 -> 25165824)" in result.err
    assert not output.exists()

    # The GCE build of the same steps (in a workspace of its own) renders the same workflow: shared code.
    env = {"COS_CUSTOMIZER_WORKDIR": str(tmp_path / "gce-workspace")}
    started = local_build("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                          "-image-name=cos-stable-109-17800-66-0", "-gcs-bucket=bucket", "-gcs-workdir=w",
                          env=env)  # fmt: skip
    assert started.code == 0, started.err
    _steps(local_build, env)
    gce = local_build("finish-image-build", "-oem-size=1G", "-disk-size-gb=12", "-zone=z", "-project=p",
                      "-image-name=out", "-dry-run", env=env)  # fmt: skip
    assert gce.code == 0, gce.err
    gce_plan = json.loads(gce.out)
    assert plan["workflow"]["Steps"] == gce_plan["workflow"]["Steps"]
    assert plan["workflow"]["Dependencies"] == gce_plan["workflow"]["Dependencies"]
    assert plan["provisioner_config"]["Steps"] == gce_plan["provisioner_config"]["Steps"]
    assert plan["provisioner_config"]["BootDisk"] == gce_plan["provisioner_config"]["BootDisk"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-executor=vmware"], "-executor=vmware: use local or qemu (gce is chosen by starting from a GCE image)"),
        (["-executor=qemu", "-gpu-type=nvidia-tesla-t4"],
         "-gpu-type applies to GCE builds only; this build was started with -image-file, so it runs with the qemu "
         "executor"),
        (["-executor=qemu", "-allow-host-loopback"],
         "-allow-host-loopback is for the local executor's script sandbox; the qemu executor's VM has its own network "
         "and its own container daemons"),
        (["-executor=qemu", "-containers=off"],
         "-containers is for the local executor's script sandbox; the qemu executor's VM has its own network and its "
         "own container daemons"),
        (["-executor=qemu", "-provisioner-binary=/nonexistent/provisioner"],
         "-provisioner-binary=/nonexistent/provisioner: no such file"),
    ],
)  # fmt: skip
def test_refused_before_anything(local_build: CLI, tmp_path: Path, args: list[str], message: str) -> None:
    result = local_build("finish-image-build", f"-output={tmp_path / 'out.raw'}", *args)
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == f"cos-customizer: error: {message}"
    assert not (tmp_path / "out.raw").exists()


def test_install_gpu_cannot_be_rehearsed(local_build: CLI, tmp_path: Path) -> None:
    # The CLI refuses install-gpu on a build started with -image-file when the step is added; the executor
    # check is the second line of defence (a workspace edited by hand).
    config = ProvisionerConfig(steps=(Step(InstallGPUArgs(nvidia_driver_version="535.104.05")),))
    with pytest.raises(ValidationError, match=r"step 1 \(install-gpu\) cannot run on the qemu executor: the QEMU VM "
                                              r"has no GPU"):  # fmt: skip
        check_supported(Executor.QEMU, config)


def test_gce_sources_are_not_rehearsed(gce_build: CLI) -> None:
    result = gce_build("finish-image-build", "-executor=qemu", "-zone=z", "-project=p", "-image-name=o", "-dry-run")
    assert result.code == 1
    assert "-executor is for builds started with -image-file" in result.err


def test_daisy_arguments_read_back_satisfy_the_workflow(local_build: CLI, tmp_path: Path) -> None:
    """What `daisy_invocation` reads from daisy's argument list is what daisy_local.load (Daisy's var rules:
    every Required var given, no unknown one) accepts for the rendered workflow."""
    _steps(local_build)
    plan = json.loads(local_build("finish-image-build", "-executor=qemu", "-oem-size=1G", "-disk-size-gb=12",
                                  f"-output={tmp_path / 'o.raw'}", "-dry-run").out)  # fmt: skip
    invocation = rehearsal.daisy_invocation(plan["daisy_args"])
    assert invocation.workflow_path == "<build-dir>/build_image.wf.json"
    assert invocation.default_timeout == "1h0m0s"
    assert invocation.vars["disk_type"] == "pd-standard"
    document = plan["workflow"]
    (tmp_path / "startup.yaml").write_text("#cloud-config\n")
    document["Sources"] = {"cloud-config": "startup.yaml"}
    loaded = daisy_local.load(document, invocation.vars, workflow_dir=tmp_path,
                              autovars={"SOURCESPATH": "gs://b/s", "ZONE": "z", "PROJECT": "p"})  # fmt: skip
    assert loaded.steps["resize-disk"].body == [{"Name": "boot-disk", "SizeGb": "12"}]
    assert loaded.vars["source_image"] == "projects/cos-customizer-local/global/images/cos-raw"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-var:a", "1", "-bogus", "wf.json"], "daisy argument -bogus is not understood by the qemu executor"),
        (["-var:a"], "daisy argument -var:a has no value"),
        (["-compute_endpoint_override=http://x/", "wf.json"], "-compute-endpoint has no meaning"),
        (["a.json", "b.json"], "daisy arguments name 2 workflow files, expected one"),
    ],
)
def test_daisy_arguments_we_cannot_honour(args: list[str], message: str) -> None:
    with pytest.raises(BuildFailed, match=message):
        rehearsal.daisy_invocation(args)
