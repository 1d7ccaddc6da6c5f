"""systemd unit files read as systemd loads them: the [Service] settings that start a daemon.

`parse_service` takes a unit's text and its drop-ins' texts, in order, and returns a `Service`: its
ExecStart= commands (`Command`, as systemd stores them, before expansion), its Environment= and
EnvironmentFile= paths, and why systemd would refuse to load it. `parse_environment_file` reads an
EnvironmentFile=; `expand_arguments` expands the environment into a command's arguments as systemd
does at exec time. Text in, values out: finding and reading the files is the caller's. Standard
library only.

The rules are systemd's, checked against `systemd-analyze verify` of systemd 252 (see the tests):
systemd.syntax(7) for lines and quoting, systemd.service(5) "COMMAND LINES" for ExecStart= and its
expansion, systemd.exec(5) for Environment= and EnvironmentFile=, systemd.unit(5) for specifiers.
Words are split as systemd's extract_first_word(), which is not `shlex.split`: quotes may open
anywhere in a word; C escapes (`\\n`, `\\s`, `\\x41`, `\\101`, `\\u00e9`...) are decoded inside and
outside quotes, single quotes included, and an unknown one (`\\q`) is kept verbatim; `#` inside a
line starts no comment; a lone `;` separates commands and `\\;` is a literal `;`.

Known differences from systemd:
- specifiers that depend on the running machine (`%a %b %H %m %v %o`...) make the unit unusable;
- only Environment= and EnvironmentFile= variables exist: systemd's own (`$MAINPID`, `$PATH`...)
  expand to nothing;
- in an environment file a comment ending in a backslash continues nothing (as systemd 254 on;
  before, the next line joined the comment);
- a byte above 0x7f written as `\\xNN` or `\\ooo` comes back as a surrogate escape (os.fsencode
  turns it into that byte); `\\u` and `\\U` must be valid code points.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Mapping, Sequence
from types import MappingProxyType

_WS = " \t\n\r"
_COMMENTS = "#;"


@dataclasses.dataclass(frozen=True)
class Command:
    """One ExecStart= command as systemd stores it, before the environment is expanded."""

    path: str  # the executable as the unit names it
    argv: tuple[str, ...]  # argv[0] is `path`, or with the "@" prefix the word after it
    expand: bool = True  # False with the ":" prefix


@dataclasses.dataclass(frozen=True)
class Service:
    """The [Service] settings that start a daemon, from a unit and its drop-ins, as systemd loads them."""

    exec_start: tuple[Command, ...]
    environment: Mapping[str, str] = dataclasses.field(hash=False)
    environment_files: tuple[str, ...]  # absolute paths, "-" first when optional
    problems: tuple[str, ...]  # why systemd would refuse to load the unit; empty when it would load it


class _BadSpecifier(ValueError):
    pass


class _BadQuoting(ValueError):
    pass


class _BadEscape(ValueError):
    pass


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


# ---------------------------------------------------------------------------------------------
# Unit file syntax: systemd.syntax(7)

_LINE_END = re.compile(r"\r\n|\n\r|\n|\r")


def _logical_lines(text: str) -> list[str]:
    """The lines of a unit file after joining continuations, stripped, without comments and blanks."""
    lines: list[str] = []
    continuation: str | None = None
    for raw in _LINE_END.split(text):
        if any("\udc80" <= c <= "\udcff" for c in raw):
            continue  # not UTF-8: systemd ignores the line
        if raw.lstrip(_WS)[:1] in tuple(_COMMENTS):
            continue  # a comment, also inside a continuation (and one ending in a backslash continues nothing)
        line = raw if continuation is None else continuation + raw
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            continuation = line[:-1] + " "
            continue
        continuation = None
        if line.strip(_WS):
            lines.append(line.strip(_WS))
    if continuation is not None and continuation.strip(_WS):
        lines.append(continuation.strip(_WS))
    return lines


_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"', "'": "'", "s": " ",
}  # fmt: skip


def _byte(value: int) -> str:
    return chr(value) if value < 0x80 else chr(0xDC00 + value)


def _valid_code_point(value: int) -> bool:
    return 0 < value < 0x110000 and not 0xD800 <= value <= 0xDFFF


def _unescape_one(s: str, i: int) -> tuple[str, int] | None:
    """The C escape after a backslash at s[i-1], as systemd's cunescape_one(): (text, characters used)."""
    c = s[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], 1
    if c == "x":
        digits = s[i + 1 : i + 3]
        if len(digits) == 2 and all(d in string.hexdigits for d in digits) and int(digits, 16):
            return _byte(int(digits, 16)), 3
        return None
    if c in "uU":
        width = 4 if c == "u" else 8
        digits = s[i + 1 : i + 1 + width]
        if len(digits) == width and all(d in string.hexdigits for d in digits):
            value = int(digits, 16)
            if _valid_code_point(value):
                return chr(value), 1 + width
        return None
    if c in "01234567":
        digits = s[i : i + 3]
        if len(digits) == 3 and all(d in "01234567" for d in digits) and 0 < int(digits, 8) <= 255:
            return _byte(int(digits, 8)), 3
        return None
    return None


