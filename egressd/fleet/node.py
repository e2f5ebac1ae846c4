"""This process as a member of the fleet: its Redis client, heartbeats and backend state.

Theory of operation
-------------------
:func:`open_fleet` is entered once by the daemon (and by each worker) before anything uses
the state: with ``[state] backend = "redis"`` it opens the client
(:func:`egressd.fleet.client.open_client`, which connects lazily) and yields a
:class:`Fleet`; with the embedded backend it yields None and imports no Redis library.

:meth:`Fleet.start` starts the heartbeats (:mod:`egressd.fleet.heartbeat`) in the daemon's
nursery; :meth:`Fleet.leave` removes this member's record at shutdown. What ``egressd
status`` shows of the backend (:meth:`Fleet.status`) and the ``egressd_state_backend_up``
gauge both read :attr:`Fleet.health`, which every Redis call updates.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from egressd import __version__
from egressd.config import Config

if TYPE_CHECKING:
    from egressd.fleet.client import BackendHealth, FleetClient
    from egressd.fleet.heartbeat import Heartbeats

__all__ = ["Fleet", "config_generation", "node_name", "open_fleet"]


def node_name(config: Config) -> str:
    """``[state] node_name``, else the host name."""
    return config.state.node_name or socket.gethostname()


def config_generation(files: Iterable[Path]) -> str:
    """A short hash of the loaded files' contents (path and bytes): two members that
    differ here run different configurations. A file that cannot be read counts as empty."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\0")
        with suppress(OSError):
            digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


@dataclass
class Fleet:
    """The Redis client of this process and, once started, its heartbeats."""

    client: FleetClient
    node: str
    heartbeats: Heartbeats | None = None

    @property
    def health(self) -> BackendHealth:
        return self.client.health

    def alive_nodes(self) -> int:
        """Nodes last seen alive (>= 1): the divisor of local budget shares in an outage."""
        return self.heartbeats.alive_nodes() if self.heartbeats is not None else 1

    def start(
        self,
        nursery: trio.Nursery,
        generation: Callable[[], str],
        connections: Callable[[], Mapping[str, int]],
        worker: str | None = None,
    ) -> None:
        """Beat every ``heartbeat_interval`` in ``nursery`` as ``node`` (or ``node/worker``)."""
        from egressd.fleet.heartbeat import Heartbeats

        self.heartbeats = Heartbeats(
            self.client, self.node, __version__, generation, connections, worker=worker
        )
        nursery.start_soon(self.heartbeats.run)

    async def leave(self) -> None:
        if self.heartbeats is not None:
            await self.heartbeats.leave()

    def status(self, generation: str) -> dict[str, Any]:
        """The backend and, from the last heartbeat's read, the fleet (for the control
        socket: no Redis call is made here)."""
        view = self.heartbeats.view if self.heartbeats is not None else None
        return {
            "backend": "redis",
            "location": self.client.location,
            "prefix": self.client.settings.prefix,
            "node": self.node,
            "member": self.heartbeats.id if self.heartbeats is not None else self.node,
            **self.health.to_json(),
            "fleet": view.to_json(generation) if view is not None else None,
        }


@asynccontextmanager
async def open_fleet(config: Config) -> AsyncIterator[Fleet | None]:
    """A :class:`Fleet` with ``[state] backend = "redis"``, else None; closed at exit."""
    if config.state.backend != "redis":
        yield None
        return
    from egressd.fleet.client import open_client

    node = node_name(config)
    async with open_client(config.state, client_name=f"egressd:{node}") as client:
        yield Fleet(client, node)
