"""Tests for egressd.proto.proxy: building v2 and reading v1/v2 incrementally."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from chunking import Splitter as Chunker
from chunking import bytewise, chunkings, whole
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from egressd.proto import NEED_DATA, RemoteProtocolError
from egressd.proto.proxy import (
    SHORTEST_HEADER,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    build_v1,
    build_v2,
)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
H = bytes.fromhex


def feed(reader: ProxyHeaderReader, data: bytes) -> ProxyHeader | None:
    """Feed ``data``; the header once complete, else None (errors propagate)."""
    reader.receive_data(data)
    event = reader.next_event()
    return None if event is NEED_DATA else event


def result(reader: ProxyHeaderReader) -> ProxyHeader | None:
    """The header the reader has, or None (incomplete or broken)."""
    try:
        event = reader.next_event()
    except ProxyHeaderError:
        return None
    return None if event is NEED_DATA else event


def read_all(data: bytes, chunks: Chunker) -> ProxyHeaderReader:
    reader = ProxyHeaderReader()
    for chunk in chunks(data):
        feed(reader, chunk)
    return reader


def read_honouring_max_read(stream: bytes) -> tuple[ProxyHeader, bytes, list[int]]:
    """Act as a driver that reads exactly max_read() bytes at a time from ``stream``."""
    reader = ProxyHeaderReader()
    reads: list[int] = []
    header = None
    while header is None:
        n = reader.max_read()
        assert n > 0
        reads.append(n)
        chunk, stream = stream[:n], stream[n:]
        assert chunk, "the driver ran out of stream before the header ended"
        header = feed(reader, chunk)
    assert reader.trailing_data == b""
    assert reader.max_read() == 0
    return header, stream, reads


# ---------------------------------------------------------------------------------------
# build_v2
# ---------------------------------------------------------------------------------------


def test_build_v2_ipv4_byte_for_byte() -> None:
    header = build_v2(IPv4("10.0.0.5"), 0, IPv4("192.0.2.25"), 25)
    assert header == V2_SIGNATURE + H("2111000c0a000005c000021900000019")


def test_build_v2_ipv6_byte_for_byte() -> None:
    header = build_v2(IPv6("2001:db8::5"), 0, IPv6("2001:db8::25"), 2525)
    assert header == V2_SIGNATURE + H(
        "2121002420010db800000000000000000000000520010db8000000000000000000000025000009dd"
    )


@pytest.mark.parametrize(
    ("src", "dst"),
    [(IPv4("10.0.0.5"), IPv6("2001:db8::25")), (IPv6("::ffff:10.0.0.5"), IPv4("192.0.2.25"))],
)
def test_build_v2_refuses_mixed_families(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    with pytest.raises(ValueError, match="one address family"):
        build_v2(src, 0, dst, 25)


@pytest.mark.parametrize(("src_port", "dst_port"), [(-1, 25), (0, 65536)])
def test_build_v2_refuses_bad_ports(src_port: int, dst_port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        build_v2(IPv4("10.0.0.5"), src_port, IPv4("192.0.2.25"), dst_port)


def test_build_v2_is_parsed_by_proxyprotocol_ipv4() -> None:
    result = ProxyProtocolV2().unpack(build_v2(IPv4("10.0.0.5"), 0, IPv4("192.0.2.25"), 25))
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (IPv4("10.0.0.5"), 0)
    assert result.dest == (IPv4("192.0.2.25"), 25)
    assert result.protocol == socket.SOCK_STREAM


def test_build_v2_is_parsed_by_proxyprotocol_ipv6() -> None:
    result = ProxyProtocolV2().unpack(build_v2(IPv6("2001:db8::5"), 1, IPv6("2001:db8::25"), 25))
    assert isinstance(result, ProxyResultIPv6)
    assert result.source == (IPv6("2001:db8::5"), 1)
    assert result.dest == (IPv6("2001:db8::25"), 25)
    assert result.protocol == socket.SOCK_STREAM


def test_build_v1_is_parsed_by_proxyprotocol() -> None:
    line = build_v1(IPv4("10.0.0.5"), 40000, IPv4("192.0.2.25"), 25)
    assert line == b"PROXY TCP4 10.0.0.5 192.0.2.25 40000 25\r\n"
    result = ProxyProtocolV1().unpack(line)
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (IPv4("10.0.0.5"), 40000)


# ---------------------------------------------------------------------------------------
# Reader: valid headers
# ---------------------------------------------------------------------------------------

VALID = [
    (
        build_v2(IPv4("10.0.0.5"), 0, IPv4("192.0.2.25"), 25),
        ProxyHeader(2, False, IPv4("10.0.0.5"), 0, IPv4("192.0.2.25"), 25),
    ),
    (
        build_v2(IPv6("2001:db8::5"), 4242, IPv6("2001:db8::25"), 25),
        ProxyHeader(2, False, IPv6("2001:db8::5"), 4242, IPv6("2001:db8::25"), 25),
    ),
    (V2_SIGNATURE + H("20000000"), ProxyHeader(2, True)),  # LOCAL (health check)
    (V2_SIGNATURE + H("21000000"), ProxyHeader(2, False)),  # PROXY, UNSPEC
    (V2_SIGNATURE + H("213100d8") + b"\0" * 216, ProxyHeader(2, False)),  # UNIX stream
    (  # TLVs after the addresses are skipped
        V2_SIGNATURE + H("21110013010203040506070800010002040004deadbeef"),
        ProxyHeader(2, False, IPv4("1.2.3.4"), 1, IPv4("5.6.7.8"), 2),
    ),
    (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        ProxyHeader(1, False, IPv4("192.0.2.1"), 56324, IPv4("198.51.100.2"), 25),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        ProxyHeader(1, False, IPv6("2001:db8::1"), 65535, IPv6("2001:db8::2"), 0),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, False)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, False)),
    (  # the longest v1 line: 107 bytes
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyHeader(1, False, IPv6("ffff:" * 7 + "ffff"), 65535, IPv6("ffff:" * 7 + "ffff"), 65535),
    ),
]
VALID_IDS = [
    "v2-ipv4",
    "v2-ipv6",
    "v2-local",
    "v2-unspec",
    "v2-unix",
    "v2-tlv",
    "v1-tcp4",
    "v1-tcp6",
    "v1-unknown",
    "v1-unknown-args",
    "v1-longest",
]


@chunkings
@pytest.mark.parametrize(("wire", "expected"), VALID, ids=VALID_IDS)
def test_reader_parses_valid_headers(chunks: Chunker, wire: bytes, expected: ProxyHeader) -> None:
    reader = read_all(wire + b"220 smtp\r\n", chunks)
    header = result(reader)
    assert header == expected
    assert header.has_addresses == (expected.src_ip is not None)
    assert reader.trailing_data == b"220 smtp\r\n"


@pytest.mark.parametrize(("wire", "expected"), VALID, ids=VALID_IDS)
def test_max_read_never_reads_past_the_header(wire: bytes, expected: ProxyHeader) -> None:
    header, rest, _ = read_honouring_max_read(wire + b"EHLO x\r\n")
    assert header == expected
    assert rest == b"EHLO x\r\n"


def test_max_read_sequence_for_v2_is_tight() -> None:
    _, _, reads = read_honouring_max_read(build_v2(IPv4("10.0.0.5"), 0, IPv4("192.0.2.25"), 25))
    assert reads == [SHORTEST_HEADER, 1, 12]


def test_max_read_for_v1_uses_the_shortest_line_of_the_protocol() -> None:
    _, _, reads = read_honouring_max_read(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert reads == [SHORTEST_HEADER, 32 - SHORTEST_HEADER]
    assert read_honouring_max_read(b"PROXY UNKNOWN\r\n")[2] == [SHORTEST_HEADER]


def test_max_read_before_and_after() -> None:
    reader = ProxyHeaderReader()
    assert reader.max_read() == SHORTEST_HEADER
    feed(reader, b"PROXY TCP4 1.2.3.4 5.6.7.8 10 20\r")
    assert reader.max_read() == 1
    feed(reader, b"\n")
    assert reader.max_read() == 0


def test_feed_after_done_goes_to_leftover() -> None:
    reader = ProxyHeaderReader()
    feed(reader, b"PROXY UNKNOWN\r\nab")
    assert feed(reader, b"cd") == ProxyHeader(1, False)
    assert reader.trailing_data == b"abcd"


def test_reader_parses_proxyprotocol_built_headers_with_crc_tlv() -> None:
    built = ProxyProtocolV2().pack(
        ProxyResultIPv6(
            (IPv6("2001:db8::1"), 1), (IPv6("2001:db8::2"), 2), protocol=socket.SOCK_STREAM
        )
    )
    reader = read_all(built, bytewise)
    assert result(reader) == ProxyHeader(2, False, IPv6("2001:db8::1"), 1, IPv6("2001:db8::2"), 2)
    local = ProxyProtocolV2().pack(ProxyResultLocal())
    assert result(read_all(local, whole)) == ProxyHeader(2, True)


# ---------------------------------------------------------------------------------------
# Reader: malformed headers
# ---------------------------------------------------------------------------------------

INVALID = [
    (b"EHLO example.com\r\n", "not a PROXY protocol header"),
    (b"PROXY\r\n", "not a PROXY protocol header"),
    (b"PROXZ TCP4", "not a PROXY protocol header"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "not an IP address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "not ASCII"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "longer than 107"),
    (V2_SIGNATURE[:5] + b"X", "signature"),
    (V2_SIGNATURE + H("11110000"), "version nibble 1"),
    (V2_SIGNATURE + H("22110000"), "unknown command"),
    (V2_SIGNATURE + H("2111000b") + b"\0" * 11, "too short"),
    (V2_SIGNATURE + H("21210023") + b"\0" * 35, "too short"),
    (V2_SIGNATURE + H("21120000") + b"\0" * 12, "too short"),
    (V2_SIGNATURE + H("2112000c") + b"\0" * 12, "not TCP"),
    (V2_SIGNATURE + H("2141000c") + b"\0" * 12, "unknown address family"),
    (V2_SIGNATURE + H("2111") + struct.pack("!H", V2_MAX_PAYLOAD + 1), "exceeds"),
]


@chunkings
@pytest.mark.parametrize(("wire", "message"), INVALID, ids=[repr(w[:24]) for w, _ in INVALID])
def test_reader_rejects_malformed_headers(chunks: Chunker, wire: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        read_all(wire, chunks)


def test_reader_error_is_sticky() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError) as first:
        feed(reader, b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyHeaderError) as second:
        feed(reader, b"PROXY UNKNOWN\r\n")
    assert second.value is first.value
    assert reader.max_read() == 0


def test_reader_fails_fast_on_a_non_proxy_first_byte() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        feed(reader, b"E")


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------

READER_PREFIXES = [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE[:6]]


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [piece for piece in pieces if piece]


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(READER_PREFIXES), tail=st.binary(max_size=300), data=st.data())
def test_reader_raises_only_proxy_header_error(
    prefix: bytes, tail: bytes, data: st.DataObject
) -> None:
    reader = ProxyHeaderReader()
    fed = b""
    try:
        for piece in data.draw(split_points(prefix + tail)):
            fed += piece
            if feed(reader, piece) is not None:
                break
    except ProxyHeaderError:
        assert result(reader) is None
        return
    if result(reader) is not None:
        header_length = len(fed) - len(reader.trailing_data)
        assert 0 < header_length <= max(16 + V2_MAX_PAYLOAD, 107)
    else:
        assert reader.max_read() > 0


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(READER_PREFIXES), tail=st.binary(max_size=300), after=st.binary())
def test_max_read_never_overshoots_on_any_input(prefix: bytes, tail: bytes, after: bytes) -> None:
    """Reading max_read() at a time, a header found in a stream never swallows what follows."""
    stream = prefix + tail
    reader = ProxyHeaderReader()
    consumed = 0
    try:
        while result(reader) is None and consumed < len(stream):
            n = reader.max_read()
            assert n > 0
            feed(reader, stream[consumed : consumed + n])
            consumed += n
    except ProxyHeaderError:
        return
    assert reader.trailing_data == b""
    if result(reader) is not None:
        # The same bytes fed in one go must end the header at exactly the same place.
        again = ProxyHeaderReader()
        feed(again, stream[:consumed] + after)
        assert again.trailing_data == after
        assert result(again) == result(reader)


@settings(max_examples=300, deadline=None)
@given(
    src=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    src_port=st.integers(0, 65535),
    dst_port=st.integers(0, 65535),
    data=st.data(),
)
def test_build_v2_round_trips_through_the_reader(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    src_port: int,
    dst_port: int,
    data: st.DataObject,
) -> None:
    dst = data.draw(st.ip_addresses(v=src.version))
    for build in (build_v1, build_v2):
        wire = build(src, src_port, dst, dst_port)
        header, rest, _ = read_honouring_max_read(wire + b"MAIL")
        assert (header.src_ip, header.src_port, header.dst_ip, header.dst_port) == (
            src,
            src_port,
            dst,
            dst_port,
        )
        assert rest == b"MAIL"


@pytest.mark.parametrize("before", [b"", b"PROXY TCP4 1.2.3.4", V2_SIGNATURE[:5]])
def test_eof_before_the_header_is_the_peers_protocol_error(before: bytes) -> None:
    reader = ProxyHeaderReader()
    if before:
        reader.receive_data(before)
    assert reader.next_event() is NEED_DATA
    assert not reader.eof
    reader.receive_data(b"")
    with pytest.raises(ProxyHeaderError, match="closed before a complete") as first:
        reader.next_event()
    assert isinstance(first.value, RemoteProtocolError)
    assert first.value.reply is None
    assert reader.eof
    with pytest.raises(ProxyHeaderError) as again:
        reader.next_event()
    assert again.value is first.value
