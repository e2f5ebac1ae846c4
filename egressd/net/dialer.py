"""One connection to one address from one source: directly, through HAProxy, or SOCKS5.

Theory of operation
-------------------
The outbound plan (:mod:`egressd.egress.plan`) decides which source and which address;
:func:`connect` makes one :class:`~egressd.egress.plan.Attempt` of it. A
:class:`~egressd.config.Source` says how its connections leave (``source.hop``):

``direct``
    A TCP socket bound to ``source_address`` (when set) connects to the destination. The
    bind sets ``IP_BIND_ADDRESS_NO_PORT`` first, so the kernel picks the local port at
    ``connect()`` time, when it knows the whole 4-tuple: one source address can then hold
    far more connections than the ephemeral port range (trio's ``open_tcp_stream`` does the
    same; its comments explain why). Without ``source_address`` the kernel chooses.

``haproxy``
    A socket (bound to ``source_address`` when set) connects to the proxy
    ``ha_proxy_server`` and sends, in one write, a PROXY protocol v2 header (command PROXY,
    TCP, no TLVs) with src = ``ha_proxy_source_address`` port 0 and dst = the destination
    address and port. A transparent HAProxy (``source 0.0.0.0 usesrc clientip``) then
    connects from src to dst, and every byte after the header belongs to the destination.
    HAProxy cannot report a failed outbound connection back: the caller sees EOF or a
    reset on its first read.

``socks5``
    A socket (bound to ``source_address`` when set) connects to the proxy
    ``socks5_proxy_server`` and runs RFC 1928 (with RFC 1929 username/password when both
    are configured) through the sans-IO :class:`~egressd.proto.socks5.Socks5Handshake`. With
    ``socks5_proxy_source_address`` it follows KumoMTA's convention (``BIND source:0``,
    then ``CONNECT destination`` on the same connection); without it, a plain CONNECT and
    the proxy's own configuration picks the address (Dante's ``external:``). The CONNECT
    reply's BND.ADDR/BND.PORT is the local address reported.

A proxy given by name is resolved at connect time and each of its addresses is tried in
turn (``getaddrinfo``). :func:`resolve_name` resolves a destination name for the plan
through ``[dns]``, as the SMTP door resolves its next hop.

Nothing here has a timeout: the caller applies the plan's one deadline around the whole
plan (:mod:`egressd.net.egress`), and the :class:`~egressd.egress.plan.Progress` this
module moves along tells it which stage the deadline expired in.

Every failure is an :class:`~egressd.egress.failures.EgressFailure` whose kind says whose
fault it is (the source's plumbing, its proxy, the destination, or this host); nothing has
been sent to the destination when one is raised. Every socket opened here is closed on
every failure path, cancellation included.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from egressd.config import DnsSettings, Endpoint, HopKind, IPAddress, Source, format_hostport
from egressd.egress.failures import EgressFailure, Failure, Stage
from egressd.egress.plan import Attempt, Destination, Progress
from egressd.net.connection import Connection, close_socket, wait_writable
from egressd.net.mx import lookup_host
from egressd.net.oserrors import cause_text, errno_text
from egressd.proto import socks5
from egressd.proto.proxy import build_v2

__all__ = ["Dialed", "connect", "resolve_name"]

# Linux's value; the socket module names it only on Linux builds (and typeshed not at all).
_IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_RECEIVE_SIZE = 4096
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK

_LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
_NET_UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN})

# What a SOCKS5 proxy's refusal of CONNECT says about the destination (RFC 1928 6).
_SOCKS_DESTINATION_KINDS = {
    socks5.ReplyCode.NETWORK_UNREACHABLE: Failure.NETWORK_UNREACHABLE,
    socks5.ReplyCode.HOST_UNREACHABLE: Failure.HOST_UNREACHABLE,
    socks5.ReplyCode.CONNECTION_REFUSED: Failure.REFUSED,
    socks5.ReplyCode.TTL_EXPIRED: Failure.TIMEOUT,
}


def _nothing() -> None:
    pass


@dataclass(slots=True)
class Dialed:
    """A connection to the destination, and the facts about how it was made.

    ``stream`` is the raw socket stream (its fd may be spliced). ``local_address`` is the
    address the destination sees: the socket's own for direct, ``(ha_proxy_source_address,
    0)`` for HAProxy (HAProxy picks the port), the CONNECT reply's BND.ADDR for SOCKS5.
    ``initial_data`` holds bytes the destination already sent that arrived with the
    proxy's last reply; deliver them before anything read from ``stream``.

    Not frozen: whoever ran the plan sets :attr:`release` once the connection is made (a
    frozen dataclass's ``__init__`` and ``dataclasses.replace`` cost a dozen calls more
    per connection); nothing else changes it.
    """

    stream: Connection
    source: Source
    via: HopKind
    local_address: tuple[IPAddress, int]
    remote_address: tuple[IPAddress, int]
    proxy_address: tuple[IPAddress, int] | None = None
    initial_data: bytes = b""
    release: Callable[[], None] = _nothing
    """Gives back what the connection holds beyond its socket (a shaping lease)."""

    def close(self) -> None:
        """Close the socket (synchronous: nothing to flush) and give back what it held.

        :meth:`Connection.close` tells trio only when it must (a task may still wait on
        the socket, or a wait ended without its event), so an owner that knows nobody waits
        (a session whose relay returned) pays nothing for the rule, and one that is wrong
        about it wakes the waiter instead of leaving it parked forever."""
        try:
            self.stream.close()
        finally:
            self.release()


async def connect(attempt: Attempt, progress: Progress) -> Dialed:
    """Connect to ``attempt.address`` from ``attempt.source``; see the module doc.

    Raises :class:`EgressFailure`. Has no timeout: the caller's deadline bounds it. The
    time it took goes to ``progress.connected_in`` (the executor reports it as the dial's
    latency).
    """
    # A duration, in real seconds like the metric it feeds: perf_counter() directly is one
    # C call where trio.current_time() is four Python calls (trio's clock reads it too).
    started = time.perf_counter()
    dialed = await _Dial(attempt.source, progress).run(*attempt.address)
    progress.connected_in = time.perf_counter() - started
    return dialed


async def resolve_name(
    host: str, port: int | None, version: int | None, dns: DnsSettings
) -> list[Destination]:
    """The addresses of the name ``host`` through ``[dns]`` (the resolver and answer cache
    the SMTP door uses, :func:`egressd.net.mx.lookup_host`): A records for an IPv4 source,
    AAAA for an IPv6 one, A then AAAA when the source leaves the family to the kernel.
    Raises :class:`EgressFailure` of kind ``resolve`` (no such name, a lookup that timed
    out or failed, a name the resolver cannot handle) or ``no_address`` (no address of the
    source's family); nothing else, whatever the resolver does.
    """
    try:
        lookup = await lookup_host(host, dns, version)
    except Exception as exc:  # any resolver failure is a failed lookup, never a crash
        raise EgressFailure(
            Failure.RESOLVE,
            f"cannot resolve {host}: {exc or type(exc).__name__}",
            stage=Stage.RESOLVE,
        ) from exc
    if lookup.addresses:
        found = _unique(lookup.addresses)
        return [Destination(address, port, host) for address in found]
    if lookup.temporary is not None:
        raise EgressFailure(
            Failure.RESOLVE, f"cannot resolve {host}: {lookup.temporary}", stage=Stage.RESOLVE
        )
    if lookup.other_version:
        other = 6 if version == 4 else 4
        raise EgressFailure(
            Failure.NO_ADDRESS,
            f"{host} has no IPv{version} address (only IPv{other})",
            stage=Stage.RESOLVE,
        )
    if lookup.no_such_name:
        raise EgressFailure(
            Failure.RESOLVE, f"cannot resolve {host}: {lookup.why}", stage=Stage.RESOLVE
        )
    raise EgressFailure(
        Failure.NO_ADDRESS, f"{host} has no address: {lookup.why}", stage=Stage.RESOLVE
    )


# --------------------------------------------------------------------------- one dial


class _Dial:
    """One dial from one source to one address; moves ``progress`` along."""

    def __init__(self, source: Source, progress: Progress) -> None:
        self.source = source
        self.progress = progress

    async def run(self, address: IPAddress, port: int) -> Dialed:
        hop = self.source.hop  # a property of the source: read once
        if hop == "haproxy":
            return await self._via_haproxy(address, port)
        if hop == "socks5":
            return await self._via_socks5(address, port)
        return await self._direct(address, port)

    @property
    def who(self) -> str:
        """``source 'a' from 192.0.2.1``, for failures (only they need it)."""
        source = self.source
        bound = f" from {source.source_address}" if source.source_address is not None else ""
        return f"source {source.name!r}{bound}"

    @property
    def stage(self) -> Stage:
        return self.progress.stage

    @property
    def proxy_name(self) -> str:
        return "HAProxy" if self.source.hop == "haproxy" else "SOCKS5 proxy"

    # ----------------------------------------------------------------------- the three paths

    async def _direct(self, address: IPAddress, port: int) -> Dialed:
        target = (address, port)
        peer = (str(address), port)
        sock = self._socket(address.version, target)
        try:
            self.progress.at(Stage.CONNECT, target)
            bind = self.source.source_address
            if bind is not None:
                self._bind(sock, bind, target)
            try:
                await _connect(sock, peer)
            except OSError as exc:
                raise self._connect_error(exc, target) from exc
            return Dialed(
                stream=Connection(sock, peer),
                source=self.source,
                via="direct",
                local_address=_sockname(sock, bind),
                remote_address=target,
            )
        except BaseException:
            close_socket(sock)
            raise

    async def _via_haproxy(self, address: IPAddress, port: int) -> Dialed:
        src = self.source.ha_proxy_source_address
        proxy = self.source.ha_proxy_server
        if src is None or proxy is None:
            raise ValueError(f"source {self.source.name!r}: haproxy needs both keys set")
        sock, proxy_address = await self._open_proxy(proxy)
        try:
            stream = Connection(sock, _text(proxy_address))
            self.progress.at(Stage.PROXY_HANDSHAKE)
            header = build_v2(src, 0, address, port)
            await self._send(stream, header, proxy_address, "sending the PROXY header")
            self.progress.at(Stage.CONNECT, (address, port))
            return Dialed(
                stream=stream,
                source=self.source,
                via="haproxy",
                local_address=(src, 0),
                remote_address=(address, port),
                proxy_address=proxy_address,
            )
        except BaseException:
            close_socket(sock)
            raise

    async def _via_socks5(self, address: IPAddress, port: int) -> Dialed:
        source = self.source
        proxy = source.socks5_proxy_server
        if proxy is None:  # pragma: no cover - source.hop says it is set
            raise ValueError(f"source {source.name!r}: socks5 without a server")
        target = (address, port)
        sock, proxy_address = await self._open_proxy(proxy)
        try:
            stream = Connection(sock, _text(proxy_address))
            client = socks5.Socks5Handshake(
                str(address),
                port,
                username=source.socks5_proxy_username,
                password=source.socks5_proxy_password,
                bind_address=source.socks5_proxy_source_address,
            )
            self.progress.at(Stage.PROXY_HANDSHAKE)
            await self._send(stream, client.initial_bytes(), proxy_address, "sending the greeting")
            while not client.done:
                during = f"awaiting the SOCKS5 {client.stage} reply"
                data = await self._receive(stream, proxy_address, during)  # b"": EOF, an error
                try:
                    reply = client.receive_data(data)
                except socks5.HandshakeError as exc:
                    raise self._socks_error(exc, proxy_address, target) from exc
                if reply:
                    await self._send(stream, reply, proxy_address, f"answering {client.stage}")
                if client.stage == "connect":  # CONNECT sent: the proxy reaches out now
                    self.progress.at(Stage.CONNECT, target)
            return Dialed(
                stream=stream,
                source=source,
                via="socks5",
                local_address=_bound_address(client.bound_address, address.version),
                remote_address=target,
                proxy_address=proxy_address,
                initial_data=client.trailing,
            )
        except BaseException:
            close_socket(sock)
            raise

    # ----------------------------------------------------------------------- the proxy

    async def _open_proxy(self, proxy: Endpoint) -> tuple[socket.socket, tuple[IPAddress, int]]:
        """A socket connected to the proxy; every address of a proxy name is tried in turn."""
        self.progress.at(Stage.PROXY_CONNECT)
        bind = self.source.source_address
        addresses = await self._resolve_proxy(proxy, bind.version if bind is not None else None)
        failures: list[str] = []
        last: OSError | None = None
        for address in addresses:
            target = (address, proxy.port)
            self.progress.at(Stage.PROXY_CONNECT, target)
            sock = self._socket(address.version, target)
            try:
                if bind is not None:
                    self._bind(sock, bind, target)
                await _connect(sock, _text(target))
            except OSError as exc:
                close_socket(sock)
                if exc.errno in _LOCAL_ERRNOS:
                    raise self._local_error(exc, target) from exc
                failures.append(f"{format_hostport(*target)}: {errno_text(exc)}")
                last = exc
                continue
            except BaseException:
                close_socket(sock)
                raise
            return sock, target
        raise self._proxy_error(
            Failure.PROXY_UNREACHABLE,
            f"cannot connect to {self.proxy_name} {proxy}: " + "; ".join(failures),
            self.progress.address,
            errno=last.errno if last is not None else None,
        )

    async def _resolve_proxy(self, proxy: Endpoint, version: int | None) -> list[IPAddress]:
        literal = proxy.ip
        if literal is not None:
            candidates = [literal]
        else:
            try:
                infos = await trio.socket.getaddrinfo(
                    proxy.host, proxy.port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                raise self._proxy_error(
                    Failure.PROXY_UNREACHABLE,
                    f"cannot resolve {self.proxy_name} {proxy}: {exc.strerror}",
                    None,
                ) from exc
            candidates = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
        matching = [a for a in candidates if version is None or a.version == version]
        if not matching:
            raise self._proxy_error(
                Failure.PROXY_UNREACHABLE,
                f"{self.proxy_name} {proxy} has no IPv{version} address to reach from"
                f" {self.source.source_address}",
                None,
            )
        return matching

    async def _send(
        self, stream: Connection, data: bytes, proxy: tuple[IPAddress, int], during: str
    ) -> None:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._broken(exc, proxy, during) from exc

    async def _receive(
        self, stream: Connection, proxy: tuple[IPAddress, int], during: str
    ) -> bytes:
        try:
            return await stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._broken(exc, proxy, during) from exc

    def _broken(
        self, exc: BaseException, proxy: tuple[IPAddress, int], during: str
    ) -> EgressFailure:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        return self._proxy_error(
            Failure.PROXY_REFUSED,
            f"{self.proxy_name} {format_hostport(*proxy)} broke the connection while"
            f" {during}: {cause_text(exc)}",
            proxy,
            errno=cause.errno if isinstance(cause, OSError) else None,
        )

    # ----------------------------------------------------------------------- sockets

    # Setting up a socket (create, bind an IP literal, start the connect) never blocks, so
    # it is done on a plain non-blocking socket.socket: trio's async bind() and connect()
    # would run each IP literal through getaddrinfo and add a trip through the scheduler.
    # Once connected, the socket becomes a Connection.

    def _socket(self, version: int, target: tuple[IPAddress, int]) -> socket.socket:
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        try:  # non-blocking from the start: no ioctl(FIONBIO) as setblocking() would make
            return socket.socket(family, _STREAM_NONBLOCK)
        except OSError as exc:
            raise self._local_error(exc, target) from exc

    def _bind(self, sock: socket.socket, address: IPAddress, target: tuple[IPAddress, int]) -> None:
        """Bind the source address with IP_BIND_ADDRESS_NO_PORT (the port comes at connect)."""
        try:  # noqa: SIM105 - not contextlib.suppress: three calls less per dial
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:  # pragma: no cover - Linux >= 4.2 has it
            pass
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            unplumbed = exc.errno == errno.EADDRNOTAVAIL
            raise EgressFailure(
                Failure.UNPLUMBED if unplumbed else Failure.LOCAL,
                f"source {self.source.name!r}: cannot bind {address} (to reach"
                f" {format_hostport(*target)}): {errno_text(exc)}"
                + (" - the address is not configured on this host" if unplumbed else ""),
                source=self.source.name,
                stage=self.stage,
                address=target,
                errno=exc.errno,
            ) from exc

    # ----------------------------------------------------------------------- errors

    def _connect_error(self, exc: OSError, target: tuple[IPAddress, int]) -> EgressFailure:
        code = exc.errno
        if code in _LOCAL_ERRNOS:
            return self._local_error(exc, target)
        if code == errno.ECONNREFUSED:
            kind = Failure.REFUSED
        elif code == errno.ETIMEDOUT:
            kind = Failure.TIMEOUT
        elif code in _NET_UNREACHABLE_ERRNOS:
            kind = Failure.NETWORK_UNREACHABLE
        else:
            kind = Failure.HOST_UNREACHABLE
        return EgressFailure(
            kind,
            f"{self.who}: connecting to {format_hostport(*target)} failed: {errno_text(exc)}",
            source=self.source.name,
            stage=Stage.CONNECT,
            address=target,
            errno=code,
        )

    def _local_error(self, exc: OSError, target: tuple[IPAddress, int]) -> EgressFailure:
        return EgressFailure(
            Failure.LOCAL,
            f"{self.who}: no local resources to reach {format_hostport(*target)}:"
            f" {errno_text(exc)}",
            source=self.source.name,
            stage=self.stage,
            address=target,
            errno=exc.errno,
        )

    def _proxy_error(
        self,
        kind: Failure,
        text: str,
        proxy: tuple[IPAddress, int] | None,
        *,
        errno: int | None = None,
    ) -> EgressFailure:
        return EgressFailure(
            kind,
            f"{self.who}: {text}",
            source=self.source.name,
            stage=self.stage,
            address=proxy,
            errno=errno,
        )

    def _socks_error(
        self,
        exc: socks5.HandshakeError,
        proxy: tuple[IPAddress, int],
        target: tuple[IPAddress, int],
    ) -> EgressFailure:
        """A SOCKS5 refusal: 03-06 to a CONNECT describe the destination, the rest the proxy."""
        reply = socks5.ReplyCode(exc.reply) if exc.reply in set(socks5.ReplyCode) else None
        kind = _SOCKS_DESTINATION_KINDS.get(reply) if reply is not None else None
        if exc.stage == "connect" and kind is not None:
            return EgressFailure(
                kind,
                f"{self.who}: SOCKS5 proxy {format_hostport(*proxy)} could not reach"
                f" {format_hostport(*target)}: {exc}",
                source=self.source.name,
                stage=Stage.CONNECT,
                address=target,
            )
        return self._proxy_error(
            Failure.PROXY_REFUSED,
            f"SOCKS5 proxy {format_hostport(*proxy)} failed at {exc.stage} for"
            f" {format_hostport(*target)}: {exc}",
            proxy,
        )


# --------------------------------------------------------------------------- helpers


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking ``sock``; raises OSError as ``socket.connect`` would.

    A connection to this host (loopback, a local proxy) is complete when connect() returns,
    even when it says EINPROGRESS; then there is nothing to wait for. Otherwise it waits,
    for as long as the caller's deadline allows; cancelled, the caller closes the socket.
    """
    code = sock.connect_ex(address)  # an errno, not an exception: no raise and catch per dial
    if code == errno.EINPROGRESS or code == errno.EAGAIN:
        if _is_connected(sock):
            return
        await wait_writable(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code != 0:
        raise OSError(code, f"Error connecting to {address!r}: {os.strerror(code)}")


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _sockname(sock: socket.socket, bound: IPAddress | None) -> tuple[IPAddress, int]:
    """The local address; the bound one needs no parsing, only the port is read."""
    host, port = sock.getsockname()[:2]
    if bound is not None:
        return bound, int(port)
    return ipaddress.ip_address(host.split("%", 1)[0]), int(port)


def _bound_address(bound: tuple[str, int] | None, version: int) -> tuple[IPAddress, int]:
    """The SOCKS5 CONNECT reply's BND.ADDR; the unspecified address when it is a name."""
    unspecified = ipaddress.ip_address("::" if version == 6 else "0.0.0.0")
    if bound is None:
        return unspecified, 0
    try:
        return ipaddress.ip_address(bound[0]), bound[1]
    except ValueError:
        return unspecified, bound[1]


def _text(address: tuple[IPAddress, int]) -> tuple[str, int]:
    return str(address[0]), address[1]


def _unique(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    seen: list[IPAddress] = []
    for address in addresses:
        if address not in seen:
            seen.append(address)
    return seen
