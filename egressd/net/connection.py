"""A connected TCP socket as a trio stream that goes through the scheduler only to wait.

Theory of operation
-------------------
:class:`trio.SocketStream` makes every ``send_all`` and ``receive_some`` a full checkpoint:
even when the kernel has the bytes ready, the task yields to the scheduler and is
rescheduled. That is trio's rule, and it is what makes cancellation and fairness easy to
reason about, but a proxy pays it several times per connection. Measured on loopback with
a minimal SOCKS5 relay (connect, one exchange, close): 0.72 ms of CPU per session on
``trio.SocketStream`` against 0.35 ms with the system call tried first.

:class:`Connection` keeps what the rule is for and drops the unconditional yield:

* every call first checks for cancellation (``checkpoint_if_cancelled``: it yields and
  raises ``Cancelled`` only when the task is cancelled), so a timeout or a drain that has
  already fired is honoured at the next call;
* the system call is tried at once; only EAGAIN parks the task, which is where timeouts
  normally strike. It parks with the run's edge-triggered reactor
  (:mod:`egressd.net.readiness`), not with trio's ``wait_readable`` / ``wait_writable``:
  the socket is registered there once, at its first wait, so a wait costs no
  ``epoll_ctl``, and the reactor remembers readiness between waits;
* after :data:`YIELD_EVERY` calls in a row that did not park, one yields anyway, so a
  peer that always has data ready cannot starve the other connections.

A receive that got fewer bytes than it asked for emptied the kernel's queue, so the next
one parks first and then reads, instead of paying a ``recv`` that fails with EAGAIN (a
system call, and a BlockingIOError raised and caught) before the same park, unless the
reactor has reported the socket readable since (new bytes, or the peer's FIN). After a
full read (a message body arriving faster than it is read) the next receive still tries
at once. The SMTP door is lock-step (the MTA's command, the remote's reply, the answer), so
after a reply is sent its next read nearly always has to wait: measured with perf under
``smtp-source -s 50 -d`` (10 KiB, into ``smtp-sink``), recvfrom per message fell from
10.5 to 7.0, and ``scripts/bench smtp --baseline DIR --rounds 5 --seconds 3`` gave
0.355 -> 0.325 ms of CPU per message with PIPELINING (-8%), 0.438 -> 0.356 without
(-19%). A receive after a wait under a time limit reached its end tries first, so bytes
that are ready are still taken whatever the limit.

A caller that wants a time limit on its calls gives it with :meth:`Connection.time_limit`
instead of putting a cancel scope around each one: from the first call that has to wait,
the calls may wait that many seconds in all, and a wait that reaches the end raises
:class:`trio.TooSlowError`. The clock is read only for a call that has to wait, not for
every call, and a call that finds the bytes ready or the buffer free completes whatever
the limit, as a call under a cancel scope would before trio's next checkpoint.
:class:`TimedStream` gives any other stream the same method (a cancel scope around each
call, the time counted from the first call), so one caller serves both.

A wait under a limit makes no cancel scope either: it files its deadline with the run's one
deadline task (:class:`_Deadlines`, a trio system task), which sleeps until the earliest
deadline filed and wakes the waits that reached theirs with :class:`trio.TooSlowError`
(through the reactor's :meth:`~egressd.net.readiness.Watch.wake`: only the late wait; a
wait in the other direction on the same socket waits on; the late wait tries its call
once more first, since the reactor's report of bytes that came by the deadline may be
queued behind the deadline task in the same scheduler batch). Filing is two
dict operations; a cancel scope with a deadline costs about forty Python calls to enter
and leave, and the SMTP door waited about three times per message under load, all under a
limit (measured with smtp-source, 50 sessions: 3.2 waits and 3.3 scopes per message).
The task sleeps again only when a wait's deadline is earlier than the one it sleeps until;
waits that end before their deadline are forgotten and cost it nothing.

Errors follow ``trio.SocketStream``: an OSError becomes :class:`trio.BrokenResourceError`
(the OSError is its ``__cause__``), a use after close :class:`trio.ClosedResourceError`.
``TCP_NODELAY`` is set, as trio does: SMTP is small request/reply lines.

The socket is a plain :class:`socket.socket` (``.socket``), so its descriptor can be spliced
(:mod:`egressd.net.splice`), and ``peer`` is what ``accept`` returned (no ``getpeername``).
"""

from __future__ import annotations

