"""The SMTP door's trio shell over memory streams, on a fake clock.

The MTA is the test, on one end of a ``memory_stream_pair``; the remote is a small SMTP
server built from :class:`~egressd.proto.smtp_server.SmtpServer`, on another, handed to the
relay by :class:`MemoryRelay` (the one place the door opens remotes). Every timeout here
is the door's real one (minutes), applied by the shell with ``trio.fail_after``, and takes
no real time under ``autojump_clock``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import egressd.doors.smtp as smtp_door_module
import egressd.doors.smtp_relay as smtp_relay_module
import egressd.log as egressd_log
from egressd.config import (
    Config,
    Endpoint,
    Listener,
    Pool,
    PoolEntry,
    SmtpSettings,
    SmtpTls,
    Source,
    User,
)
from egressd.doors.smtp import MtaSession, SmtpDoor
from egressd.doors.smtp_relay import Relay
from egressd.doors.smtp_remote import RemoteSession
from egressd.net.dialer import Dialed
from egressd.net.mx import MxHost, NextHop
from egressd.proto.smtp_client import SmtpClient
from egressd.proto.smtp_common import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Mail,
    Quit,
    Rcpt,
    Reply,
    Rset,
)
from egressd.proto.smtp_server import CommandError, SmtpServer
from egressd.relay.events import Event, OpenRemote, RemoteOpened
from egressd.runtime import Runtime, SessionRecord

SOURCE = Source("a", source_address=ipaddress.ip_address("127.0.0.3"), ehlo_domain="out-a.test")
NEXT_HOP = NextHop(
    "good.test", "mx", (MxHost("mx.good.test", 10, (ipaddress.ip_address("192.0.2.1"),)),)
)
HANG = "hang"
RAW = "raw "  # a script value starting so is sent as is, not as a Reply


@dataclass
class Remote:
    """The remote MX: answers every command with 250 (354 to DATA), or as ``script`` says
    (``HANG``: never answer; ``RAW`` + text: that text and CRLF, unchecked); records the body
    and whether the final dot came."""

    script: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    got_final_dot: bool = False
    closed: trio.Event = field(default_factory=trio.Event)
    commands: list[str] = field(default_factory=list)

    async def serve(self, stream: trio.abc.Stream, machine: SmtpServer) -> None:
        try:
            while True:
                event = machine.next_event()
                if event is NEED_DATA or event is PAUSED:
                    machine.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if isinstance(event, ConnectionClosed):
                    return
                reply = self.answer(event)
                if reply == HANG:  # read on, answer nothing, until the relay hangs up
                    while await stream.receive_some(65536):
                        pass
                    return
                if isinstance(reply, Reply):
                    await stream.send_all(machine.send(reply))
                elif isinstance(reply, bytes):
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.closed.set()

    def answer(self, event: object) -> Reply | bytes | str | None:
        step = {Mail: "mail", Rcpt: "rcpt", Data: "data", EndOfData: "dot", Rset: "rset"}.get(
            type(event)
        )
        if isinstance(event, DataChunk):
            self.body += event.data
            return None
        self.commands.append(type(event).__name__.upper())
        if isinstance(event, EndOfData):
            self.got_final_dot = True
        scripted = self.script.get(step or "")
        if scripted == HANG:
            return HANG
        if scripted and scripted.startswith(RAW):
            return scripted[len(RAW) :].encode() + b"\r\n"
        if scripted:
            return Reply(int(scripted[:3]), (scripted[4:],))
        if isinstance(event, Data):
            return Reply.make(354, "go ahead")
        if isinstance(event, Quit):
            return Reply.make(221, "bye", enhanced="2.0.0")
        if isinstance(event, CommandError):
            return event.reply
        return Reply.make(250, "ok", enhanced="2.0.0")


StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]
"""Makes two connected streams: egressd's end, then the peer's (the MTA or a remote)."""


def memory_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    ours, theirs = trio.testing.memory_stream_pair()
    return ours, theirs


class MemoryRelay(Relay):
    """A relay whose remotes are :class:`Remote` servers on ``pair()`` streams (memory
    streams unless :func:`door` is given another :data:`StreamPair`)."""

    remote_server: Remote
    nursery: trio.Nursery
    pair: StreamPair = staticmethod(memory_pair)

    opened: list[trio.abc.Stream]
    """Both ends of every remote opened, closed by :func:`door` at the end."""

    async def open(self, command: OpenRemote) -> Event:
        ours, theirs = self.pair()
        self.opened += (ours, theirs)
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
            stream=ours,  # type: ignore[arg-type]
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
        return RemoteOpened(self.remote.view())


class Mta:
    """The MTA end: send lines, read whole replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return "\n".join(lines) or "EOF"
                self.buffer += chunk
            end = self.buffer.index(b"\r\n")
            line = self.buffer[:end].decode()
            del self.buffer[: end + 2]
            lines.append(line)
            if line[3:4] != "-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.reply()


