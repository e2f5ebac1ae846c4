"""What operators watch: metrics counted from the runtime's hooks, and the endpoints serving them.

Theory of operation
-------------------
Counting and serving are separate. :func:`egress_observer` and :func:`count_into_metrics`
attach the daemon's one :class:`~egressd.metrics.Metrics` to the hooks the runtime already
has (nothing in the front doors knows about Prometheus):

* ``egressd_active_sessions{door}`` is read at scrape time from the sessions the runtime's
  admission counts open on each door (no gauge update per session); a session's end counts
  ``egressd_connections_total{door,pool,source,outcome}`` and both directions of
  ``egressd_bytes_total`` from the finished :class:`~egressd.runtime.SessionRecord`;
* each dial's latency goes to ``egressd_dial_duration_seconds{source,via}``, each failure
  blamed on a source to ``egressd_source_failures_total{source,kind}``, each new
  suspension to ``egressd_source_suspensions_total{source,kind}``;
* a SOCKS5 session also counts KumoProxy's ``proxy_*`` metrics by listener address
  (accepted and active when it opens; completed or failed, and bytes, when it ends);
* ``Runtime.smtp_transaction`` counts
  ``egressd_smtp_transactions_total{pool,source,reply_class}``;
* each reload counts ``egressd_reloads_total`` or ``egressd_reload_failures_total`` and
  sets ``egressd_config_last_reload_successful`` (and its timestamp when it took effect;
  startup counts as a successful load).

Labels stay bounded whatever a client sends: a pool or source label is a name some loaded
configuration defined, else ``""``; an outcome is a short lower-case word, else ``other``.
Byte counts are added when the session ends, so a scrape shows finished sessions exactly.

:class:`Extras` runs the endpoints ``[metrics] listen`` and ``[control] socket`` ask for,
each in a cancel scope of its own inside the daemon's nursery: :meth:`Extras.apply` starts,
stops or moves them to match a configuration, at startup (where a failure to bind stops the
daemon) and after each reload (where it is logged and the old endpoint is gone). Before
every scrape the ``egressd_source_*`` gauges are rewritten from the health snapshot.

The daemon is seen only through :class:`Observed`, a narrow Protocol, and the control
socket sees it only through :class:`DaemonControls`: dependencies go one way, daemon ->
observe -> control, with no import back.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import trio
from prometheus_client import Counter

from egressd import __version__
from egressd.config import Config, Endpoint, Listener, format_hostport
from egressd.control import serve_control
from egressd.egress import EgressFailure, EgressObserver
from egressd.fleet.node import Fleet
from egressd.health import SourceHealth
from egressd.log import get_logger
from egressd.metrics import Metrics, reply_class, serve_metrics
from egressd.net.shaping import smtp_budget
from egressd.runtime import Runtime, SessionRecord
from egressd.shaping import Override, Suspension
from egressd.shaping.policy import ScopeKind
from egressd.warming import Warming, metric_rows, warmup_command

log = get_logger("observe")

DOORS = ("smtp", "socks5", "proxy")
STATUS_BREAKERS = 50
"""Open circuit breakers listed by ``status`` (the most recently failing; all are counted)."""
_OUTCOME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_Key = tuple[str, str, str]
"""A transaction count's label values (:class:`~egressd.metrics.TransactionMetrics`)."""


class RunningListener(Protocol):
    """A bound listener as the observers see it."""

    @property
    def port(self) -> int: ...

    @property
    def listener(self) -> Listener: ...


class Observed(Protocol):
    """The daemon as the observers see it: :class:`egressd.daemon.Daemon` provides it.

    This narrow view is what keeps the dependencies one-way: the daemon imports this
    module, and this module (and :mod:`egressd.control` below it) never imports the daemon.
    """

    @property
    def runtime(self) -> Runtime: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def on_reload(self) -> list[Callable[[bool], None]]: ...

    @property
    def started_at(self) -> float: ...

    @property
    def reloads(self) -> int: ...

    @property
    def reload_failures(self) -> int: ...

    @property
    def listeners(self) -> Mapping[tuple[str, Endpoint], RunningListener]: ...

    @property
    def warming(self) -> Warming | None: ...

    @property
    def fleet(self) -> Fleet | None: ...

    def config_generation(self) -> str: ...


def egress_observer(metrics: Metrics) -> EgressObserver:
    """Dial latencies, failures blamed on sources and new suspensions, into ``metrics``."""
    return EgressObserver(
        dialed=lambda source, seconds: metrics.observe_dial(source.name, source.hop, seconds),
        suspended=lambda source, kind: metrics.count_suspension(source.name, kind),
        failed=lambda source, kind: metrics.count_failure(source.name, kind),
    )


