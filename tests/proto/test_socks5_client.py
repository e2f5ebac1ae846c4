"""Tests for egressd.proto.socks5_client: byte-exact transcripts, fed whole and one byte at a time.

The machine (:class:`Socks5Client`) is tested for its shape and its errors; the handshake
egressd's dialer runs (:class:`Socks5Handshake`) for every transcript.
"""

from __future__ import annotations

import ipaddress

import pytest
from chunking import Splitter as Chunker
from chunking import chunkings
from hypothesis import given, settings
from hypothesis import strategies as st
from socks5_wire import (
    AUTH_GREETING,
    BIND_10_0_0_5,
    CONNECT_192_0_2_25,
    CREDENTIALS,
    SUCCESS_10_0_0_5_0,
    SUCCESS_10_0_0_5_41234,
    H,
    split_points,
)

from egressd.proto import NEED_DATA, LocalProtocolError, RemoteProtocolError, socks5

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


def feed(handshake: socks5.Socks5Handshake, data: bytes, chunks: Chunker) -> bytes:
    return b"".join(handshake.receive_data(chunk) for chunk in chunks(data))


# ---------------------------------------------------------------------------------------
# The machine: h11's shape
# ---------------------------------------------------------------------------------------


def test_client_machine_events_for_bind_then_connect() -> None:
    client = socks5.Socks5Client()
    assert client.send(socks5.Greeting((0, 2))) == AUTH_GREETING
    assert client.next_event() is NEED_DATA
    client.receive_data(H("0502") + H("0100"))
    assert client.next_event() == socks5.MethodChoice(2)
    assert client.send(socks5.AuthRequest("pool", "secret")) == CREDENTIALS
    assert client.next_event() == socks5.AuthResult(accepted=True)
    assert client.send(socks5.BindRequest(IPv4("10.0.0.5"))) == BIND_10_0_0_5
    client.receive_data(SUCCESS_10_0_0_5_0)
    assert client.next_event() == socks5.Succeeded(IPv4("10.0.0.5"), 0)
    assert client.send(socks5.ConnectRequest(IPv4("192.0.2.25"), 25)) == CONNECT_192_0_2_25
    client.receive_data(SUCCESS_10_0_0_5_41234 + b"220")
    assert client.next_event() == socks5.Succeeded(IPv4("10.0.0.5"), 41234)
    assert client.done
    assert client.trailing_data == b"220"


def test_client_machine_refusal_is_an_event_not_an_error() -> None:
    client = socks5.Socks5Client()
    client.send(socks5.Greeting((0,)))
    client.receive_data(H("0500"))
    assert client.next_event() == socks5.MethodChoice(0)
    client.send(socks5.ConnectRequest(IPv4("192.0.2.25"), 25))
    client.receive_data(H("05040001000000000000"))
    assert client.next_event() == socks5.Refused(socks5.ReplyCode.HOST_UNREACHABLE)
    assert client.state is socks5.ClientState.CLOSED


def test_client_machine_refuses_messages_out_of_turn() -> None:
    client = socks5.Socks5Client()
    with pytest.raises(LocalProtocolError):
        client.send(socks5.ConnectRequest(IPv4("192.0.2.25"), 25))
    with pytest.raises(LocalProtocolError):
        client.next_event()
    client.send(socks5.Greeting((0,)))
    with pytest.raises(LocalProtocolError):
        client.send(socks5.Greeting((0,)))
    with pytest.raises(LocalProtocolError):
        _ = client.trailing_data


def test_client_machine_protocol_error_is_sticky_and_remote() -> None:
    client = socks5.Socks5Client()
    client.send(socks5.Greeting((0,)))
    client.receive_data(H("0400"))
    with pytest.raises(socks5.Socks5ProtocolError) as first:
        client.next_event()
    assert isinstance(first.value, RemoteProtocolError)
    assert (first.value.stage, first.value.reply) == ("greeting", None)
    with pytest.raises(socks5.Socks5ProtocolError) as again:
        client.next_event()
    assert again.value is first.value
    assert client.state is socks5.ClientState.ERROR


# ---------------------------------------------------------------------------------------
# The handshake: transcripts
# ---------------------------------------------------------------------------------------


def test_client_greeting_offers_only_no_auth_without_credentials() -> None:
    assert socks5.Socks5Handshake("192.0.2.25", 25).initial_bytes() == H("050100")
    assert socks5.Socks5Handshake("192.0.2.25", 25, username="u").initial_bytes() == H("050100")


