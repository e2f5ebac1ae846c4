"""MTA-STS policies in use are fetched again before they expire (RFC 8461 sections 3.3 and
5.1), on trio's fake clock: the refresher's schedule, not the fetch (that is end to end in
tests/integration/test_smtp_mta_sts.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio
import trio.testing

from egressd.config import Config
from egressd.net.mtasts import REFRESH_INTERVAL, run_refresher
from egressd.tlspolicy import CachedPolicy, MemoryPolicyStore, parse_policy

DAY = 86400.0


def policy(max_age: float) -> CachedPolicy:
    text = f"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: {int(max_age)}\n"
    return CachedPolicy(parse_policy(text), "id1", 0.0)


def config(mta_sts: bool = True) -> Config:
    base = Config(path=Path("egressd.toml"), sources={}, pools={})
    return replace(base, smtp=replace(base.smtp, tls=replace(base.smtp.tls, mta_sts=mta_sts)))


class Fetcher:
    """Records each refresh; a successful one stores the policy anew at that time."""

    def __init__(self, store: MemoryPolicyStore, works: bool = True) -> None:
        self.store, self.works = store, works
        self.times: list[tuple[str, float]] = []

    async def __call__(self, domain: str, current: Config) -> str:
        now = trio.current_time()
        self.times.append((domain, now))
        if self.works:
            entry = self.store.get(domain)
            assert entry is not None
            self.store.put(domain, replace(entry, fetched_at=now))
        return "done"


async def run_for(seconds: float, store: MemoryPolicyStore, fetcher: Fetcher, cfg: Config) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_refresher, lambda: cfg, store, trio.current_time, fetcher)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_a_policy_is_refreshed_a_day_before_it_expires_and_again_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryPolicyStore()
    store.put("week.example", policy(7 * DAY))
    store.put("hours.example", policy(6 * 3600))  # half-way: 3 h
    fetcher = Fetcher(store)
    await run_for(13 * DAY, store, fetcher, config())
    week = [t for d, t in fetcher.times if d == "week.example"]
    assert week == [6 * DAY, 12 * DAY]
    hours = [t for d, t in fetcher.times if d == "hours.example"]
    assert hours[:3] == [3 * 3600, 6 * 3600, 9 * 3600]


async def test_a_failing_refresh_is_retried_until_the_policy_expires_then_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryPolicyStore()
    store.put("down.example", policy(7 * DAY))
    fetcher = Fetcher(store, works=False)
    await run_for(9 * DAY, store, fetcher, config())
    times = [t for _, t in fetcher.times]
    assert times[0] == 6 * DAY and times[-1] == 7 * DAY - REFRESH_INTERVAL
    assert len(times) == DAY / REFRESH_INTERVAL


async def test_nothing_is_refreshed_with_mta_sts_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryPolicyStore()
    store.put("week.example", policy(7 * DAY))
    fetcher = Fetcher(store)
    await run_for(8 * DAY, store, fetcher, config(mta_sts=False))
    assert fetcher.times == []
