"""Configuration: one TOML file (plus KumoMTA sources.toml files) -> frozen dataclasses.

Theory of operation
-------------------
The main file holds egressd's own tables (``[dial]``, ``[dns]``, ``[access]``, ``[limits]``,
``[auth]``, ``[log]``, ``[metrics]``, ``[control]``, ``[health]``, ``[socks5]``, ``[proxy]``,
``[smtp]``) and may hold ``[source.*]`` and ``[pool.*]`` tables in KumoMTA's sources.toml
schema. ``sources_files = [...]`` names further sources.toml files, relative to the main
file. Files are read in order: the main file first, then each sources file. A source defined
in several files is merged key by key, the later file winning (as KumoMTA's sources.lua
does); a pool entry listed in two files is an error (KumoMTA silently counts it twice).

Validation is strict and exhaustive: every problem is collected with the file and the key
path it concerns, and :class:`ConfigError` carries all of them. This module is pure: it
reads files but opens no socket and imports no trio.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HopKind = Literal["direct", "haproxy", "socks5"]

DEFAULT_CONFIG_PATH = "/etc/egressd/egressd.toml"
DEFAULT_TTL = 60.0

DEFAULT_DENY_DESTINATIONS: tuple[str, ...] = (
    # IANA's IPv4 and IPv6 special-purpose address registries (RFC 6890): every block that
    # is not globally reachable, and multicast. See egressd.access for embedded IPv4.
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
)


class ConfigError(Exception):
    """Every problem found in a configuration, each naming its file and key path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class Endpoint:
    """A host (IP literal or DNS name) and a port."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an IP address, or None when it is a name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str | IPAddress, port: int) -> str:
    """``ip:port``, with IPv6 literals in brackets: ``[::1]:25``."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@dataclass(frozen=True)
class SuspendPolicy:
    """KumoMTA's ``{ duration = "5m", trigger = "Immediate" | { Threshold = "3/5m" } }``.

    A source is suspended for ``duration`` seconds once ``count`` failures happened within
    ``window`` seconds (``Immediate`` is a count of 1).
    """

    duration: float
    count: int = 1
    window: float = 0.0


DEFAULT_SUSPEND_POLICY = SuspendPolicy(duration=300.0, count=1, window=0.0)
DEFAULT_CONNECT_FAILURE_POLICY = SuspendPolicy(duration=60.0, count=3, window=60.0)


@dataclass(frozen=True)
class Source:
    """An egress identity, with KumoMTA's ``make_egress_source`` keys."""

    name: str
    source_address: IPAddress | None = None
    ehlo_domain: str | None = None
    remote_port: int | None = None
    ha_proxy_server: Endpoint | None = None
    ha_proxy_source_address: IPAddress | None = None
    socks5_proxy_server: Endpoint | None = None
    socks5_proxy_source_address: IPAddress | None = None
    socks5_proxy_username: str | None = None
    socks5_proxy_password: str | None = None
    ttl: float = DEFAULT_TTL
    suspend_when_unplumbed: SuspendPolicy | None = None
    suspend_when_proxy_unhealthy: SuspendPolicy | None = None

    @property
    def hop(self) -> HopKind:
        """How connections of this source leave: directly, via HAProxy or via SOCKS5."""
        if self.ha_proxy_server is not None:
            return "haproxy"
        if self.socks5_proxy_server is not None:
            return "socks5"
        return "direct"

    @property
    def egress_address(self) -> IPAddress | None:
        """The address the destination sees, when the configuration fixes one."""
        if self.hop == "haproxy":
            return self.ha_proxy_source_address
        if self.hop == "socks5" and self.socks5_proxy_source_address is not None:
            return self.socks5_proxy_source_address
        if self.hop == "direct":
            return self.source_address
        return None

    @property
    def egress_version(self) -> int | None:
        """The IP version (4 or 6) of destinations this source can reach, if fixed."""
        address = self.egress_address
        return address.version if address is not None else None

    def matches_address(self, address: IPAddress) -> bool:
        """True when ``address`` is this source's own address or the one its hop uses."""
        return address in (
            self.source_address,
            self.ha_proxy_source_address,
            self.socks5_proxy_source_address,
        )


@dataclass(frozen=True)
class PoolEntry:
    source: str
    weight: int = 1


