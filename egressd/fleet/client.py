"""The Redis/Valkey client for ``[state] backend = "redis"``: valkey-glide on trio.

Theory of operation
-------------------
Why valkey-glide: measured against coredis (the other anyio-native client) under trio on
a local redis-server (``scripts/bench redis-client``), glide made about twice the calls per
second for sequential round trips and ``EVALSHA``, two to three times as many with 16-64
concurrent tasks, at half the client CPU per call (its protocol work runs in Rust). Its
futures are resolved through anyio, so ``trio.fail_after`` cancels a call.

:func:`open_client` builds one client from ``[state]``: the host, port and database of
``url``; ``rediss://`` for TLS, trusting ``ca_file`` when given (else the system's CAs);
``AUTH`` with the URL's user and the password of ``password_file`` (else the URL's);
``connect_timeout`` for TCP/TLS set-up and ``command_timeout`` for each call. The client
connects lazily, so a daemon can start while Redis is down; glide reconnects in the
background, with a backoff capped near one second, once it is back.

Every call goes through :meth:`FleetClient.command`, :meth:`~FleetClient.script` or
:meth:`~FleetClient.transaction`, each under ``trio.fail_after`` (connect plus command
timeout), and every failure (refused, reset, timed out, an error reply) is raised as
:class:`RedisUnavailable`, whose message names the server (password masked).
:class:`BackendHealth` follows the calls: the first failure logs "state backend DOWN"
(error level) and the first success after it "state backend back", once each, whichever
part of egressd (store, heartbeats, budgets) made the call. A
transaction that times out is ambiguous: Redis may or may not have applied it; callers
whose writes are increments say what they do about that (:mod:`egressd.state.redis`).

Keys: every key egressd writes is ``{prefix}:...`` (:meth:`FleetClient.key`), so two
fleets can share one Redis.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from glide import (
    AdvancedGlideClientConfiguration,
    BackoffStrategy,
    Batch,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    NodeAddress,
    Script,
    ServerCredentials,
    TlsAdvancedConfiguration,
)

from egressd.config import StateSettings
from egressd.log import get_logger
from egressd.state import StateUnavailable

__all__ = ["Arg", "BackendHealth", "FleetClient", "RedisUnavailable", "open_client"]

log = get_logger("fleet")

Arg = str | bytes | int | float
"""One argument of a Redis command."""

RECONNECT = BackoffStrategy(num_of_retries=4, factor=60, exponent_base=2, jitter_percent=20)
"""glide's reconnection backoff: 60, 120, 240, 480, then 960 ms between attempts."""


class RedisUnavailable(StateUnavailable):
    """Redis could not be reached or refused a call; the message names the server."""


@dataclass
class BackendHealth:
    """Whether Redis answered the last call; logs once when it goes down and once when it
    is back (``egressd_state_backend_up``, ``egressd status``)."""

    location: str
    up: bool = True
    since: float = field(default_factory=time.time)
    """When :attr:`up` last changed (or the client was opened)."""
    error: str | None = None
    """Why the last call failed, while down."""
    announce: bool = True
    """Log the changes (False for a second client of the same process that logs its own)."""

    def failed(self, error: str) -> None:
        self.error = error
        if self.up:
            self.up, self.since = False, time.time()
            if not self.announce:
                return
            log.error(
                "state backend DOWN: shared state is kept in memory until it is back",
                extra={"fields": {"backend": self.location, "error": error}},
            )

    def succeeded(self) -> None:
        if not self.up:
            down_for = time.time() - self.since
            self.up, self.since, self.error = True, time.time(), None
            if not self.announce:
                return
            log.warning(
                "state backend back",
                extra={"fields": {"backend": self.location, "down_seconds": round(down_for, 1)}},
            )

    def to_json(self) -> dict[str, Any]:
        return {"up": self.up, "since": round(self.since, 3), "error": self.error}


