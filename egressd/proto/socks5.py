"""SOCKS5, client and server, in one namespace: ``from egressd.proto import socks5``.

The wire format and the events both sides share live in :mod:`egressd.proto.socks5_common`,
the server machine (the SOCKS5 front door's) in :mod:`egressd.proto.socks5_server`, the
client machine and the handshake egressd's dialer runs in :mod:`egressd.proto.socks5_client`.
Every machine follows :mod:`egressd.proto.machine`.
"""

from __future__ import annotations

from egressd.proto.machine import NEED_DATA, LocalProtocolError, RemoteProtocolError
from egressd.proto.socks5_client import (
    ClientEvent,
    ClientMessage,
    ClientState,
    HandshakeError,
    Socks5Client,
    Socks5Handshake,
)
from egressd.proto.socks5_common import (
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
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
    check_name,
    reply_address_for,
    reply_code,
    reply_label,
)
from egressd.proto.socks5_server import (
    MAX_SERVER_BUFFER_SIZE,
    ConnectionClosed,
    ServerEvent,
    ServerState,
    Socks5Server,
    choose_method,
)

__all__ = [
    "MAX_SERVER_BUFFER_SIZE",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_USERNAME_PASSWORD",
    "NEED_DATA",
    "AuthRequest",
    "AuthResult",
    "BindRequest",
    "ClientEvent",
    "ClientMessage",
    "ClientState",
    "ConnectRequest",
    "ConnectionClosed",
    "Greeting",
    "HandshakeError",
    "LocalProtocolError",
    "MethodChoice",
    "Refused",
    "RemoteProtocolError",
    "ReplyCode",
    "ServerAnswer",
    "ServerEvent",
    "ServerState",
    "Socks5Client",
    "Socks5Handshake",
    "Socks5ProtocolError",
    "Socks5Server",
    "Succeeded",
    "check_name",
    "choose_method",
    "reply_address_for",
    "reply_code",
    "reply_label",
]
