"""Loading KumoMTA shaping files unchanged: TOML or JSON, several files layered in order.

Theory of operation
-------------------
A shaping file (KumoMTA ``kumo.shaping.load``, crates/kumo-api-types ``shaping.rs``) holds:

- ``["default"]``: the base of every destination;
- ``["domain"]`` sections: by default (``mx_rollup = true``) they apply to the domain's *site*,
  i.e. to every domain with the same MX hosts; with ``mx_rollup = false`` to that domain only;
- ``[provider."name"]`` sections with ``match = [{ MXSuffix = ... }, { DomainSuffix = ... },
  { HostName = ... }]`` (and egressd's ``{ Network = "CIDR" }``), plus ``provider_*`` keys;
- ``.sources."source"`` sub-sections overriding a section for one source;
- ``[[... .automation]]`` reply rules (see :mod:`egressd.shaping.rules`).

Files are read in order; a later section with the same name merges over the earlier one
(``replace_base = true`` replaces it), provider ``match`` and ``automation`` lists append.
Domain sections are kept in load order: which site a rolled-up domain belongs to needs DNS,
so :meth:`ShapingFiles.bind` takes the site of each name from the caller (as KumoMTA resolves
them all when it loads) and groups them then.

Everything found is a :class:`Finding` naming the file and key path: errors stop the load
(:class:`ShapingError` carries them all), warnings name rules that can never apply (a
provider with no ``match``, a suffix ending with a dot), notices name each MTA-only key or
action once. A file ending in ``.toml`` is TOML, ``.json`` is JSON, anything else is tried as
TOML then as JSON (as KumoMTA's ``merge_files``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from egressd.shaping.durations import parse_duration
from egressd.shaping.params import (
    ENFORCED,
    MTA_KEYS,
    PROVIDER_KEYS,
    SELECTION_KEY,
    TABLES,
    Origin,
    Params,
    Setting,
)
from egressd.shaping.rules import Action, Rule, SetConfig, Suspend
from egressd.shaping.sites import MATCH_KINDS, ProviderMatch, normalize_name
from egressd.shaping.throttle import ThrottleSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

Level = Literal["error", "warning", "notice"]
SectionKind = Literal["default", "domain", "provider"]
MTA_ACTIONS = frozenset(
    {"SuspendTenant", "SuspendCampaign", "Bounce", "BounceTenant", "BounceCampaign"}
)
RULE_KEYS = frozenset({"regex", "action", "trigger", "duration", "match_internal"})


class _Invalid:
    """What a reader returns for a value it reported as an error."""


INVALID = _Invalid()


@dataclass(frozen=True)
class Finding:
    """One thing ``egressd check`` reports about the shaping files."""

    level: Level
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{self.level}: {where}: {self.message}"


class ShapingError(Exception):
    """The shaping files have errors; ``findings`` lists every one."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        super().__init__("\n".join(str(finding) for finding in self.findings))


@dataclass
class Section:
    """One section (or the merge of same-named sections) of the shaping files."""

    kind: SectionKind
    name: str
    origin: Origin
    params: Params = field(default_factory=Params)
    sources: dict[str, Params] = field(default_factory=dict)
    automation: list[Rule] = field(default_factory=list)
    replace_base: bool = False
    mx_rollup: bool = True
    matches: list[ProviderMatch] = field(default_factory=list)
    provider_limits: dict[str, Setting[Any]] = field(default_factory=dict)

    def merge_from(self, other: Section) -> None:
        """KumoMTA's ``merge_from``: replace with ``replace_base``, else layer over."""
        if other.replace_base:
            self.params = other.params.copy()
            self.sources = {name: p.copy() for name, p in other.sources.items()}
            self.automation = list(other.automation)
            self.matches = list(other.matches)
            self.provider_limits = dict(other.provider_limits)
            return
        self.params.merge_from(other.params)
        for name, params in other.sources.items():
            self.sources.setdefault(name, Params()).merge_from(params)
        self.automation.extend(other.automation)
        self.matches.extend(other.matches)
        self.provider_limits.update(other.provider_limits)

    def copy(self) -> Section:
        merged = Section(self.kind, self.name, self.origin, mx_rollup=self.mx_rollup)
        merged.merge_from(self)
        return merged


