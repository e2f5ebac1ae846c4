"""SOCKS5 (RFC 1928) and its username/password step (RFC 1929): what both sides agree on.

Theory of operation
-------------------
The wire format (RFC 1928 sections 3-6, RFC 1929 section 2)::

    greeting   05 NMETHODS METHODS...      -> 05 METHOD  (00 none, 02 user/pass, FF: none ok)
    user/pass  01 ULEN UNAME PLEN PASSWD   -> 01 STATUS  (00 ok, anything else: close)
    request    05 CMD 00 ATYP DST.ADDR DST.PORT
    reply      05 REP 00 ATYP BND.ADDR BND.PORT

``CMD`` is 1 CONNECT, 2 BIND, 3 UDP ASSOCIATE; ``ATYP`` is 1 IPv4 (4 bytes), 3 domain name
(a length byte and the name), 4 IPv6 (16 bytes). Ports are big-endian 16-bit.

KumoMTA's convention (KumoProxy) for choosing the egress address: after the greeting (and
RFC 1929 when configured) the client sends ``BIND source_ip:0``, waits for a success reply,
then sends ``CONNECT destination:port`` on the *same* connection. The proxy binds its
outbound socket to the BIND address and connects it on CONNECT.

Each message is one frozen event that validates itself, so a malformed one cannot exist;
the client machine (:mod:`egressd.proto.socks5_client`) sends the client's messages and
receives the server's, the server machine (:mod:`egressd.proto.socks5_server`) the other
way round:

    client -> server   :class:`Greeting`, :class:`AuthRequest`, :class:`BindRequest`,
                       :class:`ConnectRequest`
    server -> client   :class:`MethodChoice`, :class:`AuthResult`, :class:`Succeeded`,
                       :class:`Refused`

A domain name (ATYP 3) is checked by :func:`check_name` (RFC 1035 section 2.3.4: at most
255 octets on the wire, labels of 1..63 octets, no empty label; valid UTF-8, non-ASCII
labels as IDNA), so a name that no resolver could look up never leaves the machine: it is
the peer's protocol error, not a crash in the resolver.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from egressd.addresses import IPAddress
from egressd.proto.machine import LocalProtocolError, RemoteProtocolError

SOCKS_VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH: Final = 0x00
METHOD_USERNAME_PASSWORD: Final = 0x02
METHOD_NO_ACCEPTABLE: Final = 0xFF

CMD_CONNECT: Final = 0x01
CMD_BIND: Final = 0x02
CMD_UDP_ASSOCIATE: Final = 0x03

ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# The longest message either side can send: a request or reply with a 255-byte name.
MAX_MESSAGE_SIZE: Final = 4 + 1 + 255 + 2
# RFC 1035 section 2.3.4: a name is at most 255 octets on the wire (length bytes included,
# so 253 characters written out), a label at most 63.
MAX_NAME_OCTETS: Final = 253
MAX_LABEL_OCTETS: Final = 63


class ReplyCode(IntEnum):
    """RFC 1928 section 6 reply codes."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


def reply_code(code: int) -> ReplyCode | int:
    """The :class:`ReplyCode` for ``code``, or the bare int for codes RFC 1928 leaves open."""
    try:
        return ReplyCode(code)
    except ValueError:
        return code


def reply_label(code: int) -> str:
    """``4 (HOST_UNREACHABLE)``: the code and its RFC 1928 meaning, for messages."""
    name = reply_code(code)
    return f"{code} ({name.name if isinstance(name, ReplyCode) else 'unassigned code'})"


# ---------------------------------------------------------------------------------------
# Events: one per message
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    """``05 NMETHODS METHODS``: the authentication methods the client offers."""

    methods: tuple[int, ...]

    def __post_init__(self) -> None:
        methods = self.methods
        if len(methods) > 255 or (methods and (min(methods) < 0 or max(methods) > 0xFF)):
            raise LocalProtocolError(f"a greeting offers up to 255 methods 0..255: {methods}")


