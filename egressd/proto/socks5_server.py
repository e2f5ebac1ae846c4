"""The server side of SOCKS5 (RFC 1928, RFC 1929, KumoMTA's BIND-then-CONNECT), sans-IO.

Theory of operation
-------------------
h11's shape (:mod:`egressd.proto.machine`): ``receive_data(data)`` feeds the client's bytes
(``b""`` is EOF), ``next_event()`` returns the next client message or :data:`NEED_DATA`,
``send(answer)`` returns the bytes of the answer. The driver answers every message before
asking for the next event:

    :class:`Greeting`        -> ``send(MethodChoice(choose_method(...)))``
    :class:`AuthRequest`     -> ``send(AuthResult(accepted))``
    :class:`BindRequest`     -> ``send(Succeeded(address, port))`` or ``send(Refused(code))``
    :class:`ConnectRequest`  -> ``send(Succeeded(bound_ip, bound_port))`` or ``send(Refused(...))``
    :class:`ConnectionClosed` -> the client closed at a message boundary; close too.

After ``MethodChoice(0xFF)``, ``AuthResult(False)`` or a :class:`Refused` the machine is
``closed`` (write the bytes, then close). After a CONNECT's :class:`Succeeded` it is ``done``
and ``trailing_data`` holds the bytes the client pipelined after its request: they belong
to the destination. After an accepted BIND the only request allowed is CONNECT (its event
carries ``bind_address``).

A client that breaks the protocol makes ``next_event()`` raise :class:`Socks5ProtocolError`
(and raise it again on every later call); its ``reply`` is the answer owed, which ``send()``
still accepts once: a second BIND, UDP ASSOCIATE, an unknown command, or EOF right after
BIND get 07; an unknown ATYP 08; a bad request version or an empty name 01; a name that is
no valid DNS name (:func:`~egressd.proto.socks5_common.check_name`) 04, as if it did not
resolve; a bad RFC 1929 version ``01 01``. A bad greeting version or EOF in the middle of a
message get no reply. Every reply's BND.ADDR is in the address family of the request it
answers, because Exim reads a reply as long as its request (:func:`reply_address_for`).

Messages are self-delimiting and at most :data:`MAX_MESSAGE_SIZE` bytes, so an incomplete
message never holds more; bytes fed while an answer is pending are capped at
:data:`MAX_SERVER_BUFFER_SIZE`, past which the machine is in ERROR. Calling ``send`` or
``next_event`` out of turn is a driver bug: :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from egressd.addresses import IPAddress
from egressd.proto.machine import NEED_DATA, LocalProtocolError, NeedData
from egressd.proto.socks5_common import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
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
    ServerAnswer,
    Socks5ProtocolError,
    Succeeded,
    address_length,
    decode_address,
    encode_reply,
    reply_address_for,
)

__all__ = [
    "MAX_SERVER_BUFFER_SIZE",
    "ConnectionClosed",
    "ServerEvent",
    "ServerState",
    "Socks5Server",
    "choose_method",
]

# Hard cap on bytes buffered before the handshake is done. A client that pipelines a
# maximal greeting (257), RFC 1929 message (513), BIND (262) and CONNECT (262) stays below.
MAX_SERVER_BUFFER_SIZE: Final = 4096


@dataclass(frozen=True)
class ConnectionClosed:
    """The client closed its side at a message boundary, before the handshake was done."""


ServerEvent = Greeting | AuthRequest | BindRequest | ConnectRequest | ConnectionClosed


class ServerState(enum.Enum):
    """Where the handshake is; the value names it in messages."""

    GREETING = "greeting"
    SEND_METHOD = "method choice"
    AUTH = "auth"
    SEND_AUTH_RESULT = "auth result"
    REQUEST = "request"
    SEND_BIND_REPLY = "bind reply"
    AFTER_BIND = "connect after bind"
    SEND_CONNECT_REPLY = "connect reply"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"


_ANSWERS: Final[dict[ServerState, tuple[type, ...]]] = {
    ServerState.SEND_METHOD: (MethodChoice,),
    ServerState.SEND_AUTH_RESULT: (AuthResult,),
    ServerState.SEND_BIND_REPLY: (Succeeded, Refused),
    ServerState.SEND_CONNECT_REPLY: (Succeeded, Refused),
}
_PENDING: Final = tuple(_ANSWERS)
"""The states that wait for the driver's answer: ``in`` on a tuple compares identities,
where a dict lookup calls Enum.__hash__ (a Python function) each time."""


def choose_method(offered: tuple[int, ...], *, require_auth: bool) -> int:
    """egressd's pick: 02 whenever offered (the username names the egress pool, even when
    no passwords are configured), else 00 unless ``require_auth``, else FF."""
    if METHOD_USERNAME_PASSWORD in offered:
        return METHOD_USERNAME_PASSWORD
    if METHOD_NO_AUTH in offered and not require_auth:
        return METHOD_NO_AUTH
    return METHOD_NO_ACCEPTABLE


_SUCCEEDED_IPV4: Final = bytes([SOCKS_VERSION, ReplyCode.SUCCEEDED, 0, ATYP_IPV4])


class _Incomplete(Exception):
    """Internal: the buffer does not hold a whole message yet."""


class Socks5Server:
    """Server side of one SOCKS5 handshake; see the module docstring."""

    def __init__(self) -> None:
        self._state = ServerState.GREETING
        self._buffer = bytearray()
        self._eof = False
        self._error: Socks5ProtocolError | None = None
        self._owed: ServerAnswer | None = None  # the error's reply, until sent
        self._request_atyp = ATYP_IPV4
        self._bind: BindRequest | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def done(self) -> bool:
        """True once a CONNECT got a success reply: the rest of the stream is payload."""
        return self._state is ServerState.DONE

    @property
    def closed(self) -> bool:
        """True once the handshake failed: write what ``send`` returned, then close."""
        return self._state in (ServerState.CLOSED, ServerState.ERROR)

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its CONNECT request; they belong to the destination."""
        if self._state is not ServerState.DONE:
            raise LocalProtocolError("trailing_data is only defined once done")
        return bytes(self._buffer)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if self._state is ServerState.DONE:
            raise LocalProtocolError("handshake is done; relay further bytes yourself")
        if self._eof and data:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self._buffer += data
        pending = self._state in _PENDING  # nothing is parsed until the driver answers
        if pending and len(self._buffer) > MAX_SERVER_BUFFER_SIZE:
            self._error = Socks5ProtocolError(
                f"client sent more than {MAX_SERVER_BUFFER_SIZE} bytes unanswered",
                stage=self._state.value,
            )
            self._state = ServerState.ERROR

    def next_event(self) -> ServerEvent | NeedData:
        """The next client message, or :data:`NEED_DATA`; Socks5ProtocolError if broken."""
        if self._error is not None:
            raise self._error
        if self._state in _PENDING:
            raise LocalProtocolError(f"answer the pending message first ({self._state.value})")
        if self._state in (ServerState.DONE, ServerState.CLOSED):
            raise LocalProtocolError(f"there are no more events ({self._state.value})")
        try:
            if not self._buffer:  # every message starts with a byte: no parse, no _Incomplete
                return self._on_incomplete()
            try:
                return self._parse_next()
            except _Incomplete:
                return self._on_incomplete()
        except Socks5ProtocolError as exc:
            self._fail(exc)
            raise

    # -- output ------------------------------------------------------------------------------

    def send(self, answer: ServerAnswer) -> bytes:
        """The bytes of ``answer`` to the pending message (or of the error's owed reply)."""
        state = self._state
        if state is ServerState.ERROR:
            return self._send_owed(answer)
        # The answers _ANSWERS allows, tested by identity (a dict lookup would hash the state).
        if state is ServerState.SEND_METHOD and isinstance(answer, MethodChoice):
            return self._send_method(answer)
        if state is ServerState.SEND_AUTH_RESULT and isinstance(answer, AuthResult):
            return self._send_auth_result(answer)
        if state is ServerState.SEND_CONNECT_REPLY or state is ServerState.SEND_BIND_REPLY:
            if isinstance(answer, Succeeded):
                return self._send_success(answer)
            if isinstance(answer, Refused):
                self._state = ServerState.CLOSED
                return self._reply(answer)
        raise LocalProtocolError(f"cannot send {answer!r} in state {state.value!r}")

    def _send_owed(self, answer: ServerAnswer) -> bytes:
        if self._owed is None or answer != self._owed:
            raise LocalProtocolError(f"in ERROR only the owed reply may be sent, not {answer!r}")
        self._owed = None
        if isinstance(answer, AuthResult):
            return bytes([AUTH_VERSION, 0x00 if answer.accepted else 0x01])
        assert isinstance(answer, Refused)
        return self._reply(answer)

    def _send_method(self, answer: MethodChoice) -> bytes:
        if answer.method == METHOD_NO_ACCEPTABLE:
            self._state = ServerState.CLOSED
        elif answer.method == METHOD_USERNAME_PASSWORD:
            self._state = ServerState.AUTH
        elif answer.method == METHOD_NO_AUTH:
            self._state = ServerState.REQUEST
        else:
            raise LocalProtocolError(f"egressd speaks methods 00, 02 and FF, not {answer.method}")
        return bytes([SOCKS_VERSION, answer.method])

    def _send_auth_result(self, answer: AuthResult) -> bytes:
        self._state = ServerState.REQUEST if answer.accepted else ServerState.CLOSED
        return bytes([AUTH_VERSION, 0x00 if answer.accepted else 0x01])

    def _send_success(self, answer: Succeeded) -> bytes:
        if self._state is ServerState.SEND_BIND_REPLY:
            assert self._bind is not None
            if answer.address is None:  # KumoProxy answers with the address it bound
                answer = Succeeded(self._bind.address, answer.port)
            self._state = ServerState.AFTER_BIND
        else:
            self._state = ServerState.DONE
        return self._reply(answer)

    def _reply(self, answer: Succeeded | Refused) -> bytes:
        if isinstance(answer, Refused):
            code, address, port = int(answer.code), None, 0
        else:
            address, port = answer.address, answer.port
            if type(address) is ipaddress.IPv4Address and self._request_atyp != ATYP_IPV6:
                # What reply_address_for() and encode_reply() make of it, seven calls less
                # (every successful CONNECT from an IPv4 source answers this way).
                return _SUCCEEDED_IPV4 + address.packed + port.to_bytes(2, "big")
            code = int(ReplyCode.SUCCEEDED)
        return encode_reply(code, reply_address_for(self._request_atyp, address), port)

    # -- parsing -----------------------------------------------------------------------------

    def _fail(self, error: Socks5ProtocolError) -> None:
        self._state = ServerState.ERROR
        self._error = error
        self._owed = error.reply
        self._buffer.clear()

    def _broken(
        self, message: str, reply: ServerAnswer | None = None, *, stage: str | None = None
    ) -> Socks5ProtocolError:
        return Socks5ProtocolError(message, stage=stage or self._state.value, reply=reply)

    def _on_incomplete(self) -> ServerEvent | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._state is ServerState.AFTER_BIND and not self._buffer:
            raise self._broken(
                "client closed after BIND without sending CONNECT",
                Refused(ReplyCode.COMMAND_NOT_SUPPORTED),
            )
        if self._buffer:
            raise self._broken(f"client closed in the middle of the {self._state.value}")
        self._state = ServerState.CLOSED
        return ConnectionClosed()

    def _parse_next(self) -> ServerEvent:
        if self._state is ServerState.GREETING:
            return self._parse_greeting()
        if self._state is ServerState.AUTH:
            return self._parse_credentials()
        return self._parse_request()

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

    def _parse_greeting(self) -> Greeting:
        """``05 NMETHODS METHODS`` (RFC 1928 section 3)."""
        buffer = self._buffer  # not empty: next_event() asks only then
        version = buffer[0]
        if version != SOCKS_VERSION:
            raise self._broken(f"greeting has version {version:#04x}, not 0x05")
        if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
            raise _Incomplete
        end = 2 + buffer[1]
        methods = tuple(buffer[2:end])
        del buffer[:end]
        self._state = ServerState.SEND_METHOD
        return Greeting(methods)

    def _parse_credentials(self) -> AuthRequest:
        """``01 ULEN UNAME PLEN PASSWD`` (RFC 1929 section 2)."""
        (version,) = self._peek(1)
        if version != AUTH_VERSION:
            raise self._broken(
                f"username/password message has version {version:#04x}, not 0x01",
                AuthResult(accepted=False),
            )
        ulen = self._peek(2)[1]
        plen = self._peek(2 + ulen + 1)[-1]
        message = self._take(2 + ulen + 1 + plen)
        self._state = ServerState.SEND_AUTH_RESULT
        return AuthRequest(
            username=message[2 : 2 + ulen].decode("utf-8", "surrogateescape"),
            password=message[3 + ulen :].decode("utf-8", "surrogateescape"),
        )

    def _parse_request(self) -> BindRequest | ConnectRequest:
        """``05 CMD RSV ATYP DST.ADDR DST.PORT`` (RFC 1928 section 4); RSV is ignored."""
        version, command, _rsv, atyp = self._peek(4)
        self._request_atyp = atyp if atyp in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN) else ATYP_IPV4
        if version != SOCKS_VERSION:
            raise self._refuse(ReplyCode.GENERAL_FAILURE, f"version {version:#04x}")
        try:
            addr_len = address_length(atyp, self._buffer, 4)
        except KeyError:
            raise self._refuse(
                ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp:#04x}"
            ) from None
        if addr_len is None:
            raise _Incomplete
        message = self._take(4 + addr_len + 2)
        if atyp == ATYP_DOMAIN and addr_len == 1:
            raise self._refuse(ReplyCode.GENERAL_FAILURE, "empty domain name")
        try:
            address = decode_address(atyp, message[4 : 4 + addr_len])
        except LocalProtocolError as exc:
            raise self._refuse(ReplyCode.HOST_UNREACHABLE, str(exc)) from None
        (port,) = struct.unpack_from("!H", message, 4 + addr_len)
        return self._dispatch_request(command, address, port)

    def _dispatch_request(
        self, command: int, address: IPAddress | str, port: int
    ) -> BindRequest | ConnectRequest:
        after_bind = self._state is ServerState.AFTER_BIND
        if command == CMD_CONNECT:
            self._state = ServerState.SEND_CONNECT_REPLY
            bind = self._bind.address if self._bind is not None else None
            return ConnectRequest(host=address, port=port, bind_address=bind)
        if command == CMD_BIND and not after_bind:
            self._bind = BindRequest(address=address, port=port)
            self._state = ServerState.SEND_BIND_REPLY
            return self._bind
        what = "a second BIND" if command == CMD_BIND else f"command {command:#04x}"
        raise self._refuse(ReplyCode.COMMAND_NOT_SUPPORTED, what)

    def _refuse(self, code: ReplyCode, what: str) -> Socks5ProtocolError:
        return self._broken(f"request with {what}: reply {code.name}", Refused(code))
