"""The one narrow interface every state backend implements.

Theory of operation
-------------------
egressd keeps what must survive a restart (warm-up progress, the day's counts, the history
of changes, suspensions and operator overrides) behind :class:`Store`. The daemon reads a
:class:`~egressd.state.records.Snapshot` once at startup, counts in memory while it runs,
and hands the store a :class:`~egressd.state.records.Batch` every few seconds and at
shutdown: nothing on a connection's path waits for the store.

Four calls, each one round trip, so that a networked backend (Redis/Valkey, issue 16) fits
behind the same interface: ``load`` (a few reads), ``write`` (one transaction: ``MULTI``
with ``HSET``/``HINCRBY``/``LPUSH``), ``history`` (``LRANGE``) and ``close``. Counts in a
batch are increments, so several workers may add to the same day.

Every call is blocking and may take milliseconds; the daemon runs them in a worker thread
(``trio.to_thread.run_sync``). Failures raise :class:`StateError`, whose message names the
database.
"""

from __future__ import annotations

from typing import Protocol

from egressd.state.records import Batch, Event, Snapshot

__all__ = ["StateError", "Store"]


class StateError(Exception):
    """The state cannot be read or written; the message names the database and why."""


class Store(Protocol):
    """Durable state: warm-up progress, day counts, history, suspensions, overrides."""

    @property
    def location(self) -> str:
        """Where the state lives (a file name, a URL), for messages."""
        ...

    def load(self, since_day: str, now: float) -> Snapshot:
        """Every progress record, the counts of ``since_day`` and later, and the
        suspensions and overrides still in force at ``now``."""
        ...

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` all or nothing."""
        ...

    def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        """The newest ``limit`` events (of ``source``), newest first."""
        ...

    def close(self) -> None: ...
