"""Heartbeats against a real redis-server: who is alive, workers of one node counted once,
a member that leaves or stops beating, and the fleet-wide suspensions in the view."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from redis_harness import RedisServer

from egressd.config.state import StateSettings, parse_redis_url
from egressd.fleet.client import FleetClient, open_client
from egressd.fleet.heartbeat import Heartbeats
from egressd.state import StateError


@asynccontextmanager
async def client_of(server: RedisServer, interval: float = 5.0) -> AsyncIterator[FleetClient]:
    settings = StateSettings(
        backend="redis", url=parse_redis_url(server.url), heartbeat_interval=interval
    )
    async with open_client(settings) as client:
        yield client


def member(client: FleetClient, node: str, worker: str | None = None) -> Heartbeats:
    return Heartbeats(
        client, node, "9.9", lambda: f"gen-{node}", lambda: {"ip-1": 2, "ip-2": 0}, worker=worker
    )


async def test_alive_nodes_counts_nodes_not_workers_and_drops_one_that_leaves(
    redis_server: RedisServer,
) -> None:
    async with client_of(redis_server) as client:
        a1, a2, b = member(client, "a", "1"), member(client, "a", "2"), member(client, "b")
        assert a1.alive_nodes() == 1  # before any read: this node alone
        for beat in (a1, a2, b):
            await beat.beat()
        await a1.beat()
        assert a1.alive_nodes() == 2
        assert [m.id for m in a1.view.members] == ["a/1", "a/2", "b"]
        record = a1.view.members[2]
        assert (record.version, record.generation, record.connections) == (
            "9.9",
            "gen-b",
            {"ip-1": 2},
        )
        await b.leave()
        await a1.beat()
        assert a1.alive_nodes() == 1
        assert a1.view.stale == ()  # left cleanly: not stale, gone


async def test_a_member_that_stops_beating_turns_stale_and_the_count_survives_an_outage(
    redis_server: RedisServer,
) -> None:
    # Records live 0.6 s (three intervals, a real Redis TTL): long enough that a busy
    # machine does not let b's expire between its beat and a's read of it.
    async with client_of(redis_server, interval=0.2) as client:
        a, b = member(client, "a"), member(client, "b")
        await b.beat()
        await a.beat()
        assert a.alive_nodes() == 2
        await trio.sleep(0.7)  # b's record has expired
        await a.beat()
        assert [stale_id for stale_id, _ in a.view.stale] == ["b"]
        assert a.alive_nodes() == 1
        await b.beat()
        await a.beat()
        assert a.alive_nodes() == 2
        redis_server.kill()
        with pytest.raises(StateError):
            await a.beat()
        assert a.alive_nodes() == 2  # the last count seen, for local shares in the outage


async def test_the_view_carries_the_fleet_wide_suspensions(redis_server: RedisServer) -> None:
    async with client_of(redis_server) as client:
        value = json.dumps({"until": 9e9, "reason": "TSS04"})
        await client.command("HSET", client.key("state", "suspensions"), "ip-1@provider:y", value)
        old = json.dumps({"until": 1.0, "reason": "over"})
        await client.command("HSET", client.key("state", "suspensions"), "ip-2", old)
        beat = member(client, "a")
        await beat.beat()
        assert beat.view.suspensions == (("ip-1@provider:y", 9e9, "TSS04"),)


async def test_the_view_carries_the_shared_budgets_held_fleet_wide(
    redis_server: RedisServer,
) -> None:
    async with client_of(redis_server) as client:
        seconds, micros = await client.command("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        lease = client.key("budgets", "leases", "connection_limit", "ip-1", "mx.test", "4")
        for holder, expiry in (("n1/1", now_ms + 30_000), ("n2/2", now_ms + 30_000)):
            await client.command("ZADD", lease, expiry, holder)
        await client.command("ZADD", lease, now_ms - 1000, "dead/3")  # its lease ran out
        gcra = client.key("budgets", "gcra", "max_message_rate", "ip-1", "mx.test", "100")
        await client.command("SET", gcra, (now_ms + 5000) * 1000)
        beat = member(client, "a")
        await beat.beat()
        assert beat.view.leases == (("budgets:leases:connection_limit:ip-1:mx.test:4", 2),)
        [(key, ahead_ms)] = beat.view.gcra
        assert key == "budgets:gcra:max_message_rate:ip-1:mx.test:100"
        assert 4000 < ahead_ms <= 5000
