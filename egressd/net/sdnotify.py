"""systemd's notify protocol (sd_notify(3)), without a library.

Theory of operation
-------------------
systemd passes the path of a unix datagram socket in ``$NOTIFY_SOCKET``; a path starting
with ``@`` names a socket in the abstract namespace (the ``@`` stands for a leading NUL
byte). A service reports its state by sending one datagram of newline-separated
``KEY=VALUE`` assignments:

``READY=1``
    Startup finished (``Type=notify``): listeners are bound.
``RELOADING=1`` + ``MONOTONIC_USEC=...``
    A reload (SIGHUP) started; ``READY=1`` follows when it is done. systemd >= 253 requires
    the CLOCK_MONOTONIC timestamp with ``Type=notify-reload``; older versions ignore it.
``STOPPING=1``
    Shutdown started.
``WATCHDOG=1``
    Keep-alive. With ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``)
    and restarts the service when no ping arrives within that time. :func:`watchdog_loop`
    sends the pings from the trio event loop at half the interval, as sd_watchdog_enabled(3)
    recommends, so a blocked event loop stops the pings and gets the service restarted.
``STATUS=...``
    A free-form line shown by ``systemctl status``.

When ``$NOTIFY_SOCKET`` is unset (not started by systemd) every call is a no-op.

Sending is a plain, non-blocking ``sendto`` on a fresh ``AF_UNIX``/``SOCK_DGRAM`` socket,
the way libsystemd does it, called synchronously even from async code: a datagram send to a
local socket either fits in the receiver's queue at once or fails with ``EAGAIN``; it never
waits for the network. So there is no trio socket and no ``await``, and the same functions
work before trio starts and after it stops. A failed send is logged and reported as False;
it never raises, because a lost notification must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import trio

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@name`` is the abstract ``\\0name``."""
    return "\0" + value[1:] if value.startswith("@") else value


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to systemd; True when a datagram was sent."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), _socket_address(target))
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Startup (or a reload) finished."""
    return notify(_with_status("READY=1", status_text))


def reloading(status_text: str | None = None) -> bool:
    """A reload started; call :func:`ready` when it is over (even when it failed)."""
    return notify(_with_status(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}", status_text))


def stopping(status_text: str | None = None) -> bool:
    """Shutdown started."""
    return notify(_with_status("STOPPING=1", status_text))


def watchdog() -> bool:
    """One keep-alive ping."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line status for ``systemctl status``."""
    return notify(_with_status(None, text))


def _with_status(assignment: str | None, status_text: str | None) -> str:
    lines = [assignment] if assignment else []
    if status_text is not None:
        lines.append("STATUS=" + " ".join(status_text.splitlines()))
    return "\n".join(lines)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """systemd's watchdog timeout in seconds, or None when the watchdog is off for us.

    Off means: no ``$NOTIFY_SOCKET``, no valid positive ``$WATCHDOG_USEC``, or a
    ``$WATCHDOG_PID`` naming another process. Ping at half of it.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text is not None and pid_text.strip() != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def watchdog_loop(
    *, task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping the watchdog at half its interval, forever; start with ``nursery.start``.

    Reports the ping period (or None) through ``task_status`` and returns at once when
    the watchdog is off.
    """
    interval = watchdog_interval()
    if interval is None:
        task_status.started(None)
        return
    period = interval / 2
    task_status.started(period)
    while True:
        watchdog()
        await trio.sleep(period)