class KnownNames:
    """Pool and source names of every configuration loaded so far: the allowed labels."""

    def __init__(self) -> None:
        self.pools: set[str] = set()
        self.sources: set[str] = set()

    def add(self, config: Config) -> None:
        self.pools.update(config.pools)
        self.sources.update(config.sources)

    def pool(self, name: str | None) -> str:
        return name if name is not None and name in self.pools else ""

    def source(self, name: str | None) -> str:
        return name if name is not None and name in self.sources else ""


def outcome_label(outcome: str) -> str:
    """``outcome`` when it is a short lower-case word, else ``other``."""
    return outcome if _OUTCOME.fullmatch(outcome) else "other"


class SessionCounters:
    """Counts finished sessions into ``metrics``; the labelled children are looked up once.

    ``Metric.labels()`` validates and stringifies its labels and takes a lock on every call;
    a session needs three of them. Labels are bounded (see the module doc), so the children
    are kept in dicts keyed by their label values (nothing ever removes these series), and
    the per-session work is a dict lookup and the increments. The SOCKS5 door's KumoProxy
    metrics are plain integers per listener (:class:`~egressd.metrics.ProxyMetrics`).

    ``egressd_active_sessions{door}`` is not counted here: :meth:`watch_active` makes each
    door's child read ``open_by_door`` (the admission's counts, which every session already
    updates) at scrape time. An inc() and a dec() per session were 14 Python calls, a
    sixtieth of a short SOCKS5 session's.
    """

    def __init__(self, metrics: Metrics, names: KnownNames) -> None:
        self.metrics = metrics
        self.names = names
        self._finished: dict[tuple[str, str, str, str], tuple[Counter, Counter, Counter]] = {}

    def watch_active(self, doors: Iterable[str], open_by_door: Callable[[str], float]) -> None:
        """Each door's ``egressd_active_sessions{door}`` reads ``open_by_door(door)``."""
        for door in doors:
            self.metrics.active_sessions.labels(door).set_function(partial(open_by_door, door))

    def opened(self, record: SessionRecord) -> None:
        if record.door == "socks5":
            counts = self.metrics.proxy.counts(record.listener or "")
            counts.accepted += 1
            counts.active += 1

    def proxy_finished(self, record: SessionRecord) -> None:
        """KumoProxy's view of a finished SOCKS5 session (plain integers: see ProxyMetrics)."""
        proxy, listener = self.metrics.proxy, record.listener or ""
        counts = proxy.counts(listener)
        counts.active -= 1
        if record.outcome == "ok":
            counts.completed += 1
        else:
            counts.failed += 1
            if record.outcome == "tls_failed":
                proxy.tls_failures.labels(listener).inc()
        counts.bytes_received += record.bytes_up
        counts.bytes_sent += record.bytes_down

    def finished(self, record: SessionRecord) -> None:
        """A finished session: one connection, its bytes, one active session fewer."""
        names = self.names
        door, pool, source = record.door, names.pool(record.pool), names.source(record.source)
        key = (door, pool, source, outcome_label(record.outcome))
        children = self._finished.get(key)
        if children is None:
            outcome = key[3]
            metrics = self.metrics
            children = self._finished[key] = (
                metrics.connections.labels(door, pool, source, outcome),
                metrics.bytes.labels(door, pool, source, "upstream"),
                metrics.bytes.labels(door, pool, source, "downstream"),
            )
        connections, upstream, downstream = children
        connections.inc()
        upstream.inc(record.bytes_up)
        downstream.inc(record.bytes_down)
        if door == "socks5":
            self.proxy_finished(record)


