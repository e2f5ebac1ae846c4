"""``egressd status`` and the other control-socket clients: ask, then print.

Theory of operation
-------------------
:func:`ask` sends one request line to the daemon's control socket (:mod:`egressd.control`)
and reads one JSON reply line, with blocking sockets and a timeout: the command line needs
no event loop. :func:`command_status` prints the daemon's status as a header and one table
row per source.

Without ``[control] socket`` it falls back to scraping ``[metrics] listen``, which knows
each source's state, active connections and recent failures but not when a suspension
ends nor why. Without either it says what to configure. Exit status 1 when the daemon
cannot be reached.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from egressd.config import Config, Endpoint

CLIENT_TIMEOUT = 5.0


class ControlError(Exception):
    """The daemon could not be asked; the message says why and what to check."""


def ask(path: str, request: Mapping[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send one request to the control socket at ``path``; raises :class:`ControlError`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = _receive_line(sock)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(
            f"cannot reach egressd at {path}: {exc.strerror} (is it running?)"
        ) from exc
    except PermissionError as exc:
        raise ControlError(
            f"cannot reach egressd at {path}: permission denied "
            "(run as root or as a member of the egressd group)"
        ) from exc
    except OSError as exc:
        raise ControlError(f"cannot reach egressd at {path}: {exc.strerror or exc}") from exc
    try:
        reply: dict[str, Any] = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ControlError(f"egressd at {path} answered something that is not JSON") from exc
    return reply


def _receive_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection")
        data += chunk
    return bytes(data[: data.index(b"\n")])


# --------------------------------------------------------------------------- egressd status


def command_status(config: Config, out: TextIO, fleet: bool = False) -> int:
    """``egressd status [--fleet]``: ask the running daemon, print a table; 1 when
    unreachable. ``--fleet``: every member seen through the shared backend instead."""
    try:
        if fleet and config.control.socket is None:
            raise ControlError(f"egressd status --fleet needs [control] socket in {config.path}")
        if config.control.socket is not None:
            reply = ask(config.control.socket, {"command": "status"})
            if not reply.get("ok"):
                raise ControlError(f"egressd refused the request: {reply.get('error')}")
            show = format_fleet if fleet else format_status
            print(show(reply["status"], time.time()), file=out, end="")
        elif config.metrics.listen is not None:
            sources = sources_from_metrics(scrape(config.metrics.listen))
            print(format_sources(sources, time.time()), file=out, end="")
            print(
                "\n(from the metrics endpoint: set [control] socket for when suspensions end "
                "and why)",
                file=out,
            )
        else:
            raise ControlError(
                "neither [control] socket nor [metrics] listen is set in "
                f"{config.path}; set [control] socket to use egressd status"
            )
    except ControlError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return 1
    return 0


def format_status(status: Mapping[str, Any], now: float) -> str:
    """The status reply as a readable header and one table row per source."""
    uptime = _duration(now - float(status["started"]))
    header = (
        f"egressd {status['version']}, pid {status['pid']}"
        + (f" ({len(status['workers'])} workers)" if "workers" in status else "")
        + f", up {uptime}, config {status['config']}\n"
        f"generation {status['generation']} ({status['reload_failures']} failed reloads), "
        f"{status['active_sessions']} active sessions"
        + (", DRAINING" if status.get("draining") else "")
        + "\n"
    )
    pools = "".join(
        f"pool {name}: "
        + (", ".join(f"{source} ({weight})" for source, weight in entries.items()) or "empty")
        + "\n"
        for name, entries in status["pools"].items()
    )
    shaping = status.get("shaping")
    tail = "" if shaping is None else "\n" + format_shaping(shaping, now)
    if "breakers" in status:  # a daemon from before breakers were shown has no key
        tail += "\n" + format_breakers(status["breakers"], status.get("breakers_open", 0), now)
    workers = status.get("workers")
    middle = "" if workers is None else format_workers(workers) + "\n"
    slots = status.get("host_budgets", {}).get("slots") or {}
    middle += "".join(f"connection slots held in {key}: {count}\n" for key, count in slots.items())
    budgets = format_budgets(status.get("budgets"))
    state = format_state_line(status.get("state"), now)
    head = header + state + budgets + pools
    return head + "\n" + middle + format_sources(status["sources"], now) + tail


def format_workers(workers: Sequence[Mapping[str, Any]]) -> str:
    """One row per worker process (``[daemon] workers``): the totals are in the header."""
    rows = [("WORKER", "PID", "STATE", "SESSIONS", "GENERATION", "RESTARTS", "LAST SEEN")]
    for worker in workers:
        seen = worker.get("last_seen")
        rows.append(
            (
                str(worker["worker"]),
                str(worker.get("pid") or "-"),
                str(worker["state"]),
                _or_dash(worker.get("active_sessions")),
                _or_dash(worker.get("generation")),
                str(worker.get("restarts", 0)),
                "-" if seen is None else f"{seen:.1f}s ago",
            )
        )
    return _columns(rows)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def format_budgets(budgets: Mapping[str, Any] | None) -> str:
    """One line on budgets shared by a fleet: shared through the store, or local shares."""
    if budgets is None:
        return ""
    nodes = budgets.get("nodes", 1)
    what = "shaping budgets and warm-up quotas" if budgets.get("quotas") else "shaping budgets"
    if budgets.get("shared"):
        return f"{what}: shared through the store ({nodes} nodes alive)\n"
    return (
        f"{what}: LOCAL SHARES (1/{nodes} of each) for "
        f"{_duration(float(budgets.get('local_shares_for', 0)))}: the store is unreachable "
        f"({budgets.get('error', '')})\n"
    )


def format_state_line(state: Mapping[str, Any] | None, now: float) -> str:
    """``state: redis ... up`` (or DOWN, since when and why); nothing for SQLite."""
    if not state or state.get("backend") != "redis":
        return ""
    where = f"redis {state['location']} (prefix {state['prefix']})"
    if state["up"]:
        return f"state: {where} up, node {state['member']}\n"
    since = _duration(now - float(state["since"]))
    return (
        f"state: {where} DOWN for {since}: {state.get('error')}; "
        "counts kept in memory, budgets on local shares\n"
    )


def format_fleet(status: Mapping[str, Any], now: float) -> str:
    """``egressd status --fleet``: every member seen through Redis, flagged when its
    configuration differs from this daemon's or its heartbeat is stale."""
    state = status.get("state") or {}
    if state.get("backend") != "redis":
        return 'no fleet: [state] backend is not "redis" (this daemon keeps its state alone)\n'
    fleet = state.get("fleet")
    lines = [format_state_line(state, now)]
    if fleet is None:
        return lines[0] + "no heartbeat read yet\n"
    lines.append(
        f"fleet as read {_duration(now - float(fleet['read_at']))} ago; "
        f"this daemon's config generation {fleet['generation']}\n"
    )
    header = ("member", "version", "pid", "config", "heartbeat", "up", "connections")
    rows = [header]
    for member in fleet["members"]:
        config = member["generation"] + (" DIFFERENT" if member["other_config"] else "")
        conns = ", ".join(f"{k} {v}" for k, v in member["connections"].items()) or "-"
        rows.append(
            (
                member["id"],
                member["version"],
                str(member["pid"]),
                config,
                f"{_duration(now - float(member['heartbeat']))} ago",
                _duration(now - float(member["started"])),
                conns,
            )
        )
    for stale in fleet["stale"]:
        seen = f"{_duration(now - float(stale['heartbeat']))} ago STALE"
        rows.append((stale["id"], "-", "-", "-", seen, "-", "-"))
    lines.append(_table(rows))
    suspensions = fleet["suspensions"]
    lines.append("\nfleet-wide suspensions (shared state):\n")
    if not suspensions:
        lines.append("  none\n")
    for item in suspensions:
        left = _duration(float(item["until"]) - now)
        lines.append(f"  {item['scope']}  {left} left  {item['reason']}\n")
    lines.append("\nshared connection limits (leases held fleet-wide, key: held):\n")
    lines.extend(f"  {item['key']}  {item['held']}\n" for item in fleet.get("leases", []))
    if not fleet.get("leases"):
        lines.append("  none\n")
    lines.append("\nshared rates (GCRA, key: arrival time ahead of now):\n")
    lines.extend(
        f"  {item['key']}  {item['ahead_ms'] / 1000:g}s\n" for item in fleet.get("gcra", [])
    )
    if not fleet.get("gcra"):
        lines.append("  none\n")
    return "".join(lines)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns two spaces apart; the last column (free text) unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        + "\n"
        for row in rows
    )


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def format_breakers(breakers: Sequence[Mapping[str, Any]], total: object, now: float) -> str:
    """Destinations whose circuit breaker is open: until when (0 s: half-open, the next
    dial is the trial), the failures that opened it, the last one."""
    if not breakers:
        return "no open destination circuit breaker\n"
    rows = [("DESTINATION", "OPEN UNTIL", "FAILURES", "LAST FAILURE")]
    for breaker in breakers:
        rows.append(
            (
                str(breaker["destination"]),
                _until(breaker.get("until"), now),
                str(breaker["failures"]),
                f"{breaker['kind']}: {breaker['reason']}",
            )
        )
    shown = "" if total == len(breakers) else f" (the last {len(breakers)} of {total})"
    return f"open destination circuit breakers{shown}:\n" + _columns(rows)


