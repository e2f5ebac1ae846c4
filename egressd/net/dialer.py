"""Outbound connections from a chosen source: directly, through HAProxy, or through SOCKS5.

Theory of operation
-------------------
A :class:`~egressd.config.Source` says how its connections leave (``source.hop``):

``direct``
    A TCP socket bound to ``source_address`` (when set) connects to the destination. The
    bind sets ``IP_BIND_ADDRESS_NO_PORT`` first, so the kernel picks the local port at
    ``connect()`` time, when it knows the whole 4-tuple: one source address can then hold
    far more connections than the ephemeral port range (trio's ``open_tcp_stream`` does the
    same; its comments explain why). Without ``source_address`` the kernel chooses.

``haproxy``
    A socket (bound to ``source_address`` when set) connects to ``ha_proxy_server`` and
    sends, in one write, a PROXY protocol v2 header (command PROXY, TCP, no TLVs) with
    src = ``ha_proxy_source_address`` port 0 and dst = the destination address and port.
    A transparent HAProxy (``source 0.0.0.0 usesrc clientip``) then connects from src to
    dst, and every byte after the header belongs to the destination. HAProxy cannot report
    a failed outbound connection back: the caller sees EOF or a reset on its first read.

``socks5``
    A socket (bound to ``source_address`` when set) connects to ``socks5_proxy_server`` and
    runs RFC 1928 (with RFC 1929 username/password when both are configured) through the
    sans-IO :class:`~egressd.proto.socks5.Socks5Client`. With
    ``socks5_proxy_source_address`` it follows KumoMTA's convention (``BIND source:0``,
    then ``CONNECT destination`` on the same connection); without it, a plain CONNECT and
    the proxy's own configuration picks the address (Dante's ``external:``). The CONNECT
    reply's BND.ADDR/BND.PORT is the local address reported.

Proxy servers given by name are resolved at connect time and each address is tried in
turn. Destination names are resolved with ``getaddrinfo`` (the SMTP front door resolves MX
records itself and passes IP literals) and only addresses of the family the source's egress
address uses (``source.egress_version``) are tried, sequentially, in the resolver's order.
The port is ``remote_port`` if the source sets one, else the caller's, else 25.

Timeouts belong to the caller: :func:`dial` has none; :func:`dial_within` applies one
deadline to resolving, connecting and the hop's handshake and turns ``trio.TooSlowError``
into a :class:`DialError` of kind ``timeout``.

Every failure is a :class:`DialError` whose ``kind`` says whose fault it is (the source's
plumbing, its hop, or the destination); nothing has been sent to the destination when one
is raised, so the caller may retry on another source. Every socket opened here is closed
on every failure path, cancellation included.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import ipaddress
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import trio

from egressd.config import Endpoint, HopKind, IPAddress, Source, format_hostport
from egressd.net.connection import Connection
from egressd.net.oserrors import cause_text, errno_text, host_port
from egressd.proto.proxy_header import build_v2
from egressd.proto.socks5 import Reply, Socks5Client, Socks5ClientError

__all__ = [
    "DEFAULT_PORT",
    "DialError",
    "DialFailure",
    "DialStage",
    "Dialed",
    "destination_port",
    "dial",
    "dial_within",
    "resolve_destination",
]

DEFAULT_PORT = 25
# Linux's value; the socket module names it only on Linux builds (and typeshed not at all).
_IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_RECEIVE_SIZE = 4096

DialStage = Literal["resolve", "hop_connect", "hop_handshake", "connect"]
"""Where a dial was: resolving the destination, connecting to the hop (bind included),
talking to the hop before asking for the destination, or connecting to the destination
(directly, or waiting for the SOCKS5 CONNECT reply)."""

_HOP_STAGES: frozenset[str] = frozenset({"hop_connect", "hop_handshake"})


class DialFailure(str, enum.Enum):
    """What went wrong; compares equal to its value (``kind == "unplumbed"``)."""

    UNPLUMBED = "unplumbed"
    """The source address is not configured on this host (EADDRNOTAVAIL at bind)."""
    HOP_UNREACHABLE = "hop_unreachable"
    """The HAProxy/SOCKS5 server could not be resolved or connected to."""
    HOP_REFUSED = "hop_refused"
    """The SOCKS5 server refused (see ``socks_reply``) or broke off the handshake."""
    REFUSED = "refused"
    """The destination refused the connection (RST, or SOCKS5 reply 05)."""
    UNREACHABLE = "unreachable"
    """No route to the destination's host or network (or SOCKS5 reply 03/04)."""
    TIMEOUT = "timeout"
    """The deadline expired (or the kernel's connect timed out, or SOCKS5 reply 06)."""
    NO_ADDRESS = "no_address"
    """The destination has no address of the family the source's egress uses."""
    RESOLVE = "resolve"
    """The destination's name could not be resolved."""
    LOCAL = "local"
    """A local resource ran out (file descriptors, memory, ports towards one peer)."""

    def __str__(self) -> str:
        return self.value


