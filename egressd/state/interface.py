"""The one narrow interface every state backend implements.

Theory of operation
-------------------
egressd keeps what must survive a restart (warm-up progress, the day's counts, the history
of changes, suspensions and operator overrides) behind :class:`Store`. The daemon reads a
:class:`~egressd.state.records.Snapshot` once at startup, counts in memory while it runs,
and hands the store a :class:`~egressd.state.records.Batch` every few seconds and at
shutdown: nothing on a connection's path waits for the store.

Four calls, each a round trip or two, so that a networked backend fits behind the same
interface: ``load`` (a few reads), ``write`` (one transaction: SQLite's ``BEGIN
IMMEDIATE``, or one atomic Lua script of ``HSET``/``HINCRBY``/``LPUSH`` in Redis),
``history`` (``LRANGE``) and ``close``. Counts in a batch are increments, so several
workers and nodes may add to the same day.

:class:`Store` is asynchronous: the daemon awaits it from its trio loop. A backend whose
calls block (:class:`BlockingStore`: the embedded SQLite file, a test's dictionaries)
runs behind a thread shell (:class:`egressd.fleet.stores.ThreadedStore`,
``trio.to_thread.run_sync``); the Redis backend (:mod:`egressd.state.redis`) awaits its
client directly. Neither this package nor its backends import trio: a coroutine needs no
event loop to be written. Failures raise :class:`StateError`, whose message names the
database (or the server).
"""

from __future__ import annotations

from typing import Protocol

from egressd.state.records import Batch, Event, Snapshot

__all__ = ["BlockingStore", "StateError", "StateKept", "StateUnavailable", "Store"]


class StateError(Exception):
    """The state cannot be read or written; the message names the database and why."""


class StateUnavailable(StateError):
    """The backend cannot be reached now (a server down): unlike a corrupt file, this may
    heal by itself, so a daemon that cannot start because of it may be restarted."""


class StateKept(StateError):
    """:meth:`Store.write` could not confirm the batch, and the store keeps it: it goes with
    the next write, applied exactly once. The caller must NOT give the batch back."""


class Store(Protocol):
    """Durable state: warm-up progress, day counts, history, suspensions, overrides."""

    @property
    def location(self) -> str:
        """Where the state lives (a file name, a URL), for messages."""
        ...

    async def load(self, since_day: str, now: float) -> Snapshot:
        """Every progress record, the counts of ``since_day`` and later, and the
        suspensions and overrides still in force at ``now``."""
        ...

    async def write(self, batch: Batch) -> None:
        """Apply ``batch`` all or nothing. :class:`StateError`: nothing was applied and the
        caller keeps the batch; :class:`StateKept`: the store keeps it (see there)."""
        ...

    async def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        """The newest ``limit`` events (of ``source``), newest first."""
        ...

    async def close(self) -> None: ...


class BlockingStore(Protocol):
    """:class:`Store` with blocking calls (SQLite): the daemon runs it in a thread."""

    @property
    def location(self) -> str: ...

    def load(self, since_day: str, now: float) -> Snapshot: ...

    def write(self, batch: Batch) -> None: ...

    def history(self, source: str | None = None, limit: int = 50) -> list[Event]: ...

    def close(self) -> None: ...
