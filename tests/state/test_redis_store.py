"""The Redis backend beyond the contract: its keys stay under the prefix, and a batch the
server did not confirm is kept and applied exactly once (a real redis-server killed, or
stopped so that the script runs after the client gave up)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from redis_harness import RedisServer

from egressd.config.state import StateSettings, parse_redis_url
from egressd.fleet.client import FleetClient, open_client
from egressd.state import Batch, DayCount, Event, StateError, StateKept, Suspension
from egressd.state.redis import RedisStore

DAY = "2026-11-30"


def counts(sent: int) -> Batch:
    return Batch(counts=(DayCount("ip-1", "google", DAY, sent=sent),))


@asynccontextmanager
async def client_of(server: RedisServer, prefix: str = "egressd") -> AsyncIterator[FleetClient]:
    settings = StateSettings(
        backend="redis",
        url=parse_redis_url(server.url),
        prefix=prefix,
        connect_timeout=0.3,
        command_timeout=0.3,
    )
    async with open_client(settings) as client:
        yield client


async def sent_on_day(client: FleetClient) -> int:
    snapshot = await RedisStore(client).load(DAY, 0.0)
    return sum(c.sent for c in snapshot.counts)


async def test_every_key_is_under_the_prefix_and_two_prefixes_do_not_mix(
    redis_server: RedisServer,
) -> None:
    async with client_of(redis_server, "fleet-a") as a, client_of(redis_server, "fleet-b") as b:
        await RedisStore(a).write(
            Batch(
                counts=(DayCount("ip-1", "google", DAY, sent=3),),
                events=(Event(1.0, "ip-1", "google", "held", 0, 0, "x"),),
                suspensions=(Suspension("ip-1@provider:google", 9e9, "r"),),
            )
        )
        await RedisStore(b).write(counts(5))
        keys = sorted(k.decode() for k in await a.command("KEYS", "*"))
        assert all(k.startswith(("fleet-a:state:", "fleet-b:state:")) for k in keys), keys
        assert "fleet-a:state:counts:2026-11-30" in keys
        assert (await sent_on_day(a), await sent_on_day(b)) == (3, 5)
        assert await RedisStore(b).history() == []


async def test_a_write_while_redis_is_down_is_kept_and_applied_with_the_next(
    redis_server: RedisServer,
) -> None:
    async with client_of(redis_server) as client:
        store = RedisStore(client)
        await store.write(counts(1))
        redis_server.kill()
        with pytest.raises(StateKept, match="kept for the next write"):
            await store.write(counts(10))
        with pytest.raises(StateKept):
            await store.write(counts(100))
        assert len(store.pending) == 2
        redis_server.start()  # empty: no persistence
        await _eventually_written(store, counts(1000))
        assert store.pending == []
        assert await sent_on_day(client) == 1110


async def test_a_batch_applied_after_the_client_gave_up_is_not_counted_twice(
    redis_server: RedisServer,
) -> None:
    async with client_of(redis_server) as client:
        store = RedisStore(client)
        await store.write(counts(1))
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StateKept):
                await store.write(counts(10))  # sent; the server runs it once it resumes
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        with trio.fail_after(5):  # the ambiguous case: applied, though the client gave up
            while await _sent_or_none(client) != 11:
                await trio.sleep(0.05)
        assert len(store.pending) == 1
        await _eventually_written(store, counts(100))
        assert await sent_on_day(client) == 111


async def _eventually_written(store: RedisStore, batch: Batch) -> None:
    """Write ``batch`` (and what is kept), retrying while the client reconnects."""
    with trio.fail_after(5):
        while True:
            try:
                await store.write(batch)
                return
            except StateKept:
                batch = Batch()
                await trio.sleep(0.05)


async def _sent_or_none(client: FleetClient) -> int | None:
    try:
        return await sent_on_day(client)
    except StateError:  # the client is still reconnecting
        return None
