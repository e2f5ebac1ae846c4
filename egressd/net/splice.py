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

Zero-copy path (Linux)
    When both ends are plain TCP sockets (a :class:`~egressd.net.connection.Connection`
    or a :class:`trio.SocketStream`), bytes move with
    ``os.splice`` from the source socket into a pipe and from the pipe into the other
    socket: they never enter user space. Writes are tried non-blocking first and wait for
    readiness (``trio.lowlevel.wait_writable``) only on EAGAIN; reads wait for readiness
    first unless the previous read filled a whole pipe (more is likely queued), so an
    idle or trickling socket costs no failing splice() calls.
    Pipes come from a small process-wide pool and are held only while a chunk is in
    flight: an idle connection holds no pipe, so 5,000 idle sessions cost 10,000
    descriptors, not 30,000. A pipe that may still hold bytes (an error or a
    cancellation in the middle of a chunk) is closed instead of being returned.

Portable path
    Anywhere else (or when asked with ``zero_copy=False``), ``receive_some`` /
    ``send_all`` on the trio streams, 64 KiB at a time.

Idle timeout
    Not a call deadline (those belong to the caller) but an inactivity rule: the relay's
    own cancel scope gets a deadline that every chunk pushes forward. To keep that cheap
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
import errno
import fcntl
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from egressd.net.connection import Connection

__all__ = [
    "CHUNK_SIZE",
    "RelayResult",
    "Traffic",
    "can_splice",
    "relay",
]

CHUNK_SIZE = 65536
"""Bytes per receive on the portable path."""

PIPE_SIZE = 262144
"""Capacity asked for each splice pipe (F_SETPIPE_SZ); the kernel default is 64 KiB."""

_POOLED_PIPES = 16
_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS: int = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

Outcome = Literal["ok", "idle_timeout", "reset"]
Side = Literal["client", "remote"]


@dataclass
class Traffic:
    """Bytes relayed so far: ``up`` client -> remote, ``down`` remote -> client."""

    up: int = 0
    down: int = 0


@dataclass(frozen=True)
class RelayResult:
    """How a relay ended: ``ok`` (both sides finished), ``idle_timeout`` or ``reset``."""

    outcome: Outcome
    detail: str | None = None


class _Broken(Exception):
    """One side reset or broke its connection: the whole relay ends."""


# --------------------------------------------------------------------------- entry point


def can_splice(*streams: trio.abc.Stream) -> bool:
    """True when ``os.splice`` can relay between these streams (all plain TCP sockets)."""
    if not hasattr(os, "splice"):
        return False
    for stream in streams:
        sock = _socket_of(stream)
        if sock is None or sock.type != socket.SOCK_STREAM:
            return False
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
    return True


def _socket_of(stream: trio.abc.Stream) -> socket.socket | trio.socket.SocketType | None:
    """The TCP socket under a :class:`Connection` or a :class:`trio.SocketStream`."""
    if isinstance(stream, Connection | trio.SocketStream):
        return stream.socket
    return None


async def relay(
    client: trio.abc.HalfCloseableStream,
    remote: trio.abc.HalfCloseableStream,
    *,
    traffic: Traffic,
    idle_timeout: float | None,
    to_remote_first: bytes = b"",
    to_client_first: bytes = b"",
    zero_copy: bool | None = None,
) -> RelayResult:
    """Relay until both directions saw EOF, a side broke, or ``idle_timeout`` of silence.

    ``to_remote_first`` / ``to_client_first`` are bytes already read from the other side
    (sent before anything else in their direction, and counted). ``zero_copy``: None picks
    the splice path when :func:`can_splice` allows it; False forces the portable path;
    True requires the splice path (ValueError when impossible).
    """
    use_splice = can_splice(client, remote) if zero_copy is None else zero_copy
    if use_splice and not can_splice(client, remote):
        raise ValueError("zero_copy=True needs two TCP socket streams on Linux")
    with trio.CancelScope() as idle_scope:
        watch = _IdleWatch(idle_scope, idle_timeout)

        def up(count: int) -> None:
            traffic.up += count
            watch.touch()

        def down(count: int) -> None:
            traffic.down += count
            watch.touch()

        async with trio.open_nursery() as nursery:
            state = _Relay(nursery.cancel_scope, use_splice)
            nursery.start_soon(state.direction, remote, client, to_client_first, down, "down")
            # "up" runs in this task, inside the nursery (and its cancel scope): one task
            # fewer to spawn and schedule per connection than a child for each direction.
            await state.direction(client, remote, to_remote_first, up, "up")
    if state.broken is not None:
        return RelayResult("reset", state.broken)
    if idle_scope.cancelled_caught:
        return RelayResult("idle_timeout", f"no traffic for {idle_timeout:g}s")
    return RelayResult("ok")


