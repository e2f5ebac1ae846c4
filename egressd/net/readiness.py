"""The run's edge-triggered reactor for :class:`~egressd.net.connection.Connection` waits.

Theory of operation
-------------------
A Connection tries its system call first and waits only when the kernel said EAGAIN (see
:mod:`egressd.net.connection`). With trio's ``wait_readable`` / ``wait_writable`` every
such wait costs an ``epoll_ctl``: trio registers a descriptor with EPOLLONESHOT and
re-arms it with EPOLL_CTL_MOD at every wait (EPOLL_CTL_ADD, after a failed MOD, at the
first). The SMTP door is lock-step, so it waits about seven times per message: measured
with perf under ``smtp-source -s 50 -d`` (10 KiB, into ``smtp-sink``), 7.0 epoll_ctl per
message, 7.7% of egressd's CPU, while epoll_wait ran 0.15 times per message (trio's
loop gathers some fifty events per turn).

Here one *system task per trio run* owns an epoll set in which a connection's socket is
registered once, at its first wait, edge-triggered for everything it could wait for
(``EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET``), and stays registered until the
connection closes or hands its socket over (:meth:`Watch.release`). The task waits on
the set's own descriptor with trio's ``wait_readable`` (so trio re-arms one descriptor
once per reactor turn, not one per connection wait), then polls it with timeout 0 and,
for each event, records the readiness in the connection's :class:`Watch` and reschedules
the task waiting for it (``trio.lowlevel.reschedule``).

Reactor turns
    After each batch the task parks on the set again (one ``epoll_ctl`` on trio's set and
    one ``epoll_wait`` on its own per batch, whatever the batch's size). The splice
    reactor instead yields and polls again, parking only when a poll finds nothing; here
    that cost more than it saved: a task step and a poll that usually found nothing
    before the same re-arm (a short SOCKS5 session: 13 Python calls more,
    ``scripts/bench socks-calls --sessions 300``), and under the SMTP load its polls
    saved 0.1 ``epoll_ctl`` per message. The price of the reactor is that task step: a
    wait is woken by trio's loop waking the reactor, which then wakes the waiting task,
    so a connection that waits once in its life (a SOCKS5 client, between its greeting
    and its request) gains nothing from it (see the figures below).

The edge-trigger rules
    With EPOLLET the kernel queues an event for a socket when its state changes (a new
    segment, a FIN, send space freed after the buffer was full), and epoll_wait reports
    the socket's readiness as of that call; it does not report it again until the next
    change. So :attr:`Watch.ready` remembers it: a direction's bit is set by an event and
    cleared only by the connection itself, when a system call proved the direction not
    ready: EAGAIN, or a receive that got fewer bytes than asked (it emptied the kernel's
    queue; an EOF, ``b""``, is permanent and clears nothing). A connection then waits only
    with its bit clear, and any byte that arrives after the call that cleared it queues a
    new event. Nothing can slip between the failed call and the park: trio is one thread
    and the reactor runs only when the connection's task yields, which it does only to
    park. An event queued before the call and reported after it (the bytes it announced
    were read meanwhile) can only set a bit that is not true any more: the next call
    then meets EAGAIN and waits, one system call lost, never a wake-up. A bit starts set
    (a new registration is ready until proved not), and registering queues an event at
    once for a socket that is ready, as EPOLL_CTL_ADD polls the socket.

Closing
    The kernel drops a descriptor from an epoll set only when the last reference to the
    open file goes, not when the descriptor is closed: a copy of it (a forked child until
    it execs, a ``dup``) would keep the registration alive, reporting the old socket's
    events under a number the next socket may be given. So a connection takes its
    socket out of the set itself (EPOLL_CTL_DEL) before closing it, and before handing
    it to another waiter (the splice reactor, :mod:`egressd.net.zerocopy`, which watches
    it with an epoll set of its own: events queued here too would be reactor turns for
    nothing and kernel memory held while the spliced session idles). Releasing wakes a
    task still waiting with :class:`trio.ClosedResourceError`. A socket closed behind the
    connection's back (its garbage collection) leaves a :class:`Watch` here that the next
    registration of its number replaces; its events, should a copy of the file still
    exist, are at worst a wake-up that meets EAGAIN and waits again.

Cancellation: a waiting task's abort function forgets it (``Abort.SUCCEEDED``); an event
that comes later only sets the bit, so the next call tries first and finds the bytes.
A time limit's deadline (the deadline task in :mod:`egressd.net.connection`) wakes
exactly the late wait with :class:`trio.TooSlowError` (:meth:`Watch.wake`); the other
direction's wait, if any, waits on.

Measured (main with the short-read rule alone as the baseline)
    perf under ``smtp-source -s 50 -d`` (10 KiB, into ``smtp-sink``), per message:
    epoll_ctl 7.04 -> 0.11 to 0.22, epoll_wait 0.20 -> 0.56 to 0.66, recvfrom and sendto
    unchanged at 7.0 each. ``scripts/bench smtp --baseline DIR --rounds 5 --seconds 3``,
    CPU per message: -7% with PIPELINING and -6% without (0.322 -> 0.299 ms, 0.343 ->
    0.322), then -5% and -10% in a run on a busier machine with the reactor parking after
    every batch (0.361 -> 0.344, 0.429 -> 0.385). Short SOCKS5 sessions pay for it: their
    client waits once (for the request after the greeting), and that wait now costs the
    reactor's task step, a registration and its removal when the socket is spliced:
    ``scripts/bench relay --baseline DIR --repeat 3 --sessions 3000 --gib 0 --idle 0``
    read 0.433 -> 0.455 ms of CPU per session (+3 to +5%), ``scripts/bench socks-calls
    --sessions 300`` 875 -> 921 Python calls per session. RSS per idle spliced session
    (``--sessions 0 --gib 0 --idle 10000``): 6.27 -> 6.06 KiB (the Connection lost four
    attributes; a spliced socket is not registered here).

Memory: a registered connection costs a :class:`Watch` (four slots) and a dict entry
here, and the kernel an epitem and its wait-queue hook (about 192 bytes of slab per
socket); a connection that never waited is not registered.
"""

