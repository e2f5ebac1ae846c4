"""The state backends as tests use them: the contract fixture's type, and a daemon's
``[state]`` table with a way to read back what it stored (fixtures in conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from redis_harness import RedisServer

from egressd.config.state import StateSettings, parse_redis_url
from egressd.fleet.client import open_client
from egressd.state import Snapshot, Store, open_store
from egressd.state.redis import RedisStore

StoreOpener = Callable[[], Awaitable[Store]]
"""Opens the test's state (again): a fresh :class:`~egressd.state.Store` on the same data."""


@dataclass
class StateBackend:
    """A backend for a real daemon: ``toml`` is its ``[state]`` table (a directory under
    ``directory``, or the redis-server ``redis``), :meth:`snapshot` reads what it stored."""

    name: str
    directory: Path
    redis: RedisServer | None = None

    def toml(self, **extra: str) -> str:
        lines = ["[state]", f'directory = "{self.directory / "state"}"']
        if self.redis is not None:
            lines += [
                'backend = "redis"',
                f'url = "{self.redis.url}"',
                'heartbeat_interval = "0.2s"',
            ]
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    async def snapshot(self) -> Snapshot:
        if self.redis is None:
            store = open_store(self.directory / "state")
            try:
                return store.load("0000-00-00", 0.0)
            finally:
                store.close()
        settings = StateSettings(backend="redis", url=parse_redis_url(self.redis.url))
        async with open_client(settings) as client:
            return await RedisStore(client).load("0000-00-00", 0.0)