class TransactionCounters:
    """Counts relayed transactions into ``egressd_smtp_transactions_total`` and
    ``egressd_provider_messages_total`` (plain integers, :class:`~egressd.metrics.
    TransactionMetrics`): the two keys are worked out once per (pool, code, source,
    provider) as the door reports them, not bounded and labelled per message.

    The labels depend on the names known (:meth:`forget` after a reload adds some) and the
    shaping providers (the shaper's policy is compared on each call: shaping files reload
    on their own); at most :attr:`LIMIT` keys are kept.
    """

    LIMIT = 4096

    def __init__(self, metrics: Metrics, names: KnownNames, runtime: Callable[[], Runtime]):
        self.metrics = metrics
        self.names = names
        self.runtime = runtime
        self._children: dict[tuple[str, int, str, str], tuple[_Key, _Key]] = {}
        self._policy: object = None

    def count(self, pool: str, code: int, source: str, provider: str) -> None:
        shaper = self.runtime().shaper
        policy = shaper.policy if shaper is not None else None
        if policy is not self._policy:
            self.forget()
            self._policy = policy
        key = (pool, code, source, provider)
        children = self._children.get(key)
        if children is None:
            children = self._lookup(pool, code, source, provider)
            if len(self._children) >= self.LIMIT:
                self.forget()
            self._children[key] = children
        transactions, messages = children
        counts = self.metrics.transactions
        counts.transactions[transactions] += 1
        counts.messages[messages] += 1

    def forget(self) -> None:
        self._children.clear()

    def _lookup(self, pool: str, code: int, source: str, provider: str) -> tuple[_Key, _Key]:
        """The two counts' keys (each counted from 0 if new)."""
        names, counts = self.names, self.metrics.transactions
        source, klass = names.source(source), reply_class(code)
        provider = provider_label(self.runtime(), provider)
        transactions = (names.pool(pool), source, klass)
        messages = (source, provider, klass)
        counts.transactions.setdefault(transactions, 0)
        counts.messages.setdefault(messages, 0)
        return transactions, messages


def count_into_metrics(daemon: Observed) -> None:
    """Attach ``daemon.metrics`` to the runtime's session, transaction and reload hooks."""
    metrics, runtime = daemon.metrics, daemon.runtime
    names = KnownNames()
    names.add(runtime.config)
    counters = SessionCounters(metrics, names)
    counters.watch_active(DOORS, lambda door: float(daemon.runtime.admission.by_door[door]))
    runtime.session_opened_hooks.append(counters.opened)
    runtime.session_hooks.append(counters.finished)
    transactions = TransactionCounters(metrics, names, lambda: daemon.runtime)
    runtime.transaction_hooks.append(transactions.count)
    runtime.connection_hooks.append(
        lambda source, provider, delta: metrics.count_provider_connection(
            names.source(source), provider_label(daemon.runtime, provider), delta
        )
    )
    runtime.login_failure_hooks.append(lambda door: metrics.login_failures.labels(door).inc())
    runtime.tls_hooks.append(lambda policy, outcome: metrics.smtp_tls.labels(policy, outcome).inc())
    metrics.config_loaded(True, time.time())

    def reloaded(ok: bool) -> None:
        metrics.config_loaded(ok, time.time())
        if ok:
            names.add(daemon.runtime.config)
            transactions.forget()
            metrics.reloads.inc()
        else:
            metrics.reload_failures.inc()

    daemon.on_reload.append(reloaded)