def _extract_word(
    s: str, i: int, *, unescape: bool, relax_escapes: bool = False, relax_quotes: bool = False
) -> tuple[str | None, int]:
    """One word of `s` from `i`, as systemd's extract_first_word() with EXTRACT_UNQUOTE.

    `unescape`: C escapes are decoded (EXTRACT_CUNESCAPE); else a backslash takes the next character
    as it is. `relax_escapes`: an unknown escape or a trailing backslash is kept verbatim, as
    extract_first_word_and_warn() retries (EXTRACT_CUNESCAPE_RELAX). `relax_quotes`: an unbalanced
    quote ends the word (EXTRACT_RELAX). Returns the word (None at the end of `s`) and where the next
    word starts. Raises _BadQuoting or _BadEscape.
    """
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    if i >= n:
        return None, n
    out: list[str] = []
    quote = ""
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n:  # a trailing backslash
                i += 1
                if unescape and relax_escapes and not quote:
                    out.append("\\")
                    break
                if relax_quotes:
                    break
                raise _BadQuoting if quote else _BadEscape
            if not unescape:
                out.append(s[i + 1])
                i += 2
                continue
            decoded = _unescape_one(s, i + 1)
            if decoded is None:
                if not relax_escapes:
                    raise _BadEscape
                out.append("\\" + s[i + 1])
                i += 2
            else:
                out.append(decoded[0])
                i += 1 + decoded[1]
        elif quote:
            if c == quote:
                quote = ""
            else:
                out.append(c)
            i += 1
        elif c in "'\"":
            quote = c
            i += 1
        elif c in _WS:
            break
        else:
            out.append(c)
            i += 1
    if quote and not relax_quotes:
        raise _BadQuoting
    while i < n and s[i] in _WS:
        i += 1
    return "".join(out), i


def _split_words(s: str) -> list[str]:
    """A variable's value split for `$NAME`: strv_split_full(WHITESPACE, EXTRACT_RELAX|EXTRACT_UNQUOTE)."""
    words: list[str] = []
    i = 0
    while True:
        word, i = _extract_word(s, i, unescape=False, relax_quotes=True)
        if word is None:
            return words
        words.append(word)


# ---------------------------------------------------------------------------------------------
# Specifiers: systemd.unit(5), "Specifiers"

_MACHINE_SPECIFIERS = "aAbBHlmMoqvwWd"  # depend on the running machine: not known when building an image