@dataclass(frozen=True)
class MethodChoice:
    """``05 METHOD``: the server's pick; :data:`METHOD_NO_ACCEPTABLE` means close."""

    method: int

    def __post_init__(self) -> None:
        if not 0 <= self.method <= 0xFF:
            raise LocalProtocolError(f"a method is 0..255, not {self.method}")


@dataclass(frozen=True)
class AuthRequest:
    """RFC 1929 credentials.

    Both fields are decoded as UTF-8 with ``surrogateescape``: lossless, so comparing them
    with configured strings is exact even for bytes that are not UTF-8.
    """

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if len(_credential(self.username)) > 255:
            raise LocalProtocolError("a SOCKS5 username is at most 255 bytes")
        if len(_credential(self.password)) > 255:
            raise LocalProtocolError("a SOCKS5 password is at most 255 bytes")


@dataclass(frozen=True)
class AuthResult:
    """``01 STATUS``: 00 accepted; anything else refused (then the server closes)."""

    accepted: bool


@dataclass(frozen=True)
class BindRequest:
    """KumoMTA's ``BIND source:0``: the address to send from."""

    address: IPAddress | str
    port: int = 0

    def __post_init__(self) -> None:
        check_port(self.port)
        if isinstance(self.address, str):
            check_name(self.address)


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT. ``host`` is an IP address for ATYP 1 and 4, a checked name for ATYP 3.

    On the server, ``bind_address`` is the address of the accepted BIND that came before
    it on this connection, if any; the client ignores it.
    """

    host: IPAddress | str
    port: int
    bind_address: IPAddress | str | None = None

    def __post_init__(self) -> None:
        check_port(self.port)
        if isinstance(self.host, str):
            check_name(self.host)


@dataclass(frozen=True)
class Succeeded:
    """``05 00 00 ATYP BND.ADDR BND.PORT``: the request succeeded.

    For a CONNECT, the address and port the server's outbound connection uses; for a
    BIND, the bound address. ``None`` is the unspecified address; the server machine
    writes BND.ADDR in the request's address family (:func:`reply_address_for`).
    """

    address: IPAddress | str | None = None
    port: int = 0

    def __post_init__(self) -> None:
        check_port(self.port)


@dataclass(frozen=True)
class Refused:
    """``05 REP 00 ...`` with a non-zero ``code``: the request failed, the server closes."""

    code: ReplyCode | int

    def __post_init__(self) -> None:
        if not 1 <= self.code <= 0xFF:
            raise LocalProtocolError(f"a failure reply code is 1..255, not {self.code}")


ServerAnswer = MethodChoice | AuthResult | Succeeded | Refused


class Socks5ProtocolError(RemoteProtocolError[ServerAnswer]):
    """The SOCKS5 peer broke the protocol; the machine is in its ERROR state.

    ``stage`` names the message that was broken (``greeting``, ``auth``, ``request``,
    ``bind``, ``connect``); ``reply`` is the answer the server owes the client, if any.
    """

    def __init__(self, message: str, *, stage: str, reply: ServerAnswer | None = None) -> None:
        super().__init__(message, reply)
        self.stage = stage


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def _credential(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port must be 0..65535, got {port}")


def check_name(name: str) -> str:
    """``name`` as the ASCII a resolver looks up; LocalProtocolError if it is no DNS name.

    RFC 1035 section 2.3.4 and RFC 1123 section 2.1: 1..63 octets per label, at most 253
    octets written out (255 on the wire), one optional trailing dot, no empty label; no
    space or control character; non-ASCII labels must be valid IDNA (RFC 3490).
    """
    labels = name.removesuffix(".").split(".")
    try:
        encoded = [_label_ascii(label) for label in labels]
    except (UnicodeError, ValueError) as exc:
        raise LocalProtocolError(f"not a valid domain name: {name[:80]!r}: {exc}") from None
    text = ".".join(encoded)
    if len(text) > MAX_NAME_OCTETS:
        raise LocalProtocolError(f"domain name longer than {MAX_NAME_OCTETS} octets")
    return text


def _label_ascii(label: str) -> str:
    if not label:
        raise ValueError("empty label")
    if label.isascii():
        if not label.isprintable() or " " in label:
            raise ValueError("space or control character in a label")
        ascii_label = label
    else:
        ascii_label = label.encode("idna").decode("ascii")
    if len(ascii_label) > MAX_LABEL_OCTETS:
        raise ValueError(f"label longer than {MAX_LABEL_OCTETS} octets")
    return ascii_label


def encode_address(host: IPAddress | str) -> bytes:
    """ATYP + address bytes for an IP address (ATYP 1 or 4) or a checked name (ATYP 3)."""
    if isinstance(host, ipaddress.IPv4Address):
        return bytes([ATYP_IPV4]) + host.packed
    if isinstance(host, ipaddress.IPv6Address):
        return bytes([ATYP_IPV6]) + host.packed
    raw = check_name(host).encode("ascii")
    return bytes([ATYP_DOMAIN, len(raw)]) + raw


def encode_request(command: int, host: IPAddress | str, port: int) -> bytes:
    """``05 CMD 00 ATYP ADDR PORT`` (RFC 1928 section 4)."""
    return bytes([SOCKS_VERSION, command, 0]) + encode_address(host) + struct.pack("!H", port)


def encode_reply(code: int, address: IPAddress, port: int) -> bytes:
    """``05 REP 00 ATYP BND.ADDR BND.PORT`` (RFC 1928 section 6)."""
    return bytes([SOCKS_VERSION, code, 0]) + encode_address(address) + struct.pack("!H", port)


def encode_credentials(request: AuthRequest) -> bytes:
    """``01 ULEN UNAME PLEN PASSWD`` (RFC 1929 section 2)."""
    user, secret = _credential(request.username), _credential(request.password)
    return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret


def address_length(atyp: int, buffer: bytes | bytearray, offset: int) -> int | None:
    """Length of the ATYP-encoded address starting at ``offset`` (the byte after ATYP).

    Returns None when more bytes are needed to know (the domain length byte is missing).
    Raises KeyError for an unknown ATYP; callers turn that into their own error.
    """
    if atyp == ATYP_IPV4:
        return 4
    if atyp == ATYP_IPV6:
        return 16
    if atyp == ATYP_DOMAIN:
        if len(buffer) <= offset:
            return None
        return 1 + buffer[offset]
    raise KeyError(atyp)


def decode_address(atyp: int, raw: bytes) -> IPAddress | str:
    """The address an ATYP and its bytes (as measured by :func:`address_length`) name.

    A name comes back as :func:`check_name` gives it; one that is not valid UTF-8 or no
    valid DNS name raises LocalProtocolError, for the machine to turn into the peer's error.
    """
    if atyp == ATYP_IPV4:
        return ipaddress.IPv4Address(raw)
    if atyp == ATYP_IPV6:
        return ipaddress.IPv6Address(raw)
    try:
        name = raw[1:].decode("utf-8")
    except UnicodeDecodeError:
        raise LocalProtocolError(f"domain name {raw[1:81]!r} is not UTF-8") from None
    return check_name(name)


def reply_address_for(request_atyp: int, bound: IPAddress | str | None) -> IPAddress:
    """BND.ADDR in the request's address family (Exim reads a fixed-length reply).

    IPv4 request: an IPv4 address (an IPv4-mapped IPv6 address is unmapped, any other IPv6
    address becomes 0.0.0.0). IPv6 request: an IPv6 address (IPv4 is mapped, ::ffff:a.b.c.d).
    Domain request: the bound address's own family. ``None`` (or a name) is the unspecified
    address.
    """
    if isinstance(bound, str):
        bound = None
    if request_atyp == ATYP_IPV6:
        if bound is None:
            return ipaddress.IPv6Address(0)
        if isinstance(bound, ipaddress.IPv4Address):
            return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + bound.packed)
        return bound
    if bound is None:
        return ipaddress.IPv4Address(0)
    if isinstance(bound, ipaddress.IPv6Address) and request_atyp == ATYP_IPV4:
        return bound.ipv4_mapped or ipaddress.IPv4Address(0)
    return bound
