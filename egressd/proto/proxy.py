"""PROXY protocol headers (HAProxy's "PROXY protocol" spec, versions 1 and 2), sans-IO.

Theory of operation
-------------------
The PROXY protocol (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt) prefixes a
TCP stream with the addresses of the connection a proxy accepted, so the next hop learns
the original endpoints. egressd uses it in both directions:

* Outbound, towards HAProxy: :func:`build_v2` makes the header KumoMTA sends -- v2, command
  PROXY, TCP over IPv4 (``0x11``) or IPv6 (``0x21``), no TLVs. It goes out in one write.
* Inbound, on the PROXY-protocol front door: :class:`ProxyHeaderReader` reads a v1 or v2
  header from a stream fed in arbitrary chunks. It has h11's shape
  (:mod:`egressd.proto.machine`): ``receive_data(data)`` (``b""`` is EOF), ``next_event()``
  returns the :class:`ProxyHeader` or :data:`NEED_DATA`; the protocol has no answer, so
  the only ``send`` is :func:`build_v2` / :func:`build_v1`, used by the dialer.

Wire layout (spec sections 2.1 and 2.2)::

    v1  "PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF    (<= 107 bytes)
        "PROXY UNKNOWN" [anything] CRLF                                       (<= 107 bytes)
    v2  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A    12-byte signature
        VER|CMD  (0x20 LOCAL, 0x21 PROXY)
        FAM|PROTO (0x11 TCP/IPv4, 0x21 TCP/IPv6, 0x00 UNSPEC, 0x31 UNIX stream ...)
        LEN      big-endian 16 bits: the bytes that follow (addresses, then TLVs)
        IPv4: src(4) dst(4) sport(2) dport(2); IPv6: src(16) dst(16) sport(2) dport(2)

The header must be read without consuming a byte past it: whatever follows belongs to the
proxied stream (an SMTP client may speak first right after it). The reader therefore
tells the driver how much it may read next, :meth:`ProxyHeaderReader.max_read`, and that
number never reaches past the end of the header, so a driver that honours it needs no
``MSG_PEEK``. It relies on lower bounds of the header's length:

* nothing read yet: 15, the shortest valid header (``PROXY UNKNOWN\\r\\n``; v2 is >= 16);
* v2: 16 minus what is buffered until the fixed part is known, then exactly the rest;
* v1: the shortest valid line that still fits what was read (e.g. 32 bytes for TCP4,
  ``PROXY TCP4 0.0.0.0 0.0.0.0 0 0\\r\\n``) minus what is buffered, and at least 2 (the CRLF)
  or 1 when the buffer ends in CR.

A driver that feeds more than that anyway finds the surplus in ``trailing_data``. Headers
that carry no usable addresses (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``UNSPEC`` or ``UNIX``)
give a :class:`ProxyHeader` whose addresses are None: the receiver then uses the real
endpoints. Malformed input, or EOF before the header is complete, makes ``next_event()``
raise :class:`ProxyHeaderError` (the peer's protocol error; the protocol has no reply, so
its ``reply`` hint is always None) and nothing else, again on every later call.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from egressd.addresses import IPAddress
from egressd.proto.machine import NEED_DATA, NeedData, RemoteProtocolError

__all__ = [
    "SHORTEST_HEADER",
    "V1_MAX_LENGTH",
    "V2_MAX_PAYLOAD",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "build_v1",
    "build_v2",
]


V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107  # including CRLF (spec section 2.1)
V2_FIXED_LENGTH: Final = 16  # signature, ver/cmd, fam/proto, length
# Largest v2 LEN accepted: addresses plus TLVs. The spec allows 65535; real proxies send a
# few hundred bytes at most (a UNIX block is 216), so a bigger value is refused.
V2_MAX_PAYLOAD: Final = 4096
SHORTEST_HEADER: Final = len(b"PROXY UNKNOWN\r\n")

V2_CMD_LOCAL: Final = 0x0
V2_CMD_PROXY: Final = 0x1
V2_FAMILY_UNSPEC: Final = 0x0
V2_FAMILY_INET: Final = 0x1
V2_FAMILY_INET6: Final = 0x2
V2_FAMILY_UNIX: Final = 0x3
V2_PROTO_STREAM: Final = 0x1
V2_ADDRESS_LENGTH: Final = {V2_FAMILY_INET: 12, V2_FAMILY_INET6: 36, V2_FAMILY_UNIX: 216}

# The shortest complete v1 line for each protocol word: a lower bound for max_read().
_V1_SHORTEST: Final = {
    b"TCP4": len(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
    b"TCP6": len(b"PROXY TCP6 :: :: 0 0\r\n"),
    b"UNKNOWN": SHORTEST_HEADER,
}


class ProxyHeaderError(RemoteProtocolError[None]):
    """The bytes are not a valid PROXY protocol header (or ended before one was complete)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. Addresses are None when the header carries none to use."""

    version: Literal[1, 2]
    local: bool  # v2 LOCAL command: the proxy's own connection (health check)
    src_ip: IPAddress | None = None
    src_port: int | None = None
    dst_ip: IPAddress | None = None
    dst_port: int | None = None

    @property
    def has_addresses(self) -> bool:
        """True when src/dst are set; otherwise use the connection's real endpoints."""
        return self.src_ip is not None


