"""Open sessions per worker in shared memory: a busier worker defers its accepts."""

from __future__ import annotations

import os

from egressd.net.balance import MAX_DEFER, NOT_SERVING, SessionBoard


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
