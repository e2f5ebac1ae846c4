"""Open sessions per worker in shared memory: a busier worker defers its accepts."""

from __future__ import annotations

import os
import socket

import trio

from egressd.config import Endpoint
from egressd.net.balance import MAX_DEFER, NOT_SERVING, SLACK, SessionBoard, WorkerShare
from egressd.net.connection import Connection
from egressd.net.listen import accept_loop, open_listener


def test_a_worker_defers_only_when_busier_than_the_least_busy_serving_worker() -> None:
    board = SessionBoard.create(2)
    seen_by_worker = SessionBoard(os.dup(board.fd), 2)  # the same memory, as a worker maps it
    try:
        assert board.get(1) == board.get(2) == NOT_SERVING  # nobody serves yet
        seen_by_worker.set(1, 0)
        assert board.defer_for(1) == 0.0  # the other does not serve: never defer for it
        seen_by_worker.set(2, 0)
        board.set(1, 2)
        assert board.defer_for(1) == 0.0  # within the slack
        board.set(1, 5)
        assert seen_by_worker.defer_for(1) == 0.0015
        assert seen_by_worker.defer_for(2) == 0.0
        board.set(1, 500)
        assert board.defer_for(1) == MAX_DEFER
    finally:
        seen_by_worker.close()
        board.close()


def test_only_the_current_workers_count() -> None:
    board = SessionBoard.create(3)
    try:
        board.set_workers(2)  # worker 3 retired at a reload; its slot says 0
        board.set(1, 5)
        board.set(2, 5)
        board.set(3, 0)
        assert board.defer_for(1) == 0.0
        board.set_workers(3)
        assert board.defer_for(1) == 0.0015
    finally:
        board.close()


async def test_a_burst_of_waiting_connections_is_shared_between_two_workers(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two workers' accept loops on one listening socket (in one process here) with 20
    connections already waiting: each worker counts a connection at its accept, so the
    first to run defers once it holds more than the slack and the other takes its share.
    Counted when the session starts, the first took all 20 in one burst."""
    board = SessionBoard.create(2)
    listener = open_listener(Endpoint("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(20)]
    served: dict[int, int] = {1: 0, 2: 0}
    release = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            for worker in (1, 2):
                share = WorkerShare(board, worker)
                share.serving()

                async def hold(connection: Connection, worker: int = worker) -> None:
                    served[worker] += 1
                    await release.wait()

                own = listener.dup()  # each worker has its own descriptor of the socket
                own.setblocking(False)
                nursery.start_soon(accept_loop, own, hold, nursery, share)
            while sum(served.values()) < 20:
                await trio.sleep(0.01)
            assert board.get(1) + board.get(2) == 20  # open connections, on the board
            release.set()
            while board.get(1) or board.get(2):  # every close counted back
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        listener.close()
        board.close()
    assert abs(served[1] - served[2]) <= 2 * SLACK, served


async def test_a_connection_never_waits_for_a_busy_worker_while_another_is_idle(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Every worker waiting on the shared socket is woken for a connection (no exclusive
    wake-up), so the busy worker's deferral delays nobody: with worker 1 holding ten
    sessions and worker 2 none, each of five connections made while both wait is taken by
    worker 2 at once, with no time gone by on the clock (worker 1 defers 4 ms each time)."""
    board = SessionBoard.create(2)
    listener = open_listener(Endpoint("127.0.0.1", 0))
    taken: list[tuple[int, float]] = []
    accepted = trio.Event()
    clients = []
    try:
        async with trio.open_nursery() as nursery:
            shares = {worker: WorkerShare(board, worker) for worker in (1, 2)}
            for worker, share in shares.items():
                share.serving()

                async def hold(connection: Connection, worker: int = worker) -> None:
                    taken.append((worker, trio.current_time()))
                    accepted.set()
                    await trio.sleep_forever()

                own = listener.dup()
                own.setblocking(False)
                nursery.start_soon(accept_loop, own, hold, nursery, share)
            for _ in range(10):
                shares[1].accepted()  # worker 1 is busy
            assert board.defer_for(1) > 0.0 and board.defer_for(2) == 0.0
            for _ in range(5):
                await trio.testing.wait_all_tasks_blocked()  # both wait on the socket
                started = trio.current_time()
                clients.append(socket.create_connection(listener.getsockname()))
                await accepted.wait()
                accepted = trio.Event()
                assert taken[-1] == (2, started)
                await trio.sleep(MAX_DEFER)  # worker 1's deferral runs out, it waits again
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        listener.close()
        board.close()
    assert [worker for worker, _ in taken] == [2] * 5
