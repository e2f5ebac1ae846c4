"""Effective limits for (source, destination), in KumoMTA's precedence order, with origins.

Precedence (crates/kumo-api-types ``get_egress_path_config``), each layer merging over the
previous one:

1. ``["default"]``;
2. every provider that matches the destination, in the order providers were first defined,
   each followed by its ``provider_*`` budgets for this source;
3. the ``.sources."source"`` section of each matching provider;
4. the site's section (domains with ``mx_rollup = true`` whose MX hosts make this site);
5. the domain's own section (``mx_rollup = false``);
6. the site section's ``.sources."source"``, then the domain section's;
7. (egressd) active ``SetConfig`` overrides from reply rules, oldest first.

``provider_connection_limit``, ``provider_max_message_rate`` and
``provider_source_selection_rate`` become named budgets ``shaping-provider-NAME-SOURCE-limit``
(``-rate``, ``-selection-rate``), exactly as KumoMTA names them: one budget per source across
every site of the provider. Other ``additional_*`` budgets are shared by name by every path
that names them. ``connection_limit`` and the rates are per path, i.e. per (source, site).

Reply rules for a destination come in KumoMTA's ``match_rules`` order: default, providers,
site, domain. A provider's rules act on (source, provider); the others on (source, site).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from egressd.shaping.files import BoundSections, Finding, Section, ShapingFiles
from egressd.shaping.params import (
    DEFAULT_ORIGIN,
    DEFAULTS,
    SELECTION_KEY,
    Origin,
    Params,
    Setting,
)
from egressd.shaping.rules import Rule
from egressd.shaping.sites import Destination, normalize_name, provider_matches, quoted
from egressd.shaping.throttle import LimitSpec, ThrottleSpec

_CACHE_SIZE = 4096
BudgetKind = Literal["connections", "connection rate", "message rate", "selection rate"]
ScopeKind = Literal["site", "provider", "domain"]

_TABLE_KIND: dict[str, BudgetKind] = {
    "additional_connection_limits": "connections",
    "additional_message_rate_throttles": "message rate",
    "additional_source_selection_rates": "selection rate",
}
_PATH_KIND: dict[str, BudgetKind] = {
    "connection_limit": "connections",
    "max_connection_rate": "connection rate",
    "max_message_rate": "message rate",
    "source_selection_rate": "selection rate",
}
_PROVIDER_BUDGETS: dict[str, tuple[str, str]] = {
    # shaping key -> (additional_* table, suffix of KumoMTA's generated limit name)
    "provider_connection_limit": ("additional_connection_limits", "limit"),
    "provider_max_message_rate": ("additional_message_rate_throttles", "rate"),
    SELECTION_KEY: ("additional_source_selection_rates", "selection-rate"),
}


@dataclass(frozen=True)
class Budget:
    """One limit a connection or a message must fit in, and the bucket it counts in."""

    kind: BudgetKind
    key: tuple[str, ...]
    label: str
    value: LimitSpec | ThrottleSpec
    origin: Origin

    def describe(self) -> str:
        """``connection_limit 5`` or ``max_message_rate 100/s``."""
        return f"{self.label} {self.value}"


@dataclass(frozen=True)
class Limits:
    """Everything egressd enforces for one source towards one destination."""

    source: str
    site: str
    provider: str | None
    budgets: tuple[Budget, ...]
    max_deliveries_per_connection: Setting[int]
    failures_before_delay: Setting[int]
    params: Params
    _kinds: dict[BudgetKind, tuple[Budget, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def of_kind(self, kind: BudgetKind) -> tuple[Budget, ...]:
        """The budgets of ``kind`` (asked for every message: kept once found)."""
        found = self._kinds.get(kind)
        if found is None:
            found = self._kinds[kind] = tuple(b for b in self.budgets if b.kind == kind)
        return found

    @cached_property
    def message_budgets(self) -> tuple[Budget, ...]:
        """What each message counts against: message and source selection rates."""
        return self.of_kind("message rate") + self.of_kind("selection rate")

    def explain(self) -> list[str]:
        """One line per value, with the file and section it came from."""
        lines = [f"{b.describe()}  ({b.origin})" for b in self.budgets]
        for name, setting in (
            ("max_deliveries_per_connection", self.max_deliveries_per_connection),
            ("consecutive_connection_failures_before_delay", self.failures_before_delay),
        ):
            lines.append(f"{name} {setting.value}  ({setting.origin})")
        return lines


@dataclass(frozen=True)
class BoundRule:
    """A rule as it applies to one destination: the scope its actions act on."""

    rule: Rule
    scope: ScopeKind
    provider: str | None = None


class ShapingPolicy:
    """Lookups over bound shaping sections; pure (its only state is a cache of matches)."""

    def __init__(self, sections: BoundSections) -> None:
        self.sections = sections
        self.findings: list[Finding] = list(sections.findings)
        self._providers: dict[Destination, list[tuple[Section, str]]] = {}

    @classmethod
    def from_files(cls, files: ShapingFiles, sites: Mapping[str, str]) -> ShapingPolicy:
        policy = cls(files.bind(sites))
        policy.findings[:0] = files.findings
        return policy

    # ------------------------------------------------------------------ providers

    def providers_for(self, destination: Destination) -> list[tuple[Section, str]]:
        """Every provider that matches, in definition order, with why it matched."""
        found = self._providers.get(destination)
        if found is None:
            if len(self._providers) >= _CACHE_SIZE:
                self._providers.clear()
            found = []
            for provider in self.sections.providers.values():
                reason = provider_matches(provider.matches, destination)
                if reason is not None:
                    found.append((provider, reason))
            self._providers[destination] = found
        return found

    def provider_of(self, destination: Destination) -> tuple[str, str] | None:
        """The provider that names this destination (the last match, as in KumoMTA)."""
        found = self.providers_for(destination)
        if not found:
            return None
        provider, reason = found[-1]
        return provider.name, reason

    # ------------------------------------------------------------------ limits

    def limits(
        self, source: str, destination: Destination, overrides: Iterable[Params] = ()
    ) -> Limits:
        params = self.merged_params(source, destination)
        for override in overrides:
            params.merge_from(override)
        provider = self.provider_of(destination)
        return _limits_from(source, destination.site, provider and provider[0], params)

    def merged_params(self, source: str, destination: Destination) -> Params:
        params = self.sections.default.params.copy()
        matched = [provider for provider, _ in self.providers_for(destination)]
        for provider in matched:
            params.merge_from(provider.params)
            _apply_provider_budgets(provider, source, params)
        for provider in matched:
            if source in provider.sources:
                params.merge_from(provider.sources[source])
                _apply_provider_budgets(provider, source, params)
        params.values.pop(SELECTION_KEY, None)
        site, domain = self._site_and_domain(destination)
        for section in (site, domain):
            if section is not None:
                params.merge_from(section.params)
        for section in (site, domain):
            if section is not None and source in section.sources:
                params.merge_from(section.sources[source])
        return params

    def _site_and_domain(self, destination: Destination) -> tuple[Section | None, Section | None]:
        site = self.sections.by_site.get(destination.site)
        domain = None
        if destination.domain is not None:
            domain = self.sections.by_domain.get(normalize_name(destination.domain))
        return site, domain

    # ------------------------------------------------------------------ rules

    def rules_for(self, destination: Destination) -> list[BoundRule]:
        rules = [BoundRule(rule, "site") for rule in self.sections.default.automation]
        for provider, _ in self.providers_for(destination):
            rules.extend(BoundRule(r, "provider", provider.name) for r in provider.automation)
        site, domain = self._site_and_domain(destination)
        if site is not None:
            rules.extend(BoundRule(rule, "site") for rule in site.automation)
        if domain is not None:
            rules.extend(BoundRule(rule, "domain") for rule in domain.automation)
        return rules


def _apply_provider_budgets(provider: Section, source: str, params: Params) -> None:
    """KumoMTA's ``apply_provider_params_to``: provider_* keys -> named budgets."""
    implied: dict[str, Setting[Any]] = dict(provider.provider_limits)
    selection = params.values.pop(SELECTION_KEY, None)
    if selection is not None:
        implied[SELECTION_KEY] = selection
    for key, setting in implied.items():
        table, suffix = _PROVIDER_BUDGETS[key]
        name = f"shaping-provider-{provider.name}-{source}-{suffix}"
        params.set_entry(table, name, setting.value, setting.origin)


