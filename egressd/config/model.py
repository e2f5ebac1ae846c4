"""The configuration's frozen dataclasses, each field saying how its key is read.

Every default is the field's default (:func:`~egressd.config.reader.setting`), and the
fields are the keys a table may hold: the tables of the main file, a KumoMTA source
(``make_egress_source``'s keys) and a pool entry.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from egressd.addresses import IPAddress, IPNetwork
from egressd.config.keysource import Password
from egressd.config.problems import Where
from egressd.config.reader import (
    Choice,
    Flag,
    Integer,
    ListOf,
    MapOf,
    Parsed,
    Section,
    Table,
    Tables,
    Text,
    expect,
    read_table,
    setting,
)
from egressd.config.state import StateSettings
from egressd.config.values import (
    Endpoint,
    parse_duration,
    parse_ehlo_domain,
    parse_hostport,
    parse_ip,
    parse_network,
    parse_throttle,
    quote,
    type_name,
)
from egressd.config.warmup import WarmupSettings

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


class _Duration:
    """KumoMTA's duration: a number of seconds, or a humantime string such as ``"5m"``."""

    def read(self, value: object, where: Where) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(
                f'expected a duration (seconds, or a string such as "5m"), got {type_name(value)}'
            )
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValueError(
                f"{quote(value)} {exc}" if isinstance(value, str) else str(exc)
            ) from None


Duration = _Duration()
IP = Parsed(parse_ip)
EhloDomain = Parsed(parse_ehlo_domain)
Network = Parsed(parse_network)
HostPort = Parsed(parse_hostport)
ListenAddress = Parsed(lambda text: parse_hostport(text, allow_names=False, allow_zero=True))
"""An address to listen on; port 0 takes any free port (what tests want)."""
Port = Integer(1, 65535)

KeyAt = Callable[[str], Where]


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


# --------------------------------------------------------------------------- suspensions


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


class Trigger:
    """``"Immediate"`` or ``{ Threshold = "N/period" }`` (a ThrottleSpec) -> ``(count, window)``.

    As in KumoMTA, a threshold fires once ``limit`` failures fell within ``period``; its
    ``local:`` prefix and ``max_burst`` are read and have no further meaning here.
    """

    def read(self, value: object, where: Where) -> tuple[int, float]:
        if value == "Immediate":
            return 1, 0.0
        if isinstance(value, dict) and set(value) == {"Threshold"}:
            spec = value["Threshold"]
            if not isinstance(spec, str):
                raise ValueError(f"Threshold: expected a string, got {type_name(spec)}")
            try:
                throttle = parse_throttle(spec)
            except ValueError as exc:
                raise ValueError(f"Threshold {quote(spec)} {exc}") from None
            return throttle.limit, float(throttle.period)
        raise ValueError('expected "Immediate" or { Threshold = "N/period" } such as "3/5m"')


@dataclass(frozen=True)
class _SuspendTable:
    duration: float = setting(Duration)
    trigger: tuple[int, float] = setting(Trigger(), (1, 0.0))


class Suspend:
    """A ``suspend_when_*`` table: ``duration`` (required) and ``trigger``."""

    def read(self, value: object, where: Where) -> SuspendPolicy:
        table = read_table(_SuspendTable, expect(value, dict, "a table"), where)
        count, window = table.trigger
        return SuspendPolicy(duration=table.duration, count=count, window=window)


# --------------------------------------------------------------------------- sources and pools


