"""The egress-path keys of a shaping section: which egressd enforces, which belong to the MTA.

A section of a shaping file holds ``kumo.make_egress_path`` keys (crates/kumo-api-types
``EgressPathConfig``). egressd enforces the limits (:data:`ENFORCED`, :data:`TABLES`) and
accepts the rest as the MTA's business (:data:`MTA_KEYS`: queue, TLS, timeouts...). Every
enforced value is kept with its :class:`Origin` (file and section) so ``egressd explain`` can
say where a limit came from.

Merging follows KumoMTA's ``toml_table_merge_from``: a later value replaces an earlier one,
except the ``additional_*`` tables, which are merged name by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from egressd.shaping.throttle import LimitSpec, ThrottleSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file and a section such as ``[provider."google"]``."""

    file: str
    section: str

    def __str__(self) -> str:
        return f"{self.section} in {self.file}"


DEFAULT_ORIGIN = Origin("(KumoMTA default)", "make_egress_path")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """A value and where it came from."""

    value: T
    origin: Origin


def _throttle(value: object) -> ThrottleSpec:
    if not isinstance(value, str):
        raise ValueError("is not a throttle string such as '100/hr'")
    return ThrottleSpec.parse(value)


def _count(low: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("is not an integer")
        if value < low:
            raise ValueError(f"{value} is below {low}")
        return value

    return parse


ENFORCED: dict[str, Callable[[object], Any]] = {
    "connection_limit": LimitSpec.parse,
    "max_connection_rate": _throttle,
    "max_message_rate": _throttle,
    "source_selection_rate": _throttle,
    "max_deliveries_per_connection": _count(1),
    "consecutive_connection_failures_before_delay": _count(0),
}
"""Scalar keys egressd enforces, with their parsers (ValueError on a bad value)."""

TABLES: dict[str, Callable[[object], Any]] = {
    "additional_connection_limits": LimitSpec.parse,
    "additional_message_rate_throttles": _throttle,
    "additional_source_selection_rates": _throttle,
}
"""Named-budget tables egressd enforces: ``{ "limit name" = value }``."""

PROVIDER_KEYS: dict[str, Callable[[object], Any]] = {
    "provider_connection_limit": LimitSpec.parse,
    "provider_max_message_rate": _throttle,
}
"""Keys of a ``[provider."name"]`` section that apply per source across the provider."""

SELECTION_KEY = "provider_source_selection_rate"
"""Allowed in a provider section and its ``.sources."source"`` sections."""

DEFAULTS: dict[str, Any] = {
    "connection_limit": LimitSpec(32),
    "max_deliveries_per_connection": 1024,
    "consecutive_connection_failures_before_delay": 100,
}
"""KumoMTA's defaults for enforced keys that always have a value."""

MTA_KEYS = frozenset(
    {
        "enable_tls",
        "enable_mta_sts",
        "enable_dane",
        "enable_pipelining",
        "enable_rset",
        "tls_prefer_openssl",
        "tls_certificate",
        "tls_private_key",
        "openssl_cipher_list",
        "openssl_cipher_suites",
        "openssl_options",
        "rustls_cipher_suites",
        "connect_timeout",
        "banner_timeout",
        "ehlo_timeout",
        "mail_from_timeout",
        "rcpt_to_timeout",
        "data_timeout",
        "data_dot_timeout",
        "rset_timeout",
        "idle_timeout",
        "starttls_timeout",
        "auth_timeout",
        "system_shutdown_timeout",
        "max_ready",
        "smtp_port",
        "smtp_auth_plain_username",
        "smtp_auth_plain_password",
        "allow_smtp_auth_plain_without_tls",
        "allow_smtp_auth_plain_without_valid_certificate",
        "max_recipients_per_batch",
        "prohibited_hosts",
        "skip_hosts",
        "ip_lookup_strategy",
        "ehlo_domain",
        "aggressive_connection_opening",
        "refresh_interval",
        "refresh_strategy",
        "dispatcher_wakeup_strategy",
        "maintainer_wakeup_strategy",
        "provider_name",
        "remember_broken_tls",
        "opportunistic_tls_reconnect_on_failed_handshake",
        "use_lmtp",
        "reconnect_strategy",
        "readyq_pool_name",
        "low_memory_reduction_policy",
        "no_memory_reduction_policy",
        "try_next_host_on_transport_error",
        "ignore_8bit_checks",
        "dispatcher_progress_watchdog_timeout",
    }
)
"""``make_egress_path`` keys that only the MTA acts on: accepted, reported once, ignored."""


@dataclass
class Params:
    """The enforced keys of one section (or of a merge of sections), each with its origin."""

    values: dict[str, Setting[Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, Setting[Any]]] = field(default_factory=dict)

    def merge_from(self, other: Params) -> None:
        self.values.update(other.values)
        for key, table in other.tables.items():
            self.tables.setdefault(key, {}).update(table)

    def copy(self) -> Params:
        return Params(dict(self.values), {key: dict(t) for key, t in self.tables.items()})

    def get(self, key: str) -> Setting[Any] | None:
        return self.values.get(key)

    def set_value(self, key: str, value: Any, origin: Origin) -> None:
        self.values[key] = Setting(value, origin)

    def set_entry(self, table: str, name: str, value: Any, origin: Origin) -> None:
        self.tables.setdefault(table, {})[name] = Setting(value, origin)
