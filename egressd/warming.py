"""The warm-up's trio shell: the store opened at startup, flushed every few seconds.

Theory of operation
-------------------
:func:`open_warming` opens the state store (:mod:`egressd.state`) and builds the pure
engine (:class:`~egressd.warmup.Warmup`) from what it holds, when :func:`state_wanted`:
at least one source follows a warm-up plan, or shaping files are configured and a state
directory is named (``[state] directory``, or systemd's ``$STATE_DIRECTORY``), so that
their suspensions and overrides outlive a restart; otherwise no database is opened at
all. At startup it runs before any listener is bound. The store is asynchronous
(:class:`~egressd.state.Store`: SQLite behind a thread shell, see
:mod:`egressd.fleet.stores`). A store that cannot be used raises
:class:`~egressd.state.StateError` naming it, and the daemon does not start. A reload that
first makes the store wanted opens it then, and is refused if it cannot be used; a reload
that drops every warming source keeps the store and the engine (with no source), so
progress is kept.

Shaping suspensions and ``SetConfig`` overrides are written with each flush and given
back to the shaper at startup with their expiry: a suspension as it was; an override with
the parameters of the reply rule that set it (found by its reason, ``rule LABEL:
/REGEX/``), or not at all when the shaping files no longer have that rule. One override
per (scope, key) is kept: the one that lasts longest.

While the daemon runs, every connection asks the engine (in memory) and every relayed
transaction counts into it (in memory). :meth:`Warming.run_flusher` hands the engine's
batch to the store every ``[warmup] flush_interval`` (5 s), and once more at shutdown: a
crash loses at most one interval's counts. A batch the store refuses (a full disk) is kept
for the next flush and logged. The flusher also writes the MTA-STS policies fetched since
the last flush, and a starting daemon gives the cache back those still fresh
(:meth:`Warming.attach_policy_cache`). ``warmup status`` shows the newest events as read after
the last flush that wrote some (:attr:`Warming.recent`), so the control socket never waits
on the store.

:class:`WarmupClock` is the engine's clock: wall time plus :attr:`WarmupClock.offset`,
which only tests move (to let a day pass without sleeping through it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from egressd.config import Config
from egressd.fleet.stores import open_state_store
from egressd.log import get_logger
from egressd.shaping import Shaper
from egressd.shaping import Suspension as ShaperSuspension
from egressd.shaping.params import Params
from egressd.shaping.rules import Rule, SetConfig
from egressd.shaping.shaper import Override as ShaperOverride
from egressd.shaping.shaper import Scope
from egressd.state import Event, Override, StateError, StateKept, Store, StsPolicy, Suspension
from egressd.state.redis import RedisCommands
from egressd.tlspolicy.mtasts import MemoryPolicyStore, from_record, to_record
from egressd.warmup import ALL_PROVIDERS, Calendar, Warmup

__all__ = [
    "Warming",
    "WarmupClock",
    "metric_rows",
    "open_warming",
    "state_wanted",
    "warmup_command",
]

log = get_logger("warmup")

HISTORY_DAYS = 7
"""How many days of counts a starting daemon reads back (the open day is what matters)."""

RECENT_EVENTS = 200
"""How many of the newest events :attr:`Warming.recent` keeps for ``warmup status``."""


@dataclass
class WarmupClock:
    """Wall time plus ``offset`` seconds (a hook for tests only)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def log_event(event: Event) -> None:
    fields = {
        "source": event.source,
        "provider": event.provider,
        "change": event.kind,
        "step_from": event.step_from + 1,
        "step_to": event.step_to + 1,
        "reason": event.reason,
    }
    log.warning("warm-up %s", event.kind, extra={"fields": fields})


def scope_key(scope: Scope) -> str:
    """A shaping scope ``(source, kind, name)`` as the store's ``source@kind:name``."""
    source, kind, name = scope
    return f"{source}@{kind}:{name}"


def scope_of(key: str) -> Scope | None:
    """The shaping scope of a stored ``source@kind:name`` (None: not one)."""
    source, at, rest = key.rpartition("@")
    kind, colon, name = rest.partition(":")
    if not at or not colon:
        return None
    if kind == "provider":
        return source, "provider", name
    if kind == "site":
        return source, "site", name
    if kind == "domain":
        return source, "domain", name
    return None


