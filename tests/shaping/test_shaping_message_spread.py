"""A message-rate budget spreads an MTA's backlog over time: the shaper on a fake clock.

An MTA with a backlog asks for a message every ``every`` ms for a simulated minute, through
``Lease.send()``, and sends as many as it is given each time. What ``"limit/period"`` with
KumoMTA's ``max_burst`` promises (see :mod:`egressd.shaping.throttle`), written out without
the GCRA's theoretical arrival time:

- message ``m`` (counting from 0) is due at ``max(0, m - burst + 1) * T``, ``T`` being the
  emission interval ``period / limit``: the burst at once, then one per interval;
- the MTA sends it at its first ask at or after that time, so over a window whose last ask
  is at ``t`` it sends exactly ``burst + floor(t / T)`` messages (a burst of 2 or more
  absorbs the lateness of an ask that does not fall on a due time);
- a refusal's ``retry_after`` is the time left until the next message is due;
- in no window of length ``L`` are more than ``burst + floor(L / T)`` messages accepted.

The same holds for ``source_selection_rate`` and for the ``provider_*`` forms, which one
source's messages to every site of the provider share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from fake_clock import FakeClock
from shaping_helpers import policy_from

from egressd.shaping.shaper import Lease, Refusal, Shaper
from egressd.shaping.sites import Destination

GMAIL = Destination(
    "alt1?.gmail-smtp-in.l.google.com",
    "gmail.com",
    ("gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"),
)
WORKSPACE = Destination("aspmx.l.google.com", "corp.example", ("aspmx.l.google.com",))

MINUTE_MS = 60_000


@dataclass
class Asks:
    """What an MTA asking every ``every`` ms was given: accepted and refused ask times (ms)."""

    accepted: list[int] = field(default_factory=list)
    refusals: list[tuple[int, Refusal]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)


def ask_every(clock: FakeClock, leases: Sequence[Lease], every: int, until: int) -> Asks:
    """At each ask, send messages (on ``leases`` in turn) until one is refused."""
    asks = Asks()
    turn = 0
    for now in range(0, until, every):
        clock.now = now / 1000  # set, not advanced: no float drift over a minute
        while True:
            lease = leases[turn % len(leases)]
            refusal = lease.send()
            if refusal is not None:
                asks.refusals.append((now, refusal))
                break
            asks.accepted.append(now)
            asks.sites.append(lease.destination.site)
            turn += 1
    return asks


@dataclass(frozen=True)
class Rate:
    """What a throttle promises, written out by hand (not read from ThrottleSpec)."""

    burst: int
    interval_ms: int

    def due_ms(self, message: int) -> int:
        """When message number ``message`` (from 0) is due, in ms."""
        return max(0, message - self.burst + 1) * self.interval_ms


def first_ask_at_or_after(due: int, every: int) -> int:
    return -(-due // every) * every


def assert_spread(asks: Asks, rate: Rate, every: int, budget: str) -> None:
    last_ask = (MINUTE_MS - 1) // every * every
    count = rate.burst + last_ask // rate.interval_ms
    assert asks.accepted[: rate.burst] == [0] * rate.burst
    assert asks.accepted == [first_ask_at_or_after(rate.due_ms(m), every) for m in range(count)]
    assert len(asks.accepted) == count
    assert_never_more_than_allowed(asks.accepted, rate)
    assert asks.refusals, "the MTA never waited"
    for now, refusal in asks.refusals:
        sent_before = sum(1 for t in asks.accepted if t <= now)
        assert refusal.budget == budget
        assert refusal.retry_after == pytest.approx(
            (rate.due_ms(sent_before) - now) / 1000, abs=1e-9
        ), (now, refusal.reason)
        assert f"next in {refusal.retry_after:.3g}s" in refusal.reason


def assert_never_more_than_allowed(accepted: list[int], rate: Rate) -> None:
    for first in range(len(accepted)):
        for last in range(first, len(accepted)):
            length = accepted[last] - accepted[first]
            assert last - first + 1 <= rate.burst + length // rate.interval_ms, (first, last)


SPREADS = [
    # (throttle, what it promises, the MTA asks every ms); KumoMTA's max_burst=N allows
    # N + 1 at once (redis-cell's burst), and no max_burst allows the whole limit at once
    ("60/min", Rate(60, 1000), 250),
    ("60/min,max_burst=1", Rate(2, 1000), 250),
    ("60/min,max_burst=1", Rate(2, 1000), 70),  # asks that miss every due time
    ("60/min,max_burst=9", Rate(10, 1000), 300),
    ("5/s,max_burst=1", Rate(2, 200), 30),  # the integration test's rate
    ("600/h,max_burst=3", Rate(4, 6000), 1000),
]


@pytest.mark.parametrize(("throttle", "rate", "every"), SPREADS)
@pytest.mark.parametrize("key", ["max_message_rate", "source_selection_rate"])
def test_a_rate_gives_the_burst_at_once_then_one_per_interval(
    key: str, throttle: str, rate: Rate, every: int
) -> None:
    clock = FakeClock()
    policy = policy_from(f'["default"]\n{key} = "{throttle}"')
    shaper = Shaper(policy, clock)
    lease = shaper.open("ip-1", GMAIL)
    assert isinstance(lease, Lease), lease
    asks = ask_every(clock, [lease], every, MINUTE_MS)
    assert_spread(asks, rate, every, key)


@pytest.mark.parametrize("key", ["provider_max_message_rate", "provider_source_selection_rate"])
def test_a_provider_rate_spreads_one_sources_messages_to_all_its_sites(key: str) -> None:
    clock = FakeClock()
    text = f"""
