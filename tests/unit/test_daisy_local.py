"""The local Daisy runner, on the real rendered `build-image` workflow, with recording stand-in handlers."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cos_customizer.executors import workflow
from cos_customizer.executors.qemu import daisy as daisy_local
from tests.unit import test_workflow as rendering

BOUND = 20.0  # seconds: generous; only "it fired before this" is asserted


def rendered(tmp: Path, *, resize: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The document and the -var pairs of a GCE build, rendered as tests/unit/test_workflow.py renders them."""
    build = rendering.build_config(DiskSize=20 if resize else 0)
    config = rendering.provisioner_config(gpu=False, reclaim=False, oem="1023M" if resize else "")
    document, args = rendering.render(tmp, build, config, workflow.OutputImage("out", "out-proj"))
    names = [a for a in args if a.startswith("-var:")]
    return document, {name.removeprefix("-var:"): args[args.index(name) + 1] for name in names}


def load(tmp: Path, document: dict[str, Any], variables: dict[str, str]) -> daisy_local.Workflow:
    return daisy_local.load(document, variables, autovars={"SOURCESPATH": str(tmp / "sources")})


class Recorder:
    """Handlers for every step type that record start and end; `hooks` run per step name inside the step."""

    def __init__(self, hooks: dict[str, Any] | None = None) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []
        self.bodies: dict[str, Any] = {}
        self.started = {name: threading.Event() for name in ("wait-preload-finished", "resize-disk")}
        self.cancelled: set[str] = set()
        self.hooks = hooks or {}
        self.events: list[str] = []

    def handler(self, name: str, body: Any, context: daisy_local.StepContext) -> None:
        with self.lock:
            self.log.append((name, "start"))
            self.bodies[name] = body
        if name in self.started:
            self.started[name].set()
        if name in self.hooks:
            self.hooks[name](self, name, context)
        with self.lock:
            self.log.append((name, "end"))

    def handlers(self, types: set[str] | None = None) -> dict[str, daisy_local.Handler]:
        return {kind: self.handler for kind in (types or daisy_local.LOCAL_STEP_TYPES)}

    def run(self, wf: daisy_local.Workflow, **options: Any) -> None:
        options.setdefault("default_timeout", 60.0)
        options.setdefault("deadline", None)
        daisy_local.run(wf, self.handlers(), on_event=lambda e: self.events.append(str(e)), **options)

    def index(self, name: str, what: str) -> int:
        return self.log.index((name, what))


def wait_for_each_other(recorder: Recorder, name: str, context: daisy_local.StepContext) -> None:
    other = "resize-disk" if name == "wait-preload-finished" else "wait-preload-finished"
    if not recorder.started[other].wait(BOUND):
        raise RuntimeError(f"{other} never ran while {name} was running")


def hang(recorder: Recorder, name: str, context: daisy_local.StepContext) -> None:
    if context.cancel.wait(BOUND):
        with recorder.lock:
            recorder.cancelled.add(name)


def fail(recorder: Recorder, name: str, context: daisy_local.StepContext) -> None:
    recorder.started["wait-preload-finished"].wait(BOUND)
    raise RuntimeError("BuildFailed: boom")


@pytest.mark.parametrize("resize", [False, True])
def test_every_step_runs_once_after_its_dependencies(tmp_path: Path, resize: bool) -> None:
    document, variables = rendered(tmp_path, resize=resize)
    assert ("ResizeDisks" in document["Steps"]["resize-disk"]) == resize
    recorder = Recorder({"wait-preload-finished": wait_for_each_other, "resize-disk": wait_for_each_other})
    recorder.run(load(tmp_path, document, variables))
    for name in document["Steps"]:
        assert recorder.log.count((name, "start")) == 1 and recorder.log.count((name, "end")) == 1
    for name, needs in document["Dependencies"].items():
        for need in needs:
            assert recorder.index(need, "end") < recorder.index(name, "start"), (need, name)
    # The parallel branch overlapped wait-preload-finished (each waited for the other to start).
    assert recorder.index("resize-disk", "start") < recorder.index("wait-preload-finished", "end")
    assert recorder.index("wait-preload-finished", "start") < recorder.index("resize-disk", "end")
    # Vars, autovars and ${SOURCE:...} were substituted as Daisy does.
    cloud_config = (tmp_path / "startup.yaml").read_text()
    assert recorder.bodies["run"][0]["Metadata"]["user-data"] == cloud_config
    assert recorder.bodies["run"][0]["MachineType"] == variables["machine_type"]
    assert recorder.bodies["copy-gcs"][0]["Source"] == f"{tmp_path}/sources/cidata.tar.gz_"
    assert recorder.bodies["image"][0]["description"] == f"Derivative of {variables['source_image']}."
    if resize:
        assert recorder.bodies["resize-disk"] == [{"Name": "boot-disk", "SizeGb": "20"}]
    kinds = {name: next(k for k in body if k not in ("Timeout",)) for name, body in document["Steps"].items()}
    for name, kind in kinds.items():
        assert f"step {name} ({kind}) started" in recorder.events
        assert f"step {name} ({kind}) finished" in recorder.events


