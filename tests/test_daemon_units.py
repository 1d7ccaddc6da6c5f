"""The command lines of an image's containerd and dockerd, from its systemd units (daemon_units).

Images are trees under tmp_path; binaries are files with an execute bit, never run. Where
`systemd-analyze` is installed, the unit parsing is checked against systemd itself: `verify` at
debug level prints the unit as loaded (its Environment= and ExecStart= argv, before expansion).
Expansion at exec time has no such oracle; those expectations follow systemd.service(5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cos_customizer.executors import daemon_units as du
from cos_customizer.executors.daemon_units import Absent, Daemon

DOCKER_SOCKET = "/run/build/docker.sock"
CONTAINERD_SOCKET = "/run/build/containerd.sock"
HOST = f"unix://{DOCKER_SOCKET}"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- image trees ---------------------------------------------------------------------------------


def put(root: Path, path: str, text: str | bytes, mode: int = 0o644) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        target.write_text(text)
    else:
        target.write_bytes(text)
    target.chmod(mode)
    return target


def binary(root: Path, path: str) -> Path:
    return put(root, path, "#!/bin/false\n", 0o755)


def link(root: Path, path: str, target: str) -> None:
    where = root / path.lstrip("/")
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def resolve(root: Path) -> tuple[Daemon | Absent, ...]:
    return du.resolve_daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET)


def found(root: Path) -> dict[str, Daemon | Absent]:
    return {d.name: d for d in resolve(root)}


def started(root: Path, name: str) -> Daemon:
    result = found(root)[name]
    assert isinstance(result, Daemon), result
    return result


@pytest.fixture
def root(tmp_path: Path) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    return image


@pytest.fixture
def opened_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every file the module opens, as the host path it really is (directory descriptors resolved)."""
    seen: list[str] = []
    real_open = os.open

    def spying_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = os.fspath(path)
        if dir_fd is not None and not where.startswith("/"):
            where = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), where)
        seen.append(where)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spying_open)
    yield seen


def assert_inside(paths: list[str], root: Path) -> None:
    assert paths, "the spy saw nothing"
    for path in paths:
        assert Path(path).resolve().is_relative_to(root.resolve()), path


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
    service = du.parse_service([text], unit=f"{name}.service")
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
    service = du.parse_service([REFUSED[name]], unit=f"{name}.service")
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
    service = du.parse_service([text], unit="ignorable.service")
    assert service.problems == ()
    assert [c.argv for c in service.exec_start] == [("/bin/echo", "fine")]
    assert systemd_loads(tmp_path, "ignorable.service", text) == ([["/bin/echo", "fine"]], {})