class _Relay:
    """The two directions' shared state: the first break ends both (``scope``)."""

    def __init__(self, scope: trio.CancelScope, use_splice: bool) -> None:
        self.scope = scope
        self.use_splice = use_splice
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
            src_socket, dst_socket = _socket_of(src), _socket_of(dst)
            if self.use_splice and src_socket is not None and dst_socket is not None:
                await _pump_splice(src_socket, dst_socket, count, sides)
            else:
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
        raise _Broken(f"{side} broke the connection: {_reason(exc)}") from exc


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
            raise _Broken(f"{sides[0]} broke the connection: {_reason(exc)}") from exc
        if not data:
            break
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise _Broken(f"{sides[1]} broke the connection: {_reason(exc)}") from exc
        count(len(data))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await dst.send_eof()


# --------------------------------------------------------------------------- splice path


async def _pump_splice(
    src: socket.socket | trio.socket.SocketType,
    dst: socket.socket | trio.socket.SocketType,
    count: Callable[[int], None],
    sides: tuple[Side, Side],
) -> None:
    src_fd, dst_fd = src.fileno(), dst.fileno()
    wait_first = True
    while True:
        moved = await _splice_chunk(src_fd, dst_fd, sides, wait_first)
        if moved == 0:
            break
        count(moved)
        # A short read drained the socket: wait for readiness before the next try instead
        # of paying for a splice() that fails with EAGAIN. After a full chunk, try at once.
        wait_first = moved < PIPE_SIZE
        if not wait_first:
            await trio.lowlevel.checkpoint()  # fairness: a busy relay must not starve others
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def _splice_chunk(
    src_fd: int, dst_fd: int, sides: tuple[Side, Side], wait_first: bool
) -> int:
    """Move one chunk src -> pipe -> dst; 0 at EOF. Holds a pipe only while moving."""
    while True:
        if wait_first:
            await trio.lowlevel.wait_readable(src_fd)
        wait_first = True
        try:
            pipe = _PIPES.take()
        except OSError as exc:
            raise _Broken(f"no descriptors for a splice pipe: {_reason(exc)}") from exc
        try:
            size = os.splice(src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            _PIPES.give(pipe)
            continue
        except OSError as exc:
            _PIPES.give(pipe)  # nothing entered the pipe
            raise _Broken(f"{sides[0]} broke the connection: {_reason(exc)}") from exc
        if size == 0:
            _PIPES.give(pipe)
            return 0
        try:
            await _drain(pipe[0], dst_fd, size, sides[1])
        except BaseException:
            _PIPES.discard(pipe)  # may still hold bytes
            raise
        _PIPES.give(pipe)
        return size


async def _drain(pipe_r: int, dst_fd: int, size: int, side: Side) -> None:
    while size:
        try:
            written = os.splice(pipe_r, dst_fd, size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst_fd)
            continue
        except OSError as exc:
            raise _Broken(f"{side} broke the connection: {_reason(exc)}") from exc
        if written <= 0:  # pragma: no cover - the kernel never does this with data queued
            raise _Broken(f"{side}: splice wrote nothing")
        size -= written


class _PipePool:
    """Empty non-blocking pipes for splice, reused across connections (trio is one thread)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        return read_fd, write_fd

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


_PIPES = _PipePool(_POOLED_PIPES)


def _reason(exc: BaseException) -> str:
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"{os.strerror(cause.errno)} ({errno.errorcode.get(cause.errno, cause.errno)})"
    return str(exc) or type(exc).__name__
