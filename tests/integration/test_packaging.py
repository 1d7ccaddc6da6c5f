"""The package as users get it: --version, bash completion (run by real bash), a wheel and an sdist that
install into fresh virtualenvs and run.

Oracles: the version in pyproject.toml (read with tomllib) and in the installed distribution's metadata;
bash's own `compgen`/`complete` machinery; sgdisk on the sample image made by the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cos_customizer import workspace
from tests.conftest import sh

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cos_customizer", *argv], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version(flag: str) -> None:
    result = cli(flag)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"cos-customizer {VERSION}\n", "")


def test_install_gpu_keeps_its_own_version_flag(tmp_path: Path, sample_raw: Path, driver_bucket: str) -> None:
    """-version after install-gpu is the driver's version, as in the original, not ours (checked against the
    stand-in of NVIDIA's bucket)."""
    env = {**os.environ, "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws")}
    (tmp_path / "ctx").mkdir()
    steps = [
        ["start-image-build", f"-build-context={tmp_path / 'ctx'}", f"-image-file={sample_raw}"],
        ["install-gpu", "-version=535.104.05"],
    ]
    for argv in steps:
        result = subprocess.run([sys.executable, "-m", "cos_customizer", *argv], env=env, capture_output=True,
                                text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert "535.104.05" in (tmp_path / "ws" / workspace.PROVISIONER).read_text()


def complete(script: Path, words: list[str]) -> list[str]:
    """What bash completes for `words` (the last one being completed), with the generated script."""
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_cos_customizer; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, check=True)
    return sorted(line for line in result.stdout.splitlines() if line)


@pytest.fixture(scope="module")
def completion_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = cli("completion", "bash")
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("completion") / "cos-customizer.bash"
    path.write_text(result.stdout)
    return path


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["cos-customizer", "fin"], ["finish-image-build"]),
        (["cos-customizer", "s"], ["sample-image", "seal-oem", "start-image-build"]),
        (["cos-customizer", "-ver"], ["-version"]),
        (["cos-customizer", "run-script", "-"],
         ["-compute-endpoint=", "-debug", "-env=", "-local-state-workdir=", "-script="]),
        (["cos-customizer", "-debug", "finish-image-build", "-cont"], ["-containers="]),
        (["cos-customizer", "finish-image-build", "-oem-size=1G", "-disk-"], ["-disk-size-gb=", "-disk-type="]),
        (["cos-customizer", "install-gpu", "-vers"], ["-version="]),  # the driver's version, a value
        (["cos-customizer", "sample-image", "-with"], ["-with-containers"]),
    ],
)  # fmt: skip
def test_bash_completes_steps_and_flags(completion_script: Path, words: list[str], expected: list[str]) -> None:
    assert complete(completion_script, words) == expected


def test_completion_of_another_shell_is_a_usage_error() -> None:
    result = cli("completion", "zsh")
    assert result.returncode == 2
    assert result.stderr == 'cos-customizer: error: no completion for the shell "zsh": use one of bash\n'


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_the_wheel_and_the_sdist_install_into_a_fresh_venv_and_run(dist: Path, tmp_path: Path, kind: str) -> None:
    (package,) = dist.glob(f"cos_customizer-{VERSION}*.{kind}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(package)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    installed = venv / "bin/cos-customizer"
    result = subprocess.run([str(installed), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout == f"cos-customizer {VERSION}\n"
    metadata = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.metadata as m; "
                               "print(m.version('cos-customizer'))"], capture_output=True, text=True, check=True)  # fmt: skip
    assert metadata.stdout.strip() == VERSION
    image = tmp_path / "sample.raw"
    made = subprocess.run([str(installed), "sample-image", str(image)], capture_output=True, text=True, check=False,
                          cwd=tmp_path, env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"})  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "No problems found" in sh("sgdisk", "-v", image).stdout
    shipped = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.resources as r; print(r.files("
                              "'cos_customizer').joinpath('build-file.schema.json').read_text(), end='')"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert shipped.stdout == (ROOT / "src/cos_customizer/build-file.schema.json").read_text()  # package data
    shutil.rmtree(venv)
