"""CI's rule on skipped tests (tests/conftest.py): under CI=true an unlisted skip fails, a listed one stays a skip.

Each case runs pytest in a subprocess on a tiny generated test file whose conftest takes the hooks of
tests/conftest.py and lists one test in its ALLOWED_SKIPS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """\
from tests import conftest as shared

pytest_runtest_makereport = shared.pytest_runtest_makereport
pytest_make_collect_report = shared.pytest_make_collect_report
shared.ALLOWED_SKIPS["test_tiny.py::test_listed"] = "a kernel feature this machine lacks"
"""

TESTS = """\
import pytest


def test_passes():
    pass


def test_listed():
    pytest.skip("no such kernel feature")


def test_unlisted():
    pytest.skip("a tool is missing")


@pytest.mark.skipif(True, reason="marked to skip")
def test_unlisted_mark():
    pass


@pytest.mark.xfail(reason="a known bug")
def test_expected_failure():
    assert False
"""

SKIPPED_MODULE = """\
import pytest

pytest.skip("the whole module", allow_module_level=True)
"""


def _run(tmp_path: Path, ci: str | None, files: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """pytest's exit code, each test's outcome (from its JUnit XML) and its output, with CI set to `ci`."""
    for name, text in {"conftest.py": CONFTEST, "pytest.ini": "[pytest]\n", **files}.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    xml = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--junitxml={xml}", "."],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for case in ET.parse(xml).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
    return result.returncode, outcomes, result.stdout + result.stderr


def test_without_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    code, outcomes, out = _run(tmp_path, None, {"test_tiny.py": TESTS})
    assert code == 0, out
    assert outcomes == {
        "test_passes": "passed",
        "test_listed": "skipped",
        "test_unlisted": "skipped",
        "test_unlisted_mark": "skipped",
        "test_expected_failure": "skipped",
    }


@pytest.mark.parametrize("ci", ["", "false", "1"])
def test_only_ci_true_turns_the_rule_on(tmp_path: Path, ci: str) -> None:
    code, outcomes, out = _run(tmp_path, ci, {"test_tiny.py": TESTS})
    assert code == 0, out
    assert outcomes["test_unlisted"] == "skipped"


def test_under_ci_an_unlisted_skip_fails_and_says_how_to_list_it(tmp_path: Path) -> None:
    code, outcomes, out = _run(tmp_path, "true", {"test_tiny.py": TESTS})
    assert code == 1, out
    assert outcomes == {
        "test_passes": "passed",
        "test_listed": "skipped",
        "test_unlisted": "failure",  # skipped while it ran
        "test_unlisted_mark": "error",  # skipped in its set-up (a skipif mark)
        "test_expected_failure": "skipped",  # an xfail is not a skip
    }
    assert (
        "skipped under CI=true (a tool is missing): in CI a skip is a failure. Make the test run here, or, if this "
        "machine cannot run it (a kernel feature it lacks), add 'test_tiny.py::test_unlisted' with that reason to "
        "ALLOWED_SKIPS in tests/conftest.py"
    ) in out
    assert "skipped under CI=true (marked to skip)" in out


def test_under_ci_a_skipped_module_fails(tmp_path: Path) -> None:
    code, _, out = _run(tmp_path, "true", {"test_tiny.py": TESTS, "test_gone.py": SKIPPED_MODULE})
    assert code != 0, out
    assert "skipped under CI=true (the whole module)" in out
    assert "add 'test_gone.py' with that reason to ALLOWED_SKIPS in tests/conftest.py" in out


def test_every_allowed_skip_names_a_test_and_gives_a_reason() -> None:
    from tests.conftest import ALLOWED_SKIPS

    for nodeid, reason in ALLOWED_SKIPS.items():
        path, _, name = nodeid.partition("::")
        assert (REPO / path).is_file(), nodeid
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), nodeid
        assert reason.strip(), nodeid
