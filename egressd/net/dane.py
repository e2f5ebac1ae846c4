"""DANE look-ups (RFC 7672 section 2.2): the trio shell of :mod:`egressd.tlspolicy.dane`.

Theory of operation
-------------------
:func:`dane_hosts` answers "which MX hosts of this next hop are DANE hosts, with which
TLSA records?" with one :class:`~egressd.tlspolicy.dane.DaneHost` per host.

Every query goes to ``[dns] nameservers`` with the AD and DO bits set (RFC 6840 section
5.7: a validating resolver then sets AD on an answer it validated), through a resolver
of its own (:func:`dnssec_resolver`, kept per ``[dns]`` table and caching answers for
their TTL) so the next-hop look-ups of :mod:`egressd.net.mx` are not changed. egressd does
no validation itself: like Postfix, it trusts the AD bit, which is only as good as the
path to the resolver (run a validating resolver on the host or the LAN).

1. The domain's MX records (for an implicit MX, the "no MX" answer) without AD: DANE
   does not apply to the domain (section 2.2.1); every host is ``none``.
2. Per host: its A/AAAA records (the families it has addresses of) without AD: no TLSA
   look-up, ``none`` (section 2.2.2).
3. ``_25._tcp.<host>`` TLSA: validated records make a ``dane`` host; NXDOMAIN, NODATA or
   an answer without AD is ``none``; a timeout or SERVFAIL is ``failed`` (the host is
   skipped, never used without DANE). A failed MX look-up fails every host.

The caller bounds the time (each query is bounded by ``[dns] timeout`` anyway).
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver

from egressd.config import Config, DnsSettings
from egressd.net.mx import MxHost, NextHop, cached_resolver
from egressd.tlspolicy.dane import DaneHost, DaneState, tlsa_name
from egressd.tlspolicy.tlsa import Tlsa

__all__ = ["DNSSEC_CACHE_ENTRIES", "dane_hosts", "dnssec_resolver", "validated"]

DNSSEC_CACHE_ENTRIES = 10_000
_RESOLVERS: dict[DnsSettings, dns.asyncresolver.Resolver] = {}


def dnssec_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """The ``[dns]`` resolver asking with AD and DO (one per table, kept across calls)."""
    return cached_resolver(_RESOLVERS, settings, _asking_for_dnssec)


def _asking_for_dnssec(resolver: dns.asyncresolver.Resolver) -> None:
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.use_edns(0, dns.flags.DO, 1232)
    resolver.cache = dns.resolver.LRUCache(DNSSEC_CACHE_ENTRIES)


def validated(answer: dns.resolver.Answer) -> bool:
    """True when the resolver set the AD bit (it validated the answer)."""
    return bool(answer.response.flags & dns.flags.AD)


class _LookupFailed(Exception):
    """A query timed out or failed (SERVFAIL, REFUSED): the text says which."""


async def _ask(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> dns.resolver.Answer | None:
    """The answer (possibly empty: NODATA), None for NXDOMAIN; raises :class:`_LookupFailed`."""
    try:
        return await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.DNSException as exc:
        why = "timed out" if isinstance(exc, dns.exception.Timeout) else "failed (SERVFAIL?)"
        raise _LookupFailed(f"the {rdtype} look-up of {name} {why}") from exc


async def dane_hosts(next_hop: NextHop, config: Config) -> dict[str, DaneHost]:
    """Each host of ``next_hop`` (an ``mx`` or ``implicit`` one) by name; see the module doc."""
    resolver = dnssec_resolver(config.dns)
    try:
        mx = await _ask(resolver, next_hop.domain, "MX")
    except _LookupFailed as exc:
        return _every_host(next_hop, "failed", str(exc))
    if mx is None or not validated(mx):
        return _every_host(
            next_hop, "none", f"the MX records of {next_hop.domain} are not DNSSEC-validated"
        )
    return {host.name: await _host(resolver, host) for host in next_hop.hosts}


def _every_host(next_hop: NextHop, state: DaneState, why: str) -> dict[str, DaneHost]:
    return {h.name: DaneHost(h.name, state, why=why, port=h.port) for h in next_hop.hosts}


async def _host(resolver: dns.asyncresolver.Resolver, host: MxHost) -> DaneHost:
    try:
        if not await _addresses_validated(resolver, host):
            why = f"the address records of {host.name} are not DNSSEC-validated"
            return DaneHost(host.name, "none", why=why, port=host.port)
        answer = await _ask(resolver, tlsa_name(host.name, host.port), "TLSA")
    except _LookupFailed as exc:
        return DaneHost(host.name, "failed", why=str(exc), port=host.port)
    if answer is None or answer.rrset is None:
        return DaneHost(host.name, "none", why="no TLSA records", port=host.port)
    if not validated(answer):
        why = f"the TLSA records of {tlsa_name(host.name, host.port)} are not DNSSEC-validated"
        return DaneHost(host.name, "none", why=why, port=host.port)
    records = tuple(
        Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in answer.rrset
    )
    return DaneHost(host.name, "dane", records, port=host.port)


async def _addresses_validated(resolver: dns.asyncresolver.Resolver, host: MxHost) -> bool:
    families = {address.version for address in host.addresses}
    for rdtype in ("A",) * (4 in families) + ("AAAA",) * (6 in families):
        answer = await _ask(resolver, host.name, rdtype)
        if answer is None or not validated(answer):
            return False
    return True
