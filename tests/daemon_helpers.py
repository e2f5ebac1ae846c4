"""Run an in-process egressd daemon for end-to-end tests of the front doors.

Listeners configured with port 0 get a free port; ``port_of`` tells which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from egressd.config import load_config
from egressd.daemon import Daemon, Door, serve


@asynccontextmanager
async def running_daemon(
    config_text: str, directory: Path, doors: dict[str, Door] | None = None
) -> AsyncIterator[Daemon]:
    """Write ``config_text`` as egressd.toml in ``directory``, serve it, stop at exit.

    ``doors`` replaces the daemon's front doors (e.g. ``{"smtp": SmtpDoor()}``), so a door's
    tests need no other door's module.
    """
    path = directory / "egressd.toml"
    path.write_text(config_text)
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(partial(serve, config, doors=doors))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


def port_of(daemon: Daemon, door: str, index: int = 0) -> int:
    """The real port of the door's ``index``-th listener, in configuration order."""
    ports = [port for (name, _), port in daemon.bound_ports().items() if name == door]
    return ports[index]
