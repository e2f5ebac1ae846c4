"""One daemon seen from many workers: their metrics and statuses merged; pure.

Theory of operation
-------------------
With ``[daemon] workers`` above 1 each worker counts into its own registry and knows only
its own sessions (:mod:`egressd.supervisor`). The supervisor serves one metrics endpoint
and one control socket, and asks every worker at each scrape or ``status``; the functions
here merge the answers.

Metrics (:func:`merge_families`): a family is the same family in every worker (same name,
type and labels), so the merge is per sample (name and labels):

* counters and histograms (buckets, ``_sum``, ``_count``) add up, so
  ``egressd_connections_total`` counts every session whichever worker served it. A worker
  that died leaves its last scraped counters behind as *retired* totals (the supervisor
  keeps them), so a restart does not make a counter go down;
* gauges of things that add up (:data:`SUM_GAUGES`: sessions and connections open now,
  recent failures, the processes' memory and descriptors) add up. Every other gauge is a
  state (a flag, or a value each worker sees of something they share: a source suspended,
  warm-up step, quota and day's count, active shaping rules, live fleet nodes,
  ``egressd_build_info``) and takes the maximum, so a new gauge is never counted once per
  worker by mistake; "up" flags (:data:`MIN_GAUGES`) take the minimum (down when a worker
  is). ``egressd_destination_breakers_open`` counts the destinations open in any worker,
  each once (:func:`count_open_breakers`: every worker has its own breakers, and a
  destination failing for two is one destination);
* ``process_*`` add up over the supervisor and every worker (CPU seconds, resident and
  virtual memory, open descriptors: the service's totals, as ``systemctl status`` counts
  its cgroup), except ``process_start_time_seconds`` and ``process_max_fds``, which are
  the supervisor's. Reload counters and the last reload's outcome are the supervisor's
  (:data:`SUPERVISOR_ONLY`): a reload is one event whatever the number of workers.

Statuses (:func:`merge_status`): the supervisor's own facts (pid, start, generation, reload
failures, draining), the sum of the workers' sessions, the first worker's listeners and
pools (every worker runs the same generation), every source once (its open connections
and recent failures summed; suspended when any worker has it suspended, until the latest
end), and one row per worker.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

SampleRow = tuple[str, dict[str, str], float]
FamilyRow = tuple[str, str, str, list[SampleRow]]

SUPERVISOR_ONLY = frozenset(
    {
        "egressd_reloads",
        "egressd_reload_failures",
        "egressd_config_last_reload_successful",
        "egressd_config_last_reload_success_timestamp_seconds",
        "process_start_time_seconds",
        "process_max_fds",
    }
)
"""Families a worker's snapshot does not contribute (:func:`worker_families`)."""

SUM_GAUGES = frozenset(
    {
        "egressd_active_sessions",
        "egressd_provider_open_connections",
        "egressd_source_active_connections",
        "egressd_source_recent_failures",
        "proxy_active_connections",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_open_fds",
    }
)
"""Gauges of things each worker holds its own of: they add up over the workers."""

MIN_GAUGES = frozenset({"egressd_state_backend_up", "egressd_budgets_shared"})
"""Flags that say something is up: the daemon's is up only while every worker's is."""

BREAKERS_OPEN = "egressd_destination_breakers_open"
"""Merged by :func:`count_open_breakers` (each destination once), else by the maximum."""

CUMULATIVE = frozenset({"counter", "histogram", "summary"})


def worker_families(families: Iterable[Sequence[Any]]) -> list[FamilyRow]:
    """A worker's snapshot (as JSON gave it back) without :data:`SUPERVISOR_ONLY`."""
    return [_family_row(family) for family in families if family[0] not in SUPERVISOR_ONLY]


def retired_families(families: Iterable[FamilyRow]) -> list[FamilyRow]:
    """What a dead worker leaves behind: its counters and histograms (gauges go with it)."""
    return [family for family in families if family[1] in CUMULATIVE]


def merge_families(snapshots: Iterable[Iterable[FamilyRow]]) -> list[FamilyRow]:
    """The snapshots merged family by family and sample by sample (see the module doc)."""
    merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in snapshots:
        for name, kind, documentation, samples in families:
            entry = merged.setdefault(name, (kind, documentation, {}))
            values = entry[2]
            pick = _merge_rule(name, kind)
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                values[key] = value if key not in values else pick(values[key], value)
    return [
        (name, kind, documentation, [(s, dict(labels), v) for (s, labels), v in values.items()])
        for name, (kind, documentation, values) in merged.items()
    ]


def _merge_rule(name: str, kind: str) -> Callable[[float, float], float]:
    """How two workers' values of one sample of family ``name`` merge."""
    if kind != "gauge" or name in SUM_GAUGES:
        return operator.add
    return min if name in MIN_GAUGES else max


