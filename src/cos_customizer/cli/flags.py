"""Command-line flags parsed the way Go's `flag` package parses them.

Existing Cloud Build files pass `-flag=value`, so every form Go accepts is
accepted here: `-f=v`, `-f v`, `--f=v`, `--f v`, and for booleans `-f`,
`-f=true`, `-f=false` (never `-f false`). Map flags (`-env`, `-labels`) and
list flags (`-licenses`) accumulate over repeats, as in the original.
"""

from __future__ import annotations

import enum
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cos_customizer.errors import UsageError, ValidationError, quoted, shown
from cos_customizer.units import parse_duration


class Kind(enum.Enum):
    STRING = "string"
    BOOL = "bool"
    INT = "int"
    DURATION = "duration"
    MAP = "K=V,..."
    LIST = "value,..."


@dataclass(frozen=True)
class Flag:
    name: str
    kind: Kind
    help: str
    default: Any = None
    # Extra check of a string flag's value; raises ValueError with the reason.
    check: Callable[[str], object] | None = None
    # True for flags that the Go original does not have.
    ours: bool = False
    # For a string flag with a default: what an empty value would do in the original, where it can only fail
    # later; such a value is refused with this and the default. None: an empty value means the default.
    empty: str | None = None

    @property
    def initial(self) -> Any:
        if self.kind is Kind.MAP:
            return {}
        if self.kind is Kind.LIST:
            return []
        if self.default is not None:
            return self.default
        return {Kind.STRING: "", Kind.BOOL: False, Kind.INT: 0, Kind.DURATION: 0}[self.kind]


class HelpRequested(Exception):
    """`-h`, `-help` or `--help` was given."""


@dataclass
class Parsed:
    values: dict[str, Any]
    given: set[str] = field(default_factory=set)
    positional: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
# Every text Go's strconv.ParseBool accepts.
BOOL_TEXTS = tuple(sorted(_TRUE | _FALSE))


def parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("parse error")


# The longest text an int64 takes (a sign, 0b and 64 binary digits, with room for Go's underscores):
# longer is refused before any conversion (Python's int() refuses more than 4300 digits).
INT_TEXT_LIMIT = 100


def parse_int(text: str) -> int:
    """Go's strconv.ParseInt(s, 0, 64): decimal, 0x, 0o, 0b, and leading-0 octal."""
    if len(text) > INT_TEXT_LIMIT:
        raise ValueError("value out of range")
    body = text.lstrip("+-")
    if len(body) > 1 and body[0] == "0" and body[1].isdigit():
        text = text.replace("0", "0o", 1)
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError("parse error") from None
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError("value out of range")
    return value


def parse_map(text: str, into: dict[str, str]) -> None:
    """`K=V,K2=V2`; a piece without `=` continues the previous value (so values may hold commas)."""
    last: str | None = None
    for piece in text.split(","):
        key, sep, value = piece.partition("=")
        if sep and key:
            into[key] = value
            last = key
        elif last is not None:
            into[last] += "," + piece
        else:
            raise ValueError(f"item {piece!r} is improperly formatted; does it have an '=' character?")


def check_text(text: str) -> None:
    """Refuse what no program, file name or environment variable can hold: a NUL, a lone surrogate.

    A command line never holds them; a build file can write them as escapes ("\\0", "\\ud800"). Bytes that
    are not UTF-8 on the command line are kept (as the surrogates 0xDC80-0xDCFF, which encode back).
    """
    if "\0" in text:
        raise ValueError("a NUL character cannot be passed to a program, a file name or an environment variable")
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("it holds a lone surrogate, which is not text: write the character itself") from None


def set_value(flag: Flag, raw: str, parsed: Parsed) -> None:
    """Take `raw` as the value of one `-name=raw` on the command line: converted, checked, accumulated."""
    if raw == "" and flag.kind is Kind.STRING:
        # Go's flag package stores "": for a flag without a default that is "not set", as the original reads
        # it (-oem-size= from an empty Cloud Build substitution is no -oem-size). For a flag with a default,
        # "" means the default where the original ends up with the default too (daisy's disk type and machine
        # type, the provisioner's install directory), and is refused where it could only fail later.
        if flag.empty is not None and flag.default:
            raise ValidationError(
                f"-{flag.name} is empty: {flag.empty}; leave the flag out for the default {quoted(flag.default)}"
            )
        parsed.values[flag.name] = flag.initial
        return
    try:
        check_text(raw)
        if flag.kind is Kind.BOOL:
            value: Any = parse_bool(raw)
        elif flag.kind is Kind.INT:
            value = parse_int(raw)
        elif flag.kind is Kind.DURATION:
            value = parse_duration(raw)
        elif flag.kind is Kind.MAP:
            parse_map(raw, parsed.values[flag.name])
            value = parsed.values[flag.name]
        elif flag.kind is Kind.LIST:
            value = parsed.values[flag.name] + raw.split(",")
        else:
            if flag.check is not None:
                flag.check(raw)
            value = raw
    except ValueError as err:
        what = "boolean value" if flag.kind is Kind.BOOL else "value"
        message = f"invalid {what} {quoted(raw)} for flag -{flag.name}: {err}"
        if flag.kind is Kind.STRING:  # Go's parser takes any string; the original refuses it later (exit 1)
            raise ValidationError(message) from None
        raise UsageError(message) from None
    parsed.values[flag.name] = value
    parsed.given.add(flag.name)


def parse(flags: Sequence[Flag], args: Sequence[str], *, command: str, interspersed: bool = True) -> Parsed:
    """Parse `args` against `flags`.

    With `interspersed`, non-flag arguments are collected and parsing goes
    on after them; otherwise parsing stops at the first one, as Go does.
    A lone `--` ends the flags.
    """
    by_name = {flag.name: flag for flag in flags}
    parsed = Parsed({flag.name: flag.initial for flag in flags})
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if len(arg) < 2 or arg[0] != "-":
            parsed.positional.append(arg)
            if not interspersed:
                parsed.positional.extend(rest)
                break
            continue
        if arg == "--":
            parsed.positional.extend(rest)
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {shown(arg)}")
        name, has_value, value = name.partition("=")
        flag = by_name.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested()
            where = f"cos-customizer {command} --help" if command else "cos-customizer --help"
            raise UsageError(f"flag provided but not defined: -{shown(name)} (see {where})")
        if flag.kind is Kind.BOOL and not has_value:
            value = "true"
        elif not has_value:
            if not rest:
                raise UsageError(f"flag needs an argument: -{shown(name)}")
            value = rest.pop(0)
        set_value(flag, value, parsed)
    return parsed


def _placeholder(flag: Flag) -> str:
    return "" if flag.kind is Kind.BOOL else " " + flag.kind.value


def _default_text(flag: Flag, formatter: Mapping[Kind, Callable[[Any], str]]) -> str:
    if flag.default in (None, "", 0, False) or flag.kind in (Kind.MAP, Kind.LIST):
        return ""
    shown = formatter[flag.kind](flag.default) if flag.kind in formatter else str(flag.default)
    return f' (default "{shown}")' if flag.kind is Kind.STRING else f" (default {shown})"


def describe(flags: Sequence[Flag], formatter: Mapping[Kind, Callable[[Any], str]] | None = None) -> str:
    """Go-style flag documentation: one block per flag."""
    lines = []
    for flag in sorted(flags, key=lambda f: f.name):
        lines.append(f"  -{flag.name}{_placeholder(flag)}")
        text = flag.help + _default_text(flag, formatter or {})
        if flag.ours:
            text += " [cos-customizer addition]"
        lines.extend(textwrap.wrap(text, width=78, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