def test_a_failing_step_stops_the_run_and_cancels_the_others(tmp_path: Path) -> None:
    document, variables = rendered(tmp_path, resize=True)
    cleaned: list[str] = []

    def create(recorder: Recorder, name: str, context: daisy_local.StepContext) -> None:
        context.add_cleanup("delete preload-vm", lambda: cleaned.append("preload-vm"))

    recorder = Recorder({"run": create, "wait-preload-finished": hang, "wait-for-resize": fail})
    started = time.monotonic()
    with pytest.raises(daisy_local.WorkflowStepFailed) as err:
        recorder.run(load(tmp_path, document, variables))
    assert time.monotonic() - started < BOUND
    assert str(err.value) == "step wait-for-resize (WaitForInstancesSignal) failed: BuildFailed: boom"
    assert err.value.step.name == "wait-for-resize"
    assert recorder.cancelled == {"wait-preload-finished"}
    for name in ("resize-disk", "send-logging-end-msg", "wait-vm-shutdown", "image"):
        assert (name, "start") not in recorder.log
    assert cleaned == ["preload-vm"]
    assert "step wait-for-resize (WaitForInstancesSignal) failed: BuildFailed: boom" in recorder.events


@pytest.mark.parametrize("own", [True, False])
def test_a_step_timeout_fires(tmp_path: Path, own: bool) -> None:
    """The step's own Timeout when it has one, else the default timeout (daisy's -default_timeout)."""
    document, variables = rendered(tmp_path, resize=False)
    if own:
        document["Steps"]["wait-preload-finished"]["Timeout"] = "200ms"
    recorder = Recorder({"wait-preload-finished": hang})
    started = time.monotonic()
    with pytest.raises(daisy_local.WorkflowStepFailed) as err:
        recorder.run(load(tmp_path, document, variables), default_timeout=60.0 if own else 0.2)
    assert time.monotonic() - started < BOUND
    # Daisy's words (step.go: getTimeoutError), the limit printed as Go prints a time.Duration.
    assert str(err.value) == (
        'step wait-preload-finished (WaitForInstancesSignal) failed: step "wait-preload-finished" '
        "did not complete within the specified timeout of 200ms"
    )
    assert "wait-preload-finished" in recorder.cancelled


def test_steps_that_each_fit_the_default_timeout_succeed_however_long_together(tmp_path: Path) -> None:
    """-timeout limits each step, as daisy's -default_timeout; the run's deadline is the rehearsal's bound."""
    document, variables = rendered(tmp_path, resize=False)

    def slow(recorder: Recorder, name: str, context: daisy_local.StepContext) -> None:
        time.sleep(0.15)

    recorder = Recorder(dict.fromkeys(("setup", "run", "wait-preload-finished"), slow))
    started = time.monotonic()
    bound = workflow.run_bound(document, "250ms")
    recorder.run(load(tmp_path, document, variables), default_timeout=0.25, deadline=started + bound.seconds)
    assert time.monotonic() - started > 0.25  # longer than -timeout in all, and it succeeded
    assert ("image", "end") in recorder.log


def test_the_whole_run_is_bounded_by_the_deadline(tmp_path: Path) -> None:
    document, variables = rendered(tmp_path, resize=False)
    recorder = Recorder({"wait-preload-finished": hang})
    started = time.monotonic()
    with pytest.raises(daisy_local.WorkflowError) as err:
        recorder.run(load(tmp_path, document, variables), deadline=started + 0.3)
    assert not isinstance(err.value, daisy_local.WorkflowStepFailed)
    assert time.monotonic() - started < BOUND
    assert "was still running at its deadline (still running: wait-preload-finished)" in str(err.value)
    assert "wait-preload-finished" in recorder.cancelled
    assert ("send-logging-end-msg", "start") not in recorder.log


def test_a_step_type_the_runner_lacks_is_refused_by_name_before_anything_runs(tmp_path: Path) -> None:
    document, variables = rendered(tmp_path, resize=False)
    extra = copy.deepcopy(document)
    extra["Steps"]["deprecate"] = {"DeprecateImages": [{"Image": "old", "Project": "p"}]}
    extra["Dependencies"]["deprecate"] = ["image"]
    with pytest.raises(daisy_local.WorkflowError) as err:
        load(tmp_path, extra, variables)
    assert str(err.value) == (
        "the qemu executor cannot run step deprecate: Daisy step type DeprecateImages is not supported locally"
    )
    extra["Steps"]["deprecate"] = {"FrobnicateImages": []}
    with pytest.raises(daisy_local.WorkflowError, match="step deprecate: FrobnicateImages is not a Daisy step type"):
        load(tmp_path, extra, variables)
    # Handlers missing for a type the document uses: refused before any step starts.
    recorder = Recorder()
    handlers = recorder.handlers(set(daisy_local.LOCAL_STEP_TYPES) - {"UpdateInstancesMetadata"})
    with pytest.raises(daisy_local.WorkflowError) as err:
        daisy_local.run(load(tmp_path, document, variables), handlers, default_timeout=60.0, deadline=None,
                        on_event=lambda e: None)  # fmt: skip
    assert str(err.value) == (
        "the qemu executor cannot run step send-logging-end-msg: "
        "Daisy step type UpdateInstancesMetadata is not supported locally"
    )
    assert recorder.log == []


