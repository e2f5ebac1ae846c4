"""Prometheus metrics, and a small trio HTTP endpoint that serves them.

Theory of operation
-------------------
All metrics live in :class:`Metrics`, which owns its own
:class:`prometheus_client.CollectorRegistry` rather than the process-wide default one: a test
builds a fresh ``Metrics()`` and sees only its own numbers, and the daemon builds exactly one
for its lifetime, so counters keep counting across configuration reloads.

Labels stay bounded: front door (``smtp``, ``socks5``, ``proxy``), pool and source names
(from the configuration), outcomes, directions, hop kinds and reply classes - never a
destination address or domain. A label not known yet (a connection refused before a source
was picked) is the empty string.

========================================================  ========================================
metric                                                    labels
========================================================  ========================================
``egressd_connections_total``                             door, pool, source, outcome
``egressd_bytes_total``                                   door, pool, source, direction
``egressd_active_sessions``                               door
``egressd_dial_duration_seconds``                         source, via (direct/haproxy/socks5)
``egressd_source_failures_total``                         source, kind (see :mod:`egressd.health`)
``egressd_source_suspensions_total``                      source, kind (or ``operator``)
``egressd_source_suspended``                              source, reason (0 or 1)
``egressd_source_active_connections``                     source
``egressd_source_recent_failures``                        source (since its last success)
``egressd_warmup_step`` / ``_quota`` / ``_used``           source, provider (warming sources)
``egressd_state_backend_up``                              backend (redis: 1 while the last call
                                                          answered, 0 while it is down)
``egressd_fleet_alive_nodes``                             - (nodes with a live heartbeat)
``egressd_smtp_transactions_total``                       pool, source, reply_class (2xx/4xx/5xx)
``egressd_provider_messages_total``                       source, provider (shaping files' or
                                                          ``other``), reply_class
``egressd_provider_connections_total``                    source, provider: connections made
``egressd_provider_open_connections``                     source, provider: open now
``egressd_shaping_active``                                source, provider, rule (suspend or
                                                          set KEY): active suspensions/overrides
``egressd_budgets_shared``                                store (1: shaping budgets counted in the
                                                          shared store; 0: local shares, the
                                                          store is unreachable)
``egressd_budgets_store_outages_total``                   - (times the store became unreachable)
``egressd_destination_breakers_open``                     kind (of the failure that opened it)
``egressd_smtp_tls_total``                                policy (none/opportunistic/encrypt/verify/
                                                          mta-sts enforce/mta-sts testing/dane),
                                                          outcome (verified/encrypted/plaintext/
                                                          testing_failure/failed)
``egressd_reloads_total``                                 -
``egressd_reload_failures_total``                         -
``egressd_config_last_reload_successful``                 - (1 or 0)
``egressd_config_last_reload_success_timestamp_seconds``  - (Unix time)
``egressd_build_info``                                    version (always 1)
``process_*``                                             - (open/max fds, CPU, memory, start)
========================================================  ========================================

The same facts under the names a KumoMTA or KumoProxy dashboard queries:

========================================================  ========================================
``egress_source_health_suspended``                        source, reason (1 while suspended)
``egress_source_health_suspensions_total``                source, reason
``egress_source_connection_failures_total``               source, kind
``proxy_connections_accepted_total``                      listener (the SOCKS5 door's)
``proxy_connections_completed_total``                     listener (both sides closed cleanly)
``proxy_connections_failed_total``                        listener (every other end)
``proxy_active_connections``                              listener
``proxy_bytes_received_total``                            listener (from clients)
``proxy_bytes_sent_total``                                listener (to clients)
``proxy_tls_handshake_failures_total``                    listener (``use_tls`` listeners)
========================================================  ========================================

KumoProxy's ``proxy_outbound_connections_total{listener,destination}`` is left out: a label
per destination address is unbounded. A suspension's ``reason`` is its failure kind, or
``operator`` for ``egressd suspend``; a healthy source's ``egressd_source_suspended`` is 0
with ``reason=""``. Counters carry no ``_created`` series (they double the series count
and no dashboard reads them).

``direction`` is ``upstream`` (client to remote) or ``downstream`` (remote to client).
Suggested ``outcome`` values: ``ok``, ``denied``, ``no_source``, ``dial_failed``,
``timeout``, ``error``.

The ``egressd_source_*`` gauges mirror :meth:`egressd.health.SourceHealth.snapshot`;
:meth:`Metrics.refresh_sources` rewrites them, and :func:`serve_metrics` can call it before
every scrape (``before_scrape=``) so they are never stale.

The endpoint is HTTP/1.0 in miniature, in the spirit of a scrape target, not a web server:
read the request head (at most :data:`MAX_REQUEST_HEAD` bytes, within
:data:`REQUEST_TIMEOUT` seconds), answer ``GET /metrics`` (or ``HEAD``) with the text
exposition format, 404 for any other path, 405 for other methods, 400 for garbage, 431 for
an oversized head, nothing for a client that is too slow; then close. It runs on trio
(``nursery.start(serve_metrics, endpoint, metrics.registry)``), not on prometheus_client's
thread-based server. Exposition is generated synchronously in the event loop; with bounded
labels it takes well under a millisecond per hundred series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egressd import __version__
from egressd.access import network_refusal
from egressd.aggregate import FamilyRow
from egressd.config import Endpoint, HopKind, MetricsSettings
from egressd.health import FailureKind, SourceStatus

log = logging.getLogger(__name__)

DoorName = Literal["smtp", "socks5", "proxy"]
Direction = Literal["upstream", "downstream"]
ReplyClass = Literal["2xx", "4xx", "5xx", "other"]

DIAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0


def reply_class(code: int) -> ReplyClass:
    """The class of a final SMTP reply code: ``250`` -> ``2xx``."""
    first = code // 100
    if first == 2:
        return "2xx"
    if first == 4:
        return "4xx"
    if first == 5:
        return "5xx"
    return "other"


class PidOnlyProcessCollector(ProcessCollector):
    """prometheus_client's ``process_*`` collector, working under ``ProcSubset=pid``.

    The stock collector reads the boot time from ``/proc/stat`` and, when it cannot, reports
    nothing at all. The systemd unit sets ``ProcSubset=pid``, which hides ``/proc/stat``
    (only ``/proc/PID/...`` stays), so the boot time comes from ``CLOCK_BOOTTIME`` instead:
    the clock ``/proc/PID/stat``'s start time counts from.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def suspension_reason(kind: FailureKind | None) -> str:
    """The ``reason`` label of a suspension: its failure kind, else ``operator``."""
    return kind if kind is not None else OPERATOR