@dataclass(frozen=True)
class Pool:
    name: str
    entries: tuple[PoolEntry, ...] = ()


@dataclass(frozen=True)
class Listener:
    """One listening socket of a front door, optionally tagged with a default pool."""

    address: Endpoint
    pool: str | None = None


@dataclass(frozen=True)
class DialSettings:
    timeout: float = 30.0


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[Endpoint, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class AccessSettings:
    clients: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    destination_ports: tuple[int, ...] = (25, 465, 587, 2525)
    deny_destinations: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_DENY_DESTINATIONS
    )


@dataclass(frozen=True)
class LimitSettings:
    max_connections: int = 10000
    max_connections_per_source: int = 2000
    handshake_timeout: float = 30.0
    idle_timeout: float = 600.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class LogSettings:
    format: Literal["text", "json"] = "text"
    level: str = "info"


@dataclass(frozen=True)
class MetricsSettings:
    listen: Endpoint | None = None


@dataclass(frozen=True)
class ControlSettings:
    socket: str | None = None


@dataclass(frozen=True)
class HealthSettings:
    """Defaults for sources that do not set KumoMTA's suspend keys."""

    suspend_when_unplumbed: SuspendPolicy = DEFAULT_SUSPEND_POLICY
    suspend_when_proxy_unhealthy: SuspendPolicy = DEFAULT_SUSPEND_POLICY
    suspend_on_connect_failures: SuspendPolicy = DEFAULT_CONNECT_FAILURE_POLICY


@dataclass(frozen=True)
class SmtpTimeouts:
    """Timeouts towards the remote server; each stays below Postfix's client timeouts."""

    banner: float = 240.0
    command: float = 240.0
    data_init: float = 100.0
    data_block: float = 150.0
    final_dot: float = 540.0


@dataclass(frozen=True)
class SmtpTls:
    """Outbound STARTTLS policy, and the certificate offered to MTAs (inbound STARTTLS)."""

    mode: Literal["opportunistic", "required", "disabled"] = "opportunistic"
    verify: bool = False
    certificate: str | None = None
    private_key: str | None = None


@dataclass(frozen=True)
class SmtpSettings:
    listeners: tuple[Listener, ...] = ()
    hostname: str | None = None
    max_message_size: int = 52428800
    sender_pools: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    routes: Mapping[str, Endpoint] = field(default_factory=lambda: MappingProxyType({}))
    tls: SmtpTls = SmtpTls()
    timeouts: SmtpTimeouts = SmtpTimeouts()


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    path: Path
    sources: Mapping[str, Source]
    pools: Mapping[str, Pool]
    source_files: tuple[Path, ...] = ()
    hostname: str | None = None
    dial: DialSettings = DialSettings()
    dns: DnsSettings = DnsSettings()
    access: AccessSettings = AccessSettings()
    limits: LimitSettings = LimitSettings()
    auth: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    control: ControlSettings = ControlSettings()
    health: HealthSettings = HealthSettings()
    socks5_listeners: tuple[Listener, ...] = ()
    proxy_listeners: tuple[Listener, ...] = ()
    smtp: SmtpSettings = SmtpSettings()

    @property
    def min_ttl(self) -> float:
        """The shortest ``ttl`` of any source: how often sources files are checked."""
        return min((s.ttl for s in self.sources.values()), default=DEFAULT_TTL)

    def source_for_address(self, address: IPAddress) -> Source | None:
        """The configured source whose own or hop address is ``address``."""
        for source in self.sources.values():
            if source.matches_address(address):
                return source
        return None


# --------------------------------------------------------------------------- parsing values

