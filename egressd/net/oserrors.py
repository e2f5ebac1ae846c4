"""How socket errors and addresses read in egressd's messages and logs."""

from __future__ import annotations

import errno
import os
from typing import Any

__all__ = ["cause_text", "errno_text", "host_port"]


def errno_text(exc: OSError) -> str:
    """``Connection refused (ECONNREFUSED)``; the exception's own text without an errno."""
    if exc.errno is None:
        return str(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{os.strerror(exc.errno)} ({name})"


def cause_text(exc: BaseException) -> str:
    """:func:`errno_text` of ``exc`` or of the OSError behind it (a trio stream error)."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError):
        return errno_text(cause)
    return str(exc) or type(exc).__name__


def host_port(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    """``(host, port)`` of an IPv4 or IPv6 socket address (flow info and scope dropped)."""
    return str(sockaddr[0]), int(sockaddr[1])
