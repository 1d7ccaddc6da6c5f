"""`cos-customizer build [-dry-run] FILE`: one YAML file for a whole build.

Oracles: the step commands themselves (the plan `finish-image-build -dry-run` prints after the same
steps given one by one, the flags the command line parses from the equivalent `-name=value`
arguments, the error the step command gives for the same bad value); line numbers and key paths
counted in the YAML text the test writes; the stock `jsonschema` validator for the shipped schema;
sgdisk and debugfs for what a real build wrote into the image.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cos_customizer import privilege
from cos_customizer.cli import boot, buildfile, finish, finish_flags, flags, start
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.main import COMMANDS, ORIGINAL_STEPS
from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu import vm
from tests.conftest import CLI, sh, snapshot

TABLE = buildfile.Table.of(ORIGINAL_STEPS)
IS_ROOT = privilege.can_mount()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """TMPDIR for the build: where its temporary workspace goes (and must be gone from afterwards)."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def project(tmp_path: Path, sample_raw: Path) -> Path:
    """A directory with a build context `ctx` holding preload.sh; the sample image is reached as `cos.raw`."""
    path = tmp_path / "project"
    (path / "ctx").mkdir(parents=True)
    (path / "ctx" / "preload.sh").write_text("echo hello > /var/lib/hello\n")
    (path / "cos.raw").symlink_to(sample_raw)
    return path


def state_dir(err: str) -> Path:
    """The workspace start-image-build reported (the build's temporary one)."""
    found = re.search(r"state in (\S+)\)", err)
    assert found, err
    return Path(found[1])


def plan_text(err: str) -> str:
    return err[err.index("Plan (dry run") :]


# The plan: the same as the step commands'

LOCAL_FILE = """\
source:
  image-file: cos.raw
build-context: ctx
steps:
  - run-script: {script: preload.sh, env: [A=1, "LIST=x,y"]}
  - seal-oem
  - disable-auto-update:
finish:
  oem-size: 1G
  disk-size-gb: 12
  timeout: 30m
  output: custom.tar.gz
"""


