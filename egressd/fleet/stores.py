"""The state store the daemon awaits: the embedded SQLite file in a thread, or Redis.

Theory of operation
-------------------
:class:`~egressd.state.Store` is asynchronous. :class:`ThreadedStore` is the thin trio
shell around a :class:`~egressd.state.BlockingStore` (the SQLite backend): every call runs
in a worker thread (``trio.to_thread.run_sync``), so the loop never waits on the disk; the
SQLite store's own lock keeps one call at a time on its connection.

:func:`open_state_store` opens the backend ``[state] backend`` names: ``"sqlite"``, the
file under ``[state] directory`` (created and upgraded as needed). A store that cannot be
used raises :class:`~egressd.state.StateError` naming the file, and the daemon does not
start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import trio

from egressd.config import Config
from egressd.state import (
    Batch,
    BlockingStore,
    Event,
    Snapshot,
    StateError,
    Store,
    open_store,
    state_directory,
)

__all__ = ["ThreadedStore", "open_state_store"]


class ThreadedStore:
    """:class:`~egressd.state.Store` over a blocking one, each call in a worker thread."""

    def __init__(self, inner: BlockingStore) -> None:
        self.inner = inner

    @property
    def location(self) -> str:
        return self.inner.location

    async def load(self, since_day: str, now: float) -> Snapshot:
        return await trio.to_thread.run_sync(self.inner.load, since_day, now)

    async def write(self, batch: Batch) -> None:
        await trio.to_thread.run_sync(self.inner.write, batch)

    async def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        return await trio.to_thread.run_sync(self.inner.history, source, limit)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.inner.close)


async def open_state_store(config: Config, environ: Mapping[str, str] | None = None) -> Store:
    """The store ``[state]`` configures; StateError (naming it) when it cannot be used."""
    if config.state.backend != "sqlite":
        raise StateError(f'[state] backend = "{config.state.backend}" is not wired yet')
    directory = state_directory(config.state.directory, os.environ if environ is None else environ)
    return ThreadedStore(await trio.to_thread.run_sync(open_store, directory))
