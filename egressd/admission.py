"""Who gets one more front-door connection: the daemon's, each client's and each door's share.

Theory of operation
-------------------
Every front-door connection is counted here while it is open, by door and by client
address. A new one is admitted unless one of three rules refuses it, checked in this
order (the refusal names the rule, and the door turns it into a protocol-correct refusal
at once, never a parked connection):

1. ``[limits] max_connections``: the whole daemon.
2. ``[limits] max_connections_per_client``: one client address, whatever the door and
   port (default: half of ``max_connections``), so that one client, or one tenant behind
   one address, can never hold the whole daemon.
3. ``[limits] reserved_per_door``: every door that has a listener keeps this many
   connections in reserve (default: a tenth of ``max_connections``). A door may take a
   connection only if what stays free still covers the other doors' reserves that they
   do not use yet. A flood on the SMTP door can then fill everything but the reserves,
   and the SOCKS5 and PROXY doors still get their share.

Pure: no trio, no sockets; :class:`~egressd.runtime.Runtime` calls it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from egressd.config import LimitSettings


def client_cap(limits: LimitSettings) -> int:
    """``max_connections_per_client``, else half of ``max_connections`` (at least 1)."""
    if limits.max_connections_per_client is not None:
        return limits.max_connections_per_client
    return max(1, limits.max_connections // 2)


def door_reserve(limits: LimitSettings) -> int:
    """``reserved_per_door``, else a tenth of ``max_connections``."""
    if limits.reserved_per_door is not None:
        return limits.reserved_per_door
    return limits.max_connections // 10


class Admission:
    """Open connections by door and by client address; :meth:`refusal` decides."""

    def __init__(self) -> None:
        self.total = 0
        self.by_door: Counter[str] = Counter()
        self.by_client: Counter[str] = Counter()

    def refusal(
        self, limits: LimitSettings, doors: Collection[str], door: str, client: str
    ) -> str | None:
        """None when ``client`` may open one more connection on ``door``, else the reason.

        ``doors`` are the doors that have listeners (only they keep a reserve).
        """
        if self.total >= limits.max_connections:
            return f"egressd is at max_connections ({limits.max_connections})"
        cap = client_cap(limits)
        if self.by_client[client] >= cap:
            return f"client {client} is at max_connections_per_client ({cap})"
        reserve = door_reserve(limits)
        owed = sum(max(0, reserve - self.by_door[d]) for d in doors if d != door)
        if limits.max_connections - self.total - 1 < owed:
            return (
                f"the rest of max_connections ({limits.max_connections}) is reserved for the"
                f" other doors (reserved_per_door {reserve})"
            )
        return None

    def opened(self, door: str, client: str) -> None:
        self.total += 1
        self.by_door[door] += 1
        self.by_client[client] += 1

    def closed(self, door: str, client: str) -> None:
        self.total -= 1
        self.by_door[door] -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]
