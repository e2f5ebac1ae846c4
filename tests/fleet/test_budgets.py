"""Shared budgets through a real redis-server: the Lua ledger script, two nodes' shells,
an outage (local shares) and the reconciliation when Redis is back."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from redis_harness import RedisServer

from egressd.config import load_config
from egressd.fleet.budgets import FleetBudgets
from egressd.fleet.client import FleetClient, RedisUnavailable, open_client
from egressd.shaping.files import load_shaping_data
from egressd.shaping.ledger import GiveBackCells, Holding, SharedLedger, TakeCells
from egressd.shaping.policy import ShapingPolicy
from egressd.shaping.shaper import Lease, Refusal, Shaper
from egressd.shaping.sites import Destination
from egressd.shaping.throttle import Gcra, ThrottleSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

SITE = Destination("mx.big.example", "big.example", ("mx.big.example",))


def policy(text: str) -> ShapingPolicy:
    return ShapingPolicy.from_files(load_shaping_data("t.toml", tomllib.loads(text)), {})


class Node:
    """A shaper over a shared ledger, and its shell, as the executor and door use them."""

    def __init__(self, name: str, shaping: str, client: FleetClient, states: list[bool]) -> None:
        self.ledger = SharedLedger(name, prefix=client.key("budgets") + ":")
        self.shaper = Shaper(policy(shaping), trio.current_time, ledger=self.ledger)
        self.shell = FleetBudgets(
            self.ledger,
            client,
            lease_timeout=2.0,
            unavailable=(RedisUnavailable,),
            changed=states.append,
        )

    async def open(self) -> Lease | Refusal:
        holding = Holding()
        await self.shell.prepare_open(holding, self.shaper.limits("a", SITE).budgets)
        lease = self.shaper.open("a", SITE, holding)
        self.shell.settle(holding)
        return lease

    async def send(self, lease: Lease) -> Refusal | None:
        assert lease.holding is not None
        await self.shell.prepare_send(lease.holding, lease.limits.budgets)
        return lease.send()


@asynccontextmanager
async def client_for(tmp_path: Path, server: RedisServer) -> AsyncIterator[FleetClient]:
    path = tmp_path / "egressd.toml"
    path.write_text(f'[state]\nbackend = "redis"\nurl = "{server.url}"\nconnect_timeout = "1s"\n')
    async with open_client(load_config(path).state) as client:
        yield client


async def members(client: FleetClient, key: str) -> list[bytes]:
    return sorted(await client.command("ZRANGE", client.key("budgets", key), 0, -1))


LIMIT_KEY = "leases:connection_limit:a:mx.big.example:4"


async def test_two_nodes_share_a_connection_limit_and_a_rate_exactly(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    shaping = '["default"]\nconnection_limit = 4\nmax_message_rate = "100/min"\n'
    async with client_for(tmp_path, redis_server) as client:
        one, two = Node("n1", shaping, client, []), Node("n2", shaping, client, [])
        leases = [await node.open() for node in (one, two, one, two, one, two)]
        assert [isinstance(lease, Lease) for lease in leases] == [True] * 4 + [False] * 2
        refusal = leases[-1]
        assert isinstance(refusal, Refusal) and refusal.budget == "connection_limit"
        assert await members(client, LIMIT_KEY) == [b"n1:1", b"n1:2", b"n2:1", b"n2:2"]

        sent = 0
        for _ in range(70):
            for node, lease in ((one, leases[0]), (two, leases[1])):
                assert isinstance(lease, Lease)
                sent += await node.send(lease) is None
        assert sent == 100  # the burst of 100/min, shared, none more

        first = leases[0]
        assert isinstance(first, Lease)
        first.release()
        assert isinstance(await two.open(), Refusal)  # spare at node one
        await one.shell.flush()  # the next give-back
        assert isinstance(await two.open(), Lease)


async def test_a_dead_nodes_slots_come_back_after_the_lease_timeout(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    shaping = '["default"]\nconnection_limit = 4\n'
    async with client_for(tmp_path, redis_server) as client:
        one, two = Node("n1", shaping, client, []), Node("n2", shaping, client, [])
        for _ in range(4):
            assert isinstance(await one.open(), Lease)
        await one.shell.renew()
        assert isinstance(await two.open(), Refusal)
        # node one stops renewing (it died); within the lease timeout its slots are back
        with trio.fail_after(3):
            while isinstance(await two.open(), Refusal):
                await trio.sleep(0.1)


async def test_an_outage_gives_local_shares_and_the_return_reregisters(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    shaping = '["default"]\nconnection_limit = 4\n'
    async with client_for(tmp_path, redis_server) as client:
        states: list[bool] = []
        one, two = Node("n1", shaping, client, states), Node("n2", shaping, client, [])
        for node in (one, two, one):  # heartbeats: 2 nodes alive
            await node.shell.renew()
        assert one.shell.seen_nodes == 2
        before = await one.open()
        assert isinstance(before, Lease)

        redis_server.kill()
        during = await one.open()  # the call fails: local share of 4 / 2 nodes
        assert isinstance(during, Lease)
        assert states == [False]
        assert one.shell.status()["shared"] is False and one.shell.status()["nodes"] == 2
        refusal = await one.open()
        assert isinstance(refusal, Refusal) and "connection_limit 4 reached" in refusal.reason

        redis_server.start()  # empty: nothing persisted
        with trio.fail_after(10):
            while not one.shell.shared:
                await one.shell.probe()
                await trio.sleep(0.1)
        assert states == [False, True]
        registered = await members(client, LIMIT_KEY)  # both open connections of node one
        assert len(registered) == 2 and all(m.startswith(b"n1:") for m in registered)
        assert isinstance(await two.open(), Lease) and isinstance(await two.open(), Lease)
        assert isinstance(await two.open(), Refusal)


def cells_after(elapsed: float, wait_us: int, interval_ns: int) -> int:
    """How many cells a bucket found empty, its next cell ``wait_us`` away, emits in
    ``elapsed`` seconds."""
    elapsed_ns, wait_ns = int(elapsed * 1e9), wait_us * 1000
    return 0 if elapsed_ns < wait_ns else 1 + (elapsed_ns - wait_ns) // interval_ns


async def test_the_lua_gcra_allows_the_same_burst_as_the_in_process_one(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with client_for(tmp_path, redis_server) as client:
        for text in ("100/min", "5/h,max_burst=1", "1000/d,max_burst=10", "7/5m,max_burst=3"):
            spec = ThrottleSpec.parse(text)
            shell = FleetBudgets(SharedLedger("n"), client, unavailable=(RedisUnavailable,))
            key = client.key("gcra-test", text)
            granted = 0
            started = time.monotonic()
            while True:
                asked = time.monotonic()
                [(count, wait)] = await shell._exchange([TakeCells(key, spec, 1)])
                if not count:
                    break
                granted += count
            # Redis's clock runs on while the burst is taken: on a busy machine a 100/min
            # bucket (a cell every 0.6 s) may emit another cell before it is empty.
            emitted = int((time.monotonic() - started) * 1e9 // spec.interval_ns)
            bucket = Gcra(spec)
            in_process = 0
            while bucket.take(0) == 0:
                in_process += 1
            assert in_process == spec.burst, text
            assert spec.burst <= granted <= spec.burst + emitted, text
            assert 0 < wait <= spec.interval_ns // 1000, text  # µs until the next cell
            await shell._exchange([GiveBackCells(key, spec, 2)])
            [(again, _)] = await shell._exchange([TakeCells(key, spec, 5)])
            # Two given back, two to take, and no more than the cells emitted since the
            # bucket was found empty (its next one was due ``wait`` µs after that).
            later = cells_after(time.monotonic() - asked, wait, spec.interval_ns)
            assert 2 <= again <= 2 + later, (text, again, later)
