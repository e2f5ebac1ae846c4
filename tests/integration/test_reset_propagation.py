"""An aborted spliced session: the other side sees a reset, not a clean EOF, both ways.

Through the real daemon's SOCKS5 and PROXY doors, on loopback: the destination sends part
of a transfer and then resets the connection (SO_LINGER 0). A client that got an EOF would
take the partial transfer for a complete one.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from harness import read_to_eof, receive_exactly
from service_harness import socks_connect

pytestmark = pytest.mark.integration

PARTIAL = b"220 first half of a transfer"


async def start_resetting_server(nursery: trio.Nursery) -> tuple[int, trio.Event]:
    """Sends PARTIAL to each connection, waits for "go" from it, then resets it."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    reset_done = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(PARTIAL)
        await receive_exactly(stream, 2)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
        reset_done.set()

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1], reset_done


def config(destination_port: int) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{destination_port}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"

[[proxy.listener]]
address = "127.0.0.1:0"
"""


def proxy_v1(src: str, dst: str, port: int) -> bytes:
    return f"PROXY TCP4 {src} {dst} 40000 {port}\r\n".encode()


async def test_a_destination_reset_reaches_socks5_and_proxy_clients_as_a_reset(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port, _ = await start_resetting_server(nursery)
    async with running_daemon(config(port), tmp_path) as daemon:
        socks = await socks_connect(port_of(daemon, "socks5"), "127.0.0.1", port)
        proxied = await trio.open_tcp_stream("127.0.0.1", port_of(daemon, "proxy"))
        await proxied.send_all(proxy_v1("127.0.0.2", "127.0.0.1", port))
        for stream, already in ((socks.stream, bytes(socks.received)), (proxied, b"")):
            async with stream:
                with trio.fail_after(5):
                    received = already + await receive_exactly(stream, len(PARTIAL) - len(already))
                    assert received == PARTIAL
                    await stream.send_all(b"go")
                    with pytest.raises(trio.BrokenResourceError) as raised:
                        await read_to_eof(stream)
                assert isinstance(raised.value.__cause__, ConnectionResetError)


async def test_a_client_reset_reaches_the_destination_as_a_reset(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    outcome: list[BaseException | bytes] = []
    got_it = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def destination(stream: trio.SocketStream) -> None:
        try:
            await receive_exactly(stream, 5)
            got_it.set()
            outcome.append(await read_to_eof(stream))
        except trio.BrokenResourceError as exc:
            outcome.append(exc)

    nursery.start_soon(trio.serve_listeners, destination, listeners)
    async with running_daemon(config(port), tmp_path) as daemon:
        socks = await socks_connect(port_of(daemon, "socks5"), "127.0.0.1", port)
        with trio.fail_after(5):
            await socks.stream.send_all(b"half ")
            await got_it.wait()
            sock = socks.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await socks.stream.aclose()
            while not outcome:
                await trio.sleep(0.01)
    (result,) = outcome
    assert isinstance(result, trio.BrokenResourceError), result
    assert isinstance(result.__cause__, ConnectionResetError)
