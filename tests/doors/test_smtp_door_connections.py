"""The SMTP door's timeouts over real connections (socket pairs), on a fake clock.

The door sets each wait's limit on the stream (``Connection.time_limit``): a
:class:`~egressd.net.connection.Connection` makes a cancel scope only when a call has to
wait, any other stream (the memory streams of ``test_smtp_door_shell``) gets one per call.
The tests of ``test_smtp_door_shell`` that time something run here again, unchanged, with
``door()`` swapped for :func:`connection_door`: the MTA and the remote on socket pairs,
the door's ends wrapped in ``Connection`` as the daemon and the dialer wrap them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import test_smtp_door_shell as shell
import trio
import trio.testing
from test_smtp_door_shell import (
    NEXT_HOP,
    SOURCE,
    Door,
    Mta,
    Remote,
    config,
    in_data,
)

from egressd.config import Endpoint, Listener
from egressd.doors.smtp import MtaSession, SmtpDoor
from egressd.doors.smtp_relay import Relay
from egressd.doors.smtp_remote import RemoteSession
from egressd.net.connection import Connection
from egressd.net.dialer import Dialed
from egressd.proto.smtp_client import SmtpClient
from egressd.proto.smtp_common import Ehlo, Reply
from egressd.proto.smtp_server import SmtpServer
from egressd.relay.events import Event, OpenRemote, RemoteOpened
from egressd.runtime import Runtime, SessionRecord


def socket_pair() -> tuple[Connection, trio.SocketStream]:
    """The door's end as a Connection, the peer's as a trio stream."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(ours), trio.SocketStream(trio.socket.from_stdlib_socket(theirs))


class ConnectionRelay(Relay):
    """A relay whose remotes are :class:`Remote` servers on socket pairs."""

    remote_server: Remote
    nursery: trio.Nursery

    async def open(self, command: OpenRemote) -> Event:
        ours, theirs = socket_pair()
        client, machine = SmtpClient(), SmtpServer(extensions=("PIPELINING", "8BITMIME"))
        machine.send(Reply.make(220, "mx.good.test ESMTP"))  # greeted and EHLO'd already
        client.receive_data(b"220 mx.good.test ESMTP\r\n")
        client.next_event()
        machine.receive_data(client.send(Ehlo("out-a.test")))
        machine.next_event()
        client.receive_data(machine.send(machine.ehlo_reply("mx.good.test")))
        client.next_event()
        self.nursery.start_soon(self.remote_server.serve, theirs, machine)
        dialed = Dialed(
            stream=ours,
            source=SOURCE,
            via="direct",
            local_address=(ipaddress.ip_address("127.0.0.3"), 40000),
            remote_address=(ipaddress.ip_address("192.0.2.1"), 25),
        )
        self.remote = RemoteSession(
            dialed=dialed,
            mx_name="mx.good.test",
            mx_port=25,
            next_hop=NEXT_HOP,
            timeouts=self.runtime.config.smtp.timeouts,
            stream=ours,
            client=client,
        )
        assert self.remote.timed is ours  # the limit is the connection's own
        return RemoteOpened(self.remote.view())


@asynccontextmanager
async def connection_door(
    script: dict[str, str] | None = None,
    smtp_door: SmtpDoor | None = None,
    *,
    runtime: Runtime | None = None,
    client: str = "127.0.0.1:40000",
) -> AsyncIterator[Door]:
    """``test_smtp_door_shell.door`` on socket pairs."""
    runtime = runtime or Runtime(config())
    record = SessionRecord(door="smtp", client=client)
    remote = Remote(script or {})
    door_end, mta_end = socket_pair()
    listener = Listener(Endpoint("127.0.0.1", 2525), pool="main")
    done = trio.Event()
    async with mta_end, trio.open_nursery() as nursery:

        class Shell(ConnectionRelay):
            remote_server = remote

        Shell.nursery = nursery
        session = MtaSession(
            smtp_door or SmtpDoor(), door_end, runtime, listener, record, relay_type=Shell
        )
        assert session.timed is door_end

        async def run() -> None:
            await session.run()
            await door_end.aclose()
            done.set()

        nursery.start_soon(run)
        mta = Mta(mta_end)
        assert await mta.reply() == "220 relay.test ESMTP egressd"
        yield Door(mta, remote, runtime, record, done)
        nursery.cancel_scope.cancel()
    door_end.close()


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
