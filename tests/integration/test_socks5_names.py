"""Bad names through the SOCKS5 door of a running egressd (issue 10, finding 8).

A CONNECT to a name no resolver can look up (an empty label, the root alone, a 64-octet
label, bytes that are not UTF-8) used to raise UnicodeError inside the handler: the client
got no SOCKS reply and every request left a traceback in the log. Each must now get reply
04 (host unreachable) and one session line, like a name that does not resolve; and any
exception the resolver raises is a resolve failure too. Names are answered by a dnsmasq on
loopback (``[dns] nameservers``), so nothing leaves this host.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import Sink, free_port, read_until_closed, receive_exactly
from smtp_harness import dnsmasq

pytestmark = pytest.mark.integration

HOST_UNREACHABLE = 4


def config_text(sink_port: int, nameserver: str) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[dns]
nameservers = ["{nameserver}"]

[access]
destination_ports = [{sink_port}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:{free_port()}"
pool = "main"
"""


@asynccontextmanager
async def egressd(tmp_path: Path, sink: Sink) -> AsyncIterator[RecordingDaemon]:
    with dnsmasq(hosts={"mx.test": ["127.0.0.1"]}) as dns:
        text = config_text(sink.port, dns.nameserver)
        async with recording_daemon(text, tmp_path, "socks5") as daemon:
            yield daemon


async def connect_by_name(port: int, name: bytes, dest_port: int) -> tuple[bytes, bytes]:
    """Greeting, then CONNECT to ``name`` (ATYP 3); the reply and what came until close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", dest_port)
        await stream.send_all(request)
        with trio.fail_after(5):
            reply = await receive_exactly(stream, 10)
            rest = await read_until_closed(stream)
    return reply, rest


BAD_NAMES = [
    b"a..b",
    b".",
    b"a" * 64 + b".example",
    b"\xff\xfe.example",
    b"mx\x00.test",
]


@pytest.mark.parametrize(
    "name", BAD_NAMES, ids=["empty-label", "root", "label-64", "not-utf8", "nul"]
)
async def test_a_name_no_resolver_can_look_up_gets_04_and_one_log_line(
    name: bytes, sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    async with egressd(tmp_path, sink) as daemon:
        reply, rest = await connect_by_name(daemon.port, name, sink.port)
        record = await daemon.record()
    assert reply == b"\x05\x04\x00\x01" + socket.inet_aton("0.0.0.0") + b"\x00\x00"
    assert rest == b""
    assert record.outcome == "protocol_error"
    assert "reply HOST_UNREACHABLE" in (record.detail or "")
    assert [r for r in caplog.records if r.exc_info] == []
    assert len([r for r in caplog.records if r.name == "egressd.session"]) == 1


@pytest.mark.parametrize(
    # dnspython refuses the second name (a decimal escape above 255: BadEscape)
    "name",
    [b"nowhere.test", b"odd\\999.test"],
    ids=["does-not-resolve", "resolver-raises"],
)
async def test_every_resolver_failure_gets_04(
    name: bytes, sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with egressd(tmp_path, sink) as daemon:
        reply, _ = await connect_by_name(daemon.port, name, sink.port)
        record = await daemon.record()
    assert reply[:2] == bytes([5, HOST_UNREACHABLE])
    assert record.outcome == "dial_failed"
    assert [r for r in caplog.records if r.exc_info] == []


async def test_bad_names_in_a_burst_leave_the_door_serving(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, sink) as daemon:
        for name in BAD_NAMES * 20:
            reply, _ = await connect_by_name(daemon.port, name, sink.port)
            assert reply[1] == HOST_UNREACHABLE
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            await stream.send_all(b"\x05\x01\x00")
            assert await receive_exactly(stream, 2) == b"\x05\x00"
            name = b"mx.test"
            await stream.send_all(
                b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", sink.port)
            )
            reply = await receive_exactly(stream, 10)
            assert reply[:2] == b"\x05\x00"
            assert await receive_exactly(stream, len(sink.banner)) == sink.banner
