"""How many sessions each worker holds, shared in memory, so that a busy worker lets an idle
one accept first.

Theory of operation
-------------------
Workers accept on the same listening sockets (:mod:`egressd.supervisor`). The kernel wakes
every worker waiting on a socket, and the first to run takes the connection; on a busy
machine that is the worker already running, the busiest one, so a burst of connections
(an MTA opening 50 sessions at once) can land on one worker while the other idles. (That
every waiting worker is woken is also what makes a deferral safe: the worker that defers
is never the only one told about the connection. An exclusive wake-up would tell one, and
the ones measured gave nearly every connection to the same worker; see
:mod:`egressd.net.listen`.)

The supervisor creates a :class:`SessionBoard`: one 8-byte slot per possible worker in a
shared memory file (``memfd_create``), which every worker maps, after a header slot that
holds how many workers there are now (:meth:`SessionBoard.set_workers`), so that a look
covers only those. A worker's :class:`WorkerShare` writes its number of open connections
into its slot at every accept and every close (one aligned store: no lock, no system
call). It counts at the accept itself, not when the session starts: a worker takes a burst
of waiting connections back to back before their sessions run (:mod:`egressd.net.listen`),
and a count that waited for them let one worker take a whole burst (smtp-source opening 50
sessions at once: 50 and 0).
Before it accepts, a worker compares its count with the least busy worker's
(:meth:`SessionBoard.defer_for`): more than :data:`SLACK` above it, it waits
:data:`DEFER_PER_SESSION` per session of difference (at most :data:`MAX_DEFER`), so that
an idle worker woken for the same connection takes it; a connection still there after the
wait is accepted (nothing waits for long when the other worker is slow to run).
"""

from __future__ import annotations

import mmap
import os

SLOT = 8
SLACK = 2
"""Sessions above the least busy worker's that a worker accepts without deferring."""
DEFER_PER_SESSION = 0.0005
MAX_DEFER = 0.005
NOT_SERVING = 2**62
"""The count of a worker that is starting or gone: never the least busy."""


class SessionBoard:
    """Open sessions per worker, in memory shared by the supervisor and its workers."""

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        """Slots: the most workers the board can hold."""
        self._map = mmap.mmap(fd, SLOT * (workers + 1))
        self._slots = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, workers: int) -> SessionBoard:
        """A new board (the supervisor's); ``fd`` is inherited by the workers it starts."""
        fd = os.memfd_create("egressd-sessions", 0)
        os.ftruncate(fd, SLOT * (workers + 1))
        os.set_inheritable(fd, False)
        board = cls(fd, workers)
        for worker in range(1, workers + 1):
            board.set(worker, NOT_SERVING)
        board.set_workers(workers)
        return board

    def set_workers(self, count: int) -> None:
        """Workers 1 to ``count`` are the ones that count now (the supervisor's)."""
        self._slots[0] = min(count, self.workers)

    def set(self, worker: int, sessions: int) -> None:
        """Worker ``worker`` (1-based) holds ``sessions`` open sessions."""
        self._slots[worker] = sessions

    def get(self, worker: int) -> int:
        return int(self._slots[worker])

    def defer_for(self, worker: int) -> float:
        """Seconds ``worker`` should wait before it accepts (0: accept now)."""
        slots = self._slots
        excess = slots[worker] - min(slots[1 : slots[0] + 1]) - SLACK
        return 0.0 if excess <= 0 else min(MAX_DEFER, DEFER_PER_SESSION * excess)

    def close(self) -> None:
        self._slots.release()
        self._map.close()
        os.close(self.fd)


class WorkerShare:
    """One worker's slot on the board, kept by its accept loops: connections accepted and
    not closed yet. Nothing is written before :meth:`serving` (the slot says
    :data:`NOT_SERVING` while the worker starts)."""

    def __init__(self, board: SessionBoard, worker: int) -> None:
        self.board = board
        self.worker = worker
        self.held = 0
        self._serving = False

    def serving(self) -> None:
        """The worker is ready: its count starts to matter to the others."""
        self._serving = True
        self.board.set(self.worker, self.held)

    def defer(self) -> float:
        """Seconds to wait before the next accept (:meth:`SessionBoard.defer_for`)."""
        return self.board.defer_for(self.worker)

    def accepted(self) -> None:
        self.held += 1
        if self._serving:
            self.board.set(self.worker, self.held)

    def closed(self) -> None:
        self.held -= 1
        if self._serving:
            self.board.set(self.worker, self.held)
