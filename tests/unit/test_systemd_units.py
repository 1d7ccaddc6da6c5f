"""systemd unit files parsed as systemd loads them (systemd_units).

Where `systemd-analyze` is installed, the parsing is checked against systemd itself: `verify` at debug
level prints the unit as loaded (its Environment= and ExecStart= argv, before expansion). Expansion at
exec time has no such oracle; those expectations follow systemd.service(5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cos_customizer.executors.local import systemd_units as su

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- systemd as the oracle -------------------------------------------------------------------------


def split_command_line(line: str) -> list[str]:
    """Undo systemd's quote_command_line(): words joined by spaces, each bare or in double quotes with
    `\\"`, `\\\\`, `` \\` `` and `\\$` escaped and control characters C-escaped (shlex keeps `\\$`)."""
    controls = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    words: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        if line[i] != '"':
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
            words.append(line[i:end])
            i = end
            continue
        out: list[str] = []
        i += 1
        while line[i] != '"':
            if line[i] == "\\":
                c = line[i + 1]
                if c == "x":
                    out.append(chr(int(line[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                out.append(controls.get(c, c))
                i += 2
            else:
                out.append(line[i])
                i += 1
        words.append("".join(out))
        i += 1
    return words


def systemd_loads(tmp_path: Path, name: str, text: str) -> tuple[list[list[str]], dict[str, str]] | None:
    """What systemd makes of a unit: (ExecStart= argvs, Environment=), or None if it refuses the unit.

    Skips the test where systemd-analyze is not installed.
    """
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "oracle" / name
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(text)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if f"-> Unit {name}:" not in proc.stdout:
        return None
    commands: list[list[str]] = []
    environment: dict[str, str] = {}
    in_exec_start = False
    for line in proc.stdout.splitlines():
        item = line.strip()
        if item.startswith("Environment: "):
            key, _, value = item.removeprefix("Environment: ").partition("=")
            environment[key] = value
        elif item.startswith("-> "):
            in_exec_start = item == "-> ExecStart:"
        elif in_exec_start and item.startswith("Command Line: "):
            commands.append(split_command_line(item.removeprefix("Command Line: ")))
    return commands, environment


# --- parsing: systemd.syntax(7), systemd.service(5), systemd.exec(5) -------------------------------

# (unit text, the last ExecStart= argv as systemd stores it, Environment=)
PARSED = {
    "man-service-expansion-example": (
        # systemd.service(5), COMMAND LINES, first example.
        "[Service]\nEnvironment=\"ONE=one\" 'TWO=two two'\nExecStart=echo $ONE $TWO ${TWO}\n",
        ["echo", "$ONE", "$TWO", "${TWO}"],
        {"ONE": "one", "TWO": "two two"},
    ),
    "man-service-second-example": (
        # systemd.service(5)'s second example says ONE='one' keeps its quotes; systemd 252 removes them
        # (extract_first_word unquotes anywhere in a word), and so do we.
        "[Service]\nType=oneshot\nEnvironment=ONE='one' \"TWO='two two' too\" THREE=\n"
        "ExecStart=/bin/echo ${ONE} ${TWO} ${THREE}\nExecStart=/bin/echo $ONE $TWO $THREE\n",
        ["/bin/echo", "$ONE", "$TWO", "$THREE"],
        {"ONE": "one", "TWO": "'two two' too", "THREE": ""},
    ),
    "man-syntax-continuation": (
        # systemd.syntax(7): a trailing backslash joins the next line with a space; comment lines inside
        # the continuation are dropped; "#" inside a value is no comment.
        "[Service]\nExecStart=/bin/echo value 3\\\n# this line is ignored\n; this line is ignored too\n"
        "       value 3 continued # not a comment\n",
        ["/bin/echo", "value", "3", "value", "3", "continued", "#", "not", "a", "comment"],
        {},
    ),
    "man-service-semicolons": (
        # systemd.service(5): "echo / >/dev/null & \\; \\\n ls" runs echo with five arguments.
        "[Service]\nExecStart=echo / >/dev/null & \\; \\\nls\n",
        ["echo", "/", ">/dev/null", "&", ";", "ls"],
        {},
    ),
    "man-service-two-commands": (
        # systemd.service(5): a lone ";" separates commands (only Type=oneshot may have two).
        '[Service]\nType=oneshot\nExecStart=echo one ; echo "two two"\n',
        ["echo", "two two"],
        {},
    ),
    "quotes-escapes-specifiers": (
        # systemd.syntax(7) QUOTING: quotes may open inside a word; C escapes inside and outside quotes
        # (single quotes too); an unknown escape stays as written. systemd.unit(5): %% and %n.
        '[Service]\nExecStart=/bin/echo a"b c"d \'x\\sy\' q\\q \\101 \\x41 \\u00e9 %% "%n" %t \'\' "$X"\n',
        [
            "/bin/echo",
            "ab cd",
            "x y",
            "q\\q",
            "A",
            "A",
            "é",
            "%",
            "quotes-escapes-specifiers.service",
            "/run",
            "",
            "$X",
        ],
        {},
    ),
    "prefixes": (
        # "-" ignore failure, "@" the next word is argv[0], ":" no expansion, "!!" credentials.
        "[Service]\nExecStart=-@:!!/bin/echo zero one\n",
        ["zero", "one"],
        {},
    ),
    "reset-and-escaped-backslash": (
        # An empty ExecStart= resets; "\\\\" at the end of a line is an escaped backslash, not a continuation.
        "[Service]\nExecStart=/bin/a\nExecStart=\nExecStart=/bin/b two \\\\\nEnvironment=A=1\n",
        ["/bin/b", "two", "\\"],
        {"A": "1"},
    ),
    "environment-rules": (
        # systemd.exec(5) Environment=: several assignments a line, the later wins, an empty one resets,
        # invalid names are skipped, an unknown escape ends the line, "$" is not special.
        "[Service]\nEnvironment=GONE=1\nEnvironment=\nEnvironment=B=2 B=3 1A=x _ok=y\n"
        'Environment=C=1 D=\\q E=3\nEnvironment="VAR1=word1 word2" VAR2=word3 "VAR3=$word 5 6"\n'
        "ExecStart=/bin/true\n",
        ["/bin/true"],
        {"B": "3", "_ok": "y", "C": "1", "VAR1": "word1 word2", "VAR2": "word3", "VAR3": "$word 5 6"},
    ),
    "sections-and-junk": (
        # Only [Service] counts (case-sensitive); lines without "=" and unknown keys are skipped;
        # whitespace around keys and "=" and CRLF line ends are fine.
        "Environment=OUTSIDE=1\r\n[service]\r\nEnvironment=LOWER=1\r\n[Service]\r\nno equals here\r\n"
        "  Environment = SPACED=1\r\nExecStart = /bin/echo ok\r\n[Install]\r\nEnvironment=INSTALL=1\r\n",
        ["/bin/echo", "ok"],
        {"SPACED": "1"},
    ),
}


@pytest.mark.parametrize("name", sorted(PARSED))
def test_units_parse_as_systemd_loads_them(tmp_path: Path, name: str) -> None:
    text, argv, environment = PARSED[name]
    service = su.parse_service([text], unit=f"{name}.service")
    assert service.problems == ()
    assert list(service.exec_start[-1].argv) == argv
    assert dict(service.environment) == environment
    oracle = systemd_loads(tmp_path, f"{name}.service", text)
    assert oracle is not None, "systemd refused the unit"
    commands, systemd_environment = oracle
    assert commands[-1] == argv
    assert systemd_environment == environment


REFUSED = {
    # A bad word after the first makes the unit unloadable; a bad first word only drops the assignment.
    "unbalanced-quotes": '[Service]\nExecStart=/bin/echo fine\nExecStart=/bin/echo "unbalanced\n',
    "unknown-specifier": "[Service]\nExecStart=/bin/echo %z\n",
    "bad-section-header": "[Service\nExecStart=/bin/echo ok\n",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_units_systemd_refuses_have_problems(tmp_path: Path, name: str) -> None:
    service = su.parse_service([REFUSED[name]], unit=f"{name}.service")
    assert service.problems
    assert systemd_loads(tmp_path, f"{name}.service", REFUSED[name]) is None


@pytest.mark.parametrize(
    "bad",
    [
        'ExecStart=-/bin/echo "unbalanced',  # "-": the failure is ignored
        'ExecStart="/bin/echo unbalanced',  # the first word is bad: the assignment is ignored
        "ExecStart=-/bin/echo %z",
    ],
)
def test_an_ignorable_bad_exec_start_is_skipped_as_systemd_does(tmp_path: Path, bad: str) -> None:
    text = f"[Service]\n{bad}\nExecStart=/bin/echo fine\n"
    service = su.parse_service([text], unit="ignorable.service")
    assert service.problems == ()
    assert [c.argv for c in service.exec_start] == [("/bin/echo", "fine")]
    assert systemd_loads(tmp_path, "ignorable.service", text) == ([["/bin/echo", "fine"]], {})


def test_the_prefixes_are_read() -> None:
    (command,) = su.parse_service(
        ["[Service]\nExecStart=-@:+/usr/bin/dockerd dockerd-x -D\n"], unit="x.service"
    ).exec_start
    assert command == su.Command("/usr/bin/dockerd", ("dockerd-x", "-D"), expand=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00")), max_size=6))
def test_any_argument_written_quoted_and_escaped_reads_back(words: list[str]) -> None:
    def quoted(word: str) -> str:
        out = []
        for c in word:
            if c in '\\"':
                out.append("\\" + c)
            elif c == "%":
                out.append("%%")
            elif c < " " or c == "\x7f" or c in "\x85\u2028\u2029":
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return '"' + "".join(out) + '"'

    text = "[Service]\nExecStart=/bin/echo " + " ".join(quoted(w) for w in words) + "\n"
    (command,) = su.parse_service([text], unit="x.service").exec_start
    assert list(command.argv) == ["/bin/echo", *words]


def test_environment_files_follow_systemd_exec_5() -> None:
    # systemd.exec(5) EnvironmentFile=: comments with # and ;, lines without "=" ignored; unquoted values
    # lose surrounding whitespace and a backslash keeps the next character (backslash-newline joins);
    # single quotes keep everything; double quotes unescape only \" \\ \` \$ and may span lines.
    text = (
        "# comment\n; comment\nA=plain value   \n"
        'B="double \\"quoted\\" \\$HOME \\n kept"\n'
        "C='single \\n $x'\n"
        "D=unquoted\\ with\\ escapes\\\\\n"
        "E=line \\\ncontinued\n"
        'F="multi\nline"\n'
        "no equals\n1BAD=x\n  G = spaced\nH=\n"
        "# a comment ending in a backslash \\\nI=not swallowed\n"
        "J=last"
    )
    assert su.parse_environment_file(text) == {
        "A": "plain value",
        "B": 'double "quoted" $HOME \\n kept',
        "C": "single \\n $x",
        "D": "unquoted with escapes\\",
        "E": "line continued",
        "F": "multi\nline",
        "G": "spaced",
        "H": "",
        "I": "not swallowed",
        "J": "last",
    }


def test_expansion_follows_systemd_service_5() -> None:
    # systemd.service(5): "$FOO" as a word is split at whitespace (quotes respected, then removed), "${FOO}"
    # is one argument, "$$" is "$", unknown variables are empty ("$X" as a word disappears).
    env = {"ONE": "one", "TWO": "two two", "Q": "a 'b c' \"d e\"", "THREE": ""}
    args = ["$ONE", "$TWO", "${TWO}", "$Q", "x${ONE}y", "$$ONE", "$UNKNOWN", "${UNKNOWN}", "${THREE}", "$", "${A:-b}"]
    assert su.expand_arguments(args, env) == [
        "one", "two", "two", "two two", "a", "b c", "d e", "xoney", "$ONE", "", "", "${A:-b}",
    ]  # fmt: skip


def test_debians_docker_unit_parses_as_systemd_loads_it(tmp_path: Path) -> None:
    """This machine's docker.io unit (ExecStart=/usr/sbin/dockerd -H fd:// ... $DOCKER_OPTS), as systemd reads it."""
    unit = Path("/lib/systemd/system/docker.service")
    if not unit.is_file():
        pytest.skip("docker.io is not installed here")
    text = unit.read_text()
    oracle = systemd_loads(tmp_path, "docker-copy.service", text)
    assert oracle is not None
    assert oracle[0] == [list(su.parse_service([text], unit="docker-copy.service").exec_start[-1].argv)]
