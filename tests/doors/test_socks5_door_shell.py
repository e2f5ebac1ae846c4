"""The SOCKS5 door's trio shell over memory streams, on a fake clock.

The client is the test, on one end of a ``memory_stream_pair``; the door runs on the other
with a :class:`~egressd.runtime.Runtime` built from a config in memory. Everything up to
the dial is exercised here (handshake, authentication, BIND, refusals, the handshake
timeout, the overload refusal); timeouts are the door's own, applied with trio's
deadlines, and take no real time under ``autojump_clock``. Dialing and relaying need real
sockets: tests/integration/test_socks5_door.py covers them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
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
    User,
)
from egressd.doors.socks5 import Socks5Door
from egressd.runtime import Runtime

H = bytes.fromhex
HANDSHAKE_TIMEOUT = 30.0
CONNECT_192_0_2_25 = H("05010001c00002190019")
BIND_127_0_0_2 = H("050200017f0000020000")


def config(users: Mapping[str, str] | None = None) -> Config:
    source = Source("a", source_address=ipaddress.ip_address("127.0.0.2"))
    return Config(
        path=Path("egressd.toml"),
        sources={"a": source},
        pools={"main": Pool("main", (PoolEntry("a"),))},
        limits=LimitSettings(handshake_timeout=HANDSHAKE_TIMEOUT),
        access=AccessSettings(deny_destinations=()),  # no test here gets as far as a dial
        auth={name: User(password) for name, password in (users or {}).items()},
    )


def socks5_door(
    users: Mapping[str, str] | None = None, runtime: Runtime | None = None
) -> AbstractAsyncContextManager[Shell]:
    return door_shell(
        Socks5Door(),
        runtime.config if runtime else config(users),
        Listener(Endpoint("127.0.0.1", 1080), pool="main"),
        runtime,
    )


async def test_a_silent_client_is_closed_at_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door() as shell:
        started = trio.current_time()
        assert await shell.closed()
        assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT)
        await shell.done.wait()
    assert shell.record.outcome == "timeout"
    assert shell.record.detail == "SOCKS5 handshake not finished within 30s"


async def test_a_trickling_client_is_cut_at_the_timeout_for_the_whole_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One byte every 10 s keeps each read short, but the handshake has one deadline."""
    async with socks5_door() as shell:
        started = trio.current_time()
        await shell.send(b"\x05")
        await trio.sleep(10)
        await shell.send(b"\x01")
        await trio.sleep(10)
        await shell.send(b"\x00")
        assert await shell.receive(2) == H("0500")
        for byte in CONNECT_192_0_2_25[:3]:
            await trio.sleep(3)
            await shell.send(bytes([byte]))
        assert await shell.closed()
        assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT)
    assert shell.record.outcome == "timeout"


async def test_no_acceptable_method_gets_ff_and_is_denied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door(users={"main": "secret"}) as shell:
        await shell.send(H("050100"))
        assert await shell.receive(2) == H("05ff")
        assert await shell.closed()
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.detail) == (
        "denied",
        "client offers no acceptable authentication method",
    )


async def test_a_wrong_password_gets_01_01_and_is_denied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door(users={"main": "secret"}) as shell:
        await shell.send(H("05020002") + H("01") + b"\x04main" + b"\x05wrong")
        assert await shell.receive(4) == H("0502") + H("0101")
        assert await shell.closed()
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.detail) == (
        "denied",
        "RFC 1929 credentials refused for user 'main'",
    )


