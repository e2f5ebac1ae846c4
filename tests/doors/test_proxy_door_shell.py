"""The PROXY-protocol door's trio shell over memory streams, on a fake clock.

The client is the test, on one end of a ``memory_stream_pair``; the door runs on the other
with a :class:`~egressd.runtime.Runtime` built from a config in memory. The protocol has
no answer, so every refusal is a close and the session record says why; the header's
timeout is the door's own and takes no real time under ``autojump_clock``. Dialing and
relaying need real sockets: tests/integration/test_proxy_door.py covers them.
"""

from __future__ import annotations

import ipaddress
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing
from door_shell import Shell, door_shell

from egressd.config import (
    AccessSettings,
    Config,
    Endpoint,
    LimitSettings,
    Listener,
    Pool,
    PoolEntry,
    Source,
)
from egressd.doors.proxy import ProxyDoor
from egressd.proto.proxy import V2_SIGNATURE, build_v1, build_v2

HANDSHAKE_TIMEOUT = 30.0
IPv4 = ipaddress.IPv4Address


def config() -> Config:
    source = Source("a", source_address=ipaddress.ip_address("127.0.0.2"))
    return Config(
        path=Path("egressd.toml"),
        sources={"a": source},
        pools={"main": Pool("main", (PoolEntry("a"),))},
        limits=LimitSettings(handshake_timeout=HANDSHAKE_TIMEOUT),
        access=AccessSettings(destination_ports=(25, 2626), deny_destinations=()),  # no dial here
    )


def proxy_door() -> AbstractAsyncContextManager[Shell]:
    return door_shell(ProxyDoor(), config(), Listener(Endpoint("127.0.0.1", 4480)))


@pytest.mark.parametrize(
    "partial",
    [b"", b"PROXY TCP4 127.0.0.2 ", V2_SIGNATURE[:10]],
    ids=["silent", "half-v1", "half-v2"],
)
async def test_a_header_not_finished_in_time_is_closed_at_the_handshake_timeout(
    partial: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    async with proxy_door() as shell:
        started = trio.current_time()
        await shell.client.send_all(partial)
        assert await shell.closed()
        assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT)
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.detail) == (
        "timeout",
        "no complete PROXY header within 30s",
    )


async def test_eof_inside_the_header_is_a_close_not_a_protocol_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with proxy_door() as shell:
        await shell.client.send_all(b"PROXY TCP4 127.0.0.2")
        await shell.client.send_eof()
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.detail) == (
        "closed",
        "client closed before a complete PROXY header",
    )


@pytest.mark.parametrize(
    ("wire", "outcome", "detail"),
    [
        (b"GET / HTTP/1.1\r\n", "protocol_error", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4\n", "protocol_error", "malformed PROXY v1 line"),
        (V2_SIGNATURE + b"\x20\x00\x00\x00", "closed", "LOCAL header (a health check)"),
        (b"PROXY UNKNOWN\r\n", "denied", "carries no addresses"),
        (
            build_v1(IPv4("127.0.0.99"), 0, IPv4("127.0.0.1"), 2626),
            "denied",
            "PROXY header src 127.0.0.99 is no configured source's address",
        ),
        (
            build_v2(IPv4("127.0.0.2"), 0, IPv4("127.0.0.1"), 22),
            "denied",
            "port 22 is not in access.destination_ports",
        ),
    ],
    ids=["http", "bare-lf", "local", "unknown", "unknown-src", "denied-port"],
)
async def test_each_refusal_is_a_close_with_its_reason(
    wire: bytes, outcome: str, detail: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with proxy_door() as shell:
        await shell.client.send_all(wire + b"EHLO x\r\n")
        assert await shell.closed()
        await shell.done.wait()
    assert shell.record.outcome == outcome
    assert detail in (shell.record.detail or "")


@pytest.mark.parametrize(("port", "said"), [(25, True), (587, True), (465, False), (2626, False)])
async def test_a_suspended_source_is_refused_with_421_on_a_plain_smtp_port(
    port: int, said: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with proxy_door() as shell:
        shell.runtime.health.suspend("a", 3600)
        await shell.client.send_all(build_v2(IPv4("127.0.0.2"), 0, IPv4("127.0.0.1"), port))
        reply = b""
        while chunk := await shell.client.receive_some(1024):
            reply += chunk
        await shell.done.wait()
    reason = "source 'a' (PROXY header src 127.0.0.2) is suspended"
    assert reply == (f"421 4.4.0 egressd: {reason}\r\n".encode() if said else b"")
    assert (shell.record.outcome, shell.record.detail) == ("refused", reason)