@dataclass(frozen=True)
class Source:
    """An egress identity, with KumoMTA's ``make_egress_source`` keys.

    ``name`` is the table's name; a ``name`` key in the table is accepted when it says the
    same. As in KumoMTA, a proxy is used only when both of its keys are set: a
    ``socks5_proxy_server`` without ``socks5_proxy_source_address`` goes direct (``check``
    says so) unless ``egressd_socks5_plain_connect = true`` asks for a plain CONNECT
    through it, for a standard SOCKS5 server (Dante, 3proxy) that picks the address itself.
    """

    name: str = setting(None)
    source_address: IPAddress | None = setting(IP, None)
    ehlo_domain: str | None = setting(EhloDomain, None)
    remote_port: int | None = setting(Port, None)
    ha_proxy_server: Endpoint | None = setting(HostPort, None)
    ha_proxy_source_address: IPAddress | None = setting(IP, None)
    socks5_proxy_server: Endpoint | None = setting(HostPort, None)
    socks5_proxy_source_address: IPAddress | None = setting(IP, None)
    socks5_proxy_username: str | None = setting(Text(), None)
    socks5_proxy_password: str | None = setting(Password(), None)
    ttl: float = setting(Duration, DEFAULT_TTL)
    suspend_when_unplumbed: SuspendPolicy | None = setting(Suspend(), None)
    suspend_when_proxy_unhealthy: SuspendPolicy | None = setting(Suspend(), None)
    egressd_socks5_plain_connect: bool = setting(Flag(), False)
    """egressd's own key: CONNECT through ``socks5_proxy_server`` without KumoMTA's BIND."""
    warmup: str | None = setting(Text(), None)
    """egressd's own key: the warm-up plan this source follows (``[warmup.plan.NAME]``)."""

    @property
    def hop(self) -> HopKind:
        """How connections of this source leave: directly, via HAProxy or via SOCKS5."""
        if self.ha_proxy_server is not None and self.ha_proxy_source_address is not None:
            return "haproxy"
        if self.socks5_proxy_server is not None and (
            self.socks5_proxy_source_address is not None or self.egressd_socks5_plain_connect
        ):
            return "socks5"
        return "direct"

    @property
    def socks5_ignored(self) -> bool:
        """A ``socks5_proxy_server`` that KumoMTA ignores (no source address): it goes direct."""
        return self.socks5_proxy_server is not None and self.hop == "direct"

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
        """True when ``address`` is this source's own address or the one its proxy uses."""
        return address in (
            self.source_address,
            self.ha_proxy_source_address,
            self.socks5_proxy_source_address,
        )

    def check_keys(self, at: KeyAt) -> None:
        """Refuse key combinations that KumoMTA silently ignores or that can never connect."""
        for first, second in (
            ("ha_proxy_server", "ha_proxy_source_address"),
            ("socks5_proxy_username", "socks5_proxy_password"),
        ):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                present, missing = (first, second) if getattr(self, first) else (second, first)
                at(present).error(f"is set without {missing}; set both or neither")
        if self.socks5_proxy_server is None:
            for key in ("socks5_proxy_source_address", "socks5_proxy_username"):
                if getattr(self, key) is not None:
                    at(key).error("is set without socks5_proxy_server")
            if self.egressd_socks5_plain_connect:
                at("egressd_socks5_plain_connect").error("is set without socks5_proxy_server")
        elif self.egressd_socks5_plain_connect and self.socks5_proxy_source_address is not None:
            at("egressd_socks5_plain_connect").error(
                "is set together with socks5_proxy_source_address, which asks for KumoMTA's "
                "BIND; set one or the other"
            )
        if self.hop == "haproxy" and self.socks5_proxy_set:
            at("socks5_proxy_server").error(
                "is set together with ha_proxy_server; a source has one proxy"
            )
        self._check_families(at)

    @property
    def socks5_proxy_set(self) -> bool:
        """Whether the SOCKS5 keys alone would make a SOCKS5 proxy."""
        return self.socks5_proxy_server is not None and (
            self.socks5_proxy_source_address is not None or self.egressd_socks5_plain_connect
        )

    def _check_families(self, at: KeyAt) -> None:
        address = self.source_address
        proxy = {"haproxy": self.ha_proxy_server, "socks5": self.socks5_proxy_server}.get(self.hop)
        proxy_ip = proxy.ip if proxy is not None else None
        if address is not None and proxy_ip is not None and address.version != proxy_ip.version:
            at("source_address").error(
                f"IPv{address.version} address {address} "
                f"can never connect to the IPv{proxy_ip.version} {self.proxy_key} {proxy}"
            )

    @property
    def proxy_key(self) -> str:
        return "ha_proxy_server" if self.hop == "haproxy" else "socks5_proxy_server"


