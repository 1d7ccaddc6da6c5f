"""Value formats shared with Google's Go COS Customizer.

Sizes (`-oem-size`) and durations (`-timeout`) are written the way the Go
original and Go's `time` package write them, so existing Cloud Build files
keep their meaning. Standard library only: the provisioner uses this too.
"""

from __future__ import annotations

import re

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_SIZE_UNITS = {"B": 1, "K": KiB, "M": MiB, "G": GiB}
_MAX_SIZE = (1 << 64) - 1
SIZE_HINT = "use a whole number followed by B, K, M or G (for example 500M), or a bare number of 512-byte sectors"


def parse_size(text: str) -> int:
    """Return the number of bytes that a size string means.

    `10G`, `500M`, `600K`, `5000B`, or a bare number of 512-byte sectors.
    Raises ValueError with a message that says what is wrong.
    """
    if not text:
        raise ValueError(f"empty size; {SIZE_HINT}")
    if not text[0].isascii() or not text[0].isdigit():
        raise ValueError(f"a size must start with a digit; {SIZE_HINT}")
    if text[-1].isascii() and text[-1].isdigit():
        number, multiplier = text, SECTOR
    else:
        number, unit = text[:-1], text[-1]
        if unit not in _SIZE_UNITS:
            raise ValueError(f'unknown unit "{unit}"; {SIZE_HINT}')
        multiplier = _SIZE_UNITS[unit]
    if not (number.isascii() and number.isdigit()):
        raise ValueError(f'"{number}" is not a whole number; {SIZE_HINT}')
    size = int(number) * multiplier
    if size > _MAX_SIZE:
        raise ValueError("the size is too large")
    return size


def gib_round_up(size: int) -> int:
    """Whole GiB needed to hold `size` bytes (the Go original's GB rounding)."""
    return -(-size // GiB)


def format_size(size: int) -> str:
    """A short human form: 16M, 2G, 1536K, 4097B."""
    for unit in ("G", "M", "K"):
        multiplier = _SIZE_UNITS[unit]
        if size and size % multiplier == 0:
            return f"{size // multiplier}{unit}"
    return f"{size}B"


def human_size(size: int) -> str:
    """For people: 512 B, 4.2 MiB, 12.0 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Go's time.ParseDuration and time.Duration.String, in nanoseconds.
NANOSECOND = 1
MICROSECOND = 1000
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_DURATION_UNITS = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,
    "\u03bcs": MICROSECOND,
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_MAX_DURATION = (1 << 63) - 1
DURATION_HINT = 'use Go duration syntax such as "1h0m0s", "90m" or "45s"'


def parse_duration(text: str) -> int:
    """Parse a Go duration string ("1h30m", "1.5h", "300ms") into nanoseconds."""
    original = text
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f'invalid duration "{original}"; {DURATION_HINT}')
    total = 0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        assert match is not None  # the pattern matches the empty string
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f'invalid duration "{original}"; {DURATION_HINT}')
        if not unit:
            raise ValueError(f'missing unit in duration "{original}"; {DURATION_HINT}')
        if unit not in _DURATION_UNITS:
            raise ValueError(f'unknown unit "{unit}" in duration "{original}"; {DURATION_HINT}')
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        if total > _MAX_DURATION:
            raise ValueError(f'invalid duration "{original}": too large')
        pos = match.end()
    return sign * total


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(nanos: int) -> str:
    """Format nanoseconds the way Go's time.Duration.String does ("1h0m0s")."""
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < MICROSECOND:
        return f"{sign}{nanos}ns"
    if nanos < MILLISECOND:
        return f"{sign}{_fraction(nanos, MICROSECOND)}\u00b5s"
    if nanos < SECOND:
        return f"{sign}{_fraction(nanos, MILLISECOND)}ms"
    hours, rest = divmod(nanos, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    seconds = _fraction(rest, SECOND) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return f"{sign}{seconds}"
