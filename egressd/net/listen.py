"""Listening sockets and the accept loop shared by every front door.

The accept loop runs in the listener's own cancel scope, but the connections it accepts
run in a nursery the caller provides, so a listener can be closed (on reload or at the
start of a drain) without touching the connections it already accepted. A handler's
exception is logged and never reaches the accept loop; every accepted stream is closed in
a ``finally``. When the process runs out of descriptors (EMFILE and friends) the loop
pauses briefly instead of dying.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

from egressd.config import Endpoint
from egressd.log import get_logger

log = get_logger("listen")

Handler = Callable[[trio.SocketStream], Awaitable[None]]

_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_PAUSE = 0.1


async def open_listener(address: Endpoint, backlog: int = 4096) -> trio.SocketListener:
    """Bind ``address`` (an IP literal; port 0 picks a free port)."""
    listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
    if len(listeners) != 1:  # an IP literal resolves to exactly one address
        for extra in listeners:
            await extra.aclose()
        raise OSError(f"{address} resolved to {len(listeners)} addresses")
    return listeners[0]


def bound_port(listener: trio.SocketListener) -> int:
    port: int = listener.socket.getsockname()[1]
    return port


async def accept_loop(
    listener: trio.SocketListener, handler: Handler, connections: trio.Nursery
) -> None:
    """Accept until cancelled; run each connection in ``connections``."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.error("accept paused: %s", exc.strerror)
                await trio.sleep(_CAPACITY_PAUSE)
                continue
            connections.start_soon(run_handler, handler, stream)


async def run_handler(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    except Exception:
        log.exception("connection handler failed")
    finally:
        close_now(stream)


def close_now(stream: trio.SocketStream) -> None:
    """Close ``stream`` at once, without a checkpoint.

    For a socket stream this is what ``trio.aclose_forcefully`` does (there is nothing to
    flush), minus a cancel scope and two trips through the scheduler per connection.
    """
    stream.socket.close()


def peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(peer[0]), int(peer[1]))