def test_client_greeting_offers_user_pass_when_both_are_set() -> None:
    handshake = socks5.Socks5Handshake("192.0.2.25", 25, username="u", password="p")
    assert handshake.initial_bytes() == H("05020002")


def started(handshake: socks5.Socks5Handshake) -> socks5.Socks5Handshake:
    handshake.initial_bytes()
    return handshake


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
    handshake = started(socks5.Socks5Handshake(host, 25))
    assert feed(handshake, H("0500"), chunks) == request_bytes
    assert not handshake.done
    assert feed(handshake, SUCCESS_10_0_0_5_41234, chunks) == b""
    assert handshake.done
    assert handshake.bound_address == ("10.0.0.5", 41234)
    assert handshake.bind_reply_address is None
    assert handshake.trailing == b""


@chunkings
def test_client_kumomta_bind_then_connect_with_auth(chunks: Chunker) -> None:
    handshake = socks5.Socks5Handshake(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    assert handshake.initial_bytes() == AUTH_GREETING
    assert feed(handshake, H("0502"), chunks) == CREDENTIALS
    assert feed(handshake, H("0100"), chunks) == BIND_10_0_0_5
    assert feed(handshake, SUCCESS_10_0_0_5_0, chunks) == CONNECT_192_0_2_25
    assert handshake.bind_reply_address == ("10.0.0.5", 0)
    assert not handshake.done
    assert feed(handshake, SUCCESS_10_0_0_5_41234 + b"220 mx ESMTP\r\n", chunks) == b""
    assert handshake.done
    assert handshake.bound_address == ("10.0.0.5", 41234)
    assert handshake.trailing == b"220 mx ESMTP\r\n"


def test_client_bind_request_for_ipv6_source() -> None:
    handshake = started(
        socks5.Socks5Handshake("2001:db8::25", 25, bind_address=IPv6("2001:db8::5"))
    )
    assert handshake.receive_data(H("0500")) == H("0502000420010db80000000000000000000000050000")


def test_client_merged_replies_in_one_chunk() -> None:
    handshake = socks5.Socks5Handshake(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    handshake.initial_bytes()
    everything = H("0502") + H("0100") + SUCCESS_10_0_0_5_0 + SUCCESS_10_0_0_5_41234 + b"220"
    assert handshake.receive_data(everything) == CREDENTIALS + BIND_10_0_0_5 + CONNECT_192_0_2_25
    assert handshake.done
    assert handshake.trailing == b"220"


def test_client_trailing_keeps_bytes_fed_after_done() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(H("0500"))
    handshake.receive_data(SUCCESS_10_0_0_5_41234 + b"22")
    assert handshake.receive_data(b"0 ") == b""
    assert handshake.trailing == b"220 "


@chunkings
def test_client_parses_domain_and_ipv6_bound_addresses(chunks: Chunker) -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    feed(handshake, H("0500"), chunks)
    feed(handshake, H("05000003") + b"\x09proxy.lan" + H("0050"), chunks)
    assert handshake.bound_address == ("proxy.lan", 80)

    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    feed(handshake, H("0500"), chunks)
    feed(handshake, H("0500000420010db80000000000000000000000050019"), chunks)
    assert handshake.bound_address == ("2001:db8::5", 25)


def test_client_shows_a_bound_name_that_is_no_dns_name_as_text() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(H("0500"))
    handshake.receive_data(H("05000003") + b"\x04a..b" + H("0050"))
    assert handshake.bound_address == ("a..b", 80)


def handshake_error(handshake: socks5.Socks5Handshake, data: bytes) -> socks5.HandshakeError:
    with pytest.raises(socks5.HandshakeError) as info:
        handshake.receive_data(data)
    return info.value


def test_client_method_ff_is_an_error() -> None:
    error = handshake_error(started(socks5.Socks5Handshake("192.0.2.25", 25)), H("05ff"))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "none of the offered" in str(error)


@pytest.mark.parametrize("method", ["01", "02", "03", "80"])
def test_client_unoffered_method_is_an_error(method: str) -> None:
    error = handshake_error(started(socks5.Socks5Handshake("192.0.2.25", 25)), H("05" + method))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "not offered" in str(error)
    assert isinstance(error.__cause__, socks5.Socks5ProtocolError)


def test_client_wrong_version_in_method_choice() -> None:
    error = handshake_error(started(socks5.Socks5Handshake("192.0.2.25", 25)), H("0400"))
    assert (error.stage, error.reply) == ("greeting", None)
    assert "version 0x04" in str(error)


@pytest.mark.parametrize("status", ["01", "ff"])
def test_client_auth_failure(status: str) -> None:
    handshake = socks5.Socks5Handshake("192.0.2.25", 25, username="pool", password="wrong")
    started(handshake).receive_data(H("0502"))
    error = handshake_error(handshake, H("01" + status))
    assert (error.stage, error.reply) == ("auth", None)


def test_client_accepts_socks_version_in_auth_reply() -> None:
    handshake = socks5.Socks5Handshake("192.0.2.25", 25, username="pool", password="secret")
    started(handshake).receive_data(H("0502"))
    assert handshake.receive_data(H("0500")) == CONNECT_192_0_2_25


def test_client_rejects_garbage_auth_reply_version() -> None:
    handshake = socks5.Socks5Handshake("192.0.2.25", 25, username="pool", password="secret")
    started(handshake).receive_data(H("0502"))
    assert handshake_error(handshake, H("0200")).stage == "auth"


def test_client_bind_refused() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25, bind_address=IPv4("10.0.0.5")))
    handshake.receive_data(H("0500"))
    error = handshake_error(handshake, H("05020001000000000000"))
    assert error.stage == "bind"
    assert error.reply is socks5.ReplyCode.NOT_ALLOWED


