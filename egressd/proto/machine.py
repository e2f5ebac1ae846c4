"""The one shape every sans-IO machine in :mod:`egressd.proto` has (h11's).

Theory of operation
-------------------
A machine never touches a socket, a clock or trio. The driver (a door, the dialer, a test)
moves bytes; the machine turns them into events and events into bytes:

* ``receive_data(data)`` feeds bytes read from the peer; ``b""`` means the peer closed its
  sending side (EOF).
* ``next_event()`` returns the next event the peer's bytes make, or :data:`NEED_DATA` when
  more bytes must be fed first (SMTP also has :data:`PAUSED`: a reply is owed first).
* ``send(event)`` returns the bytes that say ``event`` to the peer.

Errors come in two kinds, both :class:`ProtocolError`:

* :class:`LocalProtocolError`: egressd misused a machine (an answer out of turn, an event
  that cannot be encoded). It is a bug; nothing the peer sends can cause it.
* :class:`RemoteProtocolError`: the peer broke the protocol. ``next_event()`` raises it
  (every machine: SOCKS5, PROXY and SMTP, whose ``start_tls()`` also raises it when
  plaintext followed STARTTLS) and the machine then sits in its ERROR state, raising the same
  error on every later call. ``reply`` is a hint: the event to ``send()`` before closing
  (a SOCKS5 failure reply, an SMTP reply), or None when the connection should just close.
"""

from __future__ import annotations

import enum
from typing import Final, Generic, Literal, TypeVar

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "Sentinel",
]


class Sentinel(enum.Enum):
    """Values ``next_event()`` returns when it has no event."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: Feed more bytes with ``receive_data()``.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The machine will not parse further until the driver sends the reply it owes (SMTP).
PAUSED: Final = Sentinel.PAUSED
#: The type of :data:`NEED_DATA`, for ``next_event()`` signatures.
NeedData = Literal[Sentinel.NEED_DATA]

HintT = TypeVar("HintT")


class ProtocolError(Exception):
    """Base of every error a protocol machine raises."""


class LocalProtocolError(ProtocolError):
    """The caller misused a machine or built an invalid event: a bug in egressd."""


class RemoteProtocolError(ProtocolError, Generic[HintT]):
    """The peer broke the protocol; the machine is now in its ERROR state.

    ``reply`` is the hint for what to ``send()`` to the peer before closing, if anything.
    """

    def __init__(self, message: str, reply: HintT | None = None) -> None:
        super().__init__(message)
        self.reply = reply
