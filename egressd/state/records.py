"""The records the state layer keeps: small frozen dataclasses, no behaviour.

Times are seconds since the epoch (``time.time()``); days are ISO dates (``"2026-11-30"``)
in the warm-up's configured time zone, decided by the caller, never by the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Batch",
    "DayCount",
    "Event",
    "Override",
    "Progress",
    "Snapshot",
    "StsPolicy",
    "Suspension",
]


@dataclass(frozen=True)
class Progress:
    """Where one (source, provider) stands in its warm-up plan.

    ``step`` counts from 0 (the plan's first day); ``hold`` is an operator's hold reason,
    None when not held. ``day`` is the last day the engine looked at (the open day).
    ``signal_hold`` is why a provider's complaint (a shaping reply rule, a deferral or
    rejection rate) holds the step for the rest of ``day``, None when nothing does.
    """

    source: str
    provider: str
    plan: str
    step: int
    day: str
    hold: str | None = None
    updated: float = 0.0
    signal_hold: str | None = None


@dataclass(frozen=True)
class DayCount:
    """Messages of one (source, provider) on one day: sent (accepted), deferred, rejected,
    and ``connected``: connections of the SOCKS5 and PROXY doors, which see no message.

    In a :class:`Batch` these are increments, so several writers can add to one day.
    """

    source: str
    provider: str
    day: str
    sent: int = 0
    deferred: int = 0
    rejected: int = 0
    connected: int = 0


@dataclass(frozen=True)
class Event:
    """One change of a warm-up, with its reason: advanced, held, resumed, stepped back, set."""

    at: float
    source: str
    provider: str
    kind: str
    step_from: int
    step_to: int
    reason: str


@dataclass(frozen=True)
class Suspension:
    """``scope`` (a source, or ``source@provider``) is out of rotation until ``until``."""

    scope: str
    until: float
    reason: str


@dataclass(frozen=True)
class Override:
    """A setting ``key`` of ``scope`` holds ``value`` (JSON text) until ``until``."""

    scope: str
    key: str
    value: str
    until: float
    reason: str


@dataclass(frozen=True)
class StsPolicy:
    """A cached MTA-STS policy of ``domain`` (RFC 8461 section 5.1), fetched at
    ``fetched_at`` under the TXT id ``policy_id``; ``mx`` is its patterns, space-separated.
    A starting daemon gets back those still within ``max_age``."""

    domain: str
    policy_id: str
    fetched_at: float
    mode: str
    max_age: int
    mx: str


@dataclass(frozen=True)
class Snapshot:
    """Everything a starting daemon needs back: progress, recent days, live suspensions."""

    progress: tuple[Progress, ...] = ()
    counts: tuple[DayCount, ...] = ()
    suspensions: tuple[Suspension, ...] = ()
    overrides: tuple[Override, ...] = ()
    mta_sts: tuple[StsPolicy, ...] = ()


@dataclass(frozen=True)
class Batch:
    """One flush, written all or nothing.

    ``progress`` replaces each (source, provider)'s record; ``counts`` are added to the
    day's counts; ``events`` are appended; ``suspensions`` and ``overrides`` replace theirs
    by scope (and key); ``lifted`` and ``cleared`` remove them; ``mta_sts`` replaces each
    domain's cached policy.
    """

    progress: tuple[Progress, ...] = ()
    counts: tuple[DayCount, ...] = ()
    events: tuple[Event, ...] = ()
    suspensions: tuple[Suspension, ...] = ()
    lifted: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    cleared: tuple[tuple[str, str], ...] = field(default=())
    mta_sts: tuple[StsPolicy, ...] = ()

    def __bool__(self) -> bool:
        return any(
            (
                self.progress,
                self.counts,
                self.events,
                self.suspensions,
                self.lifted,
                self.overrides,
                self.cleared,
                self.mta_sts,
            )
        )
