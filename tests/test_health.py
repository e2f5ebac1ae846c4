"""Source health: triggers, windows, expiry, resets, reloads and snapshots, on a fake clock."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from egressd.config import HealthSettings, Source, SuspendPolicy
from egressd.health import SourceHealth, policy_for

IMMEDIATE_5M = SuspendPolicy(duration=300.0, count=1, window=0.0)
THRESHOLD_3_5M = SuspendPolicy(duration=600.0, count=3, window=300.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> SourceHealth:
    return SourceHealth(["ip-1", "ip-2"], now=clock)


def test_immediate_trigger_suspends_on_first_failure(
    health: SourceHealth, clock: FakeClock
) -> None:
    assert health.record_failure("ip-1", "unplumbed", "EADDRNOTAVAIL", IMMEDIATE_5M) is True
    assert health.is_suspended("ip-1")
    assert health.suspended_until("ip-1") == clock.now + 300.0
    assert not health.is_suspended("ip-2")
    assert health.suspended_until("ip-2") is None


def test_failure_while_suspended_is_not_a_new_suspension(health: SourceHealth) -> None:
    assert health.record_failure("ip-1", "unplumbed", "first", IMMEDIATE_5M)
    until = health.suspended_until("ip-1")
    assert health.record_failure("ip-1", "unplumbed", "second", IMMEDIATE_5M) is False
    assert health.suspended_until("ip-1") == until
    [status] = [s for s in health.snapshot() if s.name == "ip-1"]
    assert status.suspensions == 1
    assert status.last_failure_reason == "second"
    assert status.suspension_reason == "first"


def test_threshold_within_window_suspends(health: SourceHealth, clock: FakeClock) -> None:
    assert not health.record_failure("ip-1", "proxy_unhealthy", "refused", THRESHOLD_3_5M)
    clock.advance(100)
    assert not health.record_failure("ip-1", "proxy_unhealthy", "refused", THRESHOLD_3_5M)
    clock.advance(199)
    assert not health.is_suspended("ip-1")
    assert health.record_failure("ip-1", "proxy_unhealthy", "refused", THRESHOLD_3_5M)
    assert health.suspended_until("ip-1") == clock.now + 600.0


def test_threshold_failures_outside_window_do_not_add_up(
    health: SourceHealth, clock: FakeClock
) -> None:
    for _ in range(6):
        assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
        clock.advance(151)  # two failures at most within any 300 s
    assert not health.is_suspended("ip-1")


def test_threshold_counts_each_kind_separately(health: SourceHealth) -> None:
    assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    assert not health.record_failure("ip-1", "proxy_unhealthy", "refused", THRESHOLD_3_5M)
    assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    assert not health.is_suspended("ip-1")
    assert health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)


def test_suspension_expires_by_itself(health: SourceHealth, clock: FakeClock) -> None:
    health.record_failure("ip-1", "unplumbed", "EADDRNOTAVAIL", IMMEDIATE_5M)
    clock.advance(299.9)
    assert health.is_suspended("ip-1")
    clock.advance(0.1)
    assert not health.is_suspended("ip-1")
    assert health.suspended_until("ip-1") is None
    assert health.expire_suspensions() == ["ip-1"]
    assert health.expire_suspensions() == []


def test_window_starts_afresh_after_a_suspension(health: SourceHealth, clock: FakeClock) -> None:
    for _ in range(3):
        health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    clock.advance(600)
    assert not health.is_suspended("ip-1")
    assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)


def test_success_resets_failures(health: SourceHealth) -> None:
    health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    health.record_success("ip-1")
    assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    assert not health.record_failure("ip-1", "connect", "timeout", THRESHOLD_3_5M)
    [status] = [s for s in health.snapshot() if s.name == "ip-1"]
    assert status.recent_failures == 2


def test_success_does_not_lift_a_suspension(health: SourceHealth) -> None:
    health.record_failure("ip-1", "unplumbed", "EADDRNOTAVAIL", IMMEDIATE_5M)
    health.record_success("ip-1")
    assert health.is_suspended("ip-1")


def test_operator_suspend_and_resume(health: SourceHealth, clock: FakeClock) -> None:
    health.suspend("ip-2", 60.0)
    assert health.suspended_until("ip-2") == clock.now + 60.0
    assert health.resume("ip-2") is True
    assert not health.is_suspended("ip-2")
    assert health.resume("ip-2") is False
    assert health.resume("unknown") is False


def test_connection_counters(health: SourceHealth) -> None:
    health.connection_opened("ip-1")
    health.connection_opened("ip-1")
    health.connection_closed("ip-1")
    assert health.active_connections("ip-1") == 1
    health.connection_closed("ip-1")
    health.connection_closed("ip-1")  # never below zero
    assert health.active_connections("ip-1") == 0


def test_reload_keeps_state_of_sources_that_remain(health: SourceHealth, clock: FakeClock) -> None:
    health.record_failure("ip-1", "unplumbed", "EADDRNOTAVAIL", IMMEDIATE_5M)
    health.record_failure("ip-2", "unplumbed", "EADDRNOTAVAIL", IMMEDIATE_5M)
    health.connection_opened("ip-2")
    health.update_sources(["ip-1", "ip-3"])
    assert health.is_suspended("ip-1")
    assert not health.is_suspended("ip-2")  # removed: its suspension is forgotten
    names = {s.name: s for s in health.snapshot()}
    assert set(names) == {"ip-1", "ip-2", "ip-3"}
    assert names["ip-2"].configured is False
    assert names["ip-2"].active_connections == 1  # still draining
    assert names["ip-3"].state == "healthy"
    health.connection_closed("ip-2")
    assert [s.name for s in health.snapshot()] == ["ip-1", "ip-3"]


def test_reload_forgets_removed_sources_without_connections(health: SourceHealth) -> None:
    health.record_failure("ip-2", "connect", "timeout", THRESHOLD_3_5M)
    health.update_sources(["ip-1"])
    health.update_sources(["ip-1", "ip-2"])
    [status] = [s for s in health.snapshot() if s.name == "ip-2"]
    assert status.recent_failures == 0


def test_snapshot_contents(health: SourceHealth, clock: FakeClock) -> None:
    health.record_failure("ip-1", "proxy_unhealthy", "hop refused", IMMEDIATE_5M)
    health.connection_opened("ip-2")
    clock.advance(100)
    first, second = health.snapshot()
    assert first.name == "ip-1"
    assert first.state == "suspended"
    assert first.suspended_for == pytest.approx(200.0)
    assert first.suspension_kind == "proxy_unhealthy"
    assert first.recent_failures == 1
    assert first.last_failure_reason == "hop refused"
    assert first.to_dict()["state"] == "suspended"
    assert second.name == "ip-2"
    assert second.state == "healthy"
    assert second.suspended_until is None
    assert second.active_connections == 1
    assert second.to_dict() == {
        "name": "ip-2",
        "state": "healthy",
        "suspended_for": None,
        "suspension_kind": None,
        "suspension_reason": None,
        "recent_failures": 0,
        "last_failure_kind": None,
        "last_failure_reason": None,
        "active_connections": 1,
        "suspensions": 0,
        "configured": True,
    }


def test_policy_for_prefers_the_sources_own_keys() -> None:
    own = SuspendPolicy(duration=10.0, count=2, window=30.0)
    settings = HealthSettings()
    plain = Source(name="a")
    tuned = Source(name="b", suspend_when_unplumbed=own, suspend_when_proxy_unhealthy=own)
    assert policy_for(plain, "unplumbed", settings) == settings.suspend_when_unplumbed
    assert policy_for(plain, "proxy_unhealthy", settings) == settings.suspend_when_proxy_unhealthy
    assert policy_for(tuned, "unplumbed", settings) == own
    assert policy_for(tuned, "proxy_unhealthy", settings) == own
    assert policy_for(tuned, "connect", settings) == settings.suspend_on_connect_failures


def test_default_clock_is_monotonic() -> None:
    health = SourceHealth(["a"])
    health.record_failure("a", "unplumbed", "x", IMMEDIATE_5M)
    assert health.is_suspended("a")
