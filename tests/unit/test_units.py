from __future__ import annotations

import pytest

from cos_customizer.units import (
    GiB,
    MiB,
    format_duration,
    format_size,
    gib_round_up,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16M", 16 * MiB),
        ("1G", GiB),
        ("600K", 600 * 1024),
        ("5000B", 5000),
        ("1024", 1024 * 512),
        ("0B", 0),
        ("007M", 7 * MiB),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty size"),
        ("200T", 'unknown unit "T"'),
        ("-200K", "a size must start with a digit"),
        ("+200K", "a size must start with a digit"),
        ("A45M", "a size must start with a digit"),
        ("1.5G", '"1.5" is not a whole number'),
        ("12 M", '"12 " is not a whole number'),
        ("5m", 'unknown unit "m"'),
        ("99999999999999999999G", "the size is too large"),
    ],
)
def test_parse_size_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert str(err.value).startswith(reason)


def test_gib_round_up() -> None:
    assert [gib_round_up(n) for n in (0, 1, GiB, GiB + 1, 2 * GiB)] == [0, 1, 1, 2, 2]


def test_format_size() -> None:
    assert [format_size(n) for n in (16 * MiB, 2 * GiB, 1536 * 1024, 4097)] == ["16M", "2G", "1536K", "4097B"]


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("1h0m0s", 3600 * 10**9),
        ("1h", 3600 * 10**9),
        ("90m", 5400 * 10**9),
        ("1.5h", 5400 * 10**9),
        ("2h45m", (2 * 3600 + 45 * 60) * 10**9),
        ("300ms", 300 * 10**6),
        ("1us", 1000),
        ("1\u00b5s", 1000),
        ("10ns", 10),
        ("0", 0),
        ("-1.5s", -1500 * 10**6),
        ("+5s", 5 * 10**9),
        (".5s", 5 * 10**8),
    ],
)
def test_parse_duration(text: str, nanos: int) -> None:
    assert parse_duration(text) == nanos


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "invalid duration"), ("10", "missing unit"), ("1d", 'unknown unit "d"'), (".s", "invalid duration")],
)
def test_parse_duration_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0s"),
        (3600 * 10**9, "1h0m0s"),
        (5400 * 10**9, "1h30m0s"),
        (90 * 10**9, "1m30s"),
        (1500 * 10**6, "1.5s"),
        (300 * 10**6, "300ms"),
        (1500, "1.5\u00b5s"),
        (10, "10ns"),
        (-(5 * 10**9), "-5s"),
    ],
)
def test_format_duration_matches_go(nanos: int, text: str) -> None:
    assert format_duration(nanos) == text


def test_human_size() -> None:
    from cos_customizer.units import human_size

    assert [human_size(n) for n in (512, 4371299, 12 << 30, 5 << 40)] == ["512 B", "4.2 MiB", "12.0 GiB", "5120.0 GiB"]
