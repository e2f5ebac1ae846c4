"""Sites and provider matching, as KumoMTA computes them (no DNS here: callers pass MX hosts).

A *site* is the set of domains that share the same MX hosts. KumoMTA names it by factoring
the MX host names (crates/mailexchanger ``factor_names``): hosts ordered by preference, then
by name within one preference; labels compared right to left; a position where the hosts
differ becomes an alternation, and a position some hosts lack gets a ``?``:
``["alt1.gmail-smtp-in.l.google.com", "gmail-smtp-in.l.google.com"]`` ->
``"alt1?.gmail-smtp-in.l.google.com"``. A domain with no MX record uses itself as the
implicit MX; a null MX (``0 .``) has the empty site name.

A *provider* matches a destination (crates/kumo-api-types ``ProviderEntry::domain_matches``):

- ``DomainSuffix``: the domain ends with the suffix (no DNS needed);
- ``MXSuffix`` / ``HostName``: every MX host must match one of the provider's MXSuffix or
  HostName entries (so a vanity domain that mixes providers matches none);
- ``Network`` (egressd only): the destination address lies in the CIDR, for clients that give
  an address and no name (SOCKS5, PROXY).

Names are compared in lowercase without their trailing dot; a suffix written with a trailing
dot or capitals therefore never matches (KumoMTA does not normalise the suffix either), and
the loader reports such entries as dead.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from egressd.addresses import IPAddress, IPNetwork

MatchKind = Literal["MXSuffix", "DomainSuffix", "HostName", "Network"]
MATCH_KINDS: tuple[MatchKind, ...] = ("MXSuffix", "DomainSuffix", "HostName", "Network")


def quoted(name: str) -> str:
    """``"name"`` with double quotes, as KumoMTA's messages and TOML write names."""
    return json.dumps(name, ensure_ascii=False)


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot of a fully qualified name."""
    return name.lower().removesuffix(".")


def factor_names(hosts: Sequence[str]) -> str:
    """KumoMTA's site name of MX hosts given in order (see the module docstring)."""
    split = [list(reversed(normalize_name(host).split("."))) for host in hosts if host.strip(".")]
    width = max((len(labels) for labels in split), default=0)
    columns: list[list[str]] = [[] for _ in range(width)]
    for labels in split:
        for position in range(width):
            label = labels[position] if position < len(labels) else "?"
            if label not in columns[position]:
                columns[position].append(label)
    return ".".join(_factor_column(column) for column in reversed(columns))


def _factor_column(column: list[str]) -> str:
    optional = "?" in column
    labels = [label for label in column if label != "?"]
    text = labels[0] if len(labels) == 1 else f"({'|'.join(labels)})"
    return text + ("?" if optional else "")


def order_mx(records: Iterable[tuple[int, str]]) -> tuple[str, ...]:
    """MX ``(preference, host)`` records -> host names in KumoMTA's site order."""
    return tuple(host for _, host in sorted((pref, normalize_name(h)) for pref, h in records))


def site_name(records: Iterable[tuple[int, str]]) -> str:
    """The site of a domain from its MX records (``""`` for a null MX ``0 .``)."""
    return factor_names(order_mx(records))


@dataclass(frozen=True)
class ProviderMatch:
    """One ``match`` entry of a provider: ``{ MXSuffix = ".google.com" }`` and the like."""

    kind: MatchKind
    value: str

    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.value, strict=False)

    def dead_reason(self) -> str | None:
        """Why this entry can never match, or None."""
        if self.kind == "Network":
            return None
        if self.value.endswith("."):
            return f"{self.value!r} ends with a dot; names are compared without it"
        if self.value != self.value.lower():
            return f"{self.value!r} has capitals; names are compared in lowercase"
        if not self.value:
            return "is empty"
        return None

    def matches_host(self, host: str) -> bool:
        if self.kind == "MXSuffix":
            return normalize_name(host).endswith(self.value)
        if self.kind == "HostName":
            return normalize_name(host) == self.value
        return False


@dataclass(frozen=True)
class Destination:
    """What a door knows about where a connection goes.

    ``site`` is KumoMTA's site name for the SMTP door; the SOCKS5 and PROXY doors use the
    name the client gave, else the address text. ``mx_hosts`` are the MX host names (for a
    SOCKS5 name: that name). ``address`` is the destination IP when known.
    """

    site: str
    domain: str | None = None
    mx_hosts: tuple[str, ...] = ()
    address: IPAddress | None = None


def provider_matches(matches: Sequence[ProviderMatch], destination: Destination) -> str | None:
    """The reason ``matches`` select ``destination`` (for ``explain``), or None."""
    domain = normalize_name(destination.domain) if destination.domain else None
    for match in matches:
        if match.kind == "DomainSuffix" and domain is not None and domain.endswith(match.value):
            return f"domain {domain} ends with {quoted(match.value)} (DomainSuffix)"
        address = destination.address
        if match.kind == "Network" and address is not None and address in match.network():
            return f"address {address} is in {match.value} (Network)"
    host_rules = [m for m in matches if m.kind in ("MXSuffix", "HostName")]
    if not host_rules or not destination.mx_hosts:
        return None
    for host in destination.mx_hosts:
        if not any(rule.matches_host(host) for rule in host_rules):
            return None
    names = ", ".join(f"{m.kind}={quoted(m.value)}" for m in host_rules)
    return f"every MX host ({', '.join(destination.mx_hosts)}) matches one of {names}"


def smtp_destination(
    domain: str, records: Iterable[tuple[int, str]], address: IPAddress | None = None
) -> Destination:
    """The SMTP door's destination: the recipient domain and its MX ``(preference, host)``.

    A domain without MX records passes ``[(0, domain)]`` (the implicit MX), as KumoMTA does.
    """
    hosts = order_mx(records)
    return Destination(factor_names(hosts), normalize_name(domain), hosts, address)


def proxy_destination(address: IPAddress, name: str | None = None) -> Destination:
    """The SOCKS5 / PROXY doors' destination: the name the client gave, else the address."""
    if name:
        host = normalize_name(name)
        return Destination(host, None, (host,), address)
    return Destination(str(address), None, (), address)