@dataclass(frozen=True)
class PoolEntry:
    source: str
    weight: int = setting(Integer(0, 2**32 - 1), 1)


@dataclass(frozen=True)
class Pool:
    name: str
    entries: tuple[PoolEntry, ...] = ()


# --------------------------------------------------------------------------- egressd's tables


@dataclass(frozen=True)
class Listener:
    """One listening socket of a front door, optionally tagged with a default pool."""

    address: Endpoint = setting(ListenAddress)
    pool: str | None = setting(Text(), None)


@dataclass(frozen=True)
class SmtpListener(Listener):
    """An ``[[smtp.listener]]``: also says whether AUTH is required when users exist."""

    auth: Literal["required", "optional"] = setting(Choice(("required", "optional")), "required")
    """``optional``: with ``[auth.users]``, a client that does not authenticate still relays,
    through the listener's pool only (for loopback-only MTAs that tag by listener)."""


@dataclass(frozen=True)
class Socks5Listener(Listener):
    """A ``[[socks5.listener]]``: optionally TLS (and mutual TLS), as KumoProxy's
    ``start_proxy_listener`` offers (its key names: ``use_tls``, ``tls_certificate``,
    ``tls_private_key``; the client CA as KumoMTA's ESMTP listener names it)."""

    use_tls: bool = setting(Flag(), False)
    tls_certificate: str | None = setting(Text(), None)
    tls_private_key: str | None = setting(Text(), None)
    tls_required_client_ca: str | None = setting(Text(), None)
    """Mutual TLS: a client must present a certificate issued by one of these CAs."""

    def check_keys(self, at: KeyAt) -> None:
        if self.use_tls and (self.tls_certificate is None or self.tls_private_key is None):
            at("use_tls").error(
                "needs tls_certificate and tls_private_key (egressd does not make up a"
                " self-signed certificate, unlike KumoProxy)"
            )
        if not self.use_tls:
            for key in ("tls_certificate", "tls_private_key", "tls_required_client_ca"):
                if getattr(self, key) is not None:
                    at(key).error("is set without use_tls = true")


@dataclass(frozen=True)
class _DoorTable:
    """``[proxy]``: only its ``[[proxy.listener]]`` array."""

    listener: tuple[Listener, ...] = setting(Tables(Listener), ())


@dataclass(frozen=True)
class _Socks5Table:
    """``[socks5]``: only its ``[[socks5.listener]]`` array."""

    listener: tuple[Socks5Listener, ...] = setting(Tables(Socks5Listener), ())


@dataclass(frozen=True)
class DialSettings:
    timeout: float = setting(Duration, 30.0)


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[Endpoint, ...] = setting(
        ListOf(Parsed(lambda t: parse_hostport(t, allow_names=False, default_port=53))), ()
    )
    timeout: float = setting(Duration, 10.0)


LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclass(frozen=True)
class AccessSettings:
    clients: tuple[IPNetwork, ...] = setting(ListOf(Network), LOOPBACK)
    destination_ports: tuple[int, ...] = setting(ListOf(Port), (25, 465, 587, 2525))
    deny_destinations: tuple[IPNetwork, ...] = setting(
        ListOf(Network), tuple(ipaddress.ip_network(n) for n in DEFAULT_DENY_DESTINATIONS)
    )


