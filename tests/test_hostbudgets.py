"""The supervisor's book of the host's shared budgets (egressd.hostbudgets): the ops of the
shared ledger, answered exactly for every worker, and a dead worker's slots returned."""

from __future__ import annotations

import pytest

from egressd.hostbudgets import BudgetBook, BudgetRequestError

TIMEOUT_MS = "30000"
LEASES = "egressd:leases:connection_limit:a:mx.example:2"
GCRA = "egressd:gcra:max_message_rate:a:mx.example:10:10:60"
SECOND = 1_000_000


def acquire(book: BudgetBook, worker: int, member: str, now_us: int = 0) -> tuple[int, int]:
    reply = book.run(worker, [LEASES], [TIMEOUT_MS, "A", member, "2", "", ""], now_us)
    return reply[0], reply[1]


def take(book: BudgetBook, quantity: int, now_us: int) -> tuple[int, int]:
    reply = book.run(1, [GCRA], ["0", "T", "10", "60", "10", str(quantity)], now_us)
    return reply[0], reply[1]


def test_a_connection_limit_holds_across_workers_and_a_release_frees_a_slot() -> None:
    book = BudgetBook()
    assert acquire(book, 1, "w1/1") == (1, 0)
    assert acquire(book, 2, "w2/1") == (1, 0)
    refused, wait_ms = acquire(book, 2, "w2/2", now_us=1_000_000)
    assert refused == 0 and wait_ms == 29_000  # until the first slot's lease runs out
    book.run(1, [LEASES], [TIMEOUT_MS, "R", "w1/1", "", "", ""], 2_000_000)
    assert acquire(book, 2, "w2/2", now_us=2_000_000) == (1, 0)
    assert book.open_slots(LEASES, 2_000) == 2


def test_a_dead_workers_slots_return_at_once() -> None:
    book = BudgetBook()
    acquire(book, 1, "w1/1")
    acquire(book, 1, "w1/2")
    assert acquire(book, 2, "w2/1")[0] == 0
    assert book.forget(1) == 2
    assert acquire(book, 2, "w2/1") == (1, 0)


def test_slots_expire_unless_renewed_and_a_renewal_registers_a_missing_slot() -> None:
    book = BudgetBook()
    acquire(book, 1, "w1/1")
    book.run(2, [LEASES], [TIMEOUT_MS, "N", "w2/9", "", "", ""], 0)  # opened while away
    assert book.open_slots(LEASES, 0) == 2
    book.run(1, [LEASES], [TIMEOUT_MS, "N", "w1/1", "", "", ""], 20 * SECOND)
    assert acquire(book, 1, "w1/2", now_us=31 * SECOND) == (1, 0)  # w2/9 ran out
    assert acquire(book, 1, "w1/3", now_us=31 * SECOND)[0] == 0


def test_cells_come_in_batches_up_to_the_burst_then_at_the_rate_and_can_be_given_back() -> None:
    book = BudgetBook()
    assert take(book, 4, 0) == (4, 0)
    assert take(book, 10, 0) == (6, 0)  # what is left of the burst of 10
    granted, wait_us = take(book, 1, 0)
    assert granted == 0 and wait_us == 6 * SECOND  # one emission interval: 60 s / 10
    assert take(book, 1, 6 * SECOND) == (1, 0)
    book.run(1, [GCRA], ["0", "G", "10", "60", "10", "1"], 6 * SECOND)
    assert take(book, 1, 6 * SECOND) == (1, 0)  # the cell given back


def test_heartbeats_count_the_live_workers() -> None:
    book = BudgetBook()
    beat = ["0", "H", "w1", "3000", "", ""]
    assert book.run(1, ["egressd:nodes"], beat, 0) == [1, 0]
    assert book.run(2, ["egressd:nodes"], ["0", "H", "w2", "3000", "", ""], 0) == [2, 0]
    book.forget(2)
    assert book.run(1, ["egressd:nodes"], beat, 0) == [1, 0]


@pytest.mark.parametrize(
    "args",
    [
        ["0", "A"],
        ["x", "A", "m", "1", "", ""],
        ["0", "Z", "", "", "", ""],
        ["0", "A", "m", "x", "", ""],
    ],
)
def test_a_malformed_batch_is_refused(args: list[str]) -> None:
    with pytest.raises(BudgetRequestError):
        BudgetBook().run(1, [LEASES], args, 0)
