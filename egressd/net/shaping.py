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

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import dns.exception
import dns.nameserver
import dns.resolver
import trio

from egressd.config import Config, ConfigError, DnsSettings, IPAddress, Problem
from egressd.net.mx import blocking_resolver
from egressd.shaping import (
    Destination,
    Lease,
    Refusal,
    Shaper,
    ShapingError,
    ShapingPolicy,
    load_shaping_files,
    refusal_summary,
    site_name,
)
from egressd.shaping.ledger import Holding, SharedLedger
from egressd.shaping.policy import Budget
from egressd.shaping.rules import reply_line
from egressd.shaping.shaper import Effect
from egressd.shaping.sites import proxy_destination, quoted, smtp_destination

__all__ = [
    "DNS_LIFETIME",
    "BudgetAsker",
    "ConnectionHook",
    "ShapedDestination",
    "findings_text",
    "load_policy",
    "load_policy_in_thread",
    "lookup_mx",
    "proxy_budget",
    "resolve_sites",
    "smtp_budget",
]

DNS_LIFETIME = 3.0

ConnectionHook = Callable[[str, str, int], None]
"""``(source, provider, +1 | -1)``: a shaped connection was made, or has ended."""


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


def lookup_mx(domain: str, settings: DnsSettings) -> list[tuple[int, str]] | None:
    """``(preference, host)`` MX records of ``domain`` (itself without any), through
    ``[dns]``; None when the lookup fails. Blocking (for ``egressd explain``)."""
    return _mx_records(_resolver(settings), domain)


def findings_text(policy: ShapingPolicy | None) -> list[str]:
    """Warnings and notices, one line each, for ``egressd check``."""
    if policy is None:
        return []
    return [str(finding) for finding in policy.findings if finding.level != "error"]


def _resolver(settings: DnsSettings) -> dns.resolver.Resolver | None:
    return blocking_resolver(settings, DNS_LIFETIME)


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


class BudgetAsker(Protocol):
    """The shell of a shared ledger (:class:`egressd.fleet.budgets.FleetBudgets`): asks the
    store ahead for what a holding will spend."""

    async def prepare_open(
        self, holding: Holding, budgets: Iterable[Budget], *, messages: bool = False
    ) -> None: ...

    async def prepare_send(self, holding: Holding, budgets: Iterable[Budget]) -> None: ...

    def settle(self, holding: Holding) -> None: ...


