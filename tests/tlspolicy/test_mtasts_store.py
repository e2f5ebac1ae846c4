"""The MTA-STS cache's persistence seam: changes taken for the state store, restored."""

from __future__ import annotations

from egressd.state import StsPolicy
from egressd.tlspolicy import CachedPolicy, MemoryPolicyStore, parse_policy
from egressd.tlspolicy.mtasts import from_record, to_record

POLICY = parse_policy(
    "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"
)


def test_changes_are_taken_once_and_given_back_when_not_written() -> None:
    store = MemoryPolicyStore()
    old, new = CachedPolicy(POLICY, "id1", 1.0), CachedPolicy(POLICY, "id2", 2.0)
    store.put("a.example", old)
    changes = store.take_changes()
    assert changes == {"a.example": old} and store.take_changes() == {}
    store.put("a.example", new)  # fetched again while the write failed
    store.give_back(changes)
    assert store.take_changes() == {"a.example": new}  # the newer one goes
    assert store.get("a.example") == new


def test_restored_entries_are_not_changes_and_never_replace_newer_ones() -> None:
    store = MemoryPolicyStore()
    newer = CachedPolicy(POLICY, "id2", 20.0)
    store.put("a.example", newer)
    store.take_changes()
    store.restore("a.example", CachedPolicy(POLICY, "id1", 10.0))
    store.restore("b.example", CachedPolicy(POLICY, "id1", 10.0))
    assert store.get("a.example") == newer
    assert store.get("b.example") == CachedPolicy(POLICY, "id1", 10.0)
    assert store.take_changes() == {}


def test_a_cached_policy_round_trips_through_its_record() -> None:
    entry = CachedPolicy(POLICY, "20260101T0000", 1234.5)
    record = to_record("a.example", entry)
    assert record == StsPolicy(
        "a.example", "20260101T0000", 1234.5, "enforce", 86400, "mx1.example.com *.example.net"
    )
    assert from_record(record) == entry


def test_a_record_that_is_not_a_valid_policy_is_dropped() -> None:
    good = to_record("a.example", CachedPolicy(POLICY, "id1", 0.0))
    for bad in (
        StsPolicy("a.example", "id1", 0.0, "enforce", 86400, ""),  # enforce without mx
        StsPolicy("a.example", "id1", 0.0, "sometimes", 86400, "mx.example"),
        StsPolicy("a.example", "id-1!", 0.0, "enforce", 86400, "mx.example"),
        StsPolicy("a.example", "id1", 0.0, "enforce", 86400, "mx.example\nmode: none"),
    ):
        assert from_record(bad) is None
    assert from_record(good) is not None
