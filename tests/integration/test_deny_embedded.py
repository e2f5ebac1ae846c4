"""IPv6 destinations that embed an IPv4 address, and non-global ranges, through every door.

The daemon runs with the default ``deny_destinations``. Each destination below is refused
before it is dialed, through the SOCKS5 door (reply 02), the PROXY door (``421 4.4.0``
naming the rule on port 25, then closed; outcome ``denied``) and the SMTP door
(``451 4.4.4``), and the refusal names the rule. Sources
bind loopback only (127.0.0.2, ::1), so even a daemon that wrongly dialed would not send a
packet off this host; the session records show it did not try (outcome ``denied``, not
``dial_failed``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, port_of, running_daemon
from harness import read_to_eof
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2
from service_harness import SocksRefused, socks_connect

pytestmark = pytest.mark.integration

# (destination, what the refusal names)
EMBEDDING = [
    ("64:ff9b::a00:1", "embeds 10.0.0.1"),  # NAT64 (RFC 6052)
    ("64:ff9b:1::a00:1", "(64:ff9b:1::/48)"),  # local-use NAT64 (RFC 8215)
    ("2002:a00:1::1", "embeds 10.0.0.1"),  # 6to4 (RFC 3056)
    ("::a00:1", "embeds 10.0.0.1"),  # IPv4-compatible (RFC 4291)
    ("::ffff:0:a00:1", "embeds 10.0.0.1"),  # SIIT (RFC 2765)
    ("100::1", "(100::/64)"),  # discard-only (RFC 6666)
    ("64:ff9b::7f00:1", "embeds 127.0.0.1"),
]
NON_GLOBAL_V4 = [
    ("198.18.0.1", "(198.18.0.0/15)"),  # benchmarking (RFC 2544)
    ("192.0.0.8", "(192.0.0.0/24)"),  # IETF protocol assignments
]


def config() -> str:
    return """
[source.four]
source_address = "127.0.0.2"
[source.six]
source_address = "::1"
[pool.four.four]
[pool.six.six]

[dial]
timeout = "2s"

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "six"

[[proxy.listener]]
address = "127.0.0.1:0"

[[smtp.listener]]
address = "127.0.0.1:0"
pool = "six"
"""


@asynccontextmanager
async def egressd(tmp_path: Path) -> AsyncIterator[RecordingDaemon]:
    async with running_daemon(config(), tmp_path) as daemon:
        recording = RecordingDaemon(daemon, "socks5")
        daemon.runtime.session_hooks.append(recording.records.append)
        yield recording


def assert_refused_before_dialing(e: RecordingDaemon, rule: str) -> None:
    record = e.records[-1]
    assert record.outcome == "denied", record
    assert rule in (record.detail or ""), record.detail
    assert "access.deny_destinations" in (record.detail or "")


async def wait_records(e: RecordingDaemon, count: int) -> None:
    with trio.fail_after(5):
        while len(e.records) < count:
            await trio.sleep(0.01)


async def test_socks5_refuses_embedded_and_non_global_destinations_with_02(
    tmp_path: Path,
) -> None:
    async with egressd(tmp_path) as e:
        port = port_of(e.daemon, "socks5")
        for count, (destination, rule) in enumerate(EMBEDDING + NON_GLOBAL_V4, start=1):
            with trio.fail_after(5), pytest.raises(SocksRefused) as refused:
                await socks_connect(port, destination, 25)
            assert refused.value.reply == 2, (destination, refused.value)
            await wait_records(e, count)
            assert_refused_before_dialing(e, rule)


def proxy_v2(src: str, dst: str, port: int) -> bytes:
    source, dest = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    result: ProxyResultIPv4 | ProxyResultIPv6
    if isinstance(source, ipaddress.IPv4Address) and isinstance(dest, ipaddress.IPv4Address):
        result = ProxyResultIPv4((source, 0), (dest, port), protocol=socket.SOCK_STREAM)
    else:
        assert isinstance(source, ipaddress.IPv6Address)
        assert isinstance(dest, ipaddress.IPv6Address)
        result = ProxyResultIPv6((source, 0), (dest, port), protocol=socket.SOCK_STREAM)
    header: bytes = ProxyProtocolV2().pack(result)
    return header


async def test_proxy_door_closes_embedded_and_non_global_destinations(tmp_path: Path) -> None:
    async with egressd(tmp_path) as e:
        port = port_of(e.daemon, "proxy")
        cases = [("::1", d, r) for d, r in EMBEDDING] + [
            ("127.0.0.2", d, r) for d, r in NON_GLOBAL_V4
        ]
        for count, (source, destination, rule) in enumerate(cases, start=1):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(proxy_v2(source, destination, 25))
                with trio.fail_after(5):
                    said = await read_to_eof(stream)
            await wait_records(e, count)
            assert_refused_before_dialing(e, rule)
            # port 25: the MTA gets the reason as the remote's greeting, then the close
            assert said.startswith(b"421 4.4.0 egressd: ") and said.endswith(b"\r\n")
            assert rule.encode() in said and said.count(b"\r\n") == 1


async def smtp_reply(stream: trio.SocketStream, buffer: bytearray) -> str:
    with trio.fail_after(5):
        while not (lines := buffer.split(b"\r\n")[:-1]) or lines[-1][3:4] == b"-":
            chunk = await stream.receive_some(65536)
            assert chunk, f"EOF after {bytes(buffer)!r}"
            buffer += chunk
    text = bytes(buffer).decode()
    buffer.clear()
    return text


async def test_smtp_door_refuses_embedded_domain_literals_with_451(tmp_path: Path) -> None:
    async with egressd(tmp_path) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(e.daemon, "smtp"))
        async with stream:
            buffer = bytearray()
            assert (await smtp_reply(stream, buffer)).startswith("220 ")
            await stream.send_all(b"EHLO mta.test\r\n")
            assert (await smtp_reply(stream, buffer)).startswith("250")
            for destination, _rule in EMBEDDING:
                await stream.send_all(b"MAIL FROM:<a@sender.test>\r\n")
                assert (await smtp_reply(stream, buffer)).startswith("250")
                await stream.send_all(f"RCPT TO:<x@[IPv6:{destination}]>\r\n".encode())
                reply = await smtp_reply(stream, buffer)
                assert reply.startswith("451 4.4.4 every address of the next hop"), reply
                assert "access.deny_destinations" in reply
                await stream.send_all(b"RSET\r\n")
                assert (await smtp_reply(stream, buffer)).startswith("250")
