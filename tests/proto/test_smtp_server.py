"""Tests for the sans-IO SMTP server machine (egressd facing the MTA)."""

from __future__ import annotations

import base64
import importlib.util
import itertools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from chunking import SPLITTERS, Splitter, whole
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.buildinfo import is_compiled
from egressd.proto import smtp_server
from egressd.proto.smtp_common import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    Help,
    LocalProtocolError,
    Mail,
    Noop,
    PathSyntaxError,
    Quit,
    Rcpt,
    RemoteProtocolError,
    Reply,
    Rset,
    StartTls,
    Vrfy,
    _parse_path_by_char,
    parse_path,
)
from egressd.proto.smtp_server import (
    AuthChallenge,
    AuthCredentials,
    BareLineEnding,
    CommandError,
    DataDiscarded,
    ServerEvent,
    ServerState,
    SmtpServer,
)

EXTENSIONS = (
    "PIPELINING",
    "SIZE 1000000",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "AUTH PLAIN LOGIN",
)
GREETING = Reply.make(220, "relay.test ESMTP")

# ------------------------------------------------------------------------------ helpers


def respond(server: SmtpServer, event: ServerEvent) -> Reply | None:
    """A driver that accepts everything, as a happy remote would."""
    if isinstance(event, Ehlo):
        return server.ehlo_reply("relay.test")
    if isinstance(event, Helo):
        return Reply.make(250, "relay.test")
    if isinstance(event, Mail):
        return Reply.make(250, "Ok", enhanced="2.1.0")
    if isinstance(event, Rcpt):
        return Reply.make(250, "Ok", enhanced="2.1.5")
    if isinstance(event, Data):
        return Reply.make(354, "End data with <CR><LF>.<CR><LF>")
    if isinstance(event, EndOfData):
        return Reply.make(250, "Ok: queued as ABC", enhanced="2.0.0")
    if isinstance(event, (Rset, Noop)):
        return Reply.make(250, "Ok", enhanced="2.0.0")
    if isinstance(event, Quit):
        return Reply.make(221, "Bye", enhanced="2.0.0")
    if isinstance(event, Vrfy):
        return Reply.make(252, "Cannot VRFY", enhanced="2.1.5")
    if isinstance(event, Help):
        return Reply.make(214, "See RFC 5321", enhanced="2.0.0")
    if isinstance(event, StartTls):
        return Reply.make(220, "Ready to start TLS", enhanced="2.0.0")
    if isinstance(event, AuthChallenge):
        return event.reply
    if isinstance(event, AuthCredentials):
        if (event.username, event.password) == ("user", "secret"):
            return Reply.make(235, "Authentication successful", enhanced="2.7.0")
        return Reply.make(535, "Authentication credentials invalid", enhanced="5.7.8")
    if isinstance(event, (CommandError, DataDiscarded)):
        return event.reply
    return None


#: What a driver sees: the events, and last the error when the MTA broke the protocol.
Seen = ServerEvent | RemoteProtocolError


