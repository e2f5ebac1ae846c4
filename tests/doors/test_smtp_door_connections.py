"""The SMTP door's timeouts over real connections (socket pairs), on a fake clock.

The door sets each wait's limit on the stream (``Connection.time_limit``): a
:class:`~egressd.net.connection.Connection` makes a cancel scope only when a call has to
wait, any other stream (the memory streams of ``test_smtp_door_shell``) gets one per call.
The tests of ``test_smtp_door_shell`` that time something run here again, unchanged, with
``door()`` swapped for :func:`connection_door`: the MTA and the remote on socket pairs,
the door's ends wrapped in ``Connection`` as the daemon and the dialer wrap them.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
import test_smtp_door_shell as shell
import trio
import trio.testing
from test_smtp_door_shell import (
    Door,
    Remote,
    in_data,
)

from egressd.doors.smtp import SmtpDoor
from egressd.net.connection import Connection, TimedStream
from egressd.proto.smtp_server import SmtpServer
from egressd.runtime import Runtime


def socket_pair() -> tuple[Connection, trio.SocketStream]:
    """The door's end as a Connection, the peer's as a trio stream."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(ours), trio.SocketStream(trio.socket.from_stdlib_socket(theirs))


_door = shell.door  # the tests below swap shell.door for connection_door


def connection_door(
    script: dict[str, str] | None = None,
    smtp_door: SmtpDoor | None = None,
    *,
    runtime: Runtime | None = None,
    client: str = "127.0.0.1:40000",
) -> AbstractAsyncContextManager[Door]:
    """``test_smtp_door_shell.door`` on socket pairs."""
    return _door(script, smtp_door, runtime=runtime, client=client, pair=socket_pair)


async def test_the_door_sets_its_limits_on_the_connections_themselves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Connection is not wrapped (its limits make a scope only for a wait); on memory
    streams each call gets a scope of its own (``TimedStream``)."""
    async with connection_door() as d:
        await in_data(d.mta)
        await d.mta.stream.send_all(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert await d.mta.reply() == "250 2.0.0 ok"
        relay = d.session.relay
        assert relay is not None and relay.remote is not None
        assert isinstance(d.session.timed, Connection)
        assert isinstance(relay.remote.timed, Connection)
    async with shell.door() as d:
        await in_data(d.mta)
        relay = d.session.relay
        assert relay is not None and relay.remote is not None
        assert isinstance(d.session.timed, TimedStream)
        assert isinstance(relay.remote.timed, TimedStream)


TIMED = [
    shell.test_a_message_goes_through_and_the_remote_reply_comes_back,
    shell.test_an_mta_silent_between_commands_gets_421_after_the_command_timeout,
    shell.test_an_mta_stalling_mid_data_is_cut_and_the_remote_gets_no_dot,
    shell.test_the_mta_dropping_mid_data_closes_the_remote_without_the_dot,
    shell.test_drain_says_421_to_an_idle_mta_at_once,
    shell.test_drain_waits_for_the_transaction_in_flight,
    shell.test_no_mail_transaction_within_a_minute_of_the_greeting_gets_421,
    shell.test_the_first_mail_deadline_ends_with_the_first_transaction,
    shell.test_the_first_mail_deadline_comes_from_the_configuration,
    shell.test_a_body_trickling_below_the_minimum_rate_is_cut_without_the_dot,
    shell.test_a_body_at_the_minimum_rate_goes_through,
    shell.test_a_remote_breaking_the_protocol_gets_the_mta_a_4xx_naming_the_violation,
]


@pytest.mark.parametrize("test", TIMED, ids=lambda test: test.__name__[5:])
async def test_the_door_keeps_its_timeouts_over_connections(
    test: Callable[[trio.testing.MockClock], Awaitable[None]],
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setattr(shell, "door", connection_door)
    await test(autojump_clock)


@pytest.mark.parametrize(
    ("step", "command", "seconds"), [("rcpt", "RCPT TO", 240), ("data", "DATA", 100)]
)
async def test_a_silent_remote_times_out_over_connections(
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
    step: str,
    command: str,
    seconds: int,
) -> None:
    monkeypatch.setattr(shell, "door", connection_door)
    await shell.test_a_silent_remote_times_out_into_a_4xx_after_its_smtp_timeout(
        autojump_clock, step, command, seconds
    )


class _DeafAfterData(trio.abc.Stream):
    """The remote's end of the connection: once the remote has answered DATA, it reads
    nothing more, so egressd's writes of the body fill the socket buffers and wait."""

    def __init__(self, stream: trio.abc.Stream, remote: Remote) -> None:
        self.stream = stream
        self.remote = remote

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if "DATA" in self.remote.commands:
            await trio.sleep_forever()
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _StopsReading(Remote):
    async def serve(self, stream: trio.abc.Stream, machine: SmtpServer) -> None:
        await super().serve(_DeafAfterData(stream, self), machine)


async def test_a_remote_that_stops_reading_times_out_while_egressd_writes_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only a real connection fills up: the ``data_block`` deadline cuts the write that
    waits, and the MTA, after its final dot, hears that the sending timed out."""
    runtime = shell.runtime_with(min_data_rate=0)
    async with connection_door(runtime=runtime) as d:
        d.remote.__class__ = _StopsReading
        await in_data(d.mta)
        started = trio.current_time()
        line = b"z" * 998 + b"\r\n"
        for _ in range(64):  # 4 MiB: far more than the socket buffers hold
            await d.mta.stream.send_all(line * 64)
        await d.mta.stream.send_all(b".\r\n")
        reply = await d.mta.reply()
        assert trio.current_time() - started == pytest.approx(150)
    assert reply == (
        '451 4.4.2 source "a" (127.0.0.3) to mx.good.test[192.0.2.1]:25: timed out after'
        " 150s sending the message body"
    )
    assert not d.remote.got_final_dot
