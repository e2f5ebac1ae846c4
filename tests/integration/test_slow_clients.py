"""300 slow clients against the real daemon: everyone else is still served, promptly.

The daemon runs with ``[limits] max_connections = 300`` and the derived defaults (per client
address: half of it, 150; each door's reserve: a tenth, 30). Slow clients read the SMTP
greeting, send one byte of a command and then hold their connection. Beyond the limits
they are refused at once with a 421 (never parked), and:

* a well-behaved SMTP client from another loopback address is served on the same door;
* a well-behaved SOCKS5 client is served on the other door, even when the flood comes from
  several addresses and fills the SMTP door to everything but the SOCKS5 door's reserve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from harness import DEFAULT_BANNER, Sink, read_to_eof, receive_exactly, receive_until
from service_harness import socks_connect

from egressd.daemon import REFUSALS_AT_ONCE, Daemon

pytestmark = pytest.mark.integration

FLOOD = 300
SERVED_WITHIN = 5.0  # seconds; the same session takes milliseconds on an idle daemon


def config(sink_port: int) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{sink_port}]
deny_destinations = []

[limits]
max_connections = {FLOOD}

[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"
"""


@dataclass
class Flood:
    """What the slow clients got: held (greeted) or refused (a 421), by client address."""

    held: dict[str, int] = field(default_factory=dict)
    refused: list[bytes] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)


async def slow_client(port: int, address: str, flood: Flood, done: trio.Semaphore) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
    flood.streams.append(stream)
    first = await receive_until(stream, b"\r\n")
    if first.startswith(b"421 "):
        flood.refused.append(first + await read_to_eof(stream))
    else:
        assert first.startswith(b"220 "), first
        await stream.send_all(b"E")  # one byte of "EHLO", and nothing more
        flood.held[address] = flood.held.get(address, 0) + 1
    done.release()


@asynccontextmanager
async def flooded(daemon: Daemon, addresses: list[str]) -> AsyncIterator[Flood]:
    """FLOOD slow clients on the SMTP door, spread over ``addresses``; held until the end."""
    flood = Flood()
    done = trio.Semaphore(0)
    port = port_of(daemon, "smtp")
    async with trio.open_nursery() as nursery:
        for index in range(FLOOD):
            nursery.start_soon(slow_client, port, addresses[index % len(addresses)], flood, done)
        with trio.fail_after(30):
            for _ in range(FLOOD):
                await done.acquire()
        try:
            yield flood
        finally:
            for stream in flood.streams:
                await trio.aclose_forcefully(stream)


async def smtp_session(port: int, address: str) -> bytes:
    """Greeting, EHLO, QUIT from ``address``: the whole conversation, within the bound."""
    with trio.fail_after(SERVED_WITHIN):
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
        async with stream:
            greeting = await receive_until(stream, b"\r\n")
            await stream.send_all(b"EHLO mta.test\r\n")
            ehlo = await receive_until(stream, b"\r\n250 ")
            await stream.send_all(b"QUIT\r\n")
            return greeting + ehlo + await read_to_eof(stream)


async def socks_session(port: int, sink: Sink, address: str) -> bytes:
    with trio.fail_after(SERVED_WITHIN):
        connection = await socks_connect(port, "127.0.0.1", sink.port, local_address=address)
        banner = await connection.receive_until(DEFAULT_BANNER)
        await connection.stream.aclose()
        return banner


async def test_one_address_flooding_a_door_leaves_it_to_other_clients_and_doors(
    tmp_path: Path, sink: Sink
) -> None:
    async with (
        running_daemon(config(sink.port), tmp_path) as daemon,
        flooded(daemon, ["127.0.0.1"]) as flood,
    ):
        assert flood.held == {"127.0.0.1": FLOOD // 2}  # max_connections_per_client
        assert len(flood.refused) == FLOOD // 2
        assert all(b"max_connections_per_client" in r for r in flood.refused)
        conversation = await smtp_session(port_of(daemon, "smtp"), "127.0.0.3")
        assert conversation.startswith(b"220 ") and b"\r\n221 " in conversation
        banner = await socks_session(port_of(daemon, "socks5"), sink, "127.0.0.4")
        assert banner == DEFAULT_BANNER


async def test_a_flood_from_many_addresses_leaves_the_other_door_its_reserve(
    tmp_path: Path, sink: Sink
) -> None:
    addresses = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    async with (
        running_daemon(config(sink.port), tmp_path) as daemon,
        flooded(daemon, addresses) as flood,
    ):
        reserve = FLOOD // 10
        assert sum(flood.held.values()) == FLOOD - reserve  # the SOCKS5 door's reserve
        assert all(b"reserved for the other doors" in r for r in flood.refused)
        banner = await socks_session(port_of(daemon, "socks5"), sink, "127.0.0.4")
        assert banner == DEFAULT_BANNER


async def test_refusals_in_progress_are_capped_beyond_which_a_connection_is_closed_at_once(
    tmp_path: Path, sink: Sink
) -> None:
    text = config(sink.port).replace(f"max_connections = {FLOOD}", "max_connections = 1")
    async with running_daemon(text, tmp_path) as daemon:
        port = port_of(daemon, "socks5")
        streams = [await trio.open_tcp_stream("127.0.0.1", port)]  # the one session, silent
        try:
            with trio.fail_after(10):
                while daemon.runtime.active_sessions < 1:
                    await trio.sleep(0.01)
                for _ in range(REFUSALS_AT_ONCE):  # refused, but silent: no greeting yet
                    streams.append(await trio.open_tcp_stream("127.0.0.1", port))
                while daemon.refusing < REFUSALS_AT_ONCE:
                    await trio.sleep(0.01)
            with trio.fail_after(2):  # the daemon's refusal would wait 5 s for a greeting
                one_more = await trio.open_tcp_stream("127.0.0.1", port)
                async with one_more:
                    assert await read_to_eof(one_more) == b""
            refused = streams[1]  # still gets a proper SOCKS5 refusal
            with trio.fail_after(5):
                await refused.send_all(b"\x05\x01\x00")
                assert await receive_exactly(refused, 2) == b"\x05\x00"
                await refused.send_all(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x19")
                assert (await receive_exactly(refused, 2)) == b"\x05\x01"
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
