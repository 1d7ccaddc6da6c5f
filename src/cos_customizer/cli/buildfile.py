"""`cos-customizer build FILE`: a whole build from one YAML file, run by the step commands' own handlers.

The file's keys are the command line's own step and flag names without the dash:

    source: {image-file: cos.raw}          # start-image-build's flags
    build-context: ctx                     # start-image-build's -build-context (also accepted in source)
    steps:
      - run-script: {script: preload.sh, env: [A=1, "LIST=x,y"]}
      - seal-oem
    finish: {oem-size: 1G, disk-size-gb: 12, output: custom.tar.gz}

No second implementation: the whole file is read and checked first, each part becoming the `Parsed`
flags of one command (every value goes through `flags.set_value`, the command line's own conversion
and checks), and then start-image-build's, each step's and finish-image-build's handlers run in turn,
exactly as the step commands would. The workspace is a temporary one, removed at the end (also on
failure or Ctrl-C), unless `-local-state-workdir` is given. The handlers run with the build file's
directory as the working directory, so every host path in the file (image-file, build-context,
output, deps-dir, provisioner-binary...) is relative to the file, as docker-compose does; paths inside
the build context (script, pkgspec-url, sbom-input-path) stay relative to the build context.

An optional `boot:` section (the boot command's flags but image-file) boots the output after the build,
as `cos-customizer boot` does, and fails the build when the success match is not seen; all its checks run
before the build starts.

Every error names the file, the line and the key: `build.yaml:7: steps[0].run-script.env: ...`.
The file's JSON Schema (`-print-schema`) is generated from the same command table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cos_customizer import workspace
from cos_customizer.cli import boot as boot_cli
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import BOOL_TEXTS, INT_TEXT_LIMIT, Flag, Kind, Parsed, check_text, parse, set_value
from cos_customizer.errors import EXIT_USAGE, BuildFailed, CustomizerError, UsageError, WorkspaceError, quoted, shown
from cos_customizer.executors.qemu import vm
from cos_customizer.units import format_duration

log = logging.getLogger(__name__)

START = "start-image-build"
FINISH = "finish-image-build"
TOP_KEYS = ("source", "build-context", "steps", "finish")
BOOT = "boot"  # the optional top key: the output booted after the build
MAX_SIZE = 1 << 20  # a build file is a few lines; refuse anything that is not
# How deep a build file's collections may nest; it needs 5 (steps, a step, its flags, -env's list, an item).
# Deeper is refused as it is read, before the (recursive) composer could exhaust Python's stack.
MAX_DEPTH = 16
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_TAG = "tag:yaml.org,2002:"
# The YAML tags a build file may hold (plain YAML: no custom or language tags), as the kinds we name.
_KINDS = {
    f"{_TAG}str": "string",
    f"{_TAG}timestamp": "string",  # 2024-01-01 is a date to YAML 1.1, text to us (and to YAML 1.2 editors)
    f"{_TAG}int": "integer",
    f"{_TAG}float": "number",
    f"{_TAG}bool": "boolean",
    f"{_TAG}null": "null",
    f"{_TAG}seq": "list",
    f"{_TAG}map": "mapping",
}
EXPECTED = {
    Kind.STRING: "a string",
    Kind.BOOL: "true or false",
    Kind.INT: "an integer",
    Kind.DURATION: 'a duration such as "30m" or "1h30m"',
    Kind.MAP: 'a list of "K=V" strings or a mapping of K: V',
    Kind.LIST: "a list of strings or a comma-separated string",
}


class LocatedError(CustomizerError):
    """An error at a place in the build file; keeps the exit code of the error it locates."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class Table:
    """The commands a build file names: start-image-build, the optional steps, finish-image-build."""

    start: Command
    steps: dict[str, Command]
    finish: Command

    @classmethod
    def of(cls, original_steps: Sequence[Command]) -> Table:
        by_name = {command.name: command for command in original_steps}
        steps = {name: command for name, command in by_name.items() if name not in (START, FINISH)}
        return cls(by_name[START], steps, by_name[FINISH])


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One command of the build, as the step command line would have given it."""

    command: Command
    parsed: Parsed
    line: int
    key: str


@dataclasses.dataclass(frozen=True)
class Boot:
    """The `boot:` section: boot the build's output once it is built."""

    job: vm.BootJob
    output: str  # finish's output, as the file gives it
    line: int


