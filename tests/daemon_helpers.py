"""Run an in-process egressd daemon for end-to-end tests of the front doors.

Listeners configured with port 0 get a free port; ``port_of`` tells which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from egressd.config import load_config
from egressd.daemon import Daemon, serve


@asynccontextmanager
async def running_daemon(config_text: str, directory: Path) -> AsyncIterator[Daemon]:
    """Write ``config_text`` as egressd.toml in ``directory``, serve it, stop at exit."""
    path = directory / "egressd.toml"
    path.write_text(config_text)
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(serve, config)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


def port_of(daemon: Daemon, door: str, index: int = 0) -> int:
    """The real port of the door's ``index``-th listener, in configuration order."""
    ports = [port for (name, _), port in daemon.bound_ports().items() if name == door]
    return ports[index]
