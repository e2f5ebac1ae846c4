"""The control socket: a local, line-based JSON protocol, and ``egressd status``.

Theory of operation
-------------------
With ``[control] socket = "/run/egressd/control.sock"`` the daemon listens on that unix
stream socket (mode 0660: root and the ``egressd`` group). A client writes one request per
line and reads one JSON object per line back, as many times as it likes, then closes::

    {"command": "status"}                                -> {"ok": true, "status": {...}}
    {"command": "suspend", "source": "ip-1", "seconds": 600,
     "reason": "blocklisted at Spamhaus"}                -> {"ok": true}
    {"command": "resume", "source": "ip-1"}              -> {"ok": true, "was_suspended": true}
    anything else                                        -> {"ok": false, "error": "..."}

A bare command word works too (``echo status | socat - UNIX-CONNECT:/run/egressd/control.sock``).
A request line is at most :data:`MAX_LINE` bytes; a longer one gets an error and the
connection is closed. :func:`handle_request` holds the protocol and does no I/O;
:func:`serve_control` is the trio shell around it.

``status`` answers with the daemon's pid, version, configuration path, start time,
generation (1 + reloads that took effect), failed reloads, whether it is draining, active
sessions, listeners, pools (source -> weight) and every source's health
(:meth:`egressd.health.SourceStatus.to_dict`, plus ``suspended_until`` as a Unix time).

A socket file left behind by a crashed daemon is replaced at startup; one that another live
daemon still answers on is not (startup fails). The file is removed at shutdown.

``egressd status`` (:func:`command_status`) asks the control socket and prints a table.
Without ``[control] socket`` it falls back to scraping ``[metrics] listen``, which knows
each source's state, active connections and recent failures but not when a suspension
ends nor why. Without either it says what to configure. Exit status 1 when the daemon
cannot be reached.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio
from prometheus_client.parser import text_string_to_metric_families

from egressd import __version__
from egressd.config import Config, Endpoint
from egressd.log import get_logger

if TYPE_CHECKING:
    from egressd.daemon import Daemon

log = get_logger("control")

MAX_LINE = 4096
SOCKET_MODE = 0o660
CONNECTION_IDLE_TIMEOUT = 60.0
CLIENT_TIMEOUT = 5.0

Reply = dict[str, Any]


class ControlError(Exception):
    """The daemon could not be asked; the message says why and what to check."""


# --------------------------------------------------------------------------- protocol


def parse_request(line: bytes) -> dict[str, Any]:
    """A request line as an object with a string ``command``; ValueError when it is not."""
    text = line.decode("utf-8", errors="replace").strip()
    if re.fullmatch(r"[a-z_]+", text):
        return {"command": text}
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('expected an object with a "command" string')
    return request


def handle_request(daemon: Daemon, line: bytes) -> Reply:
    """The reply to one request line; never raises."""
    try:
        request = parse_request(line)
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    command = request["command"]
    if command == "status":
        return {"ok": True, "status": status_snapshot(daemon)}
    if command in ("suspend", "resume"):
        return _suspend_or_resume(daemon, request)
    return {"ok": False, "error": f'unknown command "{command}" (try status, suspend, resume)'}


def _suspend_or_resume(daemon: Daemon, request: Mapping[str, Any]) -> Reply:
    source = request.get("source")
    health = daemon.runtime.health
    if not isinstance(source, str) or source not in daemon.runtime.config.sources:
        return {"ok": False, "error": f"unknown source {source!r}"}
    if request["command"] == "resume":
        was_suspended = health.resume(source)
        log.info("source resumed by operator", extra={"fields": {"source": source}})
        return {"ok": True, "was_suspended": was_suspended}
    seconds = request.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        return {"ok": False, "error": '"seconds" must be a positive number'}
    reason = request.get("reason")
    if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= 200):
        return {"ok": False, "error": '"reason" must be a string of 1 to 200 characters'}
    health.suspend(source, float(seconds), reason or "suspended by operator")
    daemon.metrics.count_suspension(source, None)
    log.warning(
        "source suspended by operator",
        extra={"fields": {"source": source, "seconds": seconds, "reason": reason or ""}},
    )
    return {"ok": True}


def status_snapshot(daemon: Daemon) -> dict[str, Any]:
    """Everything ``status`` reports, JSON-ready."""
    runtime = daemon.runtime
    config = runtime.config
    now = time.time()
    sources = []
    for status in runtime.health.snapshot():
        item = status.to_dict()
        left = status.suspended_for
        item["suspended_until"] = round(now + left, 3) if left is not None else None
        sources.append(item)
    return {
        "pid": os.getpid(),
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
        "sources": sources,
    }


# --------------------------------------------------------------------------- server


async def open_control_socket(path: str) -> trio.SocketListener:
    """Listen on ``path`` (mode 0660), replacing a stale socket file; raises OSError."""
    await _remove_stale_socket(path)
    Path(path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"control socket {path} exists and is not a socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: left behind by a daemon that died
            return
    raise OSError(errno.EADDRINUSE, f"another process answers on the control socket {path}")


async def serve_control(
    path: str,
    daemon: Daemon,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``path`` until cancelled; remove the socket file afterwards."""
    listener = await open_control_socket(path)
    inode = os.stat(path).st_ino

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_connection(stream, daemon)

    try:
        await trio.serve_listeners(handler, [listener], task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


async def _handle_connection(stream: trio.SocketStream, daemon: Daemon) -> None:
    """Requests until EOF, an oversized line, or a minute of silence."""
    buffer = bytearray()
    try:
        while True:
            with trio.move_on_after(CONNECTION_IDLE_TIMEOUT):
                chunk = await stream.receive_some(MAX_LINE)
            if not chunk:
                return
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = bytes(buffer[:end]), buffer[end + 1 :]
                if line.strip():
                    await stream.send_all(_encode(handle_request(daemon, line)))
            if len(buffer) > MAX_LINE:
                await stream.send_all(_encode({"ok": False, "error": "request line too long"}))
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("control socket: request failed")
    finally:
        await trio.aclose_forcefully(stream)


def _encode(reply: Reply) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------- client


def ask(path: str, request: Mapping[str, Any], timeout: float = CLIENT_TIMEOUT) -> Reply:
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
        reply: Reply = json.loads(data)
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


def command_status(config: Config, out: TextIO) -> int:
    """``egressd status``: ask the running daemon, print a table; 1 when unreachable."""
    try:
        if config.control.socket is not None:
            reply = ask(config.control.socket, {"command": "status"})
            if not reply.get("ok"):
                raise ControlError(f"egressd refused the request: {reply.get('error')}")
            print(format_status(reply["status"], time.time()), file=out, end="")
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
        f"egressd {status['version']}, pid {status['pid']}, up {uptime}, "
        f"config {status['config']}\n"
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
    return header + pools + "\n" + format_sources(status["sources"], now)


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        + "\n"
        for row in rows
    )


def _until(until: object, now: float) -> str:
    if not isinstance(until, (int, float)):
        return "-"
    wall = time.strftime("%H:%M:%S", time.localtime(until))
    return f"{max(until - now, 0.0):.1f}s ({wall})"


def _last_failure(source: Mapping[str, Any]) -> str:
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