async def test_a_refused_login_is_logged_under_the_pool_it_asked_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The username names the pool: a wrong password for "bulk" on a listener whose pool is
    "main" is an attempt on "bulk", and the connection line says so."""
    async with socks5_door(users={"main": "secret", "bulk": "other"}) as shell:
        await shell.send(H("05020002") + H("01") + b"\x04bulk" + b"\x05wrong")
        assert await shell.receive(4) == H("0502") + H("0101")
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.pool) == ("denied", "bulk")


async def test_wrong_passwords_wait_longer_per_client_address_and_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 10 item 6: the SOCKS5 door brakes guessing as the SMTP door does (1 s more per
    failure from the address), while a right password is answered at once."""
    runtime = Runtime(config({"main": "secret"}))
    failures: list[str] = []
    runtime.login_failure_hooks.append(failures.append)
    waited = []
    for password in (b"wrong", b"wrong", b"secret"):
        async with socks5_door(runtime=runtime) as shell:
            started = trio.current_time()
            login = H("01") + b"\x04main" + bytes([len(password)]) + password
            await shell.send(H("05020002") + login)
            reply = await shell.receive(4)
            waited.append(trio.current_time() - started)
        assert reply == H("0502") + (H("0100") if password == b"secret" else H("0101"))
    assert waited == [pytest.approx(1.0), pytest.approx(2.0), pytest.approx(0.0)]
    assert failures == ["socks5", "socks5"]


async def test_bind_to_no_sources_address_gets_02(autojump_clock: trio.testing.MockClock) -> None:
    async with socks5_door() as shell:
        await shell.send(H("050100") + H("050200017f0000630000"))  # BIND 127.0.0.99:0
        assert await shell.receive(12) == H("0500") + H("05020001000000000000")
        assert await shell.closed()
        await shell.done.wait()
    assert shell.record.detail == "BIND 127.0.0.99: no configured source has this address"


async def test_bind_then_eof_gets_07_and_the_reason(autojump_clock: trio.testing.MockClock) -> None:
    async with socks5_door() as shell:
        await shell.send(H("050100") + BIND_127_0_0_2)
        assert await shell.receive(12) == H("0500") + H("050000017f0000020000")
        assert shell.record.source == "a"
        await shell.client.send_eof()
        assert await shell.receive(10) == H("05070001000000000000")
        await shell.done.wait()
    assert shell.record.outcome == "closed"  # the client went first
    assert "closed after BIND without sending CONNECT" in (shell.record.detail or "")


async def test_udp_associate_is_a_protocol_error_with_07(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door() as shell:
        await shell.send(H("050100") + H("05030001000000000000"))
        assert await shell.receive(12) == H("0500") + H("05070001000000000000")
        assert await shell.closed()
        await shell.done.wait()
    assert shell.record.outcome == "protocol_error"


async def test_a_name_no_resolver_could_look_up_gets_04(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door() as shell:
        await shell.send(H("050100") + H("05010003") + b"\x04a..b" + H("0019"))
        assert await shell.receive(12) == H("0500") + H("05040001000000000000")
        await shell.done.wait()
    assert shell.record.outcome == "protocol_error"


async def test_a_port_the_access_rules_refuse_gets_02_without_a_dial(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with socks5_door() as shell:
        await shell.send(H("050100") + H("05010001c00002190016"))  # 192.0.2.25:22
        assert await shell.receive(12) == H("0500") + H("05020001000000000000")
        await shell.done.wait()
    assert (shell.record.outcome, shell.record.detail) == (
        "denied",
        "port 22 is not in access.destination_ports",
    )


async def test_an_unknown_pool_gets_02(autojump_clock: trio.testing.MockClock) -> None:
    async with socks5_door() as shell:
        await shell.send(H("05020002") + H("01") + b"\x05other" + b"\x00" + CONNECT_192_0_2_25)
        assert await shell.receive(14) == H("0502") + H("0100") + H("05020001000000000000")
        await shell.done.wait()
    assert shell.record.outcome == "refused"
    assert shell.record.pool == "other"


async def test_refuse_answers_the_greeting_then_01(autojump_clock: trio.testing.MockClock) -> None:
    client_end, door_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        listener = Listener(Endpoint("127.0.0.1", 1080), pool="main")
        refuse = Socks5Door().refuse
        nursery.start_soon(refuse, door_end, Runtime(config()), listener, "overload")  # type: ignore[arg-type]
        await client_end.send_all(H("05020002") + H("01") + b"\x01u\x01p" + CONNECT_192_0_2_25)
        reply = bytearray()
        while len(reply) < 14:
            reply += await client_end.receive_some(14 - len(reply))
    assert bytes(reply) == H("0502") + H("0100") + H("05010001000000000000")
