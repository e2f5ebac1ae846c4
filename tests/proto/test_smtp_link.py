"""The two SMTP machines and the relay core wired together through a fake link.

MTA bytes -> SmtpServer -> RelayCore -> SmtpClient -> remote (another SmtpServer).
:func:`cut_through` is the door's shell in miniature, minus sockets and clocks: it feeds
the server machine's events to the real :class:`~egressd.relay.core.RelayCore` and
executes its commands against an in-memory remote, synchronously.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from egressd.config import Config, Pool, PoolEntry, Source
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
    Helo,
    Mail,
    Quit,
    Rcpt,
    Reply,
    Rset,
)
from egressd.proto.smtp_server import BareLineEnding, CommandError, DataDiscarded, SmtpServer
from egressd.relay.core import RelayCore
from egressd.relay.events import (
    CloseRemote,
    Command,
    Event,
    MtaBareLineEnding,
    MtaBody,
    MtaCommand,
    MtaDataDiscarded,
    MtaEndOfData,
    NextHopResolved,
    OpenRemote,
    Remote,
    RemoteOpened,
    RemoteReplied,
    ReplyMta,
    ResolveNextHop,
    SendRemote,
)

SOURCE = Source("out1", source_address=ipaddress.ip_address("127.0.0.3"))
NEXT_HOP = NextHop(
    "example.net", "mx", (MxHost("mx.example.net", 10, (ipaddress.ip_address("192.0.2.1"),)),)
)


@dataclass
class RemoteMx:
    """A remote MX built from the server machine; refuses the recipients it is told to."""

    refuse: frozenset[str] = frozenset()
    machine: SmtpServer = field(
        default_factory=lambda: SmtpServer(
            extensions=("PIPELINING", "SIZE 1000000", "8BITMIME", "ENHANCEDSTATUSCODES")
        )
    )
    body: bytearray = field(default_factory=bytearray)
    delivered: list[bytes] = field(default_factory=list)
    closed: bool = False

    def connect(self) -> bytes:
        return self.machine.send(Reply.make(220, "mx.example.net ESMTP"))

    def deliver(self, data: bytes) -> bytes:
        """Bytes from the relay in, bytes back out."""
        self.machine.receive_data(data)
        out = bytearray()
        while True:
            event = self.machine.next_event()
            if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
                return bytes(out)
            reply: Reply | None = None
            if isinstance(event, Ehlo):
                reply = self.machine.ehlo_reply("mx.example.net")
            elif isinstance(event, Rcpt) and event.address in self.refuse:
                reply = Reply.make(550, "No such user", event.address, enhanced="5.1.1")
            elif isinstance(event, (Mail, Rcpt, Rset)):
                reply = Reply.make(250, "Ok", enhanced="2.0.0")
            elif isinstance(event, Data):
                reply = Reply.make(354, "End data with <CR><LF>.<CR><LF>")
            elif isinstance(event, DataChunk):
                self.body += event.data
            elif isinstance(event, EndOfData):
                self.delivered.append(bytes(self.body))
                self.body.clear()
                reply = Reply.make(250, "Ok: queued as REMOTE1", enhanced="2.0.0")
            elif isinstance(event, Quit):
                reply = Reply.make(221, "Bye", enhanced="2.0.0")
            elif isinstance(event, CommandError):
                reply = event.reply
            if reply is not None:
                out += self.machine.send(reply)

    def abort(self) -> None:
        """The relay closed the connection (no final dot)."""
        self.machine.receive_data(b"")
        self.deliver(b"")
        self.body.clear()
        self.closed = True


@dataclass
class Link:
    """The shell in miniature: executes the core's commands against ``remote``."""

    remote: RemoteMx
    server: SmtpServer = field(default_factory=SmtpServer)
    client: SmtpClient = field(default_factory=SmtpClient)
    to_mta: bytearray = field(default_factory=bytearray)
    core: RelayCore = field(init=False)

    def __post_init__(self) -> None:
        config = Config(
            path=Path("egressd.toml"),
            sources={"out1": SOURCE},
            pools={"main": Pool("main", (PoolEntry("out1"),))},
        )
        world = _World(config)
        self.core = RelayCore("relay.example", "main", lambda: world)

    def feed(self, event: Event) -> None:
        commands = list(self.core.handle(event))
        while commands:
            result = self.execute(commands.pop(0))
            if result is not None:
                commands += self.core.handle(result)

    def execute(self, command: Command) -> Event | None:
        if isinstance(command, ReplyMta):
            self.to_mta += self.server.send(command.reply)
        elif isinstance(command, OpenRemote):
            return RemoteOpened(self.open())
        elif isinstance(command, ResolveNextHop):
            return NextHopResolved(NEXT_HOP)
        elif isinstance(command, SendRemote):
            wire = b"".join(self.client.send(c) for c in command.commands)
            answer = self.remote.deliver(wire)
            if answer:  # b"" would mean EOF
                self.client.receive_data(answer)
            return RemoteReplied(tuple(self.replies(command.replies_owed)))
        elif isinstance(command, CloseRemote):
            self.remote.abort()
        return None

    def open(self) -> Remote:
        self.client.receive_data(self.remote.connect())
        self.replies(1)  # the greeting
        self.client.receive_data(self.remote.deliver(self.client.send(Ehlo("out1.example"))))
        self.replies(1)
        return Remote(
            source=SOURCE,
            next_hop=NEXT_HOP,
            next_hop_address=(ipaddress.ip_address("192.0.2.1"), 25),
            remote_text="mx.example.net[192.0.2.1]:25",
            describe='source "out1" (127.0.0.3) to mx.example.net[192.0.2.1]:25',
            extensions=dict(self.client.extensions),
        )

    def replies(self, count: int) -> list[Reply]:
        got = []
        for _ in range(count):
            reply = self.client.next_event()
            assert isinstance(reply, Reply), reply
            got.append(reply)
        return got


