"""Next hop of a recipient domain: a configured route, or its MX records (RFC 5321 5.1).

Theory of operation
-------------------
:func:`resolve_next_hop` answers "where does mail for this domain go, from a source of
this IP version?" with a :class:`NextHop`: the hosts to try, in order, each with its
addresses and port.

1. ``[smtp.routes]``: the domain itself, else ``"*"``, maps to ``host[:port]``. An IP
   literal is used as is; a name is resolved to A/AAAA (no MX lookup, like Postfix's
   ``[host]``).
2. A domain literal (``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``) is its own host.
3. Otherwise the MX records, lowest preference first; hosts of equal preference are
   tried in random order (RFC 5321 5.1 MUST), from :data:`MX_SHUFFLE` (replaceable by tests).
   RFC 7505: a null MX (one record ``0 .``) means the domain takes no
   mail. No MX records at all: the domain's own A/AAAA records are an
   implicit MX of preference 0.

Only addresses of the source's IP version are looked up (``A`` for 4, ``AAAA`` for 6,
both when the source leaves it to the kernel). Lookups go to ``[dns] nameservers``
(default: the system resolver) through dnspython's ``dns.asyncresolver``, which runs under
trio (it detects trio through sniffio), each lookup bounded by ``[dns] timeout``.

The SMTP door asks for a next hop per message; :class:`NextHopCache` keeps each for as
long as the DNS answers behind it live (their TTL), reorders equal-preference MX hosts on
every use as a fresh look-up would, and forgets everything when the configuration changes.

Every failure is a :class:`NextHopError` with a :class:`NextHopProblem` kind and a text:
NXDOMAIN, a null MX, no MX and no address, a bad address literal (the domain itself says
no: permanent); a DNS timeout, SERVFAIL or REFUSED, or hosts without an address of the
source's version (another source, or a fixed DNS, may do better). No SMTP code is chosen
here: the SMTP door maps the kinds to replies (:mod:`egressd.relay.replies`).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from trio import current_time as trio_time

from egressd.config import Config, DnsSettings, Endpoint, IPAddress

__all__ = [
    "NEXT_HOPS",
    "MxHost",
    "NextHop",
    "NextHopCache",
    "NextHopError",
    "NextHopProblem",
    "blocking_resolver",
    "lookup_host",
    "resolve_next_hop",
    "route_for",
]

SMTP_PORT = 25
NextHopKind = Literal["route", "literal", "mx", "implicit"]


class NextHopProblem(str, enum.Enum):
    """Why a domain's next hop cannot be found: facts about DNS, not replies (the SMTP door
    turns them into replies, :func:`egressd.relay.replies.next_hop_failure`)."""

    NO_SUCH_DOMAIN = "no_such_domain"
    """The domain does not exist (NXDOMAIN)."""
    NULL_MX = "null_mx"
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""
    NO_MAIL_HOST = "no_mail_host"
    """No MX record and no address record."""
    BAD_LITERAL = "bad_literal"
    """A domain literal that is not an IP address."""
    DNS_FAILURE = "dns_failure"
    """A lookup timed out or failed (SERVFAIL, REFUSED); it may work later."""
    NO_ADDRESS = "no_address"
    """No host of the next hop has an address of the source's IP version."""

    def __str__(self) -> str:
        return self.value

    @property
    def permanent(self) -> bool:
        """True when asking again later cannot help (the domain itself says no)."""
        return self in _PERMANENT


_PERMANENT = frozenset(
    {
        NextHopProblem.NO_SUCH_DOMAIN,
        NextHopProblem.NULL_MX,
        NextHopProblem.NO_MAIL_HOST,
        NextHopProblem.BAD_LITERAL,
    }
)


