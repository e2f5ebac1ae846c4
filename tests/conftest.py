"""Shared fixtures: loopback sinks and real HAProxy / Dante / redis-server servers (see
harness.py and redis_harness.py).

Async fixtures run in the test's trio loop (pytest-trio, ``trio_mode = true``) and live
until the test ends; the daemon fixtures are synchronous and stop their process by PID.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from harness import Dante, HAProxy, Sink, dante, haproxy_transparent, start_sink
from redis_harness import RedisServer, new_server, redis_servers
from state_helpers import StateBackend, StoreOpener

from egressd.config.state import StateSettings, parse_redis_url
from egressd.fleet.client import open_client
from egressd.fleet.stores import ThreadedStore
from egressd.state import Store, open_store
from egressd.state.redis import RedisStore


@pytest.fixture
async def sink(nursery: trio.Nursery) -> Sink:
    """A banner-sending echo server on 127.0.0.1 (any free port)."""
    return await start_sink(nursery, "127.0.0.1")


@pytest.fixture
async def sink6(nursery: trio.Nursery) -> Sink:
    """A banner-sending echo server on ::1 (any free port)."""
    return await start_sink(nursery, "::1")


@pytest.fixture
def haproxy() -> Iterator[HAProxy]:
    """A transparent HAProxy on 127.0.0.1 accepting PROXY headers."""
    with haproxy_transparent() as server:
        yield server


@pytest.fixture
def dante_open() -> Iterator[Dante]:
    """Dante without authentication, connecting out from 127.0.0.3."""
    with dante(external="127.0.0.3", auth=False) as server:
        yield server


@pytest.fixture
def dante_auth() -> Iterator[Dante]:
    """Dante requiring RFC 1929 username/password, connecting out from 127.0.0.3."""
    with dante(external="127.0.0.3", auth=True) as server:
        yield server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path holds at most 107 bytes."""
    directory = tempfile.mkdtemp(prefix="eg-")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start real redis-servers: ``redis_factory(password=None, users=None, tls=False)``.

    Each call starts Debian's redis-server in the foreground on 127.0.0.1 (a free port), in
    a private temporary directory, without persistence, and returns its
    :class:`~redis_harness.RedisServer`: ``.url`` / ``.url_with(user, password)`` for the
    client, ``.ca_file`` with ``tls=True``, ``.kill()`` (SIGKILL by PID) and ``.start()``
    again on the same port for outages. Every server is stopped by PID when the test ends.
    """
    with redis_servers() as started:
        yield lambda **options: new_server(started, **options)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A plain redis-server (no AUTH, no TLS) on loopback; see ``redis_factory``."""
    return redis_factory()


STATE_BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=STATE_BACKENDS)
async def open_backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> AsyncIterator[StoreOpener]:
    """Opens a :class:`~egressd.state.Store` of each backend in turn (the state contract
    tests, tests/state/test_store_contract.py, run against every one). Called again, it
    opens the same state anew (the same SQLite file; the same redis-server and prefix,
    with a new client), as a restarted daemon would. Every store and client opened is
    closed when the test ends."""
    async with contextlib.AsyncExitStack() as stack:
        server = redis_factory() if request.param == "redis" else None

        async def opener() -> Store:
            if server is None:
                store: Store = ThreadedStore(open_store(tmp_path))
            else:
                settings = StateSettings(backend="redis", url=parse_redis_url(server.url))
                client = await stack.enter_async_context(open_client(settings))
                store = RedisStore(client)
            stack.push_async_callback(store.close)
            return store

        yield opener


@pytest.fixture(params=STATE_BACKENDS)
def state_backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> StateBackend:
    """Each backend in turn for a real daemon: ``state_backend.toml()`` is the ``[state]``
    table to put in its configuration, ``await state_backend.snapshot()`` what it stored."""
    if request.param == "redis":
        return StateBackend("redis", tmp_path, redis_factory())
    return StateBackend("sqlite", tmp_path)