@dataclass(frozen=True)
class LimitSettings:
    max_connections: int = setting(Integer(1, 10_000_000), 10000)
    max_connections_per_source: int = setting(Integer(1, 10_000_000), 2000)
    max_connections_per_client: int | None = setting(Integer(1, 10_000_000), None)
    """Connections one client address may hold (None: half of max_connections)."""
    reserved_per_door: int | None = setting(Integer(0, 10_000_000), None)
    """Connections kept for each door that has listeners (None: a tenth of max_connections)."""
    handshake_timeout: float = setting(Duration, 30.0)
    idle_timeout: float = setting(Duration, 600.0)
    shutdown_grace: float = setting(Duration, 30.0)

    def __post_init__(self) -> None:
        """Resolve the defaults that derive from ``max_connections``, so they show as values."""
        if self.max_connections_per_client is None:
            object.__setattr__(
                self, "max_connections_per_client", max(1, self.max_connections // 2)
            )
        if self.reserved_per_door is None:
            object.__setattr__(self, "reserved_per_door", self.max_connections // 10)


@dataclass(frozen=True)
class User:
    """One ``[auth.users]`` entry: ``name = "password"``, or ``name = { password = "...",
    pools = ["a", "b"] }`` for a user that may use several pools (KumoMTA sends one
    credential for all its sources). Without ``pools`` the username is the one pool."""

    password: str = setting(Text())
    pools: tuple[str, ...] | None = setting(ListOf(Text()), None)

    def pools_for(self, name: str) -> tuple[str, ...]:
        """The pools user ``name`` may use: ``pools``, else the pool named like the user."""
        return self.pools if self.pools is not None else (name,)


class _UserEntry:
    """A password string, or a table read as :class:`User`."""

    def read(self, value: object, where: Where) -> User:
        if isinstance(value, str):
            return User(password=value)
        if isinstance(value, dict):
            return Table(User).read(value, where)
        raise ValueError(f"expected a password string or a table, got {type_name(value)}")


@dataclass(frozen=True)
class _AuthTable:
    users: Mapping[str, User] = setting(MapOf(_UserEntry()), factory=_empty)


@dataclass(frozen=True)
class DurationAtMost:
    """A duration of at most ``ceiling`` seconds."""

    ceiling: float

    def read(self, value: object, where: Where) -> float:
        seconds = Duration.read(value, where)
        if seconds > self.ceiling:
            raise ValueError(self.too_long(seconds))
        return seconds

    def too_long(self, seconds: float) -> str:
        return f"{seconds:g}s is longer than {self.ceiling:g}s"


@dataclass(frozen=True)
class LogSettings:
    format: Literal["text", "json"] = setting(Choice(("text", "json")), "text")
    level: str = setting(Choice(("debug", "info", "warning", "error"), fold=True), "info")
    flush_interval: float = setting(DurationAtMost(1.0), 0.05)
    """How long a connection or transaction line may wait to be written with the next ones
    (one write for many); 0: each at once. Warnings and errors never wait."""


@dataclass(frozen=True)
class MetricsSettings:
    listen: Endpoint | None = setting(ListenAddress, None)
    clients: tuple[IPNetwork, ...] = setting(ListOf(Network), LOOPBACK)
    """Who may scrape; anyone else is closed at once (the front doors' clients are apart)."""
    max_connections: int = setting(Integer(1, 10_000), 16)
    """Scrapes served at once; beyond, a new connection gets 503 at once and is closed."""


class _WorkerCount:
    """``workers``: a number of worker processes, or ``"auto"``: one per usable core."""

    def read(self, value: object, where: Where) -> int:
        if value == "auto":
            return usable_cores()
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'is {type_name(value)}; expected a number of workers or "auto"')
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"{value} is outside 1-{MAX_WORKERS}")
        return value


MAX_WORKERS = 256


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a cgroup may narrow)."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class DaemonSettings:
    """``[daemon]``: how many worker processes serve the front doors (see
    :mod:`egressd.supervisor`); 1 is a single process with no supervisor."""

    workers: int = setting(_WorkerCount(), 1)
    worker_timeout: float = setting(Duration, 10.0)
    """A worker silent for this long (its event loop stuck) is killed and restarted."""

    def check_keys(self, at: KeyAt) -> None:
        if self.worker_timeout < 1:
            at("worker_timeout").error("must be at least 1s")


