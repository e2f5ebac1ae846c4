"""Configuration: one TOML file (plus KumoMTA sources.toml files) -> frozen dataclasses.

Theory of operation
-------------------
The main file holds egressd's own tables (``[dial]``, ``[dns]``, ``[access]``, ``[limits]``,
``[auth]``, ``[log]``, ``[metrics]``, ``[control]``, ``[health]``, ``[socks5]``, ``[proxy]``,
``[smtp]``) and may hold ``[source.*]`` and ``[pool.*]`` tables in KumoMTA's sources.toml
schema. ``sources_files = [...]`` names further sources files, relative to the main file.

The package is pure: it reads files but opens no socket and imports no trio.

* :mod:`~egressd.config.model`: the frozen dataclasses; each field says its key, its kind of
  value and its default;
* :mod:`~egressd.config.reader`: the one declarative reader that those fields drive;
* :mod:`~egressd.config.values`: parsing of single values (durations, endpoints, names);
* :mod:`~egressd.config.sources`: ``[source.*]`` and ``[pool.*]`` merged across files;
* :mod:`~egressd.config.problems`: problems as records (file, key path, message);
* :mod:`~egressd.config.load`: :func:`load_config`, which raises :class:`ConfigError` with
  every problem found.
"""

from egressd.addresses import IPAddress, IPNetwork
from egressd.config.load import config_path_from, load_config, load_status_endpoints
from egressd.config.model import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONNECT_FAILURE_POLICY,
    DEFAULT_DENY_DESTINATIONS,
    DEFAULT_SUSPEND_POLICY,
    DEFAULT_TTL,
    AccessSettings,
    Config,
    ControlSettings,
    DialSettings,
    DnsSettings,
    HealthSettings,
    HopKind,
    LimitSettings,
    Listener,
    LogSettings,
    MetricsSettings,
    Pool,
    PoolEntry,
    SmtpListener,
    SmtpSettings,
    SmtpTimeouts,
    SmtpTls,
    Socks5Listener,
    Source,
    SuspendPolicy,
    User,
)
from egressd.config.problems import ConfigError, Problem
from egressd.config.state import RedisUrl, StateSettings
from egressd.config.values import (
    Endpoint,
    format_hostport,
    is_hostname,
    parse_duration,
    parse_hostport,
)
from egressd.config.warmup import (
    DEFAULT_PLAN,
    DEFAULT_PLAN_DAYS,
    WarmupPlan,
    WarmupSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONNECT_FAILURE_POLICY",
    "DEFAULT_DENY_DESTINATIONS",
    "DEFAULT_PLAN",
    "DEFAULT_PLAN_DAYS",
    "DEFAULT_SUSPEND_POLICY",
    "DEFAULT_TTL",
    "AccessSettings",
    "Config",
    "ConfigError",
    "ControlSettings",
    "DialSettings",
    "DnsSettings",
    "Endpoint",
    "HealthSettings",
    "HopKind",
    "IPAddress",
    "IPNetwork",
    "LimitSettings",
    "Listener",
    "LogSettings",
    "MetricsSettings",
    "Pool",
    "PoolEntry",
    "Problem",
    "RedisUrl",
    "SmtpListener",
    "SmtpSettings",
    "SmtpTimeouts",
    "SmtpTls",
    "Socks5Listener",
    "Source",
    "StateSettings",
    "SuspendPolicy",
    "User",
    "WarmupPlan",
    "WarmupSettings",
    "config_path_from",
    "format_hostport",
    "is_hostname",
    "load_config",
    "load_status_endpoints",
    "parse_duration",
    "parse_hostport",
]
