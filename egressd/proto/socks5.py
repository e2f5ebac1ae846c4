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
    they belong to the destination stream. Any refusal or protocol violation raises
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

    The server never raises on peer input: malformed input produces a failure reply (when
    a reply is due) and :class:`Closed`. Calling an answer method in the wrong state is a
    driver bug and raises :class:`Socks5ServerUsageError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from enum import IntEnum
from typing import Final, NoReturn

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

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
# Hard cap on bytes buffered before the handshake is done.
MAX_BUFFER_SIZE: Final = 1024


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

    def initial_bytes(self) -> bytes:
        """The greeting: offers 00, plus 02 when a username and a password are both set."""
        methods = [METHOD_NO_AUTH]
        if self._auth_request is not None:
            methods.append(METHOD_USERNAME_PASSWORD)
        return bytes([SOCKS_VERSION, len(methods), *methods])

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes read from the proxy; return the bytes to write next (maybe ``b""``).

        Raises :class:`Socks5ClientError` when the proxy refuses or breaks the protocol,
        and again on every later call.
        """
        if self._error is not None:
            raise self._error
        if self._state is _ClientState.DONE:
            self.trailing += data
            return b""
        self._buffer += data
        try:
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
        elif len(self._buffer) > MAX_BUFFER_SIZE:
            self._fail(f"proxy sent {len(self._buffer)} bytes without completing a reply")
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
