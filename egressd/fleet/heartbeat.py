"""Heartbeats: every daemon (and every worker) says it is alive, and reads who else is.

Theory of operation
-------------------
Every ``[state] heartbeat_interval`` (5 s) each member of the fleet (a daemon, or one
worker of a daemon: ``Heartbeats(..., worker="2")``) writes its record, in one
transaction::

    SET  P:fleet:member:ID  json(record)  EX 3*interval
    ZADD P:fleet:members    now  ID           (pruned after a day)

``ID`` is the node name (``[state] node_name``, default the host name), plus ``/WORKER``
for a worker. The record holds the node, worker, pid, egressd version, the configuration
generation (a hash of the loaded files: two members that differ there run different
configurations), when it started, its last heartbeat, and its active connections per
source.

After writing, it reads every member back (``ZRANGE ... WITHSCORES``, then one ``MGET``)
with the fleet-wide suspensions (``P:state:suspensions``, see :mod:`egressd.state.redis`)
and the shared budgets (``P:budgets:leases:*``, ``P:budgets:gcra:*``, see
:mod:`egressd.fleet.budgets`: one Lua script, at most 200 of each), and keeps them as
:attr:`Heartbeats.view` for ``egressd status --fleet`` (the control
socket answers from memory, never waiting on Redis). A member whose record expired (no
heartbeat for three intervals) but which is still listed is **stale**.

:meth:`Heartbeats.alive_nodes` is the number of distinct nodes with a live record at the
last successful read (at least 1, this one): the divisor of the local budget shares while
Redis is unreachable (:mod:`egressd.shaping.ledger`); it keeps its last value during an
outage. At shutdown, :meth:`Heartbeats.leave` removes the record, so the others stop
counting this node at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from egressd.fleet.client import FleetClient
from egressd.log import get_logger
from egressd.state import StateError

__all__ = ["FleetView", "Heartbeats", "Member"]

log = get_logger("fleet")

MEMBERS_KEPT = 86400.0
"""A member not heard of for a day is dropped from the list (stale until then)."""

BUDGETS_SHOWN = 200
"""At most this many shared budget keys of each kind are read into the view."""

BUDGETS_SCRIPT = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local limit = tonumber(ARGV[3])
local function scan(pattern, read)
  local out, cursor, n = {}, '0', 0
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 500)
    cursor = r[1]
    for _, key in ipairs(r[2]) do
      if n < limit then
        table.insert(out, key)
        table.insert(out, read(key))
        n = n + 1
      end
    end
  until cursor == '0' or n >= limit
  return out
end
local leases = scan(ARGV[1], function(key)
  return redis.call('ZCOUNT', key, '(' .. now_ms, '+inf')
end)
local gcra = scan(ARGV[2], function(key)
  local tat = tonumber(redis.call('GET', key) or now_us)
  return math.max(0, math.floor((tat - now_us) / 1000))
end)
return {leases, gcra}
"""
"""The shared budgets as the fleet budgets keep them (:mod:`egressd.fleet.budgets`): each
lease set's live members (connections held fleet-wide) and each GCRA's theoretical arrival
time ahead of the server's clock, in ms (0: the budget is idle)."""


