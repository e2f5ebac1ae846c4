"""The supervisor's book of shared budgets: one host's workers count in it; pure.

Theory of operation
-------------------
With ``[daemon] workers`` above 1 and the embedded state backend, the supervisor is the one
budget authority of the host: every worker's :class:`~egressd.shaping.ledger.SharedLedger`
asks it, over the worker's channel, exactly what it would ask Redis (the same ops, encoded
as for :data:`egressd.fleet.budgets.LEDGER_SCRIPT`), and :meth:`BudgetBook.run` answers with
the script's semantics on the supervisor's clock:

- ``A`` acquires a slot in a lease set if fewer than its limit are live (else: ms until the
  first one expires), ``R`` releases slots, ``N`` renews (re-adds) them;
- ``T`` takes up to a batch of cells from a GCRA (else: µs until one conforms), ``G`` gives
  cells back (the theoretical arrival time moves back one emission interval per cell);
- ``Q`` adds up to a batch to a counter without passing its limit (a warming source's
  messages of one day: :mod:`egressd.fleet.quotas`) and answers what it added and the
  count, ``U`` takes back what was not spent; a counter expires when the op says;
- ``H`` is a heartbeat in a node set, answering how many are alive.

One process answers every worker, one batch at a time, so the host's budgets are exact:
no slot or cell is granted twice, whatever the number of workers. Each slot and heartbeat
remembers the worker that holds it, so when a worker dies :meth:`BudgetBook.forget` returns
its slots at once (no lease timeout to wait for); the cells it had taken stay spent (at
most one batch per budget, 1% of the burst: the host under-spends, never over-spends).

Why the supervisor and not the SQLite database (``scripts/bench host-budgets``, on the
2-core development machine at load average 7.9): a round trip over the channel takes a
mean of 1.1 ms with one worker and 1.5 ms with two (99th percentile 9-12 ms: two processes
must each be scheduled); a ``BEGIN IMMEDIATE`` transaction takes 0.1 ms from one process,
0.4 ms with two writing at once (99th percentile 15 ms, worst 85 ms: SQLite's busy handler
sleeps while the other holds the lock). SQLite is quicker on average, but its waits are
spent *inside* the call, so the worker's event loop and every session it serves stop for
them, while a worker awaiting the supervisor keeps serving its other sessions; and a dead
worker's rows would stay in the database until someone removed them, where the supervisor
sees the channel close. The shared ledger asks ahead, in batches, and keeps spares, so most
connections and messages cost no exchange at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BudgetBook", "BudgetRequestError"]


class BudgetRequestError(ValueError):
    """A batch that does not follow the encoding (a worker's bug, not the budget's)."""


@dataclass
class _Gcra:
    tat_us: float
    expires_us: int


@dataclass
class BudgetBook:
    """Lease sets, GCRAs and node sets of one host, in memory (see the module doc)."""

    leases: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """Lease set -> member -> (expiry in ms, owner)."""
    gcras: dict[str, _Gcra] = field(default_factory=dict)
    nodes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Counter -> (count, expiry in ms)."""

    def run(self, owner: int, keys: Sequence[str], args: Sequence[str], now_us: int) -> list[int]:
        """One batch (``KEYS`` and ``ARGV`` as the script takes them): two integers per op."""
        if len(args) != 1 + 5 * len(keys):
            raise BudgetRequestError(f"{len(keys)} keys need {1 + 5 * len(keys)} arguments")
        try:
            timeout = int(args[0])
            out: list[int] = []
            for index, key in enumerate(keys):
                op = args[1 + 5 * index : 6 + 5 * index]
                out.extend(self._op(owner, key, op, now_us, timeout))
        except (ValueError, ZeroDivisionError) as exc:
            raise BudgetRequestError(f"malformed budget op: {exc}") from exc
        return out

    def forget(self, owner: int) -> int:
        """A worker died: its slots and heartbeats go at once; how many slots it held."""
        freed = 0
        for table in (self.leases, self.nodes):
            for key, members in list(table.items()):
                mine = [member for member, (_, holder) in members.items() if holder == owner]
                for member in mine:
                    del members[member]
                if table is self.leases:
                    freed += len(mine)
                if not members:
                    del table[key]
        return freed

    def open_slots(self, key: str, now_ms: int) -> int:
        """Live slots of lease set ``key`` (for status and tests)."""
        return sum(1 for expiry, _ in self.leases.get(key, {}).values() if expiry > now_ms)

    def slots(self, now_ms: int) -> dict[str, int]:
        """Live slots of every lease set that has any (``egressd status``)."""
        counts = {key: self.open_slots(key, now_ms) for key in self.leases}
        return {key: count for key, count in sorted(counts.items()) if count}

    # ------------------------------------------------------------------ ops

    def _op(
        self, owner: int, key: str, op: Sequence[str], now_us: int, timeout: int
    ) -> tuple[int, int]:
        code, p1, p2, p3, p4 = op
        now_ms = now_us // 1000
        if code == "A":
            return self._acquire(owner, key, p1, int(p2), now_ms, timeout)
        if code == "R":
            members = self.leases.get(key, {})
            for member in _members(p1):
                members.pop(member, None)
            return 0, 0
        if code == "N":
            members = self.leases.setdefault(key, {})
            for member in _members(p1):
                members[member] = (now_ms + timeout, owner)
            return 0, 0
        if code in ("T", "G"):
            return self._cells(
                key, code, float(p1), float(p2), int(float(p3)), int(float(p4)), now_us
            )
        if code == "Q":
            granted = self._count(key, int(p1), int(p2), int(p3), now_ms)
            return granted, self.count(key, now_ms)
        if code == "U":
            self._uncount(key, int(p1), int(p2), now_ms)
            return 0, 0
        if code == "H":
            nodes = self.nodes.setdefault(key, {})
            nodes[p1] = (now_ms + int(p2), owner)
            for node in [n for n, (expiry, _) in nodes.items() if expiry <= now_ms]:
                del nodes[node]
            return len(nodes), 0
        raise ValueError(f"unknown op {code!r}")

    def count(self, key: str, now_ms: int) -> int:
        """The counter ``key`` now (0 when missing or expired)."""
        count, expiry = self.counters.get(key, (0, 0))
        return count if expiry > now_ms else 0

    def _count(self, key: str, limit: int, quantity: int, ttl: int, now_ms: int) -> int:
        used = self.count(key, now_ms)
        granted = min(quantity, limit - used)
        if granted < 1:
            return 0
        if key not in self.counters:  # a new day's counter: yesterday's go
            self.counters = {k: c for k, c in self.counters.items() if c[1] > now_ms}
        self.counters[key] = (used + granted, now_ms + ttl)
        return granted

    def _uncount(self, key: str, quantity: int, ttl: int, now_ms: int) -> None:
        if key not in self.counters or self.counters[key][1] <= now_ms:
            self.counters.pop(key, None)
            return
        self.counters[key] = (max(0, self.count(key, now_ms) - quantity), now_ms + ttl)

    def _acquire(
        self, owner: int, key: str, member: str, limit: int, now_ms: int, timeout: int
    ) -> tuple[int, int]:
        members = self.leases.setdefault(key, {})
        for expired in [m for m, (expiry, _) in members.items() if expiry <= now_ms]:
            del members[expired]
        if len(members) < limit:
            members[member] = (now_ms + timeout, owner)
            return 1, 0
        first = min(expiry for expiry, _ in members.values())
        return 0, max(1, first - now_ms)

    def _cells(
        self,
        key: str,
        code: str,
        limit: float,
        period: float,
        burst: int,
        quantity: int,
        now_us: int,
    ) -> tuple[int, int]:
        interval = period * 1_000_000 / limit
        stored = self.gcras.get(key)
        tat = stored.tat_us if stored is not None and stored.expires_us > now_us else now_us
        tat = max(tat, now_us)
        if code == "G":
            tat -= quantity * interval
            self._store(key, tat, now_us)
            return 0, 0
        room = burst + math.floor((now_us - tat) / interval)
        granted = min(quantity, room)
        if granted < 1:
            return 0, max(1, math.ceil(tat + interval - interval * burst - now_us))
        self._store(key, tat + granted * interval, now_us)
        return granted, 0

    def _store(self, key: str, tat: float, now_us: int) -> None:
        if tat > now_us:
            self.gcras[key] = _Gcra(tat, math.ceil(tat))
        else:
            self.gcras.pop(key, None)


def _members(text: str) -> list[str]:
    return [member for member in text.split(",") if member]