def test_the_prefixes_are_read() -> None:
    (command,) = du.parse_service(
        ["[Service]\nExecStart=-@:+/usr/bin/dockerd dockerd-x -D\n"], unit="x.service"
    ).exec_start
    assert command == du.Command("/usr/bin/dockerd", ("dockerd-x", "-D"), expand=False)


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
    (command,) = du.parse_service([text], unit="x.service").exec_start
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
    assert du.parse_environment_file(text) == {
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
    assert du.expand_arguments(args, env) == [
        "one", "two", "two", "two two", "a", "b c", "d e", "xoney", "$ONE", "", "", "${A:-b}",
    ]  # fmt: skip


# --- whole images ------------------------------------------------------------------------------------

DEBIAN_UNITS = ("/lib/systemd/system/docker.service", "/lib/systemd/system/containerd.service", "/etc/default/docker")


@pytest.fixture
def debian_image(root: Path) -> Path:
    """The units and /etc/default/docker of this machine's docker.io and containerd packages."""
    if not all(Path(p).is_file() for p in DEBIAN_UNITS):
        pytest.skip("docker.io and containerd are not installed here")
    for path in DEBIAN_UNITS:
        put(root, path, Path(path).read_bytes())
    binary(root, "/usr/sbin/dockerd")
    binary(root, "/usr/bin/containerd")
    return root


def test_debians_docker_io_units(debian_image: Path, tmp_path: Path) -> None:
    containerd, dockerd = resolve(debian_image)
    assert containerd == Daemon(
        "containerd", ("/usr/bin/containerd", "--address", CONTAINERD_SOCKET), {},
        "/lib/systemd/system/containerd.service", CONTAINERD_SOCKET,
    )  # fmt: skip
    # ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS, and
    # /etc/default/docker sets nothing: $DOCKER_OPTS disappears.
    assert dockerd == Daemon(
        "dockerd", ("/usr/sbin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}"), {},
        "/lib/systemd/system/docker.service", DOCKER_SOCKET,
    )  # fmt: skip
    text = Path("/lib/systemd/system/docker.service").read_text()
    oracle = systemd_loads(tmp_path, "docker-copy.service", text)
    assert oracle is not None
    assert oracle[0] == [list(du.parse_service([text], unit="docker-copy.service").exec_start[-1].argv)]


def test_debians_units_with_docker_opts(debian_image: Path) -> None:
    put(
        debian_image, "/etc/default/docker",
        Path("/etc/default/docker").read_text()
        + 'DOCKER_OPTS="--dns 8.8.8.8 -H tcp://0.0.0.0:2375 --iptables=false --label \'a b\'"\n',
    )  # fmt: skip
    dockerd = started(debian_image, "dockerd")
    assert dockerd.argv == (
        "/usr/sbin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--dns", "8.8.8.8", "--iptables=false", "--label", "a b",
    )  # fmt: skip
    assert dockerd.dropped == ("-H", "tcp://0.0.0.0:2375")
    assert dockerd.env["DOCKER_OPTS"].startswith("--dns 8.8.8.8")


def test_no_units_means_coss_defaults(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    assert resolve(root) == (
        Daemon("containerd", ("/usr/bin/containerd", "--address", CONTAINERD_SOCKET), {}, None, CONTAINERD_SOCKET),
        Daemon(
            "dockerd",
            (
                "/usr/bin/dockerd", "--registry-mirror=https://mirror.gcr.io", f"--host={HOST}",
                f"--containerd={CONTAINERD_SOCKET}",
            ),
            {}, None, DOCKER_SOCKET,
        ),
    )  # fmt: skip


def test_coss_defaults_read_etc_default_docker(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/etc/default/docker", 'DOCKER_OPTS="--log-level=warn --host=tcp://127.0.0.1:2375"\n')
    dockerd = started(root, "dockerd")
    assert dockerd.argv[-1] == "--log-level=warn"
    assert dockerd.dropped == ("--host=tcp://127.0.0.1:2375",)
    assert dockerd.unit is None


def test_only_the_daemons_with_a_binary(root: Path) -> None:
    assert du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET) == ()
    assert resolve(root) == (
        Absent("containerd", "no executable containerd in the image"),
        Absent("dockerd", "no executable dockerd in the image"),
    )
    binary(root, "/usr/sbin/dockerd")
    (only,) = du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET)
    assert only.name == "dockerd"
    assert only.argv[0] == "/usr/sbin/dockerd"


def test_hosts_other_than_socket_activation_are_dropped(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root, "/usr/lib/systemd/system/docker.service",
        "[Service]\nExecStart=/usr/bin/dockerd -H fd:// -H tcp://0.0.0.0:2375 --host=unix:///var/run/other.sock \\\n"
        "  -Hfd://3 --containerd /run/containerd/containerd.sock --containerd=/again --iptables=false \\\n"
        "  --bridge=none -p /var/run/docker.pid\n",
    )  # fmt: skip
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/usr/bin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--iptables=false", "--bridge=none", "-p", "/var/run/docker.pid",
    )  # fmt: skip
    assert dockerd.dropped == (
        "-H", "tcp://0.0.0.0:2375", "--host=unix:///var/run/other.sock", "-Hfd://3", "--containerd=/again",
    )  # fmt: skip
    assert dockerd.unit == "/usr/lib/systemd/system/docker.service"


