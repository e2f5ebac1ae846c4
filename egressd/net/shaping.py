"""Shaping files -> one :class:`~egressd.shaping.ShapingPolicy`: the files and the DNS.

Theory of operation
-------------------
``shaping_files = [...]`` in the main file names KumoMTA shaping files, relative to the
main file, read in that order (later files layer over earlier ones, as KumoMTA's
``kumo.shaping.load`` does). :func:`load_policy` reads them with the shaping package's
loader; an error names the file and the key path and comes out as a
:class:`~egressd.config.ConfigError`, so ``egressd check`` fails on it, ``run`` does not
start and a reload is refused (all or none: the previous policy stays).

A rolled-up domain section (``mx_rollup = true``, KumoMTA's default) applies to the
domain's *site*, which depends on its MX hosts: they are resolved here, once per load,
through ``[dns]`` (each query bounded by its timeout, at most :data:`DNS_LIFETIME`
seconds). A domain whose MX cannot be resolved is left out with a warning, as KumoMTA
does. This is blocking DNS: the daemon runs it in a thread.

Warnings (rules that can never apply) and notices (each MTA-only key or action, named
once) are kept on the policy as :class:`~egressd.shaping.Finding` records; ``check``
prints them without failing.
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.exception
import dns.nameserver
import dns.resolver
import trio

from egressd.config import Config, ConfigError, DnsSettings, Problem
from egressd.shaping import ShapingError, ShapingPolicy, load_shaping_files, site_name

__all__ = ["DNS_LIFETIME", "findings_text", "load_policy", "load_policy_in_thread", "resolve_sites"]

DNS_LIFETIME = 3.0


def load_policy(config: Config) -> ShapingPolicy | None:
    """The policy of ``config``'s shaping files (None without any); raise ConfigError."""
    if not config.shaping_files:
        return None
    try:
        files = load_shaping_files(config.shaping_files)
    except ShapingError as exc:
        raise ConfigError([Problem(f.file, f.key, f.message) for f in exc.findings]) from exc
    sites = resolve_sites(files.rollup_domains(), config.dns)
    return ShapingPolicy.from_files(files, sites)


def resolve_sites(domains: Iterable[str], settings: DnsSettings) -> dict[str, str]:
    """Domain -> site name (from its MX records; the domain itself without MX records).

    A domain whose lookup fails is missing from the result (the loader warns about it).
    """
    resolver = _resolver(settings)
    sites: dict[str, str] = {}
    for domain in domains:
        records = _mx_records(resolver, domain)
        if records is not None:
            sites[domain] = site_name(records)
    return sites


def findings_text(policy: ShapingPolicy | None) -> list[str]:
    """Warnings and notices, one line each, for ``egressd check``."""
    if policy is None:
        return []
    return [str(finding) for finding in policy.findings if finding.level != "error"]


def _resolver(settings: DnsSettings) -> dns.resolver.Resolver | None:
    try:
        if settings.nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(server.host, server.port)
                for server in settings.nameservers
            ]
        else:
            resolver = dns.resolver.Resolver()
    except dns.resolver.NoResolverConfiguration:
        return None
    resolver.lifetime = min(settings.timeout, DNS_LIFETIME)
    resolver.timeout = resolver.lifetime
    return resolver


def _mx_records(
    resolver: dns.resolver.Resolver | None, domain: str
) -> list[tuple[int, str]] | None:
    if resolver is None:
        return None
    try:
        answer = resolver.resolve(domain, "MX")
    except dns.resolver.NoAnswer:
        return [(0, domain)]  # no MX: the domain is its own implicit MX
    except dns.exception.DNSException:
        return None
    return [(int(r.preference), r.exchange.to_text()) for r in answer]


async def load_policy_in_thread(config: Config) -> ShapingPolicy | None:
    """:func:`load_policy` for the daemon: its DNS runs in a thread (none without files)."""
    if not config.shaping_files:
        return None
    return await trio.to_thread.run_sync(load_policy, config)
