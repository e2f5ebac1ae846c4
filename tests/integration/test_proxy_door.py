"""The PROXY-protocol front door end to end on loopback: headers from a raw client, the
``proxyprotocol`` package and a real HAProxy (``send-proxy-v2``).

Sources: ``a`` 127.0.0.2, ``b`` 127.0.0.3, ``six`` ::1. The header's src names the source
and its dst is the destination (the harness's banner+echo sink), so the sink's peer
address shows which source egressd dialed from.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import (
    Sink,
    free_port,
    read_until_closed,
    receive_exactly,
    receive_until,
    start_process,
    start_sink,
)
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

pytestmark = pytest.mark.integration

BANNER = b"220 sink.test ESMTP\r\n"


def config_text(ports: Sequence[int]) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[source.b]
source_address = "127.0.0.3"
[source.six]
source_address = "::1"
[pool.main.a]

[access]
destination_ports = [{", ".join(str(p) for p in ports)}]
deny_destinations = []

[limits]
handshake_timeout = "1s"

[[proxy.listener]]
address = "127.0.0.1:0"
"""


Egressd = RecordingDaemon


@asynccontextmanager
async def egressd(tmp_path: Path, ports: Sequence[int]) -> AsyncIterator[Egressd]:
    async with recording_daemon(config_text(ports), tmp_path, "proxy") as daemon:
        yield daemon


def proxy_result(src: str, dst: str, dst_port: int) -> ProxyResultIPv4 | ProxyResultIPv6:
    source, dest = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if isinstance(source, ipaddress.IPv4Address) and isinstance(dest, ipaddress.IPv4Address):
        return ProxyResultIPv4((source, 0), (dest, dst_port), protocol=socket.SOCK_STREAM)
    assert isinstance(source, ipaddress.IPv6Address) and isinstance(dest, ipaddress.IPv6Address)
    return ProxyResultIPv6((source, 0), (dest, dst_port), protocol=socket.SOCK_STREAM)


def v2_header(src: str, dst: str, dst_port: int) -> bytes:
    """A PROXY v2 header built by the ``proxyprotocol`` package (not egressd's builder)."""
    header: bytes = ProxyProtocolV2().pack(proxy_result(src, dst, dst_port))
    return header


def v1_header(src: str, dst: str, dst_port: int) -> bytes:
    header: bytes = ProxyProtocolV1().pack(proxy_result(src, dst, dst_port))
    return header


@pytest.mark.parametrize(
    ("build", "src", "sink_host"),
    [
        pytest.param(v1_header, "127.0.0.3", "127.0.0.1", id="v1"),
        pytest.param(v2_header, "127.0.0.3", "127.0.0.1", id="v2-ipv4"),
        pytest.param(v2_header, "::1", "::1", id="v2-ipv6"),
    ],
)
async def test_header_src_picks_the_source_and_dst_the_destination(
    nursery: trio.Nursery,
    tmp_path: Path,
    build: Callable[[str, str, int], bytes],
    src: str,
    sink_host: str,
) -> None:
    sink = await start_sink(nursery, sink_host)
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        # The client speaks right after the header, in the same write.
        await stream.send_all(build(src, sink_host, sink.port) + b"EHLO kumo\r\n")
        with trio.fail_after(5):
            assert await receive_until(stream, b"EHLO kumo\r\n") == BANNER + b"EHLO kumo\r\n"
        await stream.aclose()
        record = await e.record()
    (connection,) = sink.connections
    assert connection.peer[0] == src
    assert bytes(connection.received) == b"EHLO kumo\r\n"
    expected_source = "b" if src == "127.0.0.3" else "six"
    assert (record.source, record.pool, record.outcome) == (expected_source, None, "ok")
    assert record.bytes_up == len(b"EHLO kumo\r\n")


async def test_bytes_after_the_header_arrive_intact(sink: Sink, tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(v2_header("127.0.0.2", "127.0.0.1", sink.port) + payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                echoed = await receive_exactly(stream, len(BANNER) + len(payload))
        await stream.aclose()
        record = await e.record()
    assert echoed == BANNER + payload
    assert sink.peers == ["127.0.0.2"]
    assert (record.bytes_up, record.bytes_down) == (len(payload), len(BANNER) + len(payload))


async def test_unknown_src_is_closed_with_a_log_line(
    sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(v2_header("127.0.0.99", "127.0.0.1", sink.port) + b"EHLO x\r\n")
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b""
        record = await e.record()
    assert sink.connections == []
    assert record.outcome == "denied"
    assert record.detail == "PROXY header src 127.0.0.99 is no configured source's address"
    (line,) = [r for r in caplog.records if r.name == "egressd.session"]
    assert getattr(line, "fields", {})["detail"] == record.detail


async def test_bad_headers_are_closed_and_others_still_served(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        refused: list[bytes] = [
            b"EHLO not a header\r\n",  # no header at all
            b"PROXY TCP4 127.0.0.2 127.0.0.1 0 99999\r\n",  # bad port
            v2_header("127.0.0.2", "127.0.0.1", 22),  # a port access.destination_ports denies
            b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",  # v2 LOCAL (a health check)
        ]
        for data in refused:
            stream = await trio.open_tcp_stream("127.0.0.1", e.port)
            await stream.send_all(data)
            with trio.fail_after(5):
                assert await read_until_closed(stream) == b""
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(v1_header("127.0.0.2", "127.0.0.1", sink.port))
        with trio.fail_after(5):
            assert await receive_until(stream, b"\r\n") == BANNER
        await stream.aclose()
        records = [await e.record(n) for n in range(1, 6)]
    assert [r.outcome for r in records] == [
        "protocol_error",
        "protocol_error",
        "denied",
        "closed",
        "ok",
    ]
    assert sink.peers == ["127.0.0.2"]


async def test_a_client_that_never_finishes_its_header_is_closed(
    sink: Sink, tmp_path: Path
) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(b"PROXY TCP4 127.0.0.2")
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b""
        record = await e.record()
    assert (record.outcome, record.detail) == ("timeout", "no complete PROXY header within 1s")


HAPROXY_CONFIG = """\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:{frontend} accept-proxy
    default_backend be

backend be
    server egressd 127.0.0.1:{door} send-proxy-v2
"""


async def test_haproxy_send_proxy_v2_reaches_the_destination(sink: Sink, tmp_path: Path) -> None:
    """MTA -> HAProxy (accept-proxy) -> egressd (HAProxy's own PROXY v2) -> destination."""
    async with egressd(tmp_path, [sink.port]) as e:
        frontend = free_port()
        with tempfile.TemporaryDirectory(prefix="egressd-haproxy-") as workdir:
            config = Path(workdir) / "haproxy.cfg"
            config.write_text(HAPROXY_CONFIG.format(frontend=frontend, door=e.port))
            with start_process(["haproxy", "-f", str(config), "-db"], frontend, cwd=workdir):
                stream = await trio.open_tcp_stream("127.0.0.1", frontend)
                await stream.send_all(v1_header("127.0.0.3", "127.0.0.1", sink.port))
                with trio.fail_after(5):
                    assert await receive_until(stream, b"\r\n") == BANNER
                    await stream.send_all(b"QUIT\r\n")
                    await stream.send_eof()
                    assert await read_until_closed(stream) == b"QUIT\r\n"  # the sink's echo
                await stream.aclose()
                record = await e.record()
    assert sink.peers == ["127.0.0.3"]
    assert (record.source, record.outcome) == ("b", "ok")