@pytest.mark.parametrize(
    ("exec_start", "argv", "dropped"),
    [
        (
            "/usr/bin/dockerd --iptables=false",
            ("-H", HOST, f"--containerd={CONTAINERD_SOCKET}", "--iptables=false"),
            (),
        ),
        (
            "/usr/bin/dockerd --host tcp://[::]:2376 --containerd=/x",
            ("-H", HOST, f"--containerd={CONTAINERD_SOCKET}"),
            ("--host", "tcp://[::]:2376"),
        ),
        # Added options go right after argv[0].
        (f"/usr/bin/dockerd -H={HOST} -D", (f"--containerd={CONTAINERD_SOCKET}", f"-H={HOST}", "-D"), ()),
        ("/usr/bin/dockerd --host=fd:// -D -H", (f"--containerd={CONTAINERD_SOCKET}", f"--host={HOST}", "-D"), ("-H",)),
    ],
)
def test_dockerds_hosts(root: Path, exec_start: str, argv: tuple[str, ...], dropped: tuple[str, ...]) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", f"[Service]\nExecStart={exec_start}\n")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/usr/bin/dockerd", *argv)
    assert dockerd.dropped == dropped


@pytest.mark.parametrize(
    ("exec_start", "argv"),
    [
        (
            "/usr/bin/containerd --config /etc/containerd/config.toml -a /run/x.sock --log-level debug",
            ("--config", "/etc/containerd/config.toml", "--address", CONTAINERD_SOCKET, "--log-level", "debug"),
        ),
        ("/usr/bin/containerd --address=/run/x.sock -c /c.toml", ("--address", CONTAINERD_SOCKET, "-c", "/c.toml")),
        ("/usr/bin/containerd -c /c.toml", ("--address", CONTAINERD_SOCKET, "-c", "/c.toml")),
    ],
)
def test_containerds_address(root: Path, exec_start: str, argv: tuple[str, ...]) -> None:
    binary(root, "/usr/bin/containerd")
    put(root, "/etc/systemd/system/containerd.service", f"[Service]\nExecStart={exec_start}\n")
    containerd = started(root, "containerd")
    assert containerd.argv == ("/usr/bin/containerd", *argv)
    assert containerd.socket == CONTAINERD_SOCKET


def test_environment_and_environment_files(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root, "/lib/systemd/system/docker.service",
        "[Service]\nEnvironment=OPTS=--from-unit MODE=unit \"ONE=a b\"\n"
        "EnvironmentFile=-/etc/default/missing\nEnvironmentFile=/etc/docker/*.env\nEnvironmentFile=/etc/required\n"
        "ExecStart=/usr/bin/dockerd $OPTS ${ONE} --mode=${MODE} $EXTRA\n",
    )  # fmt: skip
    put(root, "/etc/docker/10.env", "MODE=file\nEXTRA='--x \"y z\"'\n")
    put(root, "/etc/docker/20.env", "MODE=later-file\n")
    put(root, "/etc/docker/.hidden.env", "MODE=hidden\n")
    dockerd = started(root, "dockerd")
    # EnvironmentFile= values override Environment= ones; files in the order given, matches sorted.
    assert dockerd.argv == (
        "/usr/bin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--from-unit", "a b", "--mode=later-file", "--x", "y z",
    )  # fmt: skip
    assert dict(dockerd.env) == {"OPTS": "--from-unit", "ONE": "a b", "MODE": "later-file", "EXTRA": '--x "y z"'}
    assert any("/etc/required" in note for note in dockerd.notes)


def test_colon_prefix_turns_expansion_off(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root,
        "/lib/systemd/system/docker.service",
        "[Service]\nEnvironment=A=1\nExecStart=:/usr/bin/dockerd --label=$A\n",
    )
    assert started(root, "dockerd").argv[-1] == "--label=$A"


