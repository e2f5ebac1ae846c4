"""KumoMTA's durations (crates/duration-serde): a number of seconds, or a humantime string.

humantime (tailhook/humantime) reads ``"90m"``, ``"2 hours"``, ``"1h 30m"``, ``"3 days"``: whole
numbers, each followed by a unit, with optional spaces. Units are case-sensitive (``M`` is a
month, ``m`` a minute); a month is 30.44 days and a year 365.25 days, as in humantime.
"""

from __future__ import annotations

import egressd.kumo_grammar as kumo_grammar
from egressd.kumo_grammar import GrammarError


def parse_duration_text(text: str) -> float:
    """Seconds in a humantime string (:mod:`egressd.kumo_grammar`, no decimal counts, as
    KumoMTA); ValueError names what is wrong."""
    try:
        return kumo_grammar.parse_duration_text(text)
    except GrammarError as exc:
        raise ValueError(_PROBLEMS[exc.problem].format(text=text, word=exc.word)) from None


_PROBLEMS = {
    "empty": "is an empty duration",
    "syntax": "{text!r} is not a duration (e.g. 90m, 2 hours, 1h 30m)",
    "unit": "{text!r} has an unknown unit {word!r}",
}


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
