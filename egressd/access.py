"""Access rules shared by every front door: who may connect, and where they may go.

An open SOCKS or SMTP relay is what abusers look for, so the defaults are tight: clients
from loopback only, destination ports 25, 465, 587 and 2525, and no destination in
loopback, private, shared (CGNAT), link-local, multicast or documentation ranges.
Each refusal names the rule that refused, for the log line. Pure: no sockets.
"""

from __future__ import annotations

import ipaddress

from egressd.config import AccessSettings, IPAddress


def _as_address(address: str | IPAddress) -> IPAddress | None:
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_refusal(access: AccessSettings, client: str | IPAddress) -> str | None:
    """None when ``client`` may connect, else the reason naming the rule."""
    address = _as_address(client)
    if address is None:
        return f"client {client} is not an IP address"
    if any(address in network for network in access.clients):
        return None
    return f"client {address} is not in access.clients"


def destination_refusal(
    access: AccessSettings, destination: str | IPAddress, port: int
) -> str | None:
    """None when a client may reach ``destination:port``, else the reason naming the rule."""
    if port not in access.destination_ports:
        return f"port {port} is not in access.destination_ports"
    address = _as_address(destination)
    if address is None:
        return None  # a name: checked again once it is resolved
    for network in access.deny_destinations:
        if address.version == network.version and address in network:
            return f"destination {address} is in access.deny_destinations ({network})"
    return None
