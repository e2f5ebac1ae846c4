"""The warm-up quota counter op (``Q`` take, ``U`` give back) has one meaning in the Lua
script (real redis-server) and in the supervisor's book: both answer a run of ops exactly as
the model below, and the book's counter expires when the op said."""

from __future__ import annotations

from pathlib import Path

from redis_harness import RedisServer
from test_budgets import client_for

from egressd.fleet.budgets import FleetBudgets, encode
from egressd.fleet.client import RedisUnavailable
from egressd.fleet.quotas import FORCED
from egressd.hostbudgets import BudgetBook
from egressd.shaping.ledger import GiveBackCount, Op, SharedLedger, TakeCount

TTL = 60_000


def model(ops: list[Op]) -> list[tuple[int, int]]:
    """A counter per key that never passes the op's limit and is never below 0; a take
    answers what it added and the count after."""
    counts: dict[str, int] = {}
    out: list[tuple[int, int]] = []
    for op in ops:
        used = counts.get(op.store_key)
        if isinstance(op, TakeCount):
            granted = max(0, min(op.quantity, op.limit - (used or 0)))
            if granted:
                counts[op.store_key] = (used or 0) + granted
            out.append((granted, counts.get(op.store_key, 0)))
        elif isinstance(op, GiveBackCount):
            if used is not None:
                counts[op.store_key] = max(0, used - op.quantity)
            out.append((0, 0))
    return out


def script(key: str, other: str) -> list[Op]:
    return [
        TakeCount(key, 5, 2, TTL),
        TakeCount(key, 5, 2, TTL),
        TakeCount(key, 5, 2, TTL),  # one left: one granted
        TakeCount(key, 5, 1, TTL),  # full
        GiveBackCount(key, 3, TTL),
        TakeCount(key, 5, 10, TTL),  # the three given back, no more
        TakeCount(key, 4, 1, TTL),  # a lower quota (a step back) is full already
        TakeCount(key, FORCED, 2, TTL),  # sent without a ticket: counted anyway
        TakeCount(key, 5, 1, TTL),
        GiveBackCount(key, 100, TTL),  # never below 0
        TakeCount(key, 5, 5, TTL),
        TakeCount(key, 5, 0, TTL),  # a look
        GiveBackCount(other, 2, TTL),  # a counter that does not exist stays absent
        TakeCount(other, 3, 5, TTL),
    ]


def test_the_books_counter_answers_as_the_model_and_expires() -> None:
    ops = script("egressd:quota:a:other:2026-11-30", "egressd:quota:b:other:2026-11-30")
    book = BudgetBook()
    keys, args = encode(ops, 30_000)
    reply = book.run(1, keys, args, now_us=0)
    assert list(zip(reply[0::2], reply[1::2], strict=True)) == model(ops) != []
    key = "egressd:quota:a:other:2026-11-30"
    assert book.count(key, TTL - 1) == 5
    assert book.count(key, TTL) == 0  # expired with its day
    keys, args = encode([TakeCount(key, 5, 5, TTL)], 30_000)
    assert book.run(1, keys, args, now_us=TTL * 1000)[:1] == [5]


async def test_the_lua_counter_answers_as_the_model(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with client_for(tmp_path, redis_server) as client:
        shell = FleetBudgets(SharedLedger("n"), client, unavailable=(RedisUnavailable,))
        key, other = client.key("quota", "a"), client.key("quota", "b")
        ops = script(key, other)
        assert await shell._exchange(ops) == model(ops)
        ttl = await client.command("PTTL", key)
        assert 0 < int(ttl) <= TTL
