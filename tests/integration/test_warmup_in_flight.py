"""The quota holds exactly with messages in flight, and at the SOCKS5 door too.

Sessions running at once each hold one message of the warming source's quota from the pick
to the final reply (:mod:`egressd.egress.quotas`), so together they never pass it; a kept
connection holds one more before each MAIL, and is replaced by one from a warm source when
the quota has no room left. The SOCKS5 door sees no message: a connection made counts.
"""

from __future__ import annotations

import smtplib
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, port_of, running_daemon
from harness import receive_exactly, start_sink
from smtp_harness import smtp_sink

from egressd.doors.smtp import SmtpDoor
from egressd.doors.socks5 import Socks5Door

pytestmark = pytest.mark.integration

QUOTA = 3
CLIENTS = 8


def smtp_config(port: int, state: Path) -> str:
    return f"""
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{port}"
[state]
directory = "{state}"
[warmup.plan.test]
days = [{QUOTA}]
{cold_and_warm_sources(port)}
"""


def one_held_session(relay_port: int, index: int, barrier: threading.Barrier) -> int:
    """MAIL and RCPT (the pick), then wait until every client got that far, then DATA:
    every session's message is in flight at once. The final reply's code."""
    with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@sender.test")[0] == 250
        assert client.rcpt(f"r{index}@x.test")[0] == 250
        barrier.wait(timeout=10)
        code, _ = client.data(b"Subject: t\r\n\r\nhi\r\n")
        return code


def concurrent_sessions(relay_port: int) -> list[int]:
    barrier = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(one_held_session, relay_port, index, barrier) for index in range(CLIENTS)
        ]
        return [future.result() for future in futures]


async def test_sessions_in_flight_at_once_send_exactly_the_quota_from_the_cold_source(
    tmp_path: Path,
) -> None:
    with smtp_sink() as sink:
        text = smtp_config(sink.port, tmp_path / "state")
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            codes = await trio.to_thread.run_sync(concurrent_sessions, port_of(daemon, "smtp"))
            assert codes == [250] * CLIENTS
            peers = [m.peer for m in sink.messages]
            assert (peers.count("127.0.0.3"), peers.count("127.0.0.4")) == (
                QUOTA,
                CLIENTS - QUOTA,
            )
            assert daemon.runtime.warmup is not None
            quota = daemon.runtime.warmup.quota("cold", "other")
            assert quota is not None and (quota.used, quota.in_flight) == (QUOTA, 0)


def one_session_many_messages(relay_port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
        for index in range(count):
            client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: t\r\n\r\nhi\r\n")


async def test_a_kept_connection_moves_to_the_warm_source_once_the_quota_is_used(
    tmp_path: Path,
) -> None:
    with smtp_sink() as sink:
        text = smtp_config(sink.port, tmp_path / "state")
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            relay_port = port_of(daemon, "smtp")
            await trio.to_thread.run_sync(one_session_many_messages, relay_port, QUOTA + 2)
    assert [m.peer for m in sink.messages] == ["127.0.0.3"] * QUOTA + ["127.0.0.4"] * 2


def socks_config(state: Path, sink_port: int) -> str:
    return f"""
[access]
deny_destinations = []
destination_ports = [{sink_port}]
[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"
[state]
directory = "{state}"
[warmup.plan.test]
days = [2]
{cold_and_warm_sources()}
"""


async def socks_request(port: int, request: bytes, bind: bytes = b"") -> tuple[int, ...]:
    """Greeting, an optional BIND, then ``request``: the reply codes (the connection is
    then closed)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    codes = []
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        for message in (bind, request) if bind else (request,):
            await stream.send_all(message)
            reply = await receive_exactly(stream, 10)
            codes.append(reply[1])
            if reply[1]:
                break
    return tuple(codes)


def connect(port: int) -> bytes:
    return b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + struct.pack("!H", port)


async def test_socks5_connections_count_against_the_quota_and_overflow(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, banner=b"", echo=False)
        text = socks_config(tmp_path / "state", sink.port)
        async with running_daemon(text, tmp_path, {"socks5": Socks5Door()}) as daemon:
            port = port_of(daemon, "socks5")
            for _ in range(3):
                assert await socks_request(port, connect(sink.port)) == (0,)
            with trio.fail_after(5):
                await sink.wait_for_connections(3)
            assert sink.peers == ["127.0.0.3", "127.0.0.3", "127.0.0.4"]
            bind_cold = b"\x05\x02\x00\x01" + bytes([127, 0, 0, 3]) + b"\x00\x00"
            assert await socks_request(port, connect(sink.port), bind_cold) == (1,)
            assert daemon.runtime.warmup is not None
            quota = daemon.runtime.warmup.quota("cold", "other")
            assert quota is not None and (quota.used, quota.in_flight) == (2, 0)
            assert daemon.warming is not None
            await daemon.warming.flush()
            counts = (await daemon.warming.store.load("0000-00-00", 0.0)).counts
            assert [(c.source, c.connected, c.sent) for c in counts] == [("cold", 2, 0)]
        nursery.cancel_scope.cancel()
