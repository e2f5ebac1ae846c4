"""The client side of SOCKS5 (RFC 1928, RFC 1929, KumoMTA's BIND-then-CONNECT), sans-IO.

Theory of operation
-------------------
:class:`Socks5Client` has h11's shape (:mod:`egressd.proto.machine`): ``send(message)``
returns the bytes of a client message, ``receive_data(data)`` feeds the proxy's bytes
(``b""`` is EOF) and ``next_event()`` returns the proxy's answer or :data:`NEED_DATA`.
The order is the protocol's: :class:`Greeting`, then (after ``MethodChoice(02)``) an
:class:`AuthRequest`, then an optional :class:`BindRequest`, then a :class:`ConnectRequest`;
sending out of turn raises LocalProtocolError. Answers arrive as :class:`MethodChoice`,
:class:`AuthResult`, :class:`Succeeded` or :class:`Refused`; a refusal is an answer, not an
error. A proxy that breaks the protocol (a wrong version, a method that was not offered, an
unknown ATYP, EOF before its answer) makes ``next_event()`` raise
:class:`Socks5ProtocolError`, again on every later call. Once a CONNECT succeeded the
machine is ``done`` and ``trailing_data`` holds what followed the reply: it belongs to the
destination stream.

:class:`Socks5Handshake` drives one machine through the sequence egressd's dialer needs
(the greeting offers 00, and 02 when credentials are set; BIND when a bind address is
given; then CONNECT): ``initial_bytes()`` is the greeting, every chunk read from the proxy
goes to ``receive_data()``, which returns the bytes to write next (often ``b""``; write them
even when the handshake became ``done`` in the same call). Any refusal, protocol error or
early EOF raises :class:`HandshakeError` naming the ``stage`` and the proxy's reply code.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final

from egressd.addresses import IPAddress
from egressd.proto.machine import NEED_DATA, LocalProtocolError, NeedData
from egressd.proto.socks5_common import (
    ATYP_DOMAIN,
    AUTH_VERSION,
    CMD_BIND,
    CMD_CONNECT,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
    SOCKS_VERSION,
    AuthRequest,
    AuthResult,
    BindRequest,
    ConnectRequest,
    Greeting,
    MethodChoice,
    Refused,
    ReplyCode,
    Socks5ProtocolError,
    Succeeded,
    address_length,
    decode_address,
    encode_credentials,
    encode_request,
    reply_code,
    reply_label,
)

__all__ = [
    "ClientEvent",
    "ClientMessage",
    "ClientState",
    "HandshakeError",
    "Socks5Client",
    "Socks5Handshake",
]

ClientMessage = Greeting | AuthRequest | BindRequest | ConnectRequest
ClientEvent = MethodChoice | AuthResult | Succeeded | Refused


class ClientState(enum.Enum):
    """Where the client is; an ``AWAIT_*`` value names the answer awaited."""

    START = "start"
    AWAIT_METHOD = "greeting"
    SEND_AUTH = "send auth"
    AWAIT_AUTH = "auth"
    READY = "ready"
    AWAIT_BIND = "bind"
    BOUND = "bound"
    AWAIT_CONNECT = "connect"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"


_SENDS: Final[dict[ClientState, tuple[type, ...]]] = {
    ClientState.START: (Greeting,),
    ClientState.SEND_AUTH: (AuthRequest,),
    ClientState.READY: (BindRequest, ConnectRequest),
    ClientState.BOUND: (ConnectRequest,),
}


class Socks5Client:
    """Client side of one SOCKS5 connection; see the module docstring."""

    def __init__(self) -> None:
        self._state = ClientState.START
        self._buffer = bytearray()
        self._eof = False
        self._offered: tuple[int, ...] = ()
        self._error: Socks5ProtocolError | None = None

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def done(self) -> bool:
        """True once a CONNECT got a success reply."""
        return self._state is ClientState.DONE

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the CONNECT reply; they belong to the destination stream."""
        if self._state is not ClientState.DONE:
            raise LocalProtocolError("trailing_data is only defined once done")
        return bytes(self._buffer)

    def send(self, message: ClientMessage) -> bytes:
        """The bytes of ``message``, which must be the protocol's next one."""
        if not isinstance(message, _SENDS.get(self._state, ())):
            raise LocalProtocolError(f"cannot send {message!r} in state {self._state.value!r}")
        if isinstance(message, Greeting):
            self._offered = message.methods
            self._state = ClientState.AWAIT_METHOD
            return bytes([SOCKS_VERSION, len(message.methods), *message.methods])
        if isinstance(message, AuthRequest):
            if not message.username:
                raise LocalProtocolError("RFC 1929 needs a username of at least one byte")
            self._state = ClientState.AWAIT_AUTH
            return encode_credentials(message)
        if isinstance(message, BindRequest):
            self._state = ClientState.AWAIT_BIND
            return encode_request(CMD_BIND, message.address, message.port)
        self._state = ClientState.AWAIT_CONNECT
        return encode_request(CMD_CONNECT, message.host, message.port)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the proxy; ``b""`` means it closed the connection."""
        if self._eof and data:
            raise LocalProtocolError("receive_data() after EOF")
        self._eof = self._eof or not data
        self._buffer += data

    def next_event(self) -> ClientEvent | NeedData:
        """The proxy's answer, or :data:`NEED_DATA`; Socks5ProtocolError if it broke."""
        if self._error is not None:
            raise self._error
        if self._state not in _PARSERS:
            raise LocalProtocolError(f"no answer is awaited in state {self._state.value!r}")
        try:
            event = _PARSERS[self._state](self)
            if event is NEED_DATA and self._eof:
                raise self._broken(f"proxy closed the connection before its {self.stage} reply")
        except Socks5ProtocolError as exc:
            self._state, self._error = ClientState.ERROR, exc
            raise
        return event

    @property
    def stage(self) -> str:
        return self._state.value

    def _broken(self, message: str) -> Socks5ProtocolError:
        return Socks5ProtocolError(message, stage=self._state.value)

    def _on_method_choice(self) -> MethodChoice | NeedData:
        if len(self._buffer) < 2:
            return NEED_DATA
        version, method = self._buffer[0], self._buffer[1]
        if version != SOCKS_VERSION:
            raise self._broken(f"proxy answered the greeting with version {version:#04x}, not 0x05")
        if method != METHOD_NO_ACCEPTABLE and method not in self._offered:
            raise self._broken(f"proxy chose authentication method {method:#04x}, not offered")
        del self._buffer[:2]
        if method == METHOD_NO_ACCEPTABLE:
            self._state = ClientState.CLOSED
        elif method == METHOD_USERNAME_PASSWORD:
            self._state = ClientState.SEND_AUTH
        else:
            self._state = ClientState.READY
        return MethodChoice(method)

    def _on_auth_result(self) -> AuthResult | NeedData:
        if len(self._buffer) < 2:
            return NEED_DATA
        version, status = self._buffer[0], self._buffer[1]
        # RFC 1929 says 01; a few servers answer with the SOCKS version 05. Accept both.
        if version not in (AUTH_VERSION, SOCKS_VERSION):
            raise self._broken(f"proxy answered username/password with version {version:#04x}")
        del self._buffer[:2]
        self._state = ClientState.READY if status == 0 else ClientState.CLOSED
        return AuthResult(accepted=status == 0)

    def _on_request_reply(self) -> Succeeded | Refused | NeedData:
        """``05 REP RSV ATYP BND.ADDR BND.PORT``; RSV is ignored (being strict helps nobody)."""
        buf = self._buffer
        if len(buf) < 4:
            return NEED_DATA
        if buf[0] != SOCKS_VERSION:
            raise self._broken(f"proxy reply has version {buf[0]:#04x}, not 0x05")
        atyp = buf[3]
        try:
            addr_len = address_length(atyp, buf, 4)
        except KeyError:
            raise self._broken(f"proxy reply has unknown address type {atyp:#04x}") from None
        if addr_len is None or len(buf) < 4 + addr_len + 2:
            return NEED_DATA
        code = buf[1]
        address = _bound_address(atyp, bytes(buf[4 : 4 + addr_len]))
        (port,) = struct.unpack_from("!H", buf, 4 + addr_len)
        del buf[: 4 + addr_len + 2]
        if code != ReplyCode.SUCCEEDED:
            self._state = ClientState.CLOSED
            return Refused(reply_code(code))
        bound = self._state is ClientState.AWAIT_BIND
        self._state = ClientState.BOUND if bound else ClientState.DONE
        return Succeeded(address, port)


