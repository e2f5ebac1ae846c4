"""Tests for the sans-IO SMTP client machine (egressd facing the remote MX)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from chunking import SPLITTERS, Splitter, bytewise, whole
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.buildinfo import is_compiled
from egressd.proto import smtp_client, smtp_common
from egressd.proto.smtp_client import (
    ClientEvent,
    ClientState,
    SmtpClient,
    filter_mail_params,
    filter_rcpt_params,
    mail_incompatibility,
)
from egressd.proto.smtp_common import (
    NEED_DATA,
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
    Quit,
    Rcpt,
    RemoteProtocolError,
    Reply,
    Rset,
    Sentinel,
    StartTls,
    Vrfy,
    parse_ehlo_extensions,
)

#: What a driver sees: the events, and last the error when the remote broke the protocol.
Seen = ClientEvent | RemoteProtocolError


def feed(client: SmtpClient, pieces: Sequence[bytes]) -> list[Seen]:
    """Feed pieces one by one, collecting events; a RemoteProtocolError ends the list."""
    events: list[Seen] = []
    for piece in pieces:
        client.receive_data(piece)
        while True:
            try:
                event = client.next_event()
            except RemoteProtocolError as exc:
                events.append(exc)
                return events
            if isinstance(event, Sentinel):
                assert event is NEED_DATA  # the client machine never pauses
                break
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events
    return events


def state_of(client: SmtpClient) -> ClientState:
    """Read through a call so that mypy does not narrow the state between steps."""
    return client.state


EHLO_REPLY = (
    b"250-mx.example.net Hello out1.example\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-STARTTLS\r\n"
    b"250 DSN\r\n"
)
EXTENSIONS = {
    "PIPELINING": "",
    "SIZE": "10240000",
    "8BITMIME": "",
    "SMTPUTF8": "",
    "ENHANCEDSTATUSCODES": "",
    "STARTTLS": "",
    "DSN": "",
}


def ready(ehlo_reply: bytes = EHLO_REPLY) -> SmtpClient:
    """A client that got the greeting and its EHLO answered."""
    client = SmtpClient()
    assert feed(client, [b"220 mx.example.net ESMTP\r\n"]) == [
        Reply(220, ("mx.example.net ESMTP",))
    ]
    assert client.send(Ehlo("out1.example")) == b"EHLO out1.example\r\n"
    events = feed(client, [ehlo_reply])
    assert len(events) == 1 and isinstance(events[0], Reply)
    assert events[0].to_bytes() == ehlo_reply
    return client


# ------------------------------------------------------------------------------ sessions

MTA_MAIL = Mail(
    "alice@example.org",
    {"SIZE": "1234", "BODY": "8BITMIME", "RET": "HDRS", "ENVID": "abc", "AUTH": "<>"},
)
MTA_RCPT = Rcpt("bob@example.net", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob@x.y"})


@SPLITTERS
def test_full_session(split: Splitter) -> None:
    client = SmtpClient()
    wire = bytearray()
    events: list[Seen] = []
    events += feed(client, split(b"220 mx.example.net ESMTP ready\r\n"))
    wire += client.send(Ehlo("out1.example"))
    events += feed(client, split(EHLO_REPLY))
    assert dict(client.extensions) == EXTENSIONS
    assert client.pipelining and client.max_size == 10240000
    wire += client.send(MTA_MAIL)
    wire += client.send(MTA_RCPT)
    wire += client.send(Rcpt("carol@example.net"))
    wire += client.send(Data())
    events += feed(
        client,
        split(
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 No such user\r\n550 5.1.1 carol\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
        ),
    )
    assert state_of(client) is ClientState.BODY
    wire += client.send(DataChunk(b"Subject: hi\r\n\r\n..dot\r\n"))
    wire += client.send(EndOfData())
    wire += client.send(Quit())
    events += feed(client, split(b"250 2.0.0 Ok: queued as 4XyZ\r\n221 2.0.0 Bye\r\n"))
    assert bytes(wire) == (
        b"EHLO out1.example\r\n"
        # AUTH= dropped: not advertised.
        b"MAIL FROM:<alice@example.org> SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=abc\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@x.y\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\n..dot\r\n"
        b".\r\n"
        b"QUIT\r\n"
    )
    assert events == [
        Reply(220, ("mx.example.net ESMTP ready",)),
        Reply(
            250,
            (
                "mx.example.net Hello out1.example",
                "PIPELINING",
                "SIZE 10240000",
                "8BITMIME",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES",
                "STARTTLS",
                "DSN",
            ),
        ),
        Reply(250, ("2.1.0 Ok",)),
        Reply(250, ("2.1.5 Ok",)),
        Reply(550, ("5.1.1 No such user", "5.1.1 carol")),
        Reply(354, ("End data with <CR><LF>.<CR><LF>",)),
        Reply(250, ("2.0.0 Ok: queued as 4XyZ",)),
        Reply(221, ("2.0.0 Bye",)),
        ConnectionClosed(),  # the session is over once QUIT is answered
    ]
    assert state_of(client) is ClientState.CLOSED
    assert client.next_event() == ConnectionClosed()


def test_params_dropped_when_not_advertised() -> None:
    client = ready(b"250-mx.example.net\r\n250 PIPELINING\r\n")
    assert client.send(MTA_MAIL) == b"MAIL FROM:<alice@example.org>\r\n"
    assert client.send(MTA_RCPT) == b"RCPT TO:<bob@example.net>\r\n"


def test_helo_session_sends_no_params() -> None:
    client = SmtpClient()
    feed(client, [b"220 old.example\r\n"])
    client.send(Ehlo("out1.example"))
    assert feed(client, [b"502 5.5.1 EHLO not implemented\r\n"])[0] == Reply(
        502, ("5.5.1 EHLO not implemented",)
    )
    with pytest.raises(LocalProtocolError):
        client.send(MTA_MAIL)  # no successful EHLO/HELO yet
    client.send(Helo("out1.example"))
    feed(client, [b"250 old.example\r\n"])
    assert client.send(MTA_MAIL) == b"MAIL FROM:<alice@example.org>\r\n"


@pytest.mark.parametrize(
    ("extensions", "mail", "rcpt"),
    [
        ({}, {}, {}),
        ({"SIZE": "0"}, {"SIZE": "1234"}, {}),
        ({"8BITMIME": ""}, {"BODY": "8BITMIME"}, {}),
        ({"DSN": ""}, {"RET": "HDRS", "ENVID": "abc"}, dict(MTA_RCPT.params)),
        ({"AUTH": "PLAIN"}, {"AUTH": "<>"}, {}),
    ],
)
def test_param_filters(
    extensions: dict[str, str], mail: dict[str, str | None], rcpt: dict[str, str | None]
) -> None:
    assert filter_mail_params(MTA_MAIL.params, extensions) == mail
    assert filter_rcpt_params(MTA_RCPT.params, extensions) == rcpt


def test_smtputf8_param_kept_only_when_advertised() -> None:
    params = {"SMTPUTF8": None, "FOO": "bar"}
    assert filter_mail_params(params, {"SMTPUTF8": ""}) == {"SMTPUTF8": None}
    assert filter_mail_params(params, {}) == {}


def test_requiretls_goes_on_only_to_a_remote_that_offers_it() -> None:
    """RFC 8689: the parameter is passed on; a remote without it refuses the message."""
    mail = Mail("a@b.c", {"REQUIRETLS": None})
    assert filter_mail_params(mail.params, {"REQUIRETLS": ""}) == {"REQUIRETLS": None}
    assert mail_incompatibility(mail, {"REQUIRETLS": ""}) is None
    refusal = mail_incompatibility(mail, {"STARTTLS": ""})
    assert refusal is not None and (refusal.code, refusal.enhanced) == (550, "5.7.30")


@pytest.mark.parametrize(
    ("mail", "extensions", "reply"),
    [
        (
            Mail("a@b.c", {"SMTPUTF8": None}),
            {},
            "553 5.6.7 Remote server does not support SMTPUTF8",
        ),
        (
            Mail("jörg@b.c", {"SMTPUTF8": None}),
            {"8BITMIME": ""},
            "553 5.6.7 Remote server does not support SMTPUTF8",
        ),
        (
            Mail("a@b.c", {"BODY": "8bitmime"}),
            {},
            "554 5.6.3 Remote server does not support 8BITMIME",
        ),
        (
            Mail("a@b.c", {"SIZE": "2000"}),
            {"SIZE": "1000"},
            "552 5.3.4 Message size exceeds the remote server's maximum",
        ),
        (Mail("a@b.c", {"SIZE": "2000"}), {"SIZE": ""}, None),
        (Mail("a@b.c", {"SIZE": "1000", "BODY": "7BIT"}), {"SIZE": "1000"}, None),
        (Mail("jörg@b.c", {"SMTPUTF8": None}), {"SMTPUTF8": ""}, None),
    ],
)
def test_mail_incompatibility(mail: Mail, extensions: dict[str, str], reply: str | None) -> None:
    found = mail_incompatibility(mail, extensions)
    assert (found.to_bytes().decode().rstrip() if found else None) == reply


def test_non_ascii_to_a_remote_without_smtputf8_is_a_local_error() -> None:
    client = ready(b"250-mx\r\n250 8BITMIME\r\n")
    with pytest.raises(LocalProtocolError):
        client.send(Mail("jörg@bü.example", {"SMTPUTF8": None}))
    client = ready()
    assert client.send(Mail("jörg@bü.example", {"SMTPUTF8": None})) == (
        "MAIL FROM:<jörg@bü.example> SMTPUTF8\r\n".encode()
    )


# ------------------------------------------------------------------------------ replies


@SPLITTERS
@pytest.mark.parametrize(
    "wire",
    [
        b"250 ok\r\n",
        b"250\r\n",
        b"250-first\r\n250-\r\n250 last\r\n",
        b"421 4.7.0 Try again later\r\n",
        b"299 odd but valid\r\n",
        b"599 also valid\r\n",
        "250 UTF-8 text: h\u00e9llo\r\n".encode(),
        b"250 latin-1 text: h\xe9llo\r\n",
        b"250 with\ttab and \x00 nul\r\n",
    ],
)
def test_reply_re_serializes_exactly(split: Splitter, wire: bytes) -> None:
    client = SmtpClient()
    events = feed(client, split(wire))
    assert isinstance(events[0], Reply)
    assert events[0].to_bytes() == wire
    # A 421 closes the session; nothing else follows any other reply.
    assert events[1:] == ([ConnectionClosed()] if wire.startswith(b"421") else [])


def test_lf_only_replies_are_accepted_and_re_serialized_with_crlf() -> None:
    client = SmtpClient()
    (reply,) = feed(client, [b"220-hello\n220 there\n"])
    assert isinstance(reply, Reply)
    assert reply.to_bytes() == b"220-hello\r\n220 there\r\n"


@pytest.mark.parametrize(
    ("line", "enhanced"),
    [
        ("550 5.1.1 User unknown", "5.1.1"),
        ("451 4.3.0 Try later", "4.3.0"),
        ("250 2.0.0", "2.0.0"),
        ("550 4.1.1 class mismatch", None),
        ("550 5.1.1x not a code", None),
        ("250 ok", None),
        ("250 2.0.0.1 too long", None),
        ("354 go ahead", None),
    ],
)
def test_enhanced_status_code(line: str, enhanced: str | None) -> None:
    client = SmtpClient()
    (reply,) = feed(client, [line.encode() + b"\r\n"])
    assert isinstance(reply, Reply)
    assert reply.enhanced == enhanced


def test_reply_helpers() -> None:
    reply = Reply.make(550, "No such user", "here", enhanced="5.1.1")
    assert reply.to_bytes() == b"550-5.1.1 No such user\r\n550 5.1.1 here\r\n"
    assert reply.enhanced == "5.1.1" and reply.is_permanent
    assert Reply.make(250).to_bytes() == b"250\r\n"
    with pytest.raises(LocalProtocolError):
        Reply(250, ("a\r\n250 injected",))
    with pytest.raises(LocalProtocolError):
        Reply(600, ("x",))
    with pytest.raises(LocalProtocolError):
        Reply.make(250, "x", enhanced="5.0.0")
    assert parse_ehlo_extensions(Reply(250, ("mx", "size 100", "AUTH=PLAIN", "auth plain"))) == {
        "SIZE": "100",
        "AUTH": "plain",
    }
    assert parse_ehlo_extensions(Reply(550, ("no",))) == {}


@pytest.mark.parametrize(
    ("code", "lines", "mistyped"),
    [
        (True, ("ok",), False),  # a bool is not a code (an int to a type checker)
        (250.0, ("ok",), True),
        (199, ("ok",), False),
        (250, ["ok"], True),  # lines must be a tuple
        (250, (), False),
        (250, ("ok", 7), True),
        (250, ("ok", "second\nline"), False),  # an LF in a later line
        (250, ("h\u00e9llo\r",), False),  # a CR in a non-ASCII line
        (250, ("\ud800 lone surrogate",), False),  # not UTF-8 and not from surrogateescape
    ],
)
def test_a_reply_that_could_not_go_on_the_wire_cannot_be_built(
    code: object, lines: object, mistyped: bool
) -> None:
    """Pure, Reply's checks refuse each with LocalProtocolError; compiled by mypyc, a value
    of the wrong type for its annotation is a TypeError before the checks run."""
    refused = TypeError if mistyped and is_compiled(smtp_common) else LocalProtocolError
    with pytest.raises(refused):
        Reply(code, lines)  # type: ignore[arg-type]


def test_a_reply_is_the_same_value_after_it_was_sent() -> None:
    sent = Reply(250, ("h\u00e9llo", "\udce9 escaped octet"))
    wire = b"250-h\xc3\xa9llo\r\n250 \xe9 escaped octet\r\n"  # UTF-8, then a raw octet
    assert sent.to_bytes() == wire
    assert sent.to_bytes() == wire  # the second time from its cache: the same bytes
    assert sent == Reply(250, ("h\u00e9llo", "\udce9 escaped octet"))
    assert hash(sent) == hash(Reply(250, ("h\u00e9llo", "\udce9 escaped octet")))
    assert repr(sent) == "Reply(code=250, lines=('h\u00e9llo', '\\udce9 escaped octet'))"


@pytest.mark.parametrize(
    "when", ["greeting", "idle", "pipelined", "body", "final"], ids=lambda w: w
)
def test_unsolicited_421_is_a_reply(when: str) -> None:
    client = SmtpClient()
    if when != "greeting":
        client = ready()
    if when == "pipelined":
        client.send(Mail("a@b.c"))
        client.send(Rcpt("d@e.f"))
    if when in ("body", "final"):
        client.send(Mail("a@b.c"))
        client.send(Rcpt("d@e.f"))
        client.send(Data())
        feed(client, [b"250 ok\r\n250 ok\r\n354 go\r\n"])
        assert state_of(client) is ClientState.BODY
    if when == "final":
        client.send(EndOfData())
    events = feed(client, [b"421-4.3.2 System shutting down\r\n421 4.3.2 Bye\r\n"])
    assert events == [
        Reply(421, ("4.3.2 System shutting down", "4.3.2 Bye")),
        ConnectionClosed(),
    ]
    assert state_of(client) is ClientState.CLOSED
    assert client.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        client.send(Rset())


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"hello\r\n", "malformed"),
        (b"199 too low\r\n", "malformed"),
        (b"650 too high\r\n", "malformed"),
        (b"25 short\r\n", "malformed"),
        (b"250x\r\n", "malformed"),
        (b"250-a\r\n251 b\r\n", "changed"),
        (b"250 a\rb\r\n", "bare CR"),
        (b"250 " + b"x" * 3000 + b"\r\n", "longer than"),
        (b"250 " + b"x" * 3000, "longer than"),
        (b"250-x\r\n" * 200, "lines"),
        (b"220 hi\r\n250 unsolicited\r\n", "unsolicited"),
    ],
)
def test_protocol_violations(wire: bytes, why: str) -> None:
    for pieces in (whole(wire), bytewise(wire)):
        client = SmtpClient()
        events = feed(client, pieces)
        assert isinstance(events[-1], RemoteProtocolError)
        assert why in events[-1].description
        assert events[-1].reply is not None and events[-1].reply.code == 451
        with pytest.raises(RemoteProtocolError) as again:
            client.next_event()
        assert again.value is events[-1]  # sticky
        assert state_of(client) is ClientState.ERROR


def test_eof() -> None:
    client = SmtpClient()
    assert feed(client, [b"220 hi\r\n250-half", b""]) == [
        Reply(220, ("hi",)),
        ConnectionClosed(),
    ]
    client.receive_data(b"")  # repeating EOF is fine
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"late")


# ------------------------------------------------------------------------------ pipelining


def test_no_pipelining_without_the_extension() -> None:
    client = ready(b"250-mx\r\n250 8BITMIME\r\n")
    client.send(Mail("a@b.c"))
    with pytest.raises(LocalProtocolError):
        client.send(Rcpt("d@e.f"))
    feed(client, [b"250 ok\r\n"])
    client.send(Rcpt("d@e.f"))


def test_pipelined_replies_are_matched_in_order() -> None:
    client = ready()
    wire = client.send(Mail("a@b.c")) + client.send(Rcpt("x@e.f")) + client.send(Rcpt("y@e.f"))
    wire += client.send(Data())
    assert wire.count(b"\r\n") == 4
    assert client.awaiting_replies == 4
    with pytest.raises(LocalProtocolError):
        client.send(Noop())  # DATA ends a pipelined group (RFC 2920)
    events = feed(client, [b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n"])
    assert [e.code for e in events if isinstance(e, Reply)] == [250, 550, 250, 354]
    assert state_of(client) is ClientState.BODY
    assert client.awaiting_replies == 0


def test_a_reply_line_seen_before_means_the_same_in_any_place() -> None:
    """A one-line reply is remembered by its line (a remote repeats its replies message
    after message); the same line again is the same reply, but as the last line of a
    multi-line reply it is still that reply's line, a 421 still closes, a reply nobody
    awaits is still a violation, and many different lines are all parsed right."""
    client = ready()
    for n in range(3):  # three transactions: the replies are parsed, then remembered
        client.send(Mail("a@b.c"))
        client.send(Rcpt("x@e.f"))
        client.send(Data())
        events = feed(client, [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\n354 go\r\n"])
        assert [e.to_bytes() for e in events if isinstance(e, Reply)] == [
            b"250 2.1.0 Ok\r\n",
            b"250 2.1.5 Ok\r\n",
            b"354 go\r\n",
        ], n
        client.send(EndOfData())
        assert feed(client, [f"250 2.0.0 queued as {n}\r\n".encode()]) == [
            Reply(250, (f"2.0.0 queued as {n}",))
        ]
    for n in range(100):  # more different lines than are remembered
        client.send(Rset())
        assert feed(client, [f"250 2.0.0 reset {n}\r\n".encode()]) == [
            Reply(250, (f"2.0.0 reset {n}",))
        ]
    client.send(Noop())
    assert feed(client, [b"250-first\r\n250 2.1.0 Ok\r\n"]) == [Reply(250, ("first", "2.1.0 Ok"))]
    events = feed(client, [b"250 2.1.0 Ok\r\n"])  # awaited by nothing
    assert len(events) == 1 and isinstance(events[0], RemoteProtocolError)

    closing = ready()
    closing.send(Noop())
    bye = [Reply(421, ("4.3.2 bye",)), ConnectionClosed()]
    assert feed(closing, [b"421 4.3.2 bye\r\n"]) == bye
    again = ready()
    again.send(Noop())
    assert feed(again, [b"250 ok\r\n"]) == [Reply(250, ("ok",))]
    assert feed(again, [b"421 4.3.2 bye\r\n"]) == bye
    assert state_of(again) is ClientState.CLOSED


def test_data_refused_leaves_the_body_closed() -> None:
    client = ready()
    client.send(Mail("a@b.c"))
    client.send(Rcpt("x@e.f"))
    client.send(Data())
    feed(client, [b"250 ok\r\n550 no\r\n554 5.5.1 No valid recipients\r\n"])
    assert state_of(client) is ClientState.READY
    with pytest.raises(LocalProtocolError):
        client.send(DataChunk(b"x\r\n"))
    client.send(Rset())
    feed(client, [b"250 ok\r\n"])
    client.send(Mail("a@b.c"))  # a new transaction may start


def test_refused_mail_allows_a_new_mail() -> None:
    client = ready()
    client.send(Mail("a@b.c"))
    with pytest.raises(LocalProtocolError):
        client.send(Mail("a@b.c"))  # nested
    feed(client, [b"550 5.7.1 no\r\n"])
    assert client.send(Mail("other@b.c")) == b"MAIL FROM:<other@b.c>\r\n"


def test_misuse_raises_local_errors() -> None:
    client = SmtpClient()
    with pytest.raises(LocalProtocolError):
        client.send(Ehlo("x"))  # before the greeting
    client = ready()
    with pytest.raises(LocalProtocolError):
        client.send(Rcpt("a@b.c"))  # no MAIL
    with pytest.raises(LocalProtocolError):
        client.send(EndOfData())  # not in the body
    client.send(Mail("a@b.c"))
    with pytest.raises(LocalProtocolError):
        client.send(Data())  # no RCPT
    with pytest.raises(LocalProtocolError):
        client.start_tls()  # no STARTTLS
    client.send(Quit())
    with pytest.raises(LocalProtocolError):
        client.send(Noop())


def test_commands_cannot_carry_line_breaks() -> None:
    with pytest.raises(LocalProtocolError):
        Mail("a@b.c\r\nRCPT TO:<x@y>")
    with pytest.raises(LocalProtocolError):
        Rcpt("a@b.c", {"NOTIFY": "NEVER\r\nDATA"})
    with pytest.raises(LocalProtocolError):
        Ehlo("a b")
    with pytest.raises(LocalProtocolError):
        Noop("x\ny")


# ------------------------------------------------------------------------------ STARTTLS


def test_starttls_requires_a_new_ehlo() -> None:
    client = ready()
    assert client.send(StartTls()) == b"STARTTLS\r\n"
    feed(client, [b"220 2.0.0 Ready to start TLS\r\n"])
    assert state_of(client) is ClientState.TLS
    client.start_tls()
    assert state_of(client) is ClientState.READY
    assert dict(client.extensions) == {}
    with pytest.raises(LocalProtocolError):
        client.send(Mail("a@b.c"))
    client.send(Ehlo("out1.example"))
    feed(client, [EHLO_REPLY])
    assert client.send(Mail("a@b.c")) == b"MAIL FROM:<a@b.c>\r\n"


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_starttls_response_injection(split: Splitter) -> None:
    client = ready()
    client.send(StartTls())
    events = feed(client, split(b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n"))
    assert events[0] == Reply(220, ("go ahead",))
    assert isinstance(events[-1], RemoteProtocolError)
    assert "STARTTLS" in events[-1].description
    assert events[-1].reply is not None and events[-1].reply.code == 451


def test_starttls_injection_caught_by_start_tls() -> None:
    client = ready()
    client.send(StartTls())
    client.receive_data(b"220 go ahead\r\n250 injected\r\n")
    assert client.next_event() == Reply(220, ("go ahead",))
    with pytest.raises(RemoteProtocolError):
        client.start_tls()
    with pytest.raises(RemoteProtocolError, match="plaintext after the 220 to STARTTLS") as raised:
        client.next_event()
    assert raised.value.reply is not None and raised.value.reply.code == 451


def test_starttls_refused_keeps_plaintext_session() -> None:
    client = ready()
    client.send(StartTls())
    feed(client, [b"454 4.7.0 TLS not available\r\n"])
    assert state_of(client) is ClientState.READY
    assert client.send(Mail("a@b.c")) == b"MAIL FROM:<a@b.c>\r\n"


# ------------------------------------------------------------------------------ properties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_bytes_give_events_or_a_refusal(pieces: list[bytes]) -> None:
    client = SmtpClient(max_line=128, max_lines=8)
    events = feed(client, [*(p for p in pieces if p), b""])
    assert isinstance(events[-1], (ConnectionClosed, RemoteProtocolError))
    for event in events:
        if isinstance(event, Reply):
            assert b"\r" not in event.to_bytes().replace(b"\r\n", b"")
            assert b"\n" not in event.to_bytes().replace(b"\r\n", b"")


REPLY_TOKENS = [
    b"220 ",
    b"250-",
    b"250 ",
    b"421 ",
    b"354 ",
    b"550 5.1.1 ",
    b"\r\n",
    b"\n",
    b"\r",
    b"x",
    b"PIPELINING",
    b"STARTTLS",
    b"SIZE 10",
    b"\xff",
    b"2",
    b"-",
    b" ",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(REPLY_TOKENS) | st.binary(max_size=6), max_size=40))
def test_reply_shaped_noise_in_a_pipelined_session(tokens: list[bytes]) -> None:
    client = ready()
    client.send(Mail("a@b.c"))
    client.send(Rcpt("d@e.f"))
    client.send(Data())
    wire = b"".join(tokens)
    events = feed(client, [*bytewise(wire), b""])
    assert isinstance(events[-1], (ConnectionClosed, RemoteProtocolError))
    for event in events:
        if isinstance(event, Reply):
            assert b"\r" not in event.to_bytes().replace(b"\r\n", b"")


def test_commands_the_client_does_not_send() -> None:
    """Pure, the machine refuses what is not a ClientCommand with LocalProtocolError; compiled
    by mypyc, send()'s annotation is checked at the call and the same command is a TypeError."""
    refused = TypeError if is_compiled(smtp_client) else LocalProtocolError
    client = ready()
    client.send(Mail("a@b.c"))
    feed(client, [b"250 ok\r\n"])
    for command in (Vrfy("x"), Help()):
        with pytest.raises(refused):
            client.send(command)  # type: ignore[arg-type]