class NextHopError(Exception):
    """The domain's next hop cannot be found: ``kind`` (:class:`NextHopProblem`) and ``text``."""

    def __init__(self, kind: NextHopProblem, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


@dataclass(frozen=True)
class MxHost:
    """One host to try: its name (MX exchange, route host or the domain) and addresses."""

    name: str
    preference: int
    addresses: tuple[IPAddress, ...]
    port: int = SMTP_PORT


@dataclass(frozen=True)
class NextHop:
    """Where one domain's mail goes, hosts in the order to try them."""

    domain: str
    kind: NextHopKind
    hosts: tuple[MxHost, ...]

    @property
    def identity(self) -> tuple[tuple[str, int], ...]:
        """The hosts by name and port: two domains with equal identities share a next hop."""
        return tuple((host.name, host.port) for host in self.hosts)

    def best_addresses(self) -> set[tuple[IPAddress, int]]:
        """The addresses (with port) of the hosts of the lowest preference."""
        if not self.hosts:
            return set()
        best = min(host.preference for host in self.hosts)
        return {
            (address, host.port)
            for host in self.hosts
            if host.preference == best
            for address in host.addresses
        }

    def same_destination(self, other: NextHop, connected: tuple[IPAddress, int]) -> bool:
        """True when mail for ``other`` may ride a connection to ``connected`` made for us.

        Either both domains have the same hosts, or the connected address is one of the
        most preferred addresses of ``other`` (two domains hosted by one provider under
        different MX names).
        """
        if other is self:  # the same entry of the next-hop cache
            return True
        return self.identity == other.identity or connected in other.best_addresses()


def route_for(domain: str, routes: Mapping[str, Endpoint]) -> Endpoint | None:
    """The configured route of ``domain`` (exact match), else the ``"*"`` route, else None."""
    return routes.get(domain) or routes.get("*")


def normalize_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


async def resolve_next_hop(domain: str, config: Config, version: int | None) -> NextHop:
    """The next hop of ``domain`` for a source of IP ``version``; see the module doc.

    Raises :class:`NextHopError` with the reply for the MTA.
    """
    found, _ttl = await _resolve(normalize_domain(domain), config, version)
    return found


async def _resolve(domain: str, config: Config, version: int | None) -> tuple[NextHop, float]:
    """:func:`resolve_next_hop` of a normalized ``domain``, and the seconds its DNS answers
    stay valid (inf: none was needed; 0: do not keep it)."""
    resolver = resolver_for(config.dns)
    route = route_for(domain, config.smtp.routes)
    if route is not None:
        return await _route_next_hop(domain, route, resolver, version)
    literal = domain_literal(domain)
    if literal is not None:
        return _literal_next_hop(domain, literal, version), math.inf
    return await _mx_next_hop(domain, resolver, version)


class NextHopCache:
    """Next hops kept between transactions: the SMTP door resolves one per recipient
    domain per message, and most messages go where the last ones went.

    * An entry lives as long as the DNS answers it was built from (the smallest TTL left
      among the MX and address records); one from no DNS answer at all (a route to an
      address, a domain literal) until the configuration changes. A next hop that a failed
      look-up left a host out of is not kept, nor is a failure.
    * MX hosts of equal preference are put in a new random order (:data:`MX_SHUFFLE`) each
      time an entry is used, as a fresh look-up would (RFC 5321 5.1).
    * A configuration other than the last one seen (a reload, even an unchanged one: routes
      and ``[dns]`` may differ) drops every entry.

    ``clock`` is trio's (seconds; a test's fake clock moves it). At most ``size`` entries are
    kept, the oldest going first.
    """

    def __init__(self, size: int = 10_000, clock: Callable[[], float] = trio_time) -> None:
        self.size = size
        self.clock = clock
        self._config: Config | None = None
        self._entries: dict[tuple[str, int | None], _Kept] = {}

    async def resolve(self, domain: str, config: Config, version: int | None) -> NextHop:
        """:func:`resolve_next_hop`, from the cache when it holds a live entry."""
        if config is not self._config:
            self._config = config
            self._entries = {}
        key = (normalize_domain(domain), version)
        kept = self._entries.get(key)
        if kept is not None:
            if kept.expires == math.inf or kept.expires > self.clock():
                return kept.used()
            del self._entries[key]
        found, ttl = await _resolve(key[0], config, version)
        if ttl > 0 and config is self._config:
            if len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = _Kept(found, self.clock() + ttl, _shuffles(found))
        return found


@dataclass(frozen=True)
class _Kept:
    """One :class:`NextHopCache` entry: until when, and whether its hosts are reordered."""

    next_hop: NextHop
    expires: float
    shuffle: bool

    def used(self) -> NextHop:
        if not self.shuffle:
            return self.next_hop
        hop = self.next_hop
        return NextHop(hop.domain, hop.kind, shuffled_hosts(hop.hosts, MX_SHUFFLE))


def _shuffles(next_hop: NextHop) -> bool:
    """True when some hosts of ``next_hop`` share a preference (so their order is random)."""
    preferences = [host.preference for host in next_hop.hosts]
    return next_hop.kind == "mx" and len(set(preferences)) < len(preferences)


def shuffled_hosts(hosts: tuple[MxHost, ...], rng: random.Random) -> tuple[MxHost, ...]:
    """``hosts`` by preference, each group of equal preference in a new random order."""
    shuffled = list(hosts)
    rng.shuffle(shuffled)
    shuffled.sort(key=_preference)  # stable: keeps the shuffle within a group
    return tuple(shuffled)


def _preference(host: MxHost) -> int:
    return host.preference


NEXT_HOPS = NextHopCache()
"""The daemon's next hops (the SMTP door's; ``egressd explain`` and ``probe`` look up afresh)."""


def domain_literal(domain: str) -> IPAddress | None:
    """The address of a domain literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), or None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        raise NextHopError(
            NextHopProblem.BAD_LITERAL, f"{domain} is not a valid address literal"
        ) from None


# --------------------------------------------------------------------------- the three kinds


async def _route_next_hop(
    domain: str, route: Endpoint, resolver: dns.asyncresolver.Resolver, version: int | None
) -> tuple[NextHop, float]:
    literal = route.ip
    if literal is not None:
        if version is not None and literal.version != version:
            raise NextHopError(
                NextHopProblem.NO_ADDRESS,
                f"the route of {domain} is {route}, but the source egresses over IPv{version}",
            )
        host = MxHost(route.host, 0, (literal,), route.port)
        return NextHop(domain, "route", (host,)), math.inf
    lookup = await _host_addresses(resolver, route.host, version)
    if not lookup.addresses:
        raise _no_address_error(domain, [(route.host, lookup)], version)
    host = MxHost(normalize_domain(route.host), 0, lookup.addresses, route.port)
    return NextHop(domain, "route", (host,)), lookup.ttl


def _literal_next_hop(domain: str, address: IPAddress, version: int | None) -> NextHop:
    if version is not None and address.version != version:
        raise NextHopError(
            NextHopProblem.NO_ADDRESS,
            f"{domain} is an IPv{address.version} literal, the source is IPv{version}",
        )
    return NextHop(domain, "literal", (MxHost(str(address), 0, (address,)),))


async def _mx_next_hop(
    domain: str, resolver: dns.asyncresolver.Resolver, version: int | None
) -> tuple[NextHop, float]:
    records, ttl = await _mx_records(resolver, domain)
    if records is None:
        lookup = await _host_addresses(resolver, domain, version)
        if lookup.addresses:
            implicit = (MxHost(domain, 0, lookup.addresses),)
            return NextHop(domain, "implicit", implicit), 0.0  # NoAnswer: no MX TTL to keep
        if lookup.temporary is None and not lookup.other_version:
            raise NextHopError(
                NextHopProblem.NO_MAIL_HOST,
                f"{domain} has no MX record and no address record ({lookup.why})",
            )
        raise _no_address_error(domain, [(domain, lookup)], version)
    hosts: list[MxHost] = []
    failures: list[tuple[str, _Lookup]] = []
    for preference, exchange in records:
        lookup = await _host_addresses(resolver, exchange, version)
        if lookup.addresses:
            hosts.append(MxHost(exchange, preference, lookup.addresses))
            ttl = min(ttl, lookup.ttl)
        else:
            failures.append((exchange, lookup))
    if not hosts:
        raise _no_address_error(domain, failures, version)
    return NextHop(domain, "mx", tuple(hosts)), 0.0 if failures else ttl


async def _mx_records(
    resolver: dns.asyncresolver.Resolver, domain: str
) -> tuple[list[tuple[int, str]] | None, float]:
    """``(preference, exchange)`` sorted by preference, None when the domain has no MX;
    and the seconds the answer stays valid."""
    try:
        answer = await resolver.resolve(domain, "MX", search=False)
    except dns.resolver.NXDOMAIN:
        raise NextHopError(
            NextHopProblem.NO_SUCH_DOMAIN, f"domain {domain} does not exist (NXDOMAIN)"
        ) from None
    except dns.resolver.NoAnswer:
        return None, 0.0
    except dns.exception.DNSException as exc:
        raise NextHopError(
            NextHopProblem.DNS_FAILURE,
            f"DNS lookup of the MX of {domain} failed: {_dns_error_text(exc)}",
        ) from exc
    records = [
        (int(rdata.preference), rdata.exchange.to_text(omit_final_dot=True).lower())
        for rdata in answer
    ]
    real = [(p, name) for p, name in records if name not in ("", ".")]
    if not real:  # RFC 7505: "0 ." alone (a null MX among real ones is ignored)
        raise NextHopError(
            NextHopProblem.NULL_MX, f"{domain} accepts no mail: it publishes a null MX (RFC 7505)"
        )
    return order_by_preference(real, MX_SHUFFLE), _ttl(answer)


MX_SHUFFLE = random.Random()
"""The random source that orders MX hosts of equal preference."""


def order_by_preference(
    records: list[tuple[int, str]], rng: random.Random
) -> list[tuple[int, str]]:
    """Records sorted by preference, each group of equal preference in random order
    (RFC 5321 5.1: the client MUST randomize them to spread the load)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda record: record[0])  # stable: keeps the shuffle within a group
    return shuffled


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class _Lookup:
    """The outcome of looking up one host's addresses."""

    addresses: tuple[IPAddress, ...]
    why: str = ""
    temporary: str | None = None
    other_version: bool = False
    no_such_name: bool = False
    ttl: float = 0.0
    """Seconds the address records stay valid (the smaller of A's and AAAA's)."""