@dataclass(frozen=True)
class ControlSettings:
    socket: str | None = setting(Text(), None)


@dataclass(frozen=True)
class HealthSettings:
    """Defaults for sources that do not set KumoMTA's suspend keys."""

    suspend_when_unplumbed: SuspendPolicy = setting(Suspend(), DEFAULT_SUSPEND_POLICY)
    suspend_when_proxy_unhealthy: SuspendPolicy = setting(Suspend(), DEFAULT_SUSPEND_POLICY)
    suspend_on_connect_failures: SuspendPolicy = setting(Suspend(), DEFAULT_CONNECT_FAILURE_POLICY)


@dataclass(frozen=True)
class PostfixTimeout(DurationAtMost):
    """A duration that must stay below Postfix's client timeout for the same step."""

    def too_long(self, seconds: float) -> str:
        return f"{seconds:g}s must stay below Postfix's client timeout (at most {self.ceiling:g}s)"


@dataclass(frozen=True)
class SmtpTimeouts:
    """Timeouts towards the remote server, each below Postfix's client timeouts; and two
    limits on the MTA side, so that slow clients cannot hold connections for ever."""

    banner: float = setting(PostfixTimeout(290), 240.0)
    command: float = setting(PostfixTimeout(290), 240.0)
    data_init: float = setting(PostfixTimeout(110), 100.0)
    data_block: float = setting(PostfixTimeout(170), 150.0)
    final_dot: float = setting(PostfixTimeout(590), 540.0)
    first_mail: float = setting(Duration, 60.0)
    """MTA side: from the greeting to the first MAIL that starts a transaction."""
    min_data_rate: int = setting(Integer(0, 2**40), 1024)
    """MTA side: bytes per second an MTA must average while it sends a body (0: no floor)."""


@dataclass(frozen=True)
class SmtpTls:
    """Outbound STARTTLS policy, and the certificate offered to MTAs (inbound STARTTLS)."""

    mode: Literal["opportunistic", "required", "disabled"] = setting(
        Choice(("opportunistic", "required", "disabled")), "opportunistic"
    )
    verify: bool = setting(Flag(), False)
    certificate: str | None = setting(Text(), None)
    private_key: str | None = setting(Text(), None)
    ca_file: str | None = setting(Text(), None)
    """The CA bundle for ``verify``, MTA-STS and its policy fetch (None: the system store)."""
    mta_sts: bool = setting(Flag(), True)
    """Apply recipient domains' MTA-STS policies (RFC 8461)."""
    dane: bool = setting(Flag(), False)
    """Apply DANE (RFC 7672) where ``[dns]``'s validating resolver says the MX and TLSA
    records are DNSSEC-signed (the AD bit)."""
    dane_probe: str = setting(Text(), ".")
    """A DNSSEC-signed name whose DNSKEY ``check`` asks for, to see the resolver validate."""
    policy: Mapping[str, str] = setting(
        MapOf(Choice(("none", "may", "encrypt", "verify", "dane"), fold=True), fold=True),
        factory=_empty,
    )
    """``[smtp.tls.policy]``: domain -> none | may | encrypt | verify | dane, over the rest."""

    def check_keys(self, at: KeyAt) -> None:
        if (self.certificate is None) != (self.private_key is None):
            at("certificate").error("certificate and private_key go together; set both or neither")