from __future__ import annotations

import errno
import select
import socket

import outcome
import trio

__all__ = ["HUNG_UP", "READ", "WRITE", "Watch", "watch"]

READ = 1
""":attr:`Watch.ready` bit: a receive may find bytes (or the EOF, or an error)."""
WRITE = 2
""":attr:`Watch.ready` bit: a send may find room."""
HUNG_UP = 4
""":attr:`Watch.ready` bit: the peer's FIN came (or the socket failed), so a read never
has to wait again and a short read does not clear :data:`READ`."""

_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HUNG_UP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_EVENTS_PER_POLL = 512
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.EBADF})


class Watch:
    """One registered socket's readiness (:data:`READ`, :data:`WRITE` bits) and the tasks
    waiting on it, at most one per direction."""

    __slots__ = ("reactor", "reader", "ready", "writer")

    def __init__(self, reactor: _Reactor) -> None:
        self.reactor = reactor
        self.ready = READ | WRITE
        self.reader: trio.lowlevel.Task | None = None
        self.writer: trio.lowlevel.Task | None = None

    def on_event(self, events: int) -> None:
        """The reactor polled ``events`` for the socket: set the bits, wake the waiters."""
        if events & _READ_EVENTS:
            self.ready |= READ | HUNG_UP if events & _HUNG_UP_EVENTS else READ
            task = self.reader
            if task is not None:
                self.reader = None
                trio.lowlevel.reschedule(task)
        if events & _WRITE_EVENTS:
            self.ready |= WRITE
            task = self.writer
            if task is not None:
                self.writer = None
                trio.lowlevel.reschedule(task)

    def abort_read(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self.reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def abort_write(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self.writer = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self, readable: bool, error: BaseException) -> None:
        """Wake the task waiting for ``readable`` (or writable), if any, with ``error``."""
        if readable:
            task, self.reader = self.reader, None
        else:
            task, self.writer = self.writer, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(error))

    def release(self, sock: socket.socket, why: str) -> None:
        """Take ``sock`` out of the reactor (before it is closed or handed over): wake its
        waiters with :class:`trio.ClosedResourceError` (``why``)."""
        reactor = self.reactor
        fd = sock.fileno()
        if fd != -1:  # else closed already: the number may be another socket's now
            if reactor.watches.get(fd) is self:
                del reactor.watches[fd]
            try:
                reactor.epoll.unregister(fd)
            except (OSError, ValueError) as exc:  # ValueError: the run (and its set) ended
                if isinstance(exc, OSError) and exc.errno not in _GONE_ERRNOS:
                    raise  # pragma: no cover - epoll_ctl(DEL) fails only for those
        if self.reader is not None:
            self.wake(True, trio.ClosedResourceError(why))
        if self.writer is not None:
            self.wake(False, trio.ClosedResourceError(why))


class _Reactor:
    """The epoll set of this trio run's waiting connections, served by a system task."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.watches: dict[int, Watch] = {}

    def watch(self, fd: int) -> Watch:
        watch = Watch(self)
        try:
            self.epoll.register(fd, _EVENTS)
        except FileExistsError:  # the same open file under the same number, registered
            self.epoll.modify(fd, _EVENTS)  # by a Connection that was not closed
        self.watches[fd] = watch
        return watch

    async def serve(self) -> None:
        epoll = self.epoll
        epoll_fd = epoll.fileno()
        watches = self.watches
        try:
            while True:
                # Parked on the set after every batch, not polling it again after a yield:
                # a poll that finds nothing costs a task step, a system call and then the
                # re-arm anyway (see "Reactor turns" in the module doc).
                await trio.lowlevel.wait_readable(epoll_fd)
                for fd, ready in epoll.poll(0, _EVENTS_PER_POLL):
                    watch = watches.get(fd)
                    if watch is not None:
                        watch.on_event(ready)
        finally:
            trio.lowlevel.notify_closing(epoll_fd)
            epoll.close()


_REACTOR: trio.lowlevel.RunVar[_Reactor] = trio.lowlevel.RunVar("egressd_wait_reactor")


def watch(sock: socket.socket) -> Watch:
    """Register ``sock`` with this run's reactor (started at the first call); its
    :class:`Watch`. Raises :class:`trio.ClosedResourceError` for a closed socket."""
    fd = sock.fileno()
    if fd == -1:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        reactor = _REACTOR.get()
    except LookupError:
        reactor = _Reactor()
        trio.lowlevel.spawn_system_task(reactor.serve, name="egressd connection reactor")
        _REACTOR.set(reactor)
    try:
        return reactor.watch(fd)
    except OSError as exc:  # pragma: no cover - a descriptor epoll refuses (not a socket)
        raise trio.BrokenResourceError(f"cannot wait on this socket: {exc}") from exc
