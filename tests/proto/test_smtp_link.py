"""The two SMTP machines wired together through a fake link: a cut-through relay in miniature.

MTA bytes -> SmtpServer (relay side) -> driver -> SmtpClient -> remote (another SmtpServer).
The driver below is the shape egressd's relay door takes, minus the sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from egressd.proto.smtp_client import SmtpClient, mail_incompatibility
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


@dataclass
class Remote:
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


def cut_through(mta_wire: bytes, remote: Remote, step: int = 0) -> bytes:
    """Relay one MTA session through ``remote``; return what the MTA receives.

    The MTA's bytes arrive whole, or ``step`` bytes at a time.
    """
    server = SmtpServer()
    client = SmtpClient()
    to_mta = bytearray(server.send(Reply.make(220, "relay.example ESMTP")))

    def exchange(command: Ehlo | Mail | Rcpt | Data | Rset | Quit | EndOfData) -> Reply:
        client.receive_data(remote.deliver(client.send(command)))
        reply = client.next_event()
        assert isinstance(reply, Reply)
        return reply

    client.receive_data(remote.connect())
    assert isinstance(client.next_event(), Reply)  # the greeting
    exchange(Ehlo("out1.example"))
    aborted = False

    pieces = [mta_wire[i : i + step] for i in range(0, len(mta_wire), step)] if step else [mta_wire]
    server.receive_data(pieces.pop(0))
    while True:
        event = server.next_event()
        if event is NEED_DATA and pieces:
            server.receive_data(pieces.pop(0))
            continue
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return bytes(to_mta)
        if isinstance(event, (Ehlo, Helo)):
            to_mta += server.send(server.ehlo_reply("relay.example"))
        elif isinstance(event, Mail):
            refusal = mail_incompatibility(event, client.extensions)
            to_mta += server.send(refusal or exchange(event))
        elif isinstance(event, (Rcpt, Data, Rset, EndOfData)):
            to_mta += server.send(exchange(event))  # the remote's own reply, unchanged
        elif isinstance(event, DataChunk):
            if not aborted:
                remote.deliver(client.send(event))  # still dot-stuffed: write as is
        elif isinstance(event, BareLineEnding):
            aborted = True
            remote.abort()  # close without the final dot: nothing gets delivered
        elif isinstance(event, (DataDiscarded, CommandError)):
            to_mta += server.send(event.reply)
        elif isinstance(event, Quit):
            if not aborted:
                exchange(event)
            to_mta += server.send(Reply.make(221, "Bye", enhanced="2.0.0"))
        else:
            raise AssertionError(f"unexpected {event!r}")


BODY = b"Subject: hello\r\n\r\n..a stuffed dot line\r\nlast line\r\n"


@pytest.mark.parametrize("step", [0, 1, 7], ids=["whole", "bytewise", "step7"])
def test_cut_through_passes_body_and_remote_replies_unchanged(step: int) -> None:
    remote = Remote(refuse=frozenset({"nobody@example.net"}))
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
    assert to_mta.endswith(b"221 2.0.0 Bye\r\n")


@pytest.mark.parametrize("step", [0, 1, 5], ids=["whole", "bytewise", "step5"])
def test_smuggled_end_of_data_never_reaches_the_remote(step: int) -> None:
    remote = Remote()
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
    remote = Remote(machine=SmtpServer(extensions=("PIPELINING", "ENHANCEDSTATUSCODES")))
    to_mta = cut_through(b"EHLO mta\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nQUIT\r\n", remote)
    assert b"554 5.6.3 Remote server does not support 8BITMIME\r\n" in to_mta
    assert remote.machine.in_transaction is False
