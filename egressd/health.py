"""Source health: failures per source, suspensions, and active connections.

Theory of operation
-------------------
A source is *healthy* until failures of one kind cross its :class:`~egressd.config.SuspendPolicy`;
it is then *suspended* for the policy's ``duration`` and comes back on its own when that time
has passed. Suspension is purely time based, as in KumoMTA: a success seen while a source is
suspended (a connection that was already in flight) does not lift it early; an operator can
with :meth:`SourceHealth.resume`.

There are three kinds of failure, from strongest to softest signal:

``unplumbed``
    The source address cannot be bound here (``EADDRNOTAVAIL``): the address is not on this
    host. Policy: the source's own ``suspend_when_unplumbed``, else
    :attr:`HealthSettings.suspend_when_unplumbed`.
``proxy_unhealthy``
    The source's proxy (HAProxy or SOCKS5) is unreachable, refuses us or stays silent.
    Policy: the source's ``suspend_when_proxy_unhealthy``, else
    :attr:`HealthSettings.suspend_when_proxy_unhealthy`.
``connect``
    The source failed at distinct destinations that *other* sources reached a moment ago
    (the outbound plan counts each such destination once; see
    :mod:`egressd.egress.plan`). A destination's own failures never count against a
    source: they go to that destination's circuit breaker. Policy:
    :attr:`HealthSettings.suspend_on_connect_failures`.

Which failure is whose is decided by :func:`egressd.egress.failures.blame`, as KumoMTA
does (crates/kumod/src/egress_source.rs: only a failed bind of an unplumbed address and a
failing proxy reach ``source_health``; a failed connect to the destination does not).

:func:`policy_for` picks the policy. A policy's trigger is ``count`` failures within
``window`` seconds (KumoMTA's ``Immediate`` is ``count=1``; ``{ Threshold = "3/5m" }`` is
``count=3, window=300``). Each kind keeps its own sliding window of failure times; a window
is emptied when it triggers a suspension (so one more failure after the suspension does not
immediately suspend again) and by :meth:`SourceHealth.record_success`.

The registry is keyed by source *name*. On a configuration reload the daemon calls
:meth:`SourceHealth.update_sources` with the new names: sources that still exist keep their
state (a suspended source stays suspended), sources that disappeared are forgotten once
their last connection has closed.

This module is pure: no trio, no sockets. Time comes from an injected clock (default
:func:`time.monotonic`), so tests drive it with a fake one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from egressd.config import HealthSettings, Source, SuspendPolicy

FailureKind = Literal["unplumbed", "proxy_unhealthy", "connect"]
FAILURE_KINDS: tuple[FailureKind, ...] = ("unplumbed", "proxy_unhealthy", "connect")

Clock = Callable[[], float]


def policy_for(source: Source, kind: FailureKind, settings: HealthSettings) -> SuspendPolicy:
    """The suspend policy that applies to ``kind`` failures of ``source``.

    The source's own KumoMTA key wins over the ``[health]`` default; ``connect`` failures
    have no per-source key.
    """
    if kind == "unplumbed":
        return source.suspend_when_unplumbed or settings.suspend_when_unplumbed
    if kind == "proxy_unhealthy":
        return source.suspend_when_proxy_unhealthy or settings.suspend_when_proxy_unhealthy
    return settings.suspend_on_connect_failures


@dataclass(frozen=True)
class SourceStatus:
    """One source's health at the time of a :meth:`SourceHealth.snapshot`."""

    name: str
    suspended: bool
    suspended_until: float | None
    """Clock time (monotonic by default) when the suspension ends; None when healthy."""
    suspended_for: float | None
    """Seconds left of the suspension; None when healthy."""
    suspension_kind: FailureKind | None
    suspension_reason: str | None
    recent_failures: int
    """Failures since the last success (or since the state was created)."""
    last_failure_kind: FailureKind | None
    last_failure_reason: str | None
    active_connections: int
    suspensions: int
    """How many times this source was suspended since egressd started."""
    configured: bool
    """False for a source removed by a reload whose last connections are still open."""

    @property
    def state(self) -> Literal["healthy", "suspended"]:
        return "suspended" if self.suspended else "healthy"

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form, for the control socket."""
        return {
            "name": self.name,
            "state": self.state,
            "suspended_for": self.suspended_for,
            "suspension_kind": self.suspension_kind,
            "suspension_reason": self.suspension_reason,
            "recent_failures": self.recent_failures,
            "last_failure_kind": self.last_failure_kind,
            "last_failure_reason": self.last_failure_reason,
            "active_connections": self.active_connections,
            "suspensions": self.suspensions,
            "configured": self.configured,
        }


@dataclass
class _State:
    """The mutable record behind one source name."""

    windows: dict[FailureKind, deque[float]] = field(default_factory=dict)
    failures_since_success: int = 0
    last_failure_kind: FailureKind | None = None
    last_failure_reason: str | None = None
    suspended_until: float | None = None
    suspension_kind: FailureKind | None = None
    suspension_reason: str | None = None
    suspensions: int = 0
    active_connections: int = 0

    def suspended_at(self, now: float) -> bool:
        return self.suspended_until is not None and now < self.suspended_until

    def is_idle(self) -> bool:
        """True when the record holds nothing a fresh one would not."""
        return (
            self.active_connections == 0
            and self.suspended_until is None
            and self.failures_since_success == 0
            and self.suspensions == 0
        )


def _window_triggers(window: deque[float], now: float, policy: SuspendPolicy) -> bool:
    """Add a failure at ``now``; True when ``policy.count`` of them lie within its window."""
    window.append(now)
    while window and now - window[0] > policy.window:
        window.popleft()
    return len(window) >= max(policy.count, 1)


class SourceHealth:
    """Health of every source, keyed by name; see the module docstring."""

    def __init__(self, sources: Iterable[str] = (), *, now: Clock = time.monotonic) -> None:
        self._now = now
        self._configured: set[str] = set(sources)
        self._states: dict[str, _State] = {}

    # ------------------------------------------------------------------ failures and successes

    def record_failure(
        self, source_name: str, kind: FailureKind, reason: str, policy: SuspendPolicy
    ) -> bool:
        """Note a failure; True when it newly suspends the source.

        A failure while the source is already suspended is recorded but neither extends the
        suspension nor counts towards the next one.
        """
        now = self._now()
        state = self._state(source_name)
        state.failures_since_success += 1
        state.last_failure_kind = kind
        state.last_failure_reason = reason
        if state.suspended_at(now):
            return False
        window = state.windows.setdefault(kind, deque())
        if not _window_triggers(window, now, policy):
            return False
        window.clear()
        self._suspend(state, now + policy.duration, kind, reason)
        return True

    def record_success(self, source_name: str) -> None:
        """A connection through the source worked: forget its failures (not its suspension)."""
        state = self._states.get(source_name)
        if state is None:
            return
        state.windows.clear()
        state.failures_since_success = 0
        self._forget_if_idle(source_name, state)

    # ------------------------------------------------------------------ suspensions

    def is_suspended(self, name: str) -> bool:
        """True while ``name`` is suspended; the pool selector skips such sources."""
        state = self._states.get(name)
        return state is not None and state.suspended_at(self._now())

    def suspended_until(self, name: str) -> float | None:
        """Clock time when the suspension of ``name`` ends, or None when it is not suspended."""
        state = self._states.get(name)
        if state is None or not state.suspended_at(self._now()):
            return None
        return state.suspended_until

    def suspend(self, name: str, duration: float, reason: str = "suspended by operator") -> None:
        """Suspend ``name`` for ``duration`` seconds from now (the control socket's "suspend").

        Such a suspension has no failure kind (``suspension_kind`` is None).
        """
        state = self._state(name)
        self._suspend(state, self._now() + duration, None, reason)

    def resume(self, name: str) -> bool:
        """End a suspension early and forget failures; True when ``name`` was suspended."""
        state = self._states.get(name)
        if state is None:
            return False
        was_suspended = state.suspended_at(self._now())
        state.suspended_until = None
        state.suspension_kind = None
        state.suspension_reason = None
        state.windows.clear()
        state.failures_since_success = 0
        return was_suspended

    def expire_suspensions(self) -> list[str]:
        """Clear suspensions whose time has passed; the names, sorted, for a log line.

        Calling this is optional: :meth:`is_suspended` already answers False once the time
        has passed. It exists so the daemon can say "source back in service".
        """
        now = self._now()
        expired = []
        for name, state in list(self._states.items()):
            if state.suspended_until is not None and not state.suspended_at(now):
                state.suspended_until = None
                state.suspension_kind = None
                state.suspension_reason = None
                expired.append(name)
        return sorted(expired)

    # ------------------------------------------------------------------ connections

    def connection_opened(self, name: str) -> None:
        self._state(name).active_connections += 1

    def connection_closed(self, name: str) -> None:
        state = self._states.get(name)
        if state is None or state.active_connections == 0:
            return
        state.active_connections -= 1
        self._forget_if_idle(name, state)

    def active_connections(self, name: str) -> int:
        state = self._states.get(name)
        return state.active_connections if state is not None else 0

    # ------------------------------------------------------------------ reloads and reports

    def update_sources(self, names: Iterable[str]) -> None:
        """Adopt a reloaded configuration's source names.

        Sources that still exist keep their state. State of removed sources is dropped,
        except the connection count of those with connections still open: they stay listed
        (``configured=False``) until their last connection closes.
        """
        self._configured = set(names)
        for name, state in list(self._states.items()):
            if name in self._configured:
                continue
            if state.active_connections == 0:
                del self._states[name]
            else:
                self._states[name] = _State(active_connections=state.active_connections)

    def snapshot(self) -> list[SourceStatus]:
        """Every configured source (and every draining removed one), sorted by name."""
        now = self._now()
        names = sorted(self._configured | set(self._states))
        return [self._status(name, self._states.get(name) or _State(), now) for name in names]

    # ------------------------------------------------------------------ helpers

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _State()
        return state

    def _forget_if_idle(self, name: str, state: _State) -> None:
        if name not in self._configured and state.is_idle():
            del self._states[name]

    @staticmethod
    def _suspend(state: _State, until: float, kind: FailureKind | None, reason: str) -> None:
        state.suspended_until = until
        state.suspension_kind = kind
        state.suspension_reason = reason
        state.suspensions += 1

    def _status(self, name: str, state: _State, now: float) -> SourceStatus:
        suspended = state.suspended_at(now)
        until = state.suspended_until if suspended else None
        return SourceStatus(
            name=name,
            suspended=suspended,
            suspended_until=until,
            suspended_for=until - now if until is not None else None,
            suspension_kind=state.suspension_kind if suspended else None,
            suspension_reason=state.suspension_reason if suspended else None,
            recent_failures=state.failures_since_success,
            last_failure_kind=state.last_failure_kind,
            last_failure_reason=state.last_failure_reason,
            active_connections=state.active_connections,
            suspensions=state.suspensions,
            configured=name in self._configured,
        )