_DURATION_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    (("s", "sec", "secs", "second", "seconds"), 1.0),
    (("m", "min", "mins", "minute", "minutes"), 60.0),
    (("h", "hr", "hrs", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
):
    for _name in _names:
        _DURATION_UNITS[_name] = _seconds

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def parse_duration(text: str) -> float:
    """Seconds in a humantime duration: "60s", "5 mins", "5 minutes", "1h 30m", "250ms"."""
    lowered = text.strip().lower()
    if not lowered:
        raise ValueError("is empty")
    total = 0.0
    position = 0
    while position < len(lowered):
        match = _DURATION_PART.match(lowered, position)
        if match is None or match.end() == position:
            raise ValueError('is not a duration (use e.g. "60s", "5 mins", "1h")')
        unit = _DURATION_UNITS.get(match.group(2))
        if unit is None:
            raise ValueError(f'has an unknown unit "{match.group(2)}"')
        total += float(match.group(1)) * unit
        position = match.end()
    return total


def is_hostname(text: str) -> bool:
    return bool(_HOSTNAME.match(text))


def parse_hostport(
    text: str, *, allow_names: bool = True, default_port: int | None = None
) -> Endpoint:
    """``ip:port``, ``[ipv6]:port`` or ``host:port`` -> :class:`Endpoint`."""
    host: str
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("has an unclosed '['")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("has text after ']' that is not ':port'")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has {host!r} in brackets, which is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise ValueError("is an IPv6 address without brackets (write [addr]:port)")
    else:
        host, _, port_text = text.partition(":")
        port_text = port_text if ":" in text else None
    if port_text is None:
        if default_port is None:
            raise ValueError("has no port (write host:port)")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"has a port {port_text!r} that is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"has a port {port} outside 1-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not allow_names:
            raise ValueError(f"has {host!r}, which is not an IP address") from None
        if not is_hostname(host):
            raise ValueError(
                f"has {host!r}, which is neither an IP address nor a host name"
            ) from None
    return Endpoint(host, port)


# --------------------------------------------------------------------------- table reader

T = TypeVar("T")
_MISSING: Any = object()


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, file: str, path: str, message: str) -> None:
        self.items.append(f"{file}: {path}: {message}" if path else f"{file}: {message}")


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class _Table:
    """Reads typed keys from one TOML table and remembers which keys were used."""

    def __init__(self, errors: _Errors, file: str, path: str, data: Mapping[str, Any]) -> None:
        self.errors = errors
        self.file = file
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}: {key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.add(self.file, self.key_path(key), message)

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key, _MISSING)

    def typed(self, key: str, kind: type[T], what: str) -> T | None:
        value = self.raw(key)
        if value is _MISSING:
            return None
        if isinstance(value, bool) and kind is not bool:
            self.error(key, f"expected {what}, got a boolean")
            return None
        if kind is float and isinstance(value, int):
            return float(value)  # type: ignore[return-value]
        if not isinstance(value, kind):
            self.error(key, f"expected {what}, got {_type_name(value)}")
            return None
        return value

    def string(self, key: str) -> str | None:
        return self.typed(key, str, "a string")

    def boolean(self, key: str) -> bool | None:
        return self.typed(key, bool, "a boolean (true or false)")

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.typed(key, int, "an integer")
        if value is not None and not low <= value <= high:
            self.error(key, f"{value} is outside {low}-{high}")
            return None
        return value

    def convert(self, key: str, parse: Callable[[str], T]) -> T | None:
        text = self.string(key)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            self.error(key, f"{_quote(text)} {exc}")
            return None

    def ip(self, key: str) -> IPAddress | None:
        return self.convert(key, _parse_ip)

    def duration(self, key: str) -> float | None:
        return self.convert(key, parse_duration)

    def endpoint(self, key: str, *, allow_names: bool = True) -> Endpoint | None:
        return self.convert(key, lambda t: parse_hostport(t, allow_names=allow_names))

    def table(self, key: str) -> _Table | None:
        value = self.typed(key, dict, "a table")
        if value is None:
            return None
        return _Table(self.errors, self.file, self.key_path(key), value)

    def array(self, key: str) -> list[Any] | None:
        return self.typed(key, list, "an array")

    def strings(self, key: str, parse: Callable[[str], T]) -> list[T] | None:
        items = self.array(key)
        if items is None:
            return None
        result: list[T] = []
        for index, item in enumerate(items):
            item_key = f"{key}[{index}]"
            if not isinstance(item, str):
                self.error(item_key, f"expected a string, got {_type_name(item)}")
                continue
            try:
                result.append(parse(item))
            except ValueError as exc:
                self.error(item_key, f"{_quote(item)} {exc}")
        return result

    def tables(self, key: str) -> list[_Table]:
        items = self.array(key)
        if items is None:
            return []
        result = []
        for index, item in enumerate(items):
            item_path = self.key_path(f"{key}[{index}]")
            if not isinstance(item, dict):
                self.errors.add(self.file, item_path, f"expected a table, got {_type_name(item)}")
                continue
            result.append(_Table(self.errors, self.file, item_path, item))
        return result

    def finish(self) -> None:
        """Report every key this table holds that nothing read: a typo must not pass."""
        for key in self.data:
            if key not in self.used:
                self.error(key, "unknown key")