def section_label(kind: SectionKind, name: str) -> str:
    if kind == "provider":
        return f"[provider.{json.dumps(name)}]"
    return f"[{json.dumps(name)}]"


def source_label(parent: str, source: str) -> str:
    return f"{parent[:-1]}.sources.{json.dumps(source)}]"


@dataclass
class ShapingFiles:
    """The parsed files, before rolled-up domains are bound to their sites."""

    default: Section
    domains: list[Section]
    providers: dict[str, Section]
    findings: list[Finding]

    def rollup_domains(self) -> list[str]:
        """Domains whose MX hosts the caller must resolve before :meth:`bind`."""
        return list(dict.fromkeys(s.name for s in self.domains if s.mx_rollup))

    def bind(self, sites: Mapping[str, str]) -> BoundSections:
        """Group domain sections by site (``sites``: domain -> site name, "" for null MX).

        A rolled-up domain missing from ``sites`` (its MX did not resolve) or with a null MX
        is left out, as KumoMTA does; each is reported as a warning.
        """
        by_site: dict[str, Section] = {}
        by_domain: dict[str, Section] = {}
        findings: list[Finding] = []
        for section in self.domains:
            target, key = by_domain, normalize_name(section.name)
            if section.mx_rollup:
                site = sites.get(section.name)
                problem = _unbound_reason(site)
                if problem is not None:
                    findings.append(
                        Finding("warning", section.origin.file, section.origin.section, problem)
                    )
                    continue
                assert site is not None
                target, key = by_site, site
            if key in target:
                target[key].merge_from(section)
            else:
                target[key] = section.copy()
        return BoundSections(self.default, by_site, by_domain, self.providers, findings)


def _unbound_reason(site: str | None) -> str | None:
    if site is None:
        return "its MX hosts are unknown (DNS failed?): this section applies to no site"
    if site == "":
        return "the domain has a null MX: with mx_rollup = true this section applies nowhere"
    return None


@dataclass
class BoundSections:
    """Sections ready for lookups: by site, by domain (``mx_rollup = false``), providers."""

    default: Section
    by_site: dict[str, Section]
    by_domain: dict[str, Section]
    providers: dict[str, Section]
    findings: list[Finding]


def load_shaping_files(paths: Sequence[str | Path]) -> ShapingFiles:
    """Read and check ``paths`` in order; raise :class:`ShapingError` listing every error."""
    loader = _Loader()
    for path in paths:
        data = loader.read(Path(path))
        if data is not None:
            loader.load(str(path), data)
    return loader.finish()


def load_shaping_data(file: str, data: Mapping[str, Any]) -> ShapingFiles:
    """Check one already parsed document (for tests and generated overlays)."""
    loader = _Loader()
    loader.load(file, data)
    return loader.finish()


