"""The warm-up engine: steps, quotas, sending days, holds and step-backs. Pure.

Theory of operation
-------------------
Each warming source follows a plan (:class:`~egressd.config.WarmupPlan`): step ``i`` allows
``days[i]`` messages a day to each provider (a provider may have a schedule of its own).
Progress is kept per (source, provider), because providers judge an address separately;
the provider ``*`` of a source is its template: a provider seen for the first time starts
where ``*`` stands, and an operator's hold or step without ``--provider`` applies to ``*``
and to every provider of the source.

A day is a date in ``[warmup] timezone``. When the engine first sees a new day (every call
asks the injected clock), it closes each (source, provider)'s open day:

* held by an operator, or held or stepped back by a signal that day: the step stays;
* a *sending day*, when the messages of that day reached ``sending_day_share`` of its
  quota: one step up (a weekend or a quiet day does not count, however many pass);
* otherwise the step stays.

Signals are judged per (source, provider) as outcomes arrive, once ``min_messages`` of the
day had one: a deferral (4xx) or rejection (5xx) rate at ``hold_*_rate`` holds the step for
the rest of the day, at ``step_back_*_rate`` it goes one step back at once (at most once a
day), which also lowers today's quota. An operator's hold lasts until resumed.

A source has *used its quota* to a provider when that day's messages (every message the
remote gave a final answer to, and every connection of the SOCKS5 and PROXY doors) and the
messages *in flight* reached the step's daily volume; the egress plan then skips it
(:meth:`Warmup.refusal`). A message is in flight from :meth:`Warmup.reserve` (the egress
plan holds one at pick time, the SMTP relay before each further MAIL on a kept
connection) until :meth:`Warmup.record` counts it (``reserved=True``) or
:meth:`Warmup.release` gives it back (it was not sent): so sessions running at once never
pass the quota together. A source past its plan's last step is warm and has no quota.

Every change becomes an :class:`~egressd.state.Event` with its reason: passed to
``on_event`` (the daemon logs it) and queued with the changed progress and the new counts
for the next flush (:meth:`Warmup.take_batch`). The engine never touches a store itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from egressd.config import WarmupPlan, WarmupSettings
from egressd.state import Batch, DayCount, Event, Progress, Snapshot
from egressd.warmup.days import Calendar

__all__ = ["ALL_PROVIDERS", "Counts", "Outcome", "Quota", "Warmup"]

ALL_PROVIDERS = "*"
Outcome = str
"""``"sent"`` (accepted), ``"deferred"`` (4xx) or ``"rejected"`` (5xx); ``"connected"``: a
connection of the SOCKS5 or PROXY door, which sees no message (it uses the quota like one
message, and the rates leave it out)."""
OUTCOMES = ("sent", "deferred", "rejected", "connected")


@dataclass
class Counts:
    sent: int = 0
    deferred: int = 0
    rejected: int = 0
    connected: int = 0

    @property
    def messages(self) -> int:
        """Messages with a final answer (what the deferral and rejection rates judge)."""
        return self.sent + self.deferred + self.rejected

    @property
    def total(self) -> int:
        """What used the quota: messages and the proxy doors' connections."""
        return self.messages + self.connected

    def add(self, outcome: Outcome, count: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + count)


@dataclass(frozen=True)
class Quota:
    """Today's allowance of one warming (source, provider)."""

    source: str
    provider: str
    plan: str
    step: int
    steps: int
    limit: int
    used: int
    resets_at: float
    hold: str | None
    in_flight: int = 0
    """Messages held for sessions that have not had their final answer yet."""
    fleet_used: int = 0
    """Today's count in the shared store (every worker and node sharing the quota), as
    last read (:meth:`Warmup.fleet_count`); 0 without one."""

    @property
    def used_up(self) -> bool:
        return self.used + self.in_flight >= self.limit

    @property
    def day_used(self) -> int:
        """Today's messages of the host or fleet when the quota is shared (the store's day
        counter), else this process's: what ``warmup status`` and the metric show."""
        return max(self.used, self.fleet_used)


