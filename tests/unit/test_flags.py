"""The Go `flag` package's syntax, form by form."""

from __future__ import annotations

import pytest

from cos_customizer.cli.flags import Flag, HelpRequested, Kind, parse, parse_int, parse_map
from cos_customizer.errors import UsageError, ValidationError

FLAGS = (
    Flag("name", Kind.STRING, "a string"),
    Flag("count", Kind.INT, "an int", default=7),
    Flag("on", Kind.BOOL, "a bool"),
    Flag("timeout", Kind.DURATION, "a duration", default=60 * 10**9),
    Flag("env", Kind.MAP, "a map"),
    Flag("licenses", Kind.LIST, "a list"),
    Flag("size", Kind.STRING, "checked", check=lambda v: int(v)),
)


def p(*args: str):
    return parse(FLAGS, args, command="test")


@pytest.mark.parametrize(
    "args",
    [
        ["-name=v"],
        ["-name", "v"],
        ["--name=v"],
        ["--name", "v"],
    ],
)
def test_string_forms(args: list[str]) -> None:
    parsed = p(*args)
    assert parsed["name"] == "v"
    assert parsed.given == {"name"}
    assert parsed.positional == []


def test_value_may_start_with_dash_or_be_empty() -> None:
    assert p("-name", "-x")["name"] == "-x"
    assert p("-name=")["name"] == ""
    assert p("-name=a=b")["name"] == "a=b"


@pytest.mark.parametrize(
    ("args", "value"),
    [
        (["-on"], True),
        (["--on"], True),
        (["-on=true"], True),
        (["-on=false"], False),
        (["-on=1"], True),
        (["-on=0"], False),
        (["-on=T"], True),
        (["-on=F"], False),
        (["-on=TRUE"], True),
        (["-on=False"], False),
        ([], False),
    ],
)
def test_bool_forms(args: list[str], value: bool) -> None:
    assert p(*args)["on"] is value


def test_bool_never_takes_the_next_argument() -> None:
    parsed = p("-on", "false")
    assert parsed["on"] is True
    assert parsed.positional == ["false"]


def test_bad_bool() -> None:
    with pytest.raises(UsageError, match=r'^invalid boolean value "yes" for flag -on: parse error$'):
        p("-on=yes")


@pytest.mark.parametrize(("text", "value"), [("10", 10), ("0x1f", 31), ("010", 8), ("0o10", 8), ("-3", -3), ("0", 0)])
def test_int_forms(text: str, value: int) -> None:
    assert p(f"-count={text}")["count"] == value
    assert parse_int(text) == value


def test_int_default_and_bad_value() -> None:
    assert p()["count"] == 7
    with pytest.raises(UsageError, match=r'^invalid value "ten" for flag -count: parse error$'):
        p("-count=ten")
    with pytest.raises(UsageError, match="value out of range"):
        p(f"-count={1 << 63}")


def test_duration() -> None:
    assert p("-timeout=2h")["timeout"] == 7200 * 10**9
    assert p()["timeout"] == 60 * 10**9
    with pytest.raises(UsageError, match=r'^invalid value "10" for flag -timeout: missing unit in duration "10"'):
        p("-timeout=10")


def test_map_accumulates_and_later_wins() -> None:
    parsed = p("-env=A=1,B=2", "--env", "C=3", "-env=A=9")
    assert parsed["env"] == {"A": "9", "B": "2", "C": "3"}


def test_map_values_may_hold_commas_and_equals() -> None:
    assert p("-env=LIST=a,b,c,X=y=z")["env"] == {"LIST": "a,b,c", "X": "y=z"}
    into: dict[str, str] = {}
    parse_map("K=", into)
    assert into == {"K": ""}


def test_map_item_without_equals() -> None:
    with pytest.raises(
        UsageError,
        match=r"""^invalid value "oops" for flag -env: item 'oops' is improperly formatted; does it have an '=' character\?$""",
    ):
        p("-env=oops")


def test_list_accumulates() -> None:
    assert p("-licenses=a,b", "-licenses", "c")["licenses"] == ["a", "b", "c"]


def test_check_runs_on_string_values() -> None:
    assert p("-size=12")["size"] == "12"
    with pytest.raises(ValidationError, match=r'^invalid value "x" for flag -size: invalid literal'):
        p("-size=x")


def test_unknown_flag() -> None:
    with pytest.raises(UsageError, match=r"^flag provided but not defined: -nope \(see cos-customizer test --help\)$"):
        p("-nope=1")


def test_missing_argument() -> None:
    with pytest.raises(UsageError, match=r"^flag needs an argument: -name$"):
        p("-name")


@pytest.mark.parametrize("arg", ["---name=x", "-=x", "--=x"])
def test_bad_syntax(arg: str) -> None:
    with pytest.raises(UsageError, match=r"^bad flag syntax: "):
        p(arg)


@pytest.mark.parametrize("arg", ["-h", "-help", "--help", "--h"])
def test_help(arg: str) -> None:
    with pytest.raises(HelpRequested):
        p("-name=x", arg)


def test_positionals_and_double_dash() -> None:
    parsed = p("a", "-name=x", "b", "--", "-on")
    assert parsed.positional == ["a", "b", "-on"]
    assert parsed["name"] == "x"
    assert parsed["on"] is False


def test_not_interspersed_stops_at_first_positional() -> None:
    parsed = parse(FLAGS, ["-on", "step", "-name=x"], command="", interspersed=False)
    assert parsed["on"] is True
    assert parsed.positional == ["step", "-name=x"]
    assert parsed["name"] == ""


def test_single_dash_is_positional() -> None:
    assert p("-")["name"] == ""
    assert p("-").positional == ["-"]


def test_an_empty_string_value_is_an_unset_flag_as_in_the_original() -> None:
    """Go's string flags take "" and the original treats "" as "not set" (an empty Cloud Build substitution);
    its int, bool and duration flags refuse "" (strconv), and so do ours."""
    with_default = (*FLAGS, Flag("machine", Kind.STRING, "has a default", default="n1-standard-1"))
    parsed = parse(with_default, ["-size=", "-name=", "-machine="], command="test")
    assert (parsed["size"], parsed["name"], parsed["machine"]) == ("", "", "n1-standard-1")
    assert parsed.given == set()
    for flag in ("-count=", "-on=", "-timeout="):
        with pytest.raises(UsageError) as err:
            p(flag)
        assert str(err.value).startswith(
            f'invalid {"boolean value" if flag == "-on=" else "value"} "" for flag {flag[:-1]}'
        )