def test_drop_ins(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd -H fd://\n")
    put(
        root, "/etc/systemd/system/docker.service.d/10-override.conf",
        "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd -H tcp://0.0.0.0:2375 --iptables=false $EXTRA\n",
    )  # fmt: skip
    put(root, "/usr/lib/systemd/system/docker.service.d/10-override.conf", "[Service]\nExecStart=/usr/bin/shadowed\n")
    put(root, "/usr/lib/systemd/system/docker.service.d/20-env.conf", "[Service]\nEnvironment=EXTRA=--debug\n")
    put(root, "/usr/lib/systemd/system/docker.service.d/30-masked.conf", "[Service]\nEnvironment=EXTRA=--masked\n")
    link(root, "/etc/systemd/system/docker.service.d/30-masked.conf", "/dev/null")
    put(root, "/etc/systemd/system/docker.service.d/README", "[Service]\nExecStart=/not/a/conf\n")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/usr/bin/dockerd",
        "-H",
        HOST,
        f"--containerd={CONTAINERD_SOCKET}",
        "--iptables=false",
        "--debug",
    )
    assert dockerd.dropped == ("-H", "tcp://0.0.0.0:2375")
    assert dockerd.unit == "/lib/systemd/system/docker.service"
    assert dockerd.dropins == (
        "/etc/systemd/system/docker.service.d/10-override.conf",
        "/usr/lib/systemd/system/docker.service.d/20-env.conf",
    )


def test_the_first_unit_directory_wins(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=lib\n")
    put(root, "/usr/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=usr-lib\n")
    assert started(root, "dockerd").argv[-1] == "--from=usr-lib"
    put(root, "/etc/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=etc\n")
    assert started(root, "dockerd").argv[-1] == "--from=etc"


@pytest.mark.parametrize("how", ["absolute", "relative", "empty"])
def test_masked_units(root: Path, how: str) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd\n")
    if how == "empty":
        put(root, "/etc/systemd/system/docker.service", "")
    else:
        link(root, "/etc/systemd/system/docker.service", "/dev/null" if how == "absolute" else "../../../dev/null")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon)
    assert isinstance(dockerd, Absent)
    assert "masked" in dockerd.reason
    assert dockerd.unit == "/etc/systemd/system/docker.service"
    assert du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET) == (containerd,)