async def lookup_host(host: str, settings: DnsSettings, version: int | None) -> _Lookup:
    """The A/AAAA records of ``host`` through ``[dns]`` (its resolver and cache), as a
    source of IP ``version`` wants them (A then AAAA when None): for the doors that are
    given a name rather than a mail domain (SOCKS5). Lookup failures are in the result
    (``temporary``, ``why``), never raised."""
    return await _host_addresses(resolver_for(settings), normalize_domain(host), version)


async def _host_addresses(
    resolver: dns.asyncresolver.Resolver, host: str, version: int | None
) -> _Lookup:
    """A (for IPv4) then AAAA (for IPv6) records of ``host``, as the source's version wants."""
    wanted = {4: ("A",), 6: ("AAAA",)}.get(version or 0, ("A", "AAAA"))
    addresses: list[IPAddress] = []
    why: list[str] = []
    temporary: str | None = None
    ttl = math.inf
    for rdtype in wanted:
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return _Lookup((), f"{host} does not exist", no_such_name=True)
        except dns.resolver.NoAnswer:
            why.append(f"{host} has no {rdtype} record")
            continue
        except dns.exception.DNSException as exc:
            temporary = f"{rdtype} lookup of {host} failed: {_dns_error_text(exc)}"
            continue
        addresses.extend(ipaddress.ip_address(rdata.address) for rdata in answer)
        ttl = min(ttl, _ttl(answer))
    other_version = False
    if not addresses and not temporary and version is not None:
        other_version = await _has_other_version(resolver, host, version)
    if temporary is not None or not addresses:
        ttl = 0.0
    return _Lookup(tuple(addresses), "; ".join(why), temporary, other_version, ttl=ttl)


