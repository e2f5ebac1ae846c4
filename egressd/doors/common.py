"""What the SOCKS5 and PROXY-protocol doors share once a client has said where to go.

Theory of operation
-------------------
:func:`open_outbound` turns "this destination, from this pool (or this exact source)" into
a :class:`~egressd.net.dialer.Dialed` connection, enforcing ``[access]`` on the way:

1. The requested port and, for an IP literal, the address are checked against
   ``destination_ports`` and ``deny_destinations`` (:func:`egressd.access.destination_refusal`).
2. The source is chosen: the exact one the client named, or the pool's next one
   (:meth:`Egress.pick`, which skips suspended sources and those at their cap).
3. A name is resolved *here*, in the chosen source's address family, and every address
   is checked; only allowed addresses are dialed, as IP literals. Dialing the checked
   address (instead of handing the name to the dialer, which would resolve it again) is
   what keeps a name that resolves to 127.0.0.1 from reaching loopback.
4. :meth:`Egress.connect` dials from that source (health accounting included). Addresses
   are tried in the resolver's order while the failure is the destination's. A failure
   that is the source's fault (unplumbed address, dead hop) is retried once on the pool's
   next source, as ``Egress.connect`` does for pools.

Refusals are typed: :class:`Denied` (an access rule; its text names the rule),
:class:`~egressd.net.egress.EgressRefused` (no source could be chosen) and
:class:`~egressd.net.dialer.DialError` (the dial failed; ``reply_code`` gives the SOCKS5
reply). :func:`relay_session` then splices the client and the destination until both are
done and fills the :class:`~egressd.runtime.SessionRecord`.
"""

from __future__ import annotations

import functools
import ipaddress

import trio

from egressd.access import destination_refusal
from egressd.config import AccessSettings, IPAddress, Source, format_hostport
from egressd.log import get_logger
from egressd.net.connection import Connection
from egressd.net.dialer import Dialed, DialError, DialFailure, resolve_destination
from egressd.net.egress import Egress, EgressRefused
from egressd.net.splice import Traffic, relay
from egressd.runtime import Runtime, SessionRecord

log = get_logger("doors")


class Denied(Exception):
    """The access rules refuse the destination; the message names the rule."""


async def open_outbound(
    egress: Egress,
    host: str | IPAddress,
    port: int,
    *,
    pool: str | None = None,
    source: Source | None = None,
) -> Dialed:
    """Dial ``host:port`` from ``source``, or from ``pool``'s next source; see the module doc.

    Raises :class:`Denied`, :class:`EgressRefused` or :class:`DialError`.
    """
    access = egress.config.access
    refusal = destination_refusal(access, host, port)
    if refusal is not None:
        raise Denied(refusal)
    if source is not None:
        return await _dial_checked(egress, access, source, host, port)
    if pool is None:
        raise EgressRefused("unknown_pool", "the client named no pool and the listener has none")
    return await egress.through_pool(
        pool, lambda picked: _dial_checked(egress, access, picked, host, port)
    )


async def _dial_checked(
    egress: Egress, access: AccessSettings, source: Source, host: str | IPAddress, port: int
) -> Dialed:
    addresses = await allowed_addresses(egress, access, source, host, port)
    last: DialError | None = None
    for address in addresses:
        try:
            return await egress.connect(str(address), port, source=source)
        except DialError as exc:
            if not exc.destination_fault:
                raise
            last = exc
    assert last is not None  # allowed_addresses never returns an empty list
    raise last


async def allowed_addresses(
    egress: Egress, access: AccessSettings, source: Source, host: str | IPAddress, port: int
) -> list[IPAddress]:
    """``host``'s addresses in ``source``'s family that the access rules allow.

    Raises :class:`Denied` when every address is denied, :class:`DialError` when the name
    does not resolve (in time, ``[dial] timeout``) to an address of that family.
    """
    if not (isinstance(host, str) and _is_name(host)):
        return await resolve_destination(host, port, source.egress_version, source_name=source.name)
    timeout = egress.config.dial.timeout
    try:
        with trio.fail_after(timeout):
            addresses = await resolve_destination(
                host, port, source.egress_version, source_name=source.name
            )
    except trio.TooSlowError as exc:
        raise DialError(
            DialFailure.TIMEOUT,
            f"source {source.name!r}: resolving {host} took longer than {timeout:g}s",
            source_name=source.name,
            stage="resolve",
        ) from exc
    refusals = [destination_refusal(access, a, port) for a in addresses]
    allowed = [a for a, refusal in zip(addresses, refusals, strict=True) if refusal is None]
    if not allowed:
        raise Denied(f"{host} resolves to a denied address: {refusals[0]}")
    return allowed


def _is_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def note_destination(record: SessionRecord, host: str | IPAddress, port: int) -> None:
    record.destination = format_hostport(host, port)


def note_dialed(record: SessionRecord, dialed: Dialed, host: str | IPAddress) -> None:
    """Source, local address and destination (``name:port (ip)`` when a name was asked)."""
    record.source = dialed.source.name
    record.local_address = format_hostport(*dialed.local_address)
    ip, port = dialed.remote_address
    if isinstance(host, str) and _is_name(host):
        record.destination = f"{format_hostport(host, port)} ({ip})"
    else:
        record.destination = format_hostport(ip, port)


def local_ip(dialed: Dialed) -> IPAddress | None:
    """The IP address of ``dialed.local_address`` (None when it is not an address)."""
    return _parse_local_ip(dialed.local_address[0])


@functools.lru_cache(maxsize=256)
def _parse_local_ip(host: str) -> IPAddress | None:
    """Cached: local addresses are the few source addresses, parsed once per connection."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def note_refusal(record: SessionRecord, exc: Denied | EgressRefused | DialError) -> tuple[str, str]:
    """Fill the record's outcome and detail for a failed :func:`open_outbound`."""
    if isinstance(exc, Denied):
        record.outcome = "denied"
    elif isinstance(exc, EgressRefused):
        record.outcome = "refused"
    else:
        record.outcome = "dial_failed"
        record.source = exc.source_name
    record.detail = str(exc)
    return record.outcome, record.detail


async def relay_session(
    runtime: Runtime,
    record: SessionRecord,
    client: Connection,
    dialed: Dialed,
    *,
    idle_timeout: float,
    client_data: bytes = b"",
) -> None:
    """Splice ``client`` and the destination until both are done; fill ``record``.

    ``client_data``: bytes the client sent after its request, owed to the destination.
    The caller closes both streams.
    """
    traffic = Traffic()
    try:
        async with runtime.source_in_use(dialed.source.name):
            result = await relay(
                client,
                dialed.stream,
                traffic=traffic,
                idle_timeout=idle_timeout,
                to_remote_first=client_data,
                to_client_first=dialed.initial_data,
            )
    finally:
        record.bytes_up, record.bytes_down = traffic.up, traffic.down
    record.outcome = result.outcome
    record.detail = result.detail
