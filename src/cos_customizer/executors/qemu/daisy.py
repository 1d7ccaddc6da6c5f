"""A local runner for Daisy workflow documents: the engine of the qemu executor.

It takes the same `build-image` document a GCE build gives the `daisy` binary
(rendered by `workflow.py`, unchanged) and runs it as Daisy runs it, with the
cloud work left to handlers supplied per step type. Nothing here knows about
GCE, QEMU or files except `${SOURCE:...}` expansion and the serial matching
rules of `WaitForInstancesSignal` (`match_serial`, `SerialWatcher`).

Daisy's semantics followed here, from github.com/GoogleCloudPlatform/compute-daisy:

- Vars (`workflow.go`, `cli/main.go`): a var is a string or `{Value, Required,
  Description}`. A `-var` the workflow does not declare is refused ("unknown
  workflow Var"); a given var replaces the declaration's value (and so
  satisfies `Required` even when empty, as `AddVar` does); a required var
  neither given nor valued is refused. We name every missing or unknown var in
  one error, where Daisy names the first it meets.
- Substitution (`workflow.go` `populate`, `common.go` `substitute`): every
  string of the document, map keys included (the Vars themselves aside), gets
  `${name}` replaced in one pass, first with the generic autovars and the vars,
  then a second pass with the workflow autovars (`SOURCESPATH`, `ZONE`, ...).
  Anything of the form `${...}` still left, other than `${SOURCE:...}`, is
  refused (`validate.go` `validateVarsSubbed`). Then `${SOURCE:name}` is
  replaced by the *content* of that source (`common.go` `substituteSourceVars`,
  `sources.go` `sourceContent`; an expanded string over 256 KiB is refused),
  which is how `user-data` becomes the cloud-config text.
- Sources (`sources.go` `uploadSources`): name -> path; a relative local path
  is taken from the workflow's directory; an empty one is skipped; `gs://`
  paths are kept as they are for the handlers.
- Steps (`step.go`): exactly one step type per step, plus `Timeout` and
  `TimeoutDescription`; a step name must match RFC 1035 (`validate.go`).
  `Timeout` is a Go duration; without one the step gets the default timeout
  (`-default_timeout`, else the document's `DefaultTimeout`, else 10m).
- Dependencies (`validate.go` `validateDAG`): every name must be a step;
  duplicates are dropped; a cycle is refused.
- Running (`workflow.go` `traverseDAG`, `runStep`, `cleanup`): a step starts as
  soon as all its dependencies are done, so independent steps run at the same
  time; a step that outlives its timeout fails ("did not complete within the
  specified timeout"); the first failing step ends the run with its error;
  then the workflow is cancelled (handlers watch the cancel Event), running
  steps get a few seconds (Daisy: 4 s) to notice, and the cleanup hooks run,
  whether the run succeeded or not. Daisy deletes what the workflow created at
  that point (instances first); here handlers register cleanups through their
  context and they run last-registered first, so the instance goes before the
  disks and images it was made from.

Deliberate differences: the whole run can be bounded by a `deadline` (the
rehearsal's `workflow.run_bound`, which for the real tool bounds the daisy
process: past every step's own limit, so daisy's timeout fires first); step
types the local runner does not implement are refused by name
before anything runs, where Daisy would try them against the cloud.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from cos_customizer.errors import CustomizerError
from cos_customizer.runner import LINE_LIMIT
from cos_customizer.units import format_duration, parse_duration

# Every step type Daisy knows (`step.go`, the fields of `Step`).
DAISY_STEP_TYPES = frozenset({
    "AttachDisks", "DetachDisks", "CreateDisks", "CreateForwardingRules", "CreateFirewallRules", "CreateImages",
    "CreateMachineImages", "CreateInstances", "CreateNetworks", "CreateSnapshots", "CreateSubnetworks",
    "CreateTargetInstances", "CopyGCSObjects", "ResizeDisks", "StartInstances", "StopInstances", "DeleteResources",
    "DeprecateImages", "IncludeWorkflow", "SubWorkflow", "Suspend", "Resume", "WaitForInstancesSignal",
    "WaitForAnyInstancesSignal", "WaitForAvailableQuotas", "UpdateInstancesMetadata",
})  # fmt: skip
# The ones the `build-image` workflow uses, which the qemu executor implements.
LOCAL_STEP_TYPES = frozenset({
    "CopyGCSObjects", "CreateImages", "CreateDisks", "CreateInstances", "ResizeDisks", "UpdateInstancesMetadata",
    "WaitForInstancesSignal",
})  # fmt: skip
STEP_FIELDS = frozenset({"Timeout", "TimeoutDescription"})
DEFAULT_TIMEOUT = "10m"  # workflow.go
CLEANUP_GRACE = 4.0  # seconds Daisy's cleanup waits for cancelled steps (workflow.go)
MAX_SOURCE_EXPANSION = 256 * 1024  # common.go substituteSourceVars
STEP_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # validate.go rfc1035
REFERENCE = re.compile(r"\$\{([^}]+)\}")
SOURCE_REFERENCE = re.compile(r"\$\{SOURCE:([^}]+)\}")
NANOSECONDS = 1e9


class WorkflowError(CustomizerError):
    """The workflow cannot be loaded or did not complete."""


class DeadlineExceeded(WorkflowError):
    """The whole run outlived its deadline (the build's -timeout)."""


class WorkflowStepFailed(WorkflowError):
    """One step failed (or timed out); the run stopped there."""

    def __init__(self, step: Step, reason: str) -> None:
        super().__init__(f"step {step.name} ({step.type}) failed: {reason}")
        self.step = step
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    type: str
    body: Any  # the value under the step type, vars substituted
    timeout: str  # the step's own Timeout, "" when it has none
    timeout_description: str = ""


@dataclasses.dataclass(frozen=True)
class Workflow:
    name: str
    steps: dict[str, Step]
    dependencies: dict[str, tuple[str, ...]]  # every step, with the steps it waits for
    sources: dict[str, str]  # name -> absolute local path or gs:// URL
    vars: dict[str, str]  # the final value of every declared var
    default_timeout: str  # the document's DefaultTimeout, or Daisy's default


def _walk(node: Any, change: Callable[[str], str]) -> Any:
    """`node` with `change` applied to every string in it, map keys included."""
    if isinstance(node, str):
        return change(node)
    if isinstance(node, dict):
        return {change(key): _walk(value, change) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, change) for value in node]
    return node


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _replacer(table: Mapping[str, str]) -> Callable[[str], str]:
    """One pass of `${name}` -> value for the names in `table` (strings.Replacer: values are not rescanned)."""

    def replace(text: str) -> str:
        return REFERENCE.sub(lambda m: table.get(m.group(1), m.group(0)), text)

    return replace


