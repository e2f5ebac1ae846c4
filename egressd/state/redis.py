"""The Redis/Valkey backend of :class:`~egressd.state.Store`, shared by a fleet.

Theory of operation
-------------------
Keys (``P`` is ``[state] prefix``; a field or value in JSON is written ``json(...)``):

=================================  ======  =================================================
``P:state:progress``               hash    ``json([source, provider])`` -> json(Progress)
``P:state:counts:DAY``             hash    ``json([source, provider, kind])`` -> count
                                           (``HINCRBY``; kept 90 days)
``P:state:days``                   zset    every DAY with counts (score 0, read by lex range)
``P:state:events``                 list    json(Event), newest first, the last 10,000
``P:state:events:SOURCE``          list    the same, of one source
``P:state:suspensions``            hash    scope -> json({until, reason})
``P:state:overrides``              hash    ``json([scope, key])`` -> json({value, until, reason})
``P:state:mta_sts``                hash    domain -> json(StsPolicy) (a cached MTA-STS policy)
``P:state:applied:ID``             string  a batch ID already applied (kept 7 days)
=================================  ======  =================================================

Counts are ``HINCRBY`` increments, so every node and worker adds to the same day.

**A batch is applied exactly once.** Each batch gets a random ID and is applied by one
Lua script (atomic, like ``MULTI``/``EXEC``, but able to skip): ``SET P:state:applied:ID
NX`` first, then the batch's commands only when that ``SET`` succeeded. A write that fails
(Redis down, a timeout, a connection lost after the script was sent) leaves the batch here,
in :attr:`RedisStore.pending`, and raises :class:`~egressd.state.StateKept`: the caller
must not give the batch back. The next write sends the kept batches first, each with its
own ID, in the same script call: one that had been applied after all (the ambiguous case)
is skipped, one that had not is applied now. Nothing is lost or counted twice, as long as
the outage is shorter than the 7 days an ID is remembered. What is lost: the kept batches
of a process that stops while Redis is still down (logged with their counts by the
daemon at shutdown).

:meth:`RedisStore.load` reads in two transactions (progress, days, suspensions and
overrides; then the counts of each day since ``since_day``), so it sees a consistent state.

The client is injected (:class:`RedisCommands`: :class:`egressd.fleet.client.FleetClient`
in the daemon); this module imports neither trio nor a Redis library. The script assumes
one Redis (or one Valkey primary), not a cluster: its keys are named inside the script.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from egressd.state.interface import StateError, StateKept
from egressd.state.records import (
    Batch,
    DayCount,
    Event,
    Override,
    Progress,
    Snapshot,
    StsPolicy,
    Suspension,
)

__all__ = ["APPLY_SCRIPT", "RedisCommands", "RedisStore", "batch_commands"]

COUNT_KINDS = ("sent", "deferred", "rejected", "connected")
DAYS_KEPT = 90 * 86400
APPLIED_KEPT = 7 * 86400
EVENTS_KEPT = 10_000

APPLY_SCRIPT = """
local batches = cjson.decode(ARGV[1])
local applied = 0
for _, batch in ipairs(batches) do
    if redis.call('SET', batch[1], '1', 'NX', 'EX', ARGV[2]) then
        for _, command in ipairs(batch[2]) do
            redis.call(unpack(command))
        end
        applied = applied + 1
    end
end
return applied
"""
"""ARGV[1]: json([[applied-key, [[command, arg...], ...]], ...]); ARGV[2]: the applied
key's lifetime. Returns how many batches it applied (the others were applied before)."""

Command = list[str]


class RedisCommands(Protocol):
    """What the store needs of a Redis client (:class:`egressd.fleet.client.FleetClient`).

    Every call raises a :class:`~egressd.state.StateError` naming the server on failure.
    """

    @property
    def location(self) -> str: ...

    def key(self, *parts: str) -> str: ...

    async def command(self, *args: str | bytes | int | float) -> Any: ...

    async def script(
        self, source: str, keys: Sequence[str | bytes | int | float], args: Sequence[Any]
    ) -> Any: ...

    async def transaction(self, commands: Sequence[Sequence[str | bytes | int | float]]) -> Any: ...


