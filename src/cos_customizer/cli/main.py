"""The `cos-customizer` entry point: global flags, dispatch, exit codes.

`cos-customizer [global flags] STEP [step flags]`. This is the one place
where errors become exit codes: 0 success, 1 failure, 2 usage error.
Tracebacks are shown only with `-debug`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cos_customizer import __version__
from cos_customizer.cli import boot, buildfile, completion, extra, finish, finish_flags, start, steps
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, HelpRequested, Kind, describe, parse
from cos_customizer.errors import EXIT_FAILURE, EXIT_OK, CustomizerError, UsageError, escaped, quoted, shown
from cos_customizer.workspace import DEFAULT_WORKDIR, WORKDIR_ENV, resolve_root

log = logging.getLogger("cos_customizer")

COMPUTE_ENDPOINT_ENV = "COS_CUSTOMIZER_COMPUTE_ENDPOINT"

GLOBAL_FLAGS = (
    Flag(
        "local-state-workdir",
        Kind.STRING,
        f"Directory for the build's local state; relative names are under $HOME. Default: ${WORKDIR_ENV} "
        f"when set, else {DEFAULT_WORKDIR}.",
    ),
    Flag(
        "compute-endpoint",
        Kind.STRING,
        f"If set, used as the endpoint for the GCE API (default ${COMPUTE_ENDPOINT_ENV} when set).",
    ),
    Flag("debug", Kind.BOOL, "Log every detail and show tracebacks on errors.", ours=True),
)
# Before the step only: install-gpu has a -version flag of its own (the driver's), as in the original.
VERSION_FLAG = Flag("version", Kind.BOOL, "Print the version and exit (before any step).", ours=True)

ORIGINAL_STEPS: tuple[Command, ...] = (
    start.COMMAND,
    steps.RUN_SCRIPT,
    steps.INSTALL_GPU,
    steps.SEAL_OEM,
    steps.DISABLE_AUTO_UPDATE,
    steps.ANTHOS_INSTALLER_INSTALL,
    finish.COMMAND,
)
BUILD = buildfile.command_for(ORIGINAL_STEPS)
COMMANDS = {
    command.name: command
    for command in (*ORIGINAL_STEPS, BUILD, extra.SAMPLE_IMAGE, extra.BUILD_PROVISIONER, boot.COMMAND)
}
# The completion command completes the whole table, itself included.
COMMANDS["completion"] = completion.handler_for(COMMANDS, GLOBAL_FLAGS, VERSION_FLAG)
OUR_COMMANDS: tuple[Command, ...] = (
    BUILD,
    extra.SAMPLE_IMAGE,
    extra.BUILD_PROVISIONER,
    boot.COMMAND,
    COMMANDS["completion"],
)


def overview() -> str:
    def rows(commands: Sequence[Command]) -> str:
        return "\n".join(f"  {command.name:<26} {command.synopsis}" for command in commands)

    return (
        f"cos-customizer {__version__}: customize Container-Optimized OS images.\n\n"
        "Usage: cos-customizer [global flags] STEP [step flags]\n\n"
        "Steps of Google's COS Customizer (same flags, same meaning):\n"
        f"{rows(ORIGINAL_STEPS)}\n\n"
        "Commands of this tool:\n"
        f"{rows(OUR_COMMANDS)}\n\n"
        "Global flags:\n"
        f"{describe((*GLOBAL_FLAGS, VERSION_FLAG))}\n\n"
        "Run 'cos-customizer STEP --help' for the flags of a step.\n"
    )


def command_help(command: Command) -> str:
    flags = describe(command.flags, finish_flags.FLAG_FORMATTERS) if command.flags else "  (none)"
    return (
        f"Usage: cos-customizer [global flags] {command.usage}\n\n"
        f"{command.description or command.synopsis}\n\n"
        f"Flags:\n{flags}\n\n"
        "Global flags (also accepted after the step name):\n"
        f"{describe(GLOBAL_FLAGS)}\n"
    )


@dataclass(frozen=True)
class Invocation:
    command: Command | None
    args: list[str]
    global_values: dict[str, object]
    help: bool = False


def _split(argv: Sequence[str]) -> Invocation:
    try:
        parsed = parse((*GLOBAL_FLAGS, VERSION_FLAG), argv, command="", interspersed=False)
    except HelpRequested:
        return Invocation(None, [], {}, help=True)
    if not parsed.positional:
        return Invocation(None, [], parsed.values, help=True)
    name, *rest = parsed.positional
    if name == "help":
        if not rest:
            return Invocation(None, [], parsed.values, help=True)
        name, rest = rest[0], ["--help"]
    command = COMMANDS.get(name)
    if command is None:
        raise UsageError(f"unknown step {quoted(name)}: run cos-customizer --help for the list of steps")
    return Invocation(command, rest, {k: v for k, v in parsed.values.items() if k in parsed.given})


GLOBAL_NAMES = frozenset(flag.name for flag in GLOBAL_FLAGS)


@dataclass
class Session:
    debug: bool = False


def run(argv: Sequence[str], environ: Mapping[str, str], session: Session) -> int:
    invocation = _split(argv)
    session.debug = bool(invocation.global_values.get("debug", False))
    if invocation.global_values.get("version"):
        sys.stdout.write(f"cos-customizer {__version__}\n")
        return EXIT_OK
    if invocation.command is None:
        sys.stdout.write(overview())
        return EXIT_OK
    command = invocation.command
    try:
        parsed = parse((*command.flags, *GLOBAL_FLAGS), invocation.args, command=command.name)
    except HelpRequested:
        sys.stdout.write(command_help(command))
        return EXIT_OK
    chosen = dict(invocation.global_values)
    chosen.update({name: parsed.values[name] for name in parsed.given & GLOBAL_NAMES})
    session.debug = bool(chosen.get("debug", False))
    _setup_logging(session.debug)
    _check_positional(command, parsed.positional)
    workdir = chosen.get("local-state-workdir")
    context = Context(
        workspace_root=resolve_root(None if workdir is None else str(workdir), environ),
        environ=environ,
        compute_endpoint=str(chosen.get("compute-endpoint") or environ.get(COMPUTE_ENDPOINT_ENV, "")),
        workdir_given=workdir is not None,
    )
    return command.handler(context, parsed)


def _check_positional(command: Command, positional: Sequence[str]) -> None:
    if len(positional) > len(command.positional):
        unexpected = positional[len(command.positional)]
        raise UsageError(
            f"unexpected argument {quoted(unexpected)}: usage: cos-customizer {command.usage} "
            "(flags are written -name=value)"
        )
    required = len(command.positional) if command.required_positional is None else command.required_positional
    if len(positional) < required:
        missing = command.positional[len(positional)]
        raise UsageError(f"missing {missing}: usage: cos-customizer {command.usage}")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line and return the exit code; errors become one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    session = Session()
    _setup_logging(False)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run(argv, os.environ if environ is None else environ, session)
    except CustomizerError as err:
        if session.debug:
            log.exception("cos-customizer failed")
        sys.stderr.write(f"cos-customizer: error: {escaped(str(err))}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("cos-customizer: interrupted (Ctrl-C); nothing was left half-written\n")
        return 130
    except Terminated:
        sys.stderr.write("cos-customizer: stopped by SIGTERM; nothing was left half-written\n")
        return 143
    except OSError as err:
        if session.debug:
            log.exception("cos-customizer failed")
        sys.stderr.write(f"cos-customizer: error: {escaped(describe_os_error(err))}\n")
        return EXIT_FAILURE
    except Exception as err:
        if session.debug:
            log.exception("cos-customizer failed")
        sys.stderr.write(
            f"cos-customizer: internal error: {type(err).__name__}: {escaped(str(err))} "
            "(run again with -debug for the traceback)\n"
        )
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space there and run the step again",
    errno.EDQUOT: "free some space there (a disk quota is full) and run the step again",
    errno.EROFS: "the file system is read-only: choose a place on a writable one",
    errno.ENOTDIR: "a part of the path is a regular file, not a directory: choose another path",
    errno.EEXIST: "choose another path",
    errno.EACCES: "check the permissions, or run as a user who may write there",
    errno.EPERM: "check the permissions, or run as a user who may write there",
    errno.EXDEV: "keep both on the same file system",
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error no step turned into a CustomizerError: what failed, where, what to do."""
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and err.filename:
        blocker = _non_directory(Path(os.fsdecode(err.filename)))
        if blocker is not None:
            return (
                f"{shown(blocker)} is not a directory (the path {_name(err.filename)} goes through it): choose "
                "another path"
            )
    what = err.strerror or str(err)
    where = " -> ".join(_name(name) for name in (err.filename, err.filename2) if name is not None)
    hint = OS_ERROR_HINTS.get(err.errno or 0, "")
    return what + (f": {where}" if where else "") + (f" ({hint})" if hint else "")


def _name(filename: object) -> str:
    """A file name an OSError carries (text, bytes or a descriptor), as a message shows it."""
    if isinstance(filename, (str, bytes, os.PathLike)):
        return shown(os.fsdecode(filename))
    return str(filename)


def _non_directory(path: Path) -> Path | None:
    """The first existing part of `path` (from the root down) that is not a directory, if any."""
    for part in (*reversed(path.parents), path):
        if os.path.lexists(part) and not part.is_dir():
            return part
    return None


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every cleanup runs."""


def _terminated(_signum: int, _frame: object) -> None:
    raise Terminated()


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (so captured output works)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if isinstance(record.args, tuple):  # the values a message names: one line, nothing a terminal acts on
                record.args = tuple(_escaped_arg(arg) for arg in record.args)
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _escaped_arg(arg: object) -> object:
    return escaped(os.fspath(arg)) if isinstance(arg, (str, os.PathLike)) else arg


def _setup_logging(debug: bool) -> None:
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def entry() -> None:
    sys.exit(main())
