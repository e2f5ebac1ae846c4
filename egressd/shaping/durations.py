"""KumoMTA's durations (crates/duration-serde): a number of seconds, or a humantime string.

humantime (tailhook/humantime) reads ``"90m"``, ``"2 hours"``, ``"1h 30m"``, ``"3 days"``: whole
numbers, each followed by a unit, with optional spaces. Units are case-sensitive (``M`` is a
month, ``m`` a minute); a month is 30.44 days and a year 365.25 days, as in humantime.
"""

from __future__ import annotations

import re

_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("nanos", "nsec", "ns"), 1e-9),
    (("usec", "us"), 1e-6),
    (("millis", "msec", "ms"), 1e-3),
    (("seconds", "second", "secs", "sec", "s"), 1.0),
    (("minutes", "minute", "min", "mins", "m"), 60.0),
    (("hours", "hour", "hr", "hrs", "h"), 3600.0),
    (("days", "day", "d"), 86400.0),
    (("weeks", "week", "w"), 604800.0),
    (("months", "month", "M"), 2_630_016.0),
    (("years", "year", "y"), 31_557_600.0),
):
    for _name in _names:
        _UNITS[_name] = _seconds

_PART = re.compile(r"\s*([0-9]+)\s*([A-Za-z]+)\s*")


def parse_duration_text(text: str) -> float:
    """Seconds in a humantime string; ValueError names what is wrong."""
    if not text.strip():
        raise ValueError("is an empty duration")
    total = 0.0
    position = 0
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            raise ValueError(f"{text!r} is not a duration (e.g. 90m, 2 hours, 1h 30m)")
        unit = _UNITS.get(match.group(2))
        if unit is None:
            raise ValueError(f"{text!r} has an unknown unit {match.group(2)!r}")
        total += int(match.group(1)) * unit
        position = match.end()
    return total


def parse_duration(value: object) -> float:
    """A TOML/JSON duration value: a non-negative number of seconds or a humantime string."""
    if isinstance(value, bool):
        raise ValueError("is a boolean, not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value} is a negative duration")
        return float(value)
    if isinstance(value, str):
        return parse_duration_text(value)
    raise ValueError("is not a duration (a number of seconds or a string such as '90m')")
