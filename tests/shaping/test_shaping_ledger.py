"""The shared ledger on a fake clock: two nodes, one store, holdings asked for ahead.

The store here is a model of the Redis scripts of :mod:`egressd.fleet.budgets` (a lease set
scored by expiry, a GCRA that grants up to a batch and takes cells back, a counter that
expires and never passes its limit), on the same fake clock; tests/fleet/ runs the real
scripts on a real redis-server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fake_clock import FakeClock
from shaping_helpers import policy_from

from egressd.shaping.ledger import (
    AcquireSlot,
    GiveBackCells,
    GiveBackCount,
    Holding,
    Op,
    ReleaseSlots,
    RenewSlots,
    SharedLedger,
    TakeCount,
    batch_size,
    share_of_limit,
    share_of_throttle,
)
from egressd.shaping.shaper import Lease, Refusal, Shaper
from egressd.shaping.sites import Destination
from egressd.shaping.throttle import NANOS, ThrottleSpec

SITE = Destination("mx.big.example", "big.example", ("mx.big.example",))
LEASE_TIMEOUT = 30.0


class ModelStore:
    """Lease sets and GCRAs as the Lua scripts keep them, on ``clock``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sets: dict[str, dict[str, float]] = {}
        self.tats: dict[str, float] = {}
        self.counters: dict[str, tuple[int, float]] = {}
        self.calls = 0

    def run(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        self.calls += 1
        return [self.one(op) for op in ops]

    def one(self, op: Op) -> tuple[int, int]:
        now = self.clock()
        if isinstance(op, AcquireSlot):
            members = self.live(op.store_key)
            if len(members) >= op.limit:
                return 0, math.ceil((min(members.values()) - now) * 1000)
            members[op.member] = now + LEASE_TIMEOUT
            return 1, 0
        if isinstance(op, ReleaseSlots):
            for member in op.members:
                self.live(op.store_key).pop(member, None)
            return 0, 0
        if isinstance(op, RenewSlots):
            for member in op.members:
                self.live(op.store_key)[member] = now + LEASE_TIMEOUT
            return 0, 0
        if isinstance(op, TakeCount | GiveBackCount):
            return self.count(op, now)
        interval = op.spec.period / op.spec.limit
        tat = max(self.tats.get(op.store_key, now), now)
        if isinstance(op, GiveBackCells):
            self.tats[op.store_key] = tat - op.quantity * interval
            return 0, 0
        room = op.spec.burst + math.floor((now - tat) / interval + 1e-9)
        granted = min(op.quantity, room)
        if granted < 1:
            return 0, math.ceil((tat + interval - interval * op.spec.burst - now) * 1e6)
        self.tats[op.store_key] = tat + granted * interval
        return granted, 0

    def count(self, op: TakeCount | GiveBackCount, now: float) -> tuple[int, int]:
        used, expiry = self.counters.get(op.store_key, (0, now))
        if expiry <= now:
            used = 0
            if isinstance(op, GiveBackCount):
                self.counters.pop(op.store_key, None)
                return 0, 0
        if isinstance(op, GiveBackCount):
            self.counters[op.store_key] = (max(0, used - op.quantity), now + op.ttl_ms / 1000)
            return 0, 0
        granted = min(op.quantity, op.limit - used)
        if granted < 1:
            return 0, used
        self.counters[op.store_key] = (used + granted, now + op.ttl_ms / 1000)
        return granted, used + granted

    def live(self, key: str) -> dict[str, float]:
        members = self.sets.setdefault(key, {})
        for member in [m for m, expiry in members.items() if expiry <= self.clock()]:
            del members[member]
        return members


class Node:
    """One egressd node: its shaper over a shared ledger, and the shell's part, inline."""

    def __init__(self, name: str, shaping: str, store: ModelStore, clock: FakeClock) -> None:
        self.ledger = SharedLedger(name)
        self.shaper = Shaper(policy_from(shaping), clock, ledger=self.ledger)
        self.store = store
        self.clock = clock

    def now(self) -> int:
        return round(self.clock() * NANOS)

    def prepare_open(self, holding: Holding, source: str = "a") -> None:
        if self.ledger.down:
            return
        budgets = self.shaper.limits(source, SITE).budgets
        wants = self.ledger.wants_to_open(holding, budgets)
        if wants:
            results = self.store.run([want.op for want in wants])
            self.ledger.granted(wants, results, self.now())

    def open(self, source: str = "a") -> Lease | Refusal:
        holding = Holding()
        self.prepare_open(holding, source)
        lease = self.shaper.open(source, SITE, holding)
        self.ledger.settle(holding, self.now())
        return lease

    def send(self, lease: Lease) -> Refusal | None:
        assert lease.holding is not None
        if not self.ledger.down:
            wants = self.ledger.wants_to_send(lease.holding, lease.limits.budgets)
            if wants:
                results = self.store.run([want.op for want in wants])
                self.ledger.granted(wants, results, self.now())
        return lease.send()

    def flush(self, *, everything: bool = False) -> None:
        ops = self.ledger.returns(self.now(), everything=everything)
        if ops:
            self.store.run(ops)


def two_nodes(shaping: str) -> tuple[Node, Node, ModelStore, FakeClock]:
    clock = FakeClock()
    store = ModelStore(clock)
    return Node("n1", shaping, store, clock), Node("n2", shaping, store, clock), store, clock


def test_a_connection_limit_holds_across_two_nodes_and_a_released_slot_moves_over() -> None:
    one, two, store, _clock = two_nodes('["default"]\nconnection_limit = 4\n')
    leases = [one.open(), two.open(), one.open(), two.open()]
    assert all(isinstance(lease, Lease) for lease in leases)
    refused = [one.open(), two.open()]
    assert all(isinstance(r, Refusal) and r.budget == "connection_limit" for r in refused)
    assert "connection_limit 4 reached" in str(refused[0])
    assert sum(len(members) for members in store.sets.values()) == 4

    first = leases[0]
    assert isinstance(first, Lease)
    first.release()  # node one's slot is spare there: node one reuses it at once
    calls = store.calls
    again = one.open()
    assert isinstance(again, Lease) and store.calls == calls
    again.release()
    assert isinstance(two.open(), Refusal)  # spare at node one until its next give-back
    one.flush()
    assert isinstance(two.open(), Lease)


def test_slots_of_a_node_that_stops_renewing_come_back_after_the_lease_timeout() -> None:
    one, two, store, clock = two_nodes('["default"]\nconnection_limit = 2\n')
    assert isinstance(one.open(), Lease) and isinstance(one.open(), Lease)
    assert isinstance(two.open(), Refusal)
    clock.advance(LEASE_TIMEOUT / 2)
    store.run(two.ledger.renewals())  # a live node renews; node one has died
    assert isinstance(two.open(), Refusal)
    clock.advance(LEASE_TIMEOUT / 2)
    assert isinstance(two.open(), Lease)


def test_a_renewed_slot_outlives_the_lease_timeout() -> None:
    one, two, store, clock = two_nodes('["default"]\nconnection_limit = 1\n')
    assert isinstance(one.open(), Lease)
    for _ in range(4):
        clock.advance(LEASE_TIMEOUT / 3)
        store.run(one.ledger.renewals())
    assert isinstance(two.open(), Refusal)


def test_a_shared_message_rate_grants_exactly_its_burst_then_one_per_interval() -> None:
    one, two, _store, clock = two_nodes(
        '["default"]\nconnection_limit = 10\nmax_message_rate = "100/min"\n'
    )
    lease_one, lease_two = one.open(), two.open()
    assert isinstance(lease_one, Lease) and isinstance(lease_two, Lease)
    sent = 0
    refusal = None
    for _ in range(80):
        for node, lease in ((one, lease_one), (two, lease_two)):
            refusal = node.send(lease)
            sent += refusal is None
    assert sent == 100
    assert refusal is not None and refusal.budget == "max_message_rate"
    assert 0 < (refusal.retry_after or 0) <= 0.6
    clock.advance(0.6)
    assert two.send(lease_two) is None
    assert one.send(lease_one) is not None


def test_a_big_rate_is_taken_in_batches_of_one_percent_and_spares_go_back() -> None:
    one, two, store, clock = two_nodes(
        '["default"]\nconnection_limit = 10\nmax_message_rate = "10000/h"\n'
        "max_deliveries_per_connection = 100000\n"
    )
    assert batch_size(ThrottleSpec.parse("10000/h")) == 100
    lease = one.open()
    assert isinstance(lease, Lease)
    calls = store.calls
    for _ in range(150):
        assert one.send(lease) is None
    assert store.calls - calls == 2  # two batches of 100
    lease.release()
    assert lease.holding is not None
    one.ledger.settle(lease.holding, one.now())
    clock.advance(1.0)
    one.flush()  # the 50 unspent cells go back
    other = two.open()
    assert isinstance(other, Lease)
    sent = sum(two.send(other) is None for _ in range(10_000))
    # 150 spent by node one (its 50 spare cells came back), 2 of 2.78 cells (0.36 s each)
    # regained in the second since
    assert sent == 10_000 - 150 + 2


def test_local_budgets_never_reach_the_store() -> None:
    one, _, store, _ = two_nodes(
        '["default"]\nconnection_limit = "local:1"\nmax_message_rate = "local:1/h"\n'
    )
    lease = one.open()
    assert isinstance(lease, Lease)
    assert one.send(lease) is None
    assert isinstance(one.send(lease), Refusal)
    assert isinstance(one.open(), Refusal)
    assert store.calls == 0


def test_store_names_carry_the_spec_parameters() -> None:
    one, _, _, _ = two_nodes(
        '["default"]\nconnection_limit = 4\nmax_message_rate = "100/min,max_burst=5"\n'
    )
    budgets = {b.label: b for b in one.shaper.limits("a", SITE).budgets}
    assert one.ledger.store_key(budgets["connection_limit"]) == (
        "egressd:leases:connection_limit:a:mx.big.example:4"
    )
    assert one.ledger.store_key(budgets["max_message_rate"]) == (
        "egressd:gcra:max_message_rate:a:mx.big.example:100:5:60"
    )


def test_shares_while_the_store_is_down_and_reconciliation() -> None:
    one, two, store, _clock = two_nodes(
        '["default"]\nconnection_limit = 4\nmax_message_rate = "100/min"\n'
    )
    before = one.open()
    assert isinstance(before, Lease)
    one.ledger.went_down(nodes=2)
    during = one.open()  # 2 of 4: its share
    assert isinstance(during, Lease)
    refusal = one.open()
    assert isinstance(refusal, Refusal) and refusal.budget == "connection_limit"
    assert store.sets["egressd:leases:connection_limit:a:mx.big.example:4"].keys() == {"n1:1"}
    sent = sum(one.send(during) is None for _ in range(80))
    assert sent == 50  # half of 100/min, half of its burst
    usage = one.shaper.usage("a", SITE)
    assert "connection_limit 4: 2 open on this node, local share 2" in usage

    renewals = one.ledger.came_back()
    store.run(renewals)
    assert set(store.sets["egressd:leases:connection_limit:a:mx.big.example:4"]) == {
        "n1:1",
        "n1:2",
    }
    assert isinstance(two.open(), Lease) and isinstance(two.open(), Lease)
    assert isinstance(two.open(), Refusal)  # 4 of 4 across the fleet again
    during.release()
    one.flush()
    assert isinstance(two.open(), Lease)


def test_a_slot_released_while_the_store_is_down_is_released_when_it_is_back() -> None:
    one, two, store, _clock = two_nodes('["default"]\nconnection_limit = 1\n')
    lease = one.open()
    assert isinstance(lease, Lease)
    one.ledger.went_down(nodes=2)
    lease.release()
    assert one.ledger.returns(one.now()) == []
    store.run(one.ledger.came_back())
    assert isinstance(two.open(), Refusal)
    one.flush()
    assert isinstance(two.open(), Lease)


def test_shares() -> None:
    assert share_of_limit(4, 2) == 2
    assert share_of_limit(4, 3) == 1
    assert share_of_limit(1, 5) == 1
    assert share_of_throttle(ThrottleSpec.parse("100/min"), 1) == ThrottleSpec.parse("100/min")
    half = share_of_throttle(ThrottleSpec.parse("100/min"), 2)
    assert (half.limit, half.period, half.burst) == (50, 60, 50)
    spread = share_of_throttle(ThrottleSpec.parse("100/min,max_burst=1"), 2)
    assert (spread.limit, spread.burst) == (50, 1)
    tiny = share_of_throttle(ThrottleSpec.parse("1/h"), 3)
    assert (tiny.limit, tiny.burst) == (1, 1)


def test_without_a_holding_a_shared_budget_is_shown_available_and_its_use_here() -> None:
    one, _, _store, _ = two_nodes('["default"]\nconnection_limit = 1\nmax_message_rate = "1/h"\n')
    lease = one.open()
    assert isinstance(lease, Lease) and one.send(lease) is None
    assert one.shaper.check_open("a", SITE) is None  # explain: only the store knows
    assert "connection_limit 1: 1 open on this node (shared)" in one.shaper.usage("a", SITE)
    assert isinstance(one.open(), Refusal)  # a plan asks the store, which says no
