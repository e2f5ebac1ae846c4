"""ThrottleSpec / LimitSpec grammar (KumoMTA's crates/throttle tests and docs) and the GCRA.

The GCRA is checked on a fake clock: exact scenarios, and property tests against a plain
token bucket written with exact fractions (capacity = burst cells, one cell refilled per
emission interval), which admits exactly the same requests as GCRA does.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.shaping.durations import parse_duration, parse_duration_text
from egressd.shaping.throttle import NANOS, Gcra, LimitSpec, ThrottleSpec

# --------------------------------------------------------------------------- ThrottleSpec


@pytest.mark.parametrize(
    ("text", "limit", "period", "burst", "local"),
    [
        ("100/hr", 100, 3600, None, False),
        ("local:100/hr", 100, 3600, None, True),
        ("local:100/123m", 100, 123 * 60, None, True),
        ("1_0,0/hour", 100, 3600, None, False),
        ("50/day,max_burst=1", 50, 86400, 1, False),
        ("3/5m", 3, 300, None, False),
        ("10/s", 10, 1, None, False),
        ("10/sec", 10, 1, None, False),
        ("10/second", 10, 1, None, False),
        ("50/m", 50, 60, None, False),
        ("50/min", 50, 60, None, False),
        ("50/minute", 50, 60, None, False),
        ("1,000/hr", 1000, 3600, None, False),
        ("1_000/h", 1000, 3600, None, False),
        ("10_000/d", 10000, 86400, None, False),
        ("10,000/day", 10000, 86400, None, False),
        ("500/d,max_burst=1", 500, 86400, 1, False),
        ("1/minute", 1, 60, None, False),
    ],
)
def test_throttle_spec_parses_kumomta_forms(
    text: str, limit: int, period: int, burst: int | None, local: bool
) -> None:
    assert ThrottleSpec.parse(text) == ThrottleSpec(limit, period, burst, local)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("100/hr", "100/h"),
        ("local:100/hr", "local:100/h"),
        ("local:100/123m", "local:100/7380s"),
        ("50/day,max_burst=1", "50/d,max_burst=1"),
        ("3/5m", "3/300s"),
        ("10/second", "10/s"),
        ("1,000/min", "1000/m"),
    ],
)
def test_throttle_spec_prints_like_kumomta(text: str, canonical: str) -> None:
    assert str(ThrottleSpec.parse(text)) == canonical
    assert ThrottleSpec.parse(canonical) == ThrottleSpec.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100/our", "unknown period 'our'"),
        ("three/hour", "'three' is not a number"),
        ("0/hour", "quantity of 0"),
        ("100", "not quantity/period"),
        ("100/5", "unknown period '5'"),
        ("100/0m", "period of 0"),
        ("100/h,max_burst=x", "'x' is not a number"),
        ("100 /h", "'100 ' is not a number"),
    ],
)
def test_throttle_spec_errors_name_the_text(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        ThrottleSpec.parse(text)
    assert message in str(caught.value)
    assert repr(text) in str(caught.value)


def test_burst_follows_kumomtas_in_process_throttle() -> None:
    assert ThrottleSpec.parse("10/s").burst == 10
    assert ThrottleSpec.parse("10/s,max_burst=1").burst == 2
    assert ThrottleSpec.parse("10/s,max_burst=0").burst == 1
    assert ThrottleSpec.parse("10/s,max_burst=50").burst == 10
    assert ThrottleSpec.parse("1/minute").burst == 1
    assert ThrottleSpec.parse("50/day,max_burst=1").interval_ns == 1728 * NANOS
    assert ThrottleSpec.parse("3/s").interval_ns == 333_333_333


# --------------------------------------------------------------------------- LimitSpec


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, LimitSpec(5)),
        ("100", LimitSpec(100)),
        ("1_00", LimitSpec(100)),
        ("1,000", LimitSpec(1000)),
        ("local:1_00", LimitSpec(100, force_local=True)),
    ],
)
def test_limit_spec_parses(value: object, expected: LimitSpec) -> None:
    assert LimitSpec.parse(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "three", True, 1.5, None, "local:"])
def test_limit_spec_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        LimitSpec.parse(value)


def test_limit_spec_prints() -> None:
    assert str(LimitSpec.parse("local:5")) == "local:5"
    assert str(LimitSpec.parse(7)) == "7"


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90m", 5400.0),
        ("2 hours", 7200.0),
        ("1 hours", 3600.0),
        ("30 minutes", 1800.0),
        ("3 days", 259200.0),
        ("1h 30m", 5400.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1M", 2_630_016.0),
        ("1w", 604800.0),
        (60, 60.0),
        (1.5, 1.5),
    ],
)
def test_durations_read_like_humantime(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "  ", "5", "5 parsecs", "1.5h", "-1s", -3, True, None])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_duration_text_names_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown unit 'parsecs'"):
        parse_duration_text("5 parsecs")


# --------------------------------------------------------------------------- GCRA


def test_ten_per_second_allows_ten_then_one_per_hundred_ms() -> None:
    bucket = Gcra(ThrottleSpec.parse("10/s"))
    assert [bucket.take(0) for _ in range(10)] == [0] * 10
    assert bucket.take(0) == 100_000_000
    assert bucket.take(99_999_999) == 1
    assert bucket.take(100_000_000) == 0
    assert bucket.take(100_000_000) == 100_000_000


def test_max_burst_one_spreads_a_daily_budget() -> None:
    # "50/day,max_burst=1": one cell per 1728 s, two at once (KumoMTA in-process semantics)
    bucket = Gcra(ThrottleSpec.parse("50/day,max_burst=1"))
    interval = 1728 * NANOS
    assert bucket.take(0) == 0
    assert bucket.take(0) == 0
    assert bucket.take(0) == interval
    assert bucket.take(interval) == 0
    assert bucket.take(interval) == interval


def test_three_per_five_minutes() -> None:
    bucket = Gcra(ThrottleSpec.parse("3/5m"))
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == 100 * NANOS
    assert bucket.take(100 * NANOS) == 0


def test_refused_requests_do_not_count_and_a_quiet_bucket_is_idle() -> None:
    bucket = Gcra(ThrottleSpec.parse("1/minute"))
    assert bucket.idle(0)
    assert bucket.take(0) == 0
    for _ in range(5):
        assert bucket.take(30 * NANOS) == 30 * NANOS
    assert not bucket.idle(59 * NANOS)
    assert bucket.idle(60 * NANOS)
    assert bucket.take(60 * NANOS) == 0


def test_wait_does_not_consume() -> None:
    bucket = Gcra(ThrottleSpec.parse("1/s"))
    assert bucket.wait_ns(0) == 0
    assert bucket.wait_ns(0) == 0
    assert bucket.take(0) == 0
    assert bucket.wait_ns(0) == NANOS


def test_quantity_larger_than_burst_never_conforms() -> None:
    bucket = Gcra(ThrottleSpec.parse("2/s"))
    assert bucket.take(0, quantity=3) > 0
    assert bucket.take(0, quantity=2) == 0


@dataclass
class TokenBucket:
    """The reference: ``burst`` tokens, one more every emission interval, exact arithmetic."""

    capacity: int
    interval: int
    tokens: Fraction
    last: int = 0

    @classmethod
    def for_spec(cls, spec: ThrottleSpec) -> TokenBucket:
        return cls(spec.burst, spec.interval_ns, Fraction(spec.burst))

    def take(self, now: int) -> bool:
        elapsed = now - self.last
        self.last = now
        self.tokens = min(Fraction(self.capacity), self.tokens + Fraction(elapsed, self.interval))
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


specs = st.builds(
    lambda limit, period, unit, burst: ThrottleSpec.parse(
        f"{limit}/{period}{unit}" + ("" if burst is None else f",max_burst={burst}")
    ),
    st.integers(1, 2000),
    st.integers(1, 10),
    st.sampled_from(["s", "m", "h", "d"]),
    st.none() | st.integers(0, 3000),
)


@settings(max_examples=300, deadline=None)
@given(spec=specs, gaps=st.lists(st.integers(0, 5 * NANOS), min_size=1, max_size=200))
def test_gcra_admits_exactly_what_a_token_bucket_admits(
    spec: ThrottleSpec, gaps: list[int]
) -> None:
    bucket = Gcra(spec)
    reference = TokenBucket.for_spec(spec)
    now = 0
    for gap in gaps:
        now += gap
        assert (bucket.take(now) == 0) == reference.take(now), (spec, now)


@settings(max_examples=200, deadline=None)
@given(spec=specs, gaps=st.lists(st.integers(0, 3 * NANOS), min_size=1, max_size=100))
def test_gcra_wait_is_exact(spec: ThrottleSpec, gaps: list[int]) -> None:
    """After a refusal saying "wait w", the request conforms at now+w and not a ns before."""
    bucket = Gcra(spec)
    now = 0
    for gap in gaps:
        now += gap
        wait = bucket.wait_ns(now)
        if wait:
            assert bucket.wait_ns(now + wait) == 0
            assert bucket.wait_ns(now + wait - 1) == 1
        bucket.take(now)


@settings(max_examples=100, deadline=None)
@given(spec=specs)
def test_gcra_never_exceeds_limit_plus_burst_in_a_period(spec: ThrottleSpec) -> None:
    """Hammering every interval/3 ns for two periods admits at most burst + 2 * limit cells."""
    bucket = Gcra(spec)
    step = max(1, spec.interval_ns // 3)
    horizon = 2 * spec.period * NANOS
    admitted = sum(1 for now in range(0, horizon, step) if bucket.take(now) == 0)
    assert admitted <= spec.burst + 2 * spec.limit
    # requests come every `step` ns, so a cell waits at most one step past its time
    assert admitted >= horizon // (spec.interval_ns + step)