def _limits_from(source: str, site: str, provider: str | None, params: Params) -> Limits:
    budgets = [
        _path_budget(key, source, site, setting)
        for key, setting in params.values.items()
        if key in _PATH_KIND
    ]
    if "connection_limit" not in params.values:
        default = Setting(DEFAULTS["connection_limit"], DEFAULT_ORIGIN)
        budgets.insert(0, _path_budget("connection_limit", source, site, default))
    for table, kind in _TABLE_KIND.items():
        for name, setting in params.tables.get(table, {}).items():
            budgets.append(_named_budget(kind, table, name, setting))
    return Limits(
        source,
        site,
        provider,
        tuple(budgets),
        _setting_or_default(params, "max_deliveries_per_connection"),
        _setting_or_default(params, "consecutive_connection_failures_before_delay"),
        params,
    )


def _setting_or_default(params: Params, key: str) -> Setting[int]:
    setting = params.get(key)
    return setting if setting is not None else Setting(DEFAULTS[key], DEFAULT_ORIGIN)


def _path_budget(key: str, source: str, site: str, setting: Setting[Any]) -> Budget:
    kind = _PATH_KIND[key]
    bucket = (
        (key, source, site) if kind == "connections" else (key, source, site, str(setting.value))
    )
    return Budget(kind, bucket, key, setting.value, setting.origin)


def _named_budget(kind: BudgetKind, table: str, name: str, setting: Setting[Any]) -> Budget:
    label = _provider_label(name) or f"{table}.{quoted(name)}"
    bucket = (table, name) if kind == "connections" else (table, name, str(setting.value))
    return Budget(kind, bucket, label, setting.value, setting.origin)


def _provider_label(name: str) -> str | None:
    """``provider_connection_limit`` for KumoMTA's generated provider budget names."""
    if not name.startswith("shaping-provider-"):
        return None
    for key, (_, suffix) in _PROVIDER_BUDGETS.items():
        if name.endswith(f"-{suffix}") and not (
            suffix == "rate" and name.endswith("-selection-rate")
        ):
            return key
    return None  # pragma: no cover - every generated name ends with a known suffix


def scope_names(bound: BoundRule, destination: Destination) -> tuple[ScopeKind, str]:
    """Where a rule's action lands for this destination."""
    if bound.scope == "provider" and bound.provider is not None:
        return "provider", bound.provider
    if bound.scope == "domain" and destination.domain is not None:
        return "domain", normalize_name(destination.domain)
    return "site", destination.site


__all__: Sequence[str] = (
    "BoundRule",
    "Budget",
    "Limits",
    "ShapingPolicy",
    "scope_names",
)
