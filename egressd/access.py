"""Access rules shared by every front door: who may connect, and where they may go.

An open SOCKS or SMTP relay is what abusers look for, so the defaults are tight: clients
from loopback only, destination ports 25, 465, 587 and 2525, and no destination in a range
that IANA's special-purpose registries (RFC 6890) mark as not globally reachable: loopback,
private, shared (CGNAT), link-local, benchmarking, multicast, reserved, documentation...
Each refusal names the rule that refused, for the log line. Pure: no sockets.

IPv6 addresses that carry an IPv4 address
-----------------------------------------
Several IPv6 prefixes are ways to reach an IPv4 host: on a NAT64 host ``64:ff9b::a00:1``
*is* 10.0.0.1. So before an IPv6 destination is allowed, every IPv4 address it may embed
is checked against the same rules, as if it had been asked for directly
(:func:`embedded_ipv4`):

* IPv4-mapped ``::ffff:0:0/96`` (RFC 4291): checked as the IPv4 address it maps;
* IPv4-compatible ``::/96`` (RFC 4291, deprecated) and SIIT ``::ffff:0:0:0/96``
  (RFC 2765): the last 32 bits;
* NAT64 ``64:ff9b::/96`` (RFC 6052) and the local-use ``64:ff9b:1::/48`` (RFC 8215): the
  last 32 bits, and for the local-use prefix also the RFC 6052 /48 layout (bits 48-63 and
  72-87), since an operator may use either;
* 6to4 ``2002::/16`` (RFC 3056): bits 16-47;
* Teredo ``2001::/32`` (RFC 4380): the server (bits 32-63) and the client (the last 32
  bits, inverted).

An address is refused when it or any address it embeds is refused.
"""

from __future__ import annotations

import ipaddress

from egressd.config import AccessSettings, IPAddress, IPNetwork

_V4 = ipaddress.IPv4Address
_MASK32 = 0xFFFFFFFF
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _as_address(address: str | IPAddress) -> IPAddress | None:
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address may stand for (see the module doc); often none."""
    value = int(address)
    if address in _NAT64 or address in _COMPATIBLE or address in _SIIT:
        return (_V4(value & _MASK32),)
    if address in _NAT64_LOCAL:
        rfc6052_48 = ((value >> 64) & 0xFFFF) << 16 | (value >> 40) & 0xFFFF
        return (_V4(value & _MASK32), _V4(rfc6052_48))
    if address in _SIX_TO_FOUR:
        return (_V4((value >> 80) & _MASK32),)
    if address in _TEREDO:
        return (_V4((value >> 64) & _MASK32), _V4(~value & _MASK32))
    return ()


def client_refusal(access: AccessSettings, client: str | IPAddress) -> str | None:
    """None when ``client`` may connect, else the reason naming the rule.

    Every accepted connection asks, and an MTA connects from the same few addresses, so
    the verdict on a client's address text is remembered per ``access.clients`` tuple
    (:func:`_client_verdicts`): parsing the text and testing it against each network cost
    about 35 Python calls, a thirtieth of a short SOCKS5 session."""
    if not isinstance(client, str):
        return network_refusal(access.clients, client, "access.clients")
    verdicts = _client_verdicts(access.clients)
    try:
        return verdicts[client]
    except KeyError:
        pass
    refusal = network_refusal(access.clients, client, "access.clients")
    if len(verdicts) >= _CLIENT_VERDICTS:
        verdicts.clear()
    verdicts[client] = refusal
    return refusal


_CLIENT_VERDICTS = 4096
"""Client addresses whose verdict is remembered per ``access.clients`` (then forgotten)."""
_VERDICTS: dict[int, tuple[tuple[IPNetwork, ...], dict[str, str | None]]] = {}
"""The remembered verdicts by the id of the configuration's ``clients`` tuple (the tuple is
kept, so its id cannot be reused while it is here)."""


def _client_verdicts(clients: tuple[IPNetwork, ...]) -> dict[str, str | None]:
    entry = _VERDICTS.get(id(clients))
    if entry is None or entry[0] is not clients:
        if len(_VERDICTS) >= 64:  # reloads: keep only the recent configurations
            _VERDICTS.clear()
        entry = _VERDICTS[id(clients)] = (clients, {})
    return entry[1]


def network_refusal(
    networks: tuple[IPNetwork, ...], client: str | IPAddress, rule: str
) -> str | None:
    """None when ``client`` is in one of ``networks``, else the reason naming ``rule``."""
    address = _as_address(client)
    if address is None:
        return f"client {client} is not an IP address"
    if any(address in network for network in networks):
        return None
    return f"client {address} is not in {rule}"


def destination_refusal(
    access: AccessSettings, destination: str | IPAddress, port: int
) -> str | None:
    """None when a client may reach ``destination:port``, else the reason naming the rule."""
    if port not in access.destination_ports:
        return f"port {port} is not in access.destination_ports"
    address = _as_address(destination)
    if address is None:
        return None  # a name: checked again once it is resolved
    network = _denying_network(access.deny_destinations, address)
    if network is not None:
        return f"destination {address} is in access.deny_destinations ({network})"
    if isinstance(address, ipaddress.IPv6Address):
        for inner in embedded_ipv4(address):
            network = _denying_network(access.deny_destinations, inner)
            if network is not None:
                return (
                    f"destination {address} embeds {inner}, which is in"
                    f" access.deny_destinations ({network})"
                )
    return None


_DenyRow = tuple[int, int, int, IPNetwork]
_DENY_TABLES: dict[int, tuple[tuple[IPNetwork, ...], tuple[_DenyRow, ...]]] = {}
"""``deny_destinations`` as (version, network as int, netmask as int, network) rows, by the
id of the configuration's tuple (the tuple is kept, so its id cannot be reused)."""


def _deny_table(deny: tuple[IPNetwork, ...]) -> tuple[_DenyRow, ...]:
    entry = _DENY_TABLES.get(id(deny))
    if entry is None or entry[0] is not deny:
        if len(_DENY_TABLES) >= 64:  # reloads: keep only the recent configurations
            _DENY_TABLES.clear()
        rows = tuple((n.version, int(n.network_address), int(n.netmask), n) for n in deny)
        entry = _DENY_TABLES[id(deny)] = (deny, rows)
    return entry[1]


def _denying_network(deny: tuple[IPNetwork, ...], address: IPAddress) -> IPNetwork | None:
    """The first network of ``deny`` that holds ``address`` (the test ``address in
    network`` makes, on integers: ``in`` on ipaddress objects costs three Python calls per
    network, and the default list has 28, checked for every destination)."""
    version, value = address.version, int(address)
    for net_version, network_value, mask, network in _deny_table(deny):
        if net_version == version and value & mask == network_value:
            return network
    return None