@dataclass
class _Track:
    """One (source, provider): its stored progress and its open day."""

    progress: Progress
    today: Counts = field(default_factory=Counts)
    signal_hold: str | None = None
    stepped_back: bool = False
    in_flight: int = 0
    fleet_today: int = 0
    """The open day's messages of every process sharing the quota (:meth:`Warmup.
    fleet_count`), when they are counted in a shared store; 0 otherwise."""


Key = tuple[str, str]


class Warmup:
    """Warm-up state of every warming source, on an injected clock."""

    def __init__(
        self,
        settings: WarmupSettings,
        sources: Mapping[str, str],
        clock: Callable[[], float],
        snapshot: Snapshot | None = None,
        on_event: Callable[[Event], None] = lambda event: None,
    ) -> None:
        self.settings = settings
        self.sources = dict(sources)
        self.clock = clock
        self.calendar = Calendar(settings.timezone)
        self.on_event = on_event
        self._tracks: dict[Key, _Track] = {}
        self._dirty: set[Key] = set()
        self._counts: dict[tuple[str, str, str], Counts] = {}
        self._events: list[Event] = []
        self._day_ends = float("-inf")
        self._restore(snapshot or Snapshot())

    # ------------------------------------------------------------------ restoring

    def _restore(self, snapshot: Snapshot) -> None:
        by_day = {(c.source, c.provider, c.day): c for c in snapshot.counts}
        for stored in snapshot.progress:  # a source not warming now may by a reload
            key = (stored.source, stored.provider)
            track = _Track(stored, signal_hold=stored.signal_hold)
            day = by_day.get((stored.source, stored.provider, stored.day))
            if day is not None:
                track.today = Counts(day.sent, day.deferred, day.rejected, day.connected)
                derived, track.stepped_back = self._signals(track.today)
                track.signal_hold = stored.signal_hold or derived
            self._tracks[key] = track
        self._roll()

    # ------------------------------------------------------------------ questions

    def is_warming(self, source: str) -> bool:
        return source in self.sources

    def quota(self, source: str, provider: str) -> Quota | None:
        """Today's quota of ``source`` to ``provider``; None when not warming or warm."""
        if source not in self.sources:
            return None
        self._roll()
        track = self._track(source, provider)
        plan_name = self.sources[source]
        schedule = self._plan(plan_name).schedule(provider)
        step = track.progress.step
        if step >= len(schedule):
            return None
        return Quota(
            source=source,
            provider=provider,
            plan=plan_name,
            step=step,
            steps=len(schedule),
            limit=schedule[step],
            used=track.today.total,
            resets_at=self.calendar.next_midnight(self.clock()),
            hold=self._hold_reason(source, provider),
            in_flight=track.in_flight,
            fleet_used=track.fleet_today,
        )

    def refusal(self, source: str, provider: str) -> str | None:
        """Why ``source`` may not send to ``provider`` now (its quota is used), or None."""
        quota = self.quota(source, provider)
        if quota is None or not quota.used_up:
            return None
        return describe_used_quota(quota, self.calendar)

    def providers_of(self, source: str) -> list[str]:
        """The providers ``source`` has progress for, ``*`` first."""
        self._roll()
        self._track(source, ALL_PROVIDERS)
        found = sorted(p for s, p in self._tracks if s == source and p != ALL_PROVIDERS)
        return [ALL_PROVIDERS, *found]

    def projection(self, source: str, provider: str) -> list[tuple[int, str, int]]:
        """(step, projected date, daily volume) from today's step to the plan's end,
        assuming every day from today on is a sending day."""
        self._roll()
        track = self._track(source, provider)
        schedule = self._plan(self.sources[source]).schedule(provider)
        today = self.calendar.day(self.clock())
        start = track.progress.step
        return [
            (step, Calendar.add_days(today, step - start), schedule[step])
            for step in range(start, len(schedule))
        ]

    def warm_on(self, source: str, provider: str) -> str:
        """The first day ``source`` is projected to be warm to ``provider``."""
        self._roll()
        track = self._track(source, provider)
        schedule = self._plan(self.sources[source]).schedule(provider)
        remaining = max(0, len(schedule) - track.progress.step)
        return Calendar.add_days(self.calendar.day(self.clock()), remaining)

    # ------------------------------------------------------------------ counting

    def reserve(self, source: str, provider: str) -> bool:
        """Hold one message of today's quota of ``source`` to ``provider`` for a message
        (or connection) about to go, whether or not the quota has room: the caller asked
        :meth:`refusal` first. True when held (a warming source not yet warm); each True
        is ended by one :meth:`release` or one ``record(..., reserved=True)``."""
        if self.quota(source, provider) is None:
            return False
        self._tracks[(source, provider)].in_flight += 1
        return True

    def release(self, source: str, provider: str) -> None:
        """Give back a message held by :meth:`reserve` that was not sent."""
        track = self._tracks.get((source, provider))
        if track is not None and track.in_flight > 0:
            track.in_flight -= 1

    def record(
        self, source: str, provider: str, outcome: Outcome, *, reserved: bool = False
    ) -> None:
        """One message of ``source`` to ``provider`` got its final answer (``reserved``:
        it was held by :meth:`reserve`, which this ends)."""
        if reserved:
            self.release(source, provider)
        if source not in self.sources:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._roll()
        track = self._track(source, provider)
        track.today.add(outcome)
        day = track.progress.day
        self._counts.setdefault((source, provider, day), Counts()).add(outcome)
        self._judge_signals(source, provider, track)

    def fleet_count(self, source: str, provider: str, day: str, count: int) -> None:
        """Every process sharing the quota sent ``count`` messages of ``day`` so far
        (:mod:`egressd.fleet.quotas`): the day is a sending day by that count, not by this
        process's own share of it."""
        track = self._tracks.get((source, provider))
        if track is not None and track.progress.day == day:
            track.fleet_today = max(track.fleet_today, count)

    def _signals(self, today: Counts) -> tuple[str | None, bool]:
        """(the day's hold reason, whether it steps back) judged on the day's counts."""
        settings = self.settings
        if today.messages < settings.min_messages or today.messages == 0:
            return None, False
        rates = (
            ("deferral", today.deferred / today.messages, settings.hold_deferral_rate,
             settings.step_back_deferral_rate),
            ("rejection", today.rejected / today.messages, settings.hold_rejection_rate,
             settings.step_back_rejection_rate),
        )  # fmt: skip
        hold = None
        for name, rate, hold_at, back_at in rates:
            said = f"{name} rate {rate:.0%} of {today.messages} messages today"
            if rate >= back_at:
                return f"{said} >= {back_at:.0%}", True
            if rate >= hold_at and hold is None:
                hold = f"{said} >= {hold_at:.0%}"
        return hold, False

    def _judge_signals(self, source: str, provider: str, track: _Track) -> None:
        if track.stepped_back:
            return
        reason, back = self._signals(track.today)
        if back and reason is not None:
            self._step_back(source, provider, track, reason)
        elif reason is not None and track.signal_hold is None:
            self._hold_for_today((source, provider), track, reason)
            step = track.progress.step
            self._change(source, provider, "held", step, step, reason)

    def _step_back(self, source: str, provider: str, track: _Track, reason: str) -> None:
        track.stepped_back = True
        self._hold_for_today((source, provider), track, reason)
        step = track.progress.step
        self._set(source, provider, max(0, step - 1), "stepped back", reason)

    def signal(self, source: str, provider: str, reason: str) -> bool:
        """A provider complained (a shaping reply rule fired for ``source``): hold the step
        of ``source`` to ``provider`` for today, like a deferral rate over its threshold.
        True when this started a hold (logged with ``reason``); a warm source is ignored."""
        if source not in self.sources:
            return False
        self._roll()
        track = self._track(source, provider)
        if track.signal_hold is not None:
            return False
        self._hold_for_today((source, provider), track, reason)
        step = track.progress.step
        self._change(source, provider, "held", step, step, reason)
        return True

    def _hold_for_today(self, key: Key, track: _Track, reason: str) -> None:
        """A complaint holds the step for the rest of the open day; the reason is kept
        with the progress, so a restart that day holds it too."""
        track.signal_hold = reason
        track.progress = replace(track.progress, signal_hold=reason, updated=self.clock())
        self._dirty.add(key)

    # ------------------------------------------------------------------ operators

    def hold(self, source: str, provider: str | None, reason: str) -> list[Key]:
        """Hold the step of ``source`` (one provider, or all of them) until resumed."""
        return self._each(source, provider, lambda key: self._hold(key, reason))

    def resume(self, source: str, provider: str | None) -> list[Key]:
        return self._each(source, provider, lambda key: self._hold(key, None))

    def set_step(self, source: str, provider: str | None, step: int, reason: str) -> list[Key]:
        """Put ``source`` on ``step`` (counted from 0)."""
        if step < 0:
            raise ValueError("a step is 0 or more")
        return self._each(source, provider, lambda key: self._set(*key, step, "set", reason))

    def _each(self, source: str, provider: str | None, act: Callable[[Key], None]) -> list[Key]:
        if source not in self.sources:
            raise KeyError(f"source {source} follows no warm-up plan")
        self._roll()
        keys = [(source, provider)] if provider is not None else [
            (source, p) for p in self.providers_of(source)
        ]  # fmt: skip
        for key in keys:
            self._track(*key)
            act(key)
        return keys

    def _hold(self, key: Key, reason: str | None) -> None:
        track = self._tracks[key]
        before = track.progress.hold
        if before == reason:
            return
        track.progress = replace(track.progress, hold=reason, updated=self.clock())
        self._dirty.add(key)
        step = track.progress.step
        if reason is None:
            self._change(*key, "resumed", step, step, f"operator (was held: {before})")
        else:
            self._change(*key, "held", step, step, f"operator: {reason}")

    # ------------------------------------------------------------------ days

    def _roll(self) -> None:
        """Close every open day that is not today (a clock comparison until midnight)."""
        now = self.clock()
        if now < self._day_ends:
            return
        today = self.calendar.day(now)
        self._day_ends = self.calendar.next_midnight(now)
        for key, track in list(self._tracks.items()):
            if key[0] not in self.sources:
                continue  # no longer warming (a reload): its record stays as it was
            if track.progress.day != today:
                self._close_day(key, track, today)

    def _close_day(self, key: Key, track: _Track, today: str) -> None:
        source, provider = key
        day, step = track.progress.day, track.progress.step
        schedule = self._plan(self.sources[source]).schedule(provider)
        if provider != ALL_PROVIDERS and step < len(schedule) and self._advances(key, track):
            need = self.settings.sending_day_share * schedule[step]
            reason = (
                f"sending day {day}: {max(track.today.total, track.fleet_today)} of "
                f"{schedule[step]} messages "
                f"(>= {self.settings.sending_day_share:.0%}, {need:g})"
            )
            track.progress = replace(track.progress, step=step + 1)
            self._change(source, provider, "advanced", step, step + 1, reason)
        track.progress = replace(track.progress, day=today, signal_hold=None, updated=self.clock())
        track.today, track.signal_hold, track.stepped_back = Counts(), None, False
        track.fleet_today = 0
        self._dirty.add(key)

    def _advances(self, key: Key, track: _Track) -> bool:
        if self._hold_reason(*key) is not None or track.signal_hold is not None:
            return False
        schedule = self._plan(self.sources[key[0]]).schedule(key[1])
        limit = schedule[track.progress.step]
        sent = max(track.today.total, track.fleet_today)
        return sent >= self.settings.sending_day_share * limit

    # ------------------------------------------------------------------ bookkeeping

    def _track(self, source: str, provider: str) -> _Track:
        key = (source, provider)
        track = self._tracks.get(key)
        if track is None:
            template = self._tracks.get((source, ALL_PROVIDERS))
            step = template.progress.step if template is not None else 0
            day = self.calendar.day(self.clock())
            plan = self.sources[source]
            track = _Track(Progress(source, provider, plan, step, day, None, self.clock()))
            self._tracks[key] = track
            self._dirty.add(key)
            if provider != ALL_PROVIDERS:
                self._track(source, ALL_PROVIDERS)
        elif track.progress.plan != self.sources[source]:
            old = track.progress.plan
            track.progress = replace(track.progress, plan=self.sources[source])
            self._dirty.add(key)
            step = track.progress.step
            self._change(
                source, provider, "plan", step, step, f"plan {old} -> {self.sources[source]}"
            )
        return track

    def _hold_reason(self, source: str, provider: str) -> str | None:
        own = self._tracks.get((source, provider))
        every = self._tracks.get((source, ALL_PROVIDERS))
        for track in (own, every):
            if track is not None and track.progress.hold is not None:
                return track.progress.hold
        if own is not None and own.signal_hold is not None:
            return own.signal_hold
        return None

    def _set(self, source: str, provider: str, step: int, kind: str, reason: str) -> None:
        key = (source, provider)
        track = self._tracks[key]
        before = track.progress.step
        track.progress = replace(track.progress, step=step, updated=self.clock())
        self._dirty.add(key)
        self._change(source, provider, kind, before, step, reason)

    def _change(
        self, source: str, provider: str, kind: str, before: int, after: int, reason: str
    ) -> None:
        event = Event(self.clock(), source, provider, kind, before, after, reason)
        self._events.append(event)
        self.on_event(event)

    def _plan(self, name: str) -> WarmupPlan:
        return self.settings.plans[name]

    def reconfigure(self, settings: WarmupSettings, sources: Mapping[str, str]) -> None:
        """A reload: new plans and thresholds; progress of every source is kept."""
        self.settings, self.sources = settings, dict(sources)
        self.calendar = Calendar(settings.timezone)
        self._day_ends = float("-inf")

    def take_batch(self) -> Batch:
        """What changed since the last call, for the store; the engine forgets it."""
        self._roll()
        batch = Batch(
            progress=tuple(self._tracks[key].progress for key in sorted(self._dirty)),
            counts=tuple(
                DayCount(s, p, d, c.sent, c.deferred, c.rejected, c.connected)
                for (s, p, d), c in sorted(self._counts.items())
            ),
            events=tuple(self._events),
        )
        self._dirty, self._counts, self._events = set(), {}, []
        return batch

    def give_back(self, batch: Batch) -> None:
        """A batch the store could not take: keep it for the next flush."""
        for item in batch.progress:
            self._dirty.add((item.source, item.provider))
        for count in batch.counts:
            kept = self._counts.setdefault((count.source, count.provider, count.day), Counts())
            for outcome in OUTCOMES:
                kept.add(outcome, getattr(count, outcome))
        self._events[:0] = batch.events

    def tracked(self) -> Iterable[Key]:
        return list(self._tracks)


def describe_used_quota(quota: Quota, calendar: Calendar) -> str:
    """The fail-fast text: the plan, the step, the use and when the quota resets."""
    return (
        f"source {quota.source} is warming up (plan {quota.plan}, step {quota.step + 1} of "
        f"{quota.steps}) and has used its {quota.limit} messages for today to "
        f"{quota.provider}; the quota resets at {calendar.stamp(quota.resets_at)}"
    )