def _quote(text: str) -> str:
    """A value as TOML would write it: in double quotes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IP address") from None


def _parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("is not an IP network (CIDR)") from None


# --------------------------------------------------------------------------- sources and pools

_SOURCE_KEYS = (
    "source_address",
    "ehlo_domain",
    "remote_port",
    "ha_proxy_server",
    "ha_proxy_source_address",
    "socks5_proxy_server",
    "socks5_proxy_source_address",
    "socks5_proxy_username",
    "socks5_proxy_password",
    "ttl",
    "suspend_when_unplumbed",
    "suspend_when_proxy_unhealthy",
)


@dataclass
class _SourceDraft:
    """Raw keys of one source, merged across files; each value remembers its file."""

    values: dict[str, tuple[str, Any]] = field(default_factory=dict)


def _collect_sources(
    errors: _Errors, file: str, data: Mapping[str, Any], drafts: dict[str, _SourceDraft]
) -> None:
    sources = data.get("source", {})
    if not isinstance(sources, dict):
        errors.add(file, "source", f"expected a table of sources, got {_type_name(sources)}")
        return
    for name, keys in sources.items():
        if not isinstance(keys, dict):
            errors.add(file, f'source "{name}"', f"expected a table, got {_type_name(keys)}")
            continue
        draft = drafts.setdefault(name, _SourceDraft())
        for key, value in keys.items():
            if key not in _SOURCE_KEYS:
                errors.add(file, f'source "{name}": {key}', "unknown key")
                continue
            draft.values[key] = (file, value)


def _build_source(errors: _Errors, name: str, draft: _SourceDraft) -> Source | None:
    """Validate one merged source; each key is checked against the file it came from."""
    found: dict[str, Any] = {}
    before = len(errors.items)
    for key, (file, value) in draft.values.items():
        reader = _Table(errors, file, f'source "{name}"', {key: value})
        found[key] = _read_source_key(reader, key)
    source = Source(name=name, ttl=found.pop("ttl", None) or DEFAULT_TTL, **found)
    coherent = _check_source_coherence(errors, draft, source)
    return source if coherent and len(errors.items) == before else None


def _read_source_key(reader: _Table, key: str) -> Any:
    if key in ("source_address", "ha_proxy_source_address", "socks5_proxy_source_address"):
        return reader.ip(key)
    if key in ("ha_proxy_server", "socks5_proxy_server"):
        return reader.endpoint(key)
    if key == "remote_port":
        return reader.integer(key, 1, 65535)
    if key == "ttl":
        return reader.duration(key)
    if key == "ehlo_domain":
        return reader.convert(key, _parse_ehlo_domain)
    if key in ("suspend_when_unplumbed", "suspend_when_proxy_unhealthy"):
        return _read_suspend_policy(reader, key)
    return reader.string(key)


def _parse_ehlo_domain(text: str) -> str:
    if not is_hostname(text):
        raise ValueError("is not a host name")
    return text


def _read_suspend_policy(reader: _Table, key: str) -> SuspendPolicy | None:
    table = reader.table(key)
    if table is None:
        return None
    duration = table.duration("duration")
    if "duration" not in table.data:
        table.error("duration", "is required")
    trigger = table.raw("trigger")
    count, window = 1, 0.0
    if trigger is _MISSING or trigger == "Immediate":
        pass
    elif isinstance(trigger, dict) and set(trigger) == {"Threshold"}:
        try:
            count, window = _parse_threshold(trigger["Threshold"])
        except ValueError as exc:
            table.error("trigger", f"{trigger['Threshold']!r} {exc}")
            return None
    else:
        table.error("trigger", 'expected "Immediate" or { Threshold = "N/duration" }')
        return None
    table.finish()
    if duration is None:
        return None
    return SuspendPolicy(duration=duration, count=count, window=window)


def _parse_threshold(value: object) -> tuple[int, float]:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError('has a Threshold that is not "N/duration" such as "3/5m"')
    count_text, _, window_text = value.partition("/")
    if not count_text.strip().isdigit() or int(count_text) < 1:
        raise ValueError(f"has a Threshold count {count_text!r} that is not a positive integer")
    return int(count_text), parse_duration(window_text)


def _check_source_coherence(errors: _Errors, draft: _SourceDraft, source: Source) -> bool:
    """Refuse key combinations that KumoMTA silently ignores or that can never connect."""
    ok = True

    def fail(key: str, message: str) -> None:
        nonlocal ok
        ok = False
        file = draft.values[key][0] if key in draft.values else next(iter(draft.values.values()))[0]
        errors.add(file, f'source "{source.name}": {key}', message)

    for server_key, address_key in (
        ("ha_proxy_server", "ha_proxy_source_address"),
        ("socks5_proxy_username", "socks5_proxy_password"),
    ):
        if (server_key in draft.values) != (address_key in draft.values):
            present, missing = (
                (server_key, address_key)
                if server_key in draft.values
                else (address_key, server_key)
            )
            fail(present, f"is set without {missing}; set both or neither")
    if "socks5_proxy_source_address" in draft.values and "socks5_proxy_server" not in draft.values:
        fail("socks5_proxy_source_address", "is set without socks5_proxy_server")
    if "socks5_proxy_username" in draft.values and "socks5_proxy_server" not in draft.values:
        fail("socks5_proxy_username", "is set without socks5_proxy_server")
    if source.ha_proxy_server is not None and source.socks5_proxy_server is not None:
        fail("socks5_proxy_server", "is set together with ha_proxy_server; a source has one hop")
    for hop_key in ("ha_proxy_server", "socks5_proxy_server"):
        hop: Endpoint | None = getattr(source, hop_key)
        hop_ip = hop.ip if hop is not None else None
        address = source.source_address
        if address is not None and hop_ip is not None and address.version != hop_ip.version:
            fail(
                "source_address",
                f"IPv{address.version} address {address} "
                f"can never connect to the IPv{hop_ip.version} {hop_key} {hop}",
            )
    return ok


def _collect_pools(
    errors: _Errors,
    file: str,
    data: Mapping[str, Any],
    pools: dict[str, dict[str, tuple[str, int]]],
) -> None:
    """Append this file's pool entries; an entry already listed by another file is an error."""
    tables = data.get("pool", {})
    if not isinstance(tables, dict):
        errors.add(file, "pool", f"expected a table of pools, got {_type_name(tables)}")
        return
    for pool_name, entries in tables.items():
        if not isinstance(entries, dict):
            errors.add(file, f'pool "{pool_name}"', f"expected a table, got {_type_name(entries)}")
            continue
        pool = pools.setdefault(pool_name, {})
        for source_name, entry in entries.items():
            path = f'pool "{pool_name}": source "{source_name}"'
            if not isinstance(entry, dict):
                errors.add(
                    file,
                    path,
                    f"expected a table (pools have no keys of their own), got {_type_name(entry)}",
                )
                continue
            reader = _Table(errors, file, path, entry)
            weight = reader.integer("weight", 0, 1_000_000)
            reader.finish()
            if source_name in pool:
                first_file = pool[source_name][0]
                errors.add(file, path, f"is already listed in {first_file}; list each entry once")
                continue
            if weight is None and "weight" in entry:
                continue
            pool[source_name] = (file, 1 if weight is None else weight)


