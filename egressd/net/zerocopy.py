"""The zero-copy relay: os.splice between TCP sockets, driven by one reactor per trio run.

Theory of operation
-------------------
Bytes move with ``os.splice`` from a socket into a pipe and from the pipe into the other
socket; they never enter user space. Pipes come from a small process-wide pool and are
held only while a chunk is in flight, so an idle connection holds no pipe (5,000 idle
sessions cost 10,000 descriptors, not 30,000). A pipe that may still hold bytes (an error
or a cancellation in the middle of a chunk) is closed instead of being returned.

Pipes are asked for 1 MiB (:data:`PIPE_SIZE`, Linux's ``pipe-max-size`` for unprivileged
processes): a chunk is two ``splice`` calls whatever its size, so a bigger pipe is fewer
calls and fewer reactor turns per gigabyte. Measured through the SOCKS5 door, 1 GiB in
7 alternating rounds against 256 KiB pipes (``scripts/bench relay --sessions 0 --idle 0
--repeat 7 --baseline DIR``, load average 6-7): 0.33 s of CPU per GiB instead of 0.39
(-15%), and 1.60x ``socat -b65536``'s throughput instead of 1.20x (medians). A direction
whose destination is slow can so hold up to 1 MiB in its pipe (kernel pages the sender
already handed over). Every pipe's capacity counts against its user's
``pipe-user-pages-soft`` (64 MiB by default, shared by every worker of one user; a
process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN is exempt): past it the kernel makes new
pipes 8 KiB and refuses to grow them, which is slower but still correct. So the pool keeps
only :data:`POOLED_PIPES` (a pipe is in flight only while a chunk is, or while its
destination is full), and a pipe that came out smaller than asked is closed when it is
given back instead of being pooled, so that a later one can have the full size again.

Send buffers
    A direction that moves a full pipe is a bulk transfer: its destination socket is then
    given :data:`BULK_SEND_BUFFER` (4 MiB asked, 8 MiB granted: Linux doubles it) of send
    buffer, once, instead of the kernel's autotuning (at most ``net.ipv4.tcp_wmem``'s
    maximum, 4 MiB by default). When the destination is slower than the source, a full
    send buffer makes the direction wait for EPOLLOUT, which the kernel signals once a
    third of the buffer is free: a bigger buffer is fewer of those waits (four epoll
    changes and a wake-up each) and more bytes per wake-up. Measured with 1 GiB through
    the SOCKS5 door into the bench's sink, 15 rounds alternating with the code before it
    (load average 4-5): 0.25 s of egressd CPU per GiB instead of 0.29 (per-round median
    0.82x), throughput per-round median 1.10x (range 0.75-1.58x); the sink's CPU grew by
    0.05 s/GiB (more bytes in flight), the three processes' sum fell from 0.82 to 0.77
    s/GiB; context switches per GiB: about 400 instead of 600-800. Only where
    ``net.core.wmem_max`` allows more than autotuning would reach (2 x min(4 MiB,
    wmem_max) > tcp_wmem's maximum; Debian's default wmem_max of 208 KiB does not): a
    smaller fixed buffer would be slower. A short session (SMTP lines, one HTTP exchange)
    never fills a pipe and keeps the kernel's default. The buffer is a limit, not an
    allocation: it costs memory only while the destination lags.

Why a reactor
    A relay is two directions that wait on two sockets. In trio that is a nursery and a
    task per direction, and a trip through the scheduler for every wait: for a short SMTP
    or SOCKS session (connect, one exchange, close) that bookkeeping cost more CPU than
    the session's system calls. Here one *system task per trio run* owns an epoll set
    holding every spliced socket; the relay's own task registers its pair and parks once
    until the pair is finished. No per-connection task, nursery or cancel scope is
    created, and a session's four readiness waits cost four epoll events.

The reactor
    Level-triggered epoll: a socket is registered for EPOLLIN while its reading direction
    wants data and for EPOLLOUT while the other direction has bytes waiting to be written
    to it, and taken out of the set when it wants neither (so a half-closed socket's
    permanent EPOLLHUP cannot spin the loop). A reading socket is registered with
    EPOLLRDHUP too: when its peer's FIN has arrived, a short read is followed by another,
    which finds the EOF in the same turn (a short session's last reply usually comes with
    its FIN) instead of a poll and a reactor turn later; without it, a short read ends the
    turn, as the next read would most likely find nothing. Each event moves at most
    :data:`CHUNKS_PER_TURN` pipes' worth (:data:`PIPE_SIZE`) per direction; what is left makes
    the socket ready again at the next poll, so a fast transfer shares the reactor with
    everyone else. After every batch of events the reactor yields to trio's scheduler; only
    when its own poll finds nothing does it park on its epoll descriptor.

Idle timeout
    The reactor keeps it, not a cancel scope per pair: a pair with an ``idle_timeout``
    sits in one heap ordered by when it is due; every reactor turn that moves a pair's
    bytes stamps its ``active`` time, and a timer task (one per run, sleeping until the
    earliest due time) pops what is due: a pair that moved since is pushed back at
    ``active + idle_timeout``, a silent one ends with ``timed_out``. So a session is cut
    after ``idle_timeout`` of silence in both directions (plus the scheduler's delay),
    and an idle pair costs one heap slot instead of a cancel scope, its status and its
    deadline entry in trio. A pair that ends otherwise is dropped from the heap lazily
    (the heap is rebuilt once it holds more finished pairs than live ones).

Semantics (the same as the portable path in :mod:`egressd.net.splice`)
    EOF from one side ends that direction only: what was read is delivered, then the
    other side's write half is shut down, and the opposite direction keeps flowing until
    its own EOF. An error on either socket (a reset) ends the whole pair, ``broken`` says
    which side and why. ``first`` bytes of a direction are written before anything read.
    :meth:`SplicedPair.run` then passes the reset on: both sockets get ``SO_LINGER`` 0,
    so their owner's close sends a RST, not a FIN.

Cancellation belongs to the caller: :meth:`SplicedPair.run` parks until the pair is
finished; when the caller's scope is cancelled (a drain, a shutdown) the pair is taken out
of the reactor at once and the cancellation propagates. The sockets are never closed
here: their owner does that.

Memory: an idle pair is a :class:`SplicedPair` and its two :class:`_Direction` (all with
``__slots__``), its two epoll registrations and its heap slot; byte counts go straight
into the caller's :class:`Traffic`, with no callbacks or closures per pair.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import math
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Literal

import trio

from egressd.net.oserrors import cause_text

__all__ = ["PIPE_SIZE", "POOLED_PIPES", "RelayResult", "SplicedPair", "Traffic"]

PIPE_SIZE = 1 << 20
"""Capacity asked for each splice pipe (F_SETPIPE_SZ); the kernel default is 64 KiB."""

POOLED_PIPES = 4
"""Empty pipes kept for reuse per process (4 MiB of the user's pipe quota)."""

BULK_SEND_BUFFER = 4 << 20
"""SO_SNDBUF asked for on the destination of a bulk direction (see the module doc)."""
_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: int = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SPLICE_FLAGS: int = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_EVENTS_PER_POLL = 512
CHUNKS_PER_TURN = 4
"""Full pipes one direction may move per readiness event before the others get a turn."""

Side = Literal["client", "remote"]
AnySocket = socket.socket | trio.socket.SocketType


def bulk_send_buffer(wanted: int, wmem_max: int, tcp_wmem_max: int) -> int:
    """The SO_SNDBUF to ask for on a bulk direction's destination, 0 to leave it alone.

    Linux caps the request at ``net.core.wmem_max`` and doubles it, and a socket whose
    SO_SNDBUF was set no longer autotunes (up to ``net.ipv4.tcp_wmem``'s maximum): so the
    buffer is set only when that gives more room than autotuning would.
    """
    asked = min(wanted, wmem_max)
    return asked if 2 * asked > tcp_wmem_max else 0


def _system_bulk_send_buffer() -> int:
    try:
        with open("/proc/sys/net/core/wmem_max") as core:
            wmem_max = int(core.read())
        with open("/proc/sys/net/ipv4/tcp_wmem") as tcp:
            tcp_wmem_max = int(tcp.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 0
    return bulk_send_buffer(BULK_SEND_BUFFER, wmem_max, tcp_wmem_max)


_BULK_SNDBUF = _system_bulk_send_buffer()
"""What :func:`bulk_send_buffer` allows on this host (read once, at import)."""

_STALE_TIMERS = 64
"""Finished pairs the timer heap may hold before it is rebuilt (also: more than live ones)."""


@dataclass(slots=True)
class Traffic:
    """Bytes relayed so far: ``up`` client -> remote, ``down`` remote -> client."""

    up: int = 0
    down: int = 0


Outcome = Literal["ok", "idle_timeout", "reset"]


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relay ended: ``ok`` (both sides finished), ``idle_timeout`` or ``reset``."""

    outcome: Outcome
    detail: str | None = None


_OK = RelayResult("ok")
_LINGER_ZERO = struct.pack("ii", 1, 0)


class _Broken(Exception):
    """One side reset or broke its connection: the whole pair ends."""


# --------------------------------------------------------------------------- one direction

_READ, _WRITE, _DONE = 0, 1, 2
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
"""What a reading socket is registered for (see "The reactor" in the module doc)."""
_CLOSING_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP
_UP: tuple[Side, Side] = ("client", "remote")
_DOWN: tuple[Side, Side] = ("remote", "client")


class _Direction:
    """src -> pipe -> dst; ``state`` says what it waits for: src readable, dst writable."""

    __slots__ = (
        "bulk",
        "dst",
        "dst_fd",
        "first",
        "pending",
        "pipe",
        "sides",
        "src_fd",
        "state",
        "traffic",
    )

    def __init__(
        self,
        src_fd: int,
        dst: AnySocket,
        dst_fd: int,
        first: bytes,
        traffic: Traffic,
        sides: tuple[Side, Side],
    ) -> None:
        self.src_fd = src_fd
        self.dst = dst
        self.dst_fd = dst_fd
        self.first = memoryview(first) if first else None
        self.traffic = traffic
        self.sides = sides
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe
        self.state = _WRITE if first else _READ
        self.bulk = False  # moved a full pipe: dst has the bulk send buffer

    def count(self, size: int) -> None:
        if self.sides is _UP:
            self.traffic.up += size
        else:
            self.traffic.down += size

    def step(self, src_closing: bool = False) -> None:
        """Move what can be moved now without blocking, at most :data:`CHUNKS_PER_TURN`
        full pipes; raises _Broken. ``src_closing``: src's peer sent its FIN (EPOLLRDHUP),
        so a short read is followed by another, which finds the EOF at once."""
        if self.first is not None and not self._write_first():
            return
        if self.pending and not self._drain():
            return
        for _ in range(CHUNKS_PER_TURN):
            size = self._read_chunk()
            if self.state != _READ or (size < PIPE_SIZE and not (src_closing and size)):
                return

    def _write_first(self) -> bool:
        assert self.first is not None
        try:
            written = os.write(self.dst_fd, self.first)
        except BlockingIOError:
            self.state = _WRITE
            return False
        except OSError as exc:
            raise _Broken(f"{self.sides[1]} broke the connection: {cause_text(exc)}") from exc
        self.count(written)
        self.first = self.first[written:] or None
        if self.first is not None:
            self.state = _WRITE
            return False
        self.state = _READ
        return True

    def _read_chunk(self) -> int:
        """Read one pipe's worth and pass it on; the bytes read (0: none, or EOF)."""
        free = _PIPES.free  # take()'s usual case inline: four reads a short session
        try:
            pipe = free.pop() if free else _PIPES.take()
        except OSError as exc:
            raise _Broken(f"no descriptors for a splice pipe: {cause_text(exc)}") from exc
        try:
            size = os.splice(self.src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            _PIPES.give(pipe)
            self.state = _READ
            return 0
        except OSError as exc:
            _PIPES.give(pipe)  # nothing entered the pipe
            raise _Broken(f"{self.sides[0]} broke the connection: {cause_text(exc)}") from exc
        if size == 0:
            _PIPES.give(pipe)
            self.state = _DONE
            try:  # noqa: SIM105 - not contextlib.suppress: three calls less per direction
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return 0
        self.pipe, self.pending = pipe, size
        self.count(size)
        if size == PIPE_SIZE and not self.bulk:
            self._go_bulk()
        self._drain()
        return size

    def _go_bulk(self) -> None:
        """A full pipe: a bulk transfer, so dst gets the bulk send buffer (once)."""
        self.bulk = True
        if _BULK_SNDBUF:
            with contextlib.suppress(OSError):
                self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BULK_SNDBUF)

    def _drain(self) -> bool:
        """Empty the pipe into dst; False when dst is full (then wait for EPOLLOUT)."""
        assert self.pipe is not None
        while self.pending:
            try:
                written = os.splice(self.pipe[0], self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self.state = _WRITE
                return False
            except OSError as exc:
                raise _Broken(f"{self.sides[1]} broke the connection: {cause_text(exc)}") from exc
            if written <= 0:  # pragma: no cover - the kernel never does this with data queued
                raise _Broken(f"{self.sides[1]}: splice wrote nothing")
            self.pending -= written
        _PIPES.give(self.pipe)
        self.pipe = None
        self.state = _READ
        return True

    def release(self) -> None:
        """The pair is over: a pipe that still holds bytes is closed, not pooled."""
        if self.pipe is not None:
            _PIPES.discard(self.pipe)
            self.pipe = None


# --------------------------------------------------------------------------- a pair


class SplicedPair:
    """Two TCP sockets relayed both ways through the run's reactor; see the module doc."""

    __slots__ = (
        "_task",
        "active",
        "broken",
        "client_events",
        "client_fd",
        "down",
        "due",
        "finished",
        "idle_timeout",
        "remote_events",
        "remote_fd",
        "timed",
        "timed_out",
        "traffic",
        "up",
    )

    def __init__(
        self,
        client: AnySocket,
        remote: AnySocket,
        *,
        traffic: Traffic,
        idle_timeout: float | None = None,
        to_remote_first: bytes = b"",
        to_client_first: bytes = b"",
    ) -> None:
        client_fd, remote_fd = client.fileno(), remote.fileno()  # each asked once
        self.up = _Direction(client_fd, remote, remote_fd, to_remote_first, traffic, _UP)
        self.down = _Direction(remote_fd, client, client_fd, to_client_first, traffic, _DOWN)
        self.client_fd = client_fd
        self.remote_fd = remote_fd
        self.client_events = 0  # what each socket is registered for in the reactor's epoll
        self.remote_events = 0
        self.traffic = traffic
        self.idle_timeout = idle_timeout
        self.active = 0.0  # when bytes last moved (the reactor stamps it)
        self.due = 0.0  # when the timer heap looks at it next
        self.timed = False  # in the timer heap
        self.broken: str | None = None
        self.timed_out = False
        self.finished = False
        self._task: trio.lowlevel.Task | None = None

    def __lt__(self, other: SplicedPair) -> bool:  # the timer heap's order
        return self.due < other.due

    async def run(self) -> RelayResult:
        """Relay until both directions are done, a side broke (``reset``: both sockets
        then get ``SO_LINGER`` 0, so their owner's close passes the reset on) or the pair
        was silent for ``idle_timeout``."""
        reactor = _reactor()
        try:
            reactor.add(self)
            if not self.finished:
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            if not self.finished:  # cancelled from outside
                reactor.retire(self)
        return self._result()

    def _result(self) -> RelayResult:
        if self.broken is not None:
            for sock in (self.up.dst, self.down.dst):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            return RelayResult("reset", self.broken)
        if self.timed_out:
            return RelayResult("idle_timeout", f"no traffic for {self.idle_timeout:g}s")
        return _OK

    def _abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def on_ready(self, fd: int, events: int, now: float) -> None:
        """``fd`` is ready (or in error, or its peer closed: ``events``): step the
        directions that wait on it; a pair whose bytes moved is ``active`` as of ``now``."""
        traffic = self.traffic
        before = traffic.up + traffic.down
        if fd == self.client_fd:
            reader, writer = self.up, self.down
        else:
            reader, writer = self.down, self.up
        try:
            if reader.state == _READ:
                reader.step(bool(events & _CLOSING_EVENTS))
            if writer.state == _WRITE:
                writer.step()
        except _Broken as exc:
            self.broken = str(exc)
        if traffic.up + traffic.down != before:
            self.active = now

    def start(self) -> None:
        """Directions that begin with bytes to write try them at once."""
        try:
            for direction in (self.up, self.down):
                if direction.state == _WRITE:
                    direction.step()
        except _Broken as exc:
            self.broken = str(exc)

    @property
    def done(self) -> bool:
        return self.broken is not None or (self.up.state == _DONE and self.down.state == _DONE)

    def finish(self) -> None:
        """The pair is over (the reactor has let go of it): wake its task, if it waits."""
        self.finished = True
        if self.up.pipe is not None:
            self.up.release()
        if self.down.pipe is not None:
            self.down.release()
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


# --------------------------------------------------------------------------- the reactor


class _Reactor:
    """One epoll set for every spliced socket of this trio run, served by a system task;
    and the idle timers of its pairs, served by another."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.owners: dict[int, SplicedPair] = {}
        self.timers: list[SplicedPair] = []  # a heap by ``due``
        self.stale = 0  # finished pairs still in ``timers``
        self.timer_scope: trio.CancelScope | None = None  # the timer task's sleep
        # The run's clock, asked directly: trio.current_time() is three Python calls more
        # on every reactor turn and every pair added.
        self.clock = trio.lowlevel.current_clock()

    def add(self, pair: SplicedPair) -> None:
        self.owners[pair.client_fd] = pair
        self.owners[pair.remote_fd] = pair
        now = self.clock.current_time()
        pair.active = now
        if pair.up.state == _WRITE or pair.down.state == _WRITE:
            pair.start()
        if pair.idle_timeout is not None and not pair.done:
            self._arm(pair, now + pair.idle_timeout)
        self._settle(pair)

    def retire(self, pair: SplicedPair) -> None:
        """Take the pair out of the epoll set and the timers; wake its task."""
        owners = self.owners
        if owners.get(pair.client_fd) is pair:
            del owners[pair.client_fd]
            if pair.client_events:
                self._set(pair.client_fd, 0, pair.client_events)
                pair.client_events = 0
        if owners.get(pair.remote_fd) is pair:
            del owners[pair.remote_fd]
            if pair.remote_events:
                self._set(pair.remote_fd, 0, pair.remote_events)
                pair.remote_events = 0
        pair.finish()
        if pair.timed:
            self._forget_timer()

    def _settle(self, pair: SplicedPair) -> None:
        """Bring the pair's registrations up to date, or end it when it is done (this runs
        after every event, so :attr:`SplicedPair.done` is inline). A socket waits for what
        the direction reading from it and the one writing into it wait for: the client's
        is up's source and down's destination."""
        up, down = pair.up.state, pair.down.state
        if pair.broken is not None or (up == _DONE and down == _DONE):
            self.retire(pair)
            return
        client = (_READ_EVENTS if up == _READ else 0) | (select.EPOLLOUT if down == _WRITE else 0)
        if client != pair.client_events:
            self._set(pair.client_fd, client, pair.client_events)
            pair.client_events = client
        remote = (_READ_EVENTS if down == _READ else 0) | (select.EPOLLOUT if up == _WRITE else 0)
        if remote != pair.remote_events:
            self._set(pair.remote_fd, remote, pair.remote_events)
            pair.remote_events = remote

    def _set(self, fd: int, events: int, current: int) -> None:
        """Change ``fd``'s registration from ``current`` to ``events`` (0: none)."""
        try:
            if not events:
                self.epoll.unregister(fd)
            elif not current:
                self.epoll.register(fd, events)
            else:
                self.epoll.modify(fd, events)
        except OSError as exc:  # pragma: no cover - a descriptor closed under the reactor
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                raise

    async def serve(self) -> None:
        try:
            while True:
                events = self.epoll.poll(0, _EVENTS_PER_POLL)
                if not events:
                    await trio.lowlevel.wait_readable(self.epoll.fileno())
                    continue
                now = self.clock.current_time()
                for fd, ready in events:
                    pair = self.owners.get(fd)
                    if pair is None:  # pragma: no cover - removed earlier in this batch
                        continue
                    pair.on_ready(fd, ready, now)
                    self._settle(pair)
                # Busy: let the other tasks run, then look again without re-arming trio's
                # own epoll for the reactor's descriptor (the costlier way back).
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            trio.lowlevel.notify_closing(self.epoll.fileno())
            self.epoll.close()

    # ------------------------------------------------------------------ idle timers

    def _arm(self, pair: SplicedPair, due: float) -> None:
        pair.due = due
        pair.timed = True
        heapq.heappush(self.timers, pair)
        scope = self.timer_scope
        if scope is not None and due < scope.deadline:
            scope.deadline = due

    def _forget_timer(self) -> None:
        """A pair in the heap finished: leave it there until the heap is mostly such."""
        self.stale += 1
        if self.stale > _STALE_TIMERS and 2 * self.stale > len(self.timers):
            self.timers = [pair for pair in self.timers if not pair.finished]
            heapq.heapify(self.timers)
            self.stale = 0

    async def expire_idle(self) -> None:
        """The timer task: sleep until the earliest due pair, then end the silent ones."""
        while True:
            due = self.timers[0].due if self.timers else math.inf
            with trio.CancelScope(deadline=due) as self.timer_scope:
                await trio.sleep_forever()
            self.timer_scope = None
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0].due <= now:
            pair = heapq.heappop(timers)
            if pair.finished:
                self.stale -= 1
                continue
            assert pair.idle_timeout is not None
            due = pair.active + pair.idle_timeout
            if due > now:  # it moved bytes since: look again then
                pair.due = due
                heapq.heappush(timers, pair)
                continue
            pair.timed = False
            pair.timed_out = True
            self.retire(pair)


_REACTOR: trio.lowlevel.RunVar[_Reactor] = trio.lowlevel.RunVar("egressd_splice_reactor")


def _reactor() -> _Reactor:
    try:
        return _REACTOR.get()
    except LookupError:
        reactor = _Reactor()
        trio.lowlevel.spawn_system_task(reactor.serve, name="egressd splice reactor")
        trio.lowlevel.spawn_system_task(reactor.expire_idle, name="egressd splice idle timers")
        _REACTOR.set(reactor)
        return reactor


# --------------------------------------------------------------------------- pipes


class _PipePool:
    """Empty non-blocking pipes for splice, reused across connections (trio is one thread).

    Only pipes of the full :data:`PIPE_SIZE` are kept; a smaller one (the kernel refused
    the size) is closed when given back.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.small: set[int] = set()  # read ends of pipes smaller than PIPE_SIZE

    def take(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # a smaller pipe still works
            size = 0
        if size < PIPE_SIZE:
            self.small.add(read_fd)
        return read_fd, write_fd

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self.free) < self.keep and pipe[0] not in self.small:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        self.small.discard(pipe[0])
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


_PIPES = _PipePool(POOLED_PIPES)
