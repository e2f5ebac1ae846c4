"""The shaper: may this source open a connection, or send a message, to this destination now?

Theory of operation
-------------------
A :class:`Shaper` holds the live state of shaping for one process, with no I/O and no clock of
its own (``clock()`` returns seconds; trio's ``current_time`` in the daemon, a fake in tests):

- **leases** count open connections per connection budget (``connection_limit`` per (source,
  site), named ``additional_connection_limits`` and ``provider_connection_limit``). A
  :class:`Lease` is taken by :meth:`Shaper.open` and given back by :meth:`Lease.release`,
  however the connection ends (it is a context manager, and releasing twice is harmless);
- **buckets** are one :class:`~egressd.shaping.throttle.Gcra` per rate budget;
- both are counted by the shaper's **ledger** (:mod:`egressd.shaping.ledger`): in this
  process by default, or in a store shared by a fleet, where a plan or a connection spends
  what its :class:`~egressd.shaping.ledger.Holding` was granted ahead (``holding=``);
- **suspensions** and **overrides** come from reply rules (:meth:`Shaper.reply`) or from an
  operator (:meth:`Shaper.suspend`), each with its scope, its rule and its expiry;
- **failures** count consecutive failed connections per (source, site); when
  ``consecutive_connection_failures_before_delay`` is reached, that path is held for
  ``failure_hold`` seconds, then tried again (a success clears the count).

Every "no" is a :class:`Refusal` naming the budget and its value, e.g. ``connection_limit 5
reached for source "ip-1" to site "mx.example"``; :func:`refusal_summary` phrases the
reply a door gives when no source of a pool may go.

Wiring
------
The daemon loads the policy (:mod:`egressd.net.shaping`) and keeps one
``Shaper(policy, trio.current_time)``; ``replace_policy`` on reload, ``expire()`` every few
seconds. Each outbound plan is handed a ``ShapedDestination`` (:mod:`egressd.net.shaping`):
selection skips the sources :meth:`check_open` (and, at the SMTP door, :meth:`check_send`)
refuse, the picked one's :class:`Lease` comes from :meth:`open`, every failed attempt goes
to :meth:`attempt_failed` and a made connection to :meth:`connected`, and the lease is
released when the connection ends; when every source is refused, :func:`refusal_summary`
is the 451 text. The SMTP door calls ``lease.send()`` before each MAIL and :meth:`reply`
with every remote reply, from the banner on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from egressd.shaping.ledger import Holding, Ledger, LocalLedger
from egressd.shaping.params import Origin, Params
from egressd.shaping.policy import BoundRule, Budget, Limits, ScopeKind, ShapingPolicy, scope_names
from egressd.shaping.rules import Rule, SetConfig, Suspend, ThresholdWindow, screen
from egressd.shaping.sites import Destination, quoted
from egressd.shaping.throttle import NANOS, Gcra, LimitSpec

Scope = tuple[str, ScopeKind, str]
"""(source, "site" | "provider" | "domain", name)."""

_LIMITS_CACHE_SIZE = 4096
_Rules = tuple[list[BoundRule], "re.Pattern[str] | None"]


@dataclass(frozen=True)
class Refusal:
    """Why a source may not go now: the budget (``connection_limit``...), a sentence, a wait."""

    source: str
    budget: str
    reason: str
    retry_after: float | None = None
    origin: Origin | None = None


@dataclass(frozen=True)
class Suspension:
    """No connection or message in ``scope`` until ``until`` (clock seconds)."""

    scope: Scope
    until: float
    reason: str


@dataclass(frozen=True)
class Override:
    """``params`` replace the configured values in ``scope`` until ``until``."""

    scope: Scope
    until: float
    name: str
    params: Params
    reason: str


Effect = Suspension | Override


@dataclass
class _FailureState:
    count: int = 0
    held_until: float = 0.0


@dataclass(eq=False)
class Lease:
    """One connection's place in its connection budgets; also counts its messages."""

    shaper: Shaper
    source: str
    destination: Destination
    limits: Limits
    messages: int = 0
    released: bool = field(default=False)
    holding: Holding | None = None
    """What this connection holds of shared budgets (None: counted in this process)."""

    def send(self) -> Refusal | None:
        """May this connection carry one more message now? If so, it is counted."""
        return self.shaper.send(self)

    def connected(self) -> None:
        """The connection was established: the path's failure count starts again."""
        self.shaper.connected(self)

    def failed(self) -> None:
        """The connection could not be established; the lease is released."""
        self.shaper.failed(self)

    def release(self) -> None:
        """Give the connection budgets back (idempotent)."""
        if not self.released:
            self.released = True
            self.shaper._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Shaper:
    """Budgets, leases, suspensions and overrides for one process; pure."""

    def __init__(
        self,
        policy: ShapingPolicy,
        clock: Callable[[], float],
        *,
        failure_hold: float = 60.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.failure_hold = failure_hold
        self.ledger: Ledger = ledger if ledger is not None else LocalLedger()
        self.suspensions: dict[Scope, Suspension] = {}
        self.overrides: dict[tuple[Scope, str, str], Override] = {}
        self.windows: dict[tuple[int, Scope], ThresholdWindow] = {}
        self.failures: dict[tuple[str, str], _FailureState] = {}
        self._limits_cache: dict[tuple[str, Destination], Limits] = {}
        self._rules_cache: dict[Destination, _Rules] = {}
        self._overrides_change_at = math.inf

    @property
    def leases(self) -> dict[tuple[str, ...], int]:
        """Open connections per budget counted in this process."""
        return self.ledger.local.leases

    @property
    def buckets(self) -> dict[tuple[str, ...], Gcra]:
        """Rate buckets counted in this process."""
        return self.ledger.local.buckets

    def replace_policy(self, policy: ShapingPolicy) -> None:
        """Use reloaded shaping files; leases, buckets, suspensions and overrides stay.

        Open leases keep the budgets they were taken with, so they are given back exactly.
        Threshold counts start again: the rules they counted for may have changed.
        """
        self.policy = policy
        self.windows.clear()
        self._limits_cache.clear()
        self._rules_cache.clear()

    # ------------------------------------------------------------------ queries

    def limits(self, source: str, destination: Destination) -> Limits:
        """The effective limits now, with any active overrides."""
        if self.clock() >= self._overrides_change_at:
            self._drop_expired_overrides()
        key = (source, destination)
        limits = self._limits_cache.get(key)
        if limits is None:
            if len(self._limits_cache) >= _LIMITS_CACHE_SIZE:
                self._limits_cache.clear()
            overrides = [o.params for o in self._overrides_for(source, destination)]
            limits = self.policy.limits(source, destination, overrides)
            self._limits_cache[key] = limits
        return limits

    def check_open(
        self, source: str, destination: Destination, holding: Holding | None = None
    ) -> Refusal | None:
        """Would :meth:`open` succeed now? Changes nothing."""
        limits = self.limits(source, destination)
        return self._connect_refusal(limits, destination, holding)

    def suspension(self, source: str, destination: Destination) -> Refusal | None:
        """The refusal of an active suspension of ``source`` there, or None."""
        return self._suspension_refusal(source, destination)

    def check_send(
        self, source: str, destination: Destination, holding: Holding | None = None
    ) -> Refusal | None:
        """Would a new connection's first :meth:`send` pass the message rates now? Changes
        nothing (the SMTP door's selection asks it, so a used-up rate costs no connection)."""
        limits = self.limits(source, destination)
        rates = limits.of_kind("message rate")
        return self._rate_refusal(source, destination, rates, holding)

    def open(
        self, source: str, destination: Destination, holding: Holding | None = None
    ) -> Lease | Refusal:
        """Take a connection lease and a connection-rate cell, or say why not."""
        limits = self.limits(source, destination)
        refusal = self._connect_refusal(limits, destination, holding)
        if refusal is not None:
            return refusal
        now = self._now_ns()
        for budget in limits.of_kind("connection rate"):
            self.ledger.take(budget, now, holding)
        for budget in limits.of_kind("connections"):
            self.ledger.open(budget, holding)
        return Lease(self, source, destination, limits, holding=holding)

    def send(self, lease: Lease) -> Refusal | None:
        """Count one message on ``lease`` if every message budget allows it now."""
        if lease.released:
            raise ValueError("send() on a released lease")
        limits = lease.limits
        refusal = self._suspension_refusal(lease.source, lease.destination)
        if refusal is None:
            refusal = self._deliveries_refusal(lease)
        if refusal is None:
            rates = limits.message_budgets
            refusal = self._rate_refusal(lease.source, lease.destination, rates, lease.holding)
        if refusal is not None:
            return refusal
        now = self._now_ns()
        for budget in limits.message_budgets:
            self.ledger.take(budget, now, lease.holding)
        lease.messages += 1
        return None

    # ------------------------------------------------------------------ events

    def connected(self, lease: Lease) -> None:
        self.failures.pop((lease.source, lease.destination.site), None)

    def failed(self, lease: Lease) -> None:
        self.attempt_failed(lease)
        lease.release()

    def attempt_failed(self, lease: Lease) -> None:
        """One failed connection attempt on ``lease``'s path, which it keeps (the plan goes
        on to the next address): ``consecutive_connection_failures_before_delay`` of them
        in a row hold the (source, site) path for ``failure_hold`` seconds."""
        state = self.failures.setdefault((lease.source, lease.destination.site), _FailureState())
        state.count += 1
        if state.count >= max(1, lease.limits.failures_before_delay.value):
            state.held_until = self.clock() + self.failure_hold

    def reply(self, source: str, destination: Destination, reply: str) -> list[Effect]:
        """Apply the reply rules to a remote reply (one line, see ``rules.reply_line``)."""
        rules, found = self._rules_for(destination)
        if not rules or (found is not None and found.search(reply) is None):
            return []  # most replies: one search, no rule matches
        now = self.clock()
        effects: list[Effect] = []
        for bound in rules:
            if not bound.rule.matches(reply):
                continue
            scope_kind, scope_name = scope_names(bound, destination)
            scope: Scope = (source, scope_kind, scope_name)
            if not self._triggered(bound.rule, scope, now):
                continue
            effects.extend(self._act(bound.rule, scope, destination, now))
        return effects

    def suspend(self, scope: Scope, duration: float, reason: str) -> Suspension:
        """An operator's suspension (``egressd suspend --provider/--site``)."""
        return self._add_suspension(Suspension(scope, self.clock() + duration, reason))

    def restore_override(self, override: Override) -> None:
        """Put back an override that was in force before a restart (:mod:`egressd.warming`)."""
        key = (override.scope, override.name, override.reason)
        self.overrides[key] = override
        self._limits_cache.clear()
        self._overrides_change_at = min(self._overrides_change_at, override.until)

    def resume(self, scope: Scope) -> bool:
        """Lift a suspension; True when there was one."""
        return self.suspensions.pop(scope, None) is not None

    def active(self) -> list[Effect]:
        """Active suspensions and overrides, soonest expiry first (for ``egressd status``)."""
        self.expire()
        effects: list[Effect] = [*self.suspensions.values(), *self.overrides.values()]
        return sorted(effects, key=lambda effect: (effect.until, effect.scope))

    def expire(self) -> None:
        """Forget what has expired: suspensions, overrides, full buckets, empty windows.

        Checks never depend on this (each compares expiry times itself); the caller runs it
        every few seconds to keep memory bounded by what is active.
        """
        now = self.clock()
        for scope in [s for s, item in self.suspensions.items() if item.until <= now]:
            del self.suspensions[scope]
        self._drop_expired_overrides()
        self.ledger.expire(round(now * NANOS))
        for window in self.windows.values():
            window.forget_before(now)
        for window_key in [k for k, window in self.windows.items() if not window.times]:
            del self.windows[window_key]

    def usage(self, source: str, destination: Destination) -> list[str]:
        """What is used of each budget now, and any suspension (for ``egressd explain``)."""
        limits = self.limits(source, destination)
        now = self._now_ns()
        lines = []
        for budget in limits.budgets:
            lines.append(f"{budget.describe()}: {self.ledger.use(budget, now)}")
        refusal = self._suspension_refusal(source, destination) or self._failure_refusal(limits)
        if refusal is not None:
            lines.append(refusal.reason)
        return lines

    def _drop_expired_overrides(self) -> None:
        now = self.clock()
        expired = [key for key, item in self.overrides.items() if item.until <= now]
        for key in expired:
            del self.overrides[key]
        if expired:
            self._limits_cache.clear()
        self._overrides_change_at = min(
            (o.until for o in self.overrides.values()), default=math.inf
        )

    # ------------------------------------------------------------------ checks

    def _connect_refusal(
        self, limits: Limits, destination: Destination, holding: Holding | None
    ) -> Refusal | None:
        source = limits.source
        refusal = self._suspension_refusal(source, destination)
        if refusal is None:
            refusal = self._failure_refusal(limits)
        if refusal is None:
            budgets = limits.of_kind("connections")
            refusal = self._lease_refusal(source, destination, budgets, holding)
        if refusal is None:
            rates = limits.of_kind("connection rate") + limits.of_kind("selection rate")
            refusal = self._rate_refusal(source, destination, rates, holding)
        return refusal

    def _suspension_refusal(self, source: str, destination: Destination) -> Refusal | None:
        if not self.suspensions:  # the usual case, asked for every message
            return None
        now = self.clock()
        for scope in self._scopes(source, destination):
            suspension = self.suspensions.get(scope)
            if suspension is not None and suspension.until > now:
                _, kind, name = scope
                return Refusal(
                    source,
                    "suspended",
                    f"source {quoted(source)} is suspended for {kind} {quoted(name)} "
                    f"for {suspension.until - now:.0f}s more ({suspension.reason})",
                    suspension.until - now,
                )
        return None

    def _failure_refusal(self, limits: Limits) -> Refusal | None:
        state = self.failures.get((limits.source, limits.site))
        now = self.clock()
        if state is None or state.held_until <= now:
            return None
        setting = limits.failures_before_delay
        return Refusal(
            limits.source,
            "consecutive_connection_failures_before_delay",
            f"consecutive_connection_failures_before_delay {setting.value} reached for source "
            f"{quoted(limits.source)} to site {quoted(limits.site)} ({state.count} failed "
            f"connections in a row; next try in {state.held_until - now:.0f}s)",
            state.held_until - now,
            setting.origin,
        )

    def _lease_refusal(
        self,
        source: str,
        destination: Destination,
        budgets: Sequence[Budget],
        holding: Holding | None,
    ) -> Refusal | None:
        for budget in budgets:
            assert isinstance(budget.value, LimitSpec)
            if not self.ledger.may_open(budget, holding):
                return Refusal(
                    source,
                    budget.label,
                    f"{budget.describe()} reached for source {quoted(source)} "
                    f"{_towards(budget, destination)} ({budget.origin})",
                    None,
                    budget.origin,
                )
        return None

    def _rate_refusal(
        self,
        source: str,
        destination: Destination,
        budgets: Sequence[Budget],
        holding: Holding | None = None,
    ) -> Refusal | None:
        now = self._now_ns()
        for budget in budgets:
            wait = self.ledger.wait_ns(budget, now, holding)
            if wait:
                return Refusal(
                    source,
                    budget.label,
                    f"{budget.describe()} used up for source {quoted(source)} "
                    f"{_towards(budget, destination)}; next in {wait / NANOS:.3g}s "
                    f"({budget.origin})",
                    wait / NANOS,
                    budget.origin,
                )
        return None

    def _deliveries_refusal(self, lease: Lease) -> Refusal | None:
        setting = lease.limits.max_deliveries_per_connection
        if lease.messages < setting.value:
            return None
        return Refusal(
            lease.source,
            "max_deliveries_per_connection",
            f"max_deliveries_per_connection {setting.value} reached on this connection "
            f"({setting.origin})",
            None,
            setting.origin,
        )

    # ------------------------------------------------------------------ rules

    def _rules_for(self, destination: Destination) -> _Rules:
        """The destination's rules and their :func:`~egressd.shaping.rules.screen`."""
        found = self._rules_cache.get(destination)
        if found is None:
            if len(self._rules_cache) >= _LIMITS_CACHE_SIZE:
                self._rules_cache.clear()
            rules = self.policy.rules_for(destination)
            found = self._rules_cache[destination] = (rules, screen([b.rule for b in rules]))
        return found

    def _triggered(self, rule: Rule, scope: Scope, now: float) -> bool:
        if rule.threshold is None:
            return True
        key = (id(rule), scope)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = ThresholdWindow(rule.threshold)
        return window.record(now)

    def _act(self, rule: Rule, scope: Scope, destination: Destination, now: float) -> list[Effect]:
        until = now + rule.duration
        reason = f"rule {rule.label}: /{rule.regex_text}/"
        effects: list[Effect] = []
        for action in rule.actions:
            if isinstance(action, Suspend):
                target = scope if scope[1] != "domain" else (scope[0], "site", destination.site)
                effects.append(self._add_suspension(Suspension(target, until, reason)))
            elif isinstance(action, SetConfig):
                effects.append(self._add_override(action, scope, destination, until, reason))
        return effects

    def _add_suspension(self, suspension: Suspension) -> Suspension:
        current = self.suspensions.get(suspension.scope)
        if current is None or current.until < suspension.until:
            self.suspensions[suspension.scope] = suspension
        return self.suspensions[suspension.scope]

    def _add_override(
        self, action: SetConfig, scope: Scope, destination: Destination, until: float, reason: str
    ) -> Override:
        if action.domain_only and destination.domain is not None:
            scope = (scope[0], "domain", destination.domain.lower().rstrip("."))
        override = Override(scope, until, action.name, action.params, reason)
        key = (scope, action.name, reason)
        self.overrides.pop(key, None)  # re-inserted last: the newest override wins
        self.overrides[key] = override
        self._limits_cache.clear()
        self._overrides_change_at = min(self._overrides_change_at, until)
        return override

    def _overrides_for(self, source: str, destination: Destination) -> list[Override]:
        scopes = set(self._scopes(source, destination))
        now = self.clock()
        return [o for o in self.overrides.values() if o.scope in scopes and o.until > now]

    def _scopes(self, source: str, destination: Destination) -> list[Scope]:
        scopes: list[Scope] = [(source, "site", destination.site)]
        for provider, _ in self.policy.providers_for(destination):
            scopes.append((source, "provider", provider.name))
        if destination.domain is not None:
            scopes.append((source, "domain", destination.domain.lower().rstrip(".")))
        return scopes

    # ------------------------------------------------------------------ leases

    def _release(self, lease: Lease) -> None:
        for budget in lease.limits.of_kind("connections"):
            self.ledger.close(budget, lease.holding)

    def _now_ns(self) -> int:
        return round(self.clock() * NANOS)


def _towards(budget: Budget, destination: Destination) -> str:
    if budget.label.startswith("provider_"):
        return "across its provider"
    if budget.label.startswith("additional_"):
        return "(shared by every path that names it)"
    return f"to site {quoted(destination.site)}"


def refusal_summary(pool: str, target: str, refusals: Sequence[Refusal]) -> str:
    """The reason a door gives when no source of ``pool`` may go to ``target`` now.

    ``no source of pool "bulk" may connect to provider "google" now (connection_limit 5
    reached for all 3 sources)`` when every source hit the same budget, else each source's.
    """
    head = f"no source of pool {quoted(pool)} may connect to {target} now"
    if not refusals:
        return f"{head} (the pool has no source)"
    budgets = {refusal.budget for refusal in refusals}
    if len(budgets) == 1 and len(refusals) > 1:
        budget = next(iter(budgets))
        if budget == "suspended":
            return f"{head} (all {len(refusals)} sources are suspended)"
        value = _budget_value(refusals[0])
        verb = "used up" if " used up " in refusals[0].reason else "reached"  # a rate
        return f"{head} ({budget}{value} {verb} for all {len(refusals)} sources)"
    parts = "; ".join(f"{r.source}: {r.reason}" for r in refusals)
    return f"{head} ({parts})"


def _budget_value(refusal: Refusal) -> str:
    words = refusal.reason.split(" ")
    return f" {words[1]}" if len(words) > 1 and words[0] == refusal.budget else ""


__all__: Sequence[Any] = (
    "Effect",
    "Lease",
    "Override",
    "Refusal",
    "Shaper",
    "Suspension",
    "refusal_summary",
)