_PARSERS: Final = {
    ClientState.AWAIT_METHOD: Socks5Client._on_method_choice,
    ClientState.AWAIT_AUTH: Socks5Client._on_auth_result,
    ClientState.AWAIT_BIND: Socks5Client._on_request_reply,
    ClientState.AWAIT_CONNECT: Socks5Client._on_request_reply,
}


def _bound_address(atyp: int, raw: bytes) -> IPAddress | str:
    """BND.ADDR; a name is only shown, so one that is no valid DNS name is kept as text."""
    try:
        return decode_address(atyp, raw)
    except LocalProtocolError:
        assert atyp == ATYP_DOMAIN
        return raw[1:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# The handshake egressd's dialer runs
# ---------------------------------------------------------------------------------------


class HandshakeError(Exception):
    """The proxy refused or broke the protocol.

    ``reply`` is the SOCKS reply code when the proxy sent one (else None); ``stage`` is
    ``'greeting'`` | ``'auth'`` | ``'bind'`` | ``'connect'``: the step that failed.
    """

    def __init__(self, message: str, *, stage: str, reply: ReplyCode | int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.reply = reply


class Socks5Handshake:
    """Greeting, RFC 1929 when credentials are set, BIND when asked, then CONNECT."""

    def __init__(
        self,
        host: IPAddress | str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        bind_address: IPAddress | None = None,
    ) -> None:
        self._connect = ConnectRequest(_ip_or_name(host), port)
        self._bind = BindRequest(bind_address, 0) if bind_address is not None else None
        self._auth = (
            AuthRequest(username, password)
            if username is not None and password is not None
            else None
        )
        if username == "" and password is not None:
            raise LocalProtocolError("RFC 1929 needs a username of at least one byte")
        self._client = Socks5Client()
        self._error: HandshakeError | None = None
        self.bound_address: tuple[str, int] | None = None
        self.bind_reply_address: tuple[str, int] | None = None
        self.trailing: bytes = b""

    @property
    def done(self) -> bool:
        """True once the CONNECT reply (success) was received."""
        return self._client.done

    @property
    def stage(self) -> str:
        """The reply awaited: ``'greeting'`` | ``'auth'`` | ``'bind'`` | ``'connect'``, then
        ``'done'`` (or ``'error'`` after a :class:`HandshakeError`)."""
        return "error" if self._error is not None else self._client.stage

    def initial_bytes(self) -> bytes:
        """The greeting: offers 00, plus 02 when a username and a password are both set."""
        methods = (
            (METHOD_NO_AUTH,) if self._auth is None else (METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD)
        )
        return self._client.send(Greeting(methods))

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes read from the proxy; return the bytes to write next (maybe ``b""``).

        ``b""`` means the proxy closed the connection: an error before ``done``, nothing
        after. Raises :class:`HandshakeError` when the proxy refuses, closes early or
        breaks the protocol, and raises it again on every later call.
        """
        if self._error is not None:
            raise self._error
        if self.done:
            self.trailing += data
            return b""
        self._client.receive_data(data)
        try:
            return self._answer_all()
        except HandshakeError as exc:
            self._error = exc
            raise

    def _answer_all(self) -> bytes:
        out = bytearray()
        while not self.done:
            stage = self._client.stage
            try:
                event = self._client.next_event()
            except Socks5ProtocolError as exc:
                raise HandshakeError(str(exc), stage=exc.stage) from exc
            if event is NEED_DATA:
                break
            out += self._answer(event, stage)
        if self.done:
            self.trailing = self._client.trailing_data
        return bytes(out)

    def _answer(self, event: ClientEvent, stage: str) -> bytes:
        if isinstance(event, MethodChoice):
            if event.method == METHOD_NO_ACCEPTABLE:
                raise HandshakeError(
                    "proxy accepts none of the offered authentication methods (0xFF)", stage=stage
                )
            if event.method == METHOD_USERNAME_PASSWORD:
                assert self._auth is not None  # offered only with credentials
                return self._client.send(self._auth)
            return self._first_request()
        if isinstance(event, AuthResult):
            if not event.accepted:
                raise HandshakeError("proxy rejected the username/password", stage=stage)
            return self._first_request()
        if isinstance(event, Refused):
            raise HandshakeError(
                f"proxy refused {stage.upper()}: {reply_label(event.code)}",
                stage=stage,
                reply=event.code,
            )
        bound = (str(event.address), event.port)
        if stage == ClientState.AWAIT_BIND.value:
            self.bind_reply_address = bound
            return self._client.send(self._connect)
        self.bound_address = bound
        return b""

    def _first_request(self) -> bytes:
        return self._client.send(self._bind if self._bind is not None else self._connect)


def _ip_or_name(host: IPAddress | str) -> IPAddress | str:
    if not isinstance(host, str):
        return host
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host
