"""The control protocol without a socket: every bad request is an error reply, never a raise."""

from __future__ import annotations

from typing import Any

import pytest

from egressd.control import MAX_SUSPEND_SECONDS, handle_request
from egressd.status import format_shaping, format_sources


class Target:
    """A :class:`egressd.control.Controlled` that records what it was asked to do."""

    def __init__(self, *, status_fails: bool = False) -> None:
        self.suspended: list[tuple[str, float, str]] = []
        self.explained: list[tuple[str, list[tuple[int, str]], str]] = []
        self.towards: list[tuple[str, str, str, float]] = []
        self.status_fails = status_fails

    def status(self) -> dict[str, Any]:
        if self.status_fails:
            raise RuntimeError("broken snapshot")
        return {"sources": []}

    def has_source(self, name: str) -> bool:
        return name == "a"

    def suspend(self, source: str, seconds: float, reason: str) -> None:
        self.suspended.append((source, seconds, reason))

    def resume(self, source: str) -> bool:
        return False

    def warmup(self, action: str, source: str | None, options: Any) -> dict[str, Any]:
        raise ValueError("no source follows a warm-up plan")

    def suspend_towards(
        self, source: str, kind: str, name: str, seconds: float, reason: str
    ) -> None:
        self.towards.append((source, kind, name, seconds))

    def resume_towards(self, source: str, kind: str, name: str) -> bool:
        self.towards.append((source, kind, name, 0.0))
        return True

    def explain(self, domain: str, mx: list[tuple[int, str]], pool: str) -> dict[str, Any]:
        self.explained.append((domain, mx, pool))
        return {"next": "a"}


def suspend(seconds: str) -> bytes:
    return b'{"command": "suspend", "source": "a", "seconds": ' + seconds.encode() + b"}"


@pytest.mark.parametrize(
    "line",
    [
        suspend("Infinity"),
        suspend("-Infinity"),
        suspend("NaN"),
        suspend("1e300"),
        suspend("1e999"),
        suspend("9" * 400),
        suspend(str(MAX_SUSPEND_SECONDS + 1)),
        suspend("0"),
        suspend("-5"),
        suspend("true"),
        suspend('"600"'),
        suspend("null"),
        b"[" * 3000,
        b"{" * 3000,
        b'{"command": {"command": ' * 200,
        b"\xff\xfe",
        b"[1, 2]",
        b'{"command": 7}',
    ],
)
def test_nonsense_gets_an_error_reply_and_changes_nothing(line: bytes) -> None:
    target = Target()
    reply = handle_request(target, line)
    assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"]
    assert target.suspended == []


@pytest.mark.parametrize("seconds", ["0.5", "600", str(MAX_SUSPEND_SECONDS)])
def test_sane_durations_suspend(seconds: str) -> None:
    target = Target()
    assert handle_request(target, suspend(seconds)) == {"ok": True}
    assert target.suspended == [("a", float(seconds), "suspended by operator")]


def test_a_failure_inside_a_command_is_an_error_reply() -> None:
    reply = handle_request(Target(status_fails=True), b"status")
    assert reply == {"ok": False, "error": "request failed: RuntimeError"}


@pytest.mark.parametrize("until", [float("inf"), float("nan"), 1e300, 10**400])
def test_status_prints_an_impossible_until_instead_of_crashing(until: float) -> None:
    row = {
        "name": "a",
        "state": "suspended",
        "suspended_until": until,
        "active_connections": 0,
        "recent_failures": 0,
    }
    assert "not a clock time" in format_sources([row], now=0.0)


def explain(mx: str, domain: str = '"example.com"', pool: str = '"main"') -> bytes:
    text = f'{{"command": "explain", "domain": {domain}, "pool": {pool}, "mx": {mx}}}'
    return text.encode()


@pytest.mark.parametrize(
    "line",
    [
        explain('[[10, "mx.example.com"]]', domain="7"),
        explain('[[10, "mx.example.com"]]', domain='""'),
        explain('[[10, "mx.example.com"]]', pool="null"),
        explain('[[10, "mx.example.com"]]', domain='"' + "a" * 300 + '"'),
        explain('"mx.example.com"'),
        explain('[["10", "mx.example.com"]]'),
        explain('[[true, "mx.example.com"]]'),
        explain('[[70000, "mx.example.com"]]'),
        explain("[[10]]"),
        explain('[[10, ""]]'),
        explain("[" + ",".join(['[1, "a"]'] * 65) + "]"),
    ],
)
def test_explain_refuses_bad_requests(line: bytes) -> None:
    target = Target()
    reply = handle_request(target, line)
    assert reply["ok"] is False and reply["error"]
    assert target.explained == []


def test_explain_passes_the_mx_records_on() -> None:
    target = Target()
    reply = handle_request(target, explain('[[10, "mx1.example.com"], [20, "mx2.example.com"]]'))
    assert reply == {"ok": True, "explain": {"next": "a"}}
    assert target.explained == [
        ("example.com", [(10, "mx1.example.com"), (20, "mx2.example.com")], "main")
    ]


@pytest.mark.parametrize(
    "line",
    [
        b'{"command": "suspend", "source": "a", "seconds": 60, "provider": "g", "site": "s"}',
        b'{"command": "suspend", "source": "a", "seconds": 60, "provider": 7}',
        b'{"command": "suspend", "source": "a", "seconds": 60, "site": ""}',
        b'{"command": "suspend", "source": "a", "seconds": 1e300, "provider": "g"}',
        b'{"command": "suspend", "source": "a", "seconds": NaN, "provider": "g"}',
        b'{"command": "suspend", "source": "zz", "seconds": 60, "provider": "g"}',
        b'{"command": "resume", "source": "a", "provider": null}',
    ],
)
def test_suspend_towards_refuses_bad_requests(line: bytes) -> None:
    target = Target()
    reply = handle_request(target, line)
    assert reply["ok"] is False and reply["error"]
    assert target.towards == [] and target.suspended == []


def test_suspend_and_resume_towards_a_provider_or_a_site() -> None:
    target = Target()
    line = b'{"command": "suspend", "source": "a", "seconds": 60, "provider": "google"}'
    assert handle_request(target, line) == {"ok": True}
    line = b'{"command": "resume", "source": "a", "site": "mx.example"}'
    assert handle_request(target, line) == {"ok": True, "was_suspended": True}
    assert target.towards == [("a", "provider", "google", 60.0), ("a", "site", "mx.example", 0.0)]
    assert target.suspended == []


def test_status_lists_shaping_suspensions_with_rule_and_expiry() -> None:
    effects = [
        {
            "source": "a",
            "kind": "provider",
            "name": "bigmail",
            "rule": "suspend",
            "until": 1000.0,
            "reason": "rule [provider.bigmail] automation[0]",
        }
    ]
    text = format_shaping(effects, now=400.0)
    header, row = text.splitlines()
    assert header.split() == ["SOURCE", "TOWARDS", "RULE", "UNTIL", "REASON"]
    assert row.startswith("a ") and "provider bigmail" in row and "600.0s" in row
    assert "automation[0]" in row
    assert format_shaping([], now=0.0) == "no active shaping suspension or override\n"