@dataclasses.dataclass(frozen=True)
class BuildFile:
    name: str  # as given on the command line: error messages start with it
    directory: Path  # absolute: relative paths in the file are relative to it
    invocations: tuple[Invocation, ...]
    boot: Boot | None = None


# Reading


class _AliasRefused(yaml.MarkedYAMLError):
    """Valid YAML, but not in a build file."""


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases (a build file spells every value out) and nesting deeper than
    MAX_DEPTH (the composer recurses once per level: it is stopped before Python's stack runs out)."""

    depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            problem = f"the YAML alias *{event.anchor} is not accepted in a build file: write the value out"
            raise _AliasRefused(problem=problem, problem_mark=event.start_mark)
        if self.depth >= MAX_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            problem = (
                f"lists and mappings nested more than {MAX_DEPTH} deep are not accepted in a build file "
                "(it needs 5 levels at most): write each step as '- run-script: {script: a.sh}'"
            )
            raise _AliasRefused(problem=problem, problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Reader:
    """Turns the composed YAML nodes of one file into invocations; every refusal names FILE:LINE: KEY."""

    def __init__(self, name: str, table: Table) -> None:
        self.name = name
        self.table = table
        self.boot_entry: tuple[Node, Node] | None = None

    def error(self, node: Node, key: str, message: str, exit_code: int = EXIT_USAGE) -> LocatedError:
        where = f"{shown(self.name)}:{node.start_mark.line + 1}:"
        return LocatedError(f"{where} {key}: {message}" if key else f"{where} {message}", exit_code)

    def kind(self, node: Node, key: str) -> str:
        kind = _KINDS.get(node.tag)
        if kind is None:
            raise self.error(node, key, f"the YAML tag {shown(node.tag)} is not accepted in a build file")
        return kind

    def mapping(self, node: Node, key: str) -> list[tuple[str, Node, Node]]:
        """The entries of a mapping node, keys as text; duplicate and non-text keys refused."""
        assert isinstance(node, MappingNode)
        seen: dict[str, int] = {}
        entries: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or self.kind(key_node, key) not in ("string", "integer"):
                raise self.error(key_node, key, "keys must be plain names")
            name = key_node.value
            if name in seen:
                raise self.error(key_node, _join(key, name), f"given twice (first on line {seen[name]})")
            seen[name] = key_node.start_mark.line + 1
            entries.append((name, key_node, value_node))
        return entries

    def read(self, root: Node | None) -> tuple[Invocation, ...]:
        shape = "a build file is a mapping with source, steps and finish (see cos-customizer build -print-schema)"
        if root is None or self.kind(root, "") != "mapping":
            line = 1 if root is None else root.start_mark.line + 1
            raise LocatedError(f"{shown(self.name)}:{line}: {shape}", EXIT_USAGE)
        top: dict[str, tuple[Node, Node]] = {}
        for name, key_node, value_node in self.mapping(root, ""):
            if name == BOOT:
                self.boot_entry = (key_node, value_node)
                continue
            if name not in TOP_KEYS:
                keys = (*TOP_KEYS, BOOT)
                known = f"unknown key {quoted(name)}{_suggest(name, keys)}; a build file has {', '.join(keys)}"
                raise self.error(key_node, name, known)
            top[name] = (key_node, value_node)
        for required, example in (("source", "source: {image-file: cos.raw}"), ("finish", "finish: {output: out.raw}")):
            if required not in top:
                raise self.error(root, "", f"{required} is missing (e.g. {example})")
        key_node, value_node = top["source"]
        start = self.flags(self.table.start, value_node, "source")
        if "build-context" in top:
            context_key, context_value = top["build-context"]
            if "build-context" in start.given:
                raise self.error(context_key, "build-context", "given both here and in source: keep one")
            self.value(_flag(self.table.start, "build-context"), context_value, "build-context", start)
        invocations = [Invocation(self.table.start, start, key_node.start_mark.line + 1, "source")]
        if "steps" in top:
            invocations.extend(self.steps(top["steps"][1]))
        key_node, value_node = top["finish"]
        finish = self.flags(self.table.finish, value_node, "finish")
        invocations.append(Invocation(self.table.finish, finish, key_node.start_mark.line + 1, "finish"))
        return tuple(invocations)

    def boot(self, invocations: tuple[Invocation, ...], directory: Path) -> Boot | None:
        """The `boot:` section, every check of `cos-customizer boot` done now (paths relative to `directory`)."""
        if self.boot_entry is None:
            return None
        key_node, node = self.boot_entry
        if self.kind(node, BOOT) == "mapping":
            for name, flag_node, _ in self.mapping(node, BOOT):
                if name == "image-file":
                    raise self.error(flag_node, _join(BOOT, name), "the image booted is the build's output "
                                     "(finish's output): boot takes no image-file")  # fmt: skip
        parsed = self.flags(BOOT_COMMAND, node, BOOT)
        start, finish = invocations[0].parsed, invocations[-1].parsed
        if not start["image-file"]:
            raise self.error(key_node, BOOT, "a GCE build has no local output to boot; boot needs a local build "
                             "(source: {image-file: ...}, finish: {output: ...})")  # fmt: skip
        if not finish["output"]:
            raise self.error(key_node, BOOT, "boot boots the build's output: set finish's output")
        if not parsed["success-match"]:
            raise self.error(key_node, BOOT, "success-match must be set: a build file's boot checks the output "
                             "(the interactive console is cos-customizer boot -image-file=OUTPUT)")  # fmt: skip
        try:
            with contextlib.chdir(directory):
                job = boot_cli.job_from(parsed, directory / finish["output"])
        except CustomizerError as err:
            raise self.error(key_node, BOOT, str(err), err.exit_code) from None
        return Boot(job, finish["output"], key_node.start_mark.line + 1)

    def steps(self, node: Node) -> list[Invocation]:
        kind = self.kind(node, "steps")
        if kind == "null":
            return []
        if kind != "list":
            raise self.error(node, "steps", f"expected a list of steps, not {_describe(node, kind)}")
        assert isinstance(node, SequenceNode)
        invocations = []
        for index, item in enumerate(node.value):
            key = f"steps[{index}]"
            item_kind = self.kind(item, key)
            if item_kind == "string":
                name, flags = item.value, None
            elif item_kind == "mapping" and len(entries := self.mapping(item, key)) == 1:
                name, _, flags = entries[0]
            else:
                raise self.error(item, key, "a step is one step name, with its flags or nothing: "
                                 "'- run-script: {script: preload.sh}' or '- seal-oem'")  # fmt: skip
            command = self.table.steps.get(name)
            if command is None:
                raise self.error(item, _join(key, name), self.unknown_step(name))
            parsed = self.flags(command, flags, _join(key, name))
            invocations.append(Invocation(command, parsed, item.start_mark.line + 1, _join(key, name)))
        return invocations

    def unknown_step(self, name: str) -> str:
        if name == START:
            return f"{START} is the file's source (and build-context), not a step"
        if name == FINISH:
            return f"{FINISH} is the file's finish, not a step"
        known = ", ".join(self.table.steps)
        return f"unknown step {quoted(name)}{_suggest(name, self.table.steps)}; the steps are {known}"

    def flags(self, command: Command, node: Node | None, key: str) -> Parsed:
        """The command's flags from a mapping (empty or null: none given), as its command line would give them."""
        parsed = parse(command.flags, [], command=command.name)
        if node is None:
            return parsed
        kind = self.kind(node, key)
        if kind == "null":
            return parsed
        if kind != "mapping":
            raise self.error(node, key, f"expected a mapping of {command.name}'s flags, not {_describe(node, kind)}")
        by_name = {flag.name: flag for flag in command.flags}
        for name, key_node, value_node in self.mapping(node, key):
            flag = by_name.get(name)
            if flag is None:
                raise self.error(key_node, _join(key, name), f"{command.name} has no flag -{shown(name)}"
                                 f"{_suggest(name, by_name)}; see cos-customizer {command.name} --help")  # fmt: skip
            self.value(flag, value_node, _join(key, name), parsed)
        return parsed

    def value(self, flag: Flag, node: Node, key: str, parsed: Parsed) -> None:
        """One flag's value, taken by the command line's own conversion (`set_value`) wherever text allows it."""
        kind = self.kind(node, key)
        items: list[str]
        if flag.kind is Kind.STRING and kind in ("string", "integer", "number"):
            items = [node.value]
        elif flag.kind is Kind.BOOL and kind == "boolean":
            items = ["true" if SafeConstructor.bool_values[node.value.lower()] else "false"]
        elif flag.kind is Kind.INT and kind == "integer":
            assert isinstance(node, ScalarNode)
            if len(node.value) > INT_TEXT_LIMIT:  # before any conversion: int() refuses 4300 digits
                raise self.error(
                    node, key, f"invalid value {quoted(node.value, 40)} for flag -{flag.name}: value out of range"
                )
            items = [str(SafeConstructor().construct_yaml_int(node))]
        elif kind == "string" and flag.kind in (Kind.BOOL, Kind.INT, Kind.DURATION, Kind.MAP, Kind.LIST):
            items = [node.value]
        elif flag.kind in (Kind.MAP, Kind.LIST) and kind == "list":
            assert isinstance(node, SequenceNode)
            items = [self.item(flag, item, f"{key}[{index}]") for index, item in enumerate(node.value)]
        elif flag.kind is Kind.MAP and kind == "mapping":
            self.literal_map(flag, node, key, parsed)
            return
        else:
            raise self.error(node, key, f"expected {EXPECTED[flag.kind]}, not {_describe(node, kind)}"
                             + _quote_hint(node, kind, flag))  # fmt: skip
        for item in items:
            try:
                set_value(flag, item, parsed)
            except CustomizerError as err:
                raise self.error(node, key, str(err), err.exit_code) from None

    def item(self, flag: Flag, node: Node, key: str) -> str:
        """One item of a list given to a map or list flag: one repeat of the flag."""
        kind = self.kind(node, key)
        if kind == "string" or (flag.kind is Kind.LIST and kind in ("integer", "number")):
            return str(node.value)
        wanted = '"K=V" string' if flag.kind is Kind.MAP else "string"
        raise self.error(node, key, f"expected a {wanted}, not {_describe(node, kind)}" + _quote_hint(node, kind, flag))

    def literal_map(self, flag: Flag, node: Node, key: str, parsed: Parsed) -> None:
        """{K: V}: each value taken as written (commas and all), which -K=V on a command line cannot say."""
        values: dict[str, str] = parsed.values[flag.name]
        for name, key_node, value_node in self.mapping(node, key):
            if not name or "=" in name:
                raise self.error(key_node, key, f"{name!r} cannot be a key: a key is not empty and has no '='")
            kind = self.kind(value_node, _join(key, name))
            if kind not in ("string", "integer", "number", "boolean"):
                raise self.error(value_node, _join(key, name), f"expected a value, not {_describe(value_node, kind)}")
            for text, text_node in ((name, key_node), (value_node.value, value_node)):
                try:
                    check_text(text)
                except ValueError as err:
                    raise self.error(text_node, _join(key, name), f"invalid value {quoted(text)}: {err}") from None
            values[name] = value_node.value
        parsed.given.add(flag.name)


def _join(key: str, name: str) -> str:
    return f"{key}.{shown(name)}" if key else shown(name)


def _flag(command: Command, name: str) -> Flag:
    return next(flag for flag in command.flags if flag.name == name)


def _describe(node: Node, kind: str) -> str:
    if kind in ("list", "mapping"):
        return f"a {kind}"
    if kind == "null":
        return "nothing (null)"
    return f"the {kind} {shown(node.value)}" if kind != "string" else f"the string {node.value!r}"


def _quote_hint(node: Node, kind: str, flag: Flag) -> str:
    """For a scalar YAML read as something else than text: quoting it makes it text."""
    if kind in ("boolean", "number", "integer") and flag.kind in (Kind.STRING, Kind.MAP, Kind.LIST, Kind.DURATION):
        return f" (quote it to give the text: {quoted(node.value)})"
    return ""


def _suggest(name: str, choices: Sequence[str] | dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read(path: str, table: Table, *, dry_run: bool = False) -> BuildFile:
    """Read and check the whole file; nothing runs yet. With `dry_run`, finish-image-build gets -dry-run."""
    file = Path(path)
    try:
        info = file.stat()
    except OSError as err:
        raise UsageError(f"{shown(path)}: cannot read the build file: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{shown(path)}: not a regular file; give a YAML build file")
    if info.st_size > MAX_SIZE:
        raise UsageError(f"{shown(path)}: {info.st_size} bytes is too large for a build file (at most {MAX_SIZE})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{shown(path)}: not UTF-8 text; a build file is YAML") from None
    except OSError as err:
        raise UsageError(f"{shown(path)}: cannot read the build file: {err.strerror}") from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _AliasRefused as err:
        line = err.problem_mark.line + 1 if err.problem_mark else 1
        raise UsageError(f"{shown(path)}:{line}: {err.problem}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = "; ".join(part for part in (err.context, err.problem) if part)
        raise UsageError(f"{shown(path)}:{mark.line + 1 if mark else 1}: not valid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{shown(path)}: not valid YAML: {' '.join(str(err).split())}") from None
    reader = _Reader(path, table)
    invocations = reader.read(root)
    directory = file.absolute().parent
    boot = reader.boot(invocations, directory)
    if dry_run:
        set_value(_flag(table.finish, "dry-run"), "true", invocations[-1].parsed)
    return BuildFile(path, directory, invocations, boot)


# Running


@contextlib.contextmanager
def _workspace(context: Context, build: BuildFile) -> Iterator[Path]:
    """The chosen -local-state-workdir (never one holding the build file), or a fresh temporary one of the
    tool's own, removed at the end whatever happens."""
    if context.workdir_given:
        root = context.workspace_root
        if workspace.contains(root, build.directory / Path(build.name).name):
            raise WorkspaceError(
                f"{build.name} is inside the workspace {root}, which the build replaces and removes: move the "
                "build file out of it, or choose another -local-state-workdir"
            )
        yield root
        return
    scratch = Path(tempfile.mkdtemp(prefix="cos-customizer-build.", dir=context.environ.get("TMPDIR") or None))
    try:
        yield scratch / "workspace"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(context: Context, build: BuildFile) -> int:
    """Run the build's commands in order with their own handlers; an error names the command's line."""
    with _workspace(context, build) as root, contextlib.chdir(build.directory):
        step_context = dataclasses.replace(context, workspace_root=root)
        for number, invocation in enumerate(build.invocations, 1):
            log.info("%s:%d: %s (%d of %d)", build.name, invocation.line, invocation.command.name, number,
                     len(build.invocations))  # fmt: skip
            try:
                code = invocation.command.handler(step_context, invocation.parsed)
            except CustomizerError as err:
                located = _failed_step(build, invocation, err)
                where = f"{shown(build.name)}:{located.line}: {located.key}"
                raise LocatedError(f"{where}: {err}", err.exit_code) from err
            if code:
                return code
    if build.boot is not None:  # the workspace is gone: the output stays
        return _boot(context, build, build.boot)
    return 0


def _boot(context: Context, build: BuildFile, boot: Boot) -> int:
    """Boot the built output; in a dry run, say what would be booted (after the plan, on stderr)."""
    if build.invocations[-1].parsed["dry-run"]:
        sys.stderr.write(
            f"then: boot {boot.output}, waiting for serial port {boot.job.port} to say {boot.job.success!r}\n"
        )
        return 0
    log.info("%s:%d: boot (after the build)", build.name, boot.line)
    try:
        return boot_cli.boot(context, boot.job)
    except CustomizerError as err:
        raise LocatedError(f"{shown(build.name)}:{boot.line}: {BOOT}: {err}", err.exit_code) from err


def _failed_step(build: BuildFile, invocation: Invocation, err: CustomizerError) -> Invocation:
    """Where a failure is reported: the step the build says failed (`BuildFailed.step`, any executor), else
    `invocation`.

    Each step command adds one step to the build, in order, so the build's step N is the file's steps[N].
    """
    step = err.step if isinstance(err, BuildFailed) else None
    steps = build.invocations[1:-1]
    if invocation is build.invocations[-1] and step is not None and 0 <= step < len(steps):
        return steps[step]
    return invocation


# The JSON Schema


def _flag_schema(flag: Flag, formatters: dict[Kind, Any]) -> dict[str, Any]:
    text = flag.help + (" [cos-customizer addition]" if flag.ours else "")
    schema: dict[str, Any]
    if flag.kind is Kind.STRING:
        schema = {"type": ["string", "number"]}
    elif flag.kind is Kind.BOOL:
        schema = {"anyOf": [{"type": "boolean"}, {"enum": list(BOOL_TEXTS)}]}
    elif flag.kind is Kind.INT:
        schema = {"type": ["integer", "string"]}
    elif flag.kind is Kind.DURATION:
        schema = {"type": "string"}
    elif flag.kind is Kind.MAP:
        schema = {
            "anyOf": [
                {"type": "array", "items": {"type": "string"}},
                {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
                {"type": "string"},
            ]
        }
    else:
        schema = {"anyOf": [{"type": "array", "items": {"type": ["string", "number"]}}, {"type": "string"}]}
    schema = {"description": text, **schema}
    if flag.default not in (None, "", 0, False) and flag.kind not in (Kind.MAP, Kind.LIST):
        schema["default"] = formatters[flag.kind](flag.default) if flag.kind in formatters else flag.default
    return schema


def _flags_schema(command: Command) -> dict[str, Any]:
    formatters = {Kind.DURATION: format_duration}
    return {
        "description": f"{command.name}: {command.synopsis} Its flags, named without the dash; empty or null: none.",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {flag.name: _flag_schema(flag, formatters) for flag in command.flags},
    }


def schema(table: Table) -> dict[str, Any]:
    """The build file's JSON Schema (draft 2020-12), from the same flag definitions that parse the file."""
    names = list(table.steps)
    defs = {command.name: _flags_schema(command) for command in (table.start, *table.steps.values(), table.finish)}
    step = {
        "anyOf": [
            {"description": "A step with no flags.", "enum": names},
            {
                "description": "A step and its flags.",
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": False,
                "properties": {name: {"$ref": f"#/$defs/{name}"} for name in names},
            },
        ]
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "cos-customizer build file",
        "description": "A whole COS image build: `cos-customizer build FILE`. Keys are the step commands' names "
        "and flags without the dash; relative host paths are relative to the file.",
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "finish"],
        "properties": {
            "source": {**defs[START], "description": f"{START}'s flags: the source image (and build context)."},
            "build-context": _flag_schema(_flag(table.start, "build-context"), {}),
            "steps": {"description": "The steps, in order.", "type": ["array", "null"], "items": step},
            "finish": {**defs[FINISH], "description": f"{FINISH}'s flags."},
            BOOT: {
                **_flags_schema(BOOT_COMMAND),
                "description": "boot's flags but image-file: boot the build's local output after the build, "
                "and fail the build when the success match is not seen.",
            },
        },
        "$defs": defs,
    }


def schema_text(table: Table) -> str:
    return json.dumps(schema(table), indent=2) + "\n"


# The command

# `boot`'s flags but image-file: a build file's boot boots its output.
BOOT_COMMAND = dataclasses.replace(
    boot_cli.COMMAND, flags=tuple(flag for flag in boot_cli.COMMAND.flags if flag.name != "image-file")
)

FLAGS = (
    Flag("dry-run", Kind.BOOL, "Run the steps into a temporary workspace and print finish-image-build's "
         "-dry-run plan (text on stderr, JSON on stdout); change nothing else.", ours=True),
    Flag("print-schema", Kind.BOOL, "Print the build file's JSON Schema and exit (no FILE then).", ours=True),
)  # fmt: skip


def command_for(original_steps: Sequence[Command]) -> Command:
    """The `build` command over the original's steps (main's ORIGINAL_STEPS)."""
    table = Table.of(original_steps)

    def handle(context: Context, args: Parsed) -> int:
        if args["print-schema"]:
            if args.positional:
                raise UsageError("-print-schema takes no FILE: usage: cos-customizer build -print-schema")
            sys.stdout.write(schema_text(table))
            return 0
        if not args.positional:
            raise UsageError("missing FILE: usage: cos-customizer build [-dry-run] FILE")
        return run(context, read(args.positional[0], table, dry_run=args["dry-run"]))

    return Command(
        name="build",
        synopsis="Run a whole build from one YAML file: source, steps, finish.",
        description=(
            "Run a whole build from one YAML build file whose keys are the steps' names and flags without the "
            "dash (source: start-image-build's flags, build-context, steps: a list of steps with their flags, "
            "finish: finish-image-build's flags), through the step commands' own code. The workspace is "
            "temporary unless -local-state-workdir is given. Relative paths in the file are relative to its "
            "directory. See -print-schema for the file's JSON Schema."
        ),
        flags=FLAGS,
        handler=handle,
        positional=("FILE",),
        required_positional=0,
    )