@pytest.mark.parametrize("given_workdir", [False, True], ids=["temporary-workspace", "local-state-workdir"])
def test_dry_run_prints_the_step_commands_plan(
    cli: CLI, project: Path, tmp_path: Path, scratch: Path, workspace_root: Path, given_workdir: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    (project / "build.yaml").write_text(LOCAL_FILE)
    by_steps = [
        cli("start-image-build", f"-build-context={project / 'ctx'}", f"-image-file={project / 'cos.raw'}"),
        cli("run-script", "-script=preload.sh", "-env=A=1", "-env=LIST=x,y"),
        cli("seal-oem"),
        cli("disable-auto-update"),
        cli("finish-image-build", "-oem-size=1G", "-disk-size-gb=12", "-timeout=30m",
            f"-output={project / 'custom.tar.gz'}", "-dry-run"),
    ]  # fmt: skip
    assert [r.code for r in by_steps] == [0] * 5, [r.err for r in by_steps]
    expected = by_steps[-1]
    before = snapshot(workspace_root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths in the file are the file's, not the working directory's
    workdir = [f"-local-state-workdir={workspace_root}"] if given_workdir else []
    built = cli(*workdir, "build", "-dry-run", "../project/build.yaml", env={"TMPDIR": str(scratch)})
    assert built.code == 0, built.err
    assert Path.cwd() == elsewhere
    used = state_dir(built.err)
    if given_workdir:
        assert used == workspace_root
        assert built.out == expected.out
        assert snapshot(workspace_root) == before  # the same workspace, made anew by the same steps
    else:
        assert used.parent.parent == scratch
        assert built.out.replace(str(used), str(workspace_root)) == expected.out
        assert snapshot(workspace_root) == before  # the step commands' workspace was not touched
    assert plan_text(built.err) == plan_text(expected.err)
    assert list(scratch.iterdir()) == []
    assert not (project / "custom.tar.gz").exists()


GCE_FILE = """\
source:
  image-project: cos-cloud
  image-name: cos-stable-109-17800-66-0
  gcs-bucket: bucket
  gcs-workdir: build-1
  build-context: ctx
steps:
  - run-script:
      script: preload.sh
      env: "A=1,B=2"
  - seal-oem: {}
finish:
  zone: us-west1-b
  project: my-proj
  image-project: my-proj
  image-name: out
  image-family: fam
  labels: [team=infra, "purpose=a,b"]
  licenses: [l1, "l2,l3"]
  disk-size-gb: "0x10"
  deprecate-old-images: true
  old-image-ttl: 3600
"""


def test_dry_run_of_a_gce_build_prints_the_step_commands_plan(
    cli: CLI, project: Path, scratch: Path, workspace_root: Path
) -> None:
    (project / "build.yaml").write_text(GCE_FILE)
    by_steps = [
        cli("start-image-build", f"-build-context={project / 'ctx'}", "-image-project=cos-cloud",
            "-image-name=cos-stable-109-17800-66-0", "-gcs-bucket=bucket", "-gcs-workdir=build-1"),
        cli("run-script", "-script=preload.sh", "-env=A=1,B=2"),
        cli("seal-oem"),
        cli("finish-image-build", "-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj",
            "-image-name=out", "-image-family=fam", "-labels=team=infra", "-labels=purpose=a,b", "-licenses=l1",
            "-licenses=l2,l3", "-disk-size-gb=0x10", "-deprecate-old-images", "-old-image-ttl=3600", "-dry-run"),
    ]  # fmt: skip
    assert [r.code for r in by_steps] == [0] * 4, [r.err for r in by_steps]
    built = cli("build", str(project / "build.yaml"), "-dry-run", env={"TMPDIR": str(scratch)})
    assert built.code == 0, built.err
    assert built.out == by_steps[-1].out
    assert plan_text(built.err) == plan_text(by_steps[-1].err)
    assert list(scratch.iterdir()) == []


def test_a_mapping_gives_values_literally(cli: CLI, project: Path, scratch: Path) -> None:
    """{K: V}: the value as written, commas and '=' included (which -env=K=V on a command line would split)."""
    (project / "build.yaml").write_text(
        "source: {image-file: cos.raw, build-context: ctx}\n"
        "steps:\n"
        "  - run-script: {script: preload.sh, env: {LIST: 'a,b=c', N: 010, FLAG: yes}}\n"
        "finish: {output: out.raw}\n"
    )
    built = cli("build", "-dry-run", str(project / "build.yaml"), env={"TMPDIR": str(scratch)})
    assert built.code == 0, built.err
    (step,) = json.loads(built.out)["provisioner_config"]["Steps"]
    assert step["Args"]["Env"] == ["FLAG=yes", "LIST=a,b=c", "N=010"]


# Values: each one exactly as the command line takes `-name=value`


@pytest.mark.parametrize(
    ("fragment", "argv"),
    [
        ("disk-size-gb: 12", ["-disk-size-gb=12"]),
        ('disk-size-gb: "0x10"', ["-disk-size-gb=0x10"]),
        ("disk-size-gb: 010", ["-disk-size-gb=010"]),  # octal to YAML 1.1 and to Go alike
        ("disk-size-gb: 0x1F", ["-disk-size-gb=31"]),
        ("oem-size: 1G", ["-oem-size=1G"]),
        ("oem-size: 65536", ["-oem-size=65536"]),  # a number given to a string flag: its text
        ('oem-size: ""', ["-oem-size="]),  # an empty string flag is the flag not given, as on a command line
        ("inherit-labels: true", ["-inherit-labels"]),
        ("inherit-labels: no", ["-inherit-labels=false"]),
        ('inherit-labels: "F"', ["-inherit-labels=F"]),
        ("timeout: 1h30m", ["-timeout=1h30m"]),
        ('labels: [a=1, "b=2,c=3"]', ["-labels=a=1", "-labels=b=2,c=3"]),
        ('labels: "a=1,b=x,y"', ["-labels=a=1,b=x,y"]),
        ('licenses: [a, "b,c", 7]', ["-licenses=a", "-licenses=b,c", "-licenses=7"]),
        ("licenses: a,b", ["-licenses=a,b"]),
        ("output: out.raw", ["-output=out.raw"]),
    ],
)
def test_values_are_taken_as_the_command_line_takes_them(tmp_path: Path, fragment: str, argv: list[str]) -> None:
    path = tmp_path / "build.yaml"
    path.write_text(f"source: {{image-file: cos.raw}}\nfinish:\n  {fragment}\n")
    (*_, last) = buildfile.read(str(path), TABLE).invocations
    expected = flags.parse(finish_flags.FLAGS, argv, command="finish-image-build")
    assert (last.parsed.values, last.parsed.given) == (expected.values, expected.given)


def test_build_dry_run_sets_finish_dry_run(tmp_path: Path) -> None:
    path = tmp_path / "build.yaml"
    path.write_text("source: {image-file: cos.raw}\nfinish: {dry-run: false}\n")
    assert buildfile.read(str(path), TABLE, dry_run=True).invocations[-1].parsed["dry-run"] is True
    assert buildfile.read(str(path), TABLE).invocations[-1].parsed["dry-run"] is False


# Refusals: one line, FILE:LINE: key path


NOT_STEPS = "run-script, install-gpu, seal-oem, disable-auto-update, anthos-installer-install"
HEAD = "source: {image-file: cos.raw}\n"
REFUSED = [
    ("sorce: {image-file: a}\n",
     'build.yaml:1: sorce: unknown key "sorce" (did you mean source?); a build file has source, build-context, '
     "steps, finish, boot"),
    (HEAD + "steps:\n  - seal-oem\n  - run-scrip: {script: a.sh}\nfinish: {}\n",
     f'build.yaml:4: steps[1].run-scrip: unknown step "run-scrip" (did you mean run-script?); the steps are {NOT_STEPS}'),
    (HEAD + "steps: [start-image-build]\nfinish: {}\n",
     "build.yaml:2: steps[0].start-image-build: start-image-build is the file's source (and build-context), not a step"),
    (HEAD + "steps:\n  - run-script: {script: a.sh, envv: [A=1]}\nfinish: {}\n",
     "build.yaml:3: steps[0].run-script.envv: run-script has no flag -envv (did you mean env?); "
     "see cos-customizer run-script --help"),
    (HEAD + "steps:\n  - run-script:\n      script: a.sh\n      env: [A=1, 5]\nfinish: {}\n",
     'build.yaml:5: steps[0].run-script.env[1]: expected a "K=V" string, not the integer 5 '
     '(quote it to give the text: "5")'),
    (HEAD + "steps:\n  - {seal-oem: , disable-auto-update: }\nfinish: {}\n",
     "build.yaml:3: steps[0]: a step is one step name, with its flags or nothing: "
     "'- run-script: {script: preload.sh}' or '- seal-oem'"),
    (HEAD + "steps: seal-oem\nfinish: {}\n", "build.yaml:2: steps: expected a list of steps, not the string 'seal-oem'"),
    (HEAD + "finish:\n  output: o.raw\n  disk-size-gb: 12.5\n",
     "build.yaml:4: finish.disk-size-gb: expected an integer, not the number 12.5"),
    (HEAD + "finish:\n  network: no\n",
     'build.yaml:3: finish.network: expected a string, not the boolean no (quote it to give the text: "no")'),
    (HEAD + "finish:\n  dry-run: [true]\n", "build.yaml:3: finish.dry-run: expected true or false, not a list"),
    (HEAD + "finish:\n  timeout: 3600\n",
     'build.yaml:3: finish.timeout: expected a duration such as "30m" or "1h30m", not the integer 3600 '
     '(quote it to give the text: "3600")'),
    (HEAD + "finish:\n  labels: {a=b: c}\n",
     "build.yaml:3: finish.labels: 'a=b' cannot be a key: a key is not empty and has no '='"),
    (HEAD + "finish: []\n", "build.yaml:2: finish: expected a mapping of finish-image-build's flags, not a list"),
    (HEAD + "build-context: ctx\nsource: {}\nfinish: {}\n", "build.yaml:3: source: given twice (first on line 1)"),
    ("source: {image-file: a, build-context: x}\nbuild-context: y\nfinish: {}\n",
     "build.yaml:2: build-context: given both here and in source: keep one"),
    ("source: &src {image-file: a}\nfinish: *src\n",
     "build.yaml:2: the YAML alias *src is not accepted in a build file: write the value out"),
    (HEAD + "finish: {output: !!python/object:os.system x}\n",
     "build.yaml:2: finish.output: the YAML tag tag:yaml.org,2002:python/object:os.system is not accepted in a "
     "build file"),
    (HEAD + "finish: {output: o.raw\n",
     "build.yaml:3: not valid YAML: while parsing a flow mapping; expected ',' or '}', but got '<stream end>'"),
    ("", "build.yaml:1: a build file is a mapping with source, steps and finish (see cos-customizer build -print-schema)"),
    ("- source\n",
     "build.yaml:1: a build file is a mapping with source, steps and finish (see cos-customizer build -print-schema)"),
    (HEAD, "build.yaml:1: finish is missing (e.g. finish: {output: out.raw})"),
    ("\nfinish: {}\n", "build.yaml:2: source is missing (e.g. source: {image-file: cos.raw})"),
]  # fmt: skip


LOCAL_HEAD = HEAD + "finish: {output: o.raw}\n"
BOOT_REFUSED = [
    (LOCAL_HEAD + "boot:\n  success-match: ok\n  image-file: x.raw\n",
     "build.yaml:5: boot.image-file: the image booted is the build's output (finish's output): boot takes no "
     "image-file"),
    ("source: {image-project: cos-cloud, image-name: x}\nfinish: {image-name: y}\nboot: {success-match: ok}\n",
     "build.yaml:3: boot: a GCE build has no local output to boot; boot needs a local build "
     "(source: {image-file: ...}, finish: {output: ...})"),
    (HEAD + "finish: {}\nboot: {success-match: ok}\n", "build.yaml:3: boot: boot boots the build's output: set "
     "finish's output"),
    (LOCAL_HEAD + "boot: {serial-port: 5, success-match: ok}\n",
     "build.yaml:3: boot: -serial-port=5: GCE's serial ports are 1 to 4"),
    (LOCAL_HEAD + "boot: {serial-port: 2}\n",
     "build.yaml:3: boot: success-match must be set: a build file's boot checks the output (the interactive "
     "console is cos-customizer boot -image-file=OUTPUT)"),
    (LOCAL_HEAD + "boot: {success-match: ok, timeout: 0s}\n",
     "build.yaml:3: boot: -timeout must be a positive duration, such as 10m"),
    (LOCAL_HEAD + "boot: {user-data: nope.yaml, success-match: ok}\n",
     "build.yaml:3: boot: metadata user-data: nope.yaml does not exist"),
    (LOCAL_HEAD + "boot:\n  success-match: ok\n  sucess-match: ok\n",
     "build.yaml:5: boot.sucess-match: boot has no flag -sucess-match (did you mean success-match?); "
     "see cos-customizer boot --help"),
    (LOCAL_HEAD + "boot: [success-match]\n", "build.yaml:3: boot: expected a mapping of boot's flags, not a list"),
    (LOCAL_HEAD + "bot: {success-match: ok}\n",
     'build.yaml:3: bot: unknown key "bot" (did you mean boot?); a build file has source, build-context, steps, '
     "finish, boot"),
]  # fmt: skip
# A bad boot: section is refused the same way, before anything runs.
REFUSED += BOOT_REFUSED


@pytest.mark.parametrize(("text", "message"), REFUSED, ids=[f"{n}" for n in range(len(REFUSED))])
def test_a_bad_file_is_one_line_naming_file_line_and_key(
    cli: CLI, tmp_path: Path, scratch: Path, text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("build.yaml").write_text(text)
    result = cli("build", "build.yaml", env={"TMPDIR": str(scratch)})
    assert (result.code, result.out, result.err) == (2, "", f"cos-customizer: error: {message}\n")
    assert list(scratch.iterdir()) == []  # refused before anything ran


@pytest.mark.parametrize(
    ("fragment", "line", "key", "argv"),
    [
        ("disk-size-gb: abc", 3, "finish.disk-size-gb", ["finish-image-build", "-disk-size-gb=abc"]),
        ("oem-size: 3", 3, "finish.oem-size", ["finish-image-build", "-oem-size=3"]),  # a string check: exit 1
        ("timeout: 5x", 3, "finish.timeout", ["finish-image-build", "-timeout=5x"]),
        ("containers: maybe", 3, "finish.containers", ["finish-image-build", "-containers=maybe"]),
        ("labels: [novalue]", 3, "finish.labels", ["finish-image-build", "-labels=novalue"]),
    ],
)
def test_a_refused_value_says_what_the_command_line_says(
    cli: CLI, tmp_path: Path, fragment: str, line: int, key: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    step = cli(*argv)
    monkeypatch.chdir(tmp_path)
    Path("build.yaml").write_text(f"{HEAD}finish:\n  {fragment}\n")
    result = cli("build", "build.yaml")
    prefix = "cos-customizer: error: "
    assert step.err.startswith(prefix)
    assert (result.code, result.err) == (step.code, f"{prefix}build.yaml:{line}: {key}: {step.err[len(prefix) :]}")


def test_the_file_itself(cli: CLI, tmp_path: Path) -> None:
    missing = cli("build", str(tmp_path / "nope.yaml"))
    assert (missing.code, missing.err) == (
        2, f"cos-customizer: error: {tmp_path / 'nope.yaml'}: cannot read the build file: No such file or directory\n"
    )  # fmt: skip
    directory = cli("build", str(tmp_path))
    assert directory.err == f"cos-customizer: error: {tmp_path}: not a regular file; give a YAML build file\n"
    (tmp_path / "latin1.yaml").write_bytes(b"source: {image-file: caf\xe9}\n")
    assert cli("build", str(tmp_path / "latin1.yaml")).err.endswith(": not UTF-8 text; a build file is YAML\n")
    nothing = cli("build")
    assert (nothing.code, nothing.err) == (2, "cos-customizer: error: missing FILE: usage: cos-customizer build "
                                              "[-dry-run] FILE\n")  # fmt: skip
    both = cli("build", "-print-schema", "x.yaml")
    assert (both.code, both.err) == (2, "cos-customizer: error: -print-schema takes no FILE: usage: cos-customizer "
                                        "build -print-schema\n")  # fmt: skip


# boot: boot the output after the build; every check before the build


def test_boot_paths_are_the_build_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "check.yaml").write_text("#cloud-config\n")
    (tmp_path / "project" / "build.yaml").write_text(
        LOCAL_HEAD + "boot: {user-data: check.yaml, metadata-from-file: {k: check.yaml}, success-match: ok}\n"
    )
    monkeypatch.chdir(tmp_path)
    section = buildfile.read("project/build.yaml", TABLE).boot
    assert section is not None
    assert section.job.image == tmp_path / "project" / "o.raw"
    assert dict(section.job.metadata) == {"k": "#cloud-config\n", "user-data": "#cloud-config\n"}
    assert (section.output, section.line, section.job.port, section.job.success) == ("o.raw", 3, 1, "ok")


def test_dry_run_shows_the_boot_after_the_plan(cli: CLI, project: Path, scratch: Path) -> None:
    (project / "check.yaml").write_text("#cloud-config\n")
    (project / "build.yaml").write_text(LOCAL_FILE)
    (project / "boot.yaml").write_text(
        LOCAL_FILE + "boot:\n  user-data: check.yaml\n  serial-port: 2\n  success-match: it works\n"
    )
    plain = cli("build", "-dry-run", str(project / "build.yaml"), env={"TMPDIR": str(scratch)})
    booted = cli("build", "-dry-run", str(project / "boot.yaml"), env={"TMPDIR": str(scratch)})
    assert (plain.code, booted.code) == (0, 0), booted.err
    assert booted.out.replace(str(state_dir(booted.err)), "WS") == plain.out.replace(str(state_dir(plain.err)), "WS")
    boot_line = "then: boot custom.tar.gz, waiting for serial port 2 to say 'it works'\n"
    assert plan_text(booted.err) == plan_text(plain.err) + boot_line
    assert list(scratch.iterdir()) == []
    assert not (project / "custom.tar.gz").exists()


def test_a_failing_boot_fails_the_build_at_its_key(
    tmp_path: Path, project: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def finish_stand_in(_context: Context, args: flags.Parsed) -> int:
        Path(args["output"]).write_text("built")
        return 0

    booted: list[Path] = []

    def guest_fails(_context: Context, job: vm.BootJob) -> int:
        booted.append(job.image)
        assert job.image.read_text() == "built"
        assert list(scratch.iterdir()) == []  # the build's workspace is gone before the boot
        raise vm.GuestFailed("serial port 1 matched -failure-match: TestFail")

    monkeypatch.setattr(boot, "boot", guest_fails)
    stand_in = dataclasses.replace(finish.COMMAND, handler=finish_stand_in)
    command = buildfile.command_for((start.COMMAND, stand_in))
    (project / "build.yaml").write_text(
        "source: {image-file: cos.raw, build-context: ctx}\nfinish: {output: out.raw}\n"
        "boot: {success-match: TestPass}\n"
    )
    context = Context(tmp_path / "unused", {"TMPDIR": str(scratch), "HOME": str(tmp_path)})
    with pytest.raises(CustomizerError) as raised:
        command.handler(context, flags.parse(command.flags, [str(project / "build.yaml")], command="build"))
    assert raised.value.exit_code == 1
    assert str(raised.value) == f"{project / 'build.yaml'}:3: boot: serial port 1 matched -failure-match: TestFail"
    assert booted == [project / "out.raw"]


# A step that fails: its line, and nothing left behind


def test_a_failing_step_names_its_line_and_leaves_nothing(
    cli: CLI, project: Path, scratch: Path, workspace_root: Path
) -> None:
    (project / "build.yaml").write_text(
        "source: {image-file: cos.raw, build-context: ctx}\n"
        "steps:\n"
        "  - run-script: {script: preload.sh}\n"
        "  - run-script:\n"
        "      script: missing.sh\n"
        "finish: {output: out.raw}\n"
    )
    cli("start-image-build", f"-build-context={project / 'ctx'}", f"-image-file={project / 'cos.raw'}")
    step = cli("run-script", "-script=missing.sh")  # the oracle: the step command's own refusal
    assert step.code == 1
    before = snapshot(workspace_root)
    result = cli("build", str(project / "build.yaml"), env={"TMPDIR": str(scratch)})
    prefix = "cos-customizer: error: "
    assert result.code == 1
    assert result.err.endswith(f"{prefix}{project / 'build.yaml'}:4: steps[1].run-script: {step.err[len(prefix) :]}")
    assert list(scratch.iterdir()) == []
    assert not (project / "out.raw").exists()
    assert snapshot(workspace_root) == before


def test_ctrl_c_removes_the_temporary_workspace(tmp_path: Path, project: Path, scratch: Path) -> None:
    def interrupt(_context: Context, _args: flags.Parsed) -> int:
        raise KeyboardInterrupt

    stop = Command("seal-oem", "stops", (), interrupt)
    command = buildfile.command_for((start.COMMAND, stop, finish.COMMAND))
    (project / "build.yaml").write_text("source: {image-file: cos.raw, build-context: ctx}\nsteps: [seal-oem]\n"
                                        "finish: {}\n")  # fmt: skip
    context = Context(tmp_path / "unused", {"TMPDIR": str(scratch), "HOME": str(tmp_path)})
    cwd = Path.cwd()
    with pytest.raises(KeyboardInterrupt):
        command.handler(context, flags.parse(command.flags, [str(project / "build.yaml")], command="build"))
    assert list(scratch.iterdir()) == []
    assert Path.cwd() == cwd
    assert not (tmp_path / "unused").exists()


# The JSON Schema


def test_the_shipped_schema_is_the_generated_one(cli: CLI) -> None:
    shipped = importlib.resources.files("cos_customizer").joinpath("build-file.schema.json").read_text()
    printed = cli("build", "-print-schema")
    assert printed.code == 0
    assert printed.out == shipped, (
        "regenerate it: cos-customizer build -print-schema > src/cos_customizer/build-file.schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(json.loads(shipped))


def test_the_schema_names_every_step_and_flag() -> None:
    schema = json.loads(importlib.resources.files("cos_customizer").joinpath("build-file.schema.json").read_text())
    by_name = {command.name: command for command in ORIGINAL_STEPS}
    assert set(schema["$defs"]) == set(by_name)
    for name, definition in schema["$defs"].items():
        assert {flag.name: flag.help for flag in by_name[name].flags} == {
            flag: text["description"].removesuffix(" [cos-customizer addition]")
            for flag, text in definition["properties"].items()
        }
    assert schema["properties"]["steps"]["items"]["anyOf"][0]["enum"] == [
        c.name for c in ORIGINAL_STEPS if c.name not in ("start-image-build", "finish-image-build")
    ]
    assert "build" in COMMANDS


GOOD = [
    LOCAL_FILE,
    GCE_FILE,
    "source: {image-file: cos.raw}\nsteps:\nfinish:\n",
    "source:\n  image-file: cos.raw\nsteps: [seal-oem, {disable-auto-update: }, {run-script: {env: {A: 'x,y', B: 1}}}]\n"
    "finish: {output: o.raw, allow-host-loopback: 'true', inherit-labels: false, old-image-ttl: '0x10'}\n",
]
BAD = [
    HEAD + "finish: {output: o.raw, zzz: 1}\n",  # unknown flag
    HEAD + "steps: [run-scrip]\nfinish: {}\n",  # unknown step
    HEAD + "steps: [{run-scrip: {}}]\nfinish: {}\n",
    HEAD + "steps: [{run-script: {envv: []}}]\nfinish: {}\n",
    HEAD + "finish: {disk-size-gb: 12.5}\n",  # wrong types
    HEAD + "finish: {dry-run: [1]}\n",
    HEAD + "finish: {dry-run: maybe}\n",
    HEAD + "steps: [{run-script: {env: [A=1, 5]}}]\nfinish: {}\n",
    HEAD + "steps: [{run-script: {script: [a]}}]\nfinish: {}\n",
    HEAD + "finis: {}\n",  # unknown top-level key
    HEAD + "steps: [{seal-oem: , disable-auto-update: }]\nfinish: {}\n",
]


def json_path(path: Any) -> str:
    """A jsonschema error's location as the loader names keys: steps[0].run-script.env[1]."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@pytest.mark.parametrize("text", GOOD)
def test_jsonschema_and_the_loader_accept_the_same_files(tmp_path: Path, text: str) -> None:
    schema = json.loads(buildfile.schema_text(TABLE))
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text))
    path = tmp_path / "build.yaml"
    path.write_text(text)
    buildfile.read(str(path), TABLE)


@pytest.mark.parametrize("text", BAD)
def test_jsonschema_and_the_loader_refuse_the_same_files(tmp_path: Path, text: str) -> None:
    schema = json.loads(buildfile.schema_text(TABLE))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(text)))
    assert error is not None
    path = tmp_path / "build.yaml"
    path.write_text(text)
    with pytest.raises(CustomizerError) as refused:
        buildfile.read(str(path), TABLE)
    assert refused.value.exit_code == 2
    found = re.match(rf"{re.escape(str(path))}:\d+: (\S+): ", str(refused.value))
    assert found, str(refused.value)
    assert found[1].startswith(json_path(error.absolute_path)), (str(refused.value), error.message)


# Real builds (root)

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for loop devices, mounts and namespaces")
SCRIPT = """\
set -eu
echo "hello ($GREETING)" > /var/lib/hello
echo "sealed ($GREETING)" > /usr/share/oem/hello
"""


def run_cli(cwd: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cos_customizer", *argv], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, check=False)  # fmt: skip


def first_sector(image: Path, number: int) -> int:
    found = re.search(r"First sector: (\d+)", sh("sgdisk", "-i", str(number), image).stdout)
    assert found
    return int(found[1])


def debugfs_cat(image: Path, partition: int, name: str) -> str:
    return sh("debugfs", "-R", f"cat {name}", f"{image}?offset={first_sector(image, partition) * 512}").stdout


def leaks(path: Path) -> tuple[list[str], list[str]]:
    loops = [line for line in sh("losetup", "-a").stdout.splitlines() if str(path) in line]
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]
    return loops, mounts


@pytest.mark.root
@needs_root
def test_a_real_local_build_from_one_file(tmp_path: Path, project: Path, scratch: Path) -> None:
    (project / "ctx" / "preload.sh").write_text(SCRIPT)
    (project / "build.yaml").write_text(
        "# yaml-language-server: $schema=build-file.schema.json\n"
        "source:\n"
        "  image-file: cos.raw\n"
        "build-context: ctx\n"
        "steps:\n"
        "  - run-script: {script: preload.sh, env: {GREETING: 'hi, there'}}\n"
        "  - seal-oem\n"
        "  - disable-auto-update\n"
        "finish:\n"
        "  oem-size: 1G\n"
        "  disk-size-gb: 12\n"
        "  output: out/custom.raw\n"
    )
    (project / "out").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"TMPDIR": str(scratch), "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "steps-ws")}
    result = run_cli(elsewhere, env, "build", "../project/build.yaml")
    assert result.returncode == 0, result.stderr
    output = project / "out" / "custom.raw"
    assert "No problems found" in sh("sgdisk", "-v", output).stdout
    assert debugfs_cat(output, 1, "/var_overlay/lib/hello") == "hello (hi, there)\n"  # STATE
    assert debugfs_cat(output, 8, "/hello") == "sealed (hi, there)\n"  # the OEM partition
    assert list(scratch.iterdir()) == []  # the temporary workspace is gone
    assert not (tmp_path / "steps-ws").exists()  # $COS_CUSTOMIZER_WORKDIR is the step commands', untouched
    assert list(elsewhere.iterdir()) == []
    assert leaks(tmp_path) == ([], [])


@pytest.mark.root
@needs_root
def test_a_script_failing_in_a_real_build_leaves_nothing(tmp_path: Path, project: Path, scratch: Path) -> None:
    (project / "ctx" / "fail.sh").write_text("echo before the failure\nexit 3\n")
    (project / "ctx" / "ok.sh").write_text("echo fine\n")
    (project / "build.yaml").write_text(
        "source: {image-file: cos.raw, build-context: ctx}\n"
        "steps:\n"
        "  - disable-auto-update\n"
        "  - run-script: {script: ok.sh}\n"
        "  - run-script: {script: fail.sh}\n"
        "finish:\n"
        "  output: custom.raw\n"
    )
    result = run_cli(project, {"TMPDIR": str(scratch), "HOME": str(tmp_path)}, "build", "build.yaml")
    assert result.returncode == 1
    assert result.stderr.endswith(
        "cos-customizer: error: build.yaml:5: steps[2].run-script: run-script fail.sh failed with exit status 3; "
        "last output: before the failure\n"
    )
    assert "Traceback" not in result.stderr
    assert not (project / "custom.raw").exists()
    assert sorted(p.name for p in project.iterdir()) == ["build.yaml", "cos.raw", "ctx"]
    assert list(scratch.iterdir()) == []
    assert leaks(tmp_path) == ([], [])
