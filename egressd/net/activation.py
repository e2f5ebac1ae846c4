"""systemd socket activation: listening sockets inherited at startup (``LISTEN_FDS``).

Theory of operation
-------------------
With a socket unit (``systemd.socket(5)``, ``systemd/egressd.socket``), systemd binds the
listening sockets itself and passes them to egressd when it starts it: descriptors 3 to
``3 + $LISTEN_FDS - 1``, meant for the process whose PID is ``$LISTEN_PID``
(``sd_listen_fds(3)``). Two things are gained: connections that arrive while egressd
restarts (an upgrade, a crash) wait in the kernel's queue of a socket systemd holds
instead of being refused, and egressd listens on port 25 without ``CAP_NET_BIND_SERVICE``.

:func:`inherit` runs once at startup (the single process or the supervisor), before
anything is bound: it takes every inherited descriptor that is a listening TCP socket,
keyed by its address (IP and port, as ``getsockname`` gives them), marks it close-on-exec
and removes the three variables from the environment, so that the workers and any child
never take the descriptors as theirs. :func:`take` is then asked by
:func:`egressd.net.listen.open_listener` for each configured listener: a listener whose
address (an IP literal and a fixed port) is an inherited socket's gets that socket, every
other listener is bound as without systemd, so a unit may activate some listeners and not
others. Matching is by address only, the way a listener is configured; a socket unit's
``ListenStream=`` must name the listener's ``address`` exactly (``0.0.0.0:25`` is not
``[::]:25``).

Each listener takes a duplicate; the inherited socket stays here for the process's life,
so a listener closed by a reload and added back by a later one takes it again. A socket no
listener matches is logged and kept (systemd queues its connections until a reload adds a
listener at its address); a descriptor that is not a listening TCP socket is logged and
left alone. Since systemd holds its own copy of every socket, closing a listener (a
reload, the drain) stops accepting but does not refuse connections: they wait for the
next start, which is the point of socket activation.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, MutableMapping

from egressd.config import Endpoint, IPAddress, format_hostport
from egressd.log import get_logger

__all__ = ["inherit", "inherited", "take"]

log = get_logger("listen")

LISTEN_FDS_START = 3
"""``SD_LISTEN_FDS_START``: the first inherited descriptor."""

_inherited: dict[tuple[IPAddress, int], socket.socket] = {}


def inherit(
    configured: Iterable[Endpoint], environ: MutableMapping[str, str] | None = None
) -> None:
    """Take the listening sockets systemd passed to this process (none without
    ``LISTEN_FDS``, or when ``LISTEN_PID`` is another process's); log each, and each that
    no ``configured`` listener address matches."""
    environ = os.environ if environ is None else environ
    fds, pid = environ.pop("LISTEN_FDS", None), environ.pop("LISTEN_PID", None)
    environ.pop("LISTEN_FDNAMES", None)
    if fds is None or pid != str(os.getpid()):
        return
    try:
        count = int(fds)
    except ValueError:
        log.warning("socket activation: LISTEN_FDS=%r is not a number: nothing inherited", fds)
        return
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        _take_descriptor(fd)
    wanted = {(ip, e.port) for e in configured if (ip := e.ip) is not None and e.port}
    for ip, port in _inherited:
        matched = (ip, port) in wanted
        log.log(
            logging.INFO if matched else logging.WARNING,
            "socket activation: inherited %s%s",
            format_hostport(ip, port),
            "" if matched else " (no listener has this address: kept for a reload)",
        )


def take(address: Endpoint) -> socket.socket | None:
    """A non-blocking duplicate of the inherited socket listening on ``address``, or None."""
    ip = address.ip
    if ip is None or not address.port:
        return None
    inherited_socket = _inherited.get((ip, address.port))
    if inherited_socket is None:
        return None
    copy = inherited_socket.dup()
    copy.setblocking(False)
    return copy


def inherited() -> list[str]:
    """The addresses of the inherited sockets (for tests and status)."""
    return [format_hostport(ip, port) for ip, port in _inherited]


def _take_descriptor(fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.warning("socket activation: descriptor %d: %s: ignored", fd, exc.strerror)
        return
    if not _listening_tcp(sock):
        log.warning("socket activation: descriptor %d is not a listening TCP socket: ignored", fd)
        sock.detach()  # not ours to close
        return
    os.set_inheritable(fd, False)
    host, port = sock.getsockname()[:2]
    _inherited[(ipaddress.ip_address(host.split("%")[0]), port)] = sock


def _listening_tcp(sock: socket.socket) -> bool:
    try:
        return (
            sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        )
    except OSError:
        return False