def count_open_breakers(
    families: list[FamilyRow], open_per_worker: Iterable[Iterable[Sequence[str]]]
) -> list[FamilyRow]:
    """``families`` with ``egressd_destination_breakers_open`` counting each destination
    open in any worker once, by the kind of failure that opened it; ``open_per_worker``:
    each worker's open breakers as (destination, kind). Kinds seen before and open
    nowhere now read 0, as in one process."""
    kinds: dict[str, str] = {}
    for breakers in open_per_worker:
        for destination, kind in breakers:
            kinds[destination] = kind
    merged = []
    for name, kind, documentation, samples in families:
        if name == BREAKERS_OPEN:
            counts = {labels["kind"]: 0.0 for _, labels, _ in samples if "kind" in labels}
            for opened in kinds.values():
                counts[opened] = counts.get(opened, 0.0) + 1
            samples = [(BREAKERS_OPEN, {"kind": k}, count) for k, count in counts.items()]
        merged.append((name, kind, documentation, samples))
    return merged


def _family_row(family: Sequence[Any]) -> FamilyRow:
    name, kind, documentation, samples = family
    rows = [(str(s[0]), {str(k): str(v) for k, v in s[1].items()}, float(s[2])) for s in samples]
    return str(name), str(kind), str(documentation), rows


# --------------------------------------------------------------------------- status


def merge_status(
    supervisor: Mapping[str, Any],
    workers: Sequence[Mapping[str, Any]],
    statuses: Mapping[int, Mapping[str, Any]],
) -> dict[str, Any]:
    """One status for the whole daemon.

    ``supervisor``: its pid, version, config, started, generation, reload_failures,
    draining; ``workers``: one row per worker (``worker``, ``pid``, ``state``...);
    ``statuses``: the status each worker that answered gave, by worker number.
    """
    answered = [statuses[number] for number in sorted(statuses)]
    first: Mapping[str, Any] = answered[0] if answered else {}
    rows = []
    for row in workers:
        status = statuses.get(int(row["worker"]))
        rows.append(
            {
                **row,
                "active_sessions": status["active_sessions"] if status else None,
                "generation": status["generation"] if status else None,
            }
        )
    return {
        **supervisor,
        "active_sessions": sum(int(status["active_sessions"]) for status in answered),
        "listeners": first.get("listeners", []),
        "pools": first.get("pools", {}),
        "sources": merge_sources(status.get("sources", []) for status in answered),
        "shaping": merge_shaping([status.get("shaping") for status in answered]),
        "state": first.get("state"),  # the state backend and fleet: all workers share one
        **merge_breakers(answered),
        "workers": rows,
    }


def merge_breakers(answered: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each worker's open destination breakers (its own state), each destination once
    with the latest end; the count is at least the largest worker's."""
    if not any("breakers" in status for status in answered):
        return {}
    merged: dict[str, dict[str, Any]] = {}
    for status in answered:
        for breaker in status.get("breakers", ()):
            current = merged.get(breaker["destination"])
            if current is None or (breaker.get("until") or 0) > (current.get("until") or 0):
                merged[breaker["destination"]] = dict(breaker)
    counts = [int(status.get("breakers_open", 0)) for status in answered]
    return {
        "breakers_open": max([len(merged), *counts]),
        "breakers": sorted(merged.values(), key=lambda b: (b.get("until") or 0, b["destination"])),
    }


def merge_sources(per_worker: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Every source once: connections and failures summed, suspended if any worker says so."""
    merged: dict[str, dict[str, Any]] = {}
    for sources in per_worker:
        for source in sources:
            name = str(source["name"])
            if name not in merged:
                merged[name] = dict(source)
                continue
            _merge_source(merged[name], source)
    return list(merged.values())


def _merge_source(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key in ("active_connections", "recent_failures"):
        into[key] = int(into.get(key, 0)) + int(other.get(key, 0))
    if other.get("state") == "suspended":
        later = (other.get("suspended_until") or 0) > (into.get("suspended_until") or 0)
        if into.get("state") != "suspended" or later:
            keep = {k: into[k] for k in ("active_connections", "recent_failures")}
            into.update(other)
            into.update(keep)


def merge_shaping(
    per_worker: Sequence[Sequence[Mapping[str, Any]] | None],
) -> list[dict[str, Any]] | None:
    """Active (source, site/provider) effects of every worker, each once (latest end)."""
    if all(effects is None for effects in per_worker):
        return None
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for effects in per_worker:
        for effect in effects or ():
            key = (effect["source"], effect["kind"], effect["name"], effect["rule"])
            current = merged.get(key)
            if current is None or (effect.get("until") or 0) > (current.get("until") or 0):
                merged[key] = dict(effect)
    return sorted(merged.values(), key=lambda e: (e.get("until") or 0, e["source"], e["name"]))
