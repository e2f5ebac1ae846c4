"""A fake clock and an in-memory store for the warm-up engine's tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from fake_clock import FakeClock

from egressd.config import WarmupPlan, WarmupSettings
from egressd.state import (
    Batch,
    BlockingStore,
    DayCount,
    Event,
    Override,
    Progress,
    Snapshot,
    Suspension,
)
from egressd.warmup import Warmup

DAY = 86400.0


def at(text: str) -> float:
    """Seconds since the epoch of an ISO time with its offset."""
    return dt.datetime.fromisoformat(text).timestamp()


@dataclass
class MemoryStore:
    """The BlockingStore interface in a few dictionaries (Warming awaits it through
    ThreadedStore, as it awaits the SQLite backend)."""

    progress: dict[tuple[str, str], Progress] = field(default_factory=dict)
    counts: dict[tuple[str, str, str], DayCount] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    suspensions: dict[str, Suspension] = field(default_factory=dict)
    overrides: dict[tuple[str, str], Override] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return "memory"

    def load(self, since_day: str, now: float) -> Snapshot:
        return Snapshot(
            progress=tuple(self.progress.values()),
            counts=tuple(c for c in self.counts.values() if c.day >= since_day),
            suspensions=tuple(s for s in self.suspensions.values() if s.until > now),
            overrides=tuple(o for o in self.overrides.values() if o.until > now),
        )

    def write(self, batch: Batch) -> None:
        for item in batch.progress:
            self.progress[(item.source, item.provider)] = item
        for count in batch.counts:
            key = (count.source, count.provider, count.day)
            old = self.counts.get(key, DayCount(*key))
            self.counts[key] = replace(
                old,
                sent=old.sent + count.sent,
                deferred=old.deferred + count.deferred,
                rejected=old.rejected + count.rejected,
                connected=old.connected + count.connected,
            )
        self.events.extend(batch.events)
        for scope in batch.lifted:
            self.suspensions.pop(scope, None)
        for suspension in batch.suspensions:
            self.suspensions[suspension.scope] = suspension
        for cleared in batch.cleared:
            self.overrides.pop(cleared, None)
        for override in batch.overrides:
            self.overrides[(override.scope, override.key)] = override

    def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        found = [e for e in self.events if source is None or e.source == source]
        return found[::-1][:limit]

    def close(self) -> None:
        pass


def _typed(store: MemoryStore) -> BlockingStore:
    return store  # mypy checks that MemoryStore implements the Protocol


def settings(**overrides: Any) -> WarmupSettings:
    plans = {
        "standard": WarmupPlan(days=(10, 20, 40), providers={"google": (5, 10)}),
    }
    values: dict[str, Any] = {"plans": plans, "min_messages": 10, **overrides}
    return WarmupSettings(**values)


def engine(
    clock: FakeClock,
    store: MemoryStore | None = None,
    events: list[Event] | None = None,
    **overrides: Any,
) -> Warmup:
    snapshot = store.load("0000-00-00", clock()) if store is not None else None
    sink = events if events is not None else []
    return Warmup(
        settings(**overrides),
        {"ip-1": "standard"},
        clock,
        snapshot,
        on_event=sink.append,
    )


def send(warmup: Warmup, count: int, provider: str = "other", outcome: str = "sent") -> None:
    for _ in range(count):
        warmup.record("ip-1", provider, outcome)


def step(warmup: Warmup, provider: str = "other") -> int | None:
    quota = warmup.quota("ip-1", provider)
    return quota.step if quota is not None else None
