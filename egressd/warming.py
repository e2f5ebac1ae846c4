"""The warm-up's trio shell: the store opened at startup, flushed every few seconds.

Theory of operation
-------------------
:func:`open_warming` opens the state store (:mod:`egressd.state`) and builds the pure
engine (:class:`~egressd.warmup.Warmup`) from what it holds, when at least one source
follows a warm-up plan; without one, no database is opened at all. It runs once, at
startup, before any listener is bound: the few milliseconds of blocking SQLite work there
delay no connection, so it is called directly rather than in a thread. A database that
cannot be used raises :class:`~egressd.state.StateError` naming the file, and the daemon
does not start.

While the daemon runs, every connection asks the engine (in memory) and every relayed
transaction counts into it (in memory). :meth:`Warming.run_flusher` hands the engine's
batch to the store every ``[warmup] flush_interval`` (5 s), in a worker thread
(``trio.to_thread.run_sync``), and once more at shutdown: a crash loses at most one
interval's counts. A batch the store refuses (a full disk) is kept for the next flush and
logged.

:class:`WarmupClock` is the engine's clock: wall time plus :attr:`WarmupClock.offset`,
which only tests move (to let a day pass without sleeping through it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from egressd.config import Config
from egressd.log import get_logger
from egressd.state import Event, StateError, Store, open_store, state_directory
from egressd.warmup import Calendar, Warmup

__all__ = ["Warming", "WarmupClock", "open_warming", "outcome_of"]

log = get_logger("warmup")

HISTORY_DAYS = 7
"""How many days of counts a starting daemon reads back (the open day is what matters)."""


@dataclass
class WarmupClock:
    """Wall time plus ``offset`` seconds (a hook for tests only)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def log_event(event: Event) -> None:
    fields = {
        "source": event.source,
        "provider": event.provider,
        "change": event.kind,
        "step_from": event.step_from + 1,
        "step_to": event.step_to + 1,
        "reason": event.reason,
    }
    log.warning("warm-up %s", event.kind, extra={"fields": fields})


def outcome_of(code: int) -> str:
    """A final reply's code as a warm-up outcome: 2xx sent, 4xx deferred, 5xx rejected."""
    return "sent" if code < 400 else "deferred" if code < 500 else "rejected"


class Warming:
    """The engine with its store; the flusher writes the engine's changes."""

    def __init__(self, store: Store, engine: Warmup, clock: WarmupClock) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock

    async def flush(self) -> None:
        batch = self.engine.take_batch()
        if not batch:
            return
        try:
            await trio.to_thread.run_sync(self.store.write, batch)
        except StateError as exc:
            self.engine.give_back(batch)
            log.error("warm-up state not written, kept for the next flush: %s", exc)

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval`` until cancelled; the daemon flushes once more."""
        while True:
            await trio.sleep(self.engine.settings.flush_interval)
            await self.flush()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.flush()
            await trio.to_thread.run_sync(self.store.close)


def open_warming(
    config: Config, environ: Mapping[str, str] | None = None, clock: WarmupClock | None = None
) -> Warming | None:
    """The store and engine for ``config``, or None when no source warms up.

    Raises :class:`~egressd.state.StateError` (naming the file) when the store is unusable.
    """
    sources = config.warming_sources
    if not sources:
        return None
    clock = clock or WarmupClock()
    directory = state_directory(config.state.directory, os.environ if environ is None else environ)
    store = open_store(directory)
    try:
        since = Calendar.add_days(Calendar(config.warmup.timezone).day(clock()), -HISTORY_DAYS)
        snapshot = store.load(since, clock())
    except StateError:
        store.close()
        raise
    engine = Warmup(config.warmup, sources, clock, snapshot, on_event=log_event)
    log.info(
        "warm-up state loaded",
        extra={"fields": {"database": store.location, "sources": len(sources)}},
    )
    return Warming(store, engine, clock)
