"""``egressd status --fleet`` as printed: members, a different configuration, a stale one,
suspensions and shared budgets (the reply as the control socket gives it)."""

from __future__ import annotations

from egressd.status import format_fleet, format_state_line

NOW = 1_000_000.0


def member(member_id: str, generation: str, other: bool) -> dict[str, object]:
    node, _, worker = member_id.partition("/")
    return {
        "id": member_id,
        "node": node,
        "worker": worker or None,
        "pid": 42,
        "version": "0.1.0",
        "generation": generation,
        "other_config": other,
        "started": NOW - 3600,
        "heartbeat": NOW - 2,
        "connections": {"ip-1": 3},
    }


def status(up: bool = True) -> dict[str, object]:
    fleet = {
        "read_at": NOW - 1,
        "generation": "aaa",
        "members": [member("mx-1", "aaa", False), member("mx-2/1", "bbb", True)],
        "stale": [{"id": "mx-3", "heartbeat": NOW - 120}],
        "suspensions": [{"scope": "ip-1@provider:yahoo", "until": NOW + 600, "reason": "TSS04"}],
        "leases": [{"key": "budgets:leases:connection_limit:ip-1:mx.test:4", "held": 3}],
        "gcra": [{"key": "budgets:gcra:max_message_rate:ip-1:mx.test:100", "ahead_ms": 1500}],
    }
    state = {
        "backend": "redis",
        "location": "redis://127.0.0.1:6379/0",
        "prefix": "egressd",
        "node": "mx-1",
        "member": "mx-1",
        "up": up,
        "since": NOW - 12,
        "error": None if up else "TimeoutError: timed out",
        "fleet": fleet,
    }
    return {"state": state}


def test_members_flags_suspensions_and_budgets_are_printed() -> None:
    lines = format_fleet(status(), NOW).splitlines()
    assert lines[0] == "state: redis redis://127.0.0.1:6379/0 (prefix egressd) up, node mx-1"
    rows = {line.split()[0]: line for line in lines if line.startswith("mx-")}
    assert "DIFFERENT" not in rows["mx-1"] and "ip-1 3" in rows["mx-1"]
    assert "bbb DIFFERENT" in rows["mx-2/1"]
    assert "2m0s ago STALE" in rows["mx-3"]
    assert "  ip-1@provider:yahoo  10m0s left  TSS04" in lines
    assert "  budgets:leases:connection_limit:ip-1:mx.test:4  3" in lines
    assert "  budgets:gcra:max_message_rate:ip-1:mx.test:100  1.5s" in lines


def test_the_state_line_says_down_since_when_and_why() -> None:
    line = format_state_line(status(up=False)["state"], NOW)  # type: ignore[arg-type]
    assert "DOWN for 12s: TimeoutError: timed out" in line


def test_without_the_redis_backend_there_is_no_fleet() -> None:
    assert format_fleet({"state": {"backend": "sqlite"}}, NOW).startswith("no fleet")
