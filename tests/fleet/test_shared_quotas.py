"""Warm-up quotas shared by two processes through one store (the supervisor's book, on a
fake clock): the day's quota holds across them, unused tickets move over, a message sent
without a ticket still counts, an outage gives local shares, and a new day a new count."""

from __future__ import annotations

import sys
from pathlib import Path

from fake_clock import FakeClock

sys.path.insert(0, str(Path(__file__).parent.parent / "warmup"))
from warmup_helpers import DAY, at, engine

from egressd.fleet.budgets import encode
from egressd.fleet.quotas import SharedQuotas
from egressd.hostbudgets import BudgetBook
from egressd.shaping.ledger import Op

QUOTA = 10  # warmup_helpers' plan, first step, provider "other"


class Process:
    def __init__(self, number: int, book: BudgetBook, clock: FakeClock) -> None:
        self.number, self.book, self.clock = number, book, clock
        self.quotas = SharedQuotas(engine(clock), linger=0.5)

    def run(self, ops: list[Op]) -> list[tuple[int, int]]:
        keys, args = encode(ops, 30_000)
        reply = self.book.run(self.number, keys, args, round(self.clock() * 1_000_000))
        return list(zip(reply[0::2], reply[1::2], strict=True))

    def prepare(self) -> None:
        wants = self.quotas.wants(["ip-1"], "other")
        if wants:
            self.quotas.granted(wants, self.run([want.op for want in wants]))

    def send(self) -> bool:
        """One message as the executor and the door handle it: True when it went."""
        self.prepare()
        if self.quotas.refusal("ip-1", "other") is not None:
            return False
        assert self.quotas.reserve("ip-1", "other")
        self.quotas.record("ip-1", "other", "sent", reserved=True)
        return True

    def flush(self) -> None:
        ops = self.quotas.returns()
        if ops:
            self.run(ops)


def two_processes() -> tuple[Process, Process, FakeClock]:
    clock = FakeClock(at("2026-11-30T10:00:00+00:00"))
    book = BudgetBook()
    return Process(1, book, clock), Process(2, book, clock), clock


def test_two_processes_send_exactly_the_days_quota_together() -> None:
    one, two, _ = two_processes()
    sent = [process.send() for _ in range(QUOTA) for process in (one, two)]
    assert sent.count(True) == QUOTA
    refusal = one.quotas.refusal("ip-1", "other")
    assert refusal is not None and "across the fleet" in refusal
    # each engine counted only its own messages: alone, it would have sent QUOTA more
    used = [p.quotas.engine.quota("ip-1", "other") for p in (one, two)]
    assert sum(q.used for q in used if q is not None) == QUOTA
    assert all(q is not None and q.used < QUOTA for q in used)


def test_a_ticket_given_back_moves_to_the_other_process_after_the_linger() -> None:
    one, two, clock = two_processes()
    for _ in range(QUOTA - 1):
        assert one.send()
    one.prepare()  # the last ticket, held by a plan that then moves to another source
    assert one.quotas.reserve("ip-1", "other")
    one.quotas.release("ip-1", "other")
    assert not two.send()  # still spare in process one
    one.flush()
    assert not two.send()  # within the linger
    clock.advance(0.6)
    one.flush()
    assert two.send() and not two.send() and not one.send()


def test_a_message_counted_without_a_ticket_is_added_to_the_count() -> None:
    one, two, _ = two_processes()
    for _ in range(QUOTA - 2):
        assert one.send()
    one.quotas.record("ip-1", "other", "sent")  # a kept connection gave its hold back first
    one.flush()
    assert two.send() and not two.send()


def test_an_outage_gives_local_shares_and_what_was_sent_meanwhile_counts_after() -> None:
    one, two, _ = two_processes()
    assert one.send() and two.send()
    one.quotas.went_down(nodes=2)
    sent = 0
    while one.send():
        sent += 1
    assert sent == QUOTA // 2 - 1  # its share, less the one it had sent
    assert "local share" in (one.quotas.refusal("ip-1", "other") or "")
    one.quotas.came_back()
    one.flush()  # the messages sent meanwhile go into the store's count
    sent_by_two = 0
    while two.send():
        sent_by_two += 1
    assert 1 + 1 + sent + sent_by_two == QUOTA


def test_a_new_day_has_a_new_count_and_yesterdays_spares_are_dropped() -> None:
    one, two, clock = two_processes()
    while one.send():
        pass
    one.prepare()
    clock.advance(DAY)
    assert one.quotas.returns() == []  # nothing to give back to yesterday's counter
    assert two.send()


def test_after_a_restart_the_days_messages_read_back_count_in_the_new_store() -> None:
    one, two, _ = two_processes()
    for process in (one, two):  # both engines read back 6 messages of today
        for _ in range(6):
            process.quotas.engine.record("ip-1", "other", "sent")
    sent = [process.send() for _ in range(QUOTA) for process in (one, two)]
    assert sent.count(True) == QUOTA - 6


def test_a_day_the_fleet_used_is_a_sending_day_for_each_process() -> None:
    one, two, clock = two_processes()
    sent = [process.send() for _ in range(QUOTA) for process in (one, two)]
    assert sent.count(True) == QUOTA  # each process sent half: alone, not a sending day
    for process in (one, two):
        looks = process.quotas.looks()
        process.quotas.granted(looks, process.run([look.op for look in looks]))
    clock.advance(DAY)
    steps = [p.quotas.engine.quota("ip-1", "other") for p in (one, two)]
    assert [q.step if q is not None else None for q in steps] == [1, 1]
    events = [e for e in one.quotas.engine.take_batch().events if e.kind == "advanced"]
    assert f"{QUOTA} of {QUOTA} messages" in events[0].reason
