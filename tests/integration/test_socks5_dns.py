"""The SOCKS5 door resolves names through ``[dns]``, as the SMTP door does (issue 11).

A dnsmasq on loopback is the only name server: the names below exist nowhere else, so a
door that still asked the system resolver (getaddrinfo) could not reach them. Each test
checks what a SOCKS client sees (the reply code, the address the destination saw) and the
session record. A source's IP version picks A or AAAA; a name that does not exist, has no
address of the source's family, or whose lookup times out gets reply 04, and nothing
raises.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import Sink, free_port, receive_exactly
from smtp_harness import dnsmasq

pytestmark = pytest.mark.integration

SUCCEEDED, HOST_UNREACHABLE = 0, 4

NAMES = {
    "both.test": ["127.0.0.1", "::1"],
    "v4only.test": ["127.0.0.1"],
    "v6only.test": ["::1"],
}


def config_text(ports: list[int], nameserver: str, *, dns: str = "", dial: str = "") -> str:
    return f"""
[source.four]
source_address = "127.0.0.2"
[source.six]
source_address = "::1"
[pool.four.four]
[pool.six.six]

[dns]
nameservers = ["{nameserver}"]
{dns}

[dial]
{dial}

[access]
destination_ports = [{", ".join(str(p) for p in ports)}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "four"
"""


@asynccontextmanager
async def egressd(tmp_path: Path, text: str) -> AsyncIterator[RecordingDaemon]:
    async with recording_daemon(text, tmp_path, "socks5") as daemon:
        yield daemon


async def connect_by_name(port: int, name: str, dest_port: int, pool: str = "four") -> bytes:
    """RFC 1929 with ``pool`` as the username, CONNECT to ``name`` (ATYP 3); the reply's
    first 10 bytes, then the first bytes the destination sent (its banner) on success."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x05\x01\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        await stream.send_all(bytes([1, len(pool)]) + pool.encode() + b"\x00")
        assert await receive_exactly(stream, 2) == b"\x01\x00"
        raw = name.encode()
        await stream.send_all(
            b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", dest_port)
        )
        with trio.fail_after(10):
            head = await receive_exactly(stream, 4)
            rest = await receive_exactly(stream, 16 + 2 if head[3] == 4 else 4 + 2)
    return head + rest


@contextmanager
def silent_nameserver() -> Iterator[str]:
    """A UDP socket on loopback that takes queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_a_name_only_the_configured_name_server_knows_is_reached(
    sink: Sink, tmp_path: Path
) -> None:
    with dnsmasq(hosts=NAMES) as dns:
        async with egressd(tmp_path, config_text([sink.port], dns.nameserver)) as e:
            reply = await connect_by_name(e.port, "both.test", sink.port)
            record = await e.record()
    assert reply[:2] == bytes([5, SUCCEEDED])
    assert sink.peers == ["127.0.0.2"]  # the IPv4 source, to the name's A record
    assert record.outcome == "ok"
    assert record.destination == f"both.test:{sink.port} (127.0.0.1)"


async def test_an_ipv6_source_gets_the_aaaa_record(sink6: Sink, tmp_path: Path) -> None:
    with dnsmasq(hosts=NAMES) as dns:
        async with egressd(tmp_path, config_text([sink6.port], dns.nameserver)) as e:
            reply = await connect_by_name(e.port, "both.test", sink6.port, pool="six")
            record = await e.record()
    assert reply[:2] == bytes([5, SUCCEEDED])
    assert reply[3] == 4  # BND.ADDR in the IPv6 family of the outbound connection
    assert sink6.peers == ["::1"]
    assert record.destination == f"both.test:{sink6.port} (::1)"


@pytest.mark.parametrize(
    ("name", "pool", "detail"),
    [
        ("v6only.test", "four", "v6only.test has no IPv4 address (only IPv6)"),
        ("v4only.test", "six", "v4only.test has no IPv6 address (only IPv4)"),
        ("nowhere.test", "four", "cannot resolve nowhere.test: nowhere.test does not exist"),
        ("bad\\999.test", "four", "cannot resolve bad\\999.test"),
    ],
    ids=["no-a-record", "no-aaaa-record", "nxdomain", "name-the-resolver-refuses"],
)
async def test_names_without_a_usable_address_get_04(
    name: str,
    pool: str,
    detail: str,
    sink: Sink,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    with dnsmasq(hosts=NAMES) as dns:
        async with egressd(tmp_path, config_text([sink.port], dns.nameserver)) as e:
            reply = await connect_by_name(e.port, name, sink.port, pool=pool)
            record = await e.record()
    assert reply[:2] == bytes([5, HOST_UNREACHABLE])
    assert sink.connections == []
    assert record.outcome == "dial_failed"
    assert detail in (record.detail or "")
    assert [r for r in caplog.records if r.exc_info] == []


async def test_a_lookup_that_times_out_gets_04(sink: Sink, tmp_path: Path) -> None:
    with silent_nameserver() as nameserver:
        text = config_text([sink.port], nameserver, dns='timeout = "300ms"')
        async with egressd(tmp_path, text) as e:
            reply = await connect_by_name(e.port, "both.test", sink.port)
            record = await e.record()
    assert reply[:2] == bytes([5, HOST_UNREACHABLE])
    assert record.outcome == "dial_failed"
    assert "A lookup of both.test failed: timed out" in (record.detail or "")


async def test_the_dial_deadline_expiring_during_the_lookup_gets_04(
    sink: Sink, tmp_path: Path
) -> None:
    """``[dial] timeout`` shorter than ``[dns] timeout``: the plan's deadline ends the
    lookup; that is still the name's failure (04), not a connect timeout (06)."""
    with silent_nameserver() as nameserver:
        text = config_text([sink.port], nameserver, dns='timeout = "10s"', dial='timeout = "300ms"')
        async with egressd(tmp_path, text) as e:
            reply = await connect_by_name(e.port, "both.test", sink.port)
            record = await e.record()
    assert reply[:2] == bytes([5, HOST_UNREACHABLE])
    assert "while resolving" in (record.detail or "")


async def test_answers_are_cached_for_their_ttl(sink: Sink, tmp_path: Path) -> None:
    """The SMTP door's answer cache: with the name server gone, a name looked up a moment
    ago (TTL 300 s) is still reached; a name never looked up is not."""
    port = free_port()
    with dnsmasq(hosts=NAMES, port=port, extra=["--local-ttl=300"]) as dns:
        text = config_text([sink.port], dns.nameserver, dns='timeout = "300ms"')
        async with egressd(tmp_path, text) as e:
            first = await connect_by_name(e.port, "v4only.test", sink.port)
            await e.record()
            dns.process.stop()
            again = await connect_by_name(e.port, "v4only.test", sink.port)
            never_asked = await connect_by_name(e.port, "both.test", sink.port)
    assert first[:2] == again[:2] == bytes([5, SUCCEEDED])
    assert never_asked[:2] == bytes([5, HOST_UNREACHABLE])
    assert sink.peers == ["127.0.0.2", "127.0.0.2"]
