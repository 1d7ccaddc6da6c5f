"""The small family of errors the tool raises, and their exit codes.

Every error carries one line for the user: what is wrong and what to do.
The command-line entry point maps them to exit codes in one place
(`cos_customizer.cli.main`); nothing else calls `sys.exit`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CustomizerError(Exception):
    """A failure the user can act on; exits 1."""

    exit_code = EXIT_FAILURE


class UsageError(CustomizerError):
    """The command line itself is wrong (unknown flag, bad value, ...); exits 2."""

    exit_code = EXIT_USAGE


class WorkspaceError(CustomizerError):
    """The workspace is missing, corrupted, or in the wrong state."""


class ConfigError(CustomizerError):
    """A configuration document does not have the expected shape."""


class ValidationError(CustomizerError):
    """The requested build cannot work (sizes, unsupported steps, ...)."""
