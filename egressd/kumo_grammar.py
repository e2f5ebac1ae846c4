"""KumoMTA's value grammars, read in one place for ``config/`` and ``shaping/``. Pure.

- Durations (crates/duration-serde): a number is seconds; a string goes to humantime
  (tailhook/humantime): whole numbers, each followed by a unit, with optional spaces:
  ``"60s"``, ``"5 mins"``, ``"1h 30m"``, ``"2weeks"``, ``"250ms"``. Units are
  case-sensitive (``M`` is a month of 30.44 days, ``m`` a minute; a year is 365.25 days).
  humantime takes no decimal count (``"1.5h"``); egressd's own keys do, when the caller
  asks for it (``decimals=True``).
- ThrottleSpec (crates/throttle): ``[local:]quantity/period[,max_burst=N]``, such as
  ``"3/hr"``, ``"3/5m"``, ``"1,000/day"``, ``"local:1_000/d,max_burst=5"``. The period is
  ``s sec second m min minute h hr hour d day``, optionally after a count; quantities take
  ``,`` and ``_`` separators anywhere. A quantity or period of 0 is refused.

A problem raises :class:`GrammarError`, which says what is wrong (``problem``) and where
(``word``), so that each caller words it in its own style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "BURST_SEPARATOR",
    "DURATION_UNITS",
    "LOCAL_PREFIX",
    "GrammarError",
    "Throttle",
    "parse_duration_text",
    "parse_separated_number",
    "parse_throttle",
]


class GrammarError(ValueError):
    """``problem``: empty, syntax, unit (durations); number, no_slash, zero_quantity,
    period, zero_period (throttles). ``word``: the text at fault."""

    def __init__(self, problem: str, word: str = "") -> None:
        super().__init__(f"{problem}: {word!r}")
        self.problem = problem
        self.word = word


# --------------------------------------------------------------------------- durations

DURATION_UNITS: dict[str, float] = {}
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
        DURATION_UNITS[_name] = _seconds

_DURATION_PART = re.compile(r"\s*([0-9]+)(\.[0-9]+)?\s*([A-Za-z]+)\s*")


def parse_duration_text(text: str, *, decimals: bool = False) -> float:
    """Seconds in a humantime string (with ``decimals``, also ``"0.5s"``)."""
    if not text.strip():
        raise GrammarError("empty", text)
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or (match.group(2) and not decimals):
            raise GrammarError("syntax", text)
        count, fraction, unit = match.groups()
        seconds = DURATION_UNITS.get(unit)
        if seconds is None:
            raise GrammarError("unit", unit)
        total += float(count + (fraction or "")) * seconds
        position = match.end()
    return total


# --------------------------------------------------------------------------- throttles

_PERIOD_UNITS = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hr", "hour"), 3600),
    **dict.fromkeys(("d", "day"), 86400),
}
_PERIOD = re.compile(r"([0-9]*)(.*)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]+")
LOCAL_PREFIX = "local:"
BURST_SEPARATOR = ",max_burst="


@dataclass(frozen=True)
class Throttle:
    """A parsed ThrottleSpec: ``limit`` events per ``period`` seconds."""

    limit: int
    period: int
    max_burst: int | None = None
    local: bool = False


def parse_throttle(text: str) -> Throttle:
    """``[local:]quantity/period[,max_burst=N]``, exactly as KumoMTA reads it."""
    local = text.startswith(LOCAL_PREFIX)
    rest = text.removeprefix(LOCAL_PREFIX)
    max_burst: int | None = None
    if BURST_SEPARATOR in rest:
        rest, burst = rest.split(BURST_SEPARATOR, 1)
        max_burst = parse_separated_number(burst)
    if "/" not in rest:
        raise GrammarError("no_slash", text)
    quantity, period = rest.split("/", 1)
    limit = parse_separated_number(quantity)
    if limit == 0:
        raise GrammarError("zero_quantity", quantity)
    return Throttle(limit, _period_seconds(period), max_burst, local)


def parse_separated_number(text: str) -> int:
    """``"1,000"`` and ``"1_000"`` -> 1000, as KumoMTA's parse_separated_number."""
    digits = text.replace("_", "").replace(",", "")
    if not _DIGITS.fullmatch(digits):
        raise GrammarError("number", text)
    return int(digits)


def _period_seconds(text: str) -> int:
    """``"hr"`` -> 3600, ``"5m"`` -> 300: an optional count, then a unit."""
    match = _PERIOD.fullmatch(text)
    assert match is not None  # the pattern matches any text
    count, unit = match.groups()
    if unit not in _PERIOD_UNITS:
        raise GrammarError("period", text)
    seconds = (int(count) if count else 1) * _PERIOD_UNITS[unit]
    if seconds == 0:
        raise GrammarError("zero_period", text)
    return seconds