def build_v2(src: IPAddress, src_port: int, dst: IPAddress, dst_port: int) -> bytes:
    """PROXY v2, command PROXY, TCP over IPv4 or IPv6, no TLVs (what KumoMTA sends).

    ``src`` and ``dst`` must be of the same family: the header has one family byte, and
    mixing would need an IPv4-mapped address that HAProxy's transparent ``usesrc clientip``
    cannot bind from. A mixed pair raises ValueError; the dialer must pick a destination
    address in the source's family. Ports outside 0..65535 raise ValueError too.
    """
    _check_port(src_port)
    _check_port(dst_port)
    if src.version != dst.version:
        raise ValueError(f"PROXY v2 needs one address family, got {src} and {dst}")
    family = V2_FAMILY_INET if src.version == 4 else V2_FAMILY_INET6
    addresses = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    fixed = struct.pack("!BBH", 0x20 | V2_CMD_PROXY, family << 4 | V2_PROTO_STREAM, len(addresses))
    return V2_SIGNATURE + fixed + addresses


def build_v1(src: IPAddress, src_port: int, dst: IPAddress, dst_port: int) -> bytes:
    """PROXY v1 text line (``TCP4`` or ``TCP6``); same rules as :func:`build_v2`."""
    _check_port(src_port)
    _check_port(dst_port)
    if src.version != dst.version:
        raise ValueError(f"PROXY v1 needs one address family, got {src} and {dst}")
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {port}")