def _ttl(answer: dns.resolver.Answer) -> float:
    """Seconds ``answer`` stays valid (dnspython's cache keeps it as long)."""
    return max(answer.expiration - time.time(), 0.0)


async def _has_other_version(resolver: dns.asyncresolver.Resolver, host: str, version: int) -> bool:
    try:
        await resolver.resolve(host, "AAAA" if version == 4 else "A", search=False)
    except dns.exception.DNSException:
        return False
    return True


def _no_address_error(
    domain: str, failures: list[tuple[str, _Lookup]], version: int | None
) -> NextHopError:
    """The failure when no host of ``domain``'s next hop has a usable address."""
    for _host, lookup in failures:
        if lookup.temporary is not None:
            return NextHopError(
                NextHopProblem.DNS_FAILURE, f"next hop of {domain}: {lookup.temporary}"
            )
    family = f"IPv{version} " if version is not None else ""
    names = ", ".join(host for host, _ in failures)
    details = "; ".join(
        lookup.why + (" (it has addresses of the other IP version)" if lookup.other_version else "")
        for _, lookup in failures
    )
    return NextHopError(
        NextHopProblem.NO_ADDRESS,
        f"no {family}address for the next hop of {domain} ({names}): {details}",
    )


# --------------------------------------------------------------------------- resolver


