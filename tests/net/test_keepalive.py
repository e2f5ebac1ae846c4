"""TCP keepalive on spliced sessions (KumoProxy's idle 300 s, interval 30 s, 3 probes)."""

from __future__ import annotations

import socket

import trio
import trio.testing

from egressd.config import Endpoint
from egressd.net.connection import Connection
from egressd.net.listen import open_listener
from egressd.net.splice import keep_alive


def keepalive_options(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


async def test_keep_alive_sets_kumoproxys_values_on_both_kinds_of_stream() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        dialed = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    assert isinstance(accepted, trio.SocketStream)
    assert keepalive_options(dialed.socket)[0] == 0
    keep_alive(dialed, accepted)
    assert keepalive_options(dialed.socket) == (1, 300, 30, 3)
    assert keepalive_options(accepted.socket) == (1, 300, 30, 3)
    await dialed.aclose()
    await accepted.aclose()


async def test_keep_alive_on_a_connection_and_ignores_streams_without_a_socket() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    raw = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    connection = Connection(raw)
    keep_alive(connection, trio.testing.MemoryReceiveStream())  # type: ignore[arg-type]
    assert keepalive_options(raw) == (1, 300, 30, 3)
    peer.close()
    await connection.aclose()


def test_a_socket_accepted_from_open_listener_has_the_keepalive_options_already() -> None:
    """Doors call keep_alive on the outbound socket only: the client's comes from here."""
    listener = open_listener(Endpoint("127.0.0.1", 0))
    try:
        raw = socket.create_connection(listener.getsockname())
        listener.setblocking(True)
        accepted, _ = listener.accept()
    finally:
        listener.close()
    assert keepalive_options(accepted) == (1, 300, 30, 3)
    assert keepalive_options(raw)[0] == 0
    accepted.close()
    raw.close()