def format_shaping(effects: Sequence[Mapping[str, Any]], now: float) -> str:
    """Active (source, site/provider) suspensions and overrides: rule, expiry, why."""
    if not effects:
        return "no active shaping suspension or override\n"
    rows = [("SOURCE", "TOWARDS", "RULE", "UNTIL", "REASON")]
    for effect in effects:
        rows.append(
            (
                str(effect["source"]),
                f"{effect['kind']} {effect['name']}",
                str(effect["rule"]),
                _until(effect.get("until"), now),
                str(effect["reason"]),
            )
        )
    return _columns(rows)


def format_sources(sources: Sequence[Mapping[str, Any]], now: float) -> str:
    """One row per source: name, state, until, active, recent failures, last reason."""
    rows = [("SOURCE", "STATE", "UNTIL", "ACTIVE", "FAILURES", "LAST FAILURE")]
    for source in sources:
        name = str(source["name"]) + ("" if source.get("configured", True) else " (removed)")
        rows.append(
            (
                name,
                str(source["state"]),
                _until(source.get("suspended_until"), now),
                str(source["active_connections"]),
                str(source["recent_failures"]),
                _last_failure(source),
            )
        )
    return _columns(rows)


def _until(until: object, now: float) -> str:
    if isinstance(until, bool) or not isinstance(until, (int, float)):
        return "-"
    try:  # a daemon that accepted an absurd suspension must not crash its status
        wall = time.strftime("%H:%M:%S", time.localtime(until))
    except (OverflowError, OSError, ValueError):
        return f"{until!r} (not a clock time)"
    return f"{max(until - now, 0.0):.1f}s ({wall})"