# --------------------------------------------------------------------------- egressd's tables


def _read_listeners(parent: _Table, door: str) -> tuple[Listener, ...]:
    table = parent.table(door)
    if table is None:
        return ()
    listeners = _listener_tables(table)
    table.finish()
    return listeners


def _listener_tables(door: _Table) -> tuple[Listener, ...]:
    """A door's ``[[DOOR.listener]]`` array: ``address`` (required) and ``pool``."""
    listeners = []
    for item in door.tables("listener"):
        address = item.endpoint("address", allow_names=False)
        if "address" not in item.data:
            item.error("address", "is required")
        pool = item.string("pool")
        item.finish()
        if address is not None:
            listeners.append(Listener(address=address, pool=pool))
    return tuple(listeners)


def _read_dial(table: _Table | None) -> DialSettings:
    if table is None:
        return DialSettings()
    timeout = table.duration("timeout")
    table.finish()
    return DialSettings(timeout=timeout if timeout is not None else DialSettings.timeout)


def _read_dns(table: _Table | None) -> DnsSettings:
    if table is None:
        return DnsSettings()
    servers = table.strings(
        "nameservers", lambda t: parse_hostport(t, allow_names=False, default_port=53)
    )
    timeout = table.duration("timeout")
    table.finish()
    return DnsSettings(
        nameservers=tuple(servers or ()),
        timeout=timeout if timeout is not None else DnsSettings.timeout,
    )


