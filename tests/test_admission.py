"""Admission: the daemon's cap, each client address's cap and each door's reserve."""

from __future__ import annotations

from egressd.admission import Admission, client_cap, door_reserve
from egressd.config import LimitSettings

DOORS = frozenset({"smtp", "socks5", "proxy"})


def fill(admission: Admission, limits: LimitSettings, door: str, client: str) -> int:
    """Open connections until refused; how many were admitted (bounded by the cap)."""
    for count in range(limits.max_connections + 1):
        if admission.refusal(limits, DOORS, door, client) is not None:
            return count
        admission.opened(door, client)
    raise AssertionError("never refused")


def test_defaults_derive_from_max_connections() -> None:
    assert client_cap(LimitSettings()) == 5000
    assert door_reserve(LimitSettings()) == 1000
    assert client_cap(LimitSettings(max_connections=1)) == 1
    assert door_reserve(LimitSettings(max_connections=5)) == 0
    explicit = LimitSettings(max_connections_per_client=7, reserved_per_door=3)
    assert (client_cap(explicit), door_reserve(explicit)) == (7, 3)


def test_one_client_address_cannot_take_more_than_its_cap() -> None:
    limits = LimitSettings(max_connections=100, max_connections_per_client=30)
    admission = Admission()
    assert fill(admission, limits, "smtp", "127.0.0.1") == 30
    refusal = admission.refusal(limits, DOORS, "socks5", "127.0.0.1")
    assert refusal == "client 127.0.0.1 is at max_connections_per_client (30)"
    assert admission.refusal(limits, DOORS, "smtp", "127.0.0.2") is None
    admission.closed("smtp", "127.0.0.1")
    assert admission.refusal(limits, DOORS, "smtp", "127.0.0.1") is None


def test_a_flooded_door_leaves_the_other_doors_their_reserve() -> None:
    limits = LimitSettings(max_connections=100, max_connections_per_client=100)
    admission = Admission()
    assert fill(admission, limits, "smtp", "127.0.0.1") == 80  # 100 - 2 reserves of 10
    refusal = admission.refusal(limits, DOORS, "smtp", "127.0.0.9")
    assert refusal is not None and "reserved for the other doors" in refusal
    assert fill(admission, limits, "socks5", "127.0.0.2") == 10
    assert fill(admission, limits, "proxy", "127.0.0.3") == 10
    assert admission.refusal(limits, DOORS, "proxy", "127.0.0.4") == (
        "egressd is at max_connections (100)"
    )


def test_a_door_past_its_reserve_still_leaves_the_unused_reserves() -> None:
    limits = LimitSettings(max_connections=100, max_connections_per_client=100)
    admission = Admission()
    assert fill(admission, limits, "socks5", "127.0.0.2") == 80
    assert fill(admission, limits, "smtp", "127.0.0.1") == 10  # its own reserve; proxy's stays
    refusal = admission.refusal(limits, DOORS, "socks5", "127.0.0.2")
    assert refusal is not None and "reserved" in refusal
    assert fill(admission, limits, "proxy", "127.0.0.3") == 10


def test_only_doors_with_listeners_keep_a_reserve() -> None:
    limits = LimitSettings(max_connections=100, max_connections_per_client=100)
    admission = Admission()
    for _ in range(100):
        assert admission.refusal(limits, {"smtp"}, "smtp", "127.0.0.1") is None
        admission.opened("smtp", "127.0.0.1")
    assert admission.refusal(limits, {"smtp"}, "smtp", "127.0.0.1") is not None
