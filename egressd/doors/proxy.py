"""The PROXY-protocol front door: a drop-in for KumoMTA's ``ha_proxy_server``.

Theory of operation
-------------------
KumoMTA (``ha_proxy_server`` + ``ha_proxy_source_address``) connects and sends, in one
write, a PROXY v2 header whose src is the source address it wants and whose dst is the
destination; every byte after it belongs to the destination. A transparent HAProxy needs
``usesrc clientip`` and root's IP_TRANSPARENT to honour that; this door needs neither: the
header's src only *names* a configured source (:meth:`Config.source_for_address`: its
``source_address`` or its proxy's address), and egressd dials from that source with
everything it defines (proxy, ``remote_port``). v1 headers are accepted as well, as
HAProxy's ``accept-proxy`` does.

The header is read with :class:`~egressd.proto.proxy.ProxyHeaderReader`, never asking for
more than its ``max_read()``, so no byte past the header is consumed; bytes the client sends right
after it (a pipelined EHLO) reach the destination intact. Reading the header is bounded
by ``[limits] handshake_timeout``.

The protocol has no way to answer, so every refusal is a close and the session's log
line says why: a malformed header (``protocol_error``), a LOCAL header (a health check:
``closed``), a header without addresses, or a src that is no configured source's address,
or a destination the ``[access]`` rules deny (``denied``), a suspended source (an
operator's or the health checks': ``refused``, never dialed), no source available or a
shaping budget used up (``refused``), a failed dial (``dial_failed``). Once the header
named a destination, and its port is an SMTP port where the server speaks first in plain
text (25, 587, 2525), every one of these refusals also writes ``421 4.4.0 egressd:
<reason>`` before closing: the MTA reads it as the remote's greeting, so the reason
reaches its log instead of looking like a timeout or a dropped connection. Other ports
(465 expects TLS from the first byte) get the close alone. Overload
(``max_connections``) closes at once, like HAProxy's own refusal: the client sees EOF, as
it would from HAProxy when the outbound connection fails.
"""

from __future__ import annotations

import contextlib

import trio

from egressd.config import Listener
from egressd.doors.common import (
    note_destination,
    note_dialed,
    note_refusal,
    open_outbound,
    relay_session,
)
from egressd.egress import EgressFailure
from egressd.net.connection import Connection
from egressd.proto import NEED_DATA, proxy
from egressd.runtime import Runtime, SessionRecord


class ProxyDoor:
    """The PROXY-protocol front door; see the module docstring."""

    name = "proxy"

    async def handle(
        self,
        stream: Connection,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> None:
        egress = runtime.egress  # this session's generation, taken once
        limits = egress.config.limits
        header = await _header_or_none(stream, record, limits.handshake_timeout)
        if header is None:
            return
        if not _usable(header, record):
            return
        assert header.src_ip is not None and header.dst_ip is not None
        assert header.dst_port is not None
        record.pool = None  # the header names the exact source
        note_destination(record, header.dst_ip, header.dst_port)
        source = egress.config.source_for_address(header.src_ip)
        if source is None:
            record.outcome = "denied"
            record.detail = f"PROXY header src {header.src_ip} is no configured source's address"
            await _say_why(stream, record, header.dst_port)
            return
        record.source = source.name
        if egress.health.is_suspended(source.name):
            record.outcome = "refused"
            record.detail = (
                f"source {source.name!r} (PROXY header src {header.src_ip}) is suspended"
            )
            await _say_why(stream, record, header.dst_port)
            return
        try:
            dialed = await open_outbound(egress, header.dst_ip, header.dst_port, source=source)
        except EgressFailure as exc:
            note_refusal(record, exc)
            await _say_why(stream, record, header.dst_port)
            return
        note_dialed(record, dialed, header.dst_ip)
        try:
            await relay_session(runtime, record, stream, dialed, idle_timeout=limits.idle_timeout)
        finally:
            dialed.close()  # the socket and the shaping lease; no checkpoint

    async def refuse(
        self, stream: Connection, runtime: Runtime, listener: Listener, reason: str
    ) -> None:
        """Nothing can be said in the PROXY protocol: the daemon closes the connection."""


# Ports where the SMTP server speaks first, in plain text (465 is TLS from the first byte).
_SMTP_PORTS = frozenset({25, 587, 2525})
_MAX_REASON = 400  # a reply line stays well under RFC 5321's 512 octets


async def _say_why(stream: Connection, record: SessionRecord, port: int) -> None:
    """For an SMTP port, ``421 4.4.0 egressd: <reason>`` so the MTA logs why; else nothing."""
    if port not in _SMTP_PORTS:
        return
    reason = " ".join((record.detail or record.outcome).split())[:_MAX_REASON]
    line = f"421 4.4.0 egressd: {reason}\r\n".encode("ascii", "replace")
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(line)  # a client already gone has only the log line


async def _header_or_none(
    stream: Connection, record: SessionRecord, timeout: float
) -> proxy.ProxyHeader | None:
    """The header, or None with the record's outcome set (timeout, EOF, malformed)."""
    reader = proxy.ProxyHeaderReader()
    try:
        with trio.fail_after(timeout):
            return await read_header(stream, reader)
    except trio.TooSlowError:
        record.outcome = "timeout"
        record.detail = f"no complete PROXY header within {timeout:g}s"
    except proxy.ProxyHeaderError as exc:
        record.outcome = "closed" if reader.eof else "protocol_error"
        record.detail = str(exc)
    return None


async def read_header(
    stream: trio.abc.ReceiveStream, reader: proxy.ProxyHeaderReader
) -> proxy.ProxyHeader:
    """Read one PROXY v1/v2 header and not a byte more (the reader's ``max_read``).

    A reset counts as EOF: the reader then raises ProxyHeaderError, with ``eof`` set.
    """
    while (header := reader.next_event()) is NEED_DATA:
        try:
            data = await stream.receive_some(reader.max_read())
        except trio.BrokenResourceError:
            data = b""
        reader.receive_data(bytes(data))
    assert not reader.trailing_data  # max_read never reaches past the header
    return header


def _usable(header: proxy.ProxyHeader, record: SessionRecord) -> bool:
    """True when the header has the src and dst this door needs; else fill the record."""
    if header.local:
        record.outcome = "closed"
        record.detail = "PROXY v2 LOCAL header (a health check): nothing to relay"
        return False
    if not header.has_addresses or header.dst_ip is None or header.dst_port is None:
        record.outcome = "denied"
        record.detail = f"PROXY v{header.version} header carries no addresses to choose from"
        return False
    return True