@dataclass(frozen=True)
class SmtpSettings:
    listeners: tuple[SmtpListener, ...] = setting(Tables(SmtpListener), (), key="listener")
    hostname: str | None = setting(EhloDomain, None)
    max_message_size: int = setting(Integer(0, 2**40), 52428800)
    sender_pools: Mapping[str, str] = setting(MapOf(Text(), fold=True), factory=_empty)
    routes: Mapping[str, Endpoint] = setting(
        MapOf(Parsed(lambda t: parse_hostport(t, default_port=25)), fold=True), factory=_empty
    )
    tls: SmtpTls = setting(Table(SmtpTls), SmtpTls())
    timeouts: SmtpTimeouts = setting(Table(SmtpTimeouts), SmtpTimeouts())


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration: the keys of the main file.

    ``source``, ``pool`` and ``sources_files`` are read by the sources reader, which merges
    them across files (:mod:`egressd.config.sources`).
    """

    path: Path
    sources: Mapping[str, Source] = setting(None, key="source")
    pools: Mapping[str, Pool] = setting(None, key="pool")
    source_files: tuple[Path, ...] = setting(None, (), key="sources_files")
    shaping_files: tuple[Path, ...] = setting(None, (), key="shaping_files")
    """KumoMTA shaping files, relative to the main file, in KumoMTA's precedence order
    (read by :mod:`egressd.shaping` when the daemon or ``check`` builds its policy)."""
    key_files: tuple[Path, ...] = ()
    """Files that hold secrets (``socks5_proxy_password``): watched like the others."""
    hostname: str | None = setting(EhloDomain, None)
    dial: DialSettings = setting(Table(DialSettings), DialSettings())
    dns: DnsSettings = setting(Table(DnsSettings), DnsSettings())
    access: AccessSettings = setting(Table(AccessSettings), AccessSettings())
    limits: LimitSettings = setting(Table(LimitSettings), LimitSettings())
    auth: Mapping[str, User] = setting(Section(_AuthTable, "users"), factory=_empty)
    log: LogSettings = setting(Table(LogSettings), LogSettings())
    metrics: MetricsSettings = setting(Table(MetricsSettings), MetricsSettings())
    control: ControlSettings = setting(Table(ControlSettings), ControlSettings())
    daemon: DaemonSettings = setting(Table(DaemonSettings), DaemonSettings())
    health: HealthSettings = setting(Table(HealthSettings), HealthSettings())
    socks5_listeners: tuple[Socks5Listener, ...] = setting(
        Section(_Socks5Table, "listener"), (), key="socks5"
    )
    proxy_listeners: tuple[Listener, ...] = setting(
        Section(_DoorTable, "listener"), (), key="proxy"
    )
    smtp: SmtpSettings = setting(Table(SmtpSettings), SmtpSettings())
    state: StateSettings = setting(Table(StateSettings), StateSettings())
    warmup: WarmupSettings = setting(Table(WarmupSettings), WarmupSettings())
    quick: bool = False
    """``egressd socks5 --listen``: no file; a SOCKS5 BIND may pick any local address."""

    def warmup_plan_of(self, source: str) -> str | None:
        """The warm-up plan ``source`` follows: its ``warmup`` key, else ``[warmup.sources]``."""
        own = self.sources[source].warmup if source in self.sources else None
        return own or self.warmup.source_plans.get(source)

    @property
    def warming_sources(self) -> dict[str, str]:
        """Every source that follows a warm-up plan, with the plan's name."""
        found = {name: self.warmup_plan_of(name) for name in self.sources}
        return {name: plan for name, plan in found.items() if plan is not None}

    @property
    def min_ttl(self) -> float:
        """The shortest ``ttl`` of any source: how often sources files are checked."""
        return min((s.ttl for s in self.sources.values()), default=DEFAULT_TTL)

    def source_for_address(self, address: IPAddress) -> Source | None:
        """The configured source whose own or proxy's address is ``address``; in quick mode
        (:attr:`quick`), a source of that address made up on the spot."""
        for source in self.sources.values():
            if source.matches_address(address):
                return source
        if self.quick:  # bindable or not: the SOCKS5 door tries the bind before using it
            return Source(name=str(address), source_address=address)
        return None