@pytest.mark.parametrize("code", [*range(1, 10), 0xFF])
def test_client_connect_refused_with_each_code(code: int) -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(H("0500"))
    error = handshake_error(handshake, bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    assert error.stage == "connect"
    assert error.reply == code
    assert isinstance(error.reply, socks5.ReplyCode) == (code <= 8)
    assert not handshake.done


def test_client_unknown_atyp_in_reply() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(H("0500"))
    error = handshake_error(handshake, H("05000009"))
    assert (error.stage, error.reply) == ("connect", None)
    assert "address type 0x09" in str(error)


def test_client_wrong_version_in_reply() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(H("0500"))
    error = handshake_error(handshake, H("04000001"))
    assert (error.stage, error.reply) == ("connect", None)


@pytest.mark.parametrize(
    ("before", "stage"),
    [(H("05"), "greeting"), (H("0500"), "connect"), (H("050005"), "connect")],
)
def test_client_eof_before_done_is_an_error(before: bytes, stage: str) -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    handshake.receive_data(before)
    assert handshake.stage == stage
    error = handshake_error(handshake, b"")
    assert (error.stage, error.reply) == (stage, None)
    assert "closed the connection" in str(error)
    assert handshake.stage == "error"


def test_client_stage_follows_the_handshake() -> None:
    handshake = socks5.Socks5Handshake(
        "192.0.2.25", 25, username="pool", password="secret", bind_address=IPv4("10.0.0.5")
    )
    handshake.initial_bytes()
    stages = [handshake.stage]
    for reply in (H("0502"), H("0100"), SUCCESS_10_0_0_5_0, SUCCESS_10_0_0_5_41234):
        handshake.receive_data(reply)
        stages.append(handshake.stage)
    assert stages == ["greeting", "auth", "bind", "connect", "done"]
    assert handshake.receive_data(b"") == b""


def test_client_error_is_sticky() -> None:
    handshake = started(socks5.Socks5Handshake("192.0.2.25", 25))
    first = handshake_error(handshake, H("05ff"))
    assert handshake_error(handshake, H("0500")) is first


@pytest.mark.parametrize(
    ("host", "port", "username", "password"),
    [
        ("192.0.2.25", 65536, None, None),
        ("192.0.2.25", -1, None, None),
        ("a" * 256, 25, None, None),
        ("", 25, None, None),
        ("bad..name", 25, None, None),
        (".", 25, None, None),
        ("a" * 64 + ".example", 25, None, None),
        ("192.0.2.25", 25, "u" * 256, "p"),
        ("192.0.2.25", 25, "", "p"),
        ("192.0.2.25", 25, "u", "p" * 256),
    ],
)
def test_client_rejects_unencodable_arguments(
    host: str, port: int, username: str | None, password: str | None
) -> None:
    with pytest.raises(LocalProtocolError):
        socks5.Socks5Handshake(host, port, username=username, password=password)


# ---------------------------------------------------------------------------------------
# Property test: no input makes the handshake raise anything but its own error
# ---------------------------------------------------------------------------------------

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
    handshake = socks5.Socks5Handshake(
        "192.0.2.25",
        25,
        username="pool",
        password="secret",
        bind_address=IPv4("10.0.0.5") if bind else None,
    )
    handshake.initial_bytes()
    try:
        for piece in data.draw(split_points(prefix + tail)):
            handshake.receive_data(piece)
    except socks5.HandshakeError as exc:
        assert exc.stage in ("greeting", "auth", "bind", "connect")