["default"]
max_deliveries_per_connection = 9999
[provider."google"]
match = [{{ MXSuffix = ".google.com" }}]
{key} = "60/min,max_burst=1"
"""
    shaper = Shaper(policy_from(text), clock)
    leases = [shaper.open("ip-1", GMAIL), shaper.open("ip-1", WORKSPACE)]
    assert all(isinstance(lease, Lease) for lease in leases), leases
    asks = ask_every(clock, leases, 250, MINUTE_MS)  # type: ignore[arg-type]
    assert_spread(asks, Rate(2, 1000), 250, key)
    assert set(asks.sites) == {GMAIL.site, WORKSPACE.site}
    # another source has its own provider budget
    other = shaper.open("ip-2", WORKSPACE)
    assert isinstance(other, Lease), other
    assert other.send() is None


def test_per_path_rates_are_per_site() -> None:
    clock = FakeClock()
    policy = policy_from('["default"]\nmax_message_rate = "60/min,max_burst=1"\n')
    shaper = Shaper(policy, clock)
    leases = [shaper.open("ip-1", GMAIL), shaper.open("ip-1", WORKSPACE)]
    assert all(isinstance(lease, Lease) for lease in leases), leases
    asks = ask_every(clock, leases, 250, 250)  # type: ignore[arg-type]
    assert asks.accepted == [0, 0, 0, 0]  # each site's burst of 2
    assert asks.refusals[0][1].retry_after == pytest.approx(1.0)


def test_a_burst_of_one_does_not_bank_the_lateness_of_an_ask() -> None:
    # "1/s" has a burst of 1 (max_burst is at most limit - 1): a message sent 200 ms after
    # it was due moves the next due time 200 ms later too, so asks every 300 ms get one
    # message every 1.2 s, fewer than one per second: never more
    clock = FakeClock()
    shaper = Shaper(policy_from('["default"]\nmax_message_rate = "1/s"\n'), clock)
    lease = shaper.open("ip-1", GMAIL)
    assert isinstance(lease, Lease), lease
    asks = ask_every(clock, [lease], 300, 6000)
    assert asks.accepted == [0, 1200, 2400, 3600, 4800]
    assert [r.retry_after for t, r in asks.refusals[:4]] == pytest.approx([1.0, 0.7, 0.4, 0.1])
    assert_never_more_than_allowed(asks.accepted, Rate(1, 1000))


def test_check_open_of_a_spent_selection_rate_says_when_the_next_message_is_due() -> None:
    clock = FakeClock()
    policy = policy_from('["default"]\nsource_selection_rate = "60/min,max_burst=1"\n')
    shaper = Shaper(policy, clock)
    lease = shaper.open("ip-1", GMAIL)
    assert isinstance(lease, Lease), lease
    clock.now = 0.0
    assert [lease.send(), lease.send()] == [None, None]
    clock.now = 0.4
    refusal = shaper.check_open("ip-1", GMAIL)
    assert refusal is not None
    assert refusal.budget == "source_selection_rate"
    assert refusal.retry_after == pytest.approx(0.6)
    clock.now = 1.0
    assert shaper.check_open("ip-1", GMAIL) is None
