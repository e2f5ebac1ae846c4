"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-IO.

Theory of operation
-------------------
Both machines here only turn bytes into decisions and decisions into bytes; they never
touch a socket, so the driver (``egressd.net`` / ``egressd.doors``) owns all I/O and all
timeouts, and the tests can replay transcripts split at every byte.

The wire format (RFC 1928 section 3-6, RFC 1929 section 2)::

    greeting   05 NMETHODS METHODS...      -> 05 METHOD  (00 none, 02 user/pass, FF: none ok)
    user/pass  01 ULEN UNAME PLEN PASSWD   -> 01 STATUS  (00 ok, anything else: close)
    request    05 CMD 00 ATYP DST.ADDR DST.PORT
    reply      05 REP 00 ATYP BND.ADDR BND.PORT

``CMD`` is 1 CONNECT, 2 BIND, 3 UDP ASSOCIATE; ``ATYP`` is 1 IPv4 (4 bytes), 3 domain name
(a length byte and the name), 4 IPv6 (16 bytes). Ports are big-endian 16-bit.

KumoMTA's convention (KumoProxy) for choosing the egress address: after the greeting (and
RFC 1929 when configured) the client sends ``BIND source_ip:0``, waits for a success reply,
then sends ``CONNECT destination:port`` on the *same* connection. The proxy binds its
outbound socket to the BIND address and connects it on CONNECT. Standard servers (Dante,
3proxy) do not understand this, so the BIND step is only used when asked for.

Client (:class:`Socks5Client`)
    ``initial_bytes()`` is the greeting; every chunk read from the proxy goes to
    ``receive_data()``, which returns the bytes to write next (often ``b""``; write them
    even when the machine became ``done`` in the same call). Replies may arrive split at
    any byte or several in one chunk. Once ``done``, ``bound_address`` holds the CONNECT
    reply's BND.ADDR/BND.PORT and ``trailing`` the bytes that followed the final reply:
    they belong to the destination stream. ``stage`` names the reply being awaited. Any
    refusal, protocol violation or early EOF (``receive_data(b"")``) raises
    :class:`Socks5ClientError` (and the machine stays broken); nothing else escapes.

Server (:class:`Socks5Server`), h11 style
    ``receive_data(data)`` feeds bytes (``b""`` means EOF); ``next_event()`` returns
    the next event or :data:`NEED_DATA`; ``data_to_send()`` drains the bytes the machine
    wants written. Events and the driver's answers:

    * :class:`AuthRequest` (RFC 1929 credentials) -> ``accept_auth()`` or ``deny_auth()``.
    * :class:`BindRequest` (KumoMTA's first step) -> ``reply_success(addr, port)`` or
      ``reply_failure(code)``.
    * :class:`ConnectRequest` -> ``reply_success(bound_ip, bound_port)`` or
      ``reply_failure(code)``.
    * :class:`Closed` -> the machine has queued its last bytes (maybe none); write them,
      then close the connection. ``Closed.reason`` says why.

    Method choice is automatic: 02 whenever offered (the username names the egress pool),
    else 00 unless ``require_auth``, else ``05 FF`` and close. After an accepted BIND the
    only request allowed is CONNECT (its event carries ``bind_address``); a second BIND,
    UDP ASSOCIATE, an unknown command or EOF get reply 07; an unknown ATYP gets 08; a bad
    request version or an empty name gets 01. Every reply's BND.ADDR is in the address
    family of the request it answers, because Exim reads a reply as long as its request
    (:func:`reply_address_for`). KumoProxy answers BIND with the address it bound and the
    port the kernel picked; ``reply_success()`` without arguments answers with the
    requested address and port 0, which KumoMTA ignores either way.

    Once a CONNECT got its success reply the machine is ``done`` and ``trailing_data`` holds
    the bytes the client pipelined after its request: they belong to the destination.
    At most :data:`MAX_SERVER_BUFFER_SIZE` unparsed bytes are buffered; past that the
    machine closes. The server never raises on peer input: malformed input produces a
    failure reply (when a reply is due) and :class:`Closed`. Calling a method out of turn
    is a driver bug and raises :class:`Socks5ServerUsageError`; answers given after the
    machine closed itself (buffer overflow) are ignored.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Literal, NoReturn

from egressd.addresses import IPAddress

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


class Reply(IntEnum):
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


def reply_from_code(code: int) -> Reply | int:
    """The :class:`Reply` member for ``code``, or the bare int for codes RFC 1928 leaves open."""
    try:
        return Reply(code)
    except ValueError:
        return code


# ---------------------------------------------------------------------------------------
# Address encoding shared by both machines
# ---------------------------------------------------------------------------------------


def encode_address(host: str | IPAddress) -> bytes:
    """ATYP + address bytes for an IP literal (ATYP 1 or 4) or a domain name (ATYP 3).

    Raises ValueError for a name that is empty or longer than 255 bytes once encoded.
    """
    if isinstance(host, str):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return _encode_domain(host)
    else:
        ip = host
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes([ATYP_IPV4]) + ip.packed
    return bytes([ATYP_IPV6]) + ip.packed


def _encode_domain(name: str) -> bytes:
    try:
        raw = name.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"not an IP address or a valid domain name: {name!r}") from exc
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"domain name must be 1..255 bytes, got {len(raw)}: {name!r}")
    return bytes([ATYP_DOMAIN, len(raw)]) + raw