_RESOLVERS: dict[DnsSettings, dns.asyncresolver.Resolver] = {}


def blocking_resolver(settings: DnsSettings, lifetime: float) -> dns.resolver.Resolver | None:
    """A blocking resolver for ``[dns]`` (or the system's; None when it has none), each
    query bounded by ``[dns] timeout`` and at most ``lifetime`` seconds: for the checks
    and look-ups that run in a thread, outside the daemon's async resolver."""
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
    resolver.lifetime = min(settings.timeout, lifetime)
    resolver.timeout = resolver.lifetime
    return resolver


#: Answers one ``[dns]`` table's resolver keeps (least recently used go first).
DNS_CACHE_ENTRIES = 10_000


def resolver_for(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """One resolver per ``[dns]`` table, kept across calls (reading resolv.conf once)."""
    return cached_resolver(_RESOLVERS, settings, _plain)


def _plain(resolver: dns.asyncresolver.Resolver) -> None:
    """Answers are kept for their TTL (negative ones for the SOA minimum), as a caching
    resolver would: MX, A/AAAA, TXT and TLSA look-ups repeat for every message."""
    resolver.cache = dns.resolver.LRUCache(DNS_CACHE_ENTRIES)


def cached_resolver(
    kept: dict[DnsSettings, dns.asyncresolver.Resolver],
    settings: DnsSettings,
    finish: Callable[[dns.asyncresolver.Resolver], None],
) -> dns.asyncresolver.Resolver:
    """The resolver ``kept`` for one ``[dns]`` table, made on first use: its nameservers
    (resolv.conf when it names none) and timeout, then ``finish`` (flags, cache). At most 16
    tables are kept: a reload that changes ``[dns]`` starts afresh."""
    resolver = kept.get(settings)
    if resolver is None:
        if settings.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(server.host, server.port)
                for server in settings.nameservers
            ]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = settings.timeout
        resolver.timeout = min(resolver.timeout, settings.timeout)
        finish(resolver)
        if len(kept) > 16:
            kept.clear()
        kept[settings] = resolver
    return resolver


def _dns_error_text(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or REFUSED)"
    return str(exc) or type(exc).__name__