def _last_failure(source: Mapping[str, Any]) -> str:
    operator_reason = source.get("suspension_reason")
    operator = "suspension_kind" in source and source["suspension_kind"] is None
    if source.get("state") == "suspended" and operator:  # egressd suspend, not a failure
        return f"operator: {operator_reason}" if operator_reason else "operator"
    kind, reason = source.get("last_failure_kind"), source.get("last_failure_reason")
    if kind is None and reason is None:
        return "-"
    return f"{kind}: {reason}" if kind else str(reason)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


# --------------------------------------------------------------------------- metrics fallback

SOURCE_GAUGES = (
    "egressd_source_suspended",
    "egressd_source_active_connections",
    "egressd_source_recent_failures",
)


def scrape(endpoint: Endpoint, timeout: float = CLIENT_TIMEOUT) -> str:
    """``GET /metrics`` from ``endpoint`` (urllib); raises :class:`ControlError`."""
    url = f"http://{endpoint}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise ControlError(f"egressd's metrics at {endpoint} answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControlError(
            f"cannot reach egressd's metrics at {endpoint}: {reason} (is it running?)"
        ) from exc
    return body.decode("utf-8", errors="replace")


def sources_from_metrics(exposition: str) -> list[dict[str, Any]]:
    """Rows for :func:`format_sources` from the ``egressd_source_*`` gauges, read with
    prometheus_client's own parser (labels in any order, escapes, new labels)."""
    values: dict[str, dict[str, float]] = {}
    try:
        families = list(text_string_to_metric_families(exposition))
    except ValueError as exc:
        raise ControlError(f"egressd's metrics could not be parsed: {exc}") from exc
    for family in families:
        for sample in family.samples:
            if sample.name in SOURCE_GAUGES and "source" in sample.labels:
                gauges = values.setdefault(sample.labels["source"], {})
                gauges[sample.name] = gauges.get(sample.name, 0.0) + sample.value
    return [
        {
            "name": name,
            "state": "suspended" if gauges.get("egressd_source_suspended") else "healthy",
            "suspended_until": None,
            "active_connections": int(gauges.get("egressd_source_active_connections", 0)),
            "recent_failures": int(gauges.get("egressd_source_recent_failures", 0)),
        }
        for name, gauges in sorted(values.items())
    ]


# --------------------------------------------------------------------------- egressd warmup


def format_warmup(reply: Mapping[str, Any]) -> str:
    """A ``warmup`` reply: the schedule of ``plan``, or the status table and history."""
    if "days" in reply:
        head = f"{reply['source']} (plan {reply['plan']}, provider {reply['provider']})\n"
        lines = [
            f"  step {d['step']:>3}  {d['date']}  {d['quota']:>9} a day" for d in reply["days"]
        ]
        return head + "\n".join(lines or ["  warm: no step left"]) + "\n"
    head = f"day {reply['today']} ({reply['timezone']}); quotas reset at {reply['resets_at']}\n"
    rows = [
        f"{'SOURCE':<16} {'PROVIDER':<12} {'PLAN':<12} {'STEP':>7} {'USED/QUOTA':>13}  "
        f"{'WARM ON':<10}  HOLD"
    ]
    for row in reply["rows"]:
        step = "warm" if row["warm"] else f"{row['step']}/{row['steps']}"
        use = "" if row["warm"] else f"{row['used']}/{row['quota']}"
        rows.append(
            f"{row['source']:<16} {row['provider']:<12} {row['plan']:<12} {step:>7} "
            f"{use:>13}  {row['warm_on']:<10}  {row['hold'] or ''}".rstrip()
        )
    history = [
        f"  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e['at']))} {e['source']} "
        f"{e['provider']}: {e['change']} {e['step_from']} -> {e['step_to']}: {e['reason']}"
        for e in reply["history"]
    ]
    tail = "\nrecent changes:\n" + "\n".join(history) + "\n" if history else ""
    return head + "\n".join(rows) + "\n" + tail
