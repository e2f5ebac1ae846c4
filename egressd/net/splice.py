"""Relay bytes both ways between a client and a remote until both directions are done.

Theory of operation
-------------------
:func:`relay` runs the two directions (client -> remote counted as "up", remote -> client
as "down") side by side in one nursery: "down" in a child task, "up" in the nursery's body.

Half-close
    EOF from one side ends that direction only: what was read is delivered, then the
    other side's write half is shut down (``shutdown(SHUT_WR)`` / ``send_eof()``), and the
    opposite direction keeps flowing until it sees its own EOF. An SMTP client that sends
    ``QUIT`` and half-closes still gets the remote's ``221``. A reset or any other error on
    either socket ends the whole relay (a reset socket can neither read nor write), with
    outcome ``reset``. This is the behaviour mitmproxy's proxy core gets right and many
    proxies get wrong by closing both directions on the first EOF.

Resets travel on
    A reset is passed on as a reset, in both directions: once a side broke, both sockets
    get ``SO_LINGER`` 0, so the owner's close sends the other side a TCP RST instead of a
    FIN. A client whose destination aborted a transfer then sees an error, not an EOF that
    would make a cut-off download or a half-sent reply look complete.

Zero-copy path (Linux)
    When both ends are plain TCP sockets (a :class:`~egressd.net.connection.Connection`
    or a :class:`trio.SocketStream`), bytes move with ``os.splice`` through a pooled pipe
    and never enter user space. The pair is handed to the run's splice reactor
    (:mod:`egressd.net.zerocopy`): no task, nursery or cancel scope per connection, one
    park until the pair is done; the reactor also keeps the idle timeout (exact: cut after
    ``idle_timeout`` of silence, no slack).

Portable path
    Anywhere else (or when asked with ``zero_copy=False``), ``receive_some`` /
    ``send_all`` on the trio streams, 64 KiB at a time.

Idle timeout
    Not a call deadline (those belong to the caller) but an inactivity rule. On the
    portable path the relay's own cancel scope gets a deadline that every chunk pushes
    forward. To keep that cheap
    at gigabytes per second the push happens at most once per ``slack`` (a tenth of the
    timeout, at most one second), and the deadline includes the slack, so a session is
    cut after between ``idle_timeout`` and ``idle_timeout + slack`` of silence in both
    directions. The outcome is then ``idle_timeout``.

Byte counts live in a :class:`Traffic` the caller passes in and that is updated as bytes
move, so they are right even when the relay is cancelled from outside (daemon shutdown).
The relay never closes the streams: their owner does.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import trio

from egressd.net.connection import Connection
from egressd.net.oserrors import cause_text
from egressd.net.tls import TlsConnection
from egressd.net.zerocopy import AnySocket, RelayResult, SplicedPair, Traffic

__all__ = [
    "CHUNK_SIZE",
    "RelayResult",
    "Traffic",
    "abort_on_close",
    "can_splice",
    "keep_alive",
    "relay",
    "set_keepalive",
]

CHUNK_SIZE = 65536
"""Bytes per receive on the portable path."""

Side = Literal["client", "remote"]


class _Broken(Exception):
    """One side reset or broke its connection: the whole relay ends."""


# --------------------------------------------------------------------------- entry point


def can_splice(*streams: trio.abc.Stream) -> bool:
    """True when ``os.splice`` can relay between these streams (all plain TCP sockets)."""
    if not _HAS_SPLICE:
        return False
    for stream in streams:
        if type(stream) is Connection:  # it knows (reading sock.family/type: 16 calls)
            if not stream.tcp:
                return False
            continue
        sock = _socket_of(stream)
        if sock is None or sock.type != socket.SOCK_STREAM:
            return False
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
    return True


_HAS_SPLICE = hasattr(os, "splice")


def _socket_of(stream: trio.abc.Stream) -> socket.socket | trio.socket.SocketType | None:
    """The TCP socket under a :class:`Connection` or a :class:`trio.SocketStream`."""
    if isinstance(stream, Connection | trio.SocketStream):
        return stream.socket
    return None


def relay(
    client: trio.abc.HalfCloseableStream,
    remote: trio.abc.HalfCloseableStream,
    *,
    traffic: Traffic,
    idle_timeout: float | None,
    to_remote_first: bytes = b"",
    to_client_first: bytes = b"",
    zero_copy: bool | None = None,
) -> Coroutine[Any, Any, RelayResult]:
    """Relay until both directions saw EOF, a side broke, or ``idle_timeout`` of silence.

    ``to_remote_first`` / ``to_client_first`` are bytes already read from the other side
    (sent before anything else in their direction, and counted). ``zero_copy``: None picks
    the splice path when :func:`can_splice` allows it; False forces the portable path;
    True requires the splice path (ValueError when impossible).

    A plain function that returns the chosen path's coroutine (``await relay(...)`` as
    usual): an idle spliced session then waits with one frame less on its task's stack.
    """
    if (
        zero_copy is not False
        and _HAS_SPLICE
        and type(client) is Connection
        and type(remote) is Connection
        and client.tcp
        and remote.tcp
    ):  # what the doors pass: can_splice() and _tcp_socket() inline (11 calls a session)
        client.unwatch()  # the splice reactor watches them now
        remote.unwatch()
        return SplicedPair(
            client.socket,
            remote.socket,
            traffic=traffic,
            idle_timeout=idle_timeout,
            to_remote_first=to_remote_first,
            to_client_first=to_client_first,
        ).run()
    use_splice = can_splice(client, remote) if zero_copy is not False else False
    if zero_copy and not use_splice:
        raise ValueError("zero_copy=True needs two TCP socket streams on Linux")
    if use_splice:
        pair = SplicedPair(
            _tcp_socket(client),
            _tcp_socket(remote),
            traffic=traffic,
            idle_timeout=idle_timeout,
            to_remote_first=to_remote_first,
            to_client_first=to_client_first,
        )
        return pair.run()
    return _relay_portable(client, remote, traffic, idle_timeout, to_remote_first, to_client_first)


async def _relay_portable(
    client: trio.abc.HalfCloseableStream,
    remote: trio.abc.HalfCloseableStream,
    traffic: Traffic,
    idle_timeout: float | None,
    to_remote_first: bytes,
    to_client_first: bytes,
) -> RelayResult:
    broken = None
    with trio.CancelScope() as idle_scope:
        watch = _IdleWatch(idle_scope, idle_timeout)

        def up(count: int) -> None:
            traffic.up += count
            watch.touch()

        def down(count: int) -> None:
            traffic.down += count
            watch.touch()

        broken = await _relay_streams(client, remote, to_remote_first, to_client_first, up, down)
    if broken is not None:
        abort_on_close(client, remote)
        return RelayResult("reset", broken)
    if idle_scope.cancelled_caught:
        return RelayResult("idle_timeout", f"no traffic for {idle_timeout:g}s")
    return RelayResult("ok")


_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort_on_close(*streams: trio.abc.Stream) -> None:
    """Make closing these streams' TCP sockets send a RST (``SO_LINGER`` 0), not a FIN.

    A TLS stream's transport is used; a stream with no socket under it is left alone.
    """
    for stream in streams:
        while isinstance(stream, trio.SSLStream | TlsConnection):
            stream = stream.transport_stream
        sock = _socket_of(stream)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


KEEPALIVE_IDLE = 300
"""Seconds of silence before the first TCP keepalive probe (KumoProxy's value)."""
KEEPALIVE_INTERVAL = 30
"""Seconds between unanswered keepalive probes."""
KEEPALIVE_COUNT = 3
"""Unanswered probes before the kernel drops the connection."""


def keep_alive(*streams: trio.abc.Stream) -> None:
    """Turn on TCP keepalive (idle 300 s, interval 30 s, 3 probes) on these streams' sockets.

    A spliced session whose peer vanished without a FIN or RST (a NAT that forgot it, a
    host that lost power) is then found dead by the kernel instead of holding a source
    slot until the idle timeout. A TLS stream's transport is used; a stream with no
    socket under it is left alone. A socket accepted from ``open_listener`` already has
    them (Linux copies them from the listening socket), so doors pass only the outbound one.
    """
    for stream in streams:
        while isinstance(stream, trio.SSLStream | TlsConnection):
            stream = stream.transport_stream
        sock = _socket_of(stream)
        if sock is not None:
            set_keepalive(sock)


def set_keepalive(sock: AnySocket) -> None:
    """The keepalive options of ``keep_alive`` on one socket (a listening one passes them
    on to every socket it accepts); an OSError leaves the socket as it was. (try, not
    contextlib.suppress: three calls less for every outbound socket of a door.)"""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if _TCP_KEEPIDLE is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


_TCP_KEEPIDLE: int | None = getattr(socket, "TCP_KEEPIDLE", None)


def _tcp_socket(stream: trio.abc.Stream) -> AnySocket:
    sock = _socket_of(stream)
    assert sock is not None  # can_splice() said so
    if isinstance(stream, Connection):
        stream.unwatch()  # the splice reactor watches it now
    return sock


async def _relay_streams(
    client: trio.abc.HalfCloseableStream,
    remote: trio.abc.HalfCloseableStream,
    to_remote_first: bytes,
    to_client_first: bytes,
    up: Callable[[int], None],
    down: Callable[[int], None],
) -> str | None:
    """The portable path: a task per direction; returns why a side broke, or None."""
    async with trio.open_nursery() as nursery:
        state = _StreamRelay(nursery.cancel_scope)
        nursery.start_soon(state.direction, remote, client, to_client_first, down, "down")
        await state.direction(client, remote, to_remote_first, up, "up")
    return state.broken


class _StreamRelay:
    """The two directions' shared state: the first break ends both (``scope``)."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.broken: str | None = None

    async def direction(
        self,
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        first: bytes,
        count: Callable[[int], None],
        way: Literal["up", "down"],
    ) -> None:
        sides: tuple[Side, Side] = ("client", "remote") if way == "up" else ("remote", "client")
        try:
            if first:
                await _send_first(dst, first, sides[1])
                count(len(first))
            await _pump_streams(src, dst, count, sides)
        except _Broken as exc:
            if self.broken is None:
                self.broken = str(exc)
            self.scope.cancel()


class _IdleWatch:
    """Pushes a cancel scope's deadline forward on traffic, at most once per ``slack``."""

    def __init__(self, scope: trio.CancelScope, idle_timeout: float | None) -> None:
        self.scope = scope
        self.idle_timeout = idle_timeout
        self.slack = min(1.0, idle_timeout / 10) if idle_timeout is not None else math.inf
        self.pushed = -math.inf
        self.touch()

    def touch(self) -> None:
        if self.idle_timeout is None:
            return
        now = trio.current_time()
        if now - self.pushed >= self.slack:
            self.pushed = now
            self.scope.deadline = now + self.idle_timeout + self.slack


# --------------------------------------------------------------------------- portable path


async def _send_first(dst: trio.abc.SendStream, data: bytes, side: Side) -> None:
    try:
        await dst.send_all(data)
    except (trio.BrokenResourceError, OSError) as exc:
        raise _Broken(f"{side} broke the connection: {cause_text(exc)}") from exc


async def _pump_streams(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.HalfCloseableStream,
    count: Callable[[int], None],
    sides: tuple[Side, Side],
) -> None:
    while True:
        try:
            data = await src.receive_some(CHUNK_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            raise _Broken(f"{sides[0]} broke the connection: {cause_text(exc)}") from exc
        if not data:
            break
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise _Broken(f"{sides[1]} broke the connection: {cause_text(exc)}") from exc
        count(len(data))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await dst.send_eof()