def _read_access(table: _Table | None) -> AccessSettings:
    default = AccessSettings()
    if table is None:
        return default
    clients = table.strings("clients", _parse_network)
    deny = table.strings("deny_destinations", _parse_network)
    ports_raw = table.array("destination_ports")
    ports: list[int] | None = None
    if ports_raw is not None:
        ports = []
        for index, item in enumerate(ports_raw):
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
                table.error(f"destination_ports[{index}]", f"{item!r} is not a port (1-65535)")
            else:
                ports.append(item)
    table.finish()
    return AccessSettings(
        clients=tuple(clients) if clients is not None else default.clients,
        destination_ports=tuple(ports) if ports is not None else default.destination_ports,
        deny_destinations=tuple(deny) if deny is not None else default.deny_destinations,
    )


def _read_limits(table: _Table | None) -> LimitSettings:
    default = LimitSettings()
    if table is None:
        return default
    max_connections = table.integer("max_connections", 1, 10_000_000)
    per_source = table.integer("max_connections_per_source", 1, 10_000_000)
    handshake = table.duration("handshake_timeout")
    idle = table.duration("idle_timeout")
    grace = table.duration("shutdown_grace")
    table.finish()
    return LimitSettings(
        max_connections=_or(max_connections, default.max_connections),
        max_connections_per_source=_or(per_source, default.max_connections_per_source),
        handshake_timeout=_or(handshake, default.handshake_timeout),
        idle_timeout=_or(idle, default.idle_timeout),
        shutdown_grace=_or(grace, default.shutdown_grace),
    )


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _read_auth(table: _Table | None) -> Mapping[str, str]:
    if table is None:
        return MappingProxyType({})
    users = table.table("users")
    table.finish()
    result: dict[str, str] = {}
    if users is not None:
        for name in users.data:
            password = users.string(name)
            if password is not None:
                result[name] = password
    return MappingProxyType(result)


def _read_log(table: _Table | None) -> LogSettings:
    if table is None:
        return LogSettings()
    fmt = table.string("format")
    level = table.string("level")
    if fmt is not None and fmt not in ("text", "json"):
        table.error("format", f'{fmt!r} is not "text" or "json"')
        fmt = None
    levels = ("debug", "info", "warning", "error")
    if level is not None and level.lower() not in levels:
        table.error("level", f"{level!r} is not one of {', '.join(levels)}")
        level = None
    table.finish()
    return LogSettings(
        format="json" if fmt == "json" else "text",
        level=(level or "info").lower(),
    )


def _read_metrics(table: _Table | None) -> MetricsSettings:
    if table is None:
        return MetricsSettings()
    listen = table.endpoint("listen", allow_names=False)
    table.finish()
    return MetricsSettings(listen=listen)


def _read_control(table: _Table | None) -> ControlSettings:
    if table is None:
        return ControlSettings()
    socket_path = table.string("socket")
    table.finish()
    return ControlSettings(socket=socket_path)


def _read_health(table: _Table | None) -> HealthSettings:
    default = HealthSettings()
    if table is None:
        return default
    values = {
        key: _read_suspend_policy(table, key)
        for key in (
            "suspend_when_unplumbed",
            "suspend_when_proxy_unhealthy",
            "suspend_on_connect_failures",
        )
    }
    table.finish()
    return HealthSettings(
        **{k: v if v is not None else getattr(default, k) for k, v in values.items()}
    )


