"""Shaping budgets shared by a fleet through Redis/Valkey: the trio shell of the ledger.

Theory of operation
-------------------
:class:`~egressd.shaping.ledger.SharedLedger` (pure) decides what to ask the store and what
to give back; :class:`FleetBudgets` asks. Every exchange with Redis is ONE call of
:data:`LEDGER_SCRIPT`, a Lua script that runs a batch of ops atomically on the server's
clock (``TIME``), so that nodes whose clocks disagree still share one timeline:

- ``A`` (:class:`~egressd.shaping.ledger.AcquireSlot`): KumoMTA's lease acquisition
  (crates/throttle/src/limit.lua): drop the members of the sorted set whose expiry has
  passed, then add the new member scored by ``now + lease_timeout`` if fewer than the
  limit are left; else answer how long until the first one expires;
- ``R`` / ``N`` (release / renew): ``ZREM``, or ``ZADD`` with a fresh expiry (a member that
  is missing is added back: it is an open connection, so it counts);
- ``T`` / ``G`` (take / give back cells): KumoMTA's GCRA (crates/throttle/src/throttle.rs,
  after Losant's redis-gcra) in microseconds, with egressd's in-process semantics
  (:class:`~egressd.shaping.throttle.Gcra`: ``burst = min(max_burst, limit - 1) + 1``),
  granting up to a batch of cells at once; giving back moves the theoretical arrival time
  back by one emission interval per cell;
- ``Q`` / ``U`` (take / give back a count): a counter that never passes its limit, set to
  expire after a time (a warming source's messages of one day to one provider, keyed by
  the day: :mod:`egressd.fleet.quotas`); ``Q`` adds up to a batch (none: a look) and
  answers what it added and the count, ``U`` takes back what was not spent;
- ``H``: this process's heartbeat in ``{prefix}:budgets:nodes``, answering how many
  processes count shared budgets: the divisor of the local shares when Redis goes away.
  It counts processes, not hosts (the fleet view's ``alive_nodes()`` counts node names):
  every worker of ``[daemon] workers = N``, and two daemons of one host, each keep their
  own share, so each must divide by all of them. ``nodes_alive`` replaces it if a
  caller has a better count.

Key names carry the spec's parameters (``...:leases:connection_limit:SOURCE:SITE:5``,
``...:gcra:max_message_rate:SOURCE:SITE:100:100:60``), so two specs never share a bucket.

When asked: :meth:`FleetBudgets.prepare_open` before a plan picks its source (the
executor, :mod:`egressd.net.egress`), for every candidate source in one round trip;
:meth:`FleetBudgets.prepare_send` before a message (the SMTP door). Both are no-ops when
the holding has what it needs, or this node's spares cover it. In the background
(:meth:`FleetBudgets.run`): released and lingering spares go back every
:data:`FLUSH_INTERVAL`; every slot this node holds is renewed every third of the lease
timeout, or every ``[state] heartbeat_interval`` when that is shorter (so a node that
dies returns its slots within one lease timeout: the ``[state] lease_timeout``, 30 s by
default, where KumoMTA uses the connection's whole lifetime of timeouts because it renews
only per message).

**Losing Redis.** A call that fails (refused, reset, no answer within the client's
timeouts) switches the ledger to local shares (:meth:`SharedLedger.went_down`), logs one
error, sets ``egressd_fleet_budgets_shared 0`` and shows in ``egressd status``. Every
second a probe tries again; when Redis answers, this node's open connections are
registered again (:meth:`SharedLedger.came_back`), the local shares are dropped, one
line is logged and the gauge is 1 again. What may be over-spent meanwhile: README "Fleet
budgets". Nothing here delays a reply to a client beyond the first failing call.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from egressd.config import StateSettings
from egressd.fleet.quotas import SharedQuotas
from egressd.log import get_logger
from egressd.shaping.ledger import (
    AcquireSlot,
    GiveBackCount,
    Holding,
    Op,
    ReleaseSlots,
    RenewSlots,
    SharedLedger,
    TakeCells,
    TakeCount,
    Want,
)
from egressd.shaping.policy import Budget
from egressd.shaping.throttle import NANOS

__all__ = [
    "FLUSH_INTERVAL",
    "LEDGER_SCRIPT",
    "FleetBudgets",
    "Heartbeat",
    "ScriptClient",
    "StoreUnavailable",
    "serve_fleet_budgets",
]

log = get_logger("fleet.budgets")

FLUSH_INTERVAL = 0.1
"""Seconds between two give-backs of released slots and lingering spares."""
PROBE_INTERVAL = 1.0
"""Seconds between two tries to reach Redis while it is away."""

LEDGER_SCRIPT = """
-- egressd shared budgets: KEYS[i] is op i's key; ARGV[1] the lease timeout (ms); then
-- five ARGV per op: code, p1..p4. Answers two integers per op. See egressd/fleet/budgets.py.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local timeout = tonumber(ARGV[1])
local out = {}
local a = 2
for i, key in ipairs(KEYS) do
  local op, p1, p2, p3, p4 = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local r1, r2 = 0, 0
  if op == 'A' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    if redis.call('ZCARD', key) < tonumber(p2) then
      redis.call('ZADD', key, now_ms + timeout, p1)
      redis.call('PEXPIRE', key, timeout)
      r1 = 1
    else
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      r2 = math.max(1, tonumber(first[2]) - now_ms)
    end
  elseif op == 'R' then
    for member in string.gmatch(p1, '[^,]+') do
      redis.call('ZREM', key, member)
    end
  elseif op == 'N' then
    for member in string.gmatch(p1, '[^,]+') do
      redis.call('ZADD', key, now_ms + timeout, member)
    end
    redis.call('PEXPIRE', key, timeout)
  elseif op == 'T' or op == 'G' then
    local interval = tonumber(p2) * 1000000 / tonumber(p1)
    local burst = tonumber(p3)
    local quantity = tonumber(p4)
    local tat = tonumber(redis.call('GET', key) or now_us)
    if tat < now_us then
      tat = now_us
    end
    local granted = 0
    if op == 'G' then
      tat = tat - quantity * interval
    else
      local room = burst + math.floor((now_us - tat) / interval)
      granted = math.min(quantity, room)
      if granted >= 1 then
        tat = tat + granted * interval
        r1 = granted
      else
        r2 = math.max(1, math.ceil(tat + interval - interval * burst - now_us))
      end
    end
    if op == 'G' or granted >= 1 then
      if tat > now_us then
        local ttl = math.max(1, math.ceil((tat - now_us) / 1000))
        redis.call('SET', key, string.format('%.17g', tat), 'PX', ttl)
      else
        redis.call('DEL', key)
      end
    end
  elseif op == 'Q' then
    local used = tonumber(redis.call('GET', key) or 0)
    local granted = math.min(tonumber(p2), tonumber(p1) - used)
    r2 = used
    if granted >= 1 then
      redis.call('SET', key, used + granted, 'PX', p3)
      r1 = granted
      r2 = used + granted
    end
  elseif op == 'U' then
    local used = redis.call('GET', key)
    if used then
      redis.call('SET', key, math.max(0, tonumber(used) - tonumber(p1)), 'PX', p2)
    end
  elseif op == 'H' then
    redis.call('ZADD', key, now_ms + tonumber(p2), p1)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    redis.call('PEXPIRE', key, p2)
    r1 = redis.call('ZCARD', key)
  end
  out[#out + 1] = r1
  out[#out + 1] = r2
end
return out
"""


class StoreUnavailable(Exception):
    """Redis could not be reached, or refused the script."""


class ScriptClient(Protocol):
    """What the shell needs of the fleet's Redis client (:mod:`egressd.fleet.client`)."""

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any: ...

    async def ping(self) -> None: ...


@dataclass(frozen=True)
class Heartbeat:
    """This node's heartbeat in the budget nodes' set; its result is the number alive."""

    store_key: str
    node: str
    ttl_ms: int


def encode(ops: Sequence[Op | Heartbeat], timeout_ms: int) -> tuple[list[str], list[str]]:
    """The script's KEYS and ARGV for ``ops``."""
    keys: list[str] = []
    args: list[str] = [str(timeout_ms)]
    for op in ops:
        keys.append(op.store_key)
        args.extend(_op_args(op))
    return keys, args


def _op_args(op: Op | Heartbeat) -> tuple[str, str, str, str, str]:
    if isinstance(op, AcquireSlot):
        return "A", op.member, str(op.limit), "", ""
    if isinstance(op, ReleaseSlots):
        return "R", ",".join(op.members), "", "", ""
    if isinstance(op, RenewSlots):
        return "N", ",".join(op.members), "", "", ""
    if isinstance(op, Heartbeat):
        return "H", op.node, str(op.ttl_ms), "", ""
    if isinstance(op, TakeCount):
        return "Q", str(op.limit), str(op.quantity), str(op.ttl_ms), ""
    if isinstance(op, GiveBackCount):
        return "U", str(op.quantity), str(op.ttl_ms), "", ""
    code = "T" if isinstance(op, TakeCells) else "G"
    spec = op.spec
    return code, str(spec.limit), str(spec.period), str(spec.burst), str(op.quantity)


def decode(reply: Any, count: int) -> list[tuple[int, int]]:
    """Two integers per op; StoreUnavailable when the reply is not that."""
    if not isinstance(reply, list) or len(reply) != 2 * count:
        raise StoreUnavailable(f"unexpected reply from the budget script: {reply!r:.200}")
    numbers = [int(value) for value in reply]
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


class FleetBudgets:
    """The shell of one :class:`SharedLedger` over Redis (see the module docstring)."""

    def __init__(
        self,
        ledger: SharedLedger,
        client: ScriptClient,
        *,
        lease_timeout: float = 30.0,
        heartbeat_interval: float = 5.0,
        unavailable: tuple[type[Exception], ...] = (OSError,),
        nodes_alive: Callable[[], int] | None = None,
        clock: Callable[[], float] = trio.current_time,
        changed: Callable[[bool], None] = lambda shared: None,
    ) -> None:
        self.ledger = ledger
        self.client = client
        self.timeout_ms = max(1, round(lease_timeout * 1000))
        self.renew_interval = min(lease_timeout / 3, heartbeat_interval)
        """Slots are renewed, and the heartbeat counts the nodes, this often."""
        self.unavailable: tuple[type[Exception], ...] = (StoreUnavailable, *unavailable)
        self.nodes_alive = nodes_alive
        self.clock = clock
        self.changed = changed
        self.seen_nodes = 1
        """Nodes alive at the last heartbeat (this node's own count)."""
        self.down_since: float | None = None
        self.last_error = ""
        self._wake = trio.Event()
        self.quotas: SharedQuotas | None = None
        """Warm-up quotas counted in the same store (:mod:`egressd.fleet.quotas`)."""

    def share_quotas(self, quotas: SharedQuotas) -> None:
        """Count ``quotas`` (over a warm-up engine) in the store from now on."""
        if self.ledger.down:
            quotas.went_down(self.ledger.nodes)
        self.quotas = quotas

    @property
    def shared(self) -> bool:
        return not self.ledger.down

    # ------------------------------------------------------------------ asking ahead

    async def prepare_open(
        self, holding: Holding, budgets: Iterable[Budget], *, messages: bool = False
    ) -> None:
        """Ask Redis for what ``holding`` lacks to open a connection under ``budgets``
        (and to send its first message, for ``messages``), in one round trip."""
        budgets = list(budgets)
        wants = self.ledger.wants_to_open(holding, budgets)
        if messages:
            wants += self.ledger.wants_to_send(holding, budgets)
        await self._ask(wants)

    async def prepare_send(self, holding: Holding, budgets: Iterable[Budget]) -> None:
        """Ask Redis for what ``holding`` lacks to send one message under ``budgets``."""
        await self._ask(self.ledger.wants_to_send(holding, budgets))

    async def prepare_quotas(self, sources: Sequence[str], provider: str) -> None:
        """Ask the store for warm-up tickets of ``sources`` to ``provider`` that this
        process lacks, in one round trip (nothing when no quota is shared)."""
        if self.quotas is None:
            return
        wants = self.quotas.wants(sources, provider)
        if not wants:
            return
        try:
            results = await self._exchange([want.op for want in wants])
        except self.unavailable as exc:
            self._went_down(exc)
            return
        self.quotas.granted(wants, results)

    def settle(self, holding: Holding) -> None:
        """What ``holding`` does not use goes to this node's spares (given back later)."""
        self.ledger.settle(holding, self._now_ns())

    async def _ask(self, wants: Sequence[Want]) -> None:
        if not wants:
            return
        try:
            results = await self._exchange([want.op for want in wants])
        except self.unavailable as exc:
            self._went_down(exc)
            return
        self.ledger.granted(wants, results, self._now_ns())

    # ------------------------------------------------------------------ background

    async def run(
        self, *, task_status: trio.TaskStatus[FleetBudgets] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Give back, renew, and probe while Redis is away, until cancelled; at the end,
        everything this node holds goes back (a clean stop frees its slots at once)."""
        await self.renew()  # the heartbeat: how many nodes share the budgets
        task_status.started(self)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_forever)
                await self._flush_forever()
        finally:
            with trio.move_on_after(1.0, shield=True):
                await self._give_back_all()

    async def _flush_forever(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL if self.shared else PROBE_INTERVAL)
            if self.shared:
                await self.flush()
            else:
                await self.probe()

    async def _renew_forever(self) -> None:
        while True:
            if self.shared:
                await self.renew()
            await trio.sleep(self.renew_interval)

    async def flush(self) -> None:
        """Released slots and lingering spares go back to Redis."""
        ops = self.ledger.returns(self._now_ns())
        if self.quotas is not None:
            ops += self.quotas.returns()
        if not ops:
            return
        try:
            await self._exchange(ops)
        except self.unavailable as exc:
            self._unsent(ops)
            self._went_down(exc)

    def _unsent(self, ops: Sequence[Op]) -> None:
        self.ledger.unsent(ops)
        if self.quotas is not None:
            self.quotas.unsent(ops)

    async def renew(self) -> None:
        """Renew every slot this node holds, with this node's heartbeat (and a look at the
        day's count of each shared warm-up quota)."""
        stale_ms = max(1, round(3 * self.renew_interval * 1000))  # unseen for 3 beats
        beat = Heartbeat(self._nodes_key(), self.ledger.node, stale_ms)
        looks = self.quotas.looks() if self.quotas is not None else []
        ops: list[Op | Heartbeat] = [beat, *self.ledger.renewals(), *(w.op for w in looks)]
        try:
            results = await self._exchange(ops)
        except self.unavailable as exc:
            self._went_down(exc)
            return
        self.seen_nodes = max(1, results[0][0])
        if self.quotas is not None and looks:
            self.quotas.granted(looks, results[len(ops) - len(looks) :])

    async def probe(self) -> None:
        """Redis is away: try it; when it answers, register this node's connections
        again and count in Redis from now on."""
        try:
            await self.client.ping()
        except self.unavailable:
            return
        renewals = self.ledger.came_back()
        released = self.ledger.returns(self._now_ns())
        if self.quotas is not None:
            self.quotas.came_back()
            released += self.quotas.returns()
        try:
            await self._exchange([*renewals, *released])
        except self.unavailable as exc:
            self._unsent(released)
            self._went_down(exc)
            return
        seconds = self.clock() - (self.down_since or self.clock())
        self.down_since = None
        log.warning(
            "shared budgets: Redis is back; local shares dropped",
            extra={
                "fields": {
                    "registered": sum(len(r.members) for r in renewals),
                    "after": f"{seconds:.1f}s",
                }
            },
        )
        self.changed(True)
        await self.renew()

    async def _give_back_all(self) -> None:
        if not self.shared:
            return
        ops: list[Op] = list(self.ledger.returns(self._now_ns(), everything=True))
        if self.quotas is not None:
            ops += self.quotas.returns(everything=True)
        held = self.ledger.renewals()
        ops.extend(ReleaseSlots(r.store_key, r.members) for r in held)
        if ops:
            with contextlib.suppress(*self.unavailable):
                await self._exchange(ops)

    # ------------------------------------------------------------------ the store

    async def _exchange(self, ops: Sequence[Op | Heartbeat]) -> list[tuple[int, int]]:
        keys, args = encode(ops, self.timeout_ms)
        try:
            reply = await self.client.script(LEDGER_SCRIPT, keys, args)
        except self.unavailable:
            raise
        except Exception as exc:  # a script error (e.g. a read-only replica)
            raise StoreUnavailable(str(exc)) from exc
        return decode(reply, len(ops))

    def _went_down(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        if self.ledger.down:
            return
        nodes = self.nodes_alive() if self.nodes_alive is not None else self.seen_nodes
        self.ledger.went_down(nodes)
        if self.quotas is not None:
            self.quotas.went_down(nodes)
        self.down_since = self.clock()
        log.error(
            "shared budgets: Redis unreachable; each budget (and warm-up quota) is counted "
            "here as a local share",
            extra={"fields": {"error": self.last_error, "nodes": self.ledger.nodes}},
        )
        self.changed(False)

    def status(self) -> dict[str, Any]:
        """For ``egressd status``."""
        state: dict[str, Any] = {
            "shared": self.shared,
            "nodes": self.ledger.nodes if self.ledger.down else self.seen_nodes,
            "lease_timeout": self.timeout_ms / 1000,
            "quotas": self.quotas is not None,
        }
        if self.down_since is not None:
            state["local_shares_for"] = round(self.clock() - self.down_since, 1)
            state["error"] = self.last_error
        return state

    def _nodes_key(self) -> str:
        return f"{self.ledger.prefix}nodes"

    def _now_ns(self) -> int:
        return round(self.clock() * NANOS)


def node_id(name: str | None) -> str:
    """This process's name in slot members: the node's name, its PID and a random tag
    (two processes of one host never share members; ``,`` separates them in ops)."""
    base = (name or socket.gethostname()).replace(",", "_")
    return f"{base}/{os.getpid()}/{secrets.token_hex(3)}"


async def serve_fleet_budgets(
    settings: StateSettings,
    *,
    changed: Callable[[bool], None] = lambda shared: None,
    task_status: trio.TaskStatus[FleetBudgets] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon's shared budgets for ``[state] backend = "redis"``: a client of its own
    (the budgets' calls never queue behind the state store's), started as
    :class:`FleetBudgets`, run until cancelled."""
    from egressd.fleet.client import RedisUnavailable, open_client  # glide: only with redis

    async with open_client(settings, "egressd-budgets", announce=False) as client:
        ledger = SharedLedger(node_id(settings.node_name), prefix=client.key("budgets") + ":")
        budgets = FleetBudgets(
            ledger,
            client,
            lease_timeout=settings.lease_timeout,
            heartbeat_interval=settings.heartbeat_interval,
            unavailable=(RedisUnavailable,),
            changed=changed,
        )
        await budgets.run(task_status=task_status)