OPERATOR = "operator"


class Metrics:
    """Every egressd metric, in a registry of its own (``self.registry``)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; none wanted
        self.registry = CollectorRegistry()
        registry = self.registry
        PidOnlyProcessCollector(registry=registry)
        self.connections = Counter(
            "egressd_connections",
            "Connections handled, by front door, pool, source and outcome.",
            ("door", "pool", "source", "outcome"),
            registry=registry,
        )
        self.bytes = Counter(
            "egressd_bytes",
            "Bytes relayed; upstream is client to remote, downstream remote to client.",
            ("door", "pool", "source", "direction"),
            registry=registry,
        )
        self.active_sessions = Gauge(
            "egressd_active_sessions",
            "Client sessions open now, by front door.",
            ("door",),
            registry=registry,
        )
        self.dial_duration = Histogram(
            "egressd_dial_duration_seconds",
            "Time to connect to a destination (including the proxy), by source and way out (via).",
            ("source", "via"),
            buckets=DIAL_BUCKETS,
            registry=registry,
        )
        self.source_suspensions = Counter(
            "egressd_source_suspensions",
            "Times a source was suspended, by source and failure kind.",
            ("source", "kind"),
            registry=registry,
        )
        self.reloads = Counter(
            "egressd_reloads", "Configuration reloads that took effect.", registry=registry
        )
        self.reload_failures = Counter(
            "egressd_reload_failures",
            "Configuration reloads rejected (the old configuration stayed).",
            registry=registry,
        )
        self.transactions = TransactionMetrics(registry)
        self.provider_connections_opened = Counter(
            "egressd_provider_connections",
            "Connections made with a shaping budget, by source and shaping provider "
            '(unmatched destinations are "other").',
            ("source", "provider"),
            registry=registry,
        )
        self.provider_connections_open = Gauge(
            "egressd_provider_open_connections",
            "Open connections with a shaping budget, by source and shaping provider "
            '(unmatched destinations are "other").',
            ("source", "provider"),
            registry=registry,
        )
        self.shaping_active = Gauge(
            "egressd_shaping_active",
            "Active shaping suspensions and overrides by source, provider (site and domain "
            'scopes count as "other") and rule.',
            ("source", "provider", "rule"),
            registry=registry,
        )
        self.budgets_shared = Gauge(
            "egressd_budgets_shared",
            "1 while the shaping budgets are counted in the store shared by the fleet (Redis), "
            "0 while this node counts local shares because the store is unreachable "
            "(absent when the budgets are counted in this process).",
            ("store",),
            registry=registry,
        )
        self.budgets_store_outages = Counter(
            "egressd_budgets_store_outages",
            "Times the store of the shared shaping budgets became unreachable.",
            registry=registry,
        )
        self.breakers_open = Gauge(
            "egressd_destination_breakers_open",
            "Destinations (address and port) whose circuit breaker is open or half-open, by "
            "the kind of failure that opened it (no per-destination label: egressd status "
            "lists them).",
            ("kind",),
            registry=registry,
        )
        self._breaker_kinds: set[str] = set()
        self.smtp_tls = Counter(
            "egressd_smtp_tls",
            "Remote SMTP connections opened (or not) by the SMTP door, by TLS policy and outcome.",
            ("policy", "outcome"),
            registry=registry,
        )
        self.login_failures = Counter(
            "egressd_login_failures",
            "Logins refused for a wrong username or password, by front door.",
            ("door",),
            registry=registry,
        )
        self.source_suspended = Gauge(
            "egressd_source_suspended",
            "1 while the source is suspended (reason: failure kind or operator), else 0.",
            ("source", "reason"),
            registry=registry,
        )
        self.warmup_step = Gauge(
            "egressd_warmup_step",
            "The warm-up step (1 = the plan's first day) of a warming source, per provider.",
            ("source", "provider"),
            registry=registry,
        )
        self.warmup_quota = Gauge(
            "egressd_warmup_quota",
            "Today's warm-up quota of the source to the provider, in messages.",
            ("source", "provider"),
            registry=registry,
        )
        self.warmup_used = Gauge(
            "egressd_warmup_used",
            "Messages of the source to the provider today, counted against its quota"
            " (the shared day counter with workers or Redis).",
            ("source", "provider"),
            registry=registry,
        )
        self.state_backend_up = Gauge(
            "egressd_state_backend_up",
            "1 while the shared state backend (Redis) answers, 0 while it is down.",
            ("backend",),
            registry=registry,
        )
        self.fleet_alive_nodes = Gauge(
            "egressd_fleet_alive_nodes",
            "Nodes of the fleet with a live heartbeat at the last read (this one included).",
            registry=registry,
        )
        self.source_active_connections = Gauge(
            "egressd_source_active_connections",
            "Connections open now through the source.",
            ("source",),
            registry=registry,
        )
        self.source_recent_failures = Gauge(
            "egressd_source_recent_failures",
            "Failures of the source since its last success.",
            ("source",),
            registry=registry,
        )
        self.source_failures = Counter(
            "egressd_source_failures",
            "Failures blamed on the source, by source and failure kind.",
            ("source", "kind"),
            registry=registry,
        )
        self.config_last_reload_successful = Gauge(
            "egressd_config_last_reload_successful",
            "1 when the last configuration load (startup or reload) took effect, else 0.",
            registry=registry,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "egressd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that took effect.",
            registry=registry,
        )
        self.kumo = KumoMetrics(registry)
        self.proxy = ProxyMetrics(registry)
        build_info = Gauge(
            "egressd_build_info", "egressd's version.", ("version",), registry=registry
        )
        build_info.labels(__version__).set(1)
        self._dial_children: dict[tuple[str, str], Histogram] = {}

    # ------------------------------------------------------------------ conveniences

    def count_connection(self, door: DoorName, pool: str, source: str, outcome: str) -> None:
        self.connections.labels(door, pool, source, outcome).inc()

    def count_bytes(
        self, door: DoorName, pool: str, source: str, direction: Direction, amount: int
    ) -> None:
        self.bytes.labels(door, pool, source, direction).inc(amount)

    def observe_dial(self, source: str, via: HopKind, seconds: float) -> None:
        """One dial's latency (every connection dials: the labelled child is cached)."""
        child = self._dial_children.get((source, via))
        if child is None:
            child = self._dial_children[source, via] = self.dial_duration.labels(source, via)
        child.observe(seconds)

    def count_suspension(self, source: str, kind: FailureKind | None) -> None:
        """A new suspension: ``kind`` None is an operator's (``egressd suspend``)."""
        reason = suspension_reason(kind)
        self.source_suspensions.labels(source, reason).inc()
        self.kumo.suspensions.labels(source, reason).inc()

    def count_failure(self, source: str, kind: FailureKind) -> None:
        """A failure blamed on ``source`` (suspending it or not)."""
        self.source_failures.labels(source, kind).inc()
        self.kumo.connection_failures.labels(source, kind).inc()

    def count_transaction(self, pool: str, code: int, source: str = "") -> None:
        """One relayed transaction whose final reply (to the dot) had ``code``."""
        key = (pool, source, reply_class(code))
        counts = self.transactions.transactions
        counts[key] = counts.get(key, 0) + 1

    def count_provider_message(self, source: str, provider: str, code: int) -> None:
        """One relayed message from ``source`` to ``provider`` (labels already bounded)."""
        key = (source, provider, reply_class(code))
        counts = self.transactions.messages
        counts[key] = counts.get(key, 0) + 1

    def count_provider_connection(self, source: str, provider: str, delta: int) -> None:
        """A connection from ``source`` to ``provider`` made (+1) or ended (-1)."""
        self.provider_connections_open.labels(source, provider).inc(delta)
        if delta > 0:
            self.provider_connections_opened.labels(source, provider).inc()

    def refresh_shaping(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Rewrite ``egressd_shaping_active`` from (source, provider, rule) rows, one per
        active suspension or override (bounded labels)."""
        self.shaping_active.clear()
        for source, provider, rule in rows:
            self.shaping_active.labels(source, provider, rule).inc()

    def budgets_shared_changed(self, shared: bool) -> None:
        """The shared budgets' store became unreachable (False) or answers again."""
        self.budgets_shared.labels("redis").set(1 if shared else 0)
        if not shared:
            self.budgets_store_outages.inc()

    def refresh_breakers(self, kinds: Iterable[str]) -> None:
        """Rewrite ``egressd_destination_breakers_open`` from the kind of each open breaker;
        kinds seen before and none open now read 0."""
        counts = dict.fromkeys(self._breaker_kinds, 0)
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
        for kind, count in counts.items():
            self.breakers_open.labels(kind).set(count)
        self._breaker_kinds.update(counts)

    def config_loaded(self, ok: bool, when: float) -> None:
        """A configuration load (startup or reload) took effect, or was refused."""
        self.config_last_reload_successful.set(1 if ok else 0)
        if ok:
            self.config_last_reload_success_timestamp.set(when)

    def refresh_sources(self, statuses: Iterable[SourceStatus]) -> None:
        """Rewrite the ``egressd_source_*`` gauges from a health snapshot.

        Series of sources missing from ``statuses`` (removed by a reload) disappear.
        """
        gauges = (
            self.source_suspended,
            self.source_active_connections,
            self.source_recent_failures,
            self.kumo.suspended,
        )
        for gauge in gauges:
            gauge.clear()
        for status in statuses:
            if status.suspended:
                reason = suspension_reason(status.suspension_kind)
                self.source_suspended.labels(status.name, reason).set(1)
                self.kumo.suspended.labels(status.name, reason).set(1)
            else:
                self.source_suspended.labels(status.name, "").set(0)
            self.source_active_connections.labels(status.name).set(status.active_connections)
            self.source_recent_failures.labels(status.name).set(status.recent_failures)

    def refresh_warmup(self, rows: Iterable[tuple[str, str, int, int, int]]) -> None:
        """Rewrite the ``egressd_warmup_*`` gauges: (source, provider, step, quota, used)
        of each warming source; a source that is warm or gone has no series."""
        for gauge in (self.warmup_step, self.warmup_quota, self.warmup_used):
            gauge.clear()
        for source, provider, step, quota, used in rows:
            self.warmup_step.labels(source, provider).set(step)
            self.warmup_quota.labels(source, provider).set(quota)
            self.warmup_used.labels(source, provider).set(used)

    def refresh_state(self, backend: str, up: bool, alive_nodes: int) -> None:
        """The shared state backend's state and the fleet's size (``[state] backend``)."""
        self.state_backend_up.labels(backend).set(1 if up else 0)
        self.fleet_alive_nodes.set(alive_nodes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class KumoMetrics:
    """KumoMTA's names for source health (``egress_source_*``), for its dashboards."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.suspended = Gauge(
            "egress_source_health_suspended",
            "1 while the source is suspended, by reason (KumoMTA's name).",
            ("source", "reason"),
            registry=registry,
        )
        self.suspensions = Counter(
            "egress_source_health_suspensions",
            "Times the source was suspended, by reason (KumoMTA's name).",
            ("source", "reason"),
            registry=registry,
        )
        self.connection_failures = Counter(
            "egress_source_connection_failures",
            "Connection failures blamed on the source, by kind (KumoMTA's name).",
            ("source", "kind"),
            registry=registry,
        )


class ProxyCounts:
    """One SOCKS5 listener's KumoProxy counts: plain integers, written by the door."""

    __slots__ = ("accepted", "active", "bytes_received", "bytes_sent", "completed", "failed")

    def __init__(self) -> None:
        self.accepted = 0
        self.completed = 0
        self.failed = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.active = 0


_PROXY_COUNTERS = (
    ("accepted", "proxy_connections_accepted", "SOCKS5 connections accepted (KumoProxy's name)."),
    (
        "completed",
        "proxy_connections_completed",
        "SOCKS5 sessions relayed to their end, both sides closing cleanly.",
    ),
    (
        "failed",
        "proxy_connections_failed",
        "SOCKS5 connections that ended otherwise (refused, handshake, dial, reset, timeout).",
    ),
    (
        "bytes_received",
        "proxy_bytes_received",
        "Bytes received from SOCKS5 clients (client to remote).",
    ),
    ("bytes_sent", "proxy_bytes_sent", "Bytes sent to SOCKS5 clients (remote to client)."),
)
_LAZY_PROXY_COUNTERS = frozenset({"completed", "failed"})
"""Listed for a listener only once counted (as a labelled Counter child appears)."""


class ProxyMetrics(Collector):
    """KumoProxy's ``proxy_*`` metrics, for the SOCKS5 door, by listener address.

    A short SOCKS5 session changes six of them. prometheus_client's ``inc()`` checks the
    metric and takes a lock each time (about five calls); a session's share was some 30
    Python calls. Here the door adds to plain integers (:meth:`counts`, one
    :class:`ProxyCounts` per listener) and :meth:`collect` turns them into the same
    families at scrape time. TLS handshake failures are rare and stay a Counter.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_listener: dict[str, ProxyCounts] = {}
        registry.register(self)
        self.tls_failures = Counter(
            "proxy_tls_handshake_failures",
            "TLS handshakes that failed on a use_tls SOCKS5 listener (KumoProxy's name).",
            ("listener",),
            registry=registry,
        )

    def counts(self, listener: str) -> ProxyCounts:
        """``listener``'s counts (created at first use, as ``labels()`` would)."""
        counts = self._by_listener.get(listener)
        if counts is None:
            counts = self._by_listener[listener] = ProxyCounts()
        return counts

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        listeners = list(self._by_listener.items())
        families: list[Metric] = []
        for attribute, name, text in _PROXY_COUNTERS:
            family = CounterMetricFamily(name, text, labels=("listener",))
            for listener, counts in listeners:
                value = getattr(counts, attribute)
                if value or attribute not in _LAZY_PROXY_COUNTERS:
                    family.add_metric((listener,), value)
            families.append(family)
        active = GaugeMetricFamily(
            "proxy_active_connections",
            "SOCKS5 connections open now (KumoProxy's name).",
            labels=("listener",),
        )
        for listener, counts in listeners:
            active.add_metric((listener,), counts.active)
        families.append(active)
        return families


class TransactionMetrics(Collector):
    """``egressd_smtp_transactions_total`` and ``egressd_provider_messages_total``.

    Every relayed SMTP message adds one to each. prometheus_client's ``inc()`` checks the
    metric and takes a lock each time (about five Python calls, ten per message); here the
    door adds to plain integers keyed by their label values (:attr:`transactions`: pool,
    source, reply_class; :attr:`messages`: source, provider, reply_class; the labels are
    bounded by whoever adds) and :meth:`collect` turns them into the same counter families
    at scrape time, as :class:`ProxyMetrics` does for KumoProxy's. A key is added with the
    first message it counts, as a labelled child appears at its first ``inc()``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.transactions: dict[tuple[str, str, str], int] = {}
        self.messages: dict[tuple[str, str, str], int] = {}
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        transactions = CounterMetricFamily(
            "egressd_smtp_transactions",
            "Relayed SMTP transactions, by pool, source and class of the remote's final reply.",
            labels=("pool", "source", "reply_class"),
        )
        for labels, value in list(self.transactions.items()):
            transactions.add_metric(labels, float(value))
        messages = CounterMetricFamily(
            "egressd_provider_messages",
            "Relayed SMTP messages by source and shaping provider (unmatched destinations are "
            '"other"), and the class of the final reply.',
            labels=("source", "provider", "reply_class"),
        )
        for labels, value in list(self.messages.items()):
            messages.add_metric(labels, float(value))
        return [transactions, messages]


# --------------------------------------------------------------------------- workers


def snapshot(registry: CollectorRegistry) -> list[FamilyRow]:
    """Every family of ``registry`` as JSON-ready rows (a worker's answer to its supervisor)."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(sample.name, dict(sample.labels), sample.value) for sample in family.samples],
        )
        for family in registry.collect()
    ]


class MergedCollector(Collector):
    """Serves families merged elsewhere (:func:`egressd.aggregate.merge_families`)."""

    def __init__(self, families: Callable[[], list[FamilyRow]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        for name, kind, documentation, samples in self._families():
            metric = Metric(name, documentation, kind)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
            yield metric


class SupervisorMetrics:
    """The supervisor's own metrics; its endpoint serves them merged with the workers'.

    ``own`` holds the reload counters, the last reload's outcome, the workers' states and
    restarts, ``egressd_build_info`` and the supervisor's ``process_*``; ``registry`` (what
    the endpoint serves) holds one :class:`MergedCollector` over ``own`` and the workers.
    """

    def __init__(self, families: Callable[[list[FamilyRow]], list[FamilyRow]]) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.own = CollectorRegistry()
        own = self.own
        PidOnlyProcessCollector(registry=own)
        self.reloads = Counter(
            "egressd_reloads", "Configuration reloads that took effect.", registry=own
        )
        self.reload_failures = Counter(
            "egressd_reload_failures",
            "Configuration reloads rejected (the old configuration stayed).",
            registry=own,
        )
        self.config_last_reload_successful = Gauge(
            "egressd_config_last_reload_successful",
            "1 when the last configuration load (startup or reload) took effect, else 0.",
            registry=own,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "egressd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that took effect.",
            registry=own,
        )
        self.workers = Gauge(
            "egressd_workers",
            "Worker processes by state (starting, ready; [daemon] workers in all).",
            ("state",),
            registry=own,
        )
        self.worker_restarts = Counter(
            "egressd_worker_restarts",
            "Workers started again after they died or hung, by worker number.",
            ("worker",),
            registry=own,
        )
        Gauge("egressd_build_info", "egressd's version.", ("version",), registry=own).labels(
            __version__
        ).set(1)
        self.registry = CollectorRegistry()
        self.registry.register(MergedCollector(lambda: families(snapshot(self.own))))

    def config_loaded(self, ok: bool, when: float) -> None:
        self.config_last_reload_successful.set(1 if ok else 0)
        if ok:
            self.config_last_reload_success_timestamp.set(when)
            self.reloads.inc()
        else:
            self.reload_failures.inc()


# --------------------------------------------------------------------------- HTTP endpoint


class _HeadTooLarge(Exception):
    pass


async def serve_metrics(
    endpoint: Endpoint,
    registry: CollectorRegistry,
    *,
    before_scrape: Callable[[], None] | None = None,
    settings: Callable[[], MetricsSettings] = MetricsSettings,
    gather: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``endpoint`` until cancelled.

    ``await nursery.start(serve_metrics, endpoint, registry)`` returns the bound listeners
    (port 0 picks a free port). ``before_scrape`` runs before each exposition, e.g.
    ``lambda: metrics.refresh_sources(health.snapshot())``. ``settings`` gives the current
    ``[metrics]`` table (``clients``, ``max_connections``), asked at every connection so a
    reload applies to the next one. ``gather`` is awaited before each ``GET /metrics`` (a
    supervisor asks its workers for their numbers).
    """
    listeners = await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
    gate = _ScrapeGate()

    async def handler(stream: trio.SocketStream) -> None:
        verdict = gate.verdict(_peer_host(stream), settings())
        if verdict != "serve":
            await _turn_away(stream, _BUSY if verdict == "busy" else None)
            return
        gate.active += 1
        try:
            await _handle_connection(stream, registry, before_scrape, gather)
        finally:
            gate.active -= 1

    await trio.serve_listeners(handler, listeners, task_status=task_status)


class _ScrapeGate:
    """Who may scrape, and how many at once: ``[metrics] clients`` and ``max_connections``.

    The endpoint must never be a way to take descriptors from the front doors, so a client
    outside ``clients`` is closed at once, and so is a connection beyond the cap (after a
    503, so that a scraper says why).
    """

    def __init__(self) -> None:
        self.active = 0

    def verdict(self, peer: str, settings: MetricsSettings) -> Literal["serve", "refused", "busy"]:
        refusal = network_refusal(settings.clients, peer, "metrics.clients")
        if refusal is not None:
            log.warning("metrics client refused: %s", refusal)
            return "refused"
        if self.active >= settings.max_connections:
            log.warning(
                "metrics connection refused: %d scrapes at once (metrics.max_connections)",
                self.active,
            )
            return "busy"
        return "serve"


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(peer[0])


async def _turn_away(stream: trio.SocketStream, answer: bytes | None) -> None:
    """Close a connection that is not served, after ``answer`` when there is one."""
    try:
        if answer is not None:
            with trio.move_on_after(1):
                await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _handle_connection(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    before_scrape: Callable[[], None] | None,
    gather: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """One request, one response, close; nothing a client does escapes this function."""
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                head = await _read_request_head(stream)
            except _HeadTooLarge:
                await stream.send_all(_response(431, "Request Header Fields Too Large"))
                return
            if head is not None and gather is not None and b" /metrics" in head:
                await gather()
            if head is not None:
                await stream.send_all(_answer(head, registry, before_scrape))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("metrics endpoint: request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def _read_request_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to the empty line, or None when the client hung up first.

    Raises :class:`_HeadTooLarge` past :data:`MAX_REQUEST_HEAD` bytes. Each search starts
    where the last one stopped (less the terminator's length), so a trickle of small
    chunks costs linear time.
    """
    buffer = bytearray()
    scanned = 0
    while True:
        end = _find_head_end(buffer, max(scanned - 3, 0))
        if end is not None:
            return bytes(buffer[:end])
        if len(buffer) > MAX_REQUEST_HEAD:
            raise _HeadTooLarge
        scanned = len(buffer)
        chunk = await stream.receive_some(MAX_REQUEST_HEAD + 1 - len(buffer))
        if not chunk:
            return None
        buffer += chunk


def _find_head_end(buffer: bytearray, start: int) -> int | None:
    """Where the head ends (before ``\\r\\n\\r\\n``, or a lenient ``\\n\\n``)."""
    positions = [
        p for p in (buffer.find(b"\r\n\r\n", start), buffer.find(b"\n\n", start)) if p >= 0
    ]
    return min(positions) if positions else None


def _answer(
    head: bytes, registry: CollectorRegistry, before_scrape: Callable[[], None] | None
) -> bytes:
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, "Bad Request")
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return _response(405, "Method Not Allowed", extra=b"Allow: GET, HEAD\r\n")
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, "Not Found")
    if before_scrape is not None:
        before_scrape()
    body = generate_latest(registry)
    return _response(200, "OK", body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


def _response(
    code: int,
    reason: str,
    body: bytes | None = None,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra: bytes = b"",
) -> bytes:
    if body is None:
        body = f"{code} {reason}\n".encode()
    head = (
        f"HTTP/1.0 {code} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    ).encode() + extra
    return head + b"\r\n" + (b"" if head_only else body)


_BUSY = _response(503, "Service Unavailable")