def _read_smtp(table: _Table | None) -> SmtpSettings:
    if table is None:
        return SmtpSettings()
    listeners = _listener_tables(table)
    hostname = table.convert("hostname", _parse_ehlo_domain)
    size = table.integer("max_message_size", 0, 2**40)
    sender_pools = _read_string_map(table.table("sender_pools"))
    routes_table = table.table("routes")
    routes: dict[str, Endpoint] = {}
    if routes_table is not None:
        for domain in routes_table.data:
            endpoint = routes_table.convert(domain, lambda t: parse_hostport(t, default_port=25))
            if endpoint is not None:
                routes[domain.lower()] = endpoint
    tls = _read_smtp_tls(table.table("tls"))
    timeouts = _read_smtp_timeouts(table.table("timeouts"))
    table.finish()
    return SmtpSettings(
        listeners=listeners,
        hostname=hostname,
        max_message_size=size if size is not None else SmtpSettings.max_message_size,
        sender_pools=MappingProxyType({k.lower(): v for k, v in sender_pools.items()}),
        routes=MappingProxyType(routes),
        tls=tls,
        timeouts=timeouts,
    )


def _read_string_map(table: _Table | None) -> dict[str, str]:
    result: dict[str, str] = {}
    if table is None:
        return result
    for key in table.data:
        value = table.string(key)
        if value is not None:
            result[key] = value
    return result


def _read_smtp_tls(table: _Table | None) -> SmtpTls:
    if table is None:
        return SmtpTls()
    mode = table.string("mode")
    if mode is not None and mode not in ("opportunistic", "required", "disabled"):
        table.error("mode", f'{mode!r} is not "opportunistic", "required" or "disabled"')
        mode = None
    verify = table.boolean("verify")
    certificate = table.string("certificate")
    private_key = table.string("private_key")
    if (certificate is None) != (private_key is None):
        table.error("certificate", "certificate and private_key go together; set both or neither")
    table.finish()
    return SmtpTls(
        mode=mode or "opportunistic",  # type: ignore[arg-type]
        verify=bool(verify),
        certificate=certificate,
        private_key=private_key,
    )


def _read_smtp_timeouts(table: _Table | None) -> SmtpTimeouts:
    default = SmtpTimeouts()
    if table is None:
        return default
    limits = {"banner": 290, "command": 290, "data_init": 110, "data_block": 170, "final_dot": 590}
    values: dict[str, float] = {}
    for key, ceiling in limits.items():
        value = table.duration(key)
        if value is not None and value > ceiling:
            table.error(
                key, f"{value:g}s must stay below Postfix's client timeout (at most {ceiling}s)"
            )
            value = None
        values[key] = value if value is not None else getattr(default, key)
    table.finish()
    return SmtpTimeouts(**values)


# --------------------------------------------------------------------------- loading

_MAIN_KEYS = {
    "sources_files",
    "source",
    "pool",
    "hostname",
    "dial",
    "dns",
    "access",
    "limits",
    "auth",
    "log",
    "metrics",
    "control",
    "health",
    "socks5",
    "proxy",
    "smtp",
}


def _read_toml(errors: _Errors, path: Path, shown: str) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError:
        errors.add(shown, "", "file not found")
    except PermissionError:
        errors.add(shown, "", "permission denied")
    except IsADirectoryError:
        errors.add(shown, "", "is a directory, not a file")
    except tomllib.TOMLDecodeError as exc:
        errors.add(shown, "", f"not valid TOML: {exc}")
    except OSError as exc:
        errors.add(shown, "", f"cannot be read: {exc.strerror}")
    return None


