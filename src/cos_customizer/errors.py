"""The small family of errors the tool raises, and their exit codes.

Every error carries one line for the user: what is wrong and what to do.
The command-line entry point maps them to exit codes in one place
(`cos_customizer.cli.main`); nothing else calls `sys.exit`.
"""

from __future__ import annotations

import os

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


class BuildFailed(CustomizerError):
    """The build ran and failed (a script, a tool, the workflow, the deadline), with any executor."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        # The 0-based index of the provisioner step it belongs to (the order the steps were added), if one.
        self.step = step


# Values from the user or from untrusted files, as they appear in a one-line message.

QUOTE_LIMIT = 1000  # characters of one value shown; the rest is counted, not printed
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escaped(text: str) -> str:
    """`text` with every character that is not printable written as an escape (\\n, \\x1b, \\u2028, a lone
    surrogate's \\udc80...): one line, and nothing a terminal acts on."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def quoted(value: str | os.PathLike[str], limit: int = QUOTE_LIMIT) -> str:
    """`value` in double quotes, its quotes, backslashes and unprintable characters escaped, cut after `limit`
    characters (the rest counted): where it begins and ends is never in doubt."""
    text = os.fspath(value)
    cut = f"... ({len(text) - limit} more characters)" if len(text) > limit else ""
    inner = escaped(text[:limit].replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{inner}"{cut}'


def shown(value: str | os.PathLike[str], limit: int = QUOTE_LIMIT) -> str:
    """`value` as is when it is plain (printable, not empty, no quote, backslash or space at either end, at
    most `limit` characters), else `quoted` (as GNU ls quotes only the names that need it)."""
    text = os.fspath(value)
    plain = text.isprintable() and text.strip() == text and len(text) <= limit
    if plain and text and not any(char in text for char in "\"'\\"):
        return text
    return quoted(text, limit)
