"""Pools: smooth weighted round-robin over a pool's sources.

Theory of operation
-------------------
nginx's smooth weighted round-robin: every source keeps a ``current`` score. On each pick,
every eligible source adds its weight to its score; the source with the highest score wins
and loses the sum of the eligible weights. Weights 2:1 give ``a b a a b a ...``; 5:1:1 gives
``a a b a c a a`` rather than five a's in a row. Over every window of ``sum(weights)`` picks,
each source is picked exactly ``weight`` times, and the sequence is deterministic.

KumoMTA's own rotation is LVS-style weighted round-robin, which sends the heavy source of a
100:1 pool 100 times in a row; egressd interleaves instead.

A source of weight 0 stays in the configuration but out of rotation. A source that the
health tracker has suspended is skipped: it neither gains nor loses score while it is out,
exactly like a "down" peer in nginx. A pool with nothing eligible raises
:class:`NoSourcesAvailable`, which the front doors turn into a temporary failure.

One :class:`PoolSelector` per pool lives for the whole process; :class:`PoolSet` carries the
selectors across a configuration reload, keeping the state of every pool whose entries did
not change. This module is pure: no trio, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from egressd.config import Config, Pool, PoolEntry


class SelectionError(Exception):
    """A pool could not give a source; the message is fit for an operator and an MTA."""


class UnknownPool(SelectionError):
    def __init__(self, pool: str) -> None:
        super().__init__(f'unknown pool "{pool}"')
        self.pool = pool


class NoSourcesAvailable(SelectionError):
    def __init__(self, pool: str, *, all_suspended: bool = False) -> None:
        reason = " (every source is suspended)" if all_suspended else ""
        super().__init__(f"no sources available in pool {pool}{reason}")
        self.pool = pool
        self.all_suspended = all_suspended


@dataclass
class _Peer:
    name: str
    weight: int
    current: int = 0


class PoolSelector:
    """Smooth weighted round-robin over one pool's entries."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._peers = [_Peer(e.source, e.weight) for e in pool.entries if e.weight > 0]

    @property
    def name(self) -> str:
        return self.pool.name

    def shares(self) -> dict[str, float]:
        """Each source's share of picks in percent (weight-0 sources get 0)."""
        total = sum(e.weight for e in self.pool.entries)
        return {e.source: (100.0 * e.weight / total if total else 0.0) for e in self.pool.entries}

    def next(self, skip: Callable[[str], bool] | None = None) -> str:
        """The next source's name; sources for which ``skip`` is true sit this pick out.

        One pass, without a list of the eligible ones (a pool's pick is made for every
        SOCKS5 session: the list and its comprehension were a tenth of the pick's calls).
        """
        total = 0
        best: _Peer | None = None
        for peer in self._peers:
            if skip is not None and skip(peer.name):
                continue
            peer.current += peer.weight
            total += peer.weight
            if best is None or peer.current > best.current:
                best = peer
        if best is None:
            raise NoSourcesAvailable(self.name, all_suspended=bool(self._peers))
        best.current -= total
        return best.name

    def take(self, count: int) -> list[str]:
        return [self.next() for _ in range(count)]


class PoolSet:
    """The process's selectors, one per pool, rebuilt (and mostly kept) on reload."""

    def __init__(self, pools: Mapping[str, Pool], previous: PoolSet | None = None) -> None:
        self._selectors: dict[str, PoolSelector] = {}
        for name, pool in pools.items():
            kept = previous._selectors.get(name) if previous is not None else None
            if kept is not None and _same_entries(kept.pool.entries, pool.entries):
                self._selectors[name] = kept
            else:
                self._selectors[name] = PoolSelector(pool)

    @classmethod
    def from_config(cls, config: Config, previous: PoolSet | None = None) -> PoolSet:
        return cls(config.pools, previous)

    def __contains__(self, pool: str) -> bool:
        return pool in self._selectors

    def selector(self, pool: str) -> PoolSelector:
        try:
            return self._selectors[pool]
        except KeyError:
            raise UnknownPool(pool) from None

    def next(self, pool: str, skip: Callable[[str], bool] | None = None) -> str:
        return self.selector(pool).next(skip)


def _same_entries(a: Iterable[PoolEntry], b: Iterable[PoolEntry]) -> bool:
    return list(a) == list(b)
