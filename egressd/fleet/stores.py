"""The state store the daemon awaits: the embedded SQLite file in a thread, or Redis.

Theory of operation
-------------------
:class:`~egressd.state.Store` is asynchronous. :class:`ThreadedStore` is the thin trio
shell around a :class:`~egressd.state.BlockingStore` (the SQLite backend): every call runs
in a worker thread (``trio.to_thread.run_sync``), so the loop never waits on the disk; the
SQLite store's own lock keeps one call at a time on its connection.

:func:`open_state_store` opens the backend ``[state] backend`` names: ``"sqlite"``, the
file under ``[state] directory`` (created and upgraded as needed), or ``"redis"``, a
:class:`~egressd.state.redis.RedisStore` over the daemon's client
(:mod:`egressd.fleet.client`). A store that cannot be used raises
:class:`~egressd.state.StateError` naming it, and the daemon does not start.

**Startup with Redis down: refuse.** A starting daemon needs the warm-up progress and the
suspensions in force; starting from an empty snapshot would put every warming source back
on step 1 and forget every suspension (and its next flush could overwrite the fleet's
progress). So :func:`open_state_store` waits up to ``[state] startup_wait`` (10 s) for
Redis to answer, then raises :class:`~egressd.state.StateUnavailable`: ``egressd run``
logs why and exits 75 (EX_TEMPFAIL), which systemd restarts (only 78 is final). While it
is down the listeners are not bound, so MTAs get "connection refused" and keep their mail
queued: nothing is let through, and nothing stops silently. Only a daemon that keeps
state (a warming source, or shaping files: :func:`egressd.warming.state_wanted`) reads it
at startup; the others start and keep beating their heartbeats.
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
    StateUnavailable,
    Store,
    open_store,
    state_directory,
)
from egressd.state.redis import RedisCommands, RedisStore

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


async def reachable(client: RedisCommands, wait: float) -> None:
    """Return once Redis answers ``PING``; :class:`~egressd.state.StateUnavailable` after
    ``wait`` seconds without an answer (the daemon then exits 75 and systemd restarts it)."""
    with trio.move_on_after(wait):
        while True:
            try:
                await client.command("PING")
                return
            except StateError:
                await trio.sleep(0.25)
    raise StateUnavailable(
        f"{client.location}: unreachable for {wait:g} s at startup; refusing to start "
        "without the warm-up state ([state] startup_wait)"
    )


async def open_state_store(
    config: Config,
    environ: Mapping[str, str] | None = None,
    client: RedisCommands | None = None,
) -> Store:
    """The store ``[state]`` configures; StateError (naming it) when it cannot be used.
    ``backend = "redis"`` needs the daemon's Redis ``client``."""
    if config.state.backend == "redis":
        if client is None:
            raise StateError(f'{config.path}: [state] backend = "redis" but no client is open')
        await reachable(client, config.state.startup_wait)
        return RedisStore(client)
    directory = state_directory(config.state.directory, os.environ if environ is None else environ)
    return ThreadedStore(await trio.to_thread.run_sync(open_store, directory))