class Warming:
    """The engine with its store; the flusher writes the engine's changes and the
    shaper's suspensions (so a restart does not forget that a provider suspended a
    source)."""

    def __init__(
        self,
        store: Store,
        engine: Warmup,
        clock: WarmupClock,
        suspensions: tuple[Suspension, ...] = (),
        policies: tuple[StsPolicy, ...] = (),
        overrides: tuple[Override, ...] = (),
    ) -> None:
        self.store = store
        self.engine = engine
        self.clock = clock
        self.restored = suspensions
        """The suspensions in force at startup, for :meth:`attach_shaper` to restore."""
        self.restored_overrides = overrides
        self.shaper: Callable[[], Shaper | None] = lambda: None
        self.recent: list[Event] = []
        """The store's newest events, newest first, read at startup and after each flush
        (``warmup status`` reads them here: the control socket does not wait on a store)."""
        self._stored: dict[str, Suspension] = {}
        self._kept = False
        """The store keeps batches it could not confirm (:class:`~egressd.state.StateKept`):
        flush even when nothing is new, so they go out once the store is back."""
        self._stored_overrides: dict[tuple[str, str], Override] = {}
        self.restored_policies = policies
        self.policy_cache: MemoryPolicyStore | None = None

    def attach_policy_cache(self, cache: MemoryPolicyStore) -> None:
        """Persist the MTA-STS policies ``cache`` fetches from now on, and give it back
        those the store kept (RFC 8461 section 5.1: a restart does not forget them)."""
        self.policy_cache = cache
        for record in self.restored_policies:
            entry = from_record(record)
            if entry is not None:
                cache.restore(record.domain, entry)

    def attach_shaper(self, shaper: Callable[[], Shaper | None]) -> None:
        """Persist the suspensions and overrides of ``shaper()`` (the runtime's current
        shaper) from now on, and give it back those in force when the daemon stopped."""
        self.shaper = shaper
        current = shaper()
        now = self.clock()
        for stored in self.restored:
            scope = scope_of(stored.scope)
            if current is None or scope is None or stored.until <= now:
                continue
            current.suspend(scope, stored.until - now, stored.reason)
            self._stored[stored.scope] = stored
            log.warning(
                "shaping suspension restored",
                extra={"fields": {"scope": stored.scope, "reason": stored.reason}},
            )
        if current is not None:
            for override in self.restored_overrides:
                self._restore_override(current, override, now)

    def _restore_override(self, shaper: Shaper, stored: Override, now: float) -> None:
        scope = scope_of(stored.scope)
        if scope is None or stored.until <= now:
            return
        fields = {"scope": stored.scope, "key": stored.key, "reason": stored.reason}
        params = rule_params(shaper, stored.key, stored.reason)
        if params is None:
            log.warning("shaping override not restored: its rule is gone", extra={"fields": fields})
            return
        until = shaper.clock() + (stored.until - now)
        shaper.restore_override(ShaperOverride(scope, until, stored.key, params, stored.reason))
        self._stored_overrides[(stored.scope, stored.key)] = stored
        log.warning("shaping override restored", extra={"fields": fields})

    def _suspensions(self) -> dict[str, Suspension]:
        """The shaper's suspensions now, with wall-clock expiry times."""
        shaper = self.shaper()
        if shaper is None:
            return {}
        now, wall = shaper.clock(), self.clock()
        found = {}
        for effect in shaper.active():
            if isinstance(effect, ShaperSuspension):
                key = scope_key(effect.scope)
                found[key] = Suspension(key, wall + (effect.until - now), effect.reason)
        return found

    def _overrides(self) -> dict[tuple[str, str], Override]:
        """The shaper's overrides now (the longest-lasting per scope and key), with
        wall-clock expiry times."""
        shaper = self.shaper()
        if shaper is None:
            return {}
        now, wall = shaper.clock(), self.clock()
        found: dict[tuple[str, str], Override] = {}
        for effect in shaper.active():  # soonest expiry first: the last one per key wins
            if isinstance(effect, ShaperOverride):
                key = (scope_key(effect.scope), effect.name)
                value = json.dumps({k: str(s.value) for k, s in effect.params.values.items()})
                found[key] = Override(*key, value, wall + (effect.until - now), effect.reason)
        return found

    async def flush(self) -> None:
        batch = self.engine.take_batch()
        current = self._suspensions()
        added = tuple(s for k, s in current.items() if k not in self._stored)
        lifted = tuple(k for k in self._stored if k not in current)
        policies = self.policy_cache.take_changes() if self.policy_cache is not None else {}
        mta_sts = tuple(to_record(domain, entry) for domain, entry in policies.items())
        overrides = self._overrides()
        kept = self._stored_overrides
        batch = replace(
            batch,
            suspensions=added,
            lifted=lifted,
            mta_sts=mta_sts,
            overrides=tuple(o for k, o in overrides.items() if _changed(kept.get(k), o)),
            cleared=tuple(k for k in kept if k not in overrides),
        )
        if not batch and not self._kept:
            return
        try:
            await self.store.write(batch)
        except StateKept as exc:
            if not self._kept:
                log.error("warm-up state kept in memory until the store is back: %s", exc)
            self._kept = True
        except StateError as exc:
            self.engine.give_back(batch)
            if self.policy_cache is not None:
                self.policy_cache.give_back(policies)
            log.error("warm-up state not written, kept for the next flush: %s", exc)
            return
        else:
            if self._kept:
                log.warning("warm-up state written again, with what was kept meanwhile")
            self._kept = False
        self._stored = {k: self._stored.get(k) or current[k] for k in current}
        self._stored_overrides = {
            k: o if _changed(kept.get(k), o) else kept[k] for k, o in overrides.items()
        }
        if batch.events and not self._kept:
            await self.refresh_history()

    async def refresh_history(self) -> None:
        """Read the newest events back into :attr:`recent` (kept as they were on failure)."""
        try:
            self.recent = await self.store.history(None, RECENT_EVENTS)
        except StateError as exc:
            log.error("warm-up history not read: %s", exc)

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval`` until cancelled; the daemon flushes once more."""
        while True:
            await trio.sleep(self.engine.settings.flush_interval)
            await self.flush()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.flush()
            if self._kept:
                log.error(
                    "warm-up state lost at shutdown: the store was still unreachable",
                    extra={"fields": {"store": self.store.location}},
                )
            await self.store.close()


def _changed(stored: Override | None, now: Override) -> bool:
    """Whether ``now`` must be written over ``stored`` (new, or another rule or end)."""
    return stored is None or (stored.reason, round(stored.until)) != (now.reason, round(now.until))


def rule_params(shaper: Shaper, name: str, reason: str) -> Params | None:
    """The parameters of the ``SetConfig`` of ``name`` in the shaping rule whose effects'
    reason is ``reason`` (``rule LABEL: /REGEX/``), or None: no such rule any more."""
    sections = shaper.policy.sections
    groups = [sections.default, *sections.providers.values(), *sections.by_site.values()]
    for section in [*groups, *sections.by_domain.values()]:
        for rule in section.automation:
            params = _set_config(rule, name) if _reason_of(rule) == reason else None
            if params is not None:
                return params
    return None


def _reason_of(rule: Rule) -> str:
    return f"rule {rule.label}: /{rule.regex_text}/"  # as Shaper._act words it


def _set_config(rule: Rule, name: str) -> Params | None:
    for action in rule.actions:
        if isinstance(action, SetConfig) and action.name == name:
            return action.params
    return None


def state_wanted(config: Config, environ: Mapping[str, str]) -> bool:
    """Whether ``config`` needs the state store: a source warms up, or shaping files are
    configured and the state's place is named (``[state] directory``, systemd's
    ``$STATE_DIRECTORY``, or ``backend = "redis"``): their suspensions and overrides are
    kept then; without, nothing is written for them."""
    if config.warming_sources:
        return True
    named = config.state.directory or environ.get("STATE_DIRECTORY")
    return bool(config.shaping_files) and (config.state.backend == "redis" or bool(named))


async def open_warming(
    config: Config,
    environ: Mapping[str, str] | None = None,
    clock: WarmupClock | None = None,
    client: RedisCommands | None = None,
) -> Warming | None:
    """The store and engine for ``config``, or None when :func:`state_wanted` says no.

    Raises :class:`~egressd.state.StateError` (naming the file) when the store is unusable.
    """
    environ = os.environ if environ is None else environ
    if not state_wanted(config, environ):
        return None
    sources = config.warming_sources
    clock = clock or WarmupClock()
    store = await open_state_store(config, environ, client)
    try:
        since = Calendar.add_days(Calendar(config.warmup.timezone).day(clock()), -HISTORY_DAYS)
        snapshot = await store.load(since, clock())
        recent = await store.history(None, RECENT_EVENTS)
    except StateError:
        await store.close()
        raise
    engine = Warmup(config.warmup, sources, clock, snapshot, on_event=log_event)
    log.info(
        "warm-up state loaded",
        extra={"fields": {"database": store.location, "sources": len(sources)}},
    )
    warming = Warming(
        store,
        engine,
        clock,
        snapshot.suspensions,
        policies=snapshot.mta_sts,
        overrides=snapshot.overrides,
    )
    warming.recent = recent
    return warming


# --------------------------------------------------------------------------- control socket


def warmup_status(warming: Warming, source: str | None) -> dict[str, Any]:
    """``egressd warmup status``: each warming source's plan, steps, quotas and holds."""
    engine = warming.engine
    names = [source] if source is not None else sorted(engine.sources)
    rows = []
    for name in names:
        for provider in engine.providers_of(name):
            quota = engine.quota(name, provider)
            rows.append(
                {
                    "source": name,
                    "plan": engine.sources[name],
                    "provider": provider,
                    "warm": quota is None,
                    "step": None if quota is None else quota.step + 1,
                    "steps": None if quota is None else quota.steps,
                    "quota": None if quota is None else quota.limit,
                    "used": None if quota is None else quota.day_used,
                    "hold": None if quota is None else quota.hold,
                    "warm_on": engine.warm_on(name, provider),
                }
            )
    history = [e for e in warming.recent if source is None or e.source == source][:10]
    return {
        "timezone": engine.settings.timezone,
        "today": engine.calendar.day(warming.clock()),
        "resets_at": engine.calendar.stamp(engine.calendar.next_midnight(warming.clock())),
        "rows": rows,
        "history": [
            {
                "at": event.at,
                "source": event.source,
                "provider": event.provider,
                "change": event.kind,
                "step_from": event.step_from + 1,
                "step_to": event.step_to + 1,
                "reason": event.reason,
            }
            for event in history
        ],
    }


