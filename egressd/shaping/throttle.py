"""KumoMTA's throttle and limit specs, and the GCRA that enforces a throttle.

Theory of operation
-------------------
A :class:`ThrottleSpec` is KumoMTA's ``[local:]quantity/period[,max_burst=N]`` (crates/throttle
in KumoCorp/kumomta): ``"100/hr"``, ``"3/5m"`` (3 per 5 minutes), ``"1,000/day"``,
``"1_000/h"``, ``"50/d,max_burst=1"``. The period unit is one of ``s sec second m min minute
h hr hour d day``, optionally preceded by a number. A :class:`LimitSpec` is a concurrency limit:
an integer, or a string such as ``"local:5"`` or ``"1_000"``. Both reject a zero quantity.

:class:`Gcra` is the Generic Cell Rate Algorithm exactly as KumoMTA runs it in process
(redis-cell's ``RateLimiter``, which kumod uses when no Redis is configured):

- the emission interval ``T`` is ``period / limit`` in whole nanoseconds;
- the burst is ``min(max_burst, limit - 1) + 1`` cells (``max_burst`` defaults to ``limit``,
  so ``"10/s"`` allows 10 at once, and ``",max_burst=1"`` allows 2 at once for any limit above
  1: KumoMTA passes ``max_burst.min(limit - 1)`` to redis-cell, which allows ``max_burst + 1``);
- a cell arriving at ``now`` is conforming when ``max(TAT, now) + T - T * burst <= now``; a
  conforming cell moves the theoretical arrival time ``TAT`` to ``max(TAT, now) + T``, a
  refused one leaves it alone and learns how long to wait.

Time is an integer count of nanoseconds given by the caller: this module has no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import egressd.kumo_grammar as kumo_grammar
from egressd.kumo_grammar import BURST_SEPARATOR, LOCAL_PREFIX, GrammarError

NANOS = 1_000_000_000

_PERIOD_NAMES = {86400: "d", 3600: "h", 60: "m", 1: "s"}


def parse_separated_number(text: str) -> int:
    """``"1,000"`` and ``"1_000"`` -> 1000 (KumoMTA allows both separators anywhere)."""
    try:
        return kumo_grammar.parse_separated_number(text)
    except GrammarError:
        raise ValueError(f"{text!r} is not a number") from None


def _split_local(text: str) -> tuple[bool, str]:
    if text.startswith(LOCAL_PREFIX):
        return True, text[len(LOCAL_PREFIX) :]
    return False, text


_PROBLEMS = {
    "no_slash": "is not quantity/period (e.g. 100/hr, 3/5m)",
    "number": "{word!r} is not a number",
    "zero_quantity": "has a quantity of 0",
    "period": "has an unknown period {word!r} (use s, m, h or d, e.g. 5m)",
    "zero_period": "has a period of 0",
}


@dataclass(frozen=True)
class ThrottleSpec:
    """``limit`` events per ``period`` seconds, ``max_burst`` of them at once."""

    limit: int
    period: int
    max_burst: int | None = None
    force_local: bool = False

    @classmethod
    def parse(cls, text: str) -> ThrottleSpec:
        """KumoMTA's grammar; ValueError says what is wrong with ``text``."""
        try:
            return cls._parse(text)
        except ValueError as exc:
            raise ValueError(f"throttle {text!r} {exc}") from None

    @classmethod
    def _parse(cls, text: str) -> ThrottleSpec:
        try:
            spec = kumo_grammar.parse_throttle(text)
        except GrammarError as exc:
            raise ValueError(_PROBLEMS[exc.problem].format(word=exc.word)) from None
        return cls(spec.limit, spec.period, spec.max_burst, spec.local)

    @cached_property
    def burst(self) -> int:
        """How many events may happen at once (see the module docstring)."""
        wanted = self.limit if self.max_burst is None else self.max_burst
        return min(wanted, self.limit - 1) + 1

    @cached_property
    def interval_ns(self) -> int:
        """The emission interval, truncated to nanoseconds as redis-cell does."""
        return int(self.period * NANOS / self.limit)

    def __str__(self) -> str:
        """KumoMTA's canonical form: ``"3/5m"`` prints as ``"3/300s"``."""
        unit = _PERIOD_NAMES.get(self.period)
        period = unit if unit is not None else f"{self.period}s"
        burst = f"{BURST_SEPARATOR}{self.max_burst}" if self.max_burst is not None else ""
        local = LOCAL_PREFIX if self.force_local else ""
        return f"{local}{self.limit}/{period}{burst}"


@dataclass(frozen=True)
class LimitSpec:
    """A concurrency limit: an integer >= 1, or ``"[local:]N"`` with ``,``/``_`` separators."""

    limit: int
    force_local: bool = False

    @classmethod
    def parse(cls, value: object) -> LimitSpec:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("is not a limit (an integer, or a string such as 'local:5')")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"limit {value} must be 1 or larger")
            return cls(value)
        force_local, rest = _split_local(value)
        limit = parse_separated_number(rest)
        if limit < 1:
            raise ValueError(f"limit {value!r} must be 1 or larger")
        return cls(limit, force_local)

    def __str__(self) -> str:
        return f"{LOCAL_PREFIX if self.force_local else ''}{self.limit}"


@dataclass
class Gcra:
    """One throttle bucket: the theoretical arrival time of the next cell, in nanoseconds."""

    spec: ThrottleSpec
    tat: int | None = field(default=None)

    def wait_ns(self, now: int, quantity: int = 1) -> int:
        """0 when ``quantity`` cells conform at ``now``; else how long until they would."""
        interval = self.spec.interval_ns
        tat = self.tat
        start = now if tat is None or tat < now else tat
        wait = start + interval * (quantity - self.spec.burst) - now
        return wait if wait > 0 else 0

    def take(self, now: int, quantity: int = 1) -> int:
        """Like :meth:`wait_ns`, and a conforming request is counted (once per message:
        one pass)."""
        interval = self.spec.interval_ns
        tat = self.tat
        start = now if tat is None or tat < now else tat
        wait = start + interval * (quantity - self.spec.burst) - now
        if wait > 0:
            return wait
        self.tat = start + interval * quantity
        return 0

    def idle(self, now: int) -> bool:
        """True when the bucket is full again (it may be forgotten)."""
        return self.tat is None or self.tat <= now