@dataclass(frozen=True)
class Member:
    """One heartbeat record."""

    node: str
    worker: str | None
    pid: int
    version: str
    generation: str
    started: float
    heartbeat: float
    connections: Mapping[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.node if self.worker is None else f"{self.node}/{self.worker}"


@dataclass(frozen=True)
class FleetView:
    """What the last read saw: members (alive ones with a record, stale ones with their
    last heartbeat only), fleet-wide suspensions, and when it was read."""

    members: tuple[Member, ...] = ()
    stale: tuple[tuple[str, float], ...] = ()
    suspensions: tuple[tuple[str, float, str], ...] = ()
    leases: tuple[tuple[str, int], ...] = ()
    """(lease set key without the prefix, connections held now) of the shared budgets."""
    gcra: tuple[tuple[str, int], ...] = ()
    """(GCRA key without the prefix, ms its arrival time is ahead of now)."""
    read_at: float = 0.0

    def alive_nodes(self) -> int:
        return len({member.node for member in self.members})

    def to_json(self, generation: str) -> dict[str, Any]:
        """For the control socket; ``generation`` is the asking daemon's own."""
        return {
            "read_at": self.read_at,
            "generation": generation,
            "members": [
                {**asdict(m), "id": m.id, "other_config": m.generation != generation}
                for m in self.members
            ],
            "stale": [{"id": member, "heartbeat": seen} for member, seen in self.stale],
            "suspensions": [
                {"scope": scope, "until": until, "reason": reason}
                for scope, until, reason in self.suspensions
            ],
            "leases": [{"key": key, "held": held} for key, held in self.leases],
            "gcra": [{"key": key, "ahead_ms": ahead} for key, ahead in self.gcra],
        }


class Heartbeats:
    """This member's heartbeat writer and the fleet view it reads back."""

    def __init__(
        self,
        client: FleetClient,
        node: str,
        version: str,
        generation: Callable[[], str],
        connections: Callable[[], Mapping[str, int]],
        *,
        worker: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.node, self.worker, self.version = node, worker, version
        self.generation, self.connections, self.clock = generation, connections, clock
        self.started = clock()
        self.view = FleetView()
        self._alive = 1

    @property
    def interval(self) -> float:
        return self.client.settings.heartbeat_interval

    @property
    def ttl(self) -> float:
        return 3 * self.interval

    @property
    def id(self) -> str:
        """``node``, or ``node/worker`` for a worker (as :attr:`Member.id`)."""
        return self.node if self.worker is None else f"{self.node}/{self.worker}"

    def alive_nodes(self) -> int:
        """Distinct nodes alive at the last successful read (this one included; >= 1)."""
        return self._alive

    def record(self, now: float) -> Member:
        return Member(
            node=self.node,
            worker=self.worker,
            pid=os.getpid(),
            version=self.version,
            generation=self.generation(),
            started=self.started,
            heartbeat=now,
            connections={k: v for k, v in sorted(self.connections().items()) if v},
        )

    async def beat(self) -> None:
        """Write this member's record, then read the fleet back (StateError on failure)."""
        now = self.clock()
        member = self.record(now)
        members = self.client.key("fleet", "members")
        await self.client.transaction(
            [
                ["SET", self._record_key(member.id), _encode(member), "PX", _ms(self.ttl)],
                ["ZADD", members, repr(now), member.id],
                ["ZREMRANGEBYSCORE", members, "-inf", repr(now - MEMBERS_KEPT)],
            ]
        )
        self.view = await self.read(now)
        self._alive = max(1, self.view.alive_nodes())

    async def read(self, now: float) -> FleetView:
        """Every listed member (alive or stale) and the fleet-wide suspensions."""
        listed, suspensions = await self.client.transaction(
            [
                ["ZRANGE", self.client.key("fleet", "members"), "0", "-1", "WITHSCORES"],
                ["HGETALL", self.client.key("state", "suspensions")],
            ]
        )
        seen = _scored(listed)
        records = []
        if seen:
            records = await self.client.command("MGET", *[self._record_key(m) for m, _ in seen])
        alive, stale = [], []
        for (member_id, heartbeat), raw in zip(seen, records, strict=True):
            if raw is None:
                stale.append((member_id, heartbeat))
            else:
                alive.append(_decode(raw))
        leases, gcra = await self._budgets()
        return FleetView(
            members=tuple(sorted(alive, key=lambda m: m.id)),
            stale=tuple(stale),
            suspensions=_suspensions(suspensions, now),
            leases=leases,
            gcra=gcra,
            read_at=now,
        )

    async def _budgets(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """The shared budgets' lease sets and GCRAs (:data:`BUDGETS_SCRIPT`), sorted."""
        base = self.client.key("budgets", "")
        leases, gcra = await self.client.script(
            BUDGETS_SCRIPT, [], [base + "leases:*", base + "gcra:*", str(BUDGETS_SHOWN)]
        )
        strip = len(self.client.key(""))
        return _keyed(leases, strip), _keyed(gcra, strip)

    async def run(self) -> None:
        """Beat every ``heartbeat_interval`` until cancelled; a failed beat is retried at
        the next one (the client logs the outage once)."""
        while True:
            with contextlib.suppress(StateError):
                await self.beat()
            await trio.sleep(self.interval)

    async def leave(self) -> None:
        """Remove this member's record and listing (at shutdown; failures are ignored)."""
        with trio.CancelScope(shield=True), contextlib.suppress(StateError):
            await self.client.transaction(
                [
                    ["DEL", self._record_key(self.id)],
                    ["ZREM", self.client.key("fleet", "members"), self.id],
                ]
            )

    def _record_key(self, member_id: str) -> str:
        return self.client.key("fleet", "member", member_id)


def _encode(member: Member) -> str:
    return json.dumps(asdict(member), separators=(",", ":"))


def _decode(raw: bytes | str) -> Member:
    data = json.loads(raw)
    return Member(**{**data, "connections": dict(data.get("connections") or {})})


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scored(reply: Any) -> list[tuple[str, float]]:
    """``ZRANGE ... WITHSCORES``: pairs under RESP3, a flat list under RESP2."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(_text(k), float(v)) for k, v in reply.items()]
    items = list(reply)
    if isinstance(items[0], list | tuple):
        return [(_text(m), float(s)) for m, s in items]
    return [(_text(items[i]), float(items[i + 1])) for i in range(0, len(items), 2)]


def _keyed(reply: Any, strip: int) -> tuple[tuple[str, int], ...]:
    items = list(reply or [])
    pairs = [(_text(items[i])[strip:], int(items[i + 1])) for i in range(0, len(items), 2)]
    return tuple(sorted(pairs))


def _suspensions(reply: Any, now: float) -> tuple[tuple[str, float, str], ...]:
    pairs = reply.items() if isinstance(reply, dict) else []
    found = []
    for scope, value in pairs:
        data = json.loads(value)
        if data["until"] > now:
            found.append((_text(scope), float(data["until"]), str(data["reason"])))
    return tuple(sorted(found))
