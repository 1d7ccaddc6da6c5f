#!/usr/bin/env python3
"""A stand-in for `daisy` that validates what it is given and records it.

It checks the argument list (flags daisy knows, `-var:NAME VALUE` pairs, the
workflow file last), and the workflow: every `${...}` reference is a defined
var, a built-in or a declared source; every required var is given; every
given var is declared; dependencies name steps and have no cycle. It writes
what it received to $DAISY_STANDIN_RECORD (JSON), prints a few status lines,
and exits 0, or 1 with the problems (or when $DAISY_STANDIN_FAIL is set).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

FLAGS_WITH_VALUE = {"-gcs_path", "-project", "-zone", "-default_timeout", "-oauth"}
FLAGS_ALONE = {"-disable_gcs_logging", "-disable_cloud_logging", "-disable_stdout_logging"}
BUILTINS = {"SOURCESPATH", "ZONE", "PROJECT", "NAME", "ID", "DATE", "DATETIME", "TIMESTAMP", "WFDIR", "CWD",
            "GCSPATH", "SCRATCHPATH", "LOGSPATH", "OUTSPATH", "USERNAME"}  # fmt: skip
REFERENCE = re.compile(r"\$\{([^}]*)\}")


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def check(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    given: dict[str, str] = {}
    flags: dict[str, str | bool] = {}
    rest = list(argv)
    while len(rest) > 1:
        arg = rest.pop(0)
        if arg.startswith("-var:"):
            given[arg[len("-var:") :]] = rest.pop(0)
        elif arg.startswith("-compute_endpoint_override="):
            flags["-compute_endpoint_override"] = arg.split("=", 1)[1]
        elif arg in FLAGS_WITH_VALUE:
            flags[arg] = rest.pop(0)
        elif arg in FLAGS_ALONE:
            flags[arg] = True
        else:
            problems.append(f"unknown argument {arg!r}")
    if len(rest) != 1:
        return {}, [*problems, "no workflow file given last"]
    path = Path(rest[0])
    workflow = json.loads(path.read_text())
    variables = workflow.get("Vars", {})
    sources = workflow.get("Sources", {})
    steps = workflow.get("Steps", {})
    try:  # daisy parses it when it populates the workflow ("failed to parse timeout for workflow")
        go_seconds(str(flags.get("-default_timeout", "10m")))
    except ValueError as err:
        problems.append(str(err))
    for name in given:
        if name not in variables:
            problems.append(f"-var:{name} is not a var of the workflow")
    for name, spec in variables.items():
        if spec.get("Required") and name not in given:
            problems.append(f"required var {name} is not given")
    for text in strings(workflow):
        for ref in REFERENCE.findall(text):
            if ref in variables or ref in BUILTINS:
                continue
            if ref.startswith("SOURCE:") and ref[len("SOURCE:") :] in sources:
                continue
            problems.append(f"${{{ref}}} is not defined")
    dependencies = workflow.get("Dependencies", {})
    for step, needs in dependencies.items():
        for name in [step, *needs]:
            if name not in steps:
                problems.append(f"dependency names {name!r}, which is not a step")
    state: dict[str, int] = {}

    def visit(step: str) -> None:
        if state.get(step) == 1:
            problems.append(f"dependency cycle through {step!r}")
            return
        if state.get(step) == 2:
            return
        state[step] = 1
        for need in dependencies.get(step, []):
            visit(need)
        state[step] = 2

    for step in steps:
        visit(step)
    for name, value in sources.items():
        value = REFERENCE.sub(lambda m: given.get(m.group(1), ""), value)
        if not value.startswith("gs://") and not Path(value).exists():
            problems.append(f"source {name} ({value}) does not exist")
    return {"flags": flags, "vars": given, "workflow": workflow}, problems


def inspect(record: dict[str, Any]) -> dict[str, Any]:
    """What the preload VM would get: the CIDATA disk's files, and the managed GCS directory's objects."""
    import subprocess
    import tarfile
    import tempfile

    seen: dict[str, Any] = {}
    cloud_config = record["workflow"].get("Sources", {}).get("cloud-config", "")
    seen["cloud_config"] = Path(cloud_config).read_text() if cloud_config else None
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(record["vars"]["cidata_img"]) as tar:
            seen["cidata_members"] = tar.getnames()
            tar.extractall(tmp)
        image = f"{tmp}/disk.raw"
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        listing = subprocess.run(
            ["mdir", "-b", "-i", image, "::/"], capture_output=True, text=True, env=env, check=True
        )
        seen["cidata_files"] = sorted(
            line.strip().removeprefix("::/") for line in listing.stdout.splitlines() if line.strip()
        )
        config = subprocess.run(
            ["mtype", "-i", image, "::/config.json"], capture_output=True, text=True, env=env, check=True
        )
        seen["cidata_config"] = json.loads(config.stdout)
        for name in ("user-data", "meta-data"):
            found = subprocess.run(["mtype", "-i", image, f"::/{name}"], capture_output=True, text=True, env=env)
            seen[f"cidata_{name}"] = found.stdout if found.returncode == 0 else None
        copied = f"{tmp}/provisioner"
        subprocess.run(["mcopy", "-n", "-i", image, "::/provisioner", copied], capture_output=True, env=env, check=True)
        seen["cidata_provisioner_sha256"] = hashlib.sha256(Path(copied).read_bytes()).hexdigest()
        label = subprocess.run(["mlabel", "-s", "-i", image, "::"], capture_output=True, text=True, env=env, check=True)
        seen["cidata_label"] = label.stdout.strip()
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[attr-defined]

    bucket, _, prefix = record["flags"]["-gcs_path"][len("gs://") :].partition("/")
    client = storage.Client(project="test", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    seen["gcs_objects"] = sorted(blob.name for blob in client.list_blobs(bucket, prefix=f"{prefix}/"))
    return seen


def go_seconds(text: str) -> float:
    """A Go duration of whole units ("1s", "1m30s", "500ms") in seconds: the forms the tests give."""
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"daisy stand-in: cannot read -default_timeout {text!r}")
    return sum(float(number) * scale[unit] for number, unit in parts)


def main() -> int:
    record, problems = check(sys.argv[1:])
    if not problems and os.environ.get("DAISY_STANDIN_INSPECT"):
        record["inspected"] = inspect(record)
    out = os.environ.get("DAISY_STANDIN_RECORD")
    if out:
        Path(out).write_text(json.dumps({"argv": sys.argv[1:], **record, "problems": problems}))
    if problems:
        for problem in problems:
            print(f"daisy stand-in: {problem}", file=sys.stderr)
        return 1
    print("[build-image]: Workflow Project: " + str(record["flags"].get("-project")))
    print('[build-image]: Step "wait-preload-finished" (WaitForInstancesSignal): BuildStatus: step done')
    if os.environ.get("DAISY_STANDIN_STEPS"):
        # Steps that take these many seconds one after another, each limited by -default_timeout as daisy
        # limits them (step.go): a step past it fails with daisy's words, and daisy cleans up.
        import time

        limit_text = record["flags"]["-default_timeout"]
        limit = go_seconds(limit_text)
        for index, seconds in enumerate(float(s) for s in os.environ["DAISY_STANDIN_STEPS"].split(",")):
            if seconds > limit:
                time.sleep(limit)
                print(f'[build-image]: Error running workflow: step "step-{index}" did not complete within the '
                      f"specified timeout of {limit_text}", flush=True)  # fmt: skip
                print('[build-image]: Workflow "build-image" cleaning up (this may take up to 2 minutes).')
                return 1
            time.sleep(seconds)
            print(f'[build-image]: Step "step-{index}" finished', flush=True)
    if os.environ.get("DAISY_STANDIN_FAIL"):
        print('[build-image]: Step "wait-preload-finished" (WaitForInstancesSignal): BuildFailed: boom')
        print(
            '[Daisy] Errors in one or more workflows:\n  build-image: step "wait-preload-finished" failed',
            file=sys.stderr,
        )
        return 1
    print('[build-image]: Workflow "build-image" cleaning up (this may take up to 2 minutes).')
    return 0


if __name__ == "__main__":
    sys.exit(main())
