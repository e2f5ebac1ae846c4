"""Egress: pick a source, dial through it, account for its health, retry once elsewhere.

Theory of operation
-------------------
Every front door asks :meth:`Egress.connect` for a connection to a destination, naming
either a pool (the usual case) or an exact source (KumoMTA's BIND-then-CONNECT, a PROXY
header's source address). For a pool, the pool's smooth weighted round-robin selector picks
the next source, skipping sources that are suspended or at their connection cap.

A dial failure that is the source's fault (its address is not plumbed here, its hop is
unreachable or refuses) is recorded against the source, which may suspend it, and because
nothing reached the destination yet, the connection is retried once on the pool's next
source: one broken address does not fail traffic. Destination failures (refused, timeout)
are the destination's business and are returned to the caller; repeated timeouts and
unreachable errors still count softly against the source, since a blocked address looks
like that.

The deadline (``[dial] timeout``) covers each attempt: resolving, connecting and the hop's
handshake.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from egressd.config import Config, Source
from egressd.health import FailureKind, SourceHealth, policy_for
from egressd.log import get_logger
from egressd.net.dialer import Dialed, DialError, dial_within
from egressd.pools import NoSourcesAvailable, PoolSet, SelectionError

log = get_logger("egress")

T = TypeVar("T")

RefusalKind = Literal["unknown_pool", "no_sources", "source_limit", "unknown_source"]


class EgressRefused(Exception):
    """No connection was attempted: the pool or limits gave no source. Always temporary."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def health_kind(error: DialError) -> FailureKind | None:
    """Which kind of failure ``error`` counts as against its source, if any."""
    if error.kind == "unplumbed":
        return "unplumbed"
    if error.hop_fault:
        return "proxy_unhealthy"
    if error.kind in ("timeout", "unreachable") and error.stage == "connect":
        return "connect"  # a slow resolver is not the source's fault
    return None


@dataclass
class EgressObserver:
    """Hooks for metrics; each defaults to doing nothing."""

    dialed: Callable[[Source, float], None] = lambda source, seconds: None
    suspended: Callable[[Source, FailureKind], None] = lambda source, kind: None


@dataclass
class Egress:
    """One configuration generation's view of sources, pools and health."""

    config: Config
    pools: PoolSet
    health: SourceHealth
    observer: EgressObserver = field(default_factory=EgressObserver)

    def source_named(self, name: str) -> Source:
        try:
            return self.config.sources[name]
        except KeyError:
            raise EgressRefused("unknown_source", f'unknown source "{name}"') from None

    def pick(self, pool: str, avoid: frozenset[str] = frozenset()) -> Source:
        """The pool's next source that is not suspended, not at its cap and not avoided."""
        cap = self.config.limits.max_connections_per_source

        def skip(name: str) -> bool:
            return (
                name in avoid
                or self.health.is_suspended(name)
                or self.health.active_connections(name) >= cap
            )

        try:
            return self.config.sources[self.pools.next(pool, skip)]
        except NoSourcesAvailable as exc:
            if self._all_at_cap(pool):
                message = f"every source of pool {pool} is at max_connections_per_source ({cap})"
                raise EgressRefused("source_limit", message) from None
            raise EgressRefused("no_sources", str(exc)) from None
        except SelectionError as exc:
            raise EgressRefused("unknown_pool", str(exc)) from None

    def _all_at_cap(self, pool: str) -> bool:
        cap = self.config.limits.max_connections_per_source
        names = [e.source for e in self.pools.selector(pool).pool.entries if e.weight > 0]
        return bool(names) and all(self.health.active_connections(n) >= cap for n in names)

    async def connect(
        self,
        host: str,
        port: int | None,
        *,
        pool: str | None = None,
        source: Source | None = None,
    ) -> Dialed:
        """Dial ``host:port`` through ``source``, or through ``pool``'s next source.

        Raises :class:`EgressRefused` when no source could be chosen, and the dialer's
        :class:`DialError` when the dial failed (after the one retry a pool allows).
        """
        if source is not None:
            self._check_source_cap(source)
            return await self._dial(source, host, port)
        if pool is None:
            raise EgressRefused("unknown_pool", "no pool given")
        return await self.through_pool(pool, lambda picked: self._dial(picked, host, port))

    async def through_pool(self, pool: str, attempt: Callable[[Source], Awaitable[T]]) -> T:
        """Run ``attempt`` on the pool's next source, and once more on the following source
        when the first failed through its own fault (nothing reached the destination yet).

        Every front door's dialing goes through here, so the retry policy lives in one place.
        Raises :class:`EgressRefused` when the pool gives no source, else what ``attempt``
        raised (the first failure when no second source is available).
        """
        first = self.pick(pool)
        try:
            return await attempt(first)
        except DialError as exc:
            if not exc.source_fault:
                raise
            try:
                second = self.pick(pool, avoid=frozenset({first.name}))
            except EgressRefused:
                raise exc from None
            log.info(
                "retrying on the pool's next source",
                extra={"fields": {"pool": pool, "failed": first.name, "next": second.name}},
            )
            return await attempt(second)

    def _check_source_cap(self, source: Source) -> None:
        cap = self.config.limits.max_connections_per_source
        if self.health.active_connections(source.name) >= cap:
            raise EgressRefused(
                "source_limit", f"source {source.name} is at max_connections_per_source ({cap})"
            )

    async def _dial(self, source: Source, host: str, port: int | None) -> Dialed:
        """Dial, holding one of the source's connection slots while the dial is in flight.

        The slot makes concurrent dials count against ``max_connections_per_source``; the
        caller takes a slot of its own (``Runtime.source_in_use``) for the connection's life.
        """
        started = time.monotonic()
        self.health.connection_opened(source.name)
        try:
            dialed = await dial_within(self.config.dial.timeout, source, host, port)
        except DialError as exc:
            self._record_failure(source, exc)
            raise
        finally:
            self.health.connection_closed(source.name)
        self.observer.dialed(source, time.monotonic() - started)
        self.health.record_success(source.name)
        return dialed

    def _record_failure(self, source: Source, error: DialError) -> None:
        kind = health_kind(error)
        if kind is None:
            return
        policy = policy_for(source, kind, self.config.health)
        if self.health.record_failure(source.name, kind, str(error), policy):
            log.warning(
                "source suspended",
                extra={
                    "fields": {
                        "source": source.name,
                        "kind": kind,
                        "for_seconds": policy.duration,
                        "reason": str(error),
                    }
                },
            )
            self.observer.suspended(source, kind)