@dataclass
class FleetClient:
    """One glide client with egressd's key namespace, timeouts and error type."""

    glide: GlideClient
    settings: StateSettings
    health: BackendHealth
    _scripts: dict[str, Script] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """The server's URL, password masked, for messages."""
        return str(self.settings.url)

    @property
    def deadline(self) -> float:
        """The longest one call may take: a (re)connection plus the command."""
        return self.settings.connect_timeout + self.settings.command_timeout

    def key(self, *parts: str) -> str:
        """``{prefix}:part:part...``: every key egressd writes lives under the prefix."""
        return ":".join((self.settings.prefix, *parts))

    async def command(self, *args: Arg) -> Any:
        """One command (``"HGETALL"``, key...); its reply as glide decodes it (bytes)."""
        return await self._call(self.glide.custom_command, [_arg(a) for a in args])

    async def script(self, source: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run the Lua ``source`` by its SHA1 (``EVALSHA``), loaded on ``NOSCRIPT``."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = Script(source)  # type: ignore[no-untyped-call]
        return await self._call(
            self.glide.invoke_script,
            script,
            keys=[_arg(k) for k in keys],
            args=[_arg(a) for a in args],
        )

    async def transaction(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """``MULTI`` ... ``EXEC``: all of ``commands`` applied, or none; their replies."""
        batch = Batch(is_atomic=True)
        for command in commands:
            batch.custom_command([_arg(a) for a in command])
        replies = await self._call(self.glide.exec, batch, True)
        return list(replies or [])

    async def ping(self) -> None:
        await self.command("PING")

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with trio.fail_after(self.deadline):
                reply = await function(*args, **kwargs)
        except trio.TooSlowError:
            raise self._failed(f"no answer within {self.deadline:g} s") from None
        except GlideError as exc:
            raise self._failed(_describe(exc)) from None
        self.health.succeeded()
        return reply

    def _failed(self, why: str) -> RedisUnavailable:
        self.health.failed(why)
        return RedisUnavailable(f"{self.location}: {why}")


def _arg(value: Arg) -> str | bytes:
    if isinstance(value, str | bytes):
        return value
    return repr(value) if isinstance(value, float) else str(value)


def _describe(exc: GlideError) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def configuration(settings: StateSettings, client_name: str) -> GlideClientConfiguration:
    """glide's configuration for ``[state]`` (see the module docstring)."""
    url = settings.url
    if url is None:
        raise ValueError("[state] url is not set")
    password = settings.password
    credentials = None
    if password is not None or url.username:
        credentials = ServerCredentials(password=password or "", username=url.username)
    tls = None
    if settings.ca_file is not None:
        tls = TlsAdvancedConfiguration(root_pem_cacerts=Path(settings.ca_file).read_bytes())
    return GlideClientConfiguration(
        [NodeAddress(url.host, url.port)],
        use_tls=url.tls,
        credentials=credentials,
        request_timeout=_ms(settings.command_timeout),
        reconnect_strategy=RECONNECT,
        database_id=url.database,
        client_name=client_name,
        advanced_config=AdvancedGlideClientConfiguration(
            connection_timeout=_ms(settings.connect_timeout), tls_config=tls
        ),
        lazy_connect=True,
    )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@asynccontextmanager
async def open_client(
    settings: StateSettings, client_name: str = "egressd", *, announce: bool = True
) -> AsyncIterator[FleetClient]:
    """A :class:`FleetClient` for ``[state]``, closed at exit. It connects lazily: a
    Redis that is down shows at the first call, as :class:`RedisUnavailable`.
    ``announce=False``: its :class:`BackendHealth` does not log (a second client of the
    process whose user logs the outage its own way)."""
    try:
        glide = await GlideClient.create(configuration(settings, client_name))
    except (GlideError, OSError) as exc:
        raise RedisUnavailable(f"{settings.url}: cannot set up the client: {exc}") from None
    try:
        yield FleetClient(glide, settings, BackendHealth(str(settings.url), announce=announce))
    finally:
        with trio.CancelScope(shield=True):
            await glide.close()
