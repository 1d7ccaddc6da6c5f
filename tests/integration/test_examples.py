"""The YAML files of examples/ and deploy/: each parses, and each cos-customizer invocation in them (a
Cloud Build step of the step image, or a command line of a GitHub Actions step) parses with the
command line's own flag parser, so the examples cannot drift from the real flags. The GitHub Actions
example's build is also run here, as it is written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cos_customizer import privilege
from cos_customizer.cli.flags import parse
from cos_customizer.cli.main import COMMANDS, GLOBAL_FLAGS, VERSION_FLAG
from cos_customizer.disk import gpt
from cos_customizer.errors import UsageError
from tests.integration.test_local_build import cat

REPO = Path(__file__).resolve().parents[2]
FILES = sorted(path for folder in ("examples", "deploy") for path in (REPO / folder).rglob("*.y*ml"))
# Cloud Build's own substitutions, with values of their kind.
BUILT_IN = {"PROJECT_ID": "my-project", "BUILD_ID": "0f1e2d3c", "PROJECT_NUMBER": "123456789", "LOCATION": "us",
            "REPO_NAME": "repo", "BRANCH_NAME": "main", "TAG_NAME": "v1", "COMMIT_SHA": "abc123", "SHORT_SHA": "abc1"}  # fmt: skip
WORKFLOW = REPO / "examples/github-actions/cos-image.yml"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def substitute(text: str, values: dict[str, str]) -> str:
    """Cloud Build's substitution: $NAME and ${NAME} replaced, $$ is a dollar; an unknown name fails."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(2)
        assert name in values, f"substitution ${name} has no value: add it to the file's substitutions"
        return values[name]

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, text)


def substitutions(document: dict[str, Any]) -> dict[str, str]:
    values = {**BUILT_IN, **{k: str(v) for k, v in (document.get("substitutions") or {}).items()}}
    for _ in range(3):  # dynamic substitutions may name each other
        values = {k: substitute(v, values) for k, v in values.items()}
    return values


def check_invocation(argv: list[str], where: str) -> str:
    """Parse `argv` (what follows `cos-customizer`) as main does: global flags, the step, its flags."""
    head = parse((*GLOBAL_FLAGS, VERSION_FLAG), argv, command="", interspersed=False)
    if not head.positional:
        assert head.values["version"], f"{where}: no step in {argv}"
        return "-version"
    name, *rest = head.positional
    assert name in COMMANDS, f"{where}: unknown step {name}"
    command = COMMANDS[name]
    parsed = parse((*command.flags, *GLOBAL_FLAGS), rest, command=name)
    assert len(parsed.positional) == len(command.positional), f"{where}: {name} takes {command.positional}"
    return name


def cloudbuild_invocations(path: Path) -> list[list[str]]:
    """The args of each step that runs the step image (its name ends in cos-customizer[:tag]), substituted,
    and the cos-customizer command lines of shell steps (`docker run IMAGE ...`)."""
    document = load(path)
    values = substitutions(document)
    found = []
    for step in document["steps"]:
        name = substitute(step["name"], values)
        args = [substitute(arg, values) for arg in step.get("args", [])]
        if re.search(r"/cos-customizer(:[\w.-]+)?$", name):
            found.append(args)
        elif step.get("entrypoint") == "bash":
            for line in args[-1].splitlines():
                words = shlex.split(line)
                image = next((i for i, word in enumerate(words) if word.endswith("cos-customizer:latest")), None)
                if words[:2] == ["docker", "run"] and image is not None:  # not another image's container
                    found.append(words[image + 1 :])
    return found


def workflow_invocations(path: Path) -> list[list[str]]:
    """The cos-customizer command lines of a GitHub Actions workflow's `run:` steps."""
    found = []
    for job in load(path)["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                words = shlex.split(line)
                commands = [i for i, word in enumerate(words) if word.endswith("/cos-customizer")]
                if commands:
                    found.append(words[commands[0] + 1 :])
    return found


def test_there_are_the_examples_the_readme_names() -> None:
    names = {str(path.relative_to(REPO)) for path in FILES}
    assert names == {"deploy/cloudbuild.yaml", "examples/preload/cloudbuild.yaml", "examples/gpu/cloudbuild.yaml",
                     "examples/sealed-oem/cloudbuild.yaml", "examples/github-actions/cos-image.yml",
                     "examples/build-file/build.yaml"}  # fmt: skip


@pytest.mark.parametrize("path", FILES, ids=[str(path.relative_to(REPO)) for path in FILES])
def test_each_file_parses_and_starts_with_a_comment(path: Path) -> None:
    assert isinstance(load(path), dict)
    assert path.read_text().startswith("# ")


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("examples/preload/cloudbuild.yaml", ["start-image-build", "run-script", "finish-image-build"]),
        ("examples/gpu/cloudbuild.yaml", ["start-image-build", "install-gpu", "finish-image-build"]),
        ("examples/sealed-oem/cloudbuild.yaml",
         ["start-image-build", "run-script", "seal-oem", "disable-auto-update", "finish-image-build"]),
        ("deploy/cloudbuild.yaml", ["-version"]),
    ],
)  # fmt: skip
def test_cloud_build_steps_parse_with_our_flags(path: str, steps: list[str]) -> None:
    found = cloudbuild_invocations(REPO / path)
    assert [check_invocation(argv, path) for argv in found] == steps


