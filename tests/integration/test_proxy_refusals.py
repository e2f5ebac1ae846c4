"""The PROXY door of a running egressd refuses a suspended source (issue 10, finding 2).

A header whose src names a suspended source used to open a connection from it anyway. It
is now refused with a log line that says so; when the destination port is an SMTP port the
door first writes ``421 4.4.0 egressd: <reason>``, which the MTA takes for the remote's
greeting, so the reason reaches its log instead of looking like a timeout. Nothing is
dialed on a refusal, so port 25 here is only a number in the header.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import Sink, read_until_closed, receive_until

from egressd.proto.proxy import build_v2

pytestmark = pytest.mark.integration


def config_text(sink_port: int, *, access: str = "deny_destinations = []") -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[source.b]
source_address = "127.0.0.3"
[source.gone]
source_address = "203.0.113.7"
[pool.main.a]
[pool.other.b]
[pool.broken.gone]

[access]
destination_ports = [25, 465, {sink_port}]
{access}

[limits]
max_connections_per_source = 1

[[proxy.listener]]
address = "127.0.0.1:0"
"""


@asynccontextmanager
async def egressd(tmp_path: Path, sink: Sink, **options: str) -> AsyncIterator[RecordingDaemon]:
    text = config_text(sink.port, **options)
    async with recording_daemon(text, tmp_path, "proxy") as daemon:
        yield daemon


def header(src: str, port: int, dst: str = "127.0.0.1") -> bytes:
    return build_v2(ipaddress.ip_address(src), 0, ipaddress.ip_address(dst), port)


async def send_header(port: int, data: bytes) -> bytes:
    """Send ``data`` (a header and an EHLO); everything the door says until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data + b"EHLO mta.test\r\n")
        with trio.fail_after(5):
            return await read_until_closed(stream)


async def test_a_suspended_source_gets_421_with_the_reason_on_an_smtp_port(
    sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    async with egressd(tmp_path, sink) as e:
        e.daemon.runtime.health.suspend("b", 3600, "suspended by operator")
        said = await send_header(e.port, header("127.0.0.3", 25))
        record = await e.record()
    assert said == b"421 4.4.0 egressd: source 'b' (PROXY header src 127.0.0.3) is suspended\r\n"
    assert (record.outcome, record.source) == ("refused", "b")
    (line,) = [r for r in caplog.records if r.name == "egressd.session"]
    assert getattr(line, "fields", {})["detail"] == (
        "source 'b' (PROXY header src 127.0.0.3) is suspended"
    )


async def test_a_suspended_source_is_never_dialed_and_is_served_again_once_resumed(
    sink: Sink, tmp_path: Path
) -> None:
    async with egressd(tmp_path, sink) as e:
        e.daemon.runtime.health.suspend("b", 3600, "suspended by operator")
        assert await send_header(e.port, header("127.0.0.3", sink.port)) == b""
        assert (await e.record()).outcome == "refused"
        assert sink.connections == []
        e.daemon.runtime.health.resume("b")
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        async with stream:
            await stream.send_all(header("127.0.0.3", sink.port))
            with trio.fail_after(5):
                assert await receive_until(stream, b"\r\n") == sink.banner
    assert sink.peers == ["127.0.0.3"]


async def test_every_refusal_on_an_smtp_port_speaks_421_with_the_reason(
    sink: Sink, tmp_path: Path
) -> None:
    """Not only a suspended source: an unknown src, a denied destination, a source at its
    connection cap and a failed dial each reach the MTA's log as a 421, and nothing of
    the refused connections reaches a destination."""
    async with egressd(tmp_path, sink, access='deny_destinations = ["192.0.2.0/24"]') as e:
        unknown = await send_header(e.port, header("127.0.0.99", 25))
        denied = await send_header(e.port, header("127.0.0.2", 25, dst="192.0.2.1"))
        unplumbed = await send_header(e.port, header("203.0.113.7", 25))
        holding = await trio.open_tcp_stream("127.0.0.1", e.port)  # source a's one slot
        async with holding:
            await holding.send_all(header("127.0.0.2", sink.port))
            with trio.fail_after(5):
                assert await receive_until(holding, b"\r\n") == sink.banner
            at_cap = await send_header(e.port, header("127.0.0.2", 25))
        records = [await e.record(n) for n in (1, 2, 3, 4)]
    said = [unknown, denied, unplumbed, at_cap]
    assert all(s.startswith(b"421 4.4.0 egressd: ") and s.count(b"\r\n") == 1 for s in said)
    assert b"127.0.0.99 is no configured source's address" in unknown
    assert b"in access.deny_destinations (192.0.2.0/24)" in denied
    assert b"not configured on this host" in unplumbed
    assert b"source a is at max_connections_per_source (1)" in at_cap
    outcomes = [r.outcome for r in records]
    assert outcomes == ["denied", "denied", "dial_failed", "refused"]
    assert sink.peers == ["127.0.0.2"]  # only the connection that held the slot


async def test_refusals_on_other_ports_stay_silent(sink: Sink, tmp_path: Path) -> None:
    """465 expects TLS from the first byte, and a non-SMTP port expects no SMTP: close."""
    async with egressd(tmp_path, sink, access='deny_destinations = ["192.0.2.0/24"]') as e:
        smtps = await send_header(e.port, header("127.0.0.2", 465, dst="192.0.2.1"))
        other = await send_header(e.port, header("127.0.0.99", sink.port))
        records = [await e.record(n) for n in (1, 2)]
    assert (smtps, other) == (b"", b"")
    assert [r.outcome for r in records] == ["denied", "denied"]