class ShapedDestination:
    """The shaper bound to one destination: an :class:`~egressd.egress.budgets.
    DestinationBudget` for one plan, holding at most one :class:`~egressd.shaping.Lease`.

    ``messages``: the connection carries messages (the SMTP door), so a source whose
    message rate is used up is not eligible either: it would cost a connection that
    carries nothing.

    With budgets shared by a fleet (``asker``, and a shaper over a
    :class:`~egressd.shaping.ledger.SharedLedger`), the plan's
    :class:`~egressd.shaping.ledger.Holding` is filled ahead: :meth:`prepare` before the
    plan picks (the executor), :meth:`prepare_send` before each message (the SMTP door);
    what it does not spend is settled back to the node's spares."""

    def __init__(
        self,
        shaper: Shaper,
        destination: Destination,
        asker: BudgetAsker | None = None,
        *,
        messages: bool = False,
    ) -> None:
        self.shaper = shaper
        self.destination = destination
        self.messages = messages
        self.lease: Lease | None = None
        self.refusals: dict[str, Refusal] = {}
        #: Told ``(source, provider, +1)`` when a connection is made, ``-1`` when it ends.
        self.on_connection: ConnectionHook | None = None
        self._open: tuple[str, str] | None = None
        shared = asker is not None and isinstance(shaper.ledger, SharedLedger)
        self.asker = asker if shared else None
        self.holding: Holding | None = Holding() if shared else None

    @property
    def site(self) -> str:
        return self.destination.site

    def refusal(self, source: str) -> str | None:
        refusal = self.shaper.check_open(source, self.destination, self.holding)
        if refusal is None and self.messages:
            refusal = self.shaper.check_send(source, self.destination, self.holding)
        if refusal is None:
            return None
        self.refusals[source] = refusal
        return refusal.reason

    def suspended(self, source: str) -> str | None:
        """Why ``source`` is suspended there now (a reply rule fired), or None."""
        refusal = self.shaper.suspension(source, self.destination)
        return None if refusal is None else refusal.reason

    def take(self, source: str) -> str | None:
        self.release()
        taken = self.shaper.open(source, self.destination, self.holding)
        if isinstance(taken, Refusal):
            self.refusals[source] = taken
            return taken.reason
        self.lease = taken
        return None

    def connected(self, source: str) -> None:
        """The leased connection was made: the path's failure count starts again, and
        the connection counts for (source, provider) until :meth:`release`."""
        if self.lease is None or self.lease.source != source:
            return
        self.lease.connected()
        if self.on_connection is not None and self._open is None:
            self._open = (source, self.provider())
            self.on_connection(*self._open, 1)

    def failed(self, source: str) -> None:
        """A connection attempt from the leased source failed at the destination (the
        lease is kept for the next address): it counts against the (source, site) path."""
        if self.lease is not None and self.lease.source == source:
            self.shaper.attempt_failed(self.lease)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
            self.settle()
        if self._open is not None and self.on_connection is not None:
            self.on_connection(*self._open, -1)
        self._open = None

    async def prepare(self, sources: Sequence[str]) -> None:
        """Before the plan picks: ask the shared store, in one round trip, for what
        opening a connection from any of ``sources`` would spend (nothing in-process)."""
        if self.asker is None or self.holding is None:
            return
        limits = self.shaper.limits
        budgets = [b for source in sources for b in limits(source, self.destination).budgets]
        await self.asker.prepare_open(self.holding, budgets, messages=self.messages)

    async def prepare_send(self) -> None:
        """Before a message on the leased connection: ask the shared store for its cells."""
        if self.asker is None or self.holding is None or self.lease is None:
            return
        await self.asker.prepare_send(self.holding, self.lease.limits.budgets)

    def settle(self) -> None:
        """What the holding does not use goes back to this node's spares."""
        if self.asker is not None and self.holding is not None:
            self.asker.settle(self.holding)

    def replied(self, code: int, lines: Sequence[str]) -> list[Effect]:
        """A reply of the remote on the leased connection: the reply rules hear it
        (``Suspend`` the (source, site) or (source, provider), ``SetConfig``...)."""
        if self.lease is None:
            return []
        line = reply_line(code, lines)
        return self.shaper.reply(self.lease.source, self.destination, line)

    def exhausted(self, pool: str) -> str:
        return refusal_summary(pool, self.target(), list(self.refusals.values()))

    def provider(self) -> str:
        """The shaping provider that names this destination, else ``other`` (the warm-up
        quota it counts against)."""
        found = self.shaper.policy.provider_of(self.destination)
        return "other" if found is None else found[0]

    def target(self) -> str:
        """``provider "google"`` when a provider matched, else ``site "..."``."""
        provider = self.shaper.policy.provider_of(self.destination)
        if provider is not None:
            return f"provider {quoted(provider[0])}"
        return f"site {quoted(self.destination.site)}"


def smtp_budget(
    shaper: Shaper | None,
    domain: str,
    mx: Iterable[tuple[int, str]],
    asker: BudgetAsker | None = None,
) -> ShapedDestination | None:
    """The SMTP door's budgets: the recipient domain's site and provider, from its next
    hop's MX ``(preference, host)`` records."""
    if shaper is None:
        return None
    return ShapedDestination(shaper, smtp_destination(domain, mx), asker, messages=True)


def proxy_budget(
    shaper: Shaper | None, host: str | IPAddress, asker: BudgetAsker | None = None
) -> ShapedDestination | None:
    """The SOCKS5 and PROXY doors' budgets: the name the client gave, else the address."""
    if shaper is None:
        return None
    if isinstance(host, str):
        try:
            address: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is None:
            return ShapedDestination(shaper, _named(host), asker)
        host = address
    return ShapedDestination(shaper, proxy_destination(host), asker)


def _named(name: str) -> Destination:
    """A name without its address (SOCKS5 ATYP 03): the site is the name."""
    host = name.lower().removesuffix(".")
    return Destination(host, None, (host,), None)