def _declared_vars(document: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    declared = document.get("Vars") or {}
    name = document.get("Name", "")
    unknown = sorted(set(given) - set(declared))
    if unknown:
        names = ", ".join(unknown)
        raise WorkflowError(f"unknown workflow Var {names} passed to Workflow {name!r}: it declares no such var")
    values: dict[str, str] = {}
    missing = []
    for key, spec in declared.items():
        if key in given:
            values[key] = given[key]
            continue
        value = spec if isinstance(spec, str) else str((spec or {}).get("Value", ""))
        if isinstance(spec, dict) and spec.get("Required") and value == "":
            missing.append(key)
        values[key] = value
    if missing:
        raise WorkflowError(f"workflow {name!r}: required var {', '.join(sorted(missing))} is not set (give -var:NAME)")
    return values


def _step(name: str, raw: Any, supported: frozenset[str]) -> Step:
    if not STEP_NAME.fullmatch(name.lower()):
        raise WorkflowError(f"step {name!r}: a step name must start with a letter and only contain letters, "
                            "numbers and hyphens")  # fmt: skip
    if not isinstance(raw, dict):
        raise WorkflowError(f"step {name}: not an object")
    kinds = [key for key in raw if key not in STEP_FIELDS]
    if len(kinds) != 1:
        raise WorkflowError(f"step {name}: " + ("no step type defined" if not kinds else
                                                f"multiple step types defined ({', '.join(kinds)})"))  # fmt: skip
    kind = kinds[0]
    if kind not in supported:
        what = (
            f"Daisy step type {kind} is not supported locally"
            if kind in DAISY_STEP_TYPES
            else f"{kind} is not a Daisy step type"
        )
        raise WorkflowError(f"the qemu executor cannot run step {name}: {what}")
    timeout = str(raw.get("Timeout", ""))
    if timeout:
        try:
            parse_duration(timeout)
        except ValueError as err:
            raise WorkflowError(f"step {name}: Timeout: {err}") from None
    return Step(name, kind, raw[kind], timeout, str(raw.get("TimeoutDescription", "")))


def _check_dependencies(steps: Mapping[str, Step], raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    dependencies: dict[str, tuple[str, ...]] = {name: () for name in steps}
    for name, needs in raw.items():
        for other in [name, *needs]:
            if other not in steps:
                raise WorkflowError(f"dependencies reference non existent step {other!r}: {name!r}: {list(needs)}")
        dependencies[name] = tuple(dict.fromkeys(needs))
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise WorkflowError(f"cyclic dependency on step {name}: {' -> '.join(cycle)}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for need in dependencies[name]:
            visit(need, [*path, name])
        state[name] = 2

    for name in steps:
        visit(name, [])
    return dependencies


def _read_source(name: str, sources: Mapping[str, str]) -> str:
    path = sources.get(name)
    if path is None:
        raise WorkflowError(f"source not found for expansion: ${{SOURCE:{name}}}")
    if path.startswith("gs://"):
        raise WorkflowError(f"${{SOURCE:{name}}}: the local runner reads sources from local files, not {path}")
    try:
        return Path(path).read_text()
    except OSError as err:
        raise WorkflowError(f"error reading source content for {name}: {err.strerror}: {path}") from None


def load(
    document: Mapping[str, Any],
    vars: Mapping[str, str],
    *,
    workflow_dir: str | os.PathLike[str] = ".",
    autovars: Mapping[str, str] | None = None,
    supported: frozenset[str] = LOCAL_STEP_TYPES,
) -> Workflow:
    """The workflow `document` with `vars` (the `-var:NAME VALUE` pairs), checked and substituted as Daisy does.

    `autovars` are Daisy's workflow-derived vars (`SOURCESPATH`, `ZONE`, `PROJECT`, `GCSPATH`, ...) as the
    caller maps them locally; the generic ones (`NAME`, `ID`, `DATE`, `CWD`, `WFDIR`, ...) are made here.
    """
    name = str(document.get("Name", ""))
    values = _declared_vars(document, vars)
    body = {key: value for key, value in document.items() if key != "Vars"}
    now = datetime.datetime.now(datetime.UTC)
    base_dir = Path(workflow_dir).absolute()
    generic = {
        "ID": uuid.uuid4().hex[:5],
        "DATE": now.strftime("%Y%m%d"),
        "DATETIME": now.strftime("%Y%m%d%H%M%S"),
        "TIMESTAMP": str(int(now.timestamp())),
        "USERNAME": getpass.getuser(),
        "WFDIR": str(base_dir),
        "CWD": os.getcwd(),
    }
    body = _walk(body, _replacer({**generic, **values}))
    body = _walk(body, _replacer({"NAME": name, **(autovars or {})}))
    for text in _strings(body):
        for ref in REFERENCE.findall(text):
            if not ref.startswith("SOURCE:"):
                raise WorkflowError(f"Unresolved var ${{{ref}}} found in {text!r}")

    sources: dict[str, str] = {}
    for key, path in (body.get("Sources") or {}).items():
        if path and not path.startswith("gs://"):
            path = str(base_dir / path)
            if not Path(path).exists():
                raise WorkflowError(f"source {key}: failed to open local file: {path}")
        sources[key] = path

    def expand(text: str) -> str:
        if not SOURCE_REFERENCE.search(text):
            return text
        expanded = SOURCE_REFERENCE.sub(lambda m: _read_source(m.group(1), sources), text)
        if len(expanded) > MAX_SOURCE_EXPANSION:
            raise WorkflowError(f"Expanded string for {text!r} is too large")
        return expanded

    raw_steps = body.get("Steps") or {}
    if not raw_steps:
        raise WorkflowError(f"workflow {name!r}: must provide at least one step in workflow field 'Steps'")
    steps = {key: _step(key, raw, supported) for key, raw in raw_steps.items()}
    dependencies = _check_dependencies(steps, body.get("Dependencies") or {})
    steps = {key: dataclasses.replace(step, body=_walk(step.body, expand)) for key, step in steps.items()}
    default_timeout = str(body.get("DefaultTimeout") or DEFAULT_TIMEOUT)
    try:
        parse_duration(default_timeout)
    except ValueError as err:
        raise WorkflowError(f"workflow {name!r}: DefaultTimeout: {err}") from None
    return Workflow(name, steps, dependencies, sources, values, default_timeout)


# Running.

EventKind = Literal["started", "finished", "failed", "cancelled", "status", "cleanup"]


@dataclasses.dataclass(frozen=True)
class StepEvent:
    step: str
    type: str
    kind: EventKind
    detail: str = ""

    def __str__(self) -> str:
        head = f"step {self.step} ({self.type}) {self.kind}" if self.step else f"workflow {self.kind}"
        return f"{head}: {self.detail}" if self.detail else head


@dataclasses.dataclass
class StepContext:
    """What a handler gets besides its step: the cancel Event it must honour, its time left, and cleanups."""

    step: Step
    cancel: threading.Event
    ends: float  # time.monotonic() by which the step must be done (its timeout, or the run's deadline)
    _report: Callable[[StepEvent], None]
    _cleanups: list[tuple[str, Callable[[], None]]]
    _lock: threading.Lock

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` (at most the time left); True when the workflow was cancelled meanwhile."""
        return self.cancel.wait(min(seconds, self.remaining()))

    def status(self, text: str) -> None:
        """Report progress of the step (a serial `BuildStatus:` line, say)."""
        self._report(StepEvent(self.step.name, self.step.type, "status", text))

    def add_cleanup(self, description: str, action: Callable[[], None]) -> None:
        """Run `action` when the workflow ends, success or not (Daisy deletes what it created)."""
        with self._lock:
            self._cleanups.append((description, action))


Handler = Callable[[str, Any, StepContext], None]


def _seconds(duration: str) -> float:
    return parse_duration(duration) / NANOSECONDS


def run(
    workflow: Workflow,
    handlers: Mapping[str, Handler],
    *,
    default_timeout: float,
    deadline: float | None,
    on_event: Callable[[StepEvent], None],
    grace: float = CLEANUP_GRACE,
) -> None:
    """Run every step as Daisy does; raise `WorkflowStepFailed` for the first step that fails, `DeadlineExceeded`
    (a `WorkflowError`) at `deadline`.

    `default_timeout` (seconds) is daisy's `-default_timeout`, for steps without a `Timeout`; `deadline` is a
    `time.monotonic()` value bounding the whole run. Handlers are called as `handler(step_name, step_body,
    context)`, each in its own thread; they must return soon after `context.cancel` is set.
    """
    for step in workflow.steps.values():
        if step.type not in handlers:
            raise WorkflowError(
                f"the qemu executor cannot run step {step.name}: Daisy step type {step.type} is not supported locally"
            )
    cancel = threading.Event()
    done: queue.Queue[tuple[str, BaseException | None]] = queue.Queue()
    cleanups: list[tuple[str, Callable[[], None]]] = []
    lock = threading.Lock()
    waiting = {name: set(needs) for name, needs in workflow.dependencies.items()}
    running: dict[str, tuple[threading.Thread, float]] = {}  # name -> (thread, time its timeout fires)

    def report(event: StepEvent) -> None:
        with contextlib.suppress(Exception):
            on_event(event)

    def start(step: Step) -> None:
        timeout = _seconds(step.timeout) if step.timeout else default_timeout
        ends = time.monotonic() + timeout
        context = StepContext(step, cancel, min(ends, deadline) if deadline is not None else ends, report,
                              cleanups, lock)  # fmt: skip

        def body() -> None:
            try:
                handlers[step.type](step.name, step.body, context)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which decides
                done.put((step.name, err))
            else:
                done.put((step.name, None))

        thread = threading.Thread(target=body, name=f"daisy-step-{step.name}", daemon=True)
        running[step.name] = (thread, ends)
        report(StepEvent(step.name, step.type, "started"))
        thread.start()

    def timeout_text(step: Step) -> str:
        # Daisy's words (step.go, getTimeoutError), with the limit as Go prints a time.Duration.
        limit = parse_duration(step.timeout) if step.timeout else round(default_timeout * NANOSECONDS)
        extra = f". {step.timeout_description}" if step.timeout_description else ""
        return f'step "{step.name}" did not complete within the specified timeout of {format_duration(limit)}{extra}'

    try:
        while waiting or running:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"workflow {workflow.name} was still running at its deadline "
                    f"(still running: {', '.join(sorted(running)) or 'nothing'})"
                )
            for name in [name for name, needs in waiting.items() if not needs]:
                del waiting[name]
                start(workflow.steps[name])
            now = time.monotonic()
            fires = min(ends for _, ends in running.values())
            limit = fires if deadline is None else min(fires, deadline)
            try:
                name, error = done.get(timeout=max(0.0, limit - now))
            except queue.Empty:
                now = time.monotonic()
                late = [name for name, (_, ends) in running.items() if ends <= now]
                if not late or (deadline is not None and now >= deadline):
                    continue  # the deadline is checked at the top
                step = workflow.steps[late[0]]
                report(StepEvent(step.name, step.type, "failed", timeout_text(step)))
                raise WorkflowStepFailed(step, timeout_text(step)) from None
            step = workflow.steps[name]
            del running[name]
            if error is not None:
                reason = str(error) or type(error).__name__
                report(StepEvent(step.name, step.type, "failed", reason))
                raise WorkflowStepFailed(step, reason) from error
            report(StepEvent(step.name, step.type, "finished"))
            for needs in waiting.values():
                needs.discard(name)
    finally:
        cancel.set()
        _wind_down(workflow, running, done, grace, report)
        with lock:
            hooks = list(reversed(cleanups))
        for description, action in hooks:
            try:
                action()
            except Exception as err:  # noqa: BLE001 - every cleanup runs; each failure is reported
                report(StepEvent("", "", "cleanup", f"{description} failed: {err}"))
            else:
                report(StepEvent("", "", "cleanup", description))


def _wind_down(
    workflow: Workflow,
    running: dict[str, tuple[threading.Thread, float]],
    done: queue.Queue[tuple[str, BaseException | None]],
    grace: float,
    report: Callable[[StepEvent], None],
) -> None:
    """Give the steps still running `grace` seconds to notice the cancel, as Daisy's cleanup does."""
    until = time.monotonic() + grace
    for name, (thread, _) in list(running.items()):
        thread.join(max(0.0, until - time.monotonic()))
        step = workflow.steps[name]
        report(StepEvent(step.name, step.type, "cancelled", "" if not thread.is_alive() else "still running"))


# WaitForInstancesSignal's serial matching.

Match = tuple[Literal["success", "failure", "status"] | None, str]


def field(spec: Mapping[str, Any], name: str) -> Any:
    """A field of a workflow object, its name matched without regard to case as Go's encoding/json matches it."""
    for key, value in spec.items():
        if key.lower() == name.lower():
            return value
    return None


def entries(body: Any, step: str, error: type[Exception]) -> list[Mapping[str, Any]]:
    """A step's body that must be a list of objects (CreateDisks, CreateInstances...), else `error`."""
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise error(f"{step}: expected a list of objects")
    return body


class SerialWatcher:
    """Daisy's serial-port matching (`step_wait_for_instances_signal.go`, `waitForSerialOutput`), fed incrementally.

    The output is cut at "\\n"; a last piece without one is kept and joined to the next chunk, so only complete
    lines are matched. For each line, in this order: `StatusMatch` (a substring anywhere in the line) reports a
    status and goes on; each `FailureMatch` (one string or a list; a substring anywhere) fails the wait; then
    `SuccessMatch` (a substring anywhere) ends it. So a line holding both fails. The text reported is the line
    from where the match begins, stripped of surrounding white space, as Daisy logs it. Empty `SuccessMatch` and
    `StatusMatch` are ignored; an empty string *in* `FailureMatch` matches every line, as in Daisy.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        failure = field(spec, "FailureMatch")
        self.success = str(field(spec, "SuccessMatch") or "")
        self.status = str(field(spec, "StatusMatch") or "")
        self.failures = [failure] if isinstance(failure, str) else [str(item) for item in failure or []]
        self.tail = ""
        self.cut = False  # the tail is the start of a line longer than LINE_LIMIT: the rest of it is dropped
        self.result: Match = (None, "")

    def feed(self, chunk: str) -> list[Match]:
        """The matches in `chunk`, in order; the last is the success or failure that ends the wait, if any.

        Memory stays bounded: of a line longer than `runner.LINE_LIMIT` characters only the start is kept
        and matched."""
        if self.result[0] is not None:
            return []
        if self.cut:
            end = chunk.find("\n")
            if end < 0:
                return []
            chunk, self.cut = chunk[end:], False
        *lines, self.tail = (self.tail + chunk).split("\n")
        if len(self.tail) > LINE_LIMIT:
            self.tail, self.cut = self.tail[:LINE_LIMIT], True
        found: list[Match] = []
        for line in lines:
            if self.status and (at := line.find(self.status)) != -1:
                found.append(("status", line[at:].strip()))
            for failure in self.failures:
                if (at := line.find(failure)) != -1:
                    self.result = ("failure", line[at:].strip())
                    return [*found, self.result]
            if self.success and (at := line.find(self.success)) != -1:
                self.result = ("success", line[at:].strip())
                return [*found, self.result]
        return found


def match_serial(text_so_far: str, signal_spec: Mapping[str, Any]) -> Match:
    """What Daisy's wait makes of the serial output so far (see `SerialWatcher` for the rules).

    ("success"|"failure", text) for the line that ends the wait; else ("status", text) for the last status line;
    else (None, ""). `signal_spec` is the `SerialOutput` object of a `WaitForInstancesSignal` entry.
    """
    found = SerialWatcher(signal_spec).feed(text_so_far)
    return found[-1] if found else (None, "")
