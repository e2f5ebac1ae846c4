"""Which source: one configuration generation's pools, health and limits.

An :class:`Egress` bundles one validated configuration with the process's pool selectors
(smooth weighted round-robin, :mod:`egressd.pools`), source health
(:mod:`egressd.health`) and destination circuit breaker (:mod:`egressd.egress.breaker`).
A reload builds a new one around the same health and breaker; sessions keep the
generation they started with.

:meth:`Egress.pick` gives a pool's next source, skipping sources that are suspended, at
``max_connections_per_source`` or in the caller's avoid list; :meth:`Egress.check_cap`
guards an exact source (KumoMTA's BIND, a PROXY header). Both raise
:class:`~egressd.egress.failures.EgressFailure` of a ``NOBODY`` kind. Pure: no trio.

Warm-up (:mod:`egressd.warmup`) is heard through :attr:`Egress.quotas`
(:mod:`egressd.egress.quotas`): a source that has used today's quota to the destination's
provider (messages in flight included) is not eligible, so the pool's other sources share
the traffic by smooth weighted round-robin; when no source is left for that reason, the
failure is ``WARMUP_QUOTA`` and its detail names plan, step and reset time (overflow,
never refusal, as long as a warm source is left). :meth:`Egress.check_quota` guards an
exact source the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from egressd.config import Config, IPAddress, Source
from egressd.egress.breaker import DestinationBreaker
from egressd.egress.budgets import DestinationBudget
from egressd.egress.failures import EgressFailure, Failure
from egressd.egress.quotas import NoQuotas, Quotas
from egressd.health import FailureKind, SourceHealth
from egressd.pools import NoSourcesAvailable, PoolSet, SelectionError

__all__ = ["Egress", "EgressObserver"]


@dataclass
class EgressObserver:
    """Hooks for metrics; each defaults to doing nothing."""

    dialed: Callable[[Source, float], None] = lambda source, seconds: None
    suspended: Callable[[Source, FailureKind], None] = lambda source, kind: None
    failed: Callable[[Source, FailureKind], None] = lambda source, kind: None


@dataclass
class Egress:
    """One configuration generation's view of sources, pools, health and destinations."""

    config: Config
    pools: PoolSet
    health: SourceHealth
    observer: EgressObserver = field(default_factory=EgressObserver)
    breaker: DestinationBreaker = field(default_factory=DestinationBreaker)
    quotas: Quotas = field(default_factory=NoQuotas)
    """Warm-up quotas per (source, provider): refused when used, held from the pick."""
    budget_for: Callable[[str | IPAddress], DestinationBudget | None] = lambda host: None
    """The shaping budgets towards a SOCKS5/PROXY destination (a name or an address);
    None without shaping (:mod:`egressd.egress.budgets`)."""

    def source_named(self, name: str) -> Source:
        try:
            return self.config.sources[name]
        except KeyError:
            raise EgressFailure(Failure.UNKNOWN_SOURCE, f'unknown source "{name}"') from None

    def pick(
        self,
        pool: str,
        avoid: frozenset[str] = frozenset(),
        provider: str = "other",
        budget: DestinationBudget | None = None,
    ) -> Source:
        """The pool's next source that is not suspended, not at its cap, not avoided,
        not out of its warm-up quota to ``provider`` and within its ``budget`` for the
        destination (:mod:`egressd.egress.budgets`)."""
        cap = self.config.limits.max_connections_per_source
        quota_used: list[str] = []
        over_budget: list[str] = []

        def skip(name: str) -> bool:
            if (
                name in avoid
                or self.health.is_suspended(name)
                or self.health.active_connections(name) >= cap
            ):
                return True
            refusal = self.quotas.refusal(name, provider)
            if refusal is not None:
                quota_used.append(refusal)
                return True
            return _over_budget(budget, name, over_budget)

        try:
            return self.config.sources[self.pools.next(pool, skip)]
        except NoSourcesAvailable as exc:
            if over_budget and budget is not None:
                raise EgressFailure(Failure.BUDGET, budget.exhausted(pool)) from None
            if quota_used:
                detail = "; ".join(quota_used)
                raise EgressFailure(
                    Failure.WARMUP_QUOTA, f"every source is out of its warm-up quota: {detail}"
                ) from None
            if self._all_at_cap(pool):
                message = f"every source of pool {pool} is at max_connections_per_source ({cap})"
                raise EgressFailure(Failure.SOURCE_LIMIT, message) from None
            raise EgressFailure(Failure.NO_SOURCES, str(exc)) from None
        except SelectionError as exc:
            raise EgressFailure(Failure.UNKNOWN_POOL, str(exc)) from None

    def refusal(
        self,
        pool: str,
        provider: str = "other",
        budget: DestinationBudget | None = None,
        leaving: str | None = None,
    ) -> EgressFailure | None:
        """What :meth:`pick` would raise now, or None when it would pick a source; the
        rotation does not move. ``leaving``: a source whose one open connection is about
        to close (a kept SMTP connection asks before it gives up its source)."""
        cap = self.config.limits.max_connections_per_source
        try:
            entries = self.pools.selector(pool).pool.entries
        except SelectionError as exc:
            return EgressFailure(Failure.UNKNOWN_POOL, str(exc))
        for entry in entries:
            name = entry.source
            connections = self.health.active_connections(name) - (name == leaving)
            if (
                entry.weight > 0
                and not self.health.is_suspended(name)
                and connections < cap
                and self.quotas.refusal(name, provider) is None
                and (budget is None or budget.refusal(name) is None)
            ):
                return None
        try:
            self.pick(pool, provider=provider, budget=budget)  # raises: nobody is eligible
        except EgressFailure as failure:
            return failure
        return None  # pragma: no cover - unreachable while the checks above are pick's

    def check_budget(self, source: Source, budget: DestinationBudget | None) -> None:
        """Raise ``BUDGET`` when an exact ``source`` may not connect to the destination."""
        refusal = budget.refusal(source.name) if budget is not None else None
        if refusal is not None:
            raise EgressFailure(Failure.BUDGET, refusal, source=source.name)

    def check_quota(self, source: Source, provider: str) -> None:
        """Raise ``WARMUP_QUOTA`` when an exact ``source`` has used its warm-up quota to
        ``provider`` (in-flight messages included)."""
        refusal = self.quotas.refusal(source.name, provider)
        if refusal is not None:
            raise EgressFailure(Failure.WARMUP_QUOTA, refusal, source=source.name)

    def check_cap(self, source: Source) -> None:
        """Raise ``SOURCE_LIMIT`` when ``source`` is at ``max_connections_per_source``."""
        cap = self.config.limits.max_connections_per_source
        if self.health.active_connections(source.name) >= cap:
            raise EgressFailure(
                Failure.SOURCE_LIMIT,
                f"source {source.name} is at max_connections_per_source ({cap})",
                source=source.name,
            )

    def _all_at_cap(self, pool: str) -> bool:
        cap = self.config.limits.max_connections_per_source
        names = [e.source for e in self.pools.selector(pool).pool.entries if e.weight > 0]
        return bool(names) and all(self.health.active_connections(n) >= cap for n in names)


def _over_budget(budget: DestinationBudget | None, name: str, refusals: list[str]) -> bool:
    """The budget check of :meth:`Egress.pick`: True (the reason noted) when ``name`` may
    not connect to the plan's destination now."""
    refusal = budget.refusal(name) if budget is not None else None
    if refusal is not None:
        refusals.append(refusal)
    return refusal is not None