def merge_chunks(events: Sequence[Seen]) -> list[Seen]:
    """Adjacent DataChunks merged, so event lists compare across chunkings."""
    merged: list[Seen] = []
    for event in events:
        if isinstance(event, DataChunk) and merged and isinstance(merged[-1], DataChunk):
            merged[-1] = DataChunk(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def greeted(
    *,
    extensions: Sequence[str] = EXTENSIONS,
    auth_requires_tls: bool = False,
    max_line: int = 4096,
    max_chunk: int = 65536,
) -> SmtpServer:
    server = SmtpServer(
        extensions=extensions,
        auth_requires_tls=auth_requires_tls,
        max_line=max_line,
        max_chunk=max_chunk,
    )
    assert server.next_event() is PAUSED  # nothing is parsed before the greeting
    assert server.send(GREETING) == b"220 relay.test ESMTP\r\n"
    return server


def run(
    server: SmtpServer,
    pieces: Sequence[bytes],
    responder: Callable[[SmtpServer, ServerEvent], Reply | None] = respond,
    eof: bool = False,
) -> tuple[list[Seen], bytes]:
    """Feed pieces one by one, answering every event as soon as it comes out.

    A RemoteProtocolError ends the list: the machine refused the MTA's bytes.
    """
    events: list[Seen] = []
    out = bytearray()
    for piece in [*(p for p in pieces if p), *([b""] if eof else [])]:
        server.receive_data(piece)
        while True:
            try:
                event = server.next_event()
            except RemoteProtocolError as exc:
                events.append(exc)
                return events, bytes(out)
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "this driver always answers at once"
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events, bytes(out)
            reply = responder(server, event)
            if reply is not None:
                out += server.send(reply)
    return events, bytes(out)


def session(
    *pieces: bytes,
    split: Splitter = whole,
    extensions: Sequence[str] = EXTENSIONS,
    auth_requires_tls: bool = False,
) -> tuple[list[Seen], bytes]:
    server = greeted(extensions=extensions, auth_requires_tls=auth_requires_tls)
    events, out = run(server, split(b"".join(pieces)))
    return merge_chunks(events), out


def state_of(server: SmtpServer) -> ServerState:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return server.state


def replies(out: bytes) -> list[str]:
    return out.decode().split("\r\n")[:-1]


# ------------------------------------------------------------------------------ sessions

FULL_SESSION = (
    b"EHLO mta.example\r\n"
    b"MAIL FROM:<alice@example.org> SIZE=42 BODY=8BITMIME\r\n"
    b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net\r\n"
    b"RCPT TO:<carol@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\nline one\r\n..starts with a dot\r\n.\r\n"
    b"QUIT\r\n"
)


@SPLITTERS
def test_full_session_events_and_replies(split: Splitter) -> None:
    events, out = session(FULL_SESSION, split=split)
    assert events == [
        Ehlo("mta.example"),
        Mail("alice@example.org", {"SIZE": "42", "BODY": "8BITMIME"}),
        Rcpt("bob@example.net", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob@example.net"}),
        Rcpt("carol@example.net"),
        Data(),
        DataChunk(b"Subject: hi\r\n\r\nline one\r\n..starts with a dot\r\n"),
        EndOfData(),
        Quit(),
        ConnectionClosed(),
    ]
    assert replies(out) == [
        "250-relay.test",
        *(f"250-{line}" for line in EXTENSIONS[:-1]),
        f"250 {EXTENSIONS[-1]}",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as ABC",
        "221 2.0.0 Bye",
    ]


def test_pipelined_commands_come_out_before_any_reply() -> None:
    server = greeted()
    server.receive_data(b"EHLO a.example\r\n")
    assert isinstance(server.next_event(), Ehlo)
    server.send(server.ehlo_reply("relay.test"))
    server.receive_data(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\nbody\r\n.\r\n"
    )
    # Four events without a single reply in between (RFC 2920).
    assert server.next_event() == Mail("a@example.org")
    assert server.next_event() == Rcpt("b@example.net")
    assert server.next_event() == Rcpt("c@example.net")
    assert server.next_event() == Data()
    # What follows DATA is body or commands depending on the reply: wait for it.
    assert server.next_event() is PAUSED
    assert server.owed_replies == 4
    out = b"".join(server.send(Reply.make(250, "Ok")) for _ in range(3))
    assert out == b"250 Ok\r\n" * 3
    assert server.next_event() is PAUSED
    server.send(Reply(354, ("go ahead",)))
    assert state_of(server) is ServerState.DATA
    assert server.next_event() == DataChunk(b"body\r\n")
    assert server.next_event() == EndOfData()


def test_commands_after_end_of_data_are_parsed_before_its_reply() -> None:
    server = greeted()
    run(server, [b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"])
    server.receive_data(b"x\r\n.\r\nQUIT\r\n")
    assert server.next_event() == DataChunk(b"x\r\n")
    assert server.next_event() == EndOfData()
    assert server.next_event() == Quit()
    assert server.next_event() is PAUSED  # nothing is parsed after QUIT
    assert server.send(Reply.make(250, "queued")) == b"250 queued\r\n"
    assert server.send(Reply.make(221, "bye")) == b"221 bye\r\n"
    assert state_of(server) is ServerState.CLOSED
    assert server.next_event() == ConnectionClosed()


@SPLITTERS
def test_rset_then_second_transaction(split: Splitter) -> None:
    events, out = session(
        b"HELO mta\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.z>\r\nRSET\r\n"
        b"RCPT TO:<x@y.z>\r\n"  # no transaction any more
        b"MAIL FROM:<a@b.c>\r\nRCPT TO:<postmaster>\r\nDATA\r\n.\r\n",
        split=split,
    )
    assert events == [
        Helo("mta"),
        Mail(""),
        Rcpt("x@y.z"),
        Rset(),
        CommandError(Reply.make(503, "Need MAIL command", enhanced="5.5.1"), "RCPT"),
        Mail("a@b.c"),
        Rcpt("postmaster"),
        Data(),
        EndOfData(),  # an empty message: no chunk at all
    ]
    assert b"503 5.5.1 Need MAIL command\r\n" in out


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a@b.c>", "503 5.5.1 Send EHLO or HELO first"),
        (b"RCPT TO:<a@b.c>", "503 5.5.1 Send EHLO or HELO first"),
        (b"DATA", "503 5.5.1 Send EHLO or HELO first"),
        (b"FOO bar", "500 5.5.2 Command unrecognized"),
        (b"EXPN list", "502 5.5.1 Command not implemented"),
        (b"HELO", "501 5.5.4 Syntax: HELO hostname"),
        (b"EHLO a b", "501 5.5.4 Syntax: EHLO hostname"),
        (b"VRFY", "501 5.5.4 Syntax: VRFY string"),
        (b"QUIT now", "501 5.5.4 Syntax: QUIT"),
        (b"NOOP\x00", "500 5.5.2 Bare CR, LF or control character in command"),
        (b"NOOP a\nRSET", "500 5.5.2 Bare CR, LF or control character in command"),
        (b"NOOP \xff", "500 5.5.2 Command is not valid UTF-8"),
    ],
)
def test_refused_commands_before_hello(line: bytes, reply: str) -> None:
    events, out = session(line + b"\r\n")
    assert len(events) == 1 and isinstance(events[0], CommandError)
    assert replies(out) == [reply]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        (b"RCPT TO:<a@b.c>", "503 5.5.1 Need MAIL command"),
        (b"DATA", "503 5.5.1 Need MAIL command"),
        (b"MAIL FROM:<a@b.c>\r\nDATA", "503 5.5.1 Need RCPT command"),
        (b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>", "503 5.5.1 Nested MAIL command"),
        (b"MAIL FROM:a@b.c", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL TO:<a@b.c>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<a b@c.d>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<nobody>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a@b.c>x", "501 5.5.4 Syntax error after the address"),
        (b"MAIL FROM:<a@b.c> FOO=1", "555 5.5.4 Unsupported parameter FOO"),
        (
            b"MAIL FROM:<a@b.c> SIZE=1000001",
            "552 5.3.4 Message size exceeds fixed maximum message size",
        ),
        (b"MAIL FROM:<a@b.c> SIZE=big", "501 5.5.4 SIZE needs a number"),
        (b"MAIL FROM:<a@b.c> BODY=BINARYMIME", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
        (b"MAIL FROM:<a@b.c> SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
        (b"MAIL FROM:<a@b.c> RET=ALL", "501 5.5.4 RET must be FULL or HDRS"),
        (
            b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2",
            "501 5.5.4 Invalid parameter: parameter SIZE given twice",
        ),
        ("MAIL FROM:<jörg@b.c>".encode(), "553 5.6.7 Non-ASCII address needs SMTPUTF8"),
        (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
        (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<bob>", "501 5.1.3 Bad recipient address syntax"),
        (
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<b@c.d> NOTIFY=NEVER,DELAY",
            "501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY",
        ),
        (
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<b@c.d> ORCPT=rfc822",
            "501 5.5.4 ORCPT must be addr-type;xtext",
        ),
        (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<b@c.d>\r\nDATA now", "501 5.5.4 Syntax: DATA"),
        (
            b"MAIL FROM:<a@b.c>\r\nSTARTTLS",
            "503 5.5.1 STARTTLS not permitted during a mail transaction",
        ),
    ],
)
def test_refused_commands_in_session(lines: bytes, reply: str) -> None:
    events, out = session(b"EHLO mta\r\n" + lines + b"\r\n")
    assert isinstance(events[-1], CommandError)
    assert events[-1].reply.to_bytes().decode() == reply + "\r\n"
    assert replies(out)[-1] == reply


def test_params_need_ehlo() -> None:
    _events, out = session(b"HELO mta\r\nMAIL FROM:<a@b.c> SIZE=10\r\n")
    assert replies(out)[-1] == "555 5.5.4 Parameters need EHLO"


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"mail from:<a@b.c>", Mail("a@b.c")),
        (b"Mail From: <a@b.c>", Mail("a@b.c")),
        (b"MAIL FROM:<>", Mail("")),
        (b"MAIL FROM:<@relay.example,@r2.example:a@b.c>", Mail("a@b.c")),
        (b'MAIL FROM:<"a b>c"@b.c>', Mail('"a b>c"@b.c')),
        (
            b"MAIL FROM:<a@b.c> size=10 body=7bit smtputf8 ret=HDRS envid=x+2By",
            Mail(
                "a@b.c",
                {"SIZE": "10", "BODY": "7bit", "SMTPUTF8": None, "RET": "HDRS", "ENVID": "x+2By"},
            ),
        ),
        (
            "MAIL FROM:<jörg@bü.example> SMTPUTF8".encode(),
            Mail("jörg@bü.example", {"SMTPUTF8": None}),
        ),
    ],
)
def test_mail_syntax_accepted(line: bytes, event: Mail) -> None:
    events, _ = session(b"EHLO mta\r\n" + line + b"\r\n")
    assert events == [Ehlo("mta"), event]
    assert isinstance(events[1], Mail)
    assert dict(events[1].params) == dict(event.params)


def test_rejected_mail_is_remembered() -> None:
    """The remote refused MAIL: RCPT is then out of sequence (the reply decides the state)."""
    server = greeted()
    run(server, [b"EHLO mta\r\n"])
    server.receive_data(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert server.next_event() == Mail("a@b.c")
    server.send(Reply.make(550, "Sender refused", enhanced="5.7.1"))
    assert not server.in_transaction
    event = server.next_event()
    assert isinstance(event, CommandError)
    assert event.reply == Reply.make(503, "Need MAIL command", enhanced="5.5.1")


def test_batched_rcpt_after_refused_mail_is_checked_against_the_replies() -> None:
    """A driver that pulls events before replying gets optimistic checks, then exact ones."""
    server = greeted()
    run(server, [b"EHLO mta\r\n"])
    server.receive_data(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    assert server.next_event() == Mail("a@b.c")
    assert server.next_event() == Rcpt("d@e.f")  # MAIL not answered yet: assumed fine
    server.send(Reply.make(550, "no", enhanced="5.7.1"))
    server.send(Reply.make(503, "remote says bad sequence", enhanced="5.5.1"))
    event = server.next_event()  # DATA is now checked against the real state
    assert isinstance(event, CommandError) and event.reply.code == 503


# ------------------------------------------------------------------------------ AUTH


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@SPLITTERS
@pytest.mark.parametrize(
    "dialogue",
    [
        b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n",
        b"AUTH PLAIN\r\n" + b64(b"\0user\0secret") + b"\r\n",
        b"AUTH LOGIN\r\n" + b64(b"user") + b"\r\n" + b64(b"secret") + b"\r\n",
        b"auth login " + b64(b"user") + b"\r\n" + b64(b"secret") + b"\r\n",
    ],
    ids=["plain-ir", "plain-334", "login", "login-ir"],
)
def test_auth_success(split: Splitter, dialogue: bytes) -> None:
    server = greeted()
    events, out = run(server, split(b"EHLO mta\r\n" + dialogue + b"MAIL FROM:<a@b.c>\r\n"))
    credentials = [e for e in events if isinstance(e, AuthCredentials)]
    assert len(credentials) == 1
    assert (credentials[0].username, credentials[0].password) == ("user", "secret")
    assert "secret" not in repr(credentials[0])
    assert server.authenticated
    challenges = [e.reply.to_bytes() for e in events if isinstance(e, AuthChallenge)]
    expected = {
        b"AUTH PLAIN ": [],
        b"AUTH PLAIN\r": [b"334\r\n"],
        b"AUTH LOGIN\r": [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"],
        b"auth login ": [b"334 UGFzc3dvcmQ6\r\n"],
    }
    assert challenges == next(v for k, v in expected.items() if dialogue.startswith(k))
    assert replies(out)[-2:] == ["235 2.7.0 Authentication successful", "250 2.1.0 Ok"]


@pytest.mark.parametrize(
    ("dialogue", "reply"),
    [
        (b"AUTH PLAIN !!!\r\n", "501 5.5.2 Cannot Base64-decode client response"),
        (b"AUTH PLAIN\r\n!!!\r\n", "501 5.5.2 Cannot Base64-decode client response"),
        (b"AUTH PLAIN\r\n*\r\n", "501 5.0.0 Authentication cancelled"),
        (b"AUTH LOGIN\r\n" + b64(b"user") + b"\r\n*\r\n", "501 5.0.0 Authentication cancelled"),
        (b"AUTH PLAIN " + b64(b"user:secret") + b"\r\n", "501 5.5.2 Malformed PLAIN response"),
        (b"AUTH CRAM-MD5\r\n", "504 5.5.4 Unrecognized authentication type"),
        (b"AUTH\r\n", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        (
            b"AUTH PLAIN " + b64(b"\0user\0wrong") + b"\r\n",
            "535 5.7.8 Authentication credentials invalid",
        ),
    ],
)
def test_auth_failures(dialogue: bytes, reply: str) -> None:
    server = greeted()
    _events, out = run(server, [b"EHLO mta\r\n" + dialogue + b"NOOP\r\n"])
    assert replies(out)[-2:] == [reply, "250 2.0.0 Ok"]  # back to commands afterwards
    assert not server.authenticated


def test_auth_sequence_rules() -> None:
    ok = b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n"
    _, out = session(b"HELO mta\r\n" + ok)
    assert replies(out)[-1] == "503 5.5.1 Send EHLO first"
    _, out = session(b"EHLO mta\r\n" + ok + ok)
    assert replies(out)[-1] == "503 5.5.1 Already authenticated"
    _, out = session(b"EHLO mta\r\n" + ok, extensions=("PIPELINING",))
    assert replies(out)[-1] == "502 5.5.1 Command not implemented"
    _, out = session(b"EHLO mta\r\n" + ok, auth_requires_tls=True)
    assert replies(out)[-1] == "530 5.7.0 Must issue a STARTTLS command first"


def test_334_only_answers_a_challenge() -> None:
    server = greeted()
    run(server, [b"EHLO mta\r\n"])
    server.receive_data(b"NOOP\r\n")
    assert server.next_event() == Noop()
    with pytest.raises(LocalProtocolError):
        server.send(Reply(334, ("",)))


# ------------------------------------------------------------------------------ line limits


@SPLITTERS
def test_overlong_line_is_refused_once_then_parsing_resumes(split: Splitter) -> None:
    long_line = b"NOOP " + b"x" * 5000 + b"\r\n"
    events, out = session(b"EHLO mta\r\n" + long_line + b"RSET\r\n", split=split)
    assert events == [
        Ehlo("mta"),
        CommandError(Reply.make(500, "Line too long", enhanced="5.5.2")),
        Rset(),
    ]
    assert replies(out)[-2:] == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_line_at_the_cap_is_accepted() -> None:
    server = greeted(max_line=100)
    line = b"NOOP " + b"x" * 95
    assert len(line) == 100
    events, _ = run(server, [line + b"\r\n", b"NOOP " + b"y" * 96 + b"\r\n"])
    assert events[0] == Noop("x" * 95)
    assert isinstance(events[1], CommandError) and events[1].reply.code == 500


def test_overlong_line_split_at_its_cr_resyncs_at_the_crlf() -> None:
    server = greeted(max_line=64)
    events, _ = run(server, [b"x" * 200 + b"\r", b"\nNOOP\r\n"])
    assert [type(e) for e in events] == [CommandError, Noop]


# ------------------------------------------------------------------------------ the body


def in_data(max_chunk: int = 65536) -> SmtpServer:
    server = greeted(max_chunk=max_chunk)
    events, _ = run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"])
    assert events[-1] == Data()
    assert state_of(server) is ServerState.DATA
    return server


def body_events(body: bytes, split: Splitter = whole) -> list[Seen]:
    server = in_data()
    events, _ = run(server, split(body))
    return merge_chunks(events)


@SPLITTERS
@pytest.mark.parametrize(
    "body",
    [
        b"Subject: x\r\n\r\nhello\r\n",
        b"..leading dot\r\n..\r\n.x\r\n...\r\n",  # dot-stuffed lines pass on stuffed
        b"\r\n",
        b"",
        b"a" * 5000 + b"\r\n",  # over RFC 5321's 1000 octets: allowed
        "ünïcode\r\n".encode(),
    ],
)
def test_clean_body_is_passed_on_exactly(split: Splitter, body: bytes) -> None:
    events = body_events(body + b".\r\nQUIT\r\n", split)
    expected_chunks = [DataChunk(body)] if body else []
    assert events == [*expected_chunks, EndOfData(), Quit(), ConnectionClosed()]


SMUGGLING = [
    b"a\n.\r\nMAIL FROM:<evil@x.y>\r\n",
    b"a\n.\nMAIL FROM:<evil@x.y>\r\n",
    b"a\r.\rMAIL FROM:<evil@x.y>\r\n",
    b"a\r\n.\nMAIL FROM:<evil@x.y>\r\n",
    b"a\r\n.\r MAIL FROM:<evil@x.y>\r\n",
    b"a\n\n.\n\nMAIL FROM:<evil@x.y>\r\n",
    b"\n.\r\n",
    b".\n",
    b"\r\r\n",
    b"a\rb\r\n",
]


@SPLITTERS
@pytest.mark.parametrize("smuggled", SMUGGLING)
def test_bare_cr_or_lf_never_ends_data_and_refuses_the_message(
    split: Splitter, smuggled: bytes
) -> None:
    server = in_data()
    events, out = run(server, split(b"Subject: x\r\n\r\n" + smuggled + b"more\r\n.\r\nRSET\r\n"))
    events = merge_chunks(events)
    kinds = [type(e) for e in events]
    assert kinds == [DataChunk, BareLineEnding, DataDiscarded, Rset]
    chunk = events[0]
    assert isinstance(chunk, DataChunk)
    # Only a clean prefix was let out: no bare CR or LF ever goes toward the remote.
    assert (b"Subject: x\r\n\r\n" + smuggled).startswith(chunk.data)
    assert b"\r" not in chunk.data.replace(b"\r\n", b"")
    assert b"\n" not in chunk.data.replace(b"\r\n", b"")
    assert not any(isinstance(e, Mail) for e in events)
    assert replies(out) == [
        "550 5.6.11 Bare CR or LF in message data is not allowed",
        "250 2.0.0 Ok",
    ]


def test_every_split_position_gives_the_same_chunks() -> None:
    wire = b"x\r\n.y\r\n\r\n...\r\n.\r\nNOOP\r\n"
    for split_at in range(len(wire) + 1):
        events = merge_chunks(run(in_data(), [wire[:split_at], wire[split_at:]])[0])
        assert events == [DataChunk(b"x\r\n.y\r\n\r\n...\r\n"), EndOfData(), Noop()], split_at


def test_smuggling_transcript_split_at_every_position() -> None:
    wire = b"a\r\n.\nb\n.\r\nc\r\n.\r\nNOOP\r\n"
    for split_at in range(len(wire) + 1):
        events = merge_chunks(run(in_data(), [wire[:split_at], wire[split_at:]])[0])
        assert events == [
            DataChunk(b"a\r\n."),  # all before the first bare LF
            BareLineEnding(
                Reply.make(550, "Bare CR or LF in message data is not allowed", enhanced="5.6.11")
            ),
            DataDiscarded(
                Reply.make(550, "Bare CR or LF in message data is not allowed", enhanced="5.6.11")
            ),
            Noop(),
        ], split_at


def test_big_body_streams_in_bounded_chunks() -> None:
    server = in_data(max_chunk=8192)
    line = b"x" * 998 + b"\r\n"
    body = line * 5000  # 5 MB
    fed = 0
    emitted = 0
    sizes = []
    for start in range(0, len(body), 65536):
        piece = body[start : start + 65536]
        server.receive_data(piece)
        fed += len(piece)
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, DataChunk)
            sizes.append(len(event.data))
            emitted += len(event.data)
        # Everything that arrived came out, but a possibly final ".\r" or a lone "\r".
        assert fed - emitted <= 2
    assert emitted == len(body)
    assert max(sizes) <= 8192
    server.receive_data(b".\r\n")
    assert server.next_event() == EndOfData()


PATH_TOKENS = ["<", ">", "@", ":", '"', "\\", " ", "\x00", "\x7f", "a", "b.c", "ü", ".", ","]


def _parse_or_error(parse: Callable[[str, int], tuple[str, int]], text: str) -> object:
    try:
        return parse(text, 0)
    except PathSyntaxError as exc:
        return str(exc)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PATH_TOKENS), max_size=20))
def test_path_fast_match_agrees_with_the_character_loop(tokens: list[str]) -> None:
    """parse_path's one-regex shortcut gives what the character loop gives, errors included."""
    text = "".join(tokens)
    assert _parse_or_error(parse_path, text) == _parse_or_error(_parse_path_by_char, text)
    assert _parse_or_error(parse_path, "<" + text) == _parse_or_error(
        _parse_path_by_char, "<" + text
    )


def python_smtp_server() -> type[SmtpServer]:
    """SmtpServer as Python runs it: the class itself, or, when mypyc compiled its module
    (scripts/test's compiled pass), the class from the module's .py loaded afresh, since a
    Python class cannot subclass a compiled one. That copy's other classes (events, states)
    are swapped for the compiled module's, so both servers' events are of the same classes
    and compare equal. The reference below then walks in Python what the compiled scan does
    in C."""
    if not is_compiled(smtp_server):
        return SmtpServer
    source = Path(str(smtp_server.__file__)).with_name("smtp_server.py")
    spec = importlib.util.spec_from_file_location("python_smtp_server", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    for name, value in vars(module).items():
        if isinstance(value, type) and value.__module__ == spec.name and name != "SmtpServer":
            setattr(module, name, getattr(smtp_server, name))
    python: type[SmtpServer] = module.SmtpServer
    return python


def path_by_path_smtp_server() -> type[SmtpServer]:
    """A fresh Python copy of the server whose one-match MAIL and RCPT shortcuts never
    match, so every address goes the long way (the prefix, then parse_path); its other
    classes are the tested module's, so both servers' events compare equal."""
    source = Path(str(smtp_server.__file__)).with_name("smtp_server.py")
    spec = importlib.util.spec_from_file_location("path_by_path_smtp_server", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for name, value in vars(module).items():
        if isinstance(value, type) and value.__module__ == spec.name and name != "SmtpServer":
            setattr(module, name, getattr(smtp_server, name))
    never = re.compile(r"(?!)")
    setattr(module, "_PLAIN_FROM_RE", never)  # noqa: B010 (a module's private name)
    setattr(module, "_PLAIN_TO_RE", never)  # noqa: B010
    reference: type[SmtpServer] = module.SmtpServer
    return reference


PathByPathServer = path_by_path_smtp_server()
ADDRESS_PREFIXES = ["FROM:", "from: ", "From:  ", "TO:", "to:", "To: ", "FROM", "TO:x"]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(ADDRESS_PREFIXES),
    st.sampled_from(ADDRESS_PREFIXES),
    st.lists(st.sampled_from(PATH_TOKENS), max_size=12),
    st.lists(st.sampled_from(PATH_TOKENS), max_size=12),
    st.sampled_from(["", " SIZE=10", " NOTIFY=NEVER", "x", " "]),
)
def test_mail_and_rcpt_shortcuts_give_what_parse_path_gives(
    mail_prefix: str, rcpt_prefix: str, sender: list[str], recipient: list[str], tail: str
) -> None:
    """MAIL and RCPT settle a plain address with one match: for any argument the events
    and replies are those of the long way (the prefix, then parse_path)."""
    wire = (
        f"EHLO mta\r\nMAIL {mail_prefix}<{''.join(sender)}{tail}\r\n"
        f"MAIL FROM:<a@b.c>\r\nRCPT {rcpt_prefix}<{''.join(recipient)}{tail}\r\n"
    )
    data = wire.encode("utf-8", "surrogateescape")
    results = []
    for machine in (SmtpServer, PathByPathServer):
        server = machine(extensions=EXTENSIONS)
        server.send(GREETING)
        results.append(run(server, [data]))
    assert results[0] == results[1]


class LineByLineServer(python_smtp_server()):  # type: ignore[misc]
    """The reference: every body window walked line by line, as before the whole-window
    scan (``_clean_end`` is the fast path; None sends every window to the walk)."""

    def _clean_end(self, data: bytearray, start: int) -> int | None:
        return None


BODY_TOKENS = [b"a", b"xyz", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.\r\n", b".\r"]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(BODY_TOKENS), max_size=60),
    st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20),
    st.integers(min_value=64, max_value=130),
    st.booleans(),
)
def test_body_scan_gives_the_events_of_the_line_by_line_walk(
    tokens: list[bytes], steps: list[int], max_chunk: int, eof: bool
) -> None:
    """The whole-window scan and the per-line walk agree on every body, split anywhere:
    the same octets let out, the same place for a bare CR or LF, the same end of data."""
    wire = b"Subject: x\r\n" + b"".join(tokens) + b"\r\n.\r\nNOOP\r\n"
    pieces, pos = [], 0
    for step in itertools.cycle(steps):
        if pos >= len(wire):
            break
        pieces.append(wire[pos : pos + step])
        pos += step
    results = []
    for machine in (SmtpServer, LineByLineServer):
        server = machine(extensions=EXTENSIONS, max_chunk=max_chunk)
        server.send(GREETING)
        run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"])
        events, out = run(server, pieces, eof=eof)
        sizes = [len(e.data) for e in events if isinstance(e, DataChunk)]
        assert all(0 < size <= max_chunk for size in sizes)
        results.append((merge_chunks(events), out))
    assert results[0] == results[1]


def test_body_fed_whole_still_comes_out_in_chunks() -> None:
    server = in_data(max_chunk=4096)
    body = (b"y" * 100 + b"\r\n") * 3000
    events, _ = run(server, [body + b".\r\n"])
    chunks = [e for e in events if isinstance(e, DataChunk)]
    assert len(chunks) > 70
    assert all(len(c.data) <= 4096 for c in chunks)
    assert b"".join(c.data for c in chunks) == body
    assert events[-1] == EndOfData()


def test_data_refused_by_the_remote_keeps_command_mode() -> None:
    server = greeted()
    run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"])
    server.receive_data(b"DATA\r\nNOOP\r\n")
    assert server.next_event() == Data()
    assert server.next_event() is PAUSED
    server.send(Reply.make(554, "No valid recipients", enhanced="5.5.1"))
    assert state_of(server) is ServerState.COMMAND
    assert server.next_event() == Noop()  # the line after DATA is a command after all


def test_354_only_answers_data() -> None:
    server = greeted()
    run(server, [b"EHLO mta\r\n"])
    server.receive_data(b"MAIL FROM:<a@b.c>\r\n")
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Reply(354, ("go",)))


# ------------------------------------------------------------------------------ STARTTLS


def test_starttls_resets_the_session() -> None:
    server = greeted()
    events, out = run(server, [b"EHLO mta\r\nSTARTTLS\r\n"])
    assert events[-1] == StartTls()
    assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert state_of(server) is ServerState.TLS
    server.start_tls()
    assert server.tls_active and state_of(server) is ServerState.COMMAND
    assert "STARTTLS" not in server.ehlo_reply("relay.test").lines
    events, out = run(server, [b"MAIL FROM:<a@b.c>\r\nEHLO mta\r\nSTARTTLS\r\n"])
    assert replies(out)[0] == "503 5.5.1 Send EHLO or HELO first"
    assert replies(out)[-1] == "503 5.5.1 TLS already active"


def test_starttls_command_injection_is_detected() -> None:
    server = greeted()
    run(server, [b"EHLO mta\r\n"])
    server.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.y>\r\n")
    assert server.next_event() == StartTls()
    server.send(Reply.make(220, "Ready to start TLS"))
    assert state_of(server) is ServerState.TLS
    with pytest.raises(RemoteProtocolError):
        server.start_tls()
    with pytest.raises(RemoteProtocolError) as raised:
        server.next_event()
    assert "STARTTLS" in raised.value.description
    assert raised.value.reply is None
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value is raised.value  # sticky
    assert state_of(server) is ServerState.ERROR


def test_starttls_injection_seen_by_a_driver_that_reads_on() -> None:
    server = greeted()
    events, _ = run(server, [b"EHLO mta\r\nSTARTTLS\r\nMAIL FROM:<evil@x.y>\r\n"])
    assert events[-2] == StartTls()
    assert isinstance(events[-1], RemoteProtocolError)
    assert "STARTTLS" in events[-1].description
    assert not any(isinstance(e, Mail) for e in events)


def test_plaintext_after_starttls_reply_is_a_violation() -> None:
    server = greeted()
    run(server, [b"EHLO mta\r\nSTARTTLS\r\n"])
    server.receive_data(b"RSET\r\n")
    with pytest.raises(RemoteProtocolError, match="plaintext pipelined after STARTTLS"):
        server.next_event()
    assert state_of(server) is ServerState.ERROR


def test_auth_requires_tls_advertises_auth_only_after_tls() -> None:
    server = greeted(auth_requires_tls=True)
    assert "AUTH PLAIN LOGIN" not in server.ehlo_reply("r").lines
    run(server, [b"EHLO mta\r\nSTARTTLS\r\n"])
    server.start_tls()
    assert "AUTH PLAIN LOGIN" in server.ehlo_reply("r").lines
    _events, out = run(server, [b"EHLO mta\r\nAUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n"])
    assert replies(out)[-1] == "235 2.7.0 Authentication successful"


def test_requiretls_is_offered_and_accepted_only_over_tls() -> None:
    """RFC 8689: REQUIRETLS appears after STARTTLS only, and so does the
    MAIL parameter; it takes no value."""
    server = greeted(extensions=(*EXTENSIONS, "STARTTLS", "REQUIRETLS"))
    assert "REQUIRETLS" not in server.ehlo_reply("r").lines
    _events, out = run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c> REQUIRETLS\r\n"])
    assert replies(out)[-1] == "555 5.5.4 Unsupported parameter REQUIRETLS"
    run(server, [b"STARTTLS\r\n"])
    server.start_tls()
    assert "REQUIRETLS" in server.ehlo_reply("r").lines
    events, out = run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c> REQUIRETLS\r\n"])
    assert Mail("a@b.c", {"REQUIRETLS": None}) in events
    _events, out = run(server, [b"RSET\r\nMAIL FROM:<a@b.c> REQUIRETLS=yes\r\n"])
    assert replies(out)[-1] == "501 5.5.4 REQUIRETLS takes no value"


def test_starttls_not_offered() -> None:
    _, out = session(b"EHLO mta\r\nSTARTTLS\r\n", extensions=("PIPELINING",))
    assert replies(out)[-1] == "502 5.5.1 Command not implemented"


# ------------------------------------------------------------------------------ closing


def test_421_at_any_time_closes() -> None:
    server = in_data()
    server.receive_data(b"half a bo")
    assert server.next_event() == DataChunk(b"half a bo")
    assert server.send(Reply.make(421, "Shutting down", enhanced="4.3.2")) == (
        b"421 4.3.2 Shutting down\r\n"
    )
    assert state_of(server) is ServerState.CLOSED
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        server.send(Reply.make(250, "too late"))


def test_421_as_greeting() -> None:
    server = SmtpServer()
    assert server.send(Reply.make(421, "busy")) == b"421 busy\r\n"
    assert server.next_event() == ConnectionClosed()


def test_554_greeting_answers_503_until_quit() -> None:
    server = SmtpServer()
    server.send(Reply.make(554, "No SMTP service here", enhanced="5.3.0"))
    _events, out = run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n"])
    assert replies(out) == [
        "503 5.5.1 No service here; send QUIT",
        "503 5.5.1 No service here; send QUIT",
        "221 2.0.0 Bye",
    ]


@pytest.mark.parametrize(
    "tail", [b"", b"NOOP", b"NOOP\r", b"DATA\r\n"], ids=["idle", "partial", "cr", "paused"]
)
def test_eof_is_reported(tail: bytes) -> None:
    server = greeted()
    _events, _ = run(
        server,
        [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"],
    )
    server.receive_data(tail)
    if tail == b"DATA\r\n":
        assert server.next_event() == Data()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_eof_inside_the_body() -> None:
    server = in_data()
    events, _ = run(server, [b"partial line\r"], eof=True)
    assert events == [DataChunk(b"partial line"), ConnectionClosed()]


def test_send_misuse() -> None:
    server = SmtpServer()
    with pytest.raises(LocalProtocolError):
        server.send(Reply.make(250, "not a greeting"))
    server.send(GREETING)
    with pytest.raises(LocalProtocolError):
        server.send(Reply.make(250, "nothing was asked"))
    with pytest.raises(LocalProtocolError):
        server.start_tls()


# ------------------------------------------------------------------------------ properties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_any_bytes_give_events_or_a_refusal(pieces: list[bytes]) -> None:
    server = greeted(max_line=128, max_chunk=64)
    events, _ = run(server, pieces, eof=True)
    assert isinstance(events[-1], (ConnectionClosed, RemoteProtocolError))


PREFIXES = [
    b"",
    b"EHLO m\r\n",
    b"EHLO m\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n",
    b"EHLO m\r\nAUTH LOGIN\r\n",
    b"EHLO m\r\nSTARTTLS\r\n",
]
TOKENS = [
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"..",
    b".\r\n",
    b"\r\n.\r\n",
    b"MAIL FROM:<a@b.c>",
    b"x",
    b"RCPT TO:<d@e.f>",
    b"DATA",
    b"AUTH PLAIN",
    b"=",
    b"*",
    b"\x00",
    b"\xff",
    b" ",
    b"QUIT",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(PREFIXES),
    st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=40),
    st.integers(min_value=1, max_value=16),
)
def test_smtp_shaped_noise_is_handled(prefix: bytes, tokens: list[bytes], step: int) -> None:
    """Noise built from SMTP's own delimiters, fed in small steps, in every state."""
    server = greeted(max_line=128, max_chunk=64)
    wire = prefix + b"".join(tokens)
    pieces = [wire[i : i + step] for i in range(0, len(wire), step)]
    events, _ = run(server, pieces, eof=True)
    assert isinstance(events[-1], (ConnectionClosed, RemoteProtocolError))
    chunks = b"".join(e.data for e in events if isinstance(e, DataChunk))
    # Nothing forwarded toward the remote ever holds a bare CR or LF or an end of data.
    assert chunks.replace(b"\r\n", b"").count(b"\r") == 0
    assert chunks.replace(b"\r\n", b"").count(b"\n") == 0
    assert b"\r\n.\r\n" not in chunks and not chunks.startswith(b".\r\n")