def encode_request(command: int, host: str | IPAddress, port: int) -> bytes:
    """``05 CMD 00 ATYP ADDR PORT`` (RFC 1928 section 4)."""
    _check_port(port)
    return bytes([SOCKS_VERSION, command, 0]) + encode_address(host) + struct.pack("!H", port)


def encode_reply(code: int, address: IPAddress, port: int) -> bytes:
    """``05 REP 00 ATYP BND.ADDR BND.PORT`` (RFC 1928 section 6)."""
    _check_port(port)
    return bytes([SOCKS_VERSION, code, 0]) + encode_address(address) + struct.pack("!H", port)


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {port}")


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


def decode_address(atyp: int, raw: bytes) -> str | IPAddress:
    """The address an ATYP and its bytes (as measured by :func:`address_length`) name."""
    if atyp == ATYP_IPV4:
        return ipaddress.IPv4Address(raw)
    if atyp == ATYP_IPV6:
        return ipaddress.IPv6Address(raw)
    return raw[1:].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------


class Socks5ClientError(Exception):
    """The proxy refused or broke the protocol.

    ``reply`` is the SOCKS reply code when the proxy sent one (else None); ``stage`` is
    ``'greeting'`` | ``'auth'`` | ``'bind'`` | ``'connect'``: the step that failed.
    """

    reply: Reply | int | None
    stage: str

    def __init__(self, message: str, *, stage: str, reply: Reply | int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.reply = reply


class _ClientState(enum.Enum):
    AWAIT_METHOD = "greeting"
    AWAIT_AUTH = "auth"
    AWAIT_BIND = "bind"
    AWAIT_CONNECT = "connect"
    DONE = "done"
    ERROR = "error"


class Socks5Client:
    """Client side of one SOCKS5 handshake; see the module docstring for the flow."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        bind_address: IPAddress | None = None,
    ) -> None:
        self._connect_request = encode_request(CMD_CONNECT, host, port)
        self._bind_request = (
            encode_request(CMD_BIND, bind_address, 0) if bind_address is not None else None
        )
        self._auth_request = (
            _encode_credentials(username, password)
            if username is not None and password is not None
            else None
        )
        self._state = _ClientState.AWAIT_METHOD
        self._buffer = bytearray()
        self._error: Socks5ClientError | None = None
        self.bound_address: tuple[str, int] | None = None
        self.bind_reply_address: tuple[str, int] | None = None
        self.trailing: bytes = b""

    @property
    def done(self) -> bool:
        """True once the CONNECT reply (success) was received."""
        return self._state is _ClientState.DONE

    @property
    def stage(self) -> str:
        """The reply awaited: ``'greeting'`` | ``'auth'`` | ``'bind'`` | ``'connect'``, then
        ``'done'`` (or ``'error'`` after a :class:`Socks5ClientError`)."""
        return self._state.value

    def initial_bytes(self) -> bytes:
        """The greeting: offers 00, plus 02 when a username and a password are both set."""
        methods = [METHOD_NO_AUTH]
        if self._auth_request is not None:
            methods.append(METHOD_USERNAME_PASSWORD)
        return bytes([SOCKS_VERSION, len(methods), *methods])

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes read from the proxy; return the bytes to write next (maybe ``b""``).

        ``b""`` means the proxy closed the connection: an error before ``done``, nothing
        after. Raises :class:`Socks5ClientError` when the proxy refuses, closes early or
        breaks the protocol, and raises it again on every later call.
        """
        if self._error is not None:
            raise self._error
        if self._state is _ClientState.DONE:
            self.trailing += data
            return b""
        self._buffer += data
        try:
            if not data:
                self._fail(f"proxy closed the connection before its {self._state.value} reply")
            return self._process()
        except Socks5ClientError as exc:
            self._state = _ClientState.ERROR
            self._error = exc
            raise

    def _process(self) -> bytes:
        out = bytearray()
        while self._state is not _ClientState.DONE:
            step = self._step()
            if step is None:
                break
            out += step
        if self._state is _ClientState.DONE:
            self.trailing += bytes(self._buffer)
            self._buffer.clear()
        # Otherwise the buffer holds less than one message (< MAX_MESSAGE_SIZE bytes): every
        # message is consumed as soon as it is complete, which is the client's size cap.
        return bytes(out)

    def _step(self) -> bytes | None:
        """Consume one complete message from the buffer; None when more bytes are needed."""
        if self._state is _ClientState.AWAIT_METHOD:
            return self._on_method_choice()
        if self._state is _ClientState.AWAIT_AUTH:
            return self._on_auth_reply()
        return self._on_request_reply()

    def _fail(self, message: str, reply: Reply | int | None = None) -> NoReturn:
        raise Socks5ClientError(message, stage=self._state.value, reply=reply)

    def _on_method_choice(self) -> bytes | None:
        if len(self._buffer) < 2:
            return None
        version, method = self._buffer[0], self._buffer[1]
        del self._buffer[:2]
        if version != SOCKS_VERSION:
            self._fail(f"proxy answered the greeting with version {version:#04x}, not 0x05")
        if method == METHOD_NO_ACCEPTABLE:
            self._fail("proxy accepts none of the offered authentication methods (0xFF)")
        if method == METHOD_USERNAME_PASSWORD and self._auth_request is not None:
            self._state = _ClientState.AWAIT_AUTH
            return self._auth_request
        if method != METHOD_NO_AUTH:
            self._fail(f"proxy chose authentication method {method:#04x}, which was not offered")
        return self._send_first_request()

    def _on_auth_reply(self) -> bytes | None:
        if len(self._buffer) < 2:
            return None
        version, status = self._buffer[0], self._buffer[1]
        del self._buffer[:2]
        # RFC 1929 says 01; a few servers answer with the SOCKS version 05. Accept both.
        if version not in (AUTH_VERSION, SOCKS_VERSION):
            self._fail(f"proxy answered username/password with version {version:#04x}")
        if status != 0:
            self._fail(f"proxy rejected the username/password (status {status:#04x})")
        return self._send_first_request()

    def _send_first_request(self) -> bytes:
        if self._bind_request is not None:
            self._state = _ClientState.AWAIT_BIND
            return self._bind_request
        self._state = _ClientState.AWAIT_CONNECT
        return self._connect_request

    def _on_request_reply(self) -> bytes | None:
        parsed = self._parse_reply()
        if parsed is None:
            return None
        code, bound = parsed
        if code != Reply.SUCCEEDED:
            name = reply_from_code(code)
            label = name.name if isinstance(name, Reply) else "unassigned code"
            self._fail(f"proxy refused {self._state.value.upper()}: {code} ({label})", name)
        if self._state is _ClientState.AWAIT_BIND:
            self.bind_reply_address = bound
            self._state = _ClientState.AWAIT_CONNECT
            return self._connect_request
        self.bound_address = bound
        self._state = _ClientState.DONE
        return b""

    def _parse_reply(self) -> tuple[int, tuple[str, int]] | None:
        """``05 REP RSV ATYP BND.ADDR BND.PORT`` from the buffer, or None if incomplete.

        RSV is ignored (RFC 1928 says it must be 00; being strict there helps nobody).
        """
        buf = self._buffer
        if len(buf) < 4:
            return None
        if buf[0] != SOCKS_VERSION:
            self._fail(f"proxy reply has version {buf[0]:#04x}, not 0x05")
        atyp = buf[3]
        try:
            addr_len = address_length(atyp, buf, 4)
        except KeyError:
            self._fail(f"proxy reply has unknown address type {atyp:#04x}")
        if addr_len is None or len(buf) < 4 + addr_len + 2:
            return None
        code = buf[1]
        address = decode_address(atyp, bytes(buf[4 : 4 + addr_len]))
        (port,) = struct.unpack_from("!H", buf, 4 + addr_len)
        del buf[: 4 + addr_len + 2]
        return code, (str(address), port)


def _encode_credentials(username: str, password: str) -> bytes:
    """``01 ULEN UNAME PLEN PASSWD`` (RFC 1929 section 2); ValueError if a field is too long."""
    user = username.encode("utf-8")
    secret = password.encode("utf-8")
    if not 1 <= len(user) <= 255:
        raise ValueError(f"SOCKS5 username must be 1..255 bytes, got {len(user)}")
    if len(secret) > 255:
        raise ValueError(f"SOCKS5 password must be at most 255 bytes, got {len(secret)}")
    return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------

# Hard cap on bytes buffered before the handshake is done. A client that pipelines a
# maximal greeting (257), RFC 1929 message (513), BIND (262) and CONNECT (262) stays below.
MAX_SERVER_BUFFER_SIZE: Final = 4096


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by :meth:`Socks5Server.next_event` when more bytes must be fed first."""
NeedData = Literal[_Sentinel.NEED_DATA]


@dataclass(frozen=True)
class AuthRequest:
    """RFC 1929 credentials; answer with ``accept_auth()`` or ``deny_auth()``.

    Both fields are decoded as UTF-8 with ``surrogateescape``: lossless, so comparing them
    with configured strings is exact even for bytes that are not UTF-8.
    """

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BindRequest:
    """KumoMTA's ``BIND source:0``; answer with ``reply_success()`` or ``reply_failure()``."""

    address: IPAddress | str
    port: int
    atyp: int

    def __post_init__(self) -> None:
        _check_port(self.port)


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT; answer with ``reply_success()`` or ``reply_failure()``.

    ``host`` is an IP address for ATYP 1 and 4, the name for ATYP 3. ``bind_address`` is
    the address of the accepted BIND that came before it on this connection, if any.
    """

    host: IPAddress | str
    port: int
    atyp: int
    bind_address: IPAddress | str | None = None

    def __post_init__(self) -> None:
        _check_port(self.port)


@dataclass(frozen=True)
class Closed:
    """The machine is finished without a connection: write ``data_to_send()``, then close."""

    reason: str


Socks5ServerEvent = AuthRequest | BindRequest | ConnectRequest | Closed


class Socks5ServerUsageError(Exception):
    """The driver called the server machine out of turn (a bug in egressd, not the peer)."""


class _ServerState(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    AWAIT_AUTH_ANSWER = "await auth answer"
    REQUEST = "request"
    AWAIT_BIND_ANSWER = "await bind answer"
    AFTER_BIND = "after bind"
    AWAIT_CONNECT_ANSWER = "await connect answer"
    DONE = "done"
    CLOSED = "closed"


_AWAITING_ANSWER = (
    _ServerState.AWAIT_AUTH_ANSWER,
    _ServerState.AWAIT_BIND_ANSWER,
    _ServerState.AWAIT_CONNECT_ANSWER,
)


class _Incomplete(Exception):
    """Internal: the buffer does not hold a whole message yet."""


class _Reject(Exception):
    """Internal: the peer broke the protocol; carries the reply to send (if any) and why."""

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class Socks5Server:
    """Server side of one SOCKS5 handshake, h11 style; see the module docstring.

    ``require_auth``: when True a client that does not offer method 02 gets ``05 FF``.
    A client that offers 02 always gets 02, whatever ``require_auth`` says: the username
    names the egress pool even when no passwords are configured.
    """

    def __init__(self, *, require_auth: bool = False) -> None:
        self.require_auth = require_auth
        self._state = _ServerState.GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._eof = False
        self._closed_reason = ""
        self._request_atyp = ATYP_IPV4
        self._bind: BindRequest | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once a CONNECT got a success reply: the rest of the stream is payload."""
        return self._state is _ServerState.DONE

    @property
    def closed(self) -> bool:
        """True once the machine gave up: write ``data_to_send()``, then close."""
        return self._state is _ServerState.CLOSED

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its CONNECT request; they belong to the destination."""
        if self._state is not _ServerState.DONE:
            raise Socks5ServerUsageError("trailing_data is only defined once done")
        return bytes(self._buffer)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if self._state is _ServerState.DONE:
            raise Socks5ServerUsageError("handshake is done; relay further bytes yourself")
        if not data:
            self._eof = True
            return
        if self._state is _ServerState.CLOSED:
            return
        if len(self._buffer) + len(data) > MAX_SERVER_BUFFER_SIZE:
            # Pending answers are then ignored: the driver sees Closed on next_event().
            self._close(f"client sent more than {MAX_SERVER_BUFFER_SIZE} bytes unanswered")
            return
        self._buffer += data

    def next_event(self) -> Socks5ServerEvent | NeedData:
        """The next event, or :data:`NEED_DATA`. Never raises because of peer input."""
        if self._state in _AWAITING_ANSWER:
            raise Socks5ServerUsageError(f"answer the pending request first ({self._state.value})")
        if self._state is _ServerState.DONE:
            raise Socks5ServerUsageError("handshake is done; there are no more events")
        if self._state is _ServerState.CLOSED:
            return Closed(self._closed_reason)
        try:
            return self._parse_next()
        except _Incomplete:
            return self._on_incomplete()
        except _Reject as reject:
            self._outgoing += reject.reply
            return self._close(reject.reason)

    def data_to_send(self) -> bytes:
        """Drain the bytes the machine wants written to the client."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    # -- driver answers --------------------------------------------------------------------

    def accept_auth(self) -> None:
        """Accept the credentials of the pending :class:`AuthRequest` (sends ``01 00``)."""
        if self._answer_ignored(_ServerState.AWAIT_AUTH_ANSWER):
            return
        self._outgoing += bytes([AUTH_VERSION, 0x00])
        self._state = _ServerState.REQUEST

    def deny_auth(self) -> None:
        """Deny the credentials of the pending :class:`AuthRequest` (``01 01``, then close)."""
        if self._answer_ignored(_ServerState.AWAIT_AUTH_ANSWER):
            return
        self._outgoing += bytes([AUTH_VERSION, 0x01])
        self._close("username/password denied")

    def reply_success(self, bound_ip: IPAddress | None = None, bound_port: int = 0) -> None:
        """Answer the pending BIND or CONNECT with success.

        For a CONNECT, pass the local address of the outbound connection (RFC 1928's
        BND.ADDR/BND.PORT); the machine is then done. For a BIND, pass the bound address
        (KumoProxy answers with the address it bound to); ``None`` means the requested
        address (for CONNECT: the unspecified address). The reply is always in the request's
        address family, see :func:`reply_address_for`.
        """
        _check_port(bound_port)
        if self._state is _ServerState.AWAIT_BIND_ANSWER:
            assert self._bind is not None
            if bound_ip is None and not isinstance(self._bind.address, str):
                bound_ip = self._bind.address
            self._outgoing += self._reply(Reply.SUCCEEDED, bound_ip, bound_port)
            self._state = _ServerState.AFTER_BIND
            return
        if self._answer_ignored(_ServerState.AWAIT_CONNECT_ANSWER):
            return
        self._outgoing += self._reply(Reply.SUCCEEDED, bound_ip, bound_port)
        self._state = _ServerState.DONE

    def reply_failure(self, code: Reply | int) -> None:
        """Refuse the pending BIND or CONNECT with ``code`` (1..255), then close."""
        if not 1 <= code <= 0xFF:
            raise ValueError(f"a failure reply code must be 1..255, got {code}")
        if self._state is not _ServerState.AWAIT_BIND_ANSWER and self._answer_ignored(
            _ServerState.AWAIT_CONNECT_ANSWER
        ):
            return
        self._outgoing += self._reply(code, None, 0)
        self._close(f"request refused with reply {code}")

    def _answer_ignored(self, expected: _ServerState) -> bool:
        """True when an answer should be dropped (the machine already closed, e.g. on
        overflow); raise when the driver answers something that was never asked."""
        if self._state is _ServerState.CLOSED:
            return True
        if self._state is not expected:
            raise Socks5ServerUsageError(
                f"cannot answer {expected.value!r} in state {self._state.value!r}"
            )
        return False

    # -- parsing -----------------------------------------------------------------------------

    def _close(self, reason: str) -> Closed:
        self._state = _ServerState.CLOSED
        self._closed_reason = reason
        self._buffer.clear()
        return Closed(reason)

    def _on_incomplete(self) -> Socks5ServerEvent | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._state is _ServerState.AFTER_BIND and not self._buffer:
            self._outgoing += self._reply(Reply.COMMAND_NOT_SUPPORTED, None, 0)
            return self._close("client closed after BIND without sending CONNECT")
        if self._buffer:
            return self._close(f"client closed in the middle of the {self._state.value}")
        return self._close(f"client closed during the {self._state.value}")

    def _parse_next(self) -> Socks5ServerEvent | NeedData:
        if self._state is _ServerState.GREETING:
            self._parse_greeting()
            return self._parse_next_if_buffered()
        if self._state is _ServerState.AUTH:
            return self._parse_credentials()
        return self._parse_request()

    def _parse_next_if_buffered(self) -> Socks5ServerEvent | NeedData:
        if self._state is _ServerState.CLOSED:
            return Closed(self._closed_reason)
        return self._parse_next()

    def _take(self, count: int) -> bytes:
        """Remove and return the first ``count`` bytes; _Incomplete if not all there."""
        if len(self._buffer) < count:
            raise _Incomplete
        chunk = bytes(self._buffer[:count])
        del self._buffer[:count]
        return chunk

    def _peek(self, count: int) -> bytes:
        if len(self._buffer) < count:
            raise _Incomplete
        return bytes(self._buffer[:count])

    def _parse_greeting(self) -> None:
        """``05 NMETHODS METHODS`` -> queue the method choice (RFC 1928 section 3)."""
        (version,) = self._peek(1)
        if version != SOCKS_VERSION:
            raise _Reject(f"greeting has version {version:#04x}, not 0x05")
        nmethods = self._peek(2)[1]
        methods = self._take(2 + nmethods)[2:]
        method = self._choose_method(methods)
        self._outgoing += bytes([SOCKS_VERSION, method])
        if method == METHOD_NO_ACCEPTABLE:
            self._close("client offers no acceptable authentication method")
        elif method == METHOD_USERNAME_PASSWORD:
            self._state = _ServerState.AUTH
        else:
            self._state = _ServerState.REQUEST

    def _choose_method(self, offered: bytes) -> int:
        if METHOD_USERNAME_PASSWORD in offered:
            return METHOD_USERNAME_PASSWORD
        if METHOD_NO_AUTH in offered and not self.require_auth:
            return METHOD_NO_AUTH
        return METHOD_NO_ACCEPTABLE

    def _parse_credentials(self) -> AuthRequest:
        """``01 ULEN UNAME PLEN PASSWD`` (RFC 1929 section 2)."""
        (version,) = self._peek(1)
        if version != AUTH_VERSION:
            raise _Reject(
                f"username/password message has version {version:#04x}, not 0x01",
                bytes([AUTH_VERSION, 0x01]),
            )
        ulen = self._peek(2)[1]
        plen = self._peek(2 + ulen + 1)[-1]
        message = self._take(2 + ulen + 1 + plen)
        self._state = _ServerState.AWAIT_AUTH_ANSWER
        return AuthRequest(
            username=message[2 : 2 + ulen].decode("utf-8", "surrogateescape"),
            password=message[3 + ulen :].decode("utf-8", "surrogateescape"),
        )

    def _parse_request(self) -> BindRequest | ConnectRequest:
        """``05 CMD RSV ATYP DST.ADDR DST.PORT`` (RFC 1928 section 4); RSV is ignored."""
        version, command, _rsv, atyp = self._peek(4)
        self._request_atyp = atyp if atyp in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN) else ATYP_IPV4
        if version != SOCKS_VERSION:
            raise self._reject_request(Reply.GENERAL_FAILURE, f"version {version:#04x}")
        try:
            addr_len = address_length(atyp, self._buffer, 4)
        except KeyError:
            raise self._reject_request(
                Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp:#04x}"
            ) from None
        if addr_len is None:
            raise _Incomplete
        message = self._take(4 + addr_len + 2)
        if atyp == ATYP_DOMAIN and addr_len == 1:
            raise self._reject_request(Reply.GENERAL_FAILURE, "empty domain name")
        address = decode_address(atyp, message[4 : 4 + addr_len])
        (port,) = struct.unpack_from("!H", message, 4 + addr_len)
        return self._dispatch_request(command, address, port, atyp)

    def _dispatch_request(
        self, command: int, address: IPAddress | str, port: int, atyp: int
    ) -> BindRequest | ConnectRequest:
        after_bind = self._state is _ServerState.AFTER_BIND
        if command == CMD_CONNECT:
            self._state = _ServerState.AWAIT_CONNECT_ANSWER
            bind = self._bind.address if self._bind is not None else None
            return ConnectRequest(host=address, port=port, atyp=atyp, bind_address=bind)
        if command == CMD_BIND and not after_bind:
            self._bind = BindRequest(address=address, port=port, atyp=atyp)
            self._state = _ServerState.AWAIT_BIND_ANSWER
            return self._bind
        what = "a second BIND" if command == CMD_BIND else f"command {command:#04x}"
        raise self._reject_request(Reply.COMMAND_NOT_SUPPORTED, what)

    def _reject_request(self, code: Reply, what: str) -> _Reject:
        return _Reject(f"request with {what}: reply {code.name}", self._reply(code, None, 0))

    def _reply(self, code: int, bound_ip: IPAddress | None, port: int) -> bytes:
        return encode_reply(code, reply_address_for(self._request_atyp, bound_ip), port)


def reply_address_for(request_atyp: int, bound: IPAddress | None) -> IPAddress:
    """BND.ADDR in the request's address family (Exim reads a fixed-length reply).

    IPv4 request: an IPv4 address (an IPv4-mapped IPv6 address is unmapped, any other IPv6
    address becomes 0.0.0.0). IPv6 request: an IPv6 address (IPv4 is mapped, ::ffff:a.b.c.d).
    Domain request: the bound address's own family. ``None`` is the unspecified address.
    """
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
