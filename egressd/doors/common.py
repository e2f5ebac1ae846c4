"""What the SOCKS5 and PROXY-protocol doors share once a client has said where to go.

Theory of operation
-------------------
:func:`open_outbound` turns "this destination, from this pool (or this exact source)" into
a :class:`~egressd.net.dialer.Dialed` connection: it builds the outbound plan
(:class:`~egressd.egress.plan.Plan`, which enforces ``[access]`` on the port and on every
address, a name's resolved addresses included, so a name that resolves to 127.0.0.1 never
reaches loopback) and runs it under its one deadline, ``[dial] timeout``
(:func:`~egressd.net.egress.connect_within`). Which source, which address, what is retried
and what health hears of it is the plan's business.

Every refusal is an :class:`~egressd.egress.failures.EgressFailure`; each door turns its
kind into its own reply. :func:`relay_session` then splices the client and the destination
until both are done and fills the :class:`~egressd.runtime.SessionRecord`.

Warm-up: these doors see no message (the session may be TLS from the first byte), so a
connection made is what counts, like KumoMTA's ``source_selection_rate``: one message of
the source's daily quota to the destination's provider (the shaping provider that matches
the name the client gave as an MX host name, or the address by a ``Network`` match; else
``other``), held at pick time and counted as ``connected`` once the connection is up
(:mod:`egressd.egress.quotas`). A source without quota left is skipped by a pool's pick,
and an exact source (a BIND, a PROXY header) is refused with ``WARMUP_QUOTA``.
"""

from __future__ import annotations

import trio

from egressd.config import IPAddress, Source, format_hostport
from egressd.egress import Egress, EgressFailure, Failure, Plan
from egressd.log import get_logger
from egressd.net.dialer import Dialed
from egressd.net.egress import connect_within
from egressd.net.shaping import ShapedDestination
from egressd.net.splice import Traffic, relay, set_keepalive
from egressd.runtime import Runtime, SessionRecord

log = get_logger("doors")

_NO_SOURCE_KINDS = frozenset(
    {
        Failure.UNKNOWN_POOL,
        Failure.NO_SOURCES,
        Failure.SOURCE_LIMIT,
        Failure.WARMUP_QUOTA,
        Failure.BUDGET,
    }
)


async def open_outbound(
    egress: Egress,
    host: str | IPAddress,
    port: int,
    *,
    pool: str | None = None,
    source: Source | None = None,
) -> Dialed:
    """Dial ``host:port`` from ``source``, or from ``pool``'s next source; see the module doc.

    Raises :class:`EgressFailure`.
    """
    plan = outbound_plan(egress, host, port, pool=pool, source=source)
    return connected(plan, await connect_within(plan, hold_slot=True))


def outbound_plan(
    egress: Egress,
    host: str | IPAddress,
    port: int,
    *,
    pool: str | None = None,
    source: Source | None = None,
) -> Plan:
    """The plan :func:`open_outbound` runs, for a door that runs it itself (under a cancel
    scope it already has, :func:`egressd.net.egress.execute`, then :func:`connected`)."""
    budget = egress.budget_for(host)
    return Plan(
        egress,
        pool=pool,
        source=source,
        host=host,
        port=port,
        access=egress.config.access,
        budget=budget,
        provider=budget.provider() if isinstance(budget, ShapedDestination) else "other",
    )


def connected(plan: Plan, dialed: Dialed) -> Dialed:
    """``dialed``, made by ``plan``: its warm-up message counted as ``connected``, and the
    source's connection slot (held since the dial: ``execute(..., hold_slot=True)``) and
    the plan's budget lease given back when it closes."""
    quota = plan.take_quota()
    if quota is not None:
        quota.settle("connected")  # the connection is what these doors count
    dialed.release = plan.release_connection
    return dialed


def note_destination(record: SessionRecord, host: str | IPAddress, port: int) -> None:
    record.destination = format_hostport(host, port)


def note_dialed(record: SessionRecord, dialed: Dialed, host: str | IPAddress) -> None:
    """Source, local address and destination (``name:port (ip)`` when a name was asked)."""
    record.source = dialed.source.name
    record.local_address = format_hostport(*dialed.local_address)
    ip, port = dialed.remote_address
    if isinstance(host, str) and host != str(ip):
        record.destination = f"{format_hostport(host, port)} ({ip})"
    elif dialed.via == "direct" and dialed.stream.peer is not None:
        # the text the dialer connected to (str() of an IP address is four calls)
        record.destination = format_hostport(dialed.stream.peer[0], port)
    else:
        record.destination = format_hostport(ip, port)


def note_refusal(record: SessionRecord, exc: EgressFailure) -> tuple[str, str]:
    """Fill the record's outcome and detail for a failed :func:`open_outbound`."""
    if exc.kind is Failure.DENIED:
        record.outcome = "denied"
    elif exc.kind in _NO_SOURCE_KINDS:
        record.outcome = "refused"
    else:
        record.outcome = "dial_failed"
        record.source = exc.source
    record.detail = str(exc)
    return record.outcome, record.detail


async def relay_session(
    runtime: Runtime,
    record: SessionRecord,
    client: trio.abc.HalfCloseableStream,
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
    set_keepalive(dialed.stream.socket)  # the client's socket has it from its listener
    try:  # the source's connection slot is the dial's, held until dialed.close()
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


def client_host(client: str) -> str:
    """The address part of a session record's ``client`` (``host:port``, ``[v6]:port``)."""
    if client.startswith("["):
        return client[1 : client.find("]")]
    return client.rpartition(":")[0] if client.count(":") == 1 else client
