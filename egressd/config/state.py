"""``[state]``: where durable and shared state lives (embedded SQLite, or Redis/Valkey).

```toml
[state]
backend = "sqlite"                      # or "redis" (pip install egressd[redis])
directory = "/var/lib/egressd"          # sqlite: default $STATE_DIRECTORY, else this

# backend = "redis"
url = "redis://egressd@redis.example:6379/0"   # or rediss:// (TLS); user (and password)
password_file = "redis.password"        # the password, kept out of this file
ca_file = "redis-ca.pem"                # rediss://: the CA to trust (default: the system's)
prefix = "egressd"                      # key namespace: two fleets can share one Redis
connect_timeout = "2s"
command_timeout = "1s"
node_name = "mx-1"                      # default: the host name
heartbeat_interval = "5s"               # a node unseen for 3 intervals is stale
lease_timeout = "30s"                   # a dead node's shared connection slots come back
startup_wait = "10s"                    # Redis down at startup: give up (exit 75) after this
```

A password in ``url`` works, but ``check --effective`` prints it masked and the main file
then holds a secret: ``password_file`` (relative to this file; one trailing newline is
dropped) keeps it in a file of its own. Paths are taken from the directory of the file
that names them.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from egressd.config.problems import Where
from egressd.config.reader import Choice, Parsed, Text, expect, setting
from egressd.config.values import parse_duration, quote

__all__ = ["REDIS_CLIENT", "RedisUrl", "StateSettings", "parse_redis_url"]

REDIS_CLIENT = "glide"
"""The module of the Redis client (valkey-glide), installed by ``egressd[redis]``."""

_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


class RedisUrl:
    """A parsed ``redis://`` / ``rediss://`` URL; printed with its password masked."""

    __slots__ = ("database", "host", "password", "port", "tls", "username")

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        database: int = 0,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.username, self.password, self.database = username, password, database

    def _key(self) -> tuple[Any, ...]:
        return (self.host, self.port, self.tls, self.username, self.password, self.database)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedisUrl) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        user = self.username or ""
        secret = ":***" if self.password is not None else ""
        at = "@" if user or secret else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{secret}{at}{host}:{self.port}/{self.database}"

    __repr__ = __str__


def parse_redis_url(text: str) -> RedisUrl:
    """``redis[s]://[user[:password]@]host[:port][/db]``; ValueError completes a sentence."""
    try:
        parts = urlsplit(text)
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("is not a redis:// or rediss:// URL (redis+unix:// is not supported)")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.query or parts.fragment:
        raise ValueError("has a query or fragment; put options in [state] keys instead")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"has {quote(path)} as database; expected a number such as /0")
    return RedisUrl(
        parts.hostname,
        port,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=int(path or 0),
    )


def _parse_prefix(text: str) -> str:
    if not _PREFIX.fullmatch(text):
        raise ValueError("must be 1-64 letters, digits or _.:{}- (a Redis key namespace)")
    return text


@dataclass(frozen=True)
class _Timeout:
    """A duration above zero."""

    def read(self, value: object, where: Where) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be above zero")
        return seconds


@dataclass(frozen=True)
class _FilePath:
    """A file that must exist, relative to the file naming it; kept as an absolute path."""

    def read(self, value: object, where: Where) -> str:
        path = Path(where.file).parent / expect(value, str, "a file name")
        if not path.is_file():
            raise ValueError(f"names the file {quote(str(path))}, which does not exist")
        return str(path)


@dataclass(frozen=True)
class _PasswordFile:
    """A file holding a password (one trailing newline dropped); the password is kept."""

    def read(self, value: object, where: Where) -> str:
        path = Path(_FilePath().read(value, where))
        try:
            secret = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"names the file {quote(str(path))}, unreadable: {exc}") from None
        secret = secret.removesuffix("\n").removesuffix("\r")
        if not secret:
            raise ValueError(f"names the file {quote(str(path))}, which holds no password")
        return secret


@dataclass(frozen=True)
class StateSettings:
    """``[state]``: the backend and where it lives (see the module docstring)."""

    backend: str = setting(Choice(("sqlite", "redis")), "sqlite")
    directory: str | None = setting(Text(), None)
    url: RedisUrl | None = setting(Parsed(parse_redis_url), None)
    password_file: str | None = setting(_PasswordFile(), None)
    """The password read from ``password_file`` (masked by ``check --effective``)."""
    ca_file: str | None = setting(_FilePath(), None)
    prefix: str = setting(Parsed(_parse_prefix), "egressd")
    connect_timeout: float = setting(_Timeout(), 2.0)
    command_timeout: float = setting(_Timeout(), 1.0)
    node_name: str | None = setting(Text(), None)
    heartbeat_interval: float = setting(_Timeout(), 5.0)
    lease_timeout: float = setting(_Timeout(), 30.0)
    """How long a connection slot of a shared budget outlives a node that stopped renewing
    it (renewed every third of it): a node killed returns its slots within this time."""
    startup_wait: float = setting(_Timeout(), 10.0)
    """How long a starting daemon waits for Redis before it gives up (exit 75)."""

    @property
    def password(self) -> str | None:
        """The Redis password: ``password_file``'s, else the URL's."""
        if self.password_file is not None:
            return self.password_file
        return self.url.password if self.url is not None else None

    def check_keys(self, at: Any) -> None:
        if self.backend != "redis":
            return
        if self.url is None:
            at("url").error('is required with backend = "redis"')
        if self.ca_file is not None and self.url is not None and not self.url.tls:
            at("ca_file").error("is set but url is not rediss:// (TLS)")
        if importlib.util.find_spec(REDIS_CLIENT) is None:
            at("backend").error(
                '"redis" needs the Redis client (valkey-glide), which is not installed: '
                "pip install egressd[redis]"
            )
