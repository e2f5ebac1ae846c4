"""Warm-up quotas shared by every process that shares the budgets; pure bookkeeping.

Theory of operation
-------------------
A warming source may send ``limit`` messages a day to a provider (:mod:`egressd.warmup`).
The engine of one process counts that process's messages only, so ``[daemon] workers = N``
or N daemons on one Redis would let a source send N times its quota. With shared budgets
(:class:`~egressd.fleet.budgets.FleetBudgets`: Redis, or the supervisor's book across
workers), :class:`SharedQuotas` stands between the egress plan and the engine: the day's
quota of (source, provider) is a **counter** in the store, keyed by the day in the plan's
time zone (``{prefix}quota:SOURCE:PROVIDER:YYYY-MM-DD``) and expiring a day after that day
ends, that never passes the quota (:class:`~egressd.shaping.ledger.TakeCount`).

Tickets are taken ahead, like the shaper's rate cells: before a plan picks
(:meth:`SharedQuotas.wants`, awaited by the executor through :meth:`FleetBudgets.
prepare_quotas <egressd.fleet.budgets.FleetBudgets.prepare_quotas>`), every warming
candidate source with no spare ticket here asks the store for a batch
(``max(1, limit // 100)``: the quota holds within 1%). The plan's synchronous questions
then need no I/O: a source with no ticket here is refused (:meth:`refusal`), so the pick
moves to another source; :meth:`reserve` spends a ticket, :meth:`release` puts it back
into the spare pool, a final reply (:meth:`record`) spends it for good. Spare tickets
unused for :attr:`linger_s` go back to the store (:meth:`returns`, run with the budgets'
give-backs), so another process may use them; at midnight the day changes, so the counter
does. A message counted without a ticket (a kept connection whose hold was given back
first) is added to the counter with the next give-back, whatever the limit (it was sent).

A restarted process (or a store restarted empty) does not find the day's messages in the
counter, but its engine read them back from the state store: the first ask of the day
raises the counter to at least the engine's count of the day (a seed op, in the same
round trip), so what was sent before counts. The engine is still asked first and still
counts every outcome: its steps, holds and
signals are unchanged, and its refusal (this process's count alone) is the weaker one.

**When the store is unreachable** (:meth:`went_down`), a quota is counted here as a *local
share*: ``limit // processes seen alive`` (at least 1) against this process's count of the
day, as the shaping budgets do (:func:`~egressd.shaping.ledger.share_of_limit`). Messages
sent meanwhile are added to the counter when the store is back (:meth:`came_back`).

Exactness: the store never grants more than the quota, so the fleet never sends more
(outside an outage); it may send less by the tickets a process holds when the day's traffic
stops (given back after :attr:`linger_s`) or loses when it dies (at most one batch).
No trio and no socket: the shell (:mod:`egressd.fleet.budgets`) runs the ops.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from egressd.shaping.ledger import GiveBackCount, Op, TakeCount, share_of_limit
from egressd.warmup import ALL_PROVIDERS, Warmup

__all__ = ["FORCED", "QuotaWant", "SharedQuotas", "quota_batch"]

FORCED = 1 << 50
"""The limit of a count added whatever the quota (messages already sent)."""

DAY_MS = 86_400_000

Pair = tuple[str, str]
DayKey = tuple[str, str, str]


def quota_batch(limit: int) -> int:
    """Tickets asked of the store at once: 1% of the day's quota (at least 1)."""
    return max(1, limit // 100)


@dataclass
class _Spare:
    count: int = 0
    since: float = 0.0


@dataclass(frozen=True)
class QuotaWant:
    """One op to ask of the store, and the (source, provider, day) its answer is for."""

    op: TakeCount
    key: DayKey
    seed: bool = False
    """Not a batch of tickets: a seed raises the counter to this process's count of the day
    (a ``TakeCount`` whose limit and quantity are that count adds what is missing, nothing
    when it is there); a look (quantity 0) reads it."""


class SharedQuotas:
    """The engine's quotas counted fleet-wide; see the module docstring. ``clock`` is the
    engine's (wall time, seconds)."""

    def __init__(self, engine: Warmup, *, prefix: str = "egressd:", linger: float = 0.5) -> None:
        self.engine = engine
        self.prefix = prefix
        self.linger_s = linger
        self.down = False
        self.nodes = 1
        self.spare: dict[DayKey, _Spare] = {}
        self.ticketed: Counter[Pair] = Counter()
        """Tickets spent by holds not yet ended (a release puts one back)."""
        self.owed: Counter[DayKey] = Counter()
        """Messages counted here and not yet in the store (added with the next returns)."""
        self._owed_keys: dict[str, DayKey] = {}
        self._seeded: set[DayKey] = set()
        """Counters this process raised to its own count of the day (see :meth:`wants`)."""

    # ------------------------------------------------------------------ Quotas

    def refusal(self, source: str, provider: str) -> str | None:
        refused = self.engine.refusal(source, provider)
        if refused is not None:
            return refused
        quota = self.engine.quota(source, provider)
        if quota is None:
            return None
        if self.down:
            share = share_of_limit(quota.limit, self.nodes)
            if quota.used + quota.in_flight < share:
                return None
            return (
                f"source {source!r} has used its local share ({share} of {quota.limit}) "
                f"of today's warm-up quota to {provider} (the shared store is unreachable)"
            )
        if self._spare(source, provider).count > 0:
            return None
        return (
            f"source {source!r} has used today's warm-up quota to {provider} "
            f"({quota.limit} messages, counted across the fleet)"
        )

    def reserve(self, source: str, provider: str) -> bool:
        if not self.engine.reserve(source, provider):
            return False
        spare = self._spare(source, provider)
        if not self.down and spare.count > 0:
            spare.count -= 1
            self.ticketed[(source, provider)] += 1
        return True

    def release(self, source: str, provider: str) -> None:
        self.engine.release(source, provider)
        if self.ticketed[(source, provider)] > 0:
            self.ticketed[(source, provider)] -= 1
            if not self.down:
                self._add_spare(self._key(source, provider), 1)

    def record(self, source: str, provider: str, outcome: str, *, reserved: bool = False) -> None:
        quota = self.engine.quota(source, provider)
        self.engine.record(source, provider, outcome, reserved=reserved)
        if quota is None:
            return
        pair = (source, provider)
        if reserved and self.ticketed[pair] > 0:
            self.ticketed[pair] -= 1  # its ticket is spent for good
            return
        spare = self._spare(source, provider)
        if not self.down and spare.count > 0:
            spare.count -= 1
        else:
            self.owed[self._key(source, provider)] += 1

    # ------------------------------------------------------------------ asking ahead

    def wants(self, sources: Iterable[str], provider: str) -> list[QuotaWant]:
        """What to ask the store before a plan picks among ``sources`` to ``provider``:
        a batch for each warming source with no spare ticket here (nothing while down)."""
        if self.down:
            return []
        wants: list[QuotaWant] = []
        for source in dict.fromkeys(sources):
            if self.engine.refusal(source, provider) is not None:
                continue
            quota = self.engine.quota(source, provider)
            if quota is None or self._spare(source, provider).count > 0:
                continue
            key = self._key(source, provider)
            store_key, ttl = self.store_key(key), self._ttl()
            if key not in self._seeded and quota.used > 0:
                seed = TakeCount(store_key, quota.used, quota.used, ttl)
                wants.append(QuotaWant(seed, key, seed=True))
            self._seeded.add(key)
            wants.append(
                QuotaWant(TakeCount(store_key, quota.limit, quota_batch(quota.limit), ttl), key)
            )
        return wants

    def looks(self) -> list[QuotaWant]:
        """A look at today's counter of every warming (source, provider) this process
        tracks (the shell asks with each heartbeat): the engine learns the fleet's count,
        so that a day whose messages went through other processes is a sending day here."""
        if self.down:
            return []
        looks: list[QuotaWant] = []
        for source, provider in self.engine.tracked():
            quota = self.engine.quota(source, provider) if provider != ALL_PROVIDERS else None
            if quota is not None:
                key = self._key(source, provider)
                op = TakeCount(self.store_key(key), quota.limit, 0, self._ttl())
                looks.append(QuotaWant(op, key, seed=True))
        return looks

    def granted(self, wants: Sequence[QuotaWant], results: Sequence[tuple[int, int]]) -> None:
        """The store's answers to ``wants``: the tickets granted are spare here, and the
        day's count so far goes to the engine (its sending days count the fleet's)."""
        now = self.engine.clock()
        for want, (count, total) in zip(wants, results, strict=True):
            if count > 0 and not want.seed:
                self._add_spare(want.key, count, now)
            self.engine.fleet_count(*want.key, total)

    def returns(self, *, everything: bool = False) -> list[Op]:
        """What goes to the store now: spare tickets unused for :attr:`linger_s` (all when
        ``everything``), and the messages counted here without a ticket."""
        if self.down:
            return []
        now = self.engine.clock()
        today = self.engine.calendar.day(now)
        ops: list[Op] = []
        ttl = self._ttl()
        for key, spare in list(self.spare.items()):
            if key[2] != today:
                del self.spare[key]  # yesterday's counter: nothing to give back to
            elif spare.count > 0 and (everything or spare.since <= now - self.linger_s):
                ops.append(GiveBackCount(self.store_key(key), spare.count, ttl))
                del self.spare[key]
        for key, count in self.owed.items():
            ops.append(TakeCount(self.store_key(key), FORCED, count, ttl))
            self._owed_keys[self.store_key(key)] = key
        self.owed.clear()
        return ops

    def unsent(self, ops: Iterable[Op]) -> None:
        """``ops`` from :meth:`returns` did not reach the store: the counts are owed again
        (tickets given back are lost: the fleet under-sends by that many)."""
        for op in ops:
            if isinstance(op, TakeCount) and op.store_key in self._owed_keys:
                self.owed[self._owed_keys[op.store_key]] += op.quantity

    # ------------------------------------------------------------------ the store goes, comes back

    def went_down(self, nodes: int) -> None:
        """Count local shares of ``nodes`` processes; spare tickets are forgotten."""
        self.down = True
        self.nodes = max(1, nodes)
        self.spare.clear()
        self._seeded.clear()  # the store may come back empty

    def came_back(self) -> None:
        """The store answers again: the next :meth:`returns` adds what was sent meanwhile."""
        self.down = False

    # ------------------------------------------------------------------ names

    def store_key(self, key: DayKey) -> str:
        source, provider, day = key
        return f"{self.prefix}quota:{quote(source, safe='')}:{quote(provider, safe='')}:{day}"

    def _key(self, source: str, provider: str) -> DayKey:
        return source, provider, self.engine.calendar.day(self.engine.clock())

    def _spare(self, source: str, provider: str) -> _Spare:
        return self.spare.get(self._key(source, provider)) or _Spare()

    def _ttl(self) -> int:
        """Counters expire a day after today ends (a clock a little behind still finds it)."""
        now = self.engine.clock()
        return max(1, round((self.engine.calendar.next_midnight(now) - now) * 1000)) + DAY_MS

    def _add_spare(self, key: DayKey, count: int, now: float | None = None) -> None:
        spare = self.spare.setdefault(key, _Spare())
        if spare.count == 0:
            spare.since = self.engine.clock() if now is None else now
        spare.count += count
