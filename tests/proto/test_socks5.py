"""Tests for egressd.proto.socks5: byte-exact transcripts, fed whole and one byte at a time."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from chunking import Splitter as Chunker
from chunking import chunkings, whole
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.proto.socks5 import (
    MAX_SERVER_BUFFER_SIZE,
    NEED_DATA,
    AuthRequest,
    BindRequest,
    Closed,
    ConnectRequest,
    Reply,
    Socks5Client,
    Socks5ClientError,
    Socks5Server,
    Socks5ServerEvent,
    Socks5ServerUsageError,
    reply_address_for,
)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
H = bytes.fromhex


# Wire fragments used by several transcripts.
NO_AUTH_GREETING = H("050100")
AUTH_GREETING = H("05020002")
CONNECT_192_0_2_25 = H("05010001c00002190019")  # CONNECT 192.0.2.25:25
BIND_10_0_0_5 = H("050200010a0000050000")  # BIND 10.0.0.5:0
SUCCESS_10_0_0_5_0 = H("050000010a0000050000")
SUCCESS_10_0_0_5_41234 = H("050000010a000005a112")
CREDENTIALS = H("01") + b"\x04pool" + b"\x06secret"


def feed_client(client: Socks5Client, data: bytes, chunks: Chunker) -> bytes:
    return b"".join(client.receive_data(chunk) for chunk in chunks(data))


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------


def test_client_greeting_offers_only_no_auth_without_credentials() -> None:
    assert Socks5Client("192.0.2.25", 25).initial_bytes() == H("050100")
    assert Socks5Client("192.0.2.25", 25, username="u").initial_bytes() == H("050100")


def test_client_greeting_offers_user_pass_when_both_are_set() -> None:
    client = Socks5Client("192.0.2.25", 25, username="u", password="p")
    assert client.initial_bytes() == H("05020002")


@chunkings
@pytest.mark.parametrize(
    ("host", "request_bytes"),
    [
        ("192.0.2.25", CONNECT_192_0_2_25),
        ("2001:db8::25", H("0501000420010db80000000000000000000000250019")),
        ("mx.example.com", H("05010003") + b"\x0emx.example.com" + H("0019")),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_client_no_auth_connect(chunks: Chunker, host: str, request_bytes: bytes) -> None:
    client = Socks5Client(host, 25)
    assert feed_client(client, H("0500"), chunks) == request_bytes
    assert not client.done
    assert feed_client(client, SUCCESS_10_0_0_5_41234, chunks) == b""
    assert client.done
    assert client.bound_address == ("10.0.0.5", 41234)
    assert client.bind_reply_address is None
    assert client.trailing == b""


@chunkings
def test_client_kumomta_bind_then_connect_with_auth(chunks: Chunker) -> None:
    client = Socks5Client(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    assert client.initial_bytes() == AUTH_GREETING
    assert feed_client(client, H("0502"), chunks) == CREDENTIALS
    assert feed_client(client, H("0100"), chunks) == BIND_10_0_0_5
    assert feed_client(client, SUCCESS_10_0_0_5_0, chunks) == CONNECT_192_0_2_25
    assert client.bind_reply_address == ("10.0.0.5", 0)
    assert not client.done
    assert feed_client(client, SUCCESS_10_0_0_5_41234 + b"220 mx ESMTP\r\n", chunks) == b""
    assert client.done
    assert client.bound_address == ("10.0.0.5", 41234)
    assert client.trailing == b"220 mx ESMTP\r\n"


def test_client_bind_request_for_ipv6_source() -> None:
    client = Socks5Client("2001:db8::25", 25, bind_address=IPv6("2001:db8::5"))
    assert client.receive_data(H("0500")) == H("0502000420010db80000000000000000000000050000")


def test_client_merged_replies_in_one_chunk() -> None:
    client = Socks5Client(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    everything = H("0502") + H("0100") + SUCCESS_10_0_0_5_0 + SUCCESS_10_0_0_5_41234 + b"220"
    assert client.receive_data(everything) == CREDENTIALS + BIND_10_0_0_5 + CONNECT_192_0_2_25
    assert client.done
    assert client.trailing == b"220"


def test_client_trailing_keeps_bytes_fed_after_done() -> None:
    client = Socks5Client("192.0.2.25", 25)
    client.receive_data(H("0500"))
    client.receive_data(SUCCESS_10_0_0_5_41234 + b"22")
    assert client.receive_data(b"0 ") == b""
    assert client.trailing == b"220 "


@chunkings
def test_client_parses_domain_and_ipv6_bound_addresses(chunks: Chunker) -> None:
    client = Socks5Client("192.0.2.25", 25)
    feed_client(client, H("0500"), chunks)
    feed_client(client, H("05000003") + b"\x09proxy.lan" + H("0050"), chunks)
    assert client.bound_address == ("proxy.lan", 80)

    client = Socks5Client("192.0.2.25", 25)
    feed_client(client, H("0500"), chunks)
    feed_client(client, H("0500000420010db80000000000000000000000050019"), chunks)
    assert client.bound_address == ("2001:db8::5", 25)


def client_error(client: Socks5Client, data: bytes) -> Socks5ClientError:
    with pytest.raises(Socks5ClientError) as info:
        client.receive_data(data)
    return info.value


def test_client_method_ff_is_an_error() -> None:
    error = client_error(Socks5Client("192.0.2.25", 25), H("05ff"))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "none of the offered" in str(error)


@pytest.mark.parametrize("method", ["01", "02", "03", "80"])
def test_client_unoffered_method_is_an_error(method: str) -> None:
    error = client_error(Socks5Client("192.0.2.25", 25), H("05" + method))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "not offered" in str(error)


def test_client_wrong_version_in_method_choice() -> None:
    error = client_error(Socks5Client("192.0.2.25", 25), H("0400"))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "version 0x04" in str(error)


@pytest.mark.parametrize("status", ["01", "ff"])
def test_client_auth_failure(status: str) -> None:
    client = Socks5Client("192.0.2.25", 25, username="pool", password="wrong")
    client.receive_data(H("0502"))
    error = client_error(client, H("01" + status))
    assert (error.stage, error.reply) == ("auth", None)


def test_client_accepts_socks_version_in_auth_reply() -> None:
    client = Socks5Client("192.0.2.25", 25, username="pool", password="secret")
    client.receive_data(H("0502"))
    assert client.receive_data(H("0500")) == CONNECT_192_0_2_25


def test_client_rejects_garbage_auth_reply_version() -> None:
    client = Socks5Client("192.0.2.25", 25, username="pool", password="secret")
    client.receive_data(H("0502"))
    assert client_error(client, H("0200")).stage == "auth"


def test_client_bind_refused() -> None:
    client = Socks5Client("192.0.2.25", 25, bind_address=IPv4("10.0.0.5"))
    client.receive_data(H("0500"))
    error = client_error(client, H("05020001000000000000"))
    assert error.stage == "bind"
    assert error.reply is Reply.NOT_ALLOWED


@pytest.mark.parametrize("code", [*range(1, 10), 0xFF])
def test_client_connect_refused_with_each_code(code: int) -> None:
    client = Socks5Client("192.0.2.25", 25)
    client.receive_data(H("0500"))
    error = client_error(client, bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    assert error.stage == "connect"
    assert error.reply == code
    assert isinstance(error.reply, Reply) == (code <= 8)
    assert not client.done


def test_client_unknown_atyp_in_reply() -> None:
    client = Socks5Client("192.0.2.25", 25)
    client.receive_data(H("0500"))
    error = client_error(client, H("05000009"))
    assert (error.stage, error.reply) == ("connect", None)
    assert "address type 0x09" in str(error)


def test_client_wrong_version_in_reply() -> None:
    client = Socks5Client("192.0.2.25", 25)
    client.receive_data(H("0500"))
    error = client_error(client, H("04000001"))
    assert (error.stage, error.reply) == ("connect", None)


@pytest.mark.parametrize(
    ("before", "stage"),
    [(H("05"), "greeting"), (H("0500"), "connect"), (H("050005"), "connect")],
)
def test_client_eof_before_done_is_an_error(before: bytes, stage: str) -> None:
    client = Socks5Client("192.0.2.25", 25)
    client.receive_data(before)
    assert client.stage == stage
    error = client_error(client, b"")
    assert (error.stage, error.reply) == (stage, None)
    assert "closed the connection" in str(error)
    assert client.stage == "error"


def test_client_stage_follows_the_handshake() -> None:
    client = Socks5Client(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    stages = [client.stage]
    for reply in (H("0502"), H("0100"), SUCCESS_10_0_0_5_0, SUCCESS_10_0_0_5_41234):
        client.receive_data(reply)
        stages.append(client.stage)
    assert stages == ["greeting", "auth", "bind", "connect", "done"]
    assert client.receive_data(b"") == b""


def test_client_error_is_sticky() -> None:
    client = Socks5Client("192.0.2.25", 25)
    first = client_error(client, H("05ff"))
    assert client_error(client, H("0500")) is first


@pytest.mark.parametrize(
    ("host", "port", "username", "password"),
    [
        ("192.0.2.25", 65536, None, None),
        ("192.0.2.25", -1, None, None),
        ("a" * 256, 25, None, None),
        ("", 25, None, None),
        ("bad..name", 25, None, None),
        ("192.0.2.25", 25, "u" * 256, "p"),
        ("192.0.2.25", 25, "", "p"),
        ("192.0.2.25", 25, "u", "p" * 256),
    ],
)
def test_client_rejects_unencodable_arguments(
    host: str, port: int, username: str | None, password: str | None
) -> None:
    with pytest.raises(ValueError):
        Socks5Client(host, port, username=username, password=password)


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------

Answer = Callable[[Socks5Server, Socks5ServerEvent], None]


def accept_everything(server: Socks5Server, event: Socks5ServerEvent) -> None:
    if isinstance(event, AuthRequest):
        server.accept_auth()
    elif isinstance(event, BindRequest):
        server.reply_success()
    elif isinstance(event, ConnectRequest):
        server.reply_success(IPv4("10.0.0.5"), 41234)


def drain(server: Socks5Server, answer: Answer) -> list[Socks5ServerEvent]:
    """Pull events until the machine needs data, closed or is done, answering each one."""
    events: list[Socks5ServerEvent] = []
    while not server.done:
        event = server.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
        if isinstance(event, Closed):
            break
        answer(server, event)
    return events


def run_server(
    server: Socks5Server, data: bytes, chunks: Chunker, answer: Answer = accept_everything
) -> tuple[list[Socks5ServerEvent], bytes]:
    events: list[Socks5ServerEvent] = []
    for chunk in chunks(data):
        if server.done or server.closed:
            break
        server.receive_data(chunk)
        events += drain(server, answer)
    return events, server.data_to_send()


@chunkings
@pytest.mark.parametrize(
    ("request_bytes", "expected", "reply"),
    [
        (
            CONNECT_192_0_2_25,
            ConnectRequest(IPv4("192.0.2.25"), 25, 1),
            SUCCESS_10_0_0_5_41234,
        ),
        (
            H("0501000420010db80000000000000000000000250019"),
            ConnectRequest(IPv6("2001:db8::25"), 25, 4),
            H("0500000400000000000000000000ffff0a000005a112"),
        ),
        (
            H("05010003") + b"\x0emx.example.com" + H("0019"),
            ConnectRequest("mx.example.com", 25, 3),
            SUCCESS_10_0_0_5_41234,
        ),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_server_no_auth_connect(
    chunks: Chunker, request_bytes: bytes, expected: ConnectRequest, reply: bytes
) -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + request_bytes, chunks)
    assert events == [expected]
    assert out == H("0500") + reply
    assert server.done
    assert server.trailing_data == b""


@chunkings
def test_server_auth_accepted(chunks: Chunker) -> None:
    server = Socks5Server(require_auth=True)
    events, out = run_server(server, AUTH_GREETING + CREDENTIALS + CONNECT_192_0_2_25, chunks)
    assert events == [AuthRequest("pool", "secret"), ConnectRequest(IPv4("192.0.2.25"), 25, 1)]
    assert out == H("0502") + H("0100") + SUCCESS_10_0_0_5_41234
    assert server.done


@chunkings
def test_server_auth_denied(chunks: Chunker) -> None:
    def deny(server: Socks5Server, event: Socks5ServerEvent) -> None:
        server.deny_auth()

    server = Socks5Server(require_auth=True)
    events, out = run_server(server, AUTH_GREETING + CREDENTIALS + CONNECT_192_0_2_25, chunks, deny)
    assert events == [AuthRequest("pool", "secret"), Closed("username/password denied")]
    assert out == H("0502") + H("0101")
    assert server.closed


def test_server_prefers_user_pass_even_when_not_required() -> None:
    server = Socks5Server(require_auth=False)
    server.receive_data(H("05020002"))
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == H("0502")


@chunkings
def test_server_requires_auth_but_client_offers_only_no_auth(chunks: Chunker) -> None:
    server = Socks5Server(require_auth=True)
    events, out = run_server(server, NO_AUTH_GREETING + CONNECT_192_0_2_25, chunks)
    assert [type(e) for e in events] == [Closed]
    assert out == H("05ff")


def test_server_rejects_greeting_without_methods() -> None:
    server = Socks5Server()
    events, out = run_server(server, H("0500"), whole)
    assert [type(e) for e in events] == [Closed]
    assert out == H("05ff")


def test_server_auth_fields_are_lossless_for_non_utf8_bytes() -> None:
    server = Socks5Server()
    server.receive_data(AUTH_GREETING + H("0102ff4100"))
    event = server.next_event()
    assert isinstance(event, AuthRequest)
    assert event.username.encode("utf-8", "surrogateescape") == b"\xffA"
    assert event.password == ""
    assert "secret" not in repr(AuthRequest("u", "secret"))


@chunkings
def test_server_kumomta_bind_then_connect_byte_for_byte(chunks: Chunker) -> None:
    server = Socks5Server()
    client_bytes = AUTH_GREETING + CREDENTIALS + BIND_10_0_0_5 + CONNECT_192_0_2_25 + b"EHLO"
    events, out = run_server(server, client_bytes, chunks)
    assert events == [
        AuthRequest("pool", "secret"),
        BindRequest(IPv4("10.0.0.5"), 0, 1),
        ConnectRequest(IPv4("192.0.2.25"), 25, 1, bind_address=IPv4("10.0.0.5")),
    ]
    assert out == H("0502") + H("0100") + SUCCESS_10_0_0_5_0 + SUCCESS_10_0_0_5_41234
    assert server.done
    if chunks is whole:
        assert server.trailing_data == b"EHLO"


def test_server_bind_reply_can_carry_the_bound_port() -> None:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + BIND_10_0_0_5)
    assert isinstance(server.next_event(), BindRequest)
    server.reply_success(IPv4("10.0.0.5"), 41234)
    assert server.data_to_send() == H("0500") + SUCCESS_10_0_0_5_41234


@chunkings
def test_server_bind_refused(chunks: Chunker) -> None:
    def refuse_bind(server: Socks5Server, event: Socks5ServerEvent) -> None:
        assert isinstance(event, BindRequest)
        server.reply_failure(Reply.NOT_ALLOWED)

    server = Socks5Server()
    events, out = run_server(
        server, NO_AUTH_GREETING + BIND_10_0_0_5 + CONNECT_192_0_2_25, chunks, refuse_bind
    )
    assert [type(e) for e in events] == [BindRequest, Closed]
    assert out == H("0500") + H("05020001000000000000")


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
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + BIND_10_0_0_5 + second, chunks)
    assert [type(e) for e in events] == [BindRequest, Closed]
    assert out == H("0500") + SUCCESS_10_0_0_5_0 + H("05070001000000000000")
    assert server.closed


def test_server_eof_right_after_bind_gets_07() -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + BIND_10_0_0_5, whole)
    assert [type(e) for e in events] == [BindRequest]
    server.receive_data(b"")
    event = server.next_event()
    assert isinstance(event, Closed)
    assert out + server.data_to_send() == H("0500") + SUCCESS_10_0_0_5_0 + H("05070001000000000000")


@pytest.mark.parametrize("command", ["03", "09"])
def test_server_udp_associate_or_unknown_command_first_gets_07(command: str) -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H(f"05{command}0001c00002190019"), whole)
    assert [type(e) for e in events] == [Closed]
    assert out == H("0500") + H("05070001000000000000")


@chunkings
def test_server_unknown_atyp_gets_08(chunks: Chunker) -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("05010009") + b"\x00" * 8, chunks)
    assert [type(e) for e in events] == [Closed]
    assert out == H("0500") + H("05080001000000000000")


def test_server_wrong_version_in_greeting_closes_silently() -> None:
    server = Socks5Server()
    events, out = run_server(server, H("040100"), whole)
    assert [type(e) for e in events] == [Closed]
    assert out == b""


@chunkings
def test_server_wrong_version_in_request_gets_01(chunks: Chunker) -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("04010004") + b"\x00" * 18, chunks)
    assert [type(e) for e in events] == [Closed]
    assert out == H("0500") + H("05010004") + b"\x00" * 18  # IPv6 request -> IPv6 reply


def test_server_wrong_auth_version_gets_auth_failure() -> None:
    server = Socks5Server()
    events, out = run_server(server, AUTH_GREETING + H("05"), whole)
    assert [type(e) for e in events] == [Closed]
    assert out == H("0502") + H("0101")


def test_server_empty_domain_name_gets_01() -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + H("05010003000019"), whole)
    assert [type(e) for e in events] == [Closed]
    assert out == H("0500") + H("05010001000000000000")


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
    def answer(server: Socks5Server, event: Socks5ServerEvent) -> None:
        server.reply_success(bound, 41234)

    server = Socks5Server()
    _, out = run_server(server, NO_AUTH_GREETING + request_bytes, whole, answer)
    assert out == H("0500") + reply


def test_server_failure_reply_to_ipv6_request_is_ipv6() -> None:
    def refuse(server: Socks5Server, event: Socks5ServerEvent) -> None:
        server.reply_failure(Reply.CONNECTION_REFUSED)

    server = Socks5Server()
    request = H("0501000420010db80000000000000000000000250019")
    events, out = run_server(server, NO_AUTH_GREETING + request, whole, refuse)
    assert [type(e) for e in events] == [ConnectRequest, Closed]
    assert out == H("0500") + H("05050004") + b"\x00" * 18


def test_reply_address_for_unspecified() -> None:
    assert reply_address_for(1, None) == IPv4("0.0.0.0")
    assert reply_address_for(4, None) == IPv6("::")
    assert reply_address_for(3, None) == IPv4("0.0.0.0")


def test_server_keeps_pipelined_early_data_for_the_destination() -> None:
    server = Socks5Server()
    events, out = run_server(server, NO_AUTH_GREETING + CONNECT_192_0_2_25 + b"EHLO x\r\n", whole)
    assert [type(e) for e in events] == [ConnectRequest]
    assert out == H("0500") + SUCCESS_10_0_0_5_41234
    assert server.done
    assert server.trailing_data == b"EHLO x\r\n"


def test_server_caps_its_buffer() -> None:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + H("0501"))
    assert server.next_event() is NEED_DATA
    server.receive_data(b"\x03" * MAX_SERVER_BUFFER_SIZE)
    event = server.next_event()
    assert isinstance(event, Closed)
    assert "more than" in event.reason


def test_server_answers_after_overflow_are_ignored() -> None:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25)
    assert isinstance(server.next_event(), ConnectRequest)
    server.data_to_send()
    server.receive_data(b"x" * (MAX_SERVER_BUFFER_SIZE + 1))
    server.reply_success(IPv4("10.0.0.5"), 1)
    assert not server.done
    assert server.data_to_send() == b""
    assert isinstance(server.next_event(), Closed)


def test_server_eof_mid_message_closes_without_reply() -> None:
    server = Socks5Server()
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25[:5])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    assert isinstance(server.next_event(), Closed)
    assert server.data_to_send() == H("0500")


def test_server_usage_errors() -> None:
    server = Socks5Server()
    with pytest.raises(Socks5ServerUsageError):
        server.accept_auth()
    server.receive_data(NO_AUTH_GREETING + CONNECT_192_0_2_25)
    assert isinstance(server.next_event(), ConnectRequest)
    with pytest.raises(Socks5ServerUsageError):
        server.next_event()
    with pytest.raises(ValueError):
        server.reply_failure(0)
    server.reply_success()
    with pytest.raises(Socks5ServerUsageError):
        server.receive_data(b"more")


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
    client = Socks5Client("2001:db8::25", 25, bind_address=bind, **credentials)
    server = Socks5Server(require_auth=with_auth)
    seen: list[Socks5ServerEvent] = []

    def answer(server: Socks5Server, event: Socks5ServerEvent) -> None:
        seen.append(event)
        accept_everything(server, event)

    to_server = client.initial_bytes()
    for _ in range(10):
        for chunk in chunks(to_server):
            server.receive_data(chunk)
            drain(server, answer)
        to_client = server.data_to_send()
        to_server = feed_client(client, to_client, chunks)
        if client.done:
            break
    assert client.done and server.done
    assert client.bound_address == ("::ffff:a00:5", 41234)
    assert seen[-1] == ConnectRequest(IPv6("2001:db8::25"), 25, 4, bind_address=bind)
    assert [type(e) for e in seen] == (
        [AuthRequest] * with_auth + [BindRequest] * (bind is not None) + [ConnectRequest]
    )


# ---------------------------------------------------------------------------------------
# Property tests: no input makes a machine raise anything but its own error
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


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [piece for piece in pieces if piece]


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(SERVER_PREFIXES),
    tail=st.binary(max_size=600),
    require_auth=st.booleans(),
    data=st.data(),
)
def test_server_never_raises_on_any_input(
    prefix: bytes, tail: bytes, require_auth: bool, data: st.DataObject
) -> None:
    payload = prefix + tail
    pieces = data.draw(split_points(payload))
    server = Socks5Server(require_auth=require_auth)
    for piece in pieces:
        if server.done or server.closed:
            break
        server.receive_data(piece)
        drain(server, accept_everything)
    if not server.done:
        server.receive_data(b"")
        events = drain(server, accept_everything)
        # After EOF the machine must reach an end: done or closed, never NEED_DATA.
        assert server.done or (events and isinstance(events[-1], Closed))
    server.data_to_send()


CLIENT_PREFIXES = [b"", H("0500"), H("0502"), H("0502") + H("0100"), H("0500") + H("05000001")]


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(CLIENT_PREFIXES),
    tail=st.binary(max_size=600),
    bind=st.booleans(),
    data=st.data(),
)
def test_client_raises_only_its_own_error(
    prefix: bytes, tail: bytes, bind: bool, data: st.DataObject
) -> None:
    client = Socks5Client(
        "192.0.2.25",
        25,
        username="pool",
        password="secret",
        bind_address=IPv4("10.0.0.5") if bind else None,
    )
    try:
        for piece in data.draw(split_points(prefix + tail)):
            client.receive_data(piece)
    except Socks5ClientError as exc:
        assert exc.stage in ("greeting", "auth", "bind", "connect")
