"""egressd's protocol machines: sans-IO, no trio, no sockets, no clock.

Use them through one namespace per protocol::

    from egressd.proto import proxy, smtp, socks5

:mod:`~egressd.proto.smtp` (server and client), :mod:`~egressd.proto.socks5` (server and
client) and :mod:`~egressd.proto.proxy` (the PROXY protocol header) all have one shape,
h11's, described in :mod:`egressd.proto.machine`: ``receive_data`` / ``next_event`` /
``send``, one :data:`NEED_DATA`, and a peer's protocol error reported as a
:class:`RemoteProtocolError` with a hint for the reply.
"""

from __future__ import annotations

from egressd.proto.machine import (
    NEED_DATA,
    PAUSED,
    LocalProtocolError,
    NeedData,
    ProtocolError,
    RemoteProtocolError,
    Sentinel,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "Sentinel",
]
