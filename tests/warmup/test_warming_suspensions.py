"""The daemon shell's flush writes the shaper's suspensions and lifts the ended ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fake_clock import FakeClock
from warmup_helpers import MemoryStore, engine

from egressd.fleet.stores import ThreadedStore
from egressd.shaping import Destination, Shaper, ShapingPolicy
from egressd.shaping.files import load_shaping_data
from egressd.shaping.shaper import Override
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


RULES: dict[str, Any] = {
    "provider": {
        "yahoo": {
            "match": [{"MXSuffix": ".yahoodns.test"}],
            "automation": [
                {
                    "regex": r"\[TS02\]",
                    "action": {"SetConfig": {"name": "max_message_rate", "value": "10/h"}},
                    "duration": "2h",
                }
            ],
        }
    }
}


def rules_policy(rules: Mapping[str, Any]) -> ShapingPolicy:
    return ShapingPolicy.from_files(load_shaping_data("rules.toml", rules), {})


def fire_ts02(shaper: Shaper) -> None:
    destination = Destination("mta5.am0.yahoodns.test", "yahoo.test", ("mta5.am0.yahoodns.test",))
    [effect] = shaper.reply("ip-1", destination, "421 4.7.0 [TS02] slow down")
    assert effect.scope == ("ip-1", "provider", "yahoo")


async def test_overrides_are_written_restored_with_their_expiry_and_cleared() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore()
    shaper = Shaper(rules_policy(RULES), clock)
    wall = WarmupClock()
    warming = Warming(ThreadedStore(store), engine(clock), wall)
    warming.attach_shaper(lambda: shaper)
    fire_ts02(shaper)
    await warming.flush()
    [stored] = store.overrides.values()
    assert (stored.scope, stored.key) == ("ip-1@provider:yahoo", "max_message_rate")
    assert 7190 < stored.until - wall() <= 7200 and "TS02" in stored.reason

    restarted = Shaper(rules_policy(RULES), FakeClock(5.0))
    snapshot = store.load("0000-00-00", wall())
    again = Warming(ThreadedStore(MemoryStore()), engine(clock), wall, overrides=snapshot.overrides)
    again.attach_shaper(lambda: restarted)
    [restored] = restarted.active()
    assert isinstance(restored, Override)
    assert restored.scope == ("ip-1", "provider", "yahoo") and restored.name == "max_message_rate"
    assert 7190 < restored.until - 5.0 <= 7200
    assert str(restored.params.values["max_message_rate"].value) == str(
        next(iter(shaper.overrides.values())).params.values["max_message_rate"].value
    )

    clock.advance(7201.0)  # the override ends: the next flush clears it
    await warming.flush()
    assert store.overrides == {}


async def test_an_override_whose_rule_is_gone_is_not_restored() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore()
    shaper = Shaper(rules_policy(RULES), clock)
    warming = Warming(ThreadedStore(store), engine(clock), WarmupClock())
    warming.attach_shaper(lambda: shaper)
    fire_ts02(shaper)
    await warming.flush()
    restarted = Shaper(policy(), FakeClock(5.0))  # the shaping files lost the rule
    overrides = tuple(store.overrides.values())
    again = Warming(ThreadedStore(MemoryStore()), engine(clock), WarmupClock(), overrides=overrides)
    again.attach_shaper(lambda: restarted)
    assert restarted.active() == []
