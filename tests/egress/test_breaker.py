"""The per-destination circuit breaker on a fake clock."""

from __future__ import annotations

import ipaddress

import pytest
from fake_clock import FakeClock

from egressd.config import IPAddress
from egressd.egress import BreakerSettings, DestinationBreaker, Failure

ip = ipaddress.ip_address
DEAD: tuple[IPAddress, int] = (ip("192.0.2.66"), 25)
OTHER: tuple[IPAddress, int] = (ip("192.0.2.66"), 587)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> DestinationBreaker:
    return DestinationBreaker(now=clock)


def fail(
    breaker: DestinationBreaker, times: int = 1, destination: tuple[IPAddress, int] = DEAD
) -> list[bool]:
    return [
        breaker.failure(destination, Failure.REFUSED, "Connection refused") for _ in range(times)
    ]


def test_the_defaults() -> None:
    assert BreakerSettings() == BreakerSettings(
        failures=3, window=60.0, open_for=30.0, max_open_for=300.0, capacity=10000
    )


def test_three_failures_within_a_minute_open_it(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    assert fail(breaker, 2) == [False, False]
    assert breaker.check(DEAD) is None
    clock.now += 59
    assert fail(breaker) == [True]
    refusal = breaker.check(DEAD)
    assert refusal is not None
    assert refusal.describe() == (
        "destination 192.0.2.66:25 is failing (3 failures, the last: Connection refused);"
        " not dialed again for 30s"
    )
    assert breaker.check(OTHER) is None  # another port is another destination


def test_failures_spread_beyond_the_window_do_not_add_up(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    for _ in range(6):
        assert fail(breaker) == [False]
        clock.now += 31
    assert breaker.check(DEAD) is None


def test_a_success_resets_the_count(breaker: DestinationBreaker) -> None:
    fail(breaker, 2)
    breaker.success(DEAD, "a")
    assert fail(breaker, 2) == [False, False]
    assert breaker.check(DEAD) is None


def test_half_open_lets_one_trial_through(breaker: DestinationBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.now += 29.5
    left = breaker.check(DEAD)
    assert left is not None and left.seconds_left == pytest.approx(0.5)
    assert fail(breaker) == [False]  # a dial already in flight changes nothing
    clock.now += 0.5
    assert breaker.check(DEAD) is None  # the trial
    assert breaker.check(DEAD) is not None  # everyone else still fails fast
    breaker.success(DEAD, "a")
    assert breaker.check(DEAD) is None and breaker.check(DEAD) is None  # closed: no trial


def test_a_failed_trial_opens_it_for_twice_as_long_up_to_the_cap(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    lengths = []
    for _ in range(6):
        refusal = breaker.check(DEAD)
        assert refusal is not None
        clock.now += refusal.seconds_left
        assert breaker.check(DEAD) is None  # the trial
        assert fail(breaker) == [True]
        reopened = breaker.check(DEAD)
        assert reopened is not None
        lengths.append(reopened.seconds_left)
    assert lengths == [60, 120, 240, 300, 300, 300]


def test_an_abandoned_trial_is_replaced(breaker: DestinationBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.now += 30
    assert breaker.check(DEAD) is None  # the trial; its session is cancelled, never reports
    clock.now += 29
    assert breaker.check(DEAD) is not None
    clock.now += 1
    assert breaker.check(DEAD) is None  # a new trial


def test_memory_is_bounded(clock: FakeClock) -> None:
    breaker = DestinationBreaker(BreakerSettings(capacity=2), now=clock)
    fail(breaker, 3)
    fail(breaker, 1, (ip("192.0.2.1"), 25))
    fail(breaker, 1, (ip("192.0.2.2"), 25))
    assert breaker.check(DEAD) is None  # the least recently used was forgotten
    for n in (1, 2, 3):
        breaker.success((ip(f"192.0.2.{n}"), 25), "b")
    fail(breaker, 1, (ip("192.0.2.1"), 25))
    assert not breaker.source_evidence((ip("192.0.2.1"), 25), "a")  # who reached it: forgotten
    assert breaker.source_evidence((ip("192.0.2.3"), 25), "a")


def test_source_evidence_needs_another_source_that_reached_it_lately(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    assert not breaker.source_evidence(DEAD, "a")  # never heard of
    breaker.success(DEAD, "a")
    fail(breaker)
    assert not breaker.source_evidence(DEAD, "a")  # only "a" itself reached it
    breaker.success(DEAD, "b")
    assert breaker.source_evidence(DEAD, "a")
    assert not breaker.source_evidence(DEAD, "a")  # each destination counts once a window
    clock.now += 61
    assert not breaker.source_evidence(DEAD, "a")  # "b" reached it too long ago
    breaker.success(DEAD, "b")
    assert breaker.source_evidence(DEAD, "a")


def test_rejections_open_the_source_site_path_only(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    rejected = [
        breaker.failure(DEAD, Failure.REJECTED, "421 4.7.0 [TSS04]", source="a", site="mx.big")
        for _ in range(3)
    ]
    assert rejected == [False, False, True]
    refusal = breaker.check(DEAD, "a", "mx.big")
    assert refusal is not None and refusal.source == "a"
    assert refusal.describe() == (
        'destination 192.0.2.66:25 is failing from source "a" (3 failures, the last: 421 4.7.0'
        " [TSS04]); not dialed again for 30s"
    )
    other_address = (ip("192.0.2.67"), 25)
    assert breaker.check(other_address, "a", "mx.big") is not None  # the whole site, for a
    assert breaker.check(DEAD, "b", "mx.big") is None  # the destination answers b
    assert breaker.check(DEAD) is None
    [listed] = breaker.open_breakers()  # for status: its last address and its source
    assert (listed.destination, listed.source, listed.failures) == (DEAD, "a", 3)
    breaker.success(other_address, "a", "mx.big")  # a got through again: the path closes
    assert breaker.check(DEAD, "a", "mx.big") is None


def test_a_rejection_without_a_site_keys_the_path_by_address(
    breaker: DestinationBreaker,
) -> None:
    for _ in range(3):
        breaker.failure(DEAD, Failure.REJECTED, "554 go away", source="a")
    assert breaker.check(DEAD, "a") is not None
    assert breaker.check(OTHER, "a") is None
    assert breaker.check(DEAD, "b") is None


def test_source_evidence_counts_each_site_once_whatever_its_addresses(
    breaker: DestinationBreaker,
) -> None:
    addresses = [(ip(f"192.0.2.{n}"), 25) for n in (1, 2, 3)]
    breaker.success(addresses[0], "b", "mx.big")
    assert breaker.source_evidence(addresses[1], "a", "mx.big")
    assert not breaker.source_evidence(addresses[2], "a", "mx.big")  # the same site
    breaker.success(addresses[0], "a", "mx.big")  # a reached it: its evidence is forgotten
    breaker.success(addresses[0], "b", "mx.big")
    assert breaker.source_evidence(addresses[2], "a", "mx.big")


def test_open_breakers_lists_open_and_half_open_destinations(
    breaker: DestinationBreaker, clock: FakeClock
) -> None:
    six: tuple[IPAddress, int] = (ip("2001:db8::25"), 25)
    fail(breaker, 2)  # two failures: still closed
    fail(breaker, 3, six)
    assert [(o.destination, o.seconds_left) for o in breaker.open_breakers()] == [(six, 30.0)]
    clock.advance(10)
    fail(breaker)  # the third within the window: open
    listed = {o.destination: o for o in breaker.open_breakers()}
    assert set(listed) == {DEAD, six}
    assert listed[DEAD].seconds_left == 30.0 and listed[six].seconds_left == 20.0
    assert (listed[DEAD].failures, listed[DEAD].last_kind) == (3, Failure.REFUSED)
    clock.advance(25)  # six is half-open (0 s left: its next dial is the trial)
    listed = {o.destination: o for o in breaker.open_breakers()}
    assert listed[six].seconds_left == 0.0
    breaker.success(six, "a")
    assert [o.destination for o in breaker.open_breakers()] == [DEAD]
