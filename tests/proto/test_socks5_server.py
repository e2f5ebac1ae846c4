"""Tests for egressd.proto.socks5_server: byte-exact transcripts, whole and byte by byte."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from chunking import Splitter as Chunker
from chunking import chunkings, whole
from hypothesis import given, settings
from hypothesis import strategies as st
from socks5_wire import (
    AUTH_GREETING,
    BIND_10_0_0_5,
    CONNECT_192_0_2_25,
    CREDENTIALS,
    NO_AUTH_GREETING,
    SUCCESS_10_0_0_5_0,
    SUCCESS_10_0_0_5_41234,
    H,
    split_points,
)

from egressd.proto import NEED_DATA, LocalProtocolError, RemoteProtocolError, socks5

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

Request = socks5.Greeting | socks5.AuthRequest | socks5.BindRequest | socks5.ConnectRequest
Answer = Callable[[Request], socks5.ServerAnswer]
Seen = socks5.ServerEvent | socks5.Socks5ProtocolError


def accepting(*, require_auth: bool = False) -> Answer:
    """A driver that says yes to everything (after choosing the method as egressd does)."""

    def answer(event: Request) -> socks5.ServerAnswer:
        if isinstance(event, socks5.Greeting):
            return socks5.MethodChoice(
                socks5.choose_method(event.methods, require_auth=require_auth)
            )
        if isinstance(event, socks5.AuthRequest):
            return socks5.AuthResult(accepted=True)
        if isinstance(event, socks5.BindRequest):
            return socks5.Succeeded()
        return socks5.Succeeded(IPv4("10.0.0.5"), 41234)

    return answer


def answering(answer: Answer, **overrides: socks5.ServerAnswer) -> Answer:
    """``answer``, except for the event types named in ``overrides`` (by class name)."""

    def overridden(event: Request) -> socks5.ServerAnswer:
        return overrides.get(type(event).__name__) or answer(event)

    return overridden


def drain(server: socks5.Socks5Server, answer: Answer) -> tuple[list[Seen], bytes]:
    """Pull events until the machine needs data, closed or is done, answering each one.

    A protocol error ends the list; its owed reply is sent, as the door does.
    """
    events: list[Seen] = []
    out = bytearray()
    while not (server.done or server.closed):
        try:
            event = server.next_event()
        except socks5.Socks5ProtocolError as exc:
            events.append(exc)
            if exc.reply is not None:
                out += server.send(exc.reply)
            break
        if event is NEED_DATA:
            break
        events.append(event)
        if isinstance(event, socks5.ConnectionClosed):
            break
        out += server.send(answer(event))
    return events, bytes(out)


def run_server(
    server: socks5.Socks5Server, data: bytes, chunks: Chunker, answer: Answer | None = None
) -> tuple[list[Seen], bytes]:
    events: list[Seen] = []
    out = b""
    for chunk in chunks(data):
        if server.done or server.closed:
            break
        server.receive_data(chunk)
        more, written = drain(server, answer or accepting())
        events += more
        out += written
    return events, out


def kinds(events: list[Seen]) -> list[type]:
    return [type(event) for event in events]


def greet(server: socks5.Socks5Server, method: int) -> bytes:
    """Take the greeting the machine parsed and answer it with ``method``."""
    assert isinstance(server.next_event(), socks5.Greeting)
    return server.send(socks5.MethodChoice(method))


NO_AUTH = socks5.Greeting((0,))
USER_PASS = socks5.Greeting((0, 2))
Broken = socks5.Socks5ProtocolError


@chunkings
@pytest.mark.parametrize(
    ("request_bytes", "expected", "reply"),
    [
        (
            CONNECT_192_0_2_25,
            socks5.ConnectRequest(IPv4("192.0.2.25"), 25),
            SUCCESS_10_0_0_5_41234,
        ),
        (
            H("0501000420010db80000000000000000000000250019"),
            socks5.ConnectRequest(IPv6("2001:db8::25"), 25),
            H("0500000400000000000000000000ffff0a000005a112"),
        ),
        (
            H("05010003") + b"\x0emx.example.com" + H("0019"),
            socks5.ConnectRequest("mx.example.com", 25),
            SUCCESS_10_0_0_5_41234,
        ),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_server_no_auth_connect(
    chunks: Chunker, request_bytes: bytes, expected: socks5.ConnectRequest, reply: bytes
) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + request_bytes, chunks)
    assert events == [NO_AUTH, expected]
    assert out == H("0500") + reply
    assert server.done
    assert server.trailing_data == b""


@chunkings
def test_server_auth_accepted(chunks: Chunker) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(
        server,
        AUTH_GREETING + CREDENTIALS + CONNECT_192_0_2_25,
        chunks,
        accepting(require_auth=True),
    )
    assert events == [
        USER_PASS,
        socks5.AuthRequest("pool", "secret"),
        socks5.ConnectRequest(IPv4("192.0.2.25"), 25),
    ]
    assert out == H("0502") + H("0100") + SUCCESS_10_0_0_5_41234
    assert server.done


@chunkings
def test_server_auth_denied(chunks: Chunker) -> None:
    deny = answering(accepting(), AuthRequest=socks5.AuthResult(accepted=False))
    server = socks5.Socks5Server()
    events, out = run_server(server, AUTH_GREETING + CREDENTIALS + CONNECT_192_0_2_25, chunks, deny)
    assert events == [USER_PASS, socks5.AuthRequest("pool", "secret")]
    assert out == H("0502") + H("0101")
    assert server.closed


def test_server_prefers_user_pass_even_when_not_required() -> None:
    assert socks5.choose_method((0, 2), require_auth=False) == 2
    server = socks5.Socks5Server()
    server.receive_data(H("05020002"))
    assert server.next_event() == USER_PASS
    assert server.send(socks5.MethodChoice(2)) == H("0502")
    assert server.next_event() is NEED_DATA


@chunkings
def test_server_requires_auth_but_client_offers_only_no_auth(chunks: Chunker) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(
        server, NO_AUTH_GREETING + CONNECT_192_0_2_25, chunks, accepting(require_auth=True)
    )
    assert events == [NO_AUTH]
    assert out == H("05ff")
    assert server.closed


def test_server_rejects_greeting_without_methods() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, H("0500"), whole)
    assert events == [socks5.Greeting(())]
    assert out == H("05ff")
    assert server.closed


def test_server_auth_fields_are_lossless_for_non_utf8_bytes() -> None:
    server = socks5.Socks5Server()
    server.receive_data(AUTH_GREETING + H("0102ff4100"))
    greet(server, 2)
    event = server.next_event()
    assert isinstance(event, socks5.AuthRequest)
    assert event.username.encode("utf-8", "surrogateescape") == b"\xffA"
    assert event.password == ""
    assert "secret" not in repr(socks5.AuthRequest("u", "secret"))


@chunkings
def test_server_kumomta_bind_then_connect_byte_for_byte(chunks: Chunker) -> None:
    server = socks5.Socks5Server()
    client_bytes = AUTH_GREETING + CREDENTIALS + BIND_10_0_0_5 + CONNECT_192_0_2_25 + b"EHLO"
    events, out = run_server(server, client_bytes, chunks)
    assert events == [
        USER_PASS,
        socks5.AuthRequest("pool", "secret"),
        socks5.BindRequest(IPv4("10.0.0.5"), 0),
        socks5.ConnectRequest(IPv4("192.0.2.25"), 25, bind_address=IPv4("10.0.0.5")),
    ]
    assert out == H("0502") + H("0100") + SUCCESS_10_0_0_5_0 + SUCCESS_10_0_0_5_41234
    assert server.done
    if chunks is whole:
        assert server.trailing_data == b"EHLO"


def test_server_bind_reply_can_carry_the_bound_port() -> None:
    server = socks5.Socks5Server()
    server.receive_data(NO_AUTH_GREETING + BIND_10_0_0_5)
    assert server.next_event() == NO_AUTH
    out = server.send(socks5.MethodChoice(0))
    assert isinstance(server.next_event(), socks5.BindRequest)
    out += server.send(socks5.Succeeded(IPv4("10.0.0.5"), 41234))
    assert out == H("0500") + SUCCESS_10_0_0_5_41234


@chunkings
def test_server_bind_refused(chunks: Chunker) -> None:
    refuse_bind = answering(accepting(), BindRequest=socks5.Refused(socks5.ReplyCode.NOT_ALLOWED))
    server = socks5.Socks5Server()
    events, out = run_server(
        server, NO_AUTH_GREETING + BIND_10_0_0_5 + CONNECT_192_0_2_25, chunks, refuse_bind
    )
    assert kinds(events) == [socks5.Greeting, socks5.BindRequest]
    assert out == H("0500") + H("05020001000000000000")
    assert server.closed


@chunkings
@pytest.mark.parametrize(
    "second",
    [
        H("05030001000000000000"),  # UDP ASSOCIATE
        BIND_10_0_0_5,  # a second BIND
        H("05090001c00002190019"),  # unknown command
    ],
    ids=["udp-associate", "second-bind", "unknown-command"],
)
def test_server_after_bind_only_connect_is_allowed(chunks: Chunker, second: bytes) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + BIND_10_0_0_5 + second, chunks)
    assert kinds(events) == [socks5.Greeting, socks5.BindRequest, Broken]
    assert out == H("0500") + SUCCESS_10_0_0_5_0 + H("05070001000000000000")
    assert server.closed


def test_server_eof_right_after_bind_gets_07() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + BIND_10_0_0_5, whole)
    assert kinds(events) == [socks5.Greeting, socks5.BindRequest]
    server.receive_data(b"")
    more, last = drain(server, accepting())
    assert kinds(more) == [Broken]
    assert out + last == H("0500") + SUCCESS_10_0_0_5_0 + H("05070001000000000000")


@pytest.mark.parametrize("command", ["03", "09"])
def test_server_udp_associate_or_unknown_command_first_gets_07(command: str) -> None:
    server = socks5.Socks5Server()
    request = H(f"05{command}0001c00002190019")
    events, out = run_server(server, NO_AUTH_GREETING + request, whole)
    assert kinds(events) == [socks5.Greeting, Broken]
    assert out == H("0500") + H("05070001000000000000")


@chunkings
def test_server_unknown_atyp_gets_08(chunks: Chunker) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("05010009") + b"\x00" * 8, chunks)
    assert kinds(events) == [socks5.Greeting, Broken]
    assert out == H("0500") + H("05080001000000000000")


def test_server_wrong_version_in_greeting_closes_silently() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, H("040100"), whole)
    assert kinds(events) == [Broken]
    assert out == b""


@chunkings
def test_server_wrong_version_in_request_gets_01(chunks: Chunker) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("04010004") + b"\x00" * 18, chunks)
    assert kinds(events) == [socks5.Greeting, Broken]
    assert out == H("0500") + H("05010004") + b"\x00" * 18  # IPv6 request -> IPv6 reply


def test_server_wrong_auth_version_gets_auth_failure() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, AUTH_GREETING + H("05"), whole)
    assert kinds(events) == [socks5.Greeting, Broken]
    assert out == H("0502") + H("0101")


def test_server_empty_domain_name_gets_01() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("05010003000019"), whole)
    assert kinds(events) == [socks5.Greeting, Broken]
    assert out == H("0500") + H("05010001000000000000")


def name_request(name: bytes) -> bytes:
    return H("05010003") + bytes([len(name)]) + name + H("0019")


@chunkings
@pytest.mark.parametrize(
    "name",
    [
        b"a..b",
        b".",
        b"..",
        b".example.com",
        b"a" * 64 + b".example",
        b"\xff\xfe.example",  # not UTF-8
        b"\xed\xa0\x80.example",  # a UTF-8-encoded surrogate: not UTF-8 either
        b"a b.example",
        b"a\x00b.example",
        "".join(chr(0x4E00 + 97 * i) for i in range(40)).encode() + b".example",  # IDNA > 63
        (b"a" * 63 + b".") * 4,  # 256 octets written out
    ],
    ids=[
        "empty-label",
        "root-only",
        "dots",
        "leading-dot",
        "label-64",
        "not-utf8",
        "surrogate",
        "space",
        "nul",
        "idna-too-long",
        "name-too-long",
    ],
)
def test_server_refuses_a_name_no_resolver_could_look_up_with_04(
    chunks: Chunker, name: bytes
) -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + name_request(name[:255]), chunks)
    assert kinds(events) == [socks5.Greeting, Broken]
    error = events[-1]
    assert isinstance(error, Broken)
    assert error.reply == socks5.Refused(socks5.ReplyCode.HOST_UNREACHABLE)
    assert out == H("0500") + H("05040001000000000000")
    assert server.closed


@pytest.mark.parametrize(
    ("name", "host"),
    [
        (b"mx.example.com.", "mx.example.com"),  # one trailing dot: a fully qualified name
        (b"a" * 63 + b".example", "a" * 63 + ".example"),
        (b"_service.example", "_service.example"),
        ("b\u00fccher.example".encode(), "xn--bcher-kva.example"),
        ((b"a" * 62 + b".") * 4 + b"a", ("a" * 62 + ".") * 4 + "a"),  # 253 octets
    ],
    ids=["fqdn", "label-63", "underscore", "idna", "name-253"],
)
def test_server_accepts_every_valid_name(name: bytes, host: str) -> None:
    server = socks5.Socks5Server()
    events, _ = run_server(server, NO_AUTH_GREETING + name_request(name), whole)
    assert events == [NO_AUTH, socks5.ConnectRequest(host, 25)]


@pytest.mark.parametrize(
    ("request_bytes", "bound", "reply"),
    [
        (CONNECT_192_0_2_25, IPv6("2001:db8::5"), H("0500000100000000a112")),
        (CONNECT_192_0_2_25, IPv6("::ffff:10.0.0.5"), SUCCESS_10_0_0_5_41234),
        (
            H("0501000420010db80000000000000000000000250019"),
            IPv4("10.0.0.5"),
            H("0500000400000000000000000000ffff0a000005a112"),
        ),
        (
            H("05010003") + b"\x02mx" + H("0019"),
            IPv6("2001:db8::5"),
            H("0500000420010db8000000000000000000000005a112"),
        ),
        (H("05010003") + b"\x02mx" + H("0019"), IPv4("10.0.0.5"), SUCCESS_10_0_0_5_41234),
    ],
    ids=["v4-req-v6-bound", "v4-req-mapped-bound", "v6-req-v4-bound", "name-v6", "name-v4"],
)
def test_server_reply_family_matches_request_family(
    request_bytes: bytes, bound: ipaddress.IPv4Address | ipaddress.IPv6Address, reply: bytes
) -> None:
    answer = answering(accepting(), ConnectRequest=socks5.Succeeded(bound, 41234))
    server = socks5.Socks5Server()
    _, out = run_server(server, NO_AUTH_GREETING + request_bytes, whole, answer)
    assert out == H("0500") + reply


def test_server_failure_reply_to_ipv6_request_is_ipv6() -> None:
    refuse = answering(
        accepting(), ConnectRequest=socks5.Refused(socks5.ReplyCode.CONNECTION_REFUSED)
    )
    server = socks5.Socks5Server()
    request = H("0501000420010db80000000000000000000000250019")
    events, out = run_server(server, NO_AUTH_GREETING + request, whole, refuse)
    assert kinds(events) == [socks5.Greeting, socks5.ConnectRequest]
    assert out == H("0500") + H("05050004") + b"\x00" * 18
    assert server.closed


def test_reply_address_for_unspecified() -> None:
    assert socks5.reply_address_for(1, None) == IPv4("0.0.0.0")
    assert socks5.reply_address_for(4, None) == IPv6("::")
    assert socks5.reply_address_for(3, None) == IPv4("0.0.0.0")


def test_server_keeps_pipelined_early_data_for_the_destination() -> None:
    server = socks5.Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + CONNECT_192_0_2_25 + b"EHLO x\r\n", whole)
    assert kinds(events) == [socks5.Greeting, socks5.ConnectRequest]
    assert out == H("0500") + SUCCESS_10_0_0_5_41234
    assert server.done
    assert server.trailing_data == b"EHLO x\r\n"


def test_server_takes_a_whole_read_of_pipelined_payload_after_a_split_greeting() -> None:
    server = socks5.Socks5Server()
    server.receive_data(NO_AUTH_GREETING[:1])
    assert server.next_event() is NEED_DATA
    payload = b"x" * (socks5.MAX_SERVER_BUFFER_SIZE - 1)
    events, _ = run_server(server, NO_AUTH_GREETING[1:] + CONNECT_192_0_2_25 + payload, whole)
    assert kinds(events) == [socks5.Greeting, socks5.ConnectRequest]
    assert server.trailing_data == payload


def test_server_caps_what_it_buffers_while_an_answer_is_pending() -> None:
    server = socks5.Socks5Server()
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25)
    greet(server, 0)
    assert isinstance(server.next_event(), socks5.ConnectRequest)
    server.receive_data(b"x" * (socks5.MAX_SERVER_BUFFER_SIZE + 1))
    assert server.closed
    with pytest.raises(Broken, match="more than"):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(socks5.Succeeded(IPv4("10.0.0.5"), 1))


def test_server_eof_mid_message_closes_without_reply() -> None:
    server = socks5.Socks5Server()
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25[:5])
    events, out = drain(server, accepting())
    assert events == [NO_AUTH]
    server.receive_data(b"")
    with pytest.raises(Broken, match="in the middle of the request") as info:
        server.next_event()
    assert info.value.reply is None
    assert out == H("0500")


def test_server_eof_between_messages_is_connection_closed() -> None:
    server = socks5.Socks5Server()
    server.receive_data(AUTH_GREETING)
    greet(server, 2)
    server.receive_data(b"")
    assert server.next_event() == socks5.ConnectionClosed()
    assert server.closed


def test_server_error_is_sticky_and_remote() -> None:
    server = socks5.Socks5Server()
    server.receive_data(H("040100"))
    with pytest.raises(Broken) as first:
        server.next_event()
    assert isinstance(first.value, RemoteProtocolError)
    assert first.value.stage == "greeting"
    with pytest.raises(Broken) as again:
        server.next_event()
    assert again.value is first.value


def test_server_sends_the_owed_reply_once_and_nothing_else() -> None:
    server = socks5.Socks5Server()
    server.receive_data(NO_AUTH_GREETING + H("05030001000000000000"))
    greet(server, 0)
    with pytest.raises(Broken) as info:
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(socks5.Refused(socks5.ReplyCode.GENERAL_FAILURE))
    assert info.value.reply is not None
    assert server.send(info.value.reply) == H("05070001000000000000")
    with pytest.raises(LocalProtocolError):
        server.send(info.value.reply)


def test_server_usage_errors() -> None:
    server = socks5.Socks5Server()
    with pytest.raises(LocalProtocolError):
        server.send(socks5.AuthResult(accepted=True))
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25)
    assert server.next_event() == NO_AUTH
    with pytest.raises(LocalProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(socks5.MethodChoice(1))
    server.send(socks5.MethodChoice(0))
    assert isinstance(server.next_event(), socks5.ConnectRequest)
    with pytest.raises(LocalProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        socks5.Refused(0)
    server.send(socks5.Succeeded())
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        server.next_event()


# ---------------------------------------------------------------------------------------
# Both machines through a fake link
# ---------------------------------------------------------------------------------------


@chunkings
@pytest.mark.parametrize("with_auth", [False, True])
@pytest.mark.parametrize("bind", [None, IPv4("10.0.0.5"), IPv6("2001:db8::5")])
def test_client_and_server_agree(
    chunks: Chunker, with_auth: bool, bind: ipaddress.IPv4Address | ipaddress.IPv6Address | None
) -> None:
    credentials = {"username": "pool", "password": "secret"} if with_auth else {}
    handshake = socks5.Socks5Handshake("2001:db8::25", 25, bind_address=bind, **credentials)
    server = socks5.Socks5Server()
    seen: list[Seen] = []
    to_server = handshake.initial_bytes()
    for _ in range(10):
        to_client = b""
        for chunk in chunks(to_server):
            server.receive_data(chunk)
            events, out = drain(server, accepting(require_auth=with_auth))
            seen += events
            to_client += out
        to_server = b"".join(handshake.receive_data(c) for c in chunks(to_client))
        if handshake.done:
            break
    assert handshake.done and server.done
    assert handshake.bound_address == ("::ffff:a00:5", 41234)
    assert seen[-1] == socks5.ConnectRequest(IPv6("2001:db8::25"), 25, bind_address=bind)
    assert kinds(seen) == (
        [socks5.Greeting]
        + [socks5.AuthRequest] * with_auth
        + [socks5.BindRequest] * (bind is not None)
        + [socks5.ConnectRequest]
    )


# ---------------------------------------------------------------------------------------
# Property test: no input makes the machine raise anything but its own error
# ---------------------------------------------------------------------------------------

SERVER_PREFIXES = [
    b"",
    NO_AUTH_GREETING,
    AUTH_GREETING,
    AUTH_GREETING + CREDENTIALS,
    NO_AUTH_GREETING + BIND_10_0_0_5,
    NO_AUTH_GREETING + H("0501"),
    NO_AUTH_GREETING + H("05010003"),
]


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(SERVER_PREFIXES),
    tail=st.binary(max_size=600),
    require_auth=st.booleans(),
    data=st.data(),
)
def test_server_raises_only_its_own_error_on_any_input(
    prefix: bytes, tail: bytes, require_auth: bool, data: st.DataObject
) -> None:
    payload = prefix + tail
    pieces = data.draw(split_points(payload))
    server = socks5.Socks5Server()
    answer = accepting(require_auth=require_auth)
    for piece in pieces:
        if server.done or server.closed:
            break
        server.receive_data(piece)
        drain(server, answer)
    if not (server.done or server.closed):
        server.receive_data(b"")
        events, _ = drain(server, answer)
        # After EOF the machine must reach an end: done or closed, never NEED_DATA.
        assert server.done or server.closed
        assert server.done or isinstance(events[-1], Broken | socks5.ConnectionClosed)
