"""The control socket: a local, line-based JSON protocol (the server side).

Theory of operation
-------------------
With ``[control] socket = "/run/egressd/control.sock"`` the daemon listens on that unix
stream socket (mode 0660: root and the ``egressd`` group). A client writes one request per
line and reads one JSON object per line back, as many times as it likes, then closes::

    {"command": "status"}                                -> {"ok": true, "status": {...}}
    {"command": "suspend", "source": "ip-1", "seconds": 600,
     "reason": "blocklisted at Spamhaus"}                -> {"ok": true}
    {"command": "resume", "source": "ip-1"}              -> {"ok": true, "was_suspended": true}
    {"command": "suspend", "source": "ip-1", "provider": "google", "seconds": 600}
    {"command": "resume", "source": "ip-1", "site": "(alt1|alt2)?.mx.example"}
                              (only towards that shaping provider or site; status lists them)
    {"command": "warmup", "action": "status"|"plan"|"hold"|"resume"|"set-step",
     "source": "ip-9", "provider": "other", "step": 3,
     "reason": "..."}                                    -> {"ok": true, "warmup": {...}}
    {"command": "explain", "domain": "example.com", "pool": "bulk",
     "mx": [[10, "mx1.example.com"]]}                    -> {"ok": true, "explain": {...}}
    anything else                                        -> {"ok": false, "error": "..."}

``seconds`` is a number above 0 and at most :data:`MAX_SUSPEND_SECONDS` (NaN, Infinity and
1e300 are refused). Every request that cannot be parsed or carried out gets an error reply;
nothing a client sends ends the connection but an oversized line.

A bare command word works too (``echo status | socat - UNIX-CONNECT:/run/egressd/control.sock``).
A request line is at most :data:`MAX_LINE` bytes; a longer one gets an error and the
connection is closed. :func:`handle_request` holds the protocol and does no I/O;
:func:`serve_control` is the trio shell around it.

The server sees the daemon only through :class:`Controlled` (its status as JSON, and
suspending or resuming a source), which :class:`egressd.observe.DaemonControls` provides:
this module imports neither the daemon nor the observers. The clients (``egressd status``,
``suspend``, ``resume``) are in :mod:`egressd.status`.

A socket file left behind by a crashed daemon is replaced at startup; one that another live
daemon still answers on is not (startup fails). The file is removed at shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import trio

from egressd.log import get_logger

log = get_logger("control")

MAX_LINE = 4096
MAX_SUSPEND_SECONDS = 366 * 86400
"""The longest operator suspension: a year. A source out for longer belongs out of the
configuration; the cap keeps every ``until`` a clock time that can be printed."""
SOCKET_MODE = 0o660
CONNECTION_IDLE_TIMEOUT = 60.0

ControlReply = dict[str, Any]
"""A control socket reply (one JSON object a line); ``egressd.status`` reads the same."""


class Controlled(Protocol):
    """What the control socket may see of the daemon and do to it."""

    def status(self) -> dict[str, Any]:
        """Everything ``status`` reports, JSON-ready."""

    def has_source(self, name: str) -> bool:
        """Whether the running configuration defines source ``name``."""

    def suspend(self, source: str, seconds: float, reason: str) -> None:
        """Take ``source`` out of rotation for ``seconds``."""

    def resume(self, source: str) -> bool:
        """Put ``source`` back in rotation; True when it was suspended."""

    def suspend_towards(
        self, source: str, kind: str, name: str, seconds: float, reason: str
    ) -> None:
        """Suspend (source, provider or site ``name``) in the shaper; ValueError when there
        is no shaping or no such provider."""

    def resume_towards(self, source: str, kind: str, name: str) -> bool:
        """Lift a (source, provider or site) suspension; True when there was one."""

    def warmup(self, action: str, source: str | None, options: Mapping[str, Any]) -> ControlReply:
        """A warm-up action (status, plan, hold, resume, set-step); ValueError when refused."""

    def explain(self, domain: str, mx: list[tuple[int, str]], pool: str) -> ControlReply:
        """Shaping usage, suspensions and the next pick of ``pool`` towards ``domain`` (whose
        MX records the client resolved); ValueError for an unknown pool."""


# --------------------------------------------------------------------------- protocol


def parse_request(line: bytes) -> dict[str, Any]:
    """A request line as an object with a string ``command``; ValueError when it is not.

    Strict JSON: ``NaN`` and ``Infinity`` are refused, and so is nesting deeper than the
    parser's recursion allows (a line of ``[`` would otherwise raise RecursionError).
    """
    text = line.decode("utf-8", errors="replace").strip()
    if re.fullmatch(r"[a-z_]+", text):
        return {"command": text}
    try:
        request = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError('expected an object with a "command" string')
    return request


def _refuse_constant(name: str) -> object:
    raise ValueError(f"not JSON: {name} is not a JSON number")


def handle_request(target: Controlled, line: bytes) -> ControlReply:
    """The reply to one request line; never raises (a failure is an error reply)."""
    try:
        return _handle(target, parse_request(line))
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        log.exception("control socket: request failed")
        return {"ok": False, "error": f"request failed: {type(exc).__name__}"}


def _handle(target: Controlled, request: Mapping[str, Any]) -> ControlReply:
    command = request["command"]
    if command == "status":
        return {"ok": True, "status": target.status()}
    if command in ("suspend", "resume"):
        return _suspend_or_resume(target, request)
    if command == "warmup":
        return _warmup(target, request)
    if command == "explain":
        return _explain(target, request)
    return {
        "ok": False,
        "error": f'unknown command "{command}" (try status, suspend, resume, warmup, explain)',
    }


MAX_MX_RECORDS = 64


def _explain(target: Controlled, request: Mapping[str, Any]) -> ControlReply:
    domain, pool, mx = request.get("domain"), request.get("pool"), request.get("mx")
    if not _is_name(domain) or not _is_name(pool):
        return {"ok": False, "error": '"domain" and "pool" must be strings of 1 to 253 characters'}
    records = _mx_records(mx)
    if records is None:
        return {
            "ok": False,
            "error": f'"mx" must be a list of at most {MAX_MX_RECORDS} [preference, host] pairs',
        }
    return {"ok": True, "explain": target.explain(domain, records, pool)}


def _is_name(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= 253 and value.isprintable()


def _mx_records(value: object) -> list[tuple[int, str]] | None:
    if not isinstance(value, list) or len(value) > MAX_MX_RECORDS:
        return None
    records = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2):
            return None
        preference, host = item
        if isinstance(preference, bool) or not isinstance(preference, int):
            return None
        if not 0 <= preference <= 65535 or not _is_name(host):
            return None
        records.append((preference, host))
    return records


def _warmup(target: Controlled, request: Mapping[str, Any]) -> ControlReply:
    action, source = request.get("action", "status"), request.get("source")
    if not isinstance(action, str) or not (source is None or isinstance(source, str)):
        return {"ok": False, "error": '"action" and "source" must be strings'}
    reason = request.get("reason")
    if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= 200):
        return {"ok": False, "error": '"reason" must be a string of 1 to 200 characters'}
    return {"ok": True, "warmup": target.warmup(action, source, request)}


def _suspend_or_resume(target: Controlled, request: Mapping[str, Any]) -> ControlReply:
    source = request.get("source")
    if not isinstance(source, str) or not target.has_source(source):
        return {"ok": False, "error": f"unknown source {source!r}"}
    towards = _towards(request)
    if isinstance(towards, str):
        return {"ok": False, "error": towards}
    if request["command"] == "resume":
        if towards is not None:
            was_suspended = target.resume_towards(source, *towards)
        else:
            was_suspended = target.resume(source)
        fields = {"source": source, "towards": " ".join(towards or ())}
        log.info("source resumed by operator", extra={"fields": fields})
        return {"ok": True, "was_suspended": was_suspended}
    seconds = request.get("seconds")
    if not _is_duration(seconds):
        return {
            "ok": False,
            "error": f'"seconds" must be a number above 0 and at most {MAX_SUSPEND_SECONDS}',
        }
    reason = request.get("reason")
    if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= 200):
        return {"ok": False, "error": '"reason" must be a string of 1 to 200 characters'}
    if towards is not None:
        target.suspend_towards(source, *towards, float(seconds), reason or "suspended by operator")
    else:
        target.suspend(source, float(seconds), reason or "suspended by operator")
    log.warning(
        "source suspended by operator",
        extra={
            "fields": {
                "source": source,
                "towards": " ".join(towards or ()),
                "seconds": seconds,
                "reason": reason or "",
            }
        },
    )
    return {"ok": True}


def _towards(request: Mapping[str, Any]) -> tuple[str, str] | str | None:
    """``("provider", name)`` or ``("site", name)`` from the request, None for neither, or
    the error text."""
    given = [(kind, request[kind]) for kind in ("provider", "site") if kind in request]
    if not given:
        return None
    if len(given) > 1:
        return '"provider" and "site" do not go together'
    kind, name = given[0]
    if not _is_name(name):
        return f'"{kind}" must be a string of 1 to 253 characters'
    return kind, name


def _is_duration(value: object) -> TypeGuard[float]:
    """A number of seconds in (0, MAX_SUSPEND_SECONDS]; NaN and infinities fail the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 < value <= MAX_SUSPEND_SECONDS


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


Answer = Callable[[bytes], Awaitable[ControlReply]]
"""The reply to one request line (a supervisor asks its workers before it answers)."""


async def serve_control(
    path: str,
    target: Controlled | Answer,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``path`` until cancelled; remove the socket file afterwards.

    ``target``: the daemon (:class:`Controlled`), or an async function that answers a
    request line (:mod:`egressd.supervisor`, which asks its workers).
    """
    listener = await open_control_socket(path)
    inode = os.stat(path).st_ino
    answer = target if callable(target) else _answer_from(target)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_connection(stream, answer)

    try:
        await trio.serve_listeners(handler, [listener], task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


def _answer_from(target: Controlled) -> Answer:
    async def answer(line: bytes) -> ControlReply:
        return handle_request(target, line)

    return answer


async def _handle_connection(stream: trio.SocketStream, answer: Answer) -> None:
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
                    await stream.send_all(_encode(await answer(line)))
            if len(buffer) > MAX_LINE:
                await stream.send_all(_encode({"ok": False, "error": "request line too long"}))
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("control socket: request failed")
    finally:
        await trio.aclose_forcefully(stream)


def _encode(reply: ControlReply) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"
