"""Where the shaper's budgets are counted: in this process, or in a store shared by a fleet.

Theory of operation
-------------------
The :class:`~egressd.shaping.shaper.Shaper` decides (which budgets apply, what a refusal
says); a **ledger** counts. The shaper asks its ledger, synchronously, five things about one
:class:`~egressd.shaping.policy.Budget` (``budget.key`` names its bucket):

=================================  ==========================================================
``may_open(budget, holding)``      is a connection slot free in this ``connections`` budget?
``open`` / ``close``               count one connection in / out of it
``wait_ns(budget, now, holding)``  0 when one cell of this rate budget conforms at ``now``,
                                   else how long until it would (nanoseconds)
``take(budget, now, holding)``     spend that cell
=================================  ==========================================================

plus ``expire(now)`` (forget what is idle) and ``use(budget, now)`` (one phrase for
``egressd explain``). ``holding`` is the :class:`Holding` of the plan or connection that
asks; the in-process ledger ignores it. A shared ledger asked without one (``egressd
explain``, which plans nothing) answers that a shared budget is available: only the store
knows, and explain shows the node's own use of it.

Two ledgers implement :class:`Ledger`:

:class:`LocalLedger` -- the default and the fast path. Counts and
    :class:`~egressd.shaping.throttle.Gcra` buckets in dictionaries: exactly KumoMTA's
    in-process throttles and lease sets.

:class:`SharedLedger` -- budgets shared by every process that uses the same store (Redis or
    Valkey across nodes, :mod:`egressd.fleet.budgets`; a host-local store across workers).
    The store is asynchronous and the shaper's questions are not, so the store is asked
    *ahead*: before a plan picks a source, its shell asks for what an open of any candidate
    source would spend (:meth:`SharedLedger.wants_to_open`), in one pipelined round trip,
    and keeps the answers in the plan's :class:`Holding`; before a message, the same for
    its message budgets (:meth:`SharedLedger.wants_to_send`). The shaper then spends from
    the holding without I/O. What a holding does not spend goes back to the node's spare
    pool (:meth:`SharedLedger.settle`), where the next plan finds it without a round trip,
    and from there back to the store (:meth:`SharedLedger.returns`, which the shell calls
    every tenth of a second): slots at once, so that another node may take them; cells
    after :attr:`SharedLedger.linger` seconds unused.

    - A connection **slot** is a member of a sorted set in the store, scored by its expiry
      (KumoMTA's crates/throttle/src/limit.rs); the shell renews every slot this node holds
      (:meth:`SharedLedger.renewals`) every third of the lease timeout, so a node that dies
      returns its slots at most one lease timeout later.
    - A rate **cell** comes from one GCRA in the store, on the store's clock (KumoMTA's Lua
      GCRA, crates/throttle/src/throttle.rs). A want asks for a batch of
      ``max(1, burst // 100)`` cells (1% of the burst); a cell given back moves the GCRA's
      theoretical arrival time back by one emission interval, exactly as if it had never
      been taken.
    - ``local:`` budgets (``force_local``, KumoMTA's meaning) never reach the store: they
      are counted by :attr:`SharedLedger.local`, a :class:`LocalLedger`.

    **Exactness.** The store grants every slot and cell, atomically: the fleet never spends
    more than the budget. It may spend less: a node holds at most one batch of spare cells
    per budget (1% of its burst) for :attr:`~SharedLedger.linger` seconds, and a released
    slot until the shell's next give-back (a tenth of a second). **A node that crashes**
    loses what it held: its slots come back when their lease times out; its spare cells
    (at most 1% of the burst per budget) are never spent, so the fleet under-spends by that
    much, never over-spends.

    **When the store is unreachable** (:meth:`SharedLedger.went_down`), every shared budget
    is counted here, as a *local share*: the budget divided by the number of nodes last seen
    alive (:meth:`share_of_limit`, :meth:`share_of_throttle`; at least one connection and
    one cell per period, so mail never stops). Connections opened meanwhile are remembered;
    when the store is back (:meth:`SharedLedger.came_back`) the shell registers them in the
    store (they exist, so they count even when that puts a set above its limit: new opens
    then wait), and the local shares are dropped. Over-spend in that window: see README
    "Fleet budgets".

A third ledger can be written against the same protocol (e.g. one that keeps exact counts
across the worker processes of one host): either a synchronous :class:`Ledger` of its own,
or a :class:`BudgetStore` (the async side: it executes :data:`Op` batches) under
:class:`SharedLedger`, which then brings the batching, the spare pools and the outage
handling with it. Pure: no trio, no socket, no clock (times are passed in).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from egressd.shaping.policy import Budget
from egressd.shaping.throttle import NANOS, Gcra, LimitSpec, ThrottleSpec

__all__ = [
    "AcquireSlot",
    "BudgetStore",
    "GiveBackCells",
    "GiveBackCount",
    "Holding",
    "Ledger",
    "LocalLedger",
    "Op",
    "ReleaseSlots",
    "RenewSlots",
    "SharedLedger",
    "TakeCells",
    "TakeCount",
    "share_of_limit",
    "share_of_throttle",
]

Key = tuple[str, ...]

#: A batch of cells is this fraction of the budget's burst (the budget holds within 1%).
BATCH_FRACTION = 0.01


class Ledger(Protocol):
    """Where the shaper counts connections and rate cells (see the module docstring)."""

    local: LocalLedger
    """The in-process counts (every budget in a :class:`LocalLedger`; ``local:`` ones in a
    :class:`SharedLedger`)."""

    def may_open(self, budget: Budget, holding: Holding | None) -> bool: ...

    def open(self, budget: Budget, holding: Holding | None) -> None: ...

    def close(self, budget: Budget, holding: Holding | None) -> None: ...

    def wait_ns(self, budget: Budget, now: int, holding: Holding | None) -> int: ...

    def take(self, budget: Budget, now: int, holding: Holding | None) -> None: ...

    def expire(self, now: int) -> None: ...

    def use(self, budget: Budget, now: int) -> str: ...


class LocalLedger:
    """Counts in this process: open connections per budget, one GCRA per rate budget."""

    def __init__(self) -> None:
        self.leases: dict[Key, int] = {}
        self.buckets: dict[Key, Gcra] = {}
        self.local = self

    def may_open(self, budget: Budget, holding: Holding | None = None) -> bool:
        return self.leases.get(budget.key, 0) < _limit(budget)

    def open(self, budget: Budget, holding: Holding | None = None) -> None:
        self.leases[budget.key] = self.leases.get(budget.key, 0) + 1

    def close(self, budget: Budget, holding: Holding | None = None) -> None:
        count = self.leases.get(budget.key, 0) - 1
        if count > 0:
            self.leases[budget.key] = count
        else:
            self.leases.pop(budget.key, None)

    def wait_ns(self, budget: Budget, now: int, holding: Holding | None = None) -> int:
        return self.bucket(budget).wait_ns(now)

    def take(self, budget: Budget, now: int, holding: Holding | None = None) -> None:
        self.bucket(budget).take(now)

    def expire(self, now: int) -> None:
        for key in [k for k, bucket in self.buckets.items() if bucket.idle(now)]:
            del self.buckets[key]

    def use(self, budget: Budget, now: int) -> str:
        if budget.kind == "connections":
            return f"{self.leases.get(budget.key, 0)} open"
        bucket = self.buckets.get(budget.key)
        wait = bucket.wait_ns(now) if bucket is not None else 0
        return f"next in {wait / NANOS:.3g}s" if wait else "available"

    def bucket(self, budget: Budget) -> Gcra:
        bucket = self.buckets.get(budget.key)
        if bucket is None:
            assert isinstance(budget.value, ThrottleSpec)
            bucket = self.buckets[budget.key] = Gcra(budget.value)
        return bucket


# --------------------------------------------------------------------------- the store's side


@dataclass(frozen=True)
class AcquireSlot:
    """Add ``member`` to the lease set ``store_key`` if it has fewer than ``limit`` live
    members; result ``(1, 0)``, or ``(0, ms until the first member expires)``."""

    store_key: str
    member: str
    limit: int


@dataclass(frozen=True)
class ReleaseSlots:
    """Remove ``members`` from the lease set ``store_key``; result ignored."""

    store_key: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RenewSlots:
    """Set the expiry of ``members`` of ``store_key`` to the lease timeout from now,
    adding those that are missing (they are open connections); result ignored."""

    store_key: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class TakeCells:
    """Take up to ``quantity`` (at least 1) cells from the GCRA ``store_key`` of ``spec``;
    result ``(granted, 0)``, or ``(0, µs until one cell conforms)``."""

    store_key: str
    spec: ThrottleSpec
    quantity: int


@dataclass(frozen=True)
class GiveBackCells:
    """Give ``quantity`` unspent cells back to the GCRA ``store_key``; result ignored."""

    store_key: str
    spec: ThrottleSpec
    quantity: int


@dataclass(frozen=True)
class TakeCount:
    """Add up to ``quantity`` to the counter ``store_key`` without passing ``limit``; the
    counter expires ``ttl_ms`` from now (a warm-up day's messages, keyed by the day:
    :mod:`egressd.fleet.quotas`); result ``(added, count after)`` (``quantity`` 0: a look)."""

    store_key: str
    limit: int
    quantity: int
    ttl_ms: int


@dataclass(frozen=True)
class GiveBackCount:
    """Take ``quantity`` back from the counter ``store_key`` (not below 0; a counter that
    expired stays gone); result ignored."""

    store_key: str
    quantity: int
    ttl_ms: int


Op = AcquireSlot | ReleaseSlots | RenewSlots | TakeCells | GiveBackCells | TakeCount | GiveBackCount


class BudgetStore(Protocol):
    """The asynchronous side of a :class:`SharedLedger` (e.g. Redis): runs a batch of ops
    in one round trip, atomically each, and gives one ``(int, int)`` result per op;
    raises ``OSError`` (or its own error) when the store cannot be reached."""

    async def run(self, ops: Sequence[Op]) -> list[tuple[int, int]]: ...


# --------------------------------------------------------------------------- shared budgets


@dataclass(eq=False)
class Holding:
    """What one plan (then its connection) holds of the shared budgets, spent by the shaper
    without I/O: free slots and cells by budget key, the slots its lease uses, and how long
    the store said to wait for what it refused (nanoseconds, absolute, on the shaper's
    clock)."""

    slots: dict[Key, list[str]] = field(default_factory=dict)
    used: dict[Key, list[str]] = field(default_factory=dict)
    cells: Counter[Key] = field(default_factory=Counter)
    rates: dict[Key, Budget] = field(default_factory=dict)
    """The rate budget of each key in ``cells``."""
    refused_until: dict[Key, int] = field(default_factory=dict)


@dataclass
class _Slot:
    budget: Budget
    store_key: str
    registered: bool = True
    """False for a slot opened while the store was down (registered when it is back)."""


@dataclass
class _Spare:
    """Cells this node took from the store and no holding uses: given back after linger."""

    budget: Budget
    count: int = 0
    since: int = 0


class SharedLedger:
    """Budgets counted in a shared store, spent from holdings asked for ahead; see the
    module docstring. ``node`` names this process in slot members; ``now`` is the
    shaper's clock in nanoseconds wherever a method takes it."""

    def __init__(self, node: str, *, prefix: str = "egressd:", linger: float = 0.5) -> None:
        self.node = node
        self.prefix = prefix
        self.linger_ns = round(linger * NANOS)
        self.local = LocalLedger()
        self.shares = LocalLedger()
        """The rate budgets' local shares while the store is down."""
        self.down = False
        self.nodes = 1
        """Nodes last seen alive (the divisor of the local shares)."""
        self.slots: dict[str, _Slot] = {}
        """Every slot this node holds in the store (free, used, or spare), by member."""
        self.open_here: dict[Key, int] = {}
        self.spare_slots: dict[Key, list[str]] = {}
        self.spare_cells: dict[Key, _Spare] = {}
        self._ids = itertools.count(1)
        self._released: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ the shaper's questions

    def may_open(self, budget: Budget, holding: Holding | None) -> bool:
        if _is_local(budget):
            return self.local.may_open(budget)
        if self.down:
            return self.open_here.get(budget.key, 0) < share_of_limit(_limit(budget), self.nodes)
        if holding is None:  # a question without a plan (egressd explain): not asked ahead
            return True
        return bool(holding.slots.get(budget.key))

    def open(self, budget: Budget, holding: Holding | None) -> None:
        if _is_local(budget):
            self.local.open(budget)
            return
        assert holding is not None, "a shared connection budget needs a holding"
        free = holding.slots.get(budget.key)
        if free:
            member = free.pop()
        else:  # the store is down: a slot to register when it is back
            member = self._member()
            self.slots[member] = _Slot(budget, self.store_key(budget), registered=False)
        holding.used.setdefault(budget.key, []).append(member)
        self.open_here[budget.key] = self.open_here.get(budget.key, 0) + 1

    def close(self, budget: Budget, holding: Holding | None) -> None:
        if _is_local(budget):
            self.local.close(budget)
            return
        assert holding is not None, "a shared connection budget needs a holding"
        used = holding.used.get(budget.key)
        if not used:  # pragma: no cover - the shaper closes what it opened
            return
        member = used.pop()
        count = self.open_here.get(budget.key, 0) - 1
        if count > 0:
            self.open_here[budget.key] = count
        else:
            self.open_here.pop(budget.key, None)
        self._release_member(member)

    def wait_ns(self, budget: Budget, now: int, holding: Holding | None) -> int:
        if _is_local(budget):
            return self.local.wait_ns(budget, now)
        if self.down:
            return self.shares.wait_ns(self._share(budget), now)
        if holding is None or holding.cells[budget.key] > 0:  # None: see may_open
            return 0
        until = holding.refused_until.get(budget.key, 0)
        assert isinstance(budget.value, ThrottleSpec)
        return max(until - now, 1) if until > now else budget.value.interval_ns

    def take(self, budget: Budget, now: int, holding: Holding | None) -> None:
        if _is_local(budget):
            self.local.take(budget, now)
        elif holding is not None and holding.cells[budget.key] > 0:
            holding.cells[budget.key] -= 1
        else:  # the store is down (or came back since the check): the local share
            self.shares.take(self._share(budget), now)

    def expire(self, now: int) -> None:
        self.local.expire(now)
        self.shares.expire(now)

    def use(self, budget: Budget, now: int) -> str:
        if _is_local(budget):
            return self.local.use(budget, now)
        if budget.kind == "connections":
            here = f"{self.open_here.get(budget.key, 0)} open on this node"
            if self.down:
                return f"{here}, local share {share_of_limit(_limit(budget), self.nodes)}"
            return f"{here} (shared)"
        if self.down:
            return f"{self.shares.use(self._share(budget), now)} (local share)"
        spare = self.spare_cells.get(budget.key)
        return f"{spare.count if spare else 0} spare cells on this node (shared)"

    # ------------------------------------------------------------------ asking ahead

    def wants_to_open(self, holding: Holding, budgets: Iterable[Budget]) -> list[Want]:
        """What ``holding`` lacks to open a connection under ``budgets`` (the union over the
        candidate sources): one slot per connection budget, one cell per connection- and
        selection-rate budget. This node's spares are moved in first; what is returned must
        be asked of the store (:meth:`granted` takes the answers). Nothing while the store
        is down: the local shares answer then."""
        return self._wants(holding, budgets, _OPEN_KINDS)

    def wants_to_send(self, holding: Holding, budgets: Iterable[Budget]) -> list[Want]:
        """What ``holding`` lacks to send one message (message- and selection-rate cells)."""
        return self._wants(holding, budgets, _SEND_KINDS)

    def granted(self, wants: Sequence[Want], results: Sequence[tuple[int, int]], now: int) -> None:
        """The store's answers to ``wants``, in order: slots and cells go to their holdings
        (a batch's extra cells to the spare pool); a refusal notes when to ask again."""
        for want, (count, wait) in zip(wants, results, strict=True):
            op, key = want.op, want.budget.key
            if isinstance(op, AcquireSlot):
                if count:
                    self.slots[op.member] = _Slot(want.budget, op.store_key)
                    want.holding.slots.setdefault(key, []).append(op.member)
                else:
                    want.holding.refused_until[key] = now + wait * 1_000_000
            elif count:
                want.holding.cells[key] += 1
                want.holding.rates[key] = want.budget
                if count > 1:
                    self._add_spare_cells(want.budget, count - 1, now)
            else:
                want.holding.refused_until[key] = now + wait * 1_000

    def settle(self, holding: Holding, now: int) -> None:
        """The plan has picked (or given up), or the connection ended: what ``holding``
        holds and does not use goes to this node's spare pools."""
        for key, members in holding.slots.items():
            self.spare_slots.setdefault(key, []).extend(members)
        holding.slots.clear()
        for key, count in holding.cells.items():
            if count > 0:
                self._add_spare_cells(holding.rates[key], count, now)
        holding.cells.clear()
        holding.rates.clear()
        holding.refused_until.clear()

    def returns(self, now: int, *, everything: bool = False) -> list[Op]:
        """What goes back to the store now: released and spare slots, and spare cells
        unused for :attr:`linger` (all of them when ``everything``, e.g. at shutdown)."""
        if self.down:
            return []
        ops: list[Op] = []
        released = self._released
        self._released = {}
        for store_key, members in released.items():
            ops.append(ReleaseSlots(store_key, tuple(members)))
        old = now - self.linger_ns
        for pool in self.spare_slots.values():
            if not pool:
                continue
            store_key = self.slots[pool[0]].store_key
            for member in pool:
                del self.slots[member]
            ops.append(ReleaseSlots(store_key, tuple(pool)))
        self.spare_slots.clear()
        for key, spare in list(self.spare_cells.items()):
            if spare.count > 0 and (everything or spare.since <= old):
                assert isinstance(spare.budget.value, ThrottleSpec)
                ops.append(
                    GiveBackCells(self.store_key(spare.budget), spare.budget.value, spare.count)
                )
                del self.spare_cells[key]
        return ops

    def unsent(self, ops: Iterable[Op]) -> None:
        """``ops`` from :meth:`returns` could not reach the store: released slots are
        released with the next returns (cells given back are lost: the fleet under-spends
        by that many, never over-spends)."""
        for op in ops:
            if isinstance(op, ReleaseSlots):
                self._released.setdefault(op.store_key, []).extend(op.members)

    def renewals(self) -> list[RenewSlots]:
        """Every slot this node holds in the store, to renew (their expiry moves to the
        lease timeout from now) and to register if missing."""
        by_key: dict[str, list[str]] = {}
        for member, slot in self.slots.items():
            if slot.registered:
                by_key.setdefault(slot.store_key, []).append(member)
        return [RenewSlots(key, tuple(members)) for key, members in by_key.items()]

    # ------------------------------------------------------------------ the store goes, comes back

    def went_down(self, nodes: int) -> None:
        """The store cannot be reached: count every shared budget here, as a local share of
        ``nodes`` (the nodes last seen alive). Spares are forgotten: the store may be gone
        with them, and the shares start from this node's open connections."""
        self.down = True
        self.nodes = max(1, nodes)
        self.shares = LocalLedger()
        for pool in self.spare_slots.values():
            for member in pool:
                self.slots.pop(member, None)
        self.spare_slots.clear()
        self.spare_cells.clear()

    def came_back(self) -> list[RenewSlots]:
        """The store answers again: the ops that register every open connection of this
        node in it (those opened meanwhile too); the local shares are dropped. The shell
        runs the ops, then the store counts again."""
        for slot in self.slots.values():
            slot.registered = True
        self.down = False
        self.shares = LocalLedger()
        return self.renewals()

    # ------------------------------------------------------------------ names

    def store_key(self, budget: Budget) -> str:
        """The store's name of ``budget``: its kind, its key, and the spec's parameters
        (``limit`` for a connection budget; ``limit:max_burst:period`` for a rate, as
        KumoMTA names its throttles), so two specs never share a bucket by mistake."""
        value = budget.value
        parts = budget.key
        if isinstance(value, ThrottleSpec):
            if parts and parts[-1] == str(value):
                parts = parts[:-1]
            burst = value.limit if value.max_burst is None else value.max_burst
            params = f"{value.limit}:{burst}:{value.period}"
            kind = "gcra"
        else:
            params = str(_limit(budget))
            kind = "leases"
        name = ":".join(quote(part, safe="") for part in parts)
        return f"{self.prefix}{kind}:{name}:{params}"

    # ------------------------------------------------------------------ helpers

    def _wants(
        self, holding: Holding, budgets: Iterable[Budget], kinds: frozenset[str]
    ) -> list[Want]:
        wants: list[Want] = []
        seen: set[Key] = set()
        for budget in budgets:
            if budget.kind not in kinds or _is_local(budget) or budget.key in seen:
                continue
            seen.add(budget.key)
            op = None if self.down else self._want(holding, budget)
            if op is not None:
                wants.append(Want(op, holding, budget))
        return wants

    def _want(self, holding: Holding, budget: Budget) -> AcquireSlot | TakeCells | None:
        if budget.kind == "connections":
            if holding.slots.get(budget.key):
                return None
            spare = self.spare_slots.get(budget.key)
            if spare:
                member = spare.pop()
                holding.slots.setdefault(budget.key, []).append(member)
                return None
            return AcquireSlot(self.store_key(budget), self._member(), _limit(budget))
        if holding.cells[budget.key] > 0:
            return None
        spare_cells = self.spare_cells.get(budget.key)
        if spare_cells is not None and spare_cells.count > 0:
            spare_cells.count -= 1
            holding.cells[budget.key] += 1
            holding.rates[budget.key] = budget
            return None
        assert isinstance(budget.value, ThrottleSpec)
        return TakeCells(self.store_key(budget), budget.value, batch_size(budget.value))

    def _add_spare_cells(self, budget: Budget, count: int, now: int) -> None:
        spare = self.spare_cells.get(budget.key)
        if spare is None or spare.count == 0:
            spare = self.spare_cells[budget.key] = _Spare(budget, 0, now)
        spare.count += count

    def _release_member(self, member: str) -> None:
        """A connection ended: its slot is spare here (until the next :meth:`returns`), or,
        while the store is down, released when it is back."""
        slot = self.slots.get(member)
        if slot is None:  # pragma: no cover - every used member is held
            return
        if not self.down:
            self.spare_slots.setdefault(slot.budget.key, []).append(member)
            return
        del self.slots[member]
        if slot.registered:
            self._released.setdefault(slot.store_key, []).append(member)

    def _share(self, budget: Budget) -> Budget:
        assert isinstance(budget.value, ThrottleSpec)
        spec = share_of_throttle(budget.value, self.nodes)
        return dataclasses.replace(budget, value=spec)

    def _member(self) -> str:
        return f"{self.node}:{next(self._ids)}"