def test_cloud_build_scripts_are_in_the_build_context() -> None:
    """Each run-script names a script beside the cloudbuild.yaml (the example's build context)."""
    for path in FILES:
        for argv in cloudbuild_invocations(path) if path.name == "cloudbuild.yaml" else []:
            if argv[0] == "run-script":
                script = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("-script="))
                assert os.access(path.parent / script, os.X_OK), f"{path}: {script}"


def test_the_deploy_file_builds_this_dockerfile_and_pushes_the_version() -> None:
    document = load(REPO / "deploy/cloudbuild.yaml")
    script = document["steps"][0]["args"][-1]
    version = re.search(r"sed -n '(.*)' pyproject.toml", script)
    assert version is not None
    sed = subprocess.run(["sed", "-n", substitute(version.group(1), {}), str(REPO / "pyproject.toml")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    from cos_customizer import __version__

    assert sed.stdout.strip() == __version__
    assert 'docker push "${_IMAGE}:$${version}"' in script


def test_workflow_steps_parse_with_our_flags() -> None:
    steps = [check_invocation(argv, "cos-image.yml") for argv in workflow_invocations(WORKFLOW)]
    assert steps == ["sample-image", "start-image-build", "run-script", "seal-oem", "disable-auto-update",
                     "finish-image-build"]  # fmt: skip


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="the local build mounts the image's file systems: it needs root")
def test_the_workflows_local_build_runs_as_written(tmp_path: Path) -> None:
    """The workflow's Customize step, line by line, with this checkout's cos-customizer (root already)."""
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "examples", work / "examples")
    home = tmp_path / "home"
    home.mkdir()
    cos_customizer = str(Path(sys.executable).parent / "cos-customizer")
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    for argv in workflow_invocations(WORKFLOW):
        result = subprocess.run([cos_customizer, *argv], cwd=work, env=env, capture_output=True, text=True,
                                check=False, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"{argv}: {result.stderr}"
    output = work / "custom.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(output)], capture_output=True, text=True, check=True)
    assert listing.stdout == "disk.raw\n"
    subprocess.run(["tar", "-xzf", str(output), "-C", str(tmp_path)], check=True)
    raw = tmp_path / "disk.raw"
    table = gpt.read_table(raw)
    assert table.disk_sectors * 512 == 12 << 30
    state, oem = table.partition(1), table.partition(8)
    assert oem.size * 512 >= 1 << 30
    assert cat(raw, state.first * 512, "/var_overlay/lib/hello") == "Hello, World!\n"
    assert cat(raw, oem.first * 512, "/built-by") == "built by GitHub Actions\n"


@pytest.mark.parametrize(
    "argv",
    [["seal-oem", "-oem-size=1G"], ["finish-image-build", "-disk-size-gb=twelve"], ["run-script", "-script"],
     ["no-such-step"], ["sample-image"]],
)  # fmt: skip
def test_the_check_refuses_what_the_command_line_refuses(argv: list[str]) -> None:
    with pytest.raises((UsageError, AssertionError)):
        check_invocation(argv, "test")


BUILD_FILE = REPO / "examples/build-file/build.yaml"


def build_file_copy(tmp_path: Path) -> Path:
    """The build-file example copied, with a sample image as its cos.raw (what its comment says to make)."""
    work = tmp_path / "build-file"
    shutil.copytree(BUILD_FILE.parent, work)
    cos_customizer = str(Path(sys.executable).parent / "cos-customizer")
    subprocess.run([cos_customizer, "sample-image", str(work / "cos.raw")], check=True, capture_output=True)
    return work


def test_the_build_file_example_is_valid_for_the_shipped_schema() -> None:
    import json

    import jsonschema

    schema = json.loads((REPO / "src/cos_customizer/build-file.schema.json").read_text())
    jsonschema.validate(load(BUILD_FILE), schema)
    assert "$schema=../../src/cos_customizer/build-file.schema.json" in BUILD_FILE.read_text()


def test_the_build_file_example_dry_runs_from_anywhere(tmp_path: Path) -> None:
    work = build_file_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    cos_customizer = str(Path(sys.executable).parent / "cos-customizer")
    result = subprocess.run([cos_customizer, "build", "-dry-run", str(work / "build.yaml")], cwd=tmp_path,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)}, capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"  output:    {work / 'custom.tar.gz'} (tar.gz)\n" in result.stderr
    assert "    1. run-script hello.sh (env: GREETING=Hello, World!)\n" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["build.yaml", "context", "cos.raw"]


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="the local build mounts the image's file systems: it needs root")
def test_the_build_file_example_builds(tmp_path: Path) -> None:
    work = build_file_copy(tmp_path)
    cos_customizer = str(Path(sys.executable).parent / "cos-customizer")
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([cos_customizer, "build", "build.yaml"], cwd=work, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)}, check=False, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    subprocess.run(["tar", "-xzf", str(work / "custom.tar.gz"), "-C", str(tmp_path)], check=True)
    raw = tmp_path / "disk.raw"
    table = gpt.read_table(raw)
    assert cat(raw, table.partition(1).first * 512, "/var_overlay/lib/hello") == "Hello, World!\n"
    assert cat(raw, table.partition(8).first * 512, "/built-by") == "built from one build file\n"
