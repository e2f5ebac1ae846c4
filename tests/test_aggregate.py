"""Merging the workers' metrics and statuses into one daemon's (egressd.aggregate)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from egressd.aggregate import (
    FamilyRow,
    count_open_breakers,
    merge_breakers,
    merge_families,
    merge_shaping,
    merge_sources,
    merge_status,
    retired_families,
    worker_families,
)
from egressd.metrics import MergedCollector, snapshot


def worker_registry(sessions: int, active: int, suspended: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    connections = Counter("egressd_connections", "c", ("door",), registry=registry)
    connections.labels("smtp").inc(sessions)
    Gauge("egressd_active_sessions", "a", ("door",), registry=registry).labels("smtp").set(active)
    flag = Gauge("egressd_source_suspended", "s", ("source",), registry=registry)
    flag.labels("a").set(suspended)
    Histogram("egressd_dial_duration_seconds", "d", buckets=(1.0,), registry=registry).observe(0.5)
    Counter("egressd_reloads", "r", registry=registry).inc(3)
    return registry


def exposition(families: list[FamilyRow]) -> str:
    registry = CollectorRegistry()
    registry.register(MergedCollector(lambda: families))
    return generate_latest(registry).decode()


def test_counters_histograms_and_open_things_add_up_flags_take_the_maximum() -> None:
    one = worker_families(snapshot(worker_registry(sessions=2, active=1, suspended=0)))
    two = worker_families(snapshot(worker_registry(sessions=3, active=4, suspended=1)))
    text = exposition(merge_families([one, two]))
    assert 'egressd_connections_total{door="smtp"} 5.0' in text
    assert 'egressd_active_sessions{door="smtp"} 5.0' in text
    assert 'egressd_source_suspended{source="a"} 1.0' in text
    assert 'egressd_dial_duration_seconds_bucket{le="1.0"} 2.0' in text
    assert "egressd_dial_duration_seconds_count 2.0" in text
    assert "egressd_reloads" not in text  # the supervisor's own


def state_registry(
    alive_nodes: int, backend_up: int, open_breakers: dict[str, int]
) -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("egressd_fleet_alive_nodes", "n", registry=registry).set(alive_nodes)
    up = Gauge("egressd_state_backend_up", "u", ("backend",), registry=registry)
    up.labels("redis").set(backend_up)
    breakers = Gauge("egressd_destination_breakers_open", "b", ("kind",), registry=registry)
    for kind, count in open_breakers.items():
        breakers.labels(kind).set(count)
    return registry


def test_gauges_that_are_states_are_not_summed_over_the_workers() -> None:
    """Both workers see the same 3 live nodes, one lost Redis, and both have the breaker of
    192.0.2.1:25 open (each has its own breakers) and the first also that of x:25."""
    one = worker_families(snapshot(state_registry(3, 1, {"refused": 1, "timeout": 1})))
    two = worker_families(snapshot(state_registry(3, 0, {"refused": 1, "timeout": 0})))
    merged = merge_families([one, two])
    opened = [[["192.0.2.1:25", "refused"], ["x:25", "timeout"]], [["192.0.2.1:25", "refused"]]]
    text = exposition(count_open_breakers(merged, opened))
    assert "egressd_fleet_alive_nodes 3.0" in text  # not 6
    assert 'egressd_state_backend_up{backend="redis"} 0.0' in text  # down in a worker
    assert 'egressd_destination_breakers_open{kind="refused"} 1.0' in text  # not 2
    assert 'egressd_destination_breakers_open{kind="timeout"} 1.0' in text
    closed = exposition(count_open_breakers(merged, [[], []]))
    assert 'egressd_destination_breakers_open{kind="refused"} 0.0' in closed  # seen before


def test_a_dead_workers_counters_stay_and_its_gauges_go() -> None:
    dead = worker_families(snapshot(worker_registry(sessions=7, active=2, suspended=1)))
    live = worker_families(snapshot(worker_registry(sessions=1, active=0, suspended=0)))
    text = exposition(merge_families([live, retired_families(dead)]))
    assert 'egressd_connections_total{door="smtp"} 8.0' in text
    assert 'egressd_active_sessions{door="smtp"} 0.0' in text
    assert 'egressd_source_suspended{source="a"} 0.0' in text


def test_sources_sum_connections_and_are_suspended_when_any_worker_says_so() -> None:
    healthy = {"name": "a", "state": "healthy", "active_connections": 2, "recent_failures": 0}
    suspended = {
        "name": "a",
        "state": "suspended",
        "suspended_until": 100.0,
        "active_connections": 1,
        "recent_failures": 3,
    }
    (merged,) = merge_sources([[healthy], [suspended]])
    assert merged["state"] == "suspended" and merged["suspended_until"] == 100.0
    assert (merged["active_connections"], merged["recent_failures"]) == (3, 3)


def test_shaping_effects_are_listed_once_with_the_latest_end() -> None:
    effect = {"source": "a", "kind": "provider", "name": "google", "rule": "suspend"}
    merged = merge_shaping([[{**effect, "until": 5.0}], [{**effect, "until": 9.0}], None])
    assert merged == [{**effect, "until": 9.0}]
    assert merge_shaping([None, None]) is None


def test_status_has_the_supervisors_facts_the_totals_and_a_row_per_worker() -> None:
    worker = {"active_sessions": 2, "generation": 3, "listeners": [1], "pools": {"p": {}}}
    status = merge_status(
        {"pid": 1, "generation": 3},
        [{"worker": 1, "state": "ready"}, {"worker": 2, "state": "starting"}],
        {1: {**worker, "sources": [], "shaping": None}},
    )
    assert status["pid"] == 1 and status["active_sessions"] == 2
    assert [row["active_sessions"] for row in status["workers"]] == [2, None]
    assert status["listeners"] == [1] and status["shaping"] is None


def test_open_breakers_of_every_worker_are_listed_once_with_the_latest_end() -> None:
    def breaker(destination: str, until: float) -> dict[str, object]:
        return {"destination": destination, "until": until, "failures": 3, "kind": "refused"}

    one = {"breakers_open": 2, "breakers": [breaker("192.0.2.1:25", 10), breaker("x:25", 5)]}
    two = {"breakers_open": 1, "breakers": [breaker("192.0.2.1:25", 20)]}
    merged = merge_breakers([one, two])
    assert merged["breakers_open"] == 2
    assert [(b["destination"], b["until"]) for b in merged["breakers"]] == [
        ("x:25", 5),
        ("192.0.2.1:25", 20),
    ]
    assert merge_breakers([{"active_sessions": 0}]) == {}  # workers from before: no key