@dataclass(frozen=True)
class Want:
    """One op to ask of the store, and the holding and budget its answer is for."""

    op: AcquireSlot | TakeCells
    holding: Holding
    budget: Budget


_OPEN_KINDS = frozenset({"connections", "connection rate", "selection rate"})
_SEND_KINDS = frozenset({"message rate", "selection rate"})


def batch_size(spec: ThrottleSpec) -> int:
    """Cells asked of the store at once: 1% of the burst (at least 1)."""
    return max(1, math.floor(spec.burst * BATCH_FRACTION))


def share_of_limit(limit: int, nodes: int) -> int:
    """A node's share of a connection limit while the store is down (at least 1)."""
    return max(1, limit // max(1, nodes))


def share_of_throttle(spec: ThrottleSpec, nodes: int) -> ThrottleSpec:
    """A node's share of a rate while the store is down: ``limit / nodes`` per period,
    as many at once as its share of the burst (at least 1 per period)."""
    nodes = max(1, nodes)
    if nodes == 1:
        return spec
    limit = max(1, spec.limit // nodes)
    burst = min(limit, max(1, spec.burst // nodes))
    return ThrottleSpec(limit, spec.period, burst - 1 if burst < limit else None, True)


def _is_local(budget: Budget) -> bool:
    return bool(getattr(budget.value, "force_local", False))


def _limit(budget: Budget) -> int:
    assert isinstance(budget.value, LimitSpec)
    return budget.value.limit