class RedisStore:
    """:class:`~egressd.state.Store` in Redis under ``[state] prefix``."""

    def __init__(self, client: RedisCommands) -> None:
        self.client = client
        self.pending: list[tuple[str, list[Command]]] = []
        """Batches not yet known to be applied: (applied key, commands), oldest first."""

    @property
    def location(self) -> str:
        return f"{self.client.location} (prefix {self.client.key('')[:-1]})"

    def _key(self, *parts: str) -> str:
        return self.client.key("state", *parts)

    # ------------------------------------------------------------------ write

    async def write(self, batch: Batch) -> None:
        if batch:
            applied_key = self._key("applied", uuid.uuid4().hex)
            self.pending.append((applied_key, batch_commands(batch, self._key)))
        if not self.pending:
            return
        payload = json.dumps(self.pending, separators=(",", ":"))
        try:
            await self.client.script(APPLY_SCRIPT, [], [payload, str(APPLIED_KEPT)])
        except StateError as exc:
            raise StateKept(
                f"{exc}; {len(self.pending)} batch(es) kept for the next write"
            ) from None
        self.pending = []

    # ------------------------------------------------------------------ read

    async def load(self, since_day: str, now: float) -> Snapshot:
        progress, days, suspensions, overrides, mta_sts = await self.client.transaction(
            [
                ["HGETALL", self._key("progress")],
                ["ZRANGEBYLEX", self._key("days"), f"[{since_day}", "+"],
                ["HGETALL", self._key("suspensions")],
                ["HGETALL", self._key("overrides")],
                ["HGETALL", self._key("mta_sts")],
            ]
        )
        day_names = [_text(day) for day in days or []]
        per_day = []
        if day_names:
            per_day = await self.client.transaction(
                [["HGETALL", self._key("counts", day)] for day in day_names]
            )
        return Snapshot(
            progress=_progress(_pairs(progress)),
            counts=_counts(zip(day_names, per_day, strict=True)),
            suspensions=_suspensions(_pairs(suspensions), now),
            overrides=_overrides(_pairs(overrides), now),
            mta_sts=_policies(_pairs(mta_sts), now),
        )

    async def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        key = self._key("events") if source is None else self._key("events", source)
        rows = await self.client.command("LRANGE", key, 0, limit - 1)
        return [Event(**json.loads(row)) for row in rows or []]

    async def close(self) -> None:
        """Nothing to release (the client is the daemon's); kept batches are lost."""


# --------------------------------------------------------------------------- encoding


def batch_commands(batch: Batch, key: Any) -> list[Command]:
    """The Redis commands that apply ``batch``; ``key(*parts)`` names a state key."""
    commands: list[Command] = []
    for item in batch.progress:
        commands.append(["HSET", key("progress"), _field(item.source, item.provider), _json(item)])
    for day in sorted({count.day for count in batch.counts}):
        commands.append(["ZADD", key("days"), "0", day])
    for count in batch.counts:
        day_key = key("counts", count.day)
        for kind in COUNT_KINDS:
            amount = getattr(count, kind)
            if amount:
                field = _field(count.source, count.provider, kind)
                commands.append(["HINCRBY", day_key, field, str(amount)])
        commands.append(["EXPIRE", day_key, str(DAYS_KEPT)])
    for event in batch.events:
        for events_key in (key("events"), key("events", event.source)):
            commands.append(["LPUSH", events_key, _json(event)])
            commands.append(["LTRIM", events_key, "0", str(EVENTS_KEPT - 1)])
    for scope in batch.lifted:
        commands.append(["HDEL", key("suspensions"), scope])
    for suspension in batch.suspensions:
        value = json.dumps({"until": suspension.until, "reason": suspension.reason})
        commands.append(["HSET", key("suspensions"), suspension.scope, value])
    for scope, name in batch.cleared:
        commands.append(["HDEL", key("overrides"), _field(scope, name)])
    for override in batch.overrides:
        value = json.dumps(
            {"value": override.value, "until": override.until, "reason": override.reason}
        )
        commands.append(["HSET", key("overrides"), _field(override.scope, override.key), value])
    for policy in batch.mta_sts:
        commands.append(["HSET", key("mta_sts"), policy.domain, _json(policy)])
    return commands


def _field(*parts: str) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


def _json(record: Any) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> list[tuple[str, str]]:
    """An ``HGETALL`` reply (a map under RESP3, a flat list under RESP2) as text pairs."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(_text(k), _text(v)) for k, v in reply.items()]
    items = list(reply)
    return [(_text(items[i]), _text(items[i + 1])) for i in range(0, len(items), 2)]


def _progress(pairs: Iterable[tuple[str, str]]) -> tuple[Progress, ...]:
    found = [Progress(**json.loads(value)) for _, value in pairs]
    return tuple(sorted(found, key=lambda p: (p.source, p.provider)))


def _counts(days: Iterable[tuple[str, Any]]) -> tuple[DayCount, ...]:
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    for day, reply in days:
        for field, amount in _pairs(reply):
            source, provider, kind = json.loads(field)
            totals.setdefault((source, provider, day), {})[kind] = int(amount)
    return tuple(DayCount(s, p, d, **kinds) for (s, p, d), kinds in sorted(totals.items()))


def _suspensions(pairs: Iterable[tuple[str, str]], now: float) -> tuple[Suspension, ...]:
    found = []
    for scope, value in sorted(pairs):
        data = json.loads(value)
        if data["until"] > now:
            found.append(Suspension(scope, data["until"], data["reason"]))
    return tuple(found)


def _policies(pairs: Iterable[tuple[str, str]], now: float) -> tuple[StsPolicy, ...]:
    found = [StsPolicy(**json.loads(value)) for _, value in sorted(pairs)]
    return tuple(p for p in found if p.fetched_at + p.max_age > now)


def _overrides(pairs: Iterable[tuple[str, str]], now: float) -> tuple[Override, ...]:
    found = []
    for field, value in sorted(pairs):
        scope, name = json.loads(field)
        data = json.loads(value)
        if data["until"] > now:
            found.append(Override(scope, name, data["value"], data["until"], data["reason"]))
    return tuple(found)