@dataclass
class Door:
    mta: Mta
    remote: Remote
    runtime: Runtime
    record: SessionRecord
    done: trio.Event
    session: MtaSession


def config() -> Config:
    return Config(
        path=Path("egressd.toml"),
        hostname="relay.test",
        sources={"a": SOURCE},
        pools={"main": Pool("main", (PoolEntry("a"),))},
        smtp=SmtpSettings(max_message_size=0),
    )


def runtime_with(**timeouts: Any) -> Runtime:
    """A runtime whose ``[smtp.timeouts]`` differ from the defaults as given."""
    base = config()
    changed = replace(base.smtp.timeouts, **timeouts)
    return Runtime(replace(base, smtp=replace(base.smtp, timeouts=changed)))


@asynccontextmanager
async def door(
    script: dict[str, str] | None = None,
    smtp_door: SmtpDoor | None = None,
    *,
    runtime: Runtime | None = None,
    client: str = "127.0.0.1:40000",
    pair: StreamPair = memory_pair,
) -> AsyncIterator[Door]:
    """An MTA session on the door's shell, greeted; the remote follows ``script``. The MTA
    and every remote are on ``pair()`` streams."""
    runtime = runtime or Runtime(config())
    record = SessionRecord(door="smtp", client=client)
    remote = Remote(script or {})
    door_end, mta_end = pair()
    listener = Listener(Endpoint("127.0.0.1", 2525), pool="main")
    done = trio.Event()
    async with mta_end, trio.open_nursery() as nursery:

        class Shell(MemoryRelay):
            remote_server = remote

        Shell.nursery = nursery
        Shell.pair = staticmethod(pair)
        Shell.opened = []
        session = MtaSession(
            smtp_door or SmtpDoor(),
            door_end,
            runtime,
            listener,
            record,
            relay_type=Shell,
        )

        async def run() -> None:
            await session.run()
            await door_end.aclose()
            done.set()

        nursery.start_soon(run)
        mta = Mta(mta_end)
        assert await mta.reply() == "220 relay.test ESMTP egressd"  # RFC 2034 4: no 2.0.0
        yield Door(mta, remote, runtime, record, done, session)
        nursery.cancel_scope.cancel()
    for stream in (door_end, *Shell.opened):
        await trio.aclose_forcefully(stream)


async def in_data(mta: Mta) -> None:
    assert (await mta.command("EHLO mta.test")).startswith("250-relay.test")
    assert (await mta.command("MAIL FROM:<a@sender.test>")).startswith("250 2.1.0")
    assert await mta.command("RCPT TO:<one@good.test>") == "250 2.0.0 ok"
    assert await mta.command("DATA") == "354 go ahead"