class DaemonControls:
    """The daemon as the control socket sees it (:class:`~egressd.control.Controlled`)."""

    def __init__(self, daemon: Observed) -> None:
        self._daemon = daemon

    def has_source(self, name: str) -> bool:
        return name in self._daemon.runtime.config.sources

    def suspend(self, source: str, seconds: float, reason: str) -> None:
        self._daemon.runtime.health.suspend(source, seconds, reason)
        self._daemon.metrics.count_suspension(source, None)

    def resume(self, source: str) -> bool:
        return self._daemon.runtime.health.resume(source)

    def warmup(self, action: str, source: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        return warmup_command(self._daemon.warming, action, source, options)

    def suspend_towards(
        self, source: str, kind: str, name: str, seconds: float, reason: str
    ) -> None:
        shaper = self._daemon.runtime.shaper
        if shaper is None:
            raise ValueError("no shaping_files: nothing to suspend a provider or site in")
        if kind == "provider" and name not in shaper.policy.sections.providers:
            known = ", ".join(shaper.policy.sections.providers) or "none"
            raise ValueError(f"unknown provider {name!r} (providers: {known})")
        scope_kind: ScopeKind = "provider" if kind == "provider" else "site"
        shaper.suspend((source, scope_kind, name), seconds, reason)

    def resume_towards(self, source: str, kind: str, name: str) -> bool:
        shaper = self._daemon.runtime.shaper
        if shaper is None:
            return False
        scope_kind: ScopeKind = "provider" if kind == "provider" else "site"
        return shaper.resume((source, scope_kind, name))

    def explain(self, domain: str, mx: list[tuple[int, str]], pool: str) -> dict[str, Any]:
        return live_explain(self._daemon.runtime, domain, mx, pool)

    def status(self) -> dict[str, Any]:
        """The daemon's pid, version, configuration, generation, listeners, pools and sources."""
        daemon = self._daemon
        runtime = daemon.runtime
        config = runtime.config
        return {
            "pid": os.getpid(),
            "worker": getattr(daemon, "worker", None),
            "version": __version__,
            "config": str(config.path),
            "started": round(daemon.started_at, 3),
            "generation": daemon.reloads + 1,
            "reload_failures": daemon.reload_failures,
            "draining": runtime.draining,
            "active_sessions": runtime.active_sessions,
            "listeners": [
                {
                    "door": door,
                    "address": str(address),
                    "port": running.port,
                    "pool": running.listener.pool,
                }
                for (door, address), running in daemon.listeners.items()
            ],
            "pools": {
                name: {entry.source: entry.weight for entry in pool.entries}
                for name, pool in config.pools.items()
            },
            "sources": self._sources(),
            "shaping": self._shaping(),
            "budgets": self._budgets(),
            "state": self._state(),
            **self._breakers(),
        }

    def _breakers(self) -> dict[str, Any]:
        """The destinations whose circuit breaker is open (``until``: a Unix time; 0 s left
        is half-open), the last :data:`STATUS_BREAKERS` of them, and how many in all."""
        now = time.time()
        found = self._daemon.runtime.breaker.open_breakers()
        return {
            "breakers_open": len(found),
            "breakers": [
                {
                    "destination": format_hostport(*item.destination)
                    + (f' (source "{item.source}" only)' if item.source is not None else ""),
                    "until": round(now + item.seconds_left, 3),
                    "failures": item.failures,
                    "kind": str(item.last_kind),
                    "reason": item.last_reason,
                }
                for item in found[-STATUS_BREAKERS:]
            ],
        }

    def _budgets(self) -> dict[str, Any] | None:
        """Shared budgets (``[state] backend = "redis"``): shared or local shares; None
        when the budgets are counted in this process."""
        shared = self._daemon.runtime.shared_budgets
        return None if shared is None else shared.status()

    def _state(self) -> dict[str, Any]:
        """The state backend; with Redis, its health and the fleet as last read."""
        fleet = self._daemon.fleet
        if fleet is None:
            return {"backend": "sqlite"}
        return fleet.status(self._daemon.config_generation())

    def _shaping(self) -> list[dict[str, Any]] | None:
        """Active (source, site/provider) suspensions and overrides; None without shaping."""
        shaper = self._daemon.runtime.shaper
        if shaper is None:
            return None
        return effects_json(shaper.active(), shaper.clock())

    def _sources(self) -> list[dict[str, Any]]:
        """Every source's health, with ``suspended_until`` as a Unix time."""
        now = time.time()
        sources = []
        for status in self._daemon.runtime.health.snapshot():
            item = status.to_dict()
            left = status.suspended_for
            item["suspended_until"] = round(now + left, 3) if left is not None else None
            sources.append(item)
        return sources


def refresh_gauges(daemon: Observed) -> None:
    """Rewrite the gauges that mirror state (sources, shaping, warm-up, the state backend)
    before a scrape."""
    """Rewrite the gauges that mirror state (sources, shaping, warm-up, open destination
    breakers) before a scrape."""
    metrics = daemon.metrics
    metrics.refresh_sources(daemon.runtime.health.snapshot())
    metrics.refresh_shaping(shaping_rows(daemon.runtime))
    metrics.refresh_warmup(metric_rows(daemon.warming))
    fleet = daemon.fleet
    if fleet is not None:
        metrics.refresh_state("redis", fleet.health.up, fleet.alive_nodes())
    breakers = daemon.runtime.breaker.open_breakers()
    metrics.refresh_breakers(str(found.last_kind) for found in breakers)


ServiceStarter = Callable[..., Awaitable[None]]


class Extras:
    """The metrics endpoint and the control socket, matched to the current configuration."""

    def __init__(self, daemon: Observed, nursery: trio.Nursery) -> None:
        self._daemon = daemon
        self._nursery = nursery
        self._metrics_at: Endpoint | None = None
        self._metrics_scope: trio.CancelScope | None = None
        self._control_at: str | None = None
        self._control_scope: trio.CancelScope | None = None
        self.metrics_port: int | None = None
        """The metrics endpoint's real port (``[metrics] listen`` may say port 0)."""

    async def apply(self, config: Config, *, at_startup: bool = False) -> None:
        """Start, stop or move the endpoints to match ``config``.

        At startup a failure raises OSError; after a reload it is logged.
        """
        try:
            await self._apply_metrics(config.metrics.listen)
            await self._apply_control(config.control.socket)
        except OSError as exc:
            if at_startup:
                raise
            log.error("reload: %s", exc)

    def _before_scrape(self, metrics: Metrics, health: SourceHealth) -> None:
        refresh_gauges(self._daemon)

    async def _apply_metrics(self, endpoint: Endpoint | None) -> None:
        if endpoint == self._metrics_at:
            return
        if self._metrics_scope is not None:
            self._metrics_scope.cancel()
            self._metrics_scope, self._metrics_at, self.metrics_port = None, None, None
        if endpoint is None:
            return
        metrics, health = self._daemon.metrics, self._daemon.runtime.health
        serve = partial(
            serve_metrics,
            endpoint,
            metrics.registry,
            before_scrape=lambda: self._before_scrape(metrics, health),
            settings=lambda: self._daemon.runtime.config.metrics,
        )
        try:
            self._metrics_scope, listeners = await self._start(serve)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {endpoint}: {exc.strerror}") from exc
        self._metrics_at = endpoint
        self.metrics_port = listeners[0].socket.getsockname()[1]
        log.info(
            "metrics endpoint listening",
            extra={"fields": {"address": str(endpoint), "port": self.metrics_port}},
        )

    async def _apply_control(self, path: str | None) -> None:
        if path == self._control_at:
            return
        if self._control_scope is not None:
            self._control_scope.cancel()
            self._control_scope, self._control_at = None, None
        if path is None:
            return
        self._control_scope, _ = await self._start(
            partial(serve_control, path, DaemonControls(self._daemon))
        )
        self._control_at = path
        log.info("control socket listening", extra={"fields": {"path": path}})

    async def _start(self, service: ServiceStarter) -> tuple[trio.CancelScope, Any]:
        """Run ``service`` (a ``nursery.start``-able function) in a cancel scope of its own."""
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await service(task_status=task_status)

        started = await self._nursery.start(run)
        return scope, started


def live_explain(
    runtime: Runtime, domain: str, mx: list[tuple[int, str]], pool: str
) -> dict[str, Any]:
    """What ``egressd explain`` asks the daemon: each source's shaping usage towards the
    domain, the active suspensions and overrides that apply to it, and the source the pool
    would pick next. The pick runs on a copy of the pool's selector: no WRR turn is used."""
    config = runtime.config
    if pool not in config.pools:
        raise ValueError(f"unknown pool {pool!r}")
    sources = [entry.source for entry in config.pools[pool].entries]
    budget = smtp_budget(runtime.shaper, domain, mx)
    shaper = runtime.shaper
    usage: dict[str, list[str]] = {}
    active: list[dict[str, Any]] = []
    if budget is not None and shaper is not None:
        destination = budget.destination
        usage = {source: shaper.usage(source, destination) for source in sources}
        provider = shaper.policy.provider_of(destination)
        names = {("site", destination.site), ("domain", destination.domain or "")}
        if provider is not None:
            names.add(("provider", provider[0]))
        active = [
            effect
            for effect in effects_json(shaper.active(), shaper.clock())
            if effect["source"] in sources and (effect["kind"], effect["name"]) in names
        ]
    egress = copy.copy(runtime.egress)
    egress.pools = copy.deepcopy(runtime.egress.pools)
    try:
        picked: str | None = egress.pick(pool, budget=budget).name
        why = ""
    except EgressFailure as exc:
        picked, why = None, str(exc)
    finally:
        if budget is not None:
            budget.release()
    return {"usage": usage, "active": active, "next": picked, "next_refused": why}


def effects_json(
    effects: Sequence[Suspension | Override], clock_now: float
) -> list[dict[str, Any]]:
    """Suspensions and overrides for the control socket, with a Unix-time ``until``."""
    wall = time.time()
    rows = []
    for effect in effects:
        source, kind, name = effect.scope
        row: dict[str, Any] = {
            "source": source,
            "kind": kind,
            "name": name,
            "until": round(wall + effect.until - clock_now, 3),
            "reason": effect.reason,
        }
        if isinstance(effect, Suspension):
            row["rule"] = "suspend"
        else:
            row["rule"] = f"set {effect.name}"
        rows.append(row)
    return rows


def provider_label(runtime: Runtime, provider: str) -> str:
    """``provider`` when the shaping files define it, else ``other``: one label per
    configured provider, never one per domain."""
    shaper = runtime.shaper
    if shaper is not None and provider in shaper.policy.sections.providers:
        return provider
    return "other"


def shaping_rows(runtime: Runtime) -> list[tuple[str, str, str]]:
    """(source, provider, rule) of each active suspension and override, labels bounded:
    configured sources and providers, ``other`` for site and domain scopes."""
    shaper = runtime.shaper
    if shaper is None:
        return []
    sources = runtime.config.sources
    rows = []
    for effect in shaper.active():
        source, kind, name = effect.scope
        provider = provider_label(runtime, name) if kind == "provider" else "other"
        rule = "suspend" if isinstance(effect, Suspension) else f"set {effect.name}"
        rows.append((source if source in sources else "", provider, rule))
    return rows