def warmup_plan(warming: Warming, source: str, provider: str) -> dict[str, Any]:
    """``egressd warmup plan``: the projected schedule from today's step to the end."""
    engine = warming.engine
    return {
        "source": source,
        "plan": engine.sources[source],
        "provider": provider,
        "days": [
            {"step": step + 1, "date": day, "quota": volume}
            for step, day, volume in engine.projection(source, provider)
        ],
    }


def warmup_command(
    warming: Warming | None, action: str, source: str | None, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Carry out one ``warmup`` request; ValueError (the error reply) when it cannot be."""
    if warming is None or not warming.engine.sources:
        raise ValueError("no source follows a warm-up plan in the running configuration")
    engine = warming.engine
    if source is not None and not engine.is_warming(source):
        raise ValueError(f"source {source!r} follows no warm-up plan")
    provider = options.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise ValueError('"provider" must be a string')
    if action == "status":
        return warmup_status(warming, source)
    if source is None:
        raise ValueError(f'"warmup {action}" needs a source')
    if action == "plan":
        return warmup_plan(warming, source, provider or "other")
    reason = str(options.get("reason") or f"{action} by operator")
    if action == "hold":
        engine.hold(source, provider, reason)
    elif action == "resume":
        engine.resume(source, provider)
    elif action == "set-step":
        step = options.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError('"step" must be an integer from 1')
        engine.set_step(source, provider, step - 1, reason)
    else:
        raise ValueError(f'unknown warmup action "{action}" (status, plan, hold, resume, set-step)')
    return warmup_status(warming, source)


def metric_rows(warming: Warming | None) -> list[tuple[str, str, int, int, int]]:
    """(source, provider, step from 1, quota, used) of every warming (source, provider);
    used is the shared day counter's when the quota is shared (workers, Redis).

    Labels stay bounded: configured sources times the providers they sent to (the
    shaping files' providers and ``other``); the template ``*`` and warm sources are left out.
    """
    if warming is None:
        return []
    engine, rows = warming.engine, []
    for source, provider in sorted(engine.tracked()):
        quota = engine.quota(source, provider) if provider != ALL_PROVIDERS else None
        if quota is not None:
            rows.append((source, provider, quota.step + 1, quota.limit, quota.day_used))
    return rows