async def test_a_message_goes_through_and_the_remote_reply_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door({"dot": "250 2.0.0 queued as X1"}) as d:
        await in_data(d.mta)
        await d.mta.stream.send_all(b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
        assert await d.mta.reply() == "250 2.0.0 queued as X1"
        assert await d.mta.command("QUIT") == "221 2.0.0 relay.test closing connection"
        await d.done.wait()
        await d.remote.closed.wait()
    assert bytes(d.remote.body) == b"Subject: hi\r\n\r\n..dot\r\n"
    assert d.remote.commands[-1] == "QUIT"
    assert d.record.outcome == "delivered"
    assert d.record.pool == "main"


# The transaction log line, byte for byte: operators parse it, so a faster rendering must
# not change one character of it (timestamp, order, quoting, the journald prefix, JSON).
LINE_TIME = 1_764_480_001.25
TEXT_LINES = [
    "2025-11-30T05:20:01.250Z info egressd.smtp: transaction client=127.0.0.1:40000 pool=main"
    " source=a local_address=127.0.0.3:40000 mx=mx.good.test"
    " mx_address=mx.good.test[192.0.2.1]:25 tls_policy=opportunistic sender=a@sender.test"
    ' recipients="one@good.test=250" reply="250 2.0.0 queued as X1" size=22 duration=1.5'
    " outcome=delivered",
    "2025-11-30T05:20:01.250Z info egressd.smtp: transaction client=127.0.0.1:40000 pool=main"
    " source=a local_address=127.0.0.3:40000 mx=mx.good.test"
    " mx_address=mx.good.test[192.0.2.1]:25 tls_policy=opportunistic sender=<>"
    ' recipients="one@good.test=250,two@good.test=250" reply="250 2.0.0 queued as X1" size=0'
    " duration=0.0 outcome=delivered",
]


def json_line(line: str, **extra: object) -> str:
    """The JSON form of one of :data:`TEXT_LINES`."""
    head, _, rest = line.partition(" info egressd.smtp: transaction ")
    fields: dict[str, object] = {}
    for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
        text = value.strip('"')
        fields[key] = int(text) if text.isdigit() else float(text) if key == "duration" else text
    obj = {"time": head, "level": "info", "logger": "egressd.smtp", "message": "transaction"}
    return json.dumps(obj | fields | extra)


@pytest.mark.parametrize(
    ("fmt", "journal", "worker"),
    [("text", False, None), ("text", True, None), ("text", False, 2), ("json", False, 2)],
)
async def test_the_transaction_line_is_exactly_what_operators_parse(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    journal: bool,
    worker: int | None,
) -> None:
    monkeypatch.setattr(time, "time", lambda: LINE_TIME)

    async def next_hop(domain: str, version: int | None, config: Config) -> NextHop:
        return NEXT_HOP  # the second message's look-up, on the kept connection

    monkeypatch.setattr(smtp_relay_module, "next_hop", next_hop)
    logger = logging.getLogger(egressd_log.LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    logger.handlers = [egressd_log.make_handler(fmt, journal=journal, stream=stream)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if worker is not None:
        egressd_log.PROCESS_FIELDS["worker"] = worker
    try:
        async with door({"dot": "250 2.0.0 queued as X1"}) as d:
            assert d.session.relay is not None
            d.session.relay.core.clock = trio.current_time  # durations on the fake clock
            await in_data(d.mta)
            await trio.sleep(1.5)
            await d.mta.stream.send_all(b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
            assert await d.mta.reply() == "250 2.0.0 queued as X1"
            assert (await d.mta.command("MAIL FROM:<>")).startswith("250 2.1.0")
            assert await d.mta.command("RCPT TO:<one@good.test>") == "250 2.0.0 ok"
            assert await d.mta.command("RCPT TO:<two@good.test>") == "250 2.0.0 ok"
            assert await d.mta.command("DATA") == "354 go ahead"
            await d.mta.stream.send_all(b".\r\n")
            assert await d.mta.reply() == "250 2.0.0 queued as X1"
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        egressd_log.PROCESS_FIELDS.clear()
    lines = [line for line in stream.getvalue().splitlines() if "transaction" in line]
    tail = "" if worker is None else f" worker={worker}"
    if fmt == "json":
        expected = [json_line(line, worker=worker) for line in TEXT_LINES]
    elif journal:
        expected = ["<6>" + line.split(" ", 1)[1] + tail for line in TEXT_LINES]
    else:
        expected = [line + tail for line in TEXT_LINES]
    assert lines == expected


async def test_an_mta_silent_between_commands_gets_421_after_the_command_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door(runtime=runtime_with(first_mail=600)) as d:  # the first MAIL's is 60 s
        started = trio.current_time()
        assert await d.mta.reply() == "421 4.4.2 relay.test timeout waiting for a command"
        assert trio.current_time() - started == pytest.approx(300)
        assert await d.mta.reply() == "EOF"
    assert d.record.outcome == "timeout"


async def test_an_mta_stalling_mid_data_is_cut_and_the_remote_gets_no_dot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runtime = runtime_with(min_data_rate=0)  # only the data timeout applies
    async with door(smtp_door=SmtpDoor(data_timeout=180), runtime=runtime) as d:
        await in_data(d.mta)
        await d.mta.stream.send_all(b"Subject: stall\r\n\r\nwaiting\r\n")
        started = trio.current_time()
        assert await d.mta.reply() == "421 4.4.2 relay.test timeout waiting for the message body"
        assert trio.current_time() - started == pytest.approx(180)
        await d.remote.closed.wait()
    assert bytes(d.remote.body) == b"Subject: stall\r\n\r\nwaiting\r\n"
    assert not d.remote.got_final_dot


async def test_the_mta_dropping_mid_data_closes_the_remote_without_the_dot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:
        await in_data(d.mta)
        await d.mta.stream.send_all(b"Subject: half\r\n\r\nthe first half\r\n")
        await d.mta.stream.aclose()
        await d.remote.closed.wait()
        await d.done.wait()
    assert bytes(d.remote.body).startswith(b"Subject: half")
    assert not d.remote.got_final_dot
    assert d.record.outcome == "mta disconnected mid-DATA"


@pytest.mark.parametrize(
    ("step", "command", "seconds"), [("rcpt", "RCPT TO", 240), ("data", "DATA", 100)]
)
async def test_a_silent_remote_times_out_into_a_4xx_after_its_smtp_timeout(
    autojump_clock: trio.testing.MockClock, step: str, command: str, seconds: int
) -> None:
    async with door({step: HANG}) as d:
        mta = d.mta
        assert (await mta.command("EHLO mta.test")).startswith("250-relay.test")
        await mta.command("MAIL FROM:<a@sender.test>")
        started = trio.current_time()
        if step == "rcpt":
            reply = await mta.command("RCPT TO:<one@good.test>")
            what = "MAIL FROM and RCPT TO"
        else:
            await mta.command("RCPT TO:<one@good.test>")
            started = trio.current_time()
            reply = await mta.command(command)
            what = command
        assert trio.current_time() - started == pytest.approx(seconds)
        assert reply == (
            f'451 4.4.2 source "a" (127.0.0.3) to mx.good.test[192.0.2.1]:25: no reply to'
            f" {what} within {seconds}s"
        )
        assert await mta.command("RSET") == "250 2.0.0 Reset state"
        await d.remote.closed.wait()


async def test_drain_says_421_to_an_idle_mta_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:
        assert (await d.mta.command("EHLO mta.test")).startswith("250-relay.test")
        started = trio.current_time()
        d.runtime.begin_drain()
        assert await d.mta.reply() == "421 4.3.2 relay.test shutting down; try again later"
        assert trio.current_time() == started
    assert d.record.outcome == "drained"


async def test_drain_waits_for_the_transaction_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:
        await in_data(d.mta)
        d.runtime.begin_drain()
        await trio.sleep(5)
        await d.mta.stream.send_all(b"Subject: late\r\n\r\nstill delivered\r\n.\r\n")
        assert await d.mta.reply() == "250 2.0.0 ok"
        assert (await d.mta.command("MAIL FROM:<a@sender.test>")).startswith("421 4.3.2")
    assert d.remote.got_final_dot


# --------------------------------------------------------------------------- AUTH


def auth_config(*, certificate: bool = False) -> Config:
    tls = SmtpTls(certificate="cert.pem", private_key="key.pem") if certificate else SmtpTls()
    return replace(
        config(),
        auth={"main": User(password="right")},
        smtp=SmtpSettings(max_message_size=0, tls=tls),
    )


def plain(username: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode()).decode()


async def test_wrong_passwords_wait_longer_each_time_and_the_third_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runtime = Runtime(auth_config())
    failures: list[str] = []
    runtime.login_failure_hooks.append(failures.append)
    async with door(runtime=runtime, client="127.0.0.9:4000") as d:
        assert (await d.mta.command("EHLO mta.test")).startswith("250-relay.test")
        for attempt, wait in ((1, 1.0), (2, 2.0)):
            started = trio.current_time()
            reply = await d.mta.command(plain("main", f"guess{attempt}"))
            assert reply == "535 5.7.8 Authentication credentials invalid"
            assert trio.current_time() - started == pytest.approx(wait)
        started = trio.current_time()
        reply = await d.mta.command(plain("nobody", "guess3"))
        assert trio.current_time() - started == pytest.approx(3.0)
        assert reply == "535 5.7.8 Authentication credentials invalid"
        assert await d.mta.reply() == (
            "421 4.7.0 relay.test Error: too many failed authentications"
        )
        assert await d.mta.reply() == "EOF"
        await d.done.wait()
    assert d.record.outcome == "auth failures"
    assert failures == ["smtp"] * 3
    async with door(runtime=runtime, client="127.0.0.9:4001") as d:  # same address: slower
        assert (await d.mta.command("EHLO mta.test")).startswith("250-relay.test")
        started = trio.current_time()
        assert (await d.mta.command(plain("main", "guess4"))).startswith("535 5.7.8")
        assert trio.current_time() - started == pytest.approx(4.0)
        started = trio.current_time()
        assert await d.mta.command(plain("main", "right")) == "235 2.7.0 Authentication succeeded"
        assert trio.current_time() - started == 0
    async with door(runtime=runtime, client="127.0.0.10:4000") as d:  # another address
        assert (await d.mta.command("EHLO mta.test")).startswith("250-relay.test")
        started = trio.current_time()
        assert (await d.mta.command(plain("main", "guess"))).startswith("535 5.7.8")
        assert trio.current_time() - started == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("client", "before_tls"),
    [
        ("192.0.2.7:4000", False),
        ("[2001:db8::7]:4000", False),
        ("127.0.0.1:4000", True),
        ("127.200.0.2:4000", True),
        ("[::1]:4000", True),
        ("[::ffff:127.0.0.5]:4000", True),
    ],
)
async def test_with_a_certificate_auth_waits_for_starttls_except_for_loopback_clients(
    autojump_clock: trio.testing.MockClock, client: str, before_tls: bool
) -> None:
    async with door(runtime=Runtime(auth_config(certificate=True)), client=client) as d:
        ehlo = await d.mta.command("EHLO mta.test")
        assert "250-STARTTLS" in ehlo or "250 STARTTLS" in ehlo
        assert ("AUTH PLAIN LOGIN" in ehlo) == before_tls
        reply = await d.mta.command(plain("main", "right"))
        if before_tls:
            assert reply == "235 2.7.0 Authentication succeeded"
        else:
            assert reply == "530 5.7.0 Must issue a STARTTLS command first"


async def test_without_a_certificate_auth_is_offered_to_everyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door(runtime=Runtime(auth_config()), client="192.0.2.7:4000") as d:
        assert "AUTH PLAIN LOGIN" in await d.mta.command("EHLO mta.test")
        assert await d.mta.command(plain("main", "right")) == "235 2.7.0 Authentication succeeded"


async def test_an_overload_refusal_names_the_configured_host_without_a_lookup(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    def no_lookup() -> str:
        raise AssertionError("the host's FQDN was looked up although hostname is configured")

    monkeypatch.setattr(smtp_door_module, "_fqdn", no_lookup)
    mta_end, door_end = trio.testing.memory_stream_pair()
    listener = Listener(Endpoint("127.0.0.1", 2525), pool="main")
    door = SmtpDoor()
    await door.refuse(door_end, Runtime(config()), listener, "too many connections")  # type: ignore[arg-type]
    line = await mta_end.receive_some()
    assert line == b"421 4.3.2 relay.test too many connections; try again later\r\n"


# --------------------------------------------------------------------------- slow MTAs


async def test_no_mail_transaction_within_a_minute_of_the_greeting_gets_421(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:
        started = trio.current_time()
        for _ in range(5):  # busy, but never a transaction
            await trio.sleep(10)
            assert await d.mta.command("NOOP") == "250 2.0.0 OK"
        assert await d.mta.reply() == "421 4.4.2 relay.test no mail transaction within 60s"
        assert trio.current_time() - started == pytest.approx(60)
        assert await d.mta.reply() == "EOF"
    assert d.record.outcome == "timeout"
    assert d.record.detail == "no mail transaction within 60s of the greeting"


async def test_the_first_mail_deadline_ends_with_the_first_transaction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:
        await trio.sleep(59)
        assert (await d.mta.command("EHLO mta.test")).startswith("250-relay.test")
        assert (await d.mta.command("MAIL FROM:<a@sender.test>")).startswith("250 2.1.0")
        assert await d.mta.command("RSET") == "250 2.0.0 Reset state"
        await trio.sleep(200)  # only the command timeout (300 s) applies now
        assert await d.mta.command("NOOP") == "250 2.0.0 OK"


async def test_the_first_mail_deadline_comes_from_the_configuration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door(runtime=runtime_with(first_mail=5.0)) as d:
        started = trio.current_time()
        assert await d.mta.reply() == "421 4.4.2 relay.test no mail transaction within 5s"
        assert trio.current_time() - started == pytest.approx(5)


async def test_a_body_trickling_below_the_minimum_rate_is_cut_without_the_dot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door() as d:  # min_data_rate 1024 bytes/s, 10 s of credit
        await in_data(d.mta)
        started = trio.current_time()

        async def trickle() -> None:  # 100 bytes/s: far below, yet a read every second
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await d.mta.stream.send_all(b"x" * 98 + b"\r\n")
                    await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            reply = await d.mta.reply()
            nursery.cancel_scope.cancel()
        assert reply == "421 4.4.2 relay.test message body slower than 1024 bytes/s"
        # at 100 B/s, the credit of 10 s plus received/1024 runs out after about 11 s
        assert 10 < trio.current_time() - started < 12
        await d.remote.closed.wait()
    assert not d.remote.got_final_dot
    assert d.record.detail == "the MTA sent the body below 1024 bytes/s"


async def test_a_body_at_the_minimum_rate_goes_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door({"dot": "250 2.0.0 queued"}) as d:
        await in_data(d.mta)
        for _ in range(60):  # a minute at 2 KiB/s
            await d.mta.stream.send_all(b"y" * 2046 + b"\r\n")
            await trio.sleep(1)
        await d.mta.stream.send_all(b".\r\n")
        assert await d.mta.reply() == "250 2.0.0 queued"
    assert d.remote.got_final_dot


async def test_a_remote_breaking_the_protocol_gets_the_mta_a_4xx_naming_the_violation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with door({"rcpt": RAW + "hello"}) as d:
        mta = d.mta
        assert (await mta.command("EHLO mta.test")).startswith("250-relay.test")
        assert (await mta.command("MAIL FROM:<a@sender.test>")).startswith("250 2.1.0")
        reply = await mta.command("RCPT TO:<one@good.test>")
        await d.remote.closed.wait()
        quit_reply = await mta.command("QUIT")
    assert reply == (
        '451 4.4.2 source "a" (127.0.0.3) to mx.good.test[192.0.2.1]:25: protocol violation'
        " in reply to MAIL FROM and RCPT TO: malformed reply line b'hello'"
    )
    assert quit_reply == "221 2.0.0 relay.test closing connection"