def test_vars_are_checked_as_daisy_checks_them(tmp_path: Path) -> None:
    document, variables = rendered(tmp_path, resize=False)
    missing = {k: v for k, v in variables.items() if k not in ("machine_type", "cidata_img")}
    with pytest.raises(daisy_local.WorkflowError) as err:
        load(tmp_path, document, missing)
    assert str(err.value) == (
        "workflow 'build-image': required var cidata_img, machine_type is not set (give -var:NAME)"
    )
    with pytest.raises(daisy_local.WorkflowError, match="unknown workflow Var no_such_var passed to Workflow"):
        load(tmp_path, document, {**variables, "no_such_var": "x"})
    # Defaults apply to vars not given; a given empty value satisfies Required (daisy's AddVar).
    wf = load(tmp_path, document, {**variables, "machine_type": ""})
    assert wf.vars["disk_type"] == variables["disk_type"] and wf.vars["service_account"] == "default"
    assert wf.vars["disk_size_gb"] == "10" and wf.vars["machine_type"] == ""
    broken = copy.deepcopy(document)
    broken["Steps"]["image"]["CreateImages"][0]["family"] = "${no_such_var}"
    with pytest.raises(daisy_local.WorkflowError, match=r"Unresolved var \$\{no_such_var\}"):
        load(tmp_path, broken, variables)
    with pytest.raises(daisy_local.WorkflowError, match=r"Unresolved var \$\{SOURCESPATH\}"):
        daisy_local.load(document, variables)


def test_dependencies_must_name_steps_and_have_no_cycle(tmp_path: Path) -> None:
    document, variables = rendered(tmp_path, resize=False)
    ghost = copy.deepcopy(document)
    ghost["Dependencies"]["image"] = ["wait-vm-shutdown", "ghost"]
    with pytest.raises(daisy_local.WorkflowError, match="dependencies reference non existent step 'ghost'"):
        load(tmp_path, ghost, variables)
    cycle = copy.deepcopy(document)
    cycle["Dependencies"]["copy-gcs"] = ["image"]
    with pytest.raises(daisy_local.WorkflowError, match="cyclic dependency on step") as err:
        load(tmp_path, cycle, variables)
    assert "copy-gcs" in str(err.value) and "image" in str(err.value)


def serial_specs(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: step["WaitForInstancesSignal"][0]["SerialOutput"] for name, step in document["Steps"].items()
            if "WaitForInstancesSignal" in step and "SerialOutput" in step["WaitForInstancesSignal"][0]}  # fmt: skip


def test_match_serial_with_the_workflows_own_strings(tmp_path: Path) -> None:
    document, _ = rendered(tmp_path, resize=True)
    specs = serial_specs(document)
    finished = specs["wait-preload-finished"]
    status, success, failure = finished["StatusMatch"], finished["SuccessMatch"], finished["FailureMatch"]
    match = daisy_local.match_serial
    assert match(f"[   12.3] cos: {status} x\n", finished) == ("status", f"{status} x")
    assert match(f"{status} one\n{status} two\r\n", finished) == ("status", f"{status} two")
    assert match(f"{status} x\n{success} ok\n{failure} later\n", finished) == ("success", f"{success} ok")
    assert match(f"{status} x\nnoise {failure} boom\n{success} ok\n", finished) == ("failure", f"{failure} boom")
    assert match(f"{success} ok", finished) == (None, "")  # no newline yet: the line is not complete
    assert match("nothing to see\n", finished) == (None, "")
    # The resize wait: its success line, and the build's failure ends it too.
    resize = specs["wait-for-resize"]
    assert match(f"provisioner: {resize['SuccessMatch']}\n", resize) == ("success", resize["SuccessMatch"])
    assert match(f"{resize['FailureMatch']} boom\n", resize)[0] == "failure"
    assert match(f"{status} x\n", resize) == (None, "")
    # FailureMatch may be a list; a line is checked for failure before success.
    listed = {"SuccessMatch": success, "FailureMatch": ["Oops:", failure]}
    assert match(f"{success} but Oops: no\n", listed) == ("failure", "Oops: no")
    # Fed in pieces, a line split across chunks is matched once it is complete.
    watcher = daisy_local.SerialWatcher(finished)
    assert watcher.feed(f"{status} a\n{success[:4]}") == [("status", f"{status} a")]
    assert watcher.feed(f"{success[4:]} done\n{status} after\n") == [("success", f"{success} done")]
    assert watcher.feed(f"{failure} ignored\n") == []
