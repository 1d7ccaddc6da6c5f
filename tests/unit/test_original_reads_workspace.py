"""A workspace this tool starts and steps can be finished by the Go original.

The oracle is `tests.go_provisioner_config`, a reading of config/provisioner with the original's Go types
(written from its source, sharing no code with the tool): before this, every RunScript step stored Env as
a JSON list, and the original's provisioner failed with "cannot unmarshal array into Go struct field
RunScriptStep.Env of type string".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cos_customizer.provisioner.config import ProvisionerConfig
from tests import go_provisioner_config
from tests.conftest import CLI


def provisioner_text(workspace_root: Path) -> str:
    return (workspace_root / "config/provisioner").read_text()


def test_every_step_of_a_local_workspace_reads_with_the_originals_types(local_build: CLI, workspace_root: Path) -> None:
    for argv in (
        ["run-script", "-script=preload.sh", "-env=B=2,A=1"],
        ["run-script", "-script=preload.sh"],
        ["seal-oem"],
        ["disable-auto-update"],
    ):
        result = local_build(*argv)
        assert result.code == 0, result.err
    config = go_provisioner_config.read_config(provisioner_text(workspace_root))
    assert [step["Type"] for step in config["Steps"]] == ["RunScript", "RunScript", "SealOEM", "DisableAutoUpdate"]
    # The original sorts -env's pairs and joins them with commas (run_script.go: createEnvString).
    assert config["Steps"][0]["Args"] == {"BuildContext": "user", "Path": "preload.sh", "Env": "A=1,B=2"}
    assert config["Steps"][1]["Args"]["Env"] == ""
    assert config["BootDisk"]["ReclaimSDA3"] is True


def test_install_gpu_reads_with_the_originals_types(gce_build: CLI, workspace_root: Path, tmp_path: Path) -> None:
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "NVIDIA-Linux-x86_64-450.51.06.run").write_text("x")
    result = gce_build("install-gpu", "-version=NVIDIA-Linux-x86_64-450.51.06.run", f"-deps-dir={deps}",
                       "-md5sum=" + "a" * 32)  # fmt: skip
    assert result.code == 0, result.err
    (step,) = go_provisioner_config.read_config(provisioner_text(workspace_root))["Steps"]
    assert step["Args"]["NvidiaDriverVersion"] == "NVIDIA-Linux-x86_64-450.51.06.run"
    assert step["Args"]["NvidiaDriverMD5Sum"] == "a" * 32
    assert step["Args"]["NvidiaInstallDirHost"] == "/var/lib/nvidia"


def test_a_value_holding_a_comma_keeps_the_list_which_only_this_provisioner_reads(
    local_build: CLI, workspace_root: Path
) -> None:
    """The original cannot carry LIST=x,y at all (its string splits at every comma): the list form stays."""
    assert local_build("run-script", "-script=preload.sh", "-env=LIST=x,y", "-env=A=1").code == 0
    text = provisioner_text(workspace_root)
    assert json.loads(text)["Steps"][0]["Args"]["Env"] == ["A=1", "LIST=x,y"]
    with pytest.raises(go_provisioner_config.GoDecodeError) as caught:
        go_provisioner_config.read_config(text)
    assert str(caught.value) == (
        "error parsing step 0 (RunScript): json: cannot unmarshal array into Go struct field RunScriptStep.Env "
        "of type string"
    )
    (step,) = ProvisionerConfig.from_json(json.loads(text)).steps
    assert step.args.env == ("A=1", "LIST=x,y")  # type: ignore[attr-defined]


def test_the_go_reader_is_strict_where_go_is() -> None:
    """The oracle itself: Go's zero values for null, case-insensitive names, unknown fields ignored."""
    config = go_provisioner_config.read_config(
        '{"buildcontexts":null,"BootDisk":{"oemfssize4k":7,"Other":1},"Steps":[{"Type":"SealOEM","Args":null}],'
        '"_Private":true}'
    )
    assert config["BootDisk"] == {"OEMSize": "", "OEMFSSize4K": 7, "ReclaimSDA3": False, "WaitForDiskResize": False}
    for bad, message in (
        ('{"BootDisk":{"OEMFSSize4K":-1}}', "cannot unmarshal number into Go struct field BootDiskConfig.OEMFSSize4K"),
        ('{"Steps":[{"Type":"Nope"}]}', "unknown step type"),
        (
            '{"BuildContexts":{"user":1}}',
            "cannot unmarshal number into Go struct field Config.BuildContexts of type string",
        ),
    ):
        with pytest.raises(go_provisioner_config.GoDecodeError, match=re.escape(message)):
            go_provisioner_config.read_config(bad)