def test_absolute_symlinks_mean_the_images_own_paths(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    outside = put(tmp_path, "/outside/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    binary(root, "/usr/bin/dockerd")
    # /etc/shadow is the image's (it has none), the host path of `outside` too (the image has no such path).
    link(root, "/usr/lib/systemd/system/docker.service", "/etc/shadow")
    link(root, "/etc/systemd/system/docker.service", str(outside))
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None  # no unit found: COS's defaults
    assert "--read-outside" not in dockerd.argv
    assert_inside(opened_paths, root)
    put(root, "/etc/shadow", "[Service]\nExecStart=/usr/bin/dockerd --the-images-shadow\n")
    assert started(root, "dockerd").unit == "/usr/lib/systemd/system/docker.service"
    assert started(root, "dockerd").argv[-1] == "--the-images-shadow"
    assert_inside(opened_paths, root)


def test_relative_symlinks_may_not_climb_out_of_the_image(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    put(tmp_path, "/etc/passwd", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    put(tmp_path, "/outside/containerd.service", "[Service]\nExecStart=/usr/bin/containerd --read-outside\n")
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    # Four levels up from /usr/lib/systemd/system is the image's root: this is the image's /etc/passwd ...
    link(root, "/usr/lib/systemd/system/docker.service", "../../../../etc/passwd")
    # ... and from /lib/systemd/system (three levels) the fourth ".." would leave the image: refused.
    link(root, "/lib/systemd/system/containerd.service", "../../../../outside/containerd.service")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon) and isinstance(dockerd, Daemon)
    assert containerd.unit is None and dockerd.unit is None  # COS's defaults: no unit was read
    assert "--read-outside" not in containerd.argv + dockerd.argv
    assert any("leads above the image's root" in note for note in containerd.notes)
    assert_inside(opened_paths, root)
    put(root, "/etc/passwd", "[Service]\nExecStart=/usr/bin/dockerd --the-images-passwd\n")
    assert started(root, "dockerd").argv[-1] == "--the-images-passwd"


def test_a_directory_symlink_out_of_the_image_is_refused(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    put(tmp_path, "/outside/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    put(tmp_path, "/outside/bin/dockerd", "#!/bin/false\n", 0o755)
    link(root, "/lib", "../outside")
    link(root, "/usr/lib/systemd", "../../../outside")
    link(root, "/usr/bin", "../../outside/bin")
    binary(root, "/sbin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/sbin/dockerd",
        "--registry-mirror=https://mirror.gcr.io",
        f"--host={HOST}",
        f"--containerd={CONTAINERD_SOCKET}",
    )
    assert_inside(opened_paths, root)


def test_symlinks_inside_the_image_are_followed(root: Path) -> None:
    binary(root, "/usr/libexec/docker/dockerd-ce")
    link(root, "/usr/bin/dockerd", "/usr/libexec/docker/dockerd-ce")
    link(root, "/lib", "usr/lib")  # merged /usr
    put(root, "/usr/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd -D\n")
    link(root, "/etc/systemd/system/docker.service", "/lib/systemd/system/docker.service")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/usr/libexec/docker/dockerd-ce", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}", "-D")
    assert dockerd.unit == "/etc/systemd/system/docker.service"


def test_a_symlink_loop_is_refused(root: Path) -> None:
    link(root, "/etc/systemd/system/docker.service", "docker.service")
    binary(root, "/usr/bin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None
    assert any("too many symlinks" in note for note in dockerd.notes)


def test_missing_binary_falls_back_to_the_path(root: Path) -> None:
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/sbin/dockerd -H fd:// --debug\n")
    put(root, "/usr/sbin/dockerd", "not executable\n", 0o644)
    put(root, "/usr/bin/dockerd", "a directory is no binary either\n", 0o644)
    binary(root, "/bin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/bin/dockerd", f"--containerd={CONTAINERD_SOCKET}", "-H", HOST, "--debug")
    assert dockerd.unit == "/lib/systemd/system/docker.service"
    assert any("/usr/sbin/dockerd is not an executable" in note for note in dockerd.notes)


def test_a_bare_command_name_is_searched_as_systemd_does(root: Path) -> None:
    binary(root, "/usr/local/sbin/containerd")
    binary(root, "/usr/bin/containerd")
    put(root, "/lib/systemd/system/containerd.service", "[Service]\nExecStart=containerd\n")
    assert started(root, "containerd").argv[0] == "/usr/local/sbin/containerd"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[Service]\nExecStart=/usr/bin/dockerd "unbalanced\n', "unbalanced quoting"),
        ("[Service]\nExecStart=/usr/bin/dockerd --host=%H\n", "%H depends on the running machine"),
        ("[Service]\nExecStart=/usr/bin/docker-wrapper --start\n", "runs /usr/bin/docker-wrapper, not dockerd"),
        ("[Unit]\nDescription=no service section\n", "no ExecStart="),
    ],
)
def test_an_unusable_unit_gives_coss_defaults_and_says_why(root: Path, text: str, why: str) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", text)
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None
    assert dockerd.argv[1] == "--registry-mirror=https://mirror.gcr.io"
    assert any(why in note and "/lib/systemd/system/docker.service" in note for note in dockerd.notes), dockerd.notes


def test_odd_files_are_not_read(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    put(
        root,
        "/etc/systemd/system/docker.service",
        b"[Service]\nExecStart=/usr/bin/dockerd --big\n" + b"#" * du.MAX_FILE_SIZE,
    )
    os.mkfifo(root / "etc/systemd/system/containerd.service")  # would block a reader
    put(root, "/lib/systemd/system/containerd.service", "[Service]\nExecStart=/usr/bin/containerd --from-lib\n")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon) and isinstance(dockerd, Daemon)
    assert containerd.argv[-1] == "--from-lib"
    assert "--big" not in dockerd.argv
    assert any("larger than" in note for note in dockerd.notes)


def test_sockets_must_be_absolute(root: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        du.resolve_daemons(root, docker_socket="docker.sock", containerd_socket=CONTAINERD_SOCKET)


def test_a_daemon_is_immutable(root: Path) -> None:
    binary(root, "/usr/bin/containerd")
    containerd = started(root, "containerd")
    with pytest.raises(TypeError):
        containerd.env["X"] = "1"  # type: ignore[index]
    assert hash(containerd) == hash(started(root, "containerd"))
