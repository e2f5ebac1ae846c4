"""Listening sockets and the accept loop shared by every front door.

The accept loop runs in the listener's own cancel scope, but the connections it accepts
run in a nursery the caller provides, so a listener can be closed (on reload or at the
start of a drain) without touching the connections it already accepted. Each accepted
socket becomes a :class:`~egressd.net.connection.Connection` that knows its peer (what
``accept`` returned). A handler's exception is logged and never reaches the accept loop;
every accepted connection is closed in a ``finally``. When the process runs out of
descriptors (EMFILE and friends) the loop pauses briefly instead of dying.

``accept`` is tried before waiting for readiness, and a burst of waiting clients is taken
in one go (yielding every :data:`ACCEPT_BURST` accepts so the connections get to run).

Workers (:mod:`egressd.supervisor`) all run this loop on one shared listening socket. A
connection then wakes every worker waiting on it, and all but one find nothing: measured
with ``scripts/bench accept-wakeups`` (a trio-shaped epoll loop per worker), one shared
socket costs 2.0 context switches per connection with 2 idle workers (4.1 with 4) against
1.0 for a socket per worker, about 10-20 us of CPU per connection on the 2-core VM, most of
it inside ``epoll_wait`` (the kernel re-checks the socket, finds it empty, and sleeps again
without returning), and 0-0.24 wake-ups per connection that reach this loop and fail with
EAGAIN. With SOCKS5 short sessions through 2 workers, ``scripts/bench relay --workers 1,2
--syscalls`` counts 1.02-1.11 failed accepts per session (1.00 with one worker: the EAGAIN
that ends each burst) and 1.5 more context switches than two independent daemons. The
ways around it were measured and not taken:

* ``EPOLLEXCLUSIVE`` would have to be in the epoll the worker blocks in, which is trio's own
  (private, and re-armed with ``EPOLL_CTL_MOD``, which refuses the flag). In an inner epoll
  waited on through trio's it changes nothing: the kernel's exclusive wake-up stops at an
  epoll with a task blocked in it, nobody blocks in the inner one, so every worker's outer
  epoll is still woken (1.00-1.47 wake-ups and 2.0 switches per connection). And where it
  does work, it woke the same worker for 969-1000 of 1000 connections.
* ``SO_REUSEPORT`` (a socket per worker) ends the herd, but the kernel hashes each
  connection to a socket, whoever is busy, and the connections queued on a worker's socket
  are reset when it exits or restarts: 87-97 of 200 queued clients with 2 workers, 56 of
  200 with 4. On the shared socket a dying worker's share of the queue is simply taken by
  the others (tested end to end in ``tests/integration/test_workers.py``).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from egressd.config import Endpoint
from egressd.log import get_logger
from egressd.net import activation
from egressd.net.connection import Connection, close_socket, wait_readable
from egressd.net.oserrors import host_port
from egressd.net.splice import set_keepalive

log = get_logger("listen")

Handler = Callable[[Connection], Awaitable[None]]

ACCEPT_BURST = 64
"""Connections accepted back to back before the accept loop yields to them."""


class Balance(Protocol):
    """A worker's share of a listener it accepts on with other workers
    (:class:`egressd.net.balance.WorkerShare`)."""

    def defer(self) -> float: ...

    def accepted(self) -> None: ...

    def closed(self) -> None: ...


_TASK_NAME = "egressd connection"
"""Every connection task's name: one string, not one formatted per task."""
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_PAUSE = 0.1


def open_listener(address: Endpoint, backlog: int = 4096) -> socket.socket:
    """A non-blocking socket listening on ``address`` (an IP literal; port 0 picks one): the
    socket systemd passed for that address (:mod:`egressd.net.activation`), else a new one."""
    inherited = activation.take(address)
    if inherited is not None:
        set_keepalive(inherited)
        return inherited
    ip = address.ip
    if ip is None:
        raise OSError(errno.EINVAL, f"{address}: a listener needs an IP address")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_keepalive(sock)  # accepted sockets inherit it: no setsockopt per session
        sock.bind((str(ip), address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bound_port(listener: socket.socket) -> int:
    port: int = listener.getsockname()[1]
    return port


def close_listener(listener: socket.socket) -> None:
    close_socket(listener)


async def accept_loop(
    listener: socket.socket,
    handler: Handler,
    connections: trio.Nursery,
    balance: Balance | None = None,
) -> None:
    """Accept until cancelled; run each connection in ``connections``. Closes ``listener``.

    ``balance`` (a worker's, :mod:`egressd.net.balance`): counts every connection from its
    accept to its close, and says how long to wait before each accept, so that a less busy
    worker sharing the socket takes the connection first.
    """
    # socket.accept() converts the listener's family and type to IntEnums and builds the new
    # socket in Python, some 15 calls per connection (and a Python frame for every EAGAIN a
    # worker sharing the socket meets); the C-level _accept() returns the descriptor, made a
    # socket here with the family read once.
    family = listener.family
    accept: Callable[[], tuple[int, Any]] = listener._accept  # type: ignore[attr-defined]
    try:
        accepted = 0
        while True:
            if balance is not None and (delay := balance.defer()):
                await trio.sleep(delay)
            try:
                fd, peer = accept()
            except BlockingIOError:
                accepted = 0
                await wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.error("accept paused: %s", exc.strerror)
                await trio.sleep(_CAPACITY_PAUSE)
                continue
            if balance is not None:
                balance.accepted()
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            connection = Connection(sock, host_port(peer))
            connections.start_soon(run_handler, handler, connection, balance, name=_TASK_NAME)
            accepted += 1
            if accepted >= ACCEPT_BURST:
                accepted = 0
                await trio.sleep(0)  # a checkpoint: let the new connections run
    finally:
        close_listener(listener)


async def run_handler(
    handler: Handler, connection: Connection, balance: Balance | None = None
) -> None:
    try:
        await handler(connection)
    except Exception:
        log.exception("connection handler failed")
    finally:
        connection.close()
        if balance is not None:
            balance.closed()


def peer_of(connection: Connection) -> tuple[str, int]:
    if connection.peer is not None:
        return connection.peer
    try:
        return host_port(connection.socket.getpeername())
    except OSError:
        return ("?", 0)