@dataclass
class _World:
    config: Config
    health: _Health = field(default_factory=lambda: _Health())


class _Health:
    def is_suspended(self, name: str) -> bool:
        return False


def cut_through(mta_wire: bytes, remote: RemoteMx, step: int = 0) -> bytes:
    """Relay one MTA session through ``remote``; return what the MTA receives.

    The MTA's bytes arrive whole, or ``step`` bytes at a time.
    """
    link = Link(remote)
    server = link.server
    link.to_mta += server.send(Reply.make(220, "relay.example ESMTP"))
    pieces = [mta_wire[i : i + step] for i in range(0, len(mta_wire), step)] if step else [mta_wire]
    chunks: list[DataChunk] = []
    server.receive_data(pieces.pop(0))
    while True:
        event = server.next_event()
        if event is NEED_DATA and chunks:
            link.feed(MtaBody(tuple(chunks)))
            chunks = []
        if event is NEED_DATA and pieces:
            server.receive_data(pieces.pop(0))
            continue
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return bytes(link.to_mta)
        if isinstance(event, (Ehlo, Helo)):
            link.feed(MtaCommand(event))
            link.to_mta += server.send(server.ehlo_reply("relay.example"))
        elif isinstance(event, (Mail, Rcpt, Data, Rset, Quit)):
            link.feed(MtaCommand(event))  # the remote's own reply, unchanged
        elif isinstance(event, DataChunk):
            chunks.append(event)
        elif isinstance(event, EndOfData):
            link.feed(MtaEndOfData(tuple(chunks)))
            chunks = []
        elif isinstance(event, BareLineEnding):
            chunks = []
            link.feed(MtaBareLineEnding())  # close without the final dot: nothing delivered
        elif isinstance(event, DataDiscarded):
            link.feed(MtaDataDiscarded(event.reply))
        elif isinstance(event, CommandError):
            link.to_mta += server.send(event.reply)
        else:
            raise AssertionError(f"unexpected {event!r}")


BODY = b"Subject: hello\r\n\r\n..a stuffed dot line\r\nlast line\r\n"


@pytest.mark.parametrize("step", [0, 1, 7], ids=["whole", "bytewise", "step7"])
def test_cut_through_passes_body_and_remote_replies_unchanged(step: int) -> None:
    remote = RemoteMx(refuse=frozenset({"nobody@example.net"}))
    commands = [
        b"EHLO mta.example\r\n",
        b"MAIL FROM:<alice@example.org> SIZE=100 BODY=8BITMIME\r\n",
        b"RCPT TO:<bob@example.net>\r\n",
        b"RCPT TO:<nobody@example.net>\r\n",
        b"DATA\r\n",
    ]
    wire = b"".join(commands) + BODY + b".\r\nQUIT\r\n"
    to_mta = cut_through(wire, remote, step)
    # The remote got the body octet for octet, still dot-stuffed on the wire, unstuffed by
    # its own machine into the same DataChunks: the relay changed nothing.
    assert remote.delivered == [BODY]
    lines = to_mta.split(b"\r\n")
    assert b"550-5.1.1 No such user" in lines
    assert b"550 5.1.1 nobody@example.net" in lines
    assert b"354 End data with <CR><LF>.<CR><LF>" in lines
    assert b"250 2.0.0 Ok: queued as REMOTE1" in lines
    assert to_mta.endswith(b"221 2.0.0 relay.example closing connection\r\n")


@pytest.mark.parametrize("step", [0, 1, 5], ids=["whole", "bytewise", "step5"])
def test_smuggled_end_of_data_never_reaches_the_remote(step: int) -> None:
    remote = RemoteMx()
    wire = (
        b"EHLO mta.example\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: innocent\r\n\r\nhello\n.\r\n"
        b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: forged\r\n\r\n.\r\n"
        b"QUIT\r\n"
    )
    to_mta = cut_through(wire, remote, step)
    assert remote.delivered == []  # neither the innocent nor the forged message
    assert remote.closed
    assert b"550 5.6.11 Bare CR or LF in message data is not allowed\r\n" in to_mta
    assert b"queued" not in to_mta


def test_remote_without_8bitmime_is_refused_before_mail() -> None:
    remote = RemoteMx(machine=SmtpServer(extensions=("PIPELINING", "ENHANCEDSTATUSCODES")))
    wire = b"EHLO mta\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\n"
    to_mta = cut_through(wire + b"QUIT\r\n", remote)
    assert b"554 5.6.3 Remote server does not support 8BITMIME\r\n" in to_mta
    assert remote.machine.in_transaction is False
