"""The daemon shell's flush writes the shaper's suspensions and lifts the ended ones."""

from __future__ import annotations

from fake_clock import FakeClock
from warmup_helpers import MemoryStore, engine

from egressd.fleet.stores import ThreadedStore
from egressd.shaping import Shaper, ShapingPolicy
from egressd.shaping.files import load_shaping_data
from egressd.warming import Warming, WarmupClock, scope_key, scope_of


def policy() -> ShapingPolicy:
    return ShapingPolicy.from_files(load_shaping_data("t.toml", {}), {})


async def test_suspensions_are_written_lifted_and_restored() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore()
    shaper = Shaper(policy(), clock)
    wall = WarmupClock()
    warming = Warming(ThreadedStore(store), engine(clock), wall)
    warming.attach_shaper(lambda: shaper)
    shaper.suspend(("ip-1", "provider", "yahoo"), 7200.0, "TSS04")
    await warming.flush()
    [stored] = store.suspensions.values()
    assert stored.scope == "ip-1@provider:yahoo" and stored.reason == "TSS04"
    assert 7190 < stored.until - wall() <= 7200

    restarted = Shaper(policy(), FakeClock(5.0))
    again = Warming(ThreadedStore(MemoryStore()), engine(clock), wall, (stored,))
    again.attach_shaper(lambda: restarted)
    [restored] = restarted.active()
    assert restored.scope == ("ip-1", "provider", "yahoo") and restored.reason == "TSS04"
    assert 7190 < restored.until - 5.0 <= 7200

    shaper.resume(("ip-1", "provider", "yahoo"))
    await warming.flush()
    assert store.suspensions == {}


def test_scope_keys_round_trip() -> None:
    for scope in [("a", "provider", "google"), ("b@x", "site", "(mx1|mx2).example.com")]:
        assert scope_of(scope_key(scope)) == scope  # type: ignore[arg-type]
    assert scope_of("just-a-source") is None