def _unescape_unit_name(name: str) -> str:
    out = []
    i = 0
    while i < len(name):
        if name.startswith("\\x", i) and len(name) >= i + 4 and all(d in string.hexdigits for d in name[i + 2 : i + 4]):
            out.append(chr(int(name[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append("/" if name[i] == "-" else name[i])
            i += 1
    return "".join(out)


def _specifier_table(unit: str, fragment: str) -> dict[str, str]:
    stem = unit.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    return {
        "n": unit,
        "N": stem,
        "p": prefix,
        "P": _unescape_unit_name(prefix),
        "i": instance,
        "I": _unescape_unit_name(instance),
        "j": prefix.rsplit("-", 1)[-1],
        "J": _unescape_unit_name(prefix.rsplit("-", 1)[-1]),
        "f": "/" + _unescape_unit_name(instance or prefix).lstrip("/"),
        "y": fragment,
        "Y": fragment.rsplit("/", 1)[0] if "/" in fragment else "",
        "t": "/run",
        "S": "/var/lib",
        "C": "/var/cache",
        "L": "/var/log",
        "E": "/etc",
        "T": "/tmp",
        "V": "/var/tmp",
        "h": "/root",
        "s": "/bin/sh",
        "u": "root",
        "U": "0",
        "g": "root",
        "G": "0",
    }


def _resolve_specifiers(s: str, table: Mapping[str, str]) -> str:
    """As systemd's specifier_printf(): `%%` is `%`; an unknown letter or digit is an error."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(s):
            out.append("%")
            break
        spec = s[i + 1]
        if spec == "%":
            out.append("%")
        elif spec in table:
            out.append(table[spec])
        elif spec in _MACHINE_SPECIFIERS:
            raise _BadSpecifier(f"%{spec} depends on the running machine")
        elif spec.isascii() and spec.isalnum():
            raise _BadSpecifier(f"unknown specifier %{spec}")
        else:
            out.append("%" + spec)
        i += 2
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# [Service]: ExecStart=, Environment=, EnvironmentFile=


def _valid_env_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


def _valid_env_value(value: str) -> bool:
    return not any(("\udc80" <= c <= "\udcff") or (c < " " and c not in "\t\n") for c in value)


def _simplify(path: str) -> str:
    """systemd's path_simplify(): no empty or "." components; ".." is kept."""
    simple = "/".join(_components(path))
    return "/" + simple if path.startswith("/") else simple


def _filename_ok(name: str) -> bool:
    if not name or name in (".", "..") or "/" in name:
        return False
    return len(name.encode(errors="surrogateescape")) <= 255


def _check_path(path: str) -> str | None:
    """Why systemd would not accept `path` as an ExecStart= executable, or None."""
    if not path:
        return "an empty executable path"
    if any(c < " " or c in "\"'\\\x7f" for c in path):
        return f"the executable path {path!r} has special characters"
    if path.endswith("/"):
        return f"the executable path {path!r} is a directory"
    if path.startswith("/"):
        if not all(_filename_ok(c) for c in _components(path)):
            return f"{path!r} is not a valid path"
    elif not _filename_ok(path):
        return f"{path!r} is neither an absolute path nor a file name"
    return None


def _parse_exec(value: str, table: Mapping[str, str]) -> tuple[list[Command], str | None, bool]:
    """One ExecStart= value, as config_parse_exec(): (commands, the error or None, whether it is ignored)."""
    commands: list[Command] = []
    i = 0
    n = len(value)
    more = True
    while more:
        more = False
        try:
            first, i = _extract_word(value, i, unescape=True, relax_escapes=True)
        except (_BadQuoting, _BadEscape):  # systemd ignores the assignment when its first word is bad
            return commands, f"unbalanced quoting in ExecStart={value}", True
        if first is None:
            break
        if first == ";":
            more = True
            continue
        ignore = argv0 = literal = False
        privileges = ""  # "+", "!" or "!!"
        k = 0
        while k < len(first):
            c = first[k]
            if c == "-" and not ignore:
                ignore = True
            elif c == "@" and not argv0:
                argv0 = True
            elif c == ":" and not literal:
                literal = True
            elif c in "+!" and not privileges:
                privileges = c
            elif c == "!" and privileges == "!":
                privileges = "!!"
            else:
                break
            k += 1
        try:
            path = _resolve_specifiers(first[k:], table)
        except _BadSpecifier as e:
            return commands, f"ExecStart={value}: {e}", ignore
        problem = _check_path(path)
        if problem:
            return commands, f"ExecStart={value}: {problem}", ignore
        argv: list[str] = [] if argv0 else [path]
        while i < n:
            if value[i] == ";" and (i + 1 == n or value[i + 1] in _WS):
                i += 1
                while i < n and value[i] in _WS:
                    i += 1
                more = True
                break
            if value.startswith("\\;", i) and (i + 2 == n or value[i + 2] in _WS):
                i += 2
                while i < n and value[i] in _WS:
                    i += 1
                argv.append(";")
                continue
            try:
                word, i = _extract_word(value, i, unescape=True, relax_escapes=True)
            except (_BadQuoting, _BadEscape):
                return commands, f"unbalanced quoting in ExecStart={value}", ignore
            if word is None:
                break
            try:
                argv.append(_resolve_specifiers(word, table))
            except _BadSpecifier as e:
                return commands, f"ExecStart={value}: {e}", ignore
        if not argv:
            return commands, f"ExecStart={value}: no argv[0] after @", ignore
        commands.append(Command(_simplify(path), tuple(argv), expand=not literal))
    return commands, None, False


def parse_service(texts: Sequence[str], *, unit: str, fragment: str = "") -> Service:
    """The [Service] settings of a unit file's text and its drop-ins' texts, applied in order.

    `unit` is the unit's name and `fragment` its path (for the specifiers %n, %y...).
    """
    table = _specifier_table(unit, fragment)
    exec_start: list[Command] = []
    environment: dict[str, str] = {}
    files: list[str] = []
    problems: list[str] = []
    for text in texts:
        section: str | None = None
        for line in _logical_lines(text):
            if line.startswith("["):
                if not line.endswith("]"):
                    problems.append(f"invalid section header {line!r}")
                    break
                section = line[1:-1]
                continue
            key, equals, value = line.partition("=")
            if section != "Service" or not equals:
                continue
            key, value = key.strip(_WS), value.strip(_WS)
            if key == "ExecStart":
                if not value:
                    exec_start.clear()
                    continue
                commands, problem, ignored = _parse_exec(value, table)
                exec_start.extend(commands)
                if problem and not ignored:
                    problems.append(problem)
            elif key == "Environment":
                if not value:
                    environment.clear()
                    continue
                _parse_environment(value, table, environment)
            elif key == "EnvironmentFile":
                if not value:
                    files.clear()
                    continue
                try:
                    resolved = _resolve_specifiers(value, table)
                except _BadSpecifier:
                    continue
                optional = resolved.startswith("-")
                path = resolved[1:] if optional else resolved
                if path.startswith("/"):
                    files.append(("-" if optional else "") + _simplify(path))
    return Service(tuple(exec_start), MappingProxyType(environment), tuple(files), tuple(problems))


def _parse_environment(value: str, table: Mapping[str, str], environment: dict[str, str]) -> None:
    """One Environment= value, as config_parse_environ(): a syntax error ends the line, bad words are skipped."""
    i = 0
    while True:
        try:
            word, i = _extract_word(value, i, unescape=True)
        except (_BadQuoting, _BadEscape):
            return
        if word is None:
            return
        try:
            word = _resolve_specifiers(word, table)
        except _BadSpecifier:
            continue
        name, equals, val = word.partition("=")
        if equals and _valid_env_name(name) and _valid_env_value(val):
            environment[name] = val


def parse_environment_file(text: str) -> dict[str, str]:
    """The assignments of an EnvironmentFile=, as systemd's parse_env_file (systemd.exec(5)).

    `KEY=VALUE` lines; `#` and `;` lines are comments; unquoted values lose surrounding whitespace
    and a backslash keeps the next character (backslash-newline joins lines); single quotes keep
    everything; double quotes unescape only `\\"`, `\\\\`, `` \\` `` and `\\$`. Invalid names are skipped.
    """
    result: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    key_ws: int | None = None  # where the key's trailing whitespace starts
    value_ws: int | None = None  # where the unquoted value's trailing whitespace starts
    state = "pre_key"

    def push(trim: bool) -> None:
        name = "".join(key[:key_ws] if key_ws is not None else key)
        val = "".join(value[:value_ws] if trim and value_ws is not None else value)
        if _valid_env_name(name) and _valid_env_value(val):
            result[name] = val

    for c in text:
        newline = c in "\n\r"
        if state == "pre_key":
            if c in _COMMENTS:
                state = "comment"
            elif c not in _WS:
                state, key, key_ws = "key", [c], None
        elif state == "key":
            if newline:
                state = "pre_key"
            elif c == "=":
                state, value, value_ws = "pre_value", [], None
            else:
                if c not in _WS:
                    key_ws = None
                elif key_ws is None:
                    key_ws = len(key)
                key.append(c)
        elif state == "pre_value":
            if newline:
                push(trim=False)
                state = "pre_key"
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in _WS:
                state = "value"
                value.append(c)
        elif state == "value":
            if newline:
                push(trim=True)
                state = "pre_key"
            elif c == "\\":
                state, value_ws = "value_escape", None
            else:
                if c not in _WS:
                    value_ws = None
                elif value_ws is None:
                    value_ws = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if not newline:
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in '"\\`$':
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif newline:
                state = "pre_key"
        else:  # comment_escape: since systemd 254 a backslash does not carry a comment onto the next line
            state = "pre_key" if newline else "comment"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push(trim=state == "value")
    return result


# ---------------------------------------------------------------------------------------------
# Exec time: the environment expanded into argv (systemd.service(5), "COMMAND LINES")


def _replace_env(word: str, env: Mapping[str, str]) -> str:
    """`${NAME}` anywhere in a word as systemd's replace_env() without flags: `$$` is `$`, nothing else expands."""
    out: list[str] = []
    i = 0
    n = len(word)
    while i < n:
        if word[i] != "$" or i + 1 >= n:
            out.append(word[i])
            i += 1
            continue
        after = word[i + 1]
        if after == "$":
            out.append("$")
            i += 2
        elif after == "{":
            end = next((j for j in range(i + 2, n) if word[j] in "}:"), None)
            if end is None:
                out.append(word[i:])
                break
            if word[end] == ":":  # ${NAME:-default}: not supported there; kept as it is
                out.append(word[i:end])
                i = end
                continue
            out.append(env.get(word[i + 2 : end], ""))
            i = end + 1
        else:
            out.append("$")
            i += 1
    return "".join(out)


def expand_arguments(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """systemd's replace_env_argv(): a word `$NAME` becomes the value's words; `${NAME}` expands in place."""
    out: list[str] = []
    for word in args:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            name = word[1:]
            if _valid_env_name(name) and name in env:
                out.extend(_split_words(env[name]))
            continue
        out.append(_replace_env(word, env))
    return out