class ProxyHeaderReader:
    """Incremental reader for one v1 or v2 header; see the module docstring.

    ``next_event()`` returns the header once complete (and again on later calls), else
    :data:`NEED_DATA`. Bytes fed past the header end up in ``trailing_data``. An error is
    sticky: every later ``next_event()`` raises it again.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # v1: bytes already searched for CRLF
        self._eof = False
        self._error: ProxyHeaderError | None = None
        self._header: ProxyHeader | None = None
        self.trailing_data: bytes = b""

    def max_read(self) -> int:
        """The most bytes the driver may read next without reading past the header."""
        if self._header is not None or self._error is not None:
            return 0
        if not self._buffer:
            return SHORTEST_HEADER
        if self._buffer[0] == V2_SIGNATURE[0]:
            return self._v2_remaining()
        return self._v1_lower_bound()

    @property
    def eof(self) -> bool:
        """True once ``receive_data(b"")`` said the peer closed before the header's end."""
        return self._eof

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; ``b""`` means the peer closed its side."""
        if self._header is not None:
            self.trailing_data += data
            return
        self._eof = self._eof or not data
        self._buffer += data

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once it is complete, else :data:`NEED_DATA`; ProxyHeaderError if not."""
        if self._error is not None:
            raise self._error
        if self._header is None:
            try:
                self._parse()
                if self._header is None and self._eof:
                    raise ProxyHeaderError("client closed before a complete PROXY header")
            except ProxyHeaderError as exc:
                self._error = exc
                raise
        return NEED_DATA if self._header is None else self._header

    # -- dispatch --------------------------------------------------------------------------

    def _parse(self) -> None:
        if not self._buffer:
            return
        if self._buffer[0] == V2_SIGNATURE[0]:
            self._parse_v2()
        elif self._buffer[0] == V1_PREFIX[0]:
            self._parse_v1()
        else:
            raise ProxyHeaderError(
                f"not a PROXY protocol header: starts with {bytes(self._buffer[:8])!r}"
            )

    def _finish(self, header: ProxyHeader, length: int) -> None:
        self._header = header
        self.trailing_data = bytes(self._buffer[length:])
        self._buffer.clear()

    # -- v2 ----------------------------------------------------------------------------------

    def _v2_remaining(self) -> int:
        if len(self._buffer) < V2_FIXED_LENGTH:
            return V2_FIXED_LENGTH - len(self._buffer)
        return V2_FIXED_LENGTH + self._v2_payload_length() - len(self._buffer)

    def _v2_payload_length(self) -> int:
        length: int = struct.unpack_from("!H", self._buffer, 14)[0]
        return length

    def _parse_v2(self) -> None:
        head = bytes(self._buffer[:12])
        if not V2_SIGNATURE.startswith(head):
            raise ProxyHeaderError(f"bad PROXY v2 signature {head!r}")
        if len(self._buffer) < V2_FIXED_LENGTH:
            return
        ver_cmd, fam_proto, length = struct.unpack_from("!BBH", self._buffer, 12)
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2 header with version nibble {ver_cmd >> 4}")
        command = ver_cmd & 0x0F
        if command not in (V2_CMD_LOCAL, V2_CMD_PROXY):
            raise ProxyHeaderError(f"PROXY v2 header with unknown command {command:#x}")
        if length > V2_MAX_PAYLOAD:
            raise ProxyHeaderError(f"PROXY v2 length {length} exceeds {V2_MAX_PAYLOAD}")
        family, proto = fam_proto >> 4, fam_proto & 0x0F
        needed = V2_ADDRESS_LENGTH.get(family, 0)
        if command == V2_CMD_PROXY and length < needed:
            raise ProxyHeaderError(f"PROXY v2 length {length} is too short for family {family}")
        if len(self._buffer) < V2_FIXED_LENGTH + length:
            return
        payload = bytes(self._buffer[V2_FIXED_LENGTH : V2_FIXED_LENGTH + length])
        header = _v2_header(command, family, proto, payload)
        self._finish(header, V2_FIXED_LENGTH + length)

    # -- v1 ----------------------------------------------------------------------------------

    def _v1_lower_bound(self) -> int:
        buffer = bytes(self._buffer)
        tail = 1 if buffer.endswith(b"\r") else 2
        return max(_v1_shortest_for(buffer) - len(buffer), tail)

    def _parse_v1(self) -> None:
        head = bytes(self._buffer[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(head):
            raise ProxyHeaderError(f"not a PROXY protocol header: starts with {head!r}")
        _check_v1_protocol_word(bytes(self._buffer[:V1_MAX_LENGTH]))
        end = self._buffer.find(b"\r\n", max(self._scanned - 1, 0), V1_MAX_LENGTH)
        if end < 0:
            self._scanned = min(len(self._buffer), V1_MAX_LENGTH)
            if b"\n" in self._buffer[:V1_MAX_LENGTH]:
                raise ProxyHeaderError("PROXY v1 line ends in a bare LF")
            if len(self._buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
            return
        self._finish(_parse_v1_line(bytes(self._buffer[:end])), end + 2)


def _v2_header(command: int, family: int, proto: int, payload: bytes) -> ProxyHeader:
    """The header for a complete v2 payload; TLVs after the addresses are skipped."""
    if command == V2_CMD_LOCAL:
        return ProxyHeader(version=2, local=True)
    if family in (V2_FAMILY_UNSPEC, V2_FAMILY_UNIX):
        return ProxyHeader(version=2, local=False)
    if family not in (V2_FAMILY_INET, V2_FAMILY_INET6):
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family {family:#x}")
    if proto != V2_PROTO_STREAM:
        raise ProxyHeaderError(f"PROXY v2 header for transport {proto:#x}, not TCP (0x1)")
    size = 4 if family == V2_FAMILY_INET else 16
    src = ipaddress.ip_address(payload[:size])
    dst = ipaddress.ip_address(payload[size : 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", payload, 2 * size)
    return ProxyHeader(2, False, src, src_port, dst, dst_port)


# -- v1 --------------------------------------------------------------------------------------


def _v1_protocols_matching(prefix: bytes) -> list[bytes]:
    """The v1 protocol words a line starting with ``prefix`` (``PROXY ...``) can still have."""
    rest = prefix[len(V1_PREFIX) :]
    word = rest.replace(b"\r", b" ").split(b" ", 1)[0]
    complete = len(word) < len(rest)
    return [
        proto for proto in _V1_SHORTEST if (proto == word if complete else proto.startswith(word))
    ]


def _check_v1_protocol_word(prefix: bytes) -> None:
    if len(prefix) > len(V1_PREFIX) and not _v1_protocols_matching(prefix):
        raise ProxyHeaderError(f"PROXY v1 line with unknown protocol: {prefix[:24]!r}")


def _v1_shortest_for(prefix: bytes) -> int:
    """The length of the shortest valid v1 line that starts with ``prefix``."""
    lengths = [_V1_SHORTEST[proto] for proto in _v1_protocols_matching(prefix)]
    return min(lengths, default=SHORTEST_HEADER)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 src dst sport dport`` or ``PROXY UNKNOWN ...``, CRLF stripped."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if fields[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(version=1, local=False)
    if len(fields) != 6 or fields[0] != "PROXY" or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {text!r}")
    version = 4 if fields[1] == "TCP4" else 6
    src = _v1_address(fields[2], version)
    dst = _v1_address(fields[3], version)
    return ProxyHeader(1, False, src, _v1_port(fields[4]), dst, _v1_port(fields[5]))


def _v1_address(text: str, version: int) -> IPAddress:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not an IP address") from None
    if address.version != version or "%" in text:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not an IPv{version} address")
    return address


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 0xFFFF):
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not in 0..65535")
    return int(text)