class _Loader:
    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.noticed: set[str] = set()
        self.default = Section("default", "default", Origin("", section_label("default", "")))
        self.domains: list[Section] = []
        self.providers: dict[str, Section] = {}

    # ------------------------------------------------------------------ findings

    def add(self, level: Level, file: str, key: str, message: str) -> None:
        self.findings.append(Finding(level, file, key, message))

    def notice_once(self, what: str, file: str, key: str, message: str) -> None:
        if what not in self.noticed:
            self.noticed.add(what)
            self.add("notice", file, key, message)

    # ------------------------------------------------------------------ files

    def read(self, path: Path) -> Mapping[str, Any] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.add("error", str(path), "", f"cannot be read: {exc}")
            return None
        problems: list[str] = []
        for kind in _formats_for(path):
            try:
                data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
            except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"is not valid {kind}: {exc}")
                continue
            if isinstance(data, dict):
                return data
            problems.append(f"is {kind} but not a table of sections")
        self.add("error", str(path), "", "; ".join(problems))
        return None

    def load(self, file: str, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            if key == "provider":
                self.load_providers(file, value)
                continue
            kind: SectionKind = "default" if key == "default" else "domain"
            section = self.section(file, kind, key, value)
            if section is None:
                continue
            if kind == "default":
                self.check_default_sources(file, section)
                self.default.merge_from(section)
                self.default.origin = section.origin
            else:
                self.check_domain_name(file, section)
                self.domains.append(section)

    def load_providers(self, file: str, value: object) -> None:
        if not isinstance(value, dict):
            self.add("error", file, "provider", "expected a table of providers")
            return
        for name, data in value.items():
            section = self.section(file, "provider", name, data)
            if section is None:
                continue
            existing = self.providers.get(name)
            if existing is None:
                self.providers[name] = section
            else:
                existing.merge_from(section)

    def check_default_sources(self, file: str, section: Section) -> None:
        for source in section.sources:
            self.add(
                "warning",
                file,
                source_label(section.origin.section, source),
                "KumoMTA never applies the sources of the default section: this is dead",
            )

    def check_domain_name(self, file: str, section: Section) -> None:
        if "." not in section.name.strip("."):
            self.add(
                "warning",
                file,
                section.origin.section,
                f"{section.name!r} is a single DNS label: quote domain names in section "
                f'headers (["{section.name}.com"]), or the dot makes a nested table',
            )

    def finish(self) -> ShapingFiles:
        self.check_providers()
        errors = [finding for finding in self.findings if finding.level == "error"]
        if errors:
            raise ShapingError(errors)
        return ShapingFiles(self.default, self.domains, self.providers, self.findings)

    def check_providers(self) -> None:
        usable = sorted(name for name, p in self.providers.items() if _live_matches(p))
        for name, provider in self.providers.items():
            if _live_matches(provider):
                continue
            if provider.matches:
                why = "none of its match entries can match"
            else:
                why = "it has no match entry"
            rules = len(provider.automation)
            self.add(
                "warning",
                provider.origin.file,
                provider.origin.section,
                f"provider {name!r} can never apply ({why}): its settings and its "
                f"{rules} automation rule{'' if rules == 1 else 's'} are dead "
                f"(providers that match: {', '.join(usable) or 'none'})",
            )

    # ------------------------------------------------------------------ sections

    def section(self, file: str, kind: SectionKind, name: str, data: object) -> Section | None:
        label = section_label(kind, name)
        if not isinstance(data, dict):
            self.add("error", file, label, "expected a table of make_egress_path keys")
            return None
        section = Section(kind, name, Origin(file, label))
        for key, value in data.items():
            self.section_key(section, key, value)
        return section

    def section_key(self, section: Section, key: str, value: object) -> None:
        file, label = section.origin.file, section.origin.section
        path = f"{label}.{key}"
        if self.path_key(section.params, section.origin, key, value, section.kind):
            return
        if key == "sources":
            self.sources(section, value)
        elif key == "automation":
            self.automation(section, value)
        elif key == "replace_base":
            section.replace_base = self.boolean(file, path, value, False)
        elif key == "mx_rollup" and section.kind == "domain":
            section.mx_rollup = self.boolean(file, path, value, True)
        elif key == "mx_rollup" and section.kind == "default":
            pass  # KumoMTA accepts and never uses it there
        elif key == "match" and section.kind == "provider":
            section.matches.extend(self.matches(file, path, value))
        elif key in PROVIDER_KEYS and section.kind == "provider":
            parsed = self.typed(file, path, PROVIDER_KEYS[key], value)
            if parsed is not None:
                section.provider_limits[key] = Setting(parsed, section.origin)
        elif key in PROVIDER_KEYS or key == "match":
            self.add("error", file, path, 'is only valid in a [provider."name"] section')
        else:
            self.add("error", file, path, "is not a make_egress_path or shaping key")

    def path_key(
        self, params: Params, origin: Origin, key: str, value: object, kind: SectionKind
    ) -> bool:
        """Read one egress-path key into ``params``; False when ``key`` is not one."""
        path = f"{origin.section}.{key}"
        if key in ENFORCED or (key == SELECTION_KEY and kind == "provider"):
            parser = ENFORCED.get(key) or _throttle_parser
            parsed = self.typed(origin.file, path, parser, value)
            if parsed is not None:
                params.set_value(key, parsed, origin)
        elif key in TABLES:
            self.table(params, origin, key, value)
        elif key in MTA_KEYS:
            self.notice_once(
                key,
                origin.file,
                path,
                f"{key} is the MTA's setting: egressd accepts and ignores it",
            )
        elif key == SELECTION_KEY:
            self.add("error", origin.file, path, 'is only valid in a [provider."name"] section')
        else:
            return False
        return True

    def table(self, params: Params, origin: Origin, key: str, value: object) -> None:
        path = f"{origin.section}.{key}"
        if not isinstance(value, dict):
            self.add("error", origin.file, path, 'expected a table of { "limit name" = value }')
            return
        for name, item in value.items():
            parsed = self.typed(origin.file, f"{path}.{json.dumps(name)}", TABLES[key], item)
            if parsed is not None:
                params.set_entry(key, name, parsed, origin)

    def sources(self, section: Section, value: object) -> None:
        file, label = section.origin.file, section.origin.section
        if not isinstance(value, dict):
            self.add("error", file, f"{label}.sources", 'expected a table of "source" sections')
            return
        for source, data in value.items():
            origin = Origin(file, source_label(label, source))
            if not isinstance(data, dict):
                self.add("error", file, origin.section, "expected a table of make_egress_path keys")
                continue
            params = section.sources.setdefault(source, Params())
            for key, item in data.items():
                if not self.path_key(params, origin, key, item, section.kind):
                    self.add(
                        "error",
                        file,
                        f"{origin.section}.{key}",
                        "is not a make_egress_path key (a source section holds only those)",
                    )

    def matches(self, file: str, path: str, value: object) -> list[ProviderMatch]:
        if not isinstance(value, list):
            self.add("error", file, path, "expected an array such as [{ MXSuffix = '.x.com' }]")
            return []
        result = []
        for index, item in enumerate(value):
            match = self.one_match(file, f"{path}[{index}]", item)
            if match is not None:
                result.append(match)
        return result

    def one_match(self, file: str, path: str, item: object) -> ProviderMatch | None:
        kinds = " | ".join(MATCH_KINDS)
        if not (isinstance(item, dict) and len(item) == 1):
            self.add("error", file, path, f"expected {{ {kinds} = value }}")
            return None
        ((kind, value),) = item.items()
        if kind not in MATCH_KINDS or not isinstance(value, str):
            self.add("error", file, path, f"expected {{ {kinds} = string }}, got {kind!r}")
            return None
        match = ProviderMatch(kind, value)
        if kind == "Network":
            try:
                match.network()
            except ValueError:
                self.add("error", file, f"{path}.Network", f"{value!r} is not a CIDR network")
                return None
        dead = match.dead_reason()
        if dead is not None:
            self.add("warning", file, f"{path}.{kind}", f"can never match: {dead}")
        return match

    # ------------------------------------------------------------------ automation

    def automation(self, section: Section, value: object) -> None:
        file, label = section.origin.file, section.origin.section
        if not isinstance(value, list):
            self.add("error", file, f"{label}.automation", "expected an array of rule tables")
            return
        for index, item in enumerate(value):
            rule = self.rule(file, label, index, item)
            if rule is not None:
                section.automation.append(rule)

    def rule(self, file: str, label: str, index: int, data: object) -> Rule | None:
        path = f"{label}.automation[{index}]"
        if not isinstance(data, dict):
            self.add("error", file, path, "expected a rule table (regex, action, duration)")
            return None
        origin = Origin(file, f"{label} automation[{index}]")
        for key in data:
            if key not in RULE_KEYS:
                self.add("warning", file, f"{path}.{key}", "is not a rule key (KumoMTA ignores it)")
        patterns = self.patterns(file, f"{path}.regex", data.get("regex"))
        actions = self.actions(file, f"{path}.action", origin, data.get("action"))
        threshold = self.trigger(file, f"{path}.trigger", data.get("trigger", "Immediate"))
        duration = self.duration(file, f"{path}.duration", data.get("duration"))
        internal = self.boolean(file, f"{path}.match_internal", data.get("match_internal"), False)
        if patterns is None or actions is None or duration is None:
            return None
        if isinstance(threshold, _Invalid):
            return None
        if not actions:
            return None  # only MTA actions: noticed, nothing for egressd to do
        return Rule(patterns, tuple(actions), threshold, duration, origin, index, internal)

    def patterns(self, file: str, path: str, value: object) -> tuple[re.Pattern[str], ...] | None:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            self.add("error", file, path, "expected a regex string or an array of them")
            return None
        compiled = []
        for position, text in enumerate(texts):
            where = path if isinstance(value, str) else f"{path}[{position}]"
            try:
                compiled.append(re.compile(text))
            except re.error as exc:
                self.add("error", file, where, f"{text!r} is not a valid regex: {exc}")
                return None
            if "\\\\" in text:
                self.add(
                    "warning",
                    file,
                    where,
                    f"/{text}/ needs a backslash in the reply text to match (doubled "
                    "backslashes inside '''...'''?): it will likely never match",
                )
        return tuple(compiled)

    def actions(self, file: str, path: str, origin: Origin, value: object) -> list[Action] | None:
        items = value if isinstance(value, list) else [value]
        result: list[Action] = []
        for position, item in enumerate(items):
            where = f"{path}[{position}]" if isinstance(value, list) else path
            action = self.action(file, where, origin, item)
            if isinstance(action, _Invalid):
                return None
            if action is not None:
                result.append(action)
        return result

    def action(
        self, file: str, path: str, origin: Origin, item: object
    ) -> Action | _Invalid | None:
        if item == "Suspend":
            return Suspend()
        if isinstance(item, str) and item in MTA_ACTIONS:
            self.notice_once(
                f"action {item}", file, path, f"{item} acts on the MTA's queues: egressd ignores it"
            )
            return None
        if isinstance(item, dict) and len(item) == 1:
            ((kind, body),) = item.items()
            if kind in ("SetConfig", "SetDomainConfig"):
                return self.set_config(file, f"{path}.{kind}", origin, kind, body)
        self.add(
            "error",
            file,
            path,
            'expected "Suspend", { SetConfig = { name, value } } or one of '
            f"{', '.join(sorted(MTA_ACTIONS))}",
        )
        return INVALID

    def set_config(
        self, file: str, path: str, origin: Origin, kind: str, body: object
    ) -> SetConfig | _Invalid | None:
        if not (isinstance(body, dict) and set(body) == {"name", "value"}):
            self.add("error", file, path, "expected { name = KEY, value = VALUE }")
            return INVALID
        name = body["name"]
        params = Params()
        scratch = _Loader()
        if not isinstance(name, str) or not scratch.path_key(
            params, origin, name, body["value"], "domain"
        ):
            self.add("error", file, f"{path}.name", f"{name!r} is not a make_egress_path key")
            return INVALID
        for finding in scratch.findings:
            if finding.level == "error":
                self.add("error", file, f"{path}.value", finding.message)
                return INVALID
        if name in MTA_KEYS:
            self.notice_once(
                f"{kind} {name}",
                file,
                path,
                f"{kind} of {name} changes the MTA's setting: egressd ignores it",
            )
            return None
        return SetConfig(name, params, domain_only=kind == "SetDomainConfig")

    def trigger(self, file: str, path: str, value: object) -> ThrottleSpec | _Invalid | None:
        if value == "Immediate":
            return None
        if isinstance(value, dict) and set(value) == {"Threshold"}:
            spec = self.typed(file, f"{path}.Threshold", _throttle_parser, value["Threshold"])
            return INVALID if spec is None else spec
        self.add("error", file, path, 'expected "Immediate" or { Threshold = "N/period" }')
        return INVALID

    def duration(self, file: str, path: str, value: object) -> float | None:
        if value is None:
            self.add("error", file, path, "is required (e.g. duration = '2 hours')")
            return None
        seconds: float | None = self.typed(file, path, parse_duration, value)
        return seconds

    # ------------------------------------------------------------------ scalars

    def typed(self, file: str, path: str, parser: Any, value: object) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            text = str(exc)
            shown = text if repr(value) in text or str(value) in text else f"{value!r} {text}"
            self.add("error", file, path, shown)
            return None

    def boolean(self, file: str, path: str, value: object, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.add("error", file, path, "expected true or false")
            return default
        return value


def _throttle_parser(value: object) -> ThrottleSpec:
    if not isinstance(value, str):
        raise ValueError("is not a throttle string such as '100/hr'")
    return ThrottleSpec.parse(value)


def _formats_for(path: Path) -> tuple[str, ...]:
    if path.suffix == ".toml":
        return ("TOML",)
    if path.suffix == ".json":
        return ("JSON",)
    return ("TOML", "JSON")


def _live_matches(provider: Section) -> bool:
    return any(match.dead_reason() is None for match in provider.matches)