import errno
import heapq
import math
import socket
from collections.abc import Callable

import trio

from egressd.net import readiness
from egressd.net.readiness import HUNG_UP, READ, WRITE, Watch

__all__ = [
    "YIELD_EVERY",
    "Connection",
    "TimedStream",
    "clock",
    "close_socket",
    "timed",
    "wait_readable",
    "wait_writable",
]

YIELD_EVERY = 16
"""Calls that completed without waiting after which a Connection yields anyway."""

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})
_DEFAULT_RECEIVE_SIZE = 65536


class Connection(trio.abc.HalfCloseableStream):
    """A connected, non-blocking TCP socket; see the module docstring."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int] | None = None) -> None:
        sock.setblocking(False)
        # TCP_NODELAY is refused by anything but TCP: that tells ``tcp`` without reading
        # sock.family, whose IntEnum conversion costs four Python calls per connection.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.tcp = False
        else:
            self.tcp = True
        """A TCP socket (:func:`egressd.net.splice.can_splice` asks)."""
        self.socket = sock
        self.peer = peer
        self._limit = math.inf  # see time_limit()
        self._deadline = math.inf
        self._expired = False  # a wait of this limit reached its deadline (_expire)
        self._deadlines: _Deadlines | None = None  # the run's, from the first limited wait
        self._unparked = 0
        self._watch: Watch | None = None  # in the run's reactor, from the first wait
        self._eof_sent = False

    # ------------------------------------------------------------------ stream interface

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()  # _before_call, inline: a coroutine less
        self._unparked += 1
        if self._unparked >= YIELD_EVERY:
            await self._yield_anyway()
        size = _DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        watch = self._watch
        if watch is not None and not watch.ready & READ and not self._expired:
            await self._park_until(readable=True)  # the recv would fail: wait first
        while True:
            try:
                data = self.socket.recv(size)
            except BlockingIOError:
                await self._park_until(readable=True)
            except OSError as exc:
                raise _stream_error(exc) from _cause(exc)
            else:
                if len(data) < size and data:  # the queue is empty: the next read waits
                    watch = self._watch or self._start_watch()
                    if not watch.ready & HUNG_UP:  # unless the EOF is next (no event comes)
                        watch.ready &= ~READ
                return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # _before_call, inline
        self._unparked += 1
        if self._unparked >= YIELD_EVERY:
            await self._yield_anyway()
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        if not data:
            return
        try:  # usually the kernel takes it all at once: no memoryview to slice
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = -1
        except OSError as exc:
            raise _stream_error(exc) from _cause(exc)
        if sent != len(data):
            await self._send_rest(memoryview(data), sent)

    async def _send_rest(self, view: memoryview, sent: int) -> None:
        """Send what is left of ``view`` after ``sent`` bytes (-1: none, EAGAIN)."""
        while True:
            if sent < 0:
                await self._park_until(readable=False)
            else:
                view = view[sent:]
                if not view:
                    return
            try:
                sent = self.socket.send(view)
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                raise _stream_error(exc) from _cause(exc)

    async def wait_send_all_might_not_block(self) -> None:
        watch = self._watch
        if watch is not None and watch.ready & WRITE:
            await trio.lowlevel.checkpoint()
        else:
            await self._park_until(readable=False)

    async def send_eof(self) -> None:
        await self._before_call()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from _cause(exc)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def time_limit(self, seconds: float) -> None:
        """From the next call that has to wait, the calls may wait ``seconds`` in all; a
        wait that reaches the end raises :class:`trio.TooSlowError` (``inf``: no limit)."""
        self._limit = seconds
        self._deadline = math.inf
        self._expired = False

    # ------------------------------------------------------------------ synchronous helpers

    def close(self) -> None:
        """Close at once, without a checkpoint (a TCP socket has nothing to flush).

        A socket that waited is first taken out of the reactor's epoll set, waking a task
        that still waits with :class:`trio.ClosedResourceError` (see "Closing" in
        :mod:`egressd.net.readiness`: the kernel drops it from the set only when the last
        reference to the file goes).
        """
        watch = self._watch
        if watch is not None:
            self._watch = None
            watch.release(self.socket, "this socket was closed while waiting")
        self.socket.close()

    def unwatch(self) -> None:
        """The socket is about to be waited on elsewhere (the splice reactor): take it out
        of the reactor; a later wait registers it again."""
        watch = self._watch
        if watch is not None:
            self._watch = None
            watch.release(self.socket, "this socket was handed over while waiting")

    def fileno(self) -> int:
        return self.socket.fileno()

    # ------------------------------------------------------------------ scheduling

    async def _before_call(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._unparked += 1
        if self._unparked >= YIELD_EVERY:
            await self._yield_anyway()

    async def _yield_anyway(self) -> None:
        self._unparked = 0
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _start_watch(self) -> Watch:
        watch = self._watch = readiness.watch(self.socket)
        return watch

    async def _park_until(self, *, readable: bool) -> None:
        """Wait until the reactor reports the socket readable (or writable), within the
        time limit if there is one: the direction is not ready (EAGAIN, or a short read),
        so its bit is cleared and the task waits for the next event (one coroutine: the
        wait is here, not in a helper, as it is resumed through every frame above it)."""
        self._unparked = 0
        watch = self._watch or self._start_watch()
        task = trio.lowlevel.current_task()
        if readable:
            if watch.reader is not None:
                raise trio.BusyResourceError("another task is already reading this socket")
            watch.ready &= ~READ
            abort = watch.abort_read
        else:
            if watch.writer is not None:
                raise trio.BusyResourceError("another task is already writing this socket")
            watch.ready &= ~WRITE
            abort = watch.abort_write
        key = None
        if self._limit != math.inf:
            key = self._file_deadline(readable)
        if readable:
            watch.reader = task
        else:
            watch.writer = task
        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except trio.TooSlowError:
            # The deadline task ran before the reactor could report bytes (or room) that
            # came by the deadline: the caller tries its call once more, and its next
            # wait raises (_file_deadline). A limit replaced meanwhile: this wait raises.
            if not self._expired:
                raise
        finally:
            if key is not None:
                deadlines = self._deadlines
                assert deadlines is not None  # filed by _file_deadline
                waits = deadlines.waits
                waits.pop(key, None)
                if not waits:
                    deadlines.idle()

    def _file_deadline(self, readable: bool) -> tuple[Connection, bool]:
        """File the coming wait's deadline with the run's deadline task; its key there
        (raises :class:`trio.TooSlowError` when an earlier wait of this limit expired)."""
        if self._expired:
            raise trio.TooSlowError
        deadline = self._deadline
        if deadline == math.inf:
            deadline = self._deadline = trio.current_time() + self._limit
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = _deadlines()
        key = (self, readable)
        deadlines.file(key, deadline)
        return key

    def _expire(self, readable: bool, deadline: float) -> None:
        """The wait for ``readable`` (or writable) reached its ``deadline``: it raises
        :class:`trio.TooSlowError` (a wait in the other direction waits on), and when it
        is this limit's deadline, the next waits under it raise at once (the late wait
        itself first tries its call once more: see :meth:`_park_until`)."""
        if deadline == self._deadline:
            self._expired = True
        watch = self._watch
        if watch is not None:
            watch.wake(readable, trio.TooSlowError())


class _Deadlines:
    """The deadlines of the waits under a time limit, for one trio run (see the module doc):
    ``waits`` maps (connection, readable) to the deadline of that wait in progress.

    ``heap`` holds them by deadline, so a wake looks only at the waits due and the next
    one: a scan of every wait at each wake made a run of timeouts quadratic (8000 waits
    ending at their deadlines a millisecond apart, under MockClock: 13.8 s of CPU, against
    1.7 s with a cancel scope per wait and 1.8 s with this heap). A wait that ends leaves
    its entry behind (no heap call per wait): entries whose wait is gone are dropped when
    they come up, and the heap is rebuilt from ``waits`` once it holds more than twice
    their number (a long body's reads file the same deadline again and again)."""

    def __init__(self) -> None:
        self.waits: dict[tuple[Connection, bool], float] = {}
        self.heap: list[tuple[float, int, tuple[Connection, bool]]] = []
        self.filed = 0  # entries made: orders equal deadlines (keys do not compare)
        self.rebuild_at = _REBUILD_SLACK
        self.wake_at = math.inf
        self.sleep: trio.CancelScope | None = None

    def file(self, key: tuple[Connection, bool], deadline: float) -> None:
        self.waits[key] = deadline
        if self.filed >= self.rebuild_at:
            self._rebuild()  # this wait included: it is in ``waits`` already
        else:
            self.filed += 1
            heapq.heappush(self.heap, (deadline, self.filed, key))
        if deadline < self.wake_at:  # the task sleeps until later: wake it sooner
            self.wake_at = deadline
            if self.sleep is not None:
                self.sleep.deadline = deadline

    def _rebuild(self) -> None:
        """The heap again from ``waits``: one entry per wait in progress."""
        first = self.filed
        self.heap = [(d, first + i, key) for i, (key, d) in enumerate(self.waits.items())]
        heapq.heapify(self.heap)
        self.filed = first + len(self.heap)
        self.rebuild_at = self.filed + len(self.heap) + _REBUILD_SLACK

    def idle(self) -> None:
        """No wait is in progress: forget the heap's entries and sleep until a wait is
        filed. A deadline left behind would wake the task for nothing, and under MockClock's
        autojump it would move the clock there whenever the run waits on a thread or real
        I/O (a wait under a 300 s limit answered at once, then a thread: the clock read
        300)."""
        self.heap.clear()
        self.rebuild_at = self.filed + _REBUILD_SLACK
        if self.wake_at != math.inf:
            self.wake_at = math.inf
            if self.sleep is not None:
                self.sleep.deadline = math.inf

    async def expire(self) -> None:
        """The deadline task: sleep until the earliest deadline filed, then wake the waits
        that reached theirs."""
        while True:
            with trio.CancelScope(deadline=self.wake_at) as self.sleep:
                await trio.sleep_forever()
            self.sleep = None
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        waits, heap = self.waits, self.heap
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            if waits.get(key) == deadline:  # still waiting under this deadline
                del waits[key]
                key[0]._expire(key[1], deadline)
        while heap and waits.get(heap[0][2]) != heap[0][0]:  # that wait has ended
            heapq.heappop(heap)
        self.wake_at = heap[0][0] if heap else math.inf


_REBUILD_SLACK = 1024
"""Entries the heap may hold beyond twice the waits in progress before it is rebuilt."""


_DEADLINES: trio.lowlevel.RunVar[_Deadlines] = trio.lowlevel.RunVar("egressd_deadlines")


def _deadlines() -> _Deadlines:
    try:
        return _DEADLINES.get()
    except LookupError:
        deadlines = _Deadlines()
        trio.lowlevel.spawn_system_task(deadlines.expire, name="egressd connection deadlines")
        _DEADLINES.set(deadlines)
        return deadlines


class TimedStream(trio.abc.HalfCloseableStream):
    """Any stream with :meth:`Connection.time_limit`: each call runs under a cancel scope
    with the deadline (counted from the first call after the limit was set), and raises
    :class:`trio.TooSlowError` when the scope fires (for the streams that are not a
    :class:`Connection`: a memory stream in a test)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._limit = math.inf
        self._deadline = math.inf

    def time_limit(self, seconds: float) -> None:
        """As :meth:`Connection.time_limit`, counted from the next call."""
        self._limit = seconds
        self._deadline = math.inf

    def _call_deadline(self) -> float:
        if self._limit != math.inf and self._deadline == math.inf:
            self._deadline = trio.current_time() + self._limit
        return self._deadline

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.CancelScope(deadline=self._call_deadline()):
            return await self.stream.receive_some(max_bytes)
        raise trio.TooSlowError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.CancelScope(deadline=self._call_deadline()) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise trio.ClosedResourceError("this stream cannot send EOF alone")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def clock() -> Callable[[], float]:
    """The current trio run's clock as a function: what ``trio.current_time`` returns,
    without its three Python calls on the way to the clock (read twice a message body)."""
    return trio.lowlevel.current_clock().current_time


def timed(stream: trio.abc.Stream) -> Connection | TimedStream:
    """``stream`` itself when it has :meth:`~Connection.time_limit` (a Connection), else a
    :class:`TimedStream` around it."""
    if isinstance(stream, (Connection, TimedStream)):
        return stream
    return TimedStream(stream)


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def _cause(exc: OSError) -> OSError | None:
    return None if exc.errno in _CLOSED_ERRNOS else exc


# --------------------------------------------------------------------------- bare sockets
# The dialer's non-blocking connect and the listeners' accept wait on a socket before there
# is a Connection; trio.lowlevel stays in this module and the splice reactor (ruff TID251).

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable


def close_socket(sock: socket.socket) -> None:
    """Close a socket trio may be waiting on (trio must hear of it first)."""
    trio.lowlevel.notify_closing(sock)
    sock.close()