_SOURCE_KINDS = frozenset(
    {DialFailure.UNPLUMBED, DialFailure.HOP_UNREACHABLE, DialFailure.HOP_REFUSED}
)
_DESTINATION_KINDS = frozenset(
    {
        DialFailure.REFUSED,
        DialFailure.UNREACHABLE,
        DialFailure.TIMEOUT,
        DialFailure.NO_ADDRESS,
        DialFailure.RESOLVE,
    }
)
_LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
_NET_UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN})


class DialError(Exception):
    """A dial failed; ``str(error)`` names the source, the address and the errno text.

    Attributes: ``kind`` (:class:`DialFailure`), ``stage`` (:data:`DialStage`),
    ``source_name``, ``address`` (the ``(ip, port)`` being tried, or None), ``errno``
    (the OS error number, when there was one) and ``socks_reply`` (the reply code the
    SOCKS5 hop sent, when it sent one).
    """

    nothing_sent: ClassVar[bool] = True
    """Always true: no byte reached the destination, so retrying on another source is safe."""

    def __init__(
        self,
        kind: DialFailure,
        message: str,
        *,
        source_name: str,
        stage: DialStage,
        address: tuple[str, int] | None = None,
        errno: int | None = None,
        socks_reply: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.source_name = source_name
        self.stage: DialStage = stage
        self.address = address
        self.errno = errno
        self.socks_reply = socks_reply

    @property
    def hop_fault(self) -> bool:
        """The hop (HAProxy or SOCKS5 server) failed: unreachable, refused or silent."""
        if self.kind in (DialFailure.HOP_UNREACHABLE, DialFailure.HOP_REFUSED):
            return True
        return self.kind is DialFailure.TIMEOUT and self.stage in _HOP_STAGES

    @property
    def source_fault(self) -> bool:
        """The source cannot work right now (unplumbed address or failing hop).

        Source-health logic counts these against the source; the other kinds say nothing
        about the source (a destination's or a local problem).
        """
        return self.kind is DialFailure.UNPLUMBED or self.hop_fault

    @property
    def destination_fault(self) -> bool:
        """The destination (or its name) failed; another source would likely fail too."""
        return self.kind in _DESTINATION_KINDS and not self.hop_fault

    @property
    def reply_code(self) -> int:
        """The RFC 1928 reply a SOCKS5 front door should send for this failure.

        refused -> 05, host unreachable -> 04, network unreachable -> 03, timeout -> 06,
        anything else -> 01. A reply code 03-06 that the SOCKS5 hop sent is passed on.
        """
        if self.kind is DialFailure.REFUSED:
            return int(Reply.CONNECTION_REFUSED)
        if self.kind is DialFailure.UNREACHABLE:
            if self.socks_reply is not None:
                return self.socks_reply
            if self.errno in _NET_UNREACHABLE_ERRNOS:
                return int(Reply.NETWORK_UNREACHABLE)
            return int(Reply.HOST_UNREACHABLE)
        if self.kind is DialFailure.TIMEOUT:
            return int(Reply.TTL_EXPIRED)
        return int(Reply.GENERAL_FAILURE)


@dataclass(frozen=True)
class Dialed:
    """A connection to the destination, and the facts about how it was made.

    ``stream`` is the raw socket stream (its fd may be spliced). ``local_address`` is the
    address the destination sees: the socket's own for direct, ``(ha_proxy_source_address,
    0)`` for HAProxy (HAProxy picks the port), the CONNECT reply's BND.ADDR for SOCKS5.
    ``initial_data`` holds bytes the destination already sent that arrived with the hop's
    last reply; deliver them before anything read from ``stream``.
    """

    stream: Connection
    source: Source
    via: HopKind
    local_address: tuple[str, int]
    remote_address: tuple[str, int]
    hop_address: tuple[str, int] | None = None
    initial_data: bytes = b""


def destination_port(source: Source, port: int | None) -> int:
    """``remote_port`` if the source sets it, else the caller's port, else 25."""
    if source.remote_port is not None:
        return source.remote_port
    if port is not None:
        return port
    return DEFAULT_PORT


async def dial(source: Source, host: str | IPAddress, port: int | None = None) -> Dialed:
    """Connect to ``host`` (a name or an IP address) from ``source``; see the module doc.

    Raises :class:`DialError`. Has no timeout: wrap it (or use :func:`dial_within`).
    """
    return await _Dial(source).run(host, port)


async def dial_within(
    seconds: float, source: Source, host: str | IPAddress, port: int | None = None
) -> Dialed:
    """:func:`dial` under one deadline; expiry raises :class:`DialError` of kind timeout."""
    attempt = _Dial(source, deadline=trio.current_time() + seconds)
    try:
        return await attempt.run(host, port)
    except trio.TooSlowError as exc:
        where = _STAGE_TEXT[attempt.stage]
        target = format_hostport(*attempt.address) if attempt.address else str(host)
        raise DialError(
            DialFailure.TIMEOUT,
            f"{attempt.who}: no result within {seconds:g}s while {where} {target}",
            source_name=source.name,
            stage=attempt.stage,
            address=attempt.address,
        ) from exc


_STAGE_TEXT: dict[str, str] = {
    "resolve": "resolving",
    "hop_connect": "connecting to the hop at",
    "hop_handshake": "in the handshake with the hop at",
    "connect": "connecting to",
}


async def resolve_destination(
    host: str | IPAddress, port: int, version: int | None, *, source_name: str = "-"
) -> list[IPAddress]:
    """The addresses of ``host`` of IP ``version`` (any when None), in the resolver's order.

    Raises :class:`DialError` of kind ``resolve`` (the name does not resolve) or
    ``no_address`` (it resolves, but to no address of that version).
    """
    literal = _as_ip(host)
    if literal is not None:
        candidates = [literal]
    else:
        try:
            infos = await trio.socket.getaddrinfo(str(host), port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise DialError(
                DialFailure.RESOLVE,
                f"source {source_name!r}: cannot resolve {host}: {exc.strerror}",
                source_name=source_name,
                stage="resolve",
            ) from exc
        candidates = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
    matching = [a for a in candidates if version is None or a.version == version]
    if not matching:
        found = ", ".join(str(a) for a in candidates) or "nothing"
        raise DialError(
            DialFailure.NO_ADDRESS,
            f"source {source_name!r} egresses over IPv{version} but {host} has no IPv{version}"
            f" address (found {found})",
            source_name=source_name,
            stage="resolve",
        )
    return matching


# --------------------------------------------------------------------------- one dial


class _Dial:
    """One dial from one source; remembers how far it got, for the timeout message."""

    def __init__(self, source: Source, deadline: float = math.inf) -> None:
        self.source = source
        self.deadline = deadline  # only the waits are bounded: see _connect
        self.stage: DialStage = "resolve"
        self.address: tuple[str, int] | None = None
        bound = f" from {source.source_address}" if source.source_address is not None else ""
        self.who = f"source {source.name!r}{bound}"

    async def run(self, host: str | IPAddress, port: int | None) -> Dialed:
        source = self.source
        port = destination_port(source, port)
        self.stage, self.address = "resolve", None
        addresses = await self._resolve(host, port)
        attempt: Callable[[IPAddress, int], Awaitable[Dialed]]
        if source.hop == "haproxy":
            attempt = self._via_haproxy
        elif source.hop == "socks5":
            attempt = self._via_socks5
        else:
            attempt = self._direct
        failures: list[DialError] = []
        for address in addresses:
            try:
                return await attempt(address, port)
            except DialError as exc:
                if not exc.destination_fault:
                    raise  # the source, its hop or this host: another address won't help
                failures.append(exc)
        last = failures[-1]
        if len(failures) == 1:
            raise last
        raise DialError(
            last.kind,
            f"all {len(failures)} addresses of {host} failed: "
            + "; ".join(f.message for f in failures),
            source_name=source.name,
            stage=last.stage,
            address=last.address,
            errno=last.errno,
            socks_reply=last.socks_reply,
        ) from last

    async def _resolve(self, host: str | IPAddress, port: int) -> list[IPAddress]:
        version = self.source.egress_version
        if _as_ip(host) is not None:  # a literal: nothing to wait for
            return await resolve_destination(host, port, version, source_name=self.source.name)
        with trio.fail_at(self.deadline):
            return await resolve_destination(host, port, version, source_name=self.source.name)

    # ----------------------------------------------------------------------- the three paths

    async def _direct(self, address: IPAddress, port: int) -> Dialed:
        target = (str(address), port)
        sock = self._socket(address.version, target)
        try:
            self.stage, self.address = "connect", target
            if self.source.source_address is not None:
                self._bind(sock, self.source.source_address, target)
            try:
                await _connect(sock, target, self.deadline)
            except OSError as exc:
                raise self._connect_error(exc, target) from exc
            local_address = host_port(sock.getsockname())
            return Dialed(
                stream=Connection(sock, target),
                source=self.source,
                via="direct",
                local_address=local_address,
                remote_address=target,
            )
        except BaseException:
            _close(sock)
            raise

    async def _via_haproxy(self, address: IPAddress, port: int) -> Dialed:
        src = self.source.ha_proxy_source_address
        hop = self.source.ha_proxy_server
        if src is None or hop is None:
            raise ValueError(f"source {self.source.name!r}: haproxy hop needs both keys set")
        target = (str(address), port)
        with trio.fail_at(self.deadline):
            sock, hop_address = await self._open_hop(hop)
        try:
            stream = Connection(sock, hop_address)
            self.stage = "hop_handshake"
            header = build_v2(src, 0, address, port)
            await self._send(stream, header, hop_address, "sending the PROXY header")
            return Dialed(
                stream=stream,
                source=self.source,
                via="haproxy",
                local_address=(str(src), 0),
                remote_address=target,
                hop_address=hop_address,
            )
        except BaseException:
            _close(sock)
            raise

    async def _via_socks5(self, address: IPAddress, port: int) -> Dialed:
        source = self.source
        hop = source.socks5_proxy_server
        if hop is None:  # pragma: no cover - source.hop says it is set
            raise ValueError(f"source {source.name!r}: socks5 hop without a server")
        target = (str(address), port)
        with trio.fail_at(self.deadline):
            sock, hop_address = await self._open_hop(hop)
        try:
            stream = Connection(sock, hop_address)
            client = Socks5Client(
                str(address),
                port,
                username=source.socks5_proxy_username,
                password=source.socks5_proxy_password,
                bind_address=source.socks5_proxy_source_address,
            )
            self.stage = "hop_handshake"
            await self._send(stream, client.initial_bytes(), hop_address, "sending the greeting")
            while not client.done:
                during = f"awaiting the SOCKS5 {client.stage} reply"
                data = await self._receive(stream, hop_address, during)  # b"": EOF, an error
                try:
                    reply = client.receive_data(data)
                except Socks5ClientError as exc:
                    raise self._socks_error(exc, hop_address, target) from exc
                if reply:
                    await self._send(stream, reply, hop_address, f"answering {client.stage}")
                if client.stage == "connect":  # CONNECT sent: the proxy reaches out now
                    self.stage, self.address = "connect", target
            bound = client.bound_address or ("0.0.0.0", 0)
            return Dialed(
                stream=stream,
                source=source,
                via="socks5",
                local_address=bound,
                remote_address=target,
                hop_address=hop_address,
                initial_data=client.trailing,
            )
        except BaseException:
            _close(sock)
            raise

    # ----------------------------------------------------------------------- the hop

    async def _open_hop(self, hop: Endpoint) -> tuple[socket.socket, tuple[str, int]]:
        """A socket connected to the hop; every address of a hop name is tried in turn."""
        self.stage, self.address = "hop_connect", (hop.host, hop.port)
        bind = self.source.source_address
        addresses = await self._resolve_hop(hop, bind.version if bind is not None else None)
        failures: list[str] = []
        last: OSError | None = None
        for address in addresses:
            target = (str(address), hop.port)
            self.address = target
            sock = self._socket(address.version, target)
            try:
                if bind is not None:
                    self._bind(sock, bind, target)
                await _connect(sock, target, self.deadline)
            except OSError as exc:
                _close(sock)
                if exc.errno in _LOCAL_ERRNOS:
                    raise self._local_error(exc, target) from exc
                failures.append(f"{format_hostport(*target)}: {errno_text(exc)}")
                last = exc
                continue
            except BaseException:
                _close(sock)
                raise
            return sock, target
        raise self._hop_error(
            DialFailure.HOP_UNREACHABLE,
            f"cannot connect to {self.source.hop} server {hop}: " + "; ".join(failures),
            self.address or (hop.host, hop.port),
            errno=last.errno if last is not None else None,
        )

    async def _resolve_hop(self, hop: Endpoint, version: int | None) -> list[IPAddress]:
        literal = hop.ip
        if literal is not None:
            candidates = [literal]
        else:
            try:
                infos = await trio.socket.getaddrinfo(hop.host, hop.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise self._hop_error(
                    DialFailure.HOP_UNREACHABLE,
                    f"cannot resolve {self.source.hop} server {hop}: {exc.strerror}",
                    (hop.host, hop.port),
                ) from exc
            candidates = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
        matching = [a for a in candidates if version is None or a.version == version]
        if not matching:
            raise self._hop_error(
                DialFailure.HOP_UNREACHABLE,
                f"{self.source.hop} server {hop} has no IPv{version} address to reach from"
                f" {self.source.source_address}",
                (hop.host, hop.port),
            )
        return matching

    async def _send(
        self, stream: Connection, data: bytes, hop: tuple[str, int], during: str
    ) -> None:
        try:
            with trio.fail_at(self.deadline):
                await stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._broken(exc, hop, during) from exc

    async def _receive(self, stream: Connection, hop: tuple[str, int], during: str) -> bytes:
        try:
            with trio.fail_at(self.deadline):
                return await stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._broken(exc, hop, during) from exc

    def _broken(self, exc: BaseException, hop: tuple[str, int], during: str) -> DialError:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        return self._hop_error(
            DialFailure.HOP_REFUSED,
            f"{self.source.hop} server {format_hostport(*hop)} broke the connection while"
            f" {during}: {cause_text(exc)}",
            hop,
            errno=cause.errno if isinstance(cause, OSError) else None,
        )

    # ----------------------------------------------------------------------- sockets

    # Setting up a socket (create, bind an IP literal, start the connect) never blocks, so
    # it is done on a plain non-blocking socket.socket: trio's async bind() and connect()
    # would run each IP literal through getaddrinfo and add a trip through the scheduler.
    # Once connected, the socket becomes a Connection.

    def _socket(self, version: int, target: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise self._local_error(exc, target) from exc
        sock.setblocking(False)
        return sock

    def _bind(self, sock: socket.socket, address: IPAddress, target: tuple[str, int]) -> None:
        """Bind the source address with IP_BIND_ADDRESS_NO_PORT (the port comes at connect)."""
        with contextlib.suppress(OSError):  # pragma: no branch - Linux >= 4.2 has it
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            kind = DialFailure.UNPLUMBED if exc.errno == errno.EADDRNOTAVAIL else DialFailure.LOCAL
            raise DialError(
                kind,
                f"source {self.source.name!r}: cannot bind {address} (to reach"
                f" {format_hostport(*target)}): {errno_text(exc)}"
                + (" - the address is not configured on this host" if kind == "unplumbed" else ""),
                source_name=self.source.name,
                stage=self.stage,
                address=target,
                errno=exc.errno,
            ) from exc

    # ----------------------------------------------------------------------- errors

    def _connect_error(self, exc: OSError, target: tuple[str, int]) -> DialError:
        code = exc.errno
        if code in _LOCAL_ERRNOS:
            return self._local_error(exc, target)
        if code == errno.ECONNREFUSED:
            kind = DialFailure.REFUSED
        elif code == errno.ETIMEDOUT:
            kind = DialFailure.TIMEOUT
        else:
            kind = DialFailure.UNREACHABLE
        return DialError(
            kind,
            f"{self.who}: connecting to {format_hostport(*target)} failed: {errno_text(exc)}",
            source_name=self.source.name,
            stage="connect",
            address=target,
            errno=code,
        )

    def _local_error(self, exc: OSError, target: tuple[str, int]) -> DialError:
        return DialError(
            DialFailure.LOCAL,
            f"{self.who}: no local resources to reach {format_hostport(*target)}:"
            f" {errno_text(exc)}",
            source_name=self.source.name,
            stage=self.stage,
            address=target,
            errno=exc.errno,
        )

    def _hop_error(
        self,
        kind: DialFailure,
        text: str,
        hop: tuple[str, int],
        *,
        errno: int | None = None,
        socks_reply: int | None = None,
    ) -> DialError:
        return DialError(
            kind,
            f"{self.who}: {text}",
            source_name=self.source.name,
            stage=self.stage,
            address=hop,
            errno=errno,
            socks_reply=socks_reply,
        )

    def _socks_error(
        self, exc: Socks5ClientError, hop: tuple[str, int], target: tuple[str, int]
    ) -> DialError:
        """A SOCKS5 refusal: 03-06 to a CONNECT describe the destination, the rest the hop."""
        reply = int(exc.reply) if exc.reply is not None else None
        destination_kinds = {
            Reply.NETWORK_UNREACHABLE: DialFailure.UNREACHABLE,
            Reply.HOST_UNREACHABLE: DialFailure.UNREACHABLE,
            Reply.CONNECTION_REFUSED: DialFailure.REFUSED,
            Reply.TTL_EXPIRED: DialFailure.TIMEOUT,
        }
        if exc.stage == "connect" and reply in destination_kinds:
            return DialError(
                destination_kinds[Reply(reply)],
                f"{self.who}: SOCKS5 server {format_hostport(*hop)} could not reach"
                f" {format_hostport(*target)}: {exc}",
                source_name=self.source.name,
                stage="connect",
                address=target,
                socks_reply=reply,
            )
        return self._hop_error(
            DialFailure.HOP_REFUSED,
            f"SOCKS5 server {format_hostport(*hop)} failed at {exc.stage} for"
            f" {format_hostport(*target)}: {exc}",
            hop,
            socks_reply=reply,
        )


# --------------------------------------------------------------------------- helpers


async def _connect(sock: socket.socket, target: tuple[str, int], deadline: float) -> None:
    """Connect the non-blocking ``sock``; raises OSError as ``socket.connect`` would, and
    trio.TooSlowError when it must wait past ``deadline``.

    A connection to this host (loopback, a local hop) is complete when connect() returns,
    even when it says EINPROGRESS; then there is nothing to wait for, and no timeout scope
    is set up. Cancelled while waiting, the caller closes the socket.
    """
    try:
        sock.connect(target)
    except BlockingIOError:
        if _is_connected(sock):
            return
        with trio.fail_at(deadline):
            await trio.lowlevel.wait_writable(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            raise OSError(code, f"Error connecting to {target!r}: {os.strerror(code)}") from None


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _close(sock: socket.socket) -> None:
    """Close a socket trio may have waited on (trio must hear of it first)."""
    trio.lowlevel.notify_closing(sock)
    sock.close()


def _as_ip(host: str | IPAddress) -> IPAddress | None:
    if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return host
    return _parse_literal(host)


@functools.lru_cache(maxsize=1024)
def _parse_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address, None for a name. Cached: the doors dial IP literals
    (names are resolved before the dial), and parsing one costs more than the lookup."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _unique(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    seen: list[IPAddress] = []
    for address in addresses:
        if address not in seen:
            seen.append(address)
    return seen
