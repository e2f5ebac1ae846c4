"""Run one front door's trio shell on a memory stream, for tests/doors/.

:func:`door_shell` starts ``door.handle`` on one end of a ``memory_stream_pair`` with a
:class:`~egressd.runtime.Runtime` built from ``config``; the test is the client, on the
other end, through :class:`Shell`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from egressd.config import Config, Listener
from egressd.daemon import Door
from egressd.runtime import Runtime, SessionRecord


@dataclass
class Shell:
    """The client's end of a door under test, and what the door records."""

    client: trio.abc.HalfCloseableStream
    record: SessionRecord
    done: trio.Event
    runtime: Runtime

    async def send(self, data: bytes) -> None:
        await self.client.send_all(data)

    async def receive(self, count: int) -> bytes:
        """Exactly ``count`` bytes, or fewer if the door closed first."""
        data = bytearray()
        while len(data) < count:
            chunk = await self.client.receive_some(count - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def closed(self) -> bool:
        """True when the door closed its side (EOF) with nothing more to say."""
        return await self.client.receive_some(1) == b""


@asynccontextmanager
async def door_shell(
    door: Door, config: Config, listener: Listener, runtime: Runtime | None = None
) -> AsyncIterator[Shell]:
    """``runtime``: share one between several connections (default: a new one)."""
    runtime = runtime or Runtime(config)
    record = SessionRecord(door=door.name, client="127.0.0.1")
    client_end, door_end = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await door.handle(door_end, runtime, listener, record)  # type: ignore[arg-type]
        await door_end.aclose()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield Shell(client_end, record, done, runtime)
        nursery.cancel_scope.cancel()