def load_config(path: str | Path) -> Config:
    """Read, merge and validate a configuration; raise :class:`ConfigError` listing all errors."""
    main_path = Path(path)
    errors = _Errors()
    main_name = str(main_path)
    data = _read_toml(errors, main_path, main_name)
    if data is None:
        raise ConfigError(errors.items)
    root = _Table(errors, main_name, "", data)
    for key in data:
        if key not in _MAIN_KEYS:
            root.error(key, "unknown key")
    root.used.update(_MAIN_KEYS)

    drafts: dict[str, _SourceDraft] = {}
    pool_entries: dict[str, dict[str, tuple[str, int]]] = {}
    _collect_sources(errors, main_name, data, drafts)
    _collect_pools(errors, main_name, data, pool_entries)
    source_files: list[Path] = []
    for extra in _sources_files(root, main_path):
        shown = str(extra)
        extra_data = _read_toml(errors, extra, shown)
        source_files.append(extra)
        if extra_data is None:
            continue
        for key in extra_data:
            if key not in ("source", "pool"):
                errors.add(shown, key, "unknown key (a sources file holds only source and pool)")
        _collect_sources(errors, shown, extra_data, drafts)
        _collect_pools(errors, shown, extra_data, pool_entries)

    sources: dict[str, Source] = {}
    for name, draft in drafts.items():
        source = _build_source(errors, name, draft)
        if source is not None:
            sources[name] = source
    pools = _build_pools(errors, pool_entries, drafts)

    config = Config(
        path=main_path,
        sources=MappingProxyType(sources),
        pools=MappingProxyType(pools),
        source_files=tuple(source_files),
        hostname=root.convert("hostname", _parse_ehlo_domain),
        dial=_read_dial(root.table("dial")),
        dns=_read_dns(root.table("dns")),
        access=_read_access(root.table("access")),
        limits=_read_limits(root.table("limits")),
        auth=_read_auth(root.table("auth")),
        log=_read_log(root.table("log")),
        metrics=_read_metrics(root.table("metrics")),
        control=_read_control(root.table("control")),
        health=_read_health(root.table("health")),
        socks5_listeners=_read_listeners(root, "socks5"),
        proxy_listeners=_read_listeners(root, "proxy"),
        smtp=_read_smtp(root.table("smtp")),
    )
    _check_listener_pools(errors, main_name, config)
    if errors.items:
        raise ConfigError(errors.items)
    return config


def _sources_files(root: _Table, main_path: Path) -> list[Path]:
    names = root.strings("sources_files", lambda t: t)
    if not names:
        return []
    return [main_path.parent / name for name in names]


def _build_pools(
    errors: _Errors,
    pool_entries: dict[str, dict[str, tuple[str, int]]],
    drafts: Mapping[str, _SourceDraft],
) -> dict[str, Pool]:
    pools: dict[str, Pool] = {}
    for pool_name, entries in pool_entries.items():
        kept = []
        for source_name, (file, weight) in entries.items():
            if source_name not in drafts:
                errors.add(
                    file,
                    f'pool "{pool_name}": source "{source_name}"',
                    "names a source that is not defined in any file",
                )
                continue
            kept.append(PoolEntry(source=source_name, weight=weight))
        pools[pool_name] = Pool(name=pool_name, entries=tuple(kept))
    return pools


def _check_listener_pools(errors: _Errors, file: str, config: Config) -> None:
    doors = (
        ("socks5.listener", config.socks5_listeners),
        ("proxy.listener", config.proxy_listeners),
        ("smtp.listener", config.smtp.listeners),
    )
    seen: dict[Endpoint, str] = {}
    for door, listeners in doors:
        for index, listener in enumerate(listeners):
            path = f"{door}[{index}]"
            if listener.pool is not None and listener.pool not in config.pools:
                errors.add(file, f"{path}: pool", f'"{listener.pool}" is not a defined pool')
            if listener.address in seen:
                errors.add(
                    file,
                    f"{path}: address",
                    f"{listener.address} is already used by {seen[listener.address]}",
                )
            seen[listener.address] = path
    for key, pool in config.smtp.sender_pools.items():
        if pool not in config.pools:
            errors.add(file, f'smtp.sender_pools: "{key}"', f'"{pool}" is not a defined pool')
    for user in config.auth:
        if user not in config.pools:
            errors.add(
                file, f'auth.users: "{user}"', "names no defined pool (the username is the pool)"
            )


def config_path_from(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """-c/--config, else $EGRESSD_CONFIG, else the default path."""
    return cli_value or environ.get("EGRESSD_CONFIG") or DEFAULT_CONFIG_PATH


def load_status_endpoints(path: str | Path) -> Config:
    """Only ``[control]`` and ``[metrics]`` of a main file, ignoring every other table.

    ``egressd status`` uses it when the file on disk no longer validates: the running
    daemon still answers on the addresses it was started with.
    """
    main_path = Path(path)
    errors = _Errors()
    data = _read_toml(errors, main_path, str(main_path))
    if data is None:
        raise ConfigError(errors.items)
    root = _Table(errors, str(main_path), "", data)
    control = _read_control(root.table("control"))
    metrics = _read_metrics(root.table("metrics"))
    if errors.items:
        raise ConfigError(errors.items)
    empty: Mapping[str, Any] = MappingProxyType({})
    return Config(path=main_path, sources=empty, pools=empty, control=control, metrics=metrics)
