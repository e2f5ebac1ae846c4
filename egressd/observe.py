"""Operator-facing extras started with the daemon: the metrics endpoint and control socket."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from egressd.daemon import Daemon


async def start(daemon: Daemon, nursery: trio.Nursery) -> None:
    """Start what the configuration asks for (filled in with the service issue)."""
