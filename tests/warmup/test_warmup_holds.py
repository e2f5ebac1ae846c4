"""Messages in flight hold the quota: a pick holds one message until it is counted or given
back, so sessions running at once never pass a warming source's quota together.

The egress plan (pure) and the relay's per-message budget (pure) on the engine (pure).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fake_clock import FakeClock
from warmup_helpers import at

from egressd.config import load_config
from egressd.egress import (
    Attempt,
    ConnectionQuota,
    Egress,
    EgressFailure,
    Failure,
    GiveUp,
    Plan,
)
from egressd.egress.quotas import WARMUP_QUOTA
from egressd.health import SourceHealth
from egressd.pools import PoolSet
from egressd.runtime import _CurrentQuotas
from egressd.warmup import Warmup

CONFIG = """
[source.warm]
source_address = "127.0.0.2"
[source.cold]
source_address = "127.0.0.4"
warmup = "test"
[pool.main.warm]
[pool.main.cold]
weight = 1000
[pool.lonely.cold]
[warmup.plan.test]
days = [3]
"""


def make(tmp_path: Path) -> tuple[Egress, Warmup]:
    path = tmp_path / "egressd.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    clock = FakeClock(at("2026-11-30T10:00:00+00:00"))
    warmup = Warmup(config.warmup, config.warming_sources, clock)
    egress = Egress(
        config, PoolSet.from_config(config), SourceHealth(config.sources), quotas=warmup
    )
    return egress, warmup


def picked(plan: Plan) -> str | Failure:
    """The source of the plan's first attempt, or the kind of its failure."""
    step = plan.next_step()
    if isinstance(step, GiveUp):
        return step.failure.kind
    assert isinstance(step, Attempt)
    return step.source.name


def test_plans_in_flight_hold_the_quota_and_the_next_ones_overflow(tmp_path: Path) -> None:
    egress, warmup = make(tmp_path)
    plans = [Plan(egress, pool="main", host="127.0.0.1", port=25) for _ in range(5)]
    assert [picked(plan) for plan in plans] == ["cold", "cold", "cold", "warm", "warm"]
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (0, 3)


def test_a_plan_that_moves_on_or_ends_unused_gives_its_hold_back(tmp_path: Path) -> None:
    egress, warmup = make(tmp_path)
    moving = Plan(egress, pool="main", host="127.0.0.1", port=25)
    assert picked(moving) == "cold"
    moving.failed(EgressFailure(Failure.UNPLUMBED, "no such address", source="cold"))
    assert picked(moving) == "warm"
    quota = warmup.quota("cold", "other")
    assert quota is not None and quota.in_flight == 0


def test_a_plan_whose_connection_carried_nothing_gives_its_hold_back(tmp_path: Path) -> None:
    egress, _ = make(tmp_path)
    holders = [Plan(egress, pool="lonely", host="127.0.0.1", port=25) for _ in range(4)]
    assert [picked(plan) for plan in holders] == ["cold"] * 3 + [Failure.WARMUP_QUOTA]
    holders[0].release_budget()  # its connection never carried anything
    assert picked(Plan(egress, pool="lonely", host="127.0.0.1", port=25)) == "cold"


def test_an_exact_source_without_quota_left_is_refused(tmp_path: Path) -> None:
    egress, warmup = make(tmp_path)
    cold = egress.config.sources["cold"]
    for _ in range(3):
        warmup.record("cold", "other", "connected")
    plan = Plan(egress, source=cold, host="127.0.0.1", port=25)
    assert picked(plan) is Failure.WARMUP_QUOTA


def test_a_kept_connection_holds_one_message_per_transaction(tmp_path: Path) -> None:
    egress, warmup = make(tmp_path)
    plan = Plan(egress, pool="lonely", host="127.0.0.1", port=25)
    assert picked(plan) == "cold"
    connection = ConnectionQuota(warmup, "cold", "other", plan.take_quota())
    plan.release_budget()  # taken: the connection's first message keeps it

    assert connection.send() is None  # the pick's hold
    connection.settle(250)
    assert connection.send() is None  # a second message, held now
    other = Plan(egress, pool="lonely", host="127.0.0.1", port=25)
    assert picked(other) == "cold"  # the third and last one
    connection.settle(None)  # no final reply: given back
    assert connection.send() is None
    connection.settle(451)
    refused = connection.send()
    assert refused is not None and refused.budget == WARMUP_QUOTA
    assert "has used its 3 messages for today" in refused.reason
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (2, 1)
    other.release_budget()
    connection.close()
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (2, 0)


def test_a_connection_closed_before_its_message_ended_still_counts_the_reply(
    tmp_path: Path,
) -> None:
    egress, warmup = make(tmp_path)
    plan = Plan(egress, pool="lonely", host="127.0.0.1", port=25)
    picked(plan)
    connection = ConnectionQuota(warmup, "cold", "other", plan.take_quota())
    assert connection.send() is None
    connection.close()  # a 421 to the final dot drops the connection first
    connection.settle(421)
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (1, 0)


def test_a_reload_that_turns_warm_up_on_governs_the_next_messages_of_an_open_connection(
    tmp_path: Path,
) -> None:
    """The runtime's quotas are asked at each message: a connection opened while nothing
    warmed up holds nothing, and once a reload attaches the engine, the message under way
    is counted at its end and the next ones are held and refused at the quota."""
    _, warmup = make(tmp_path)
    runtime = SimpleNamespace(warmup=None, shared_quotas=None, shared_budgets=None)
    connection = ConnectionQuota(_CurrentQuotas(runtime), "cold", "other")  # type: ignore[arg-type]
    assert connection.send() is None
    runtime.warmup = warmup  # what the reload does (daemon.attach_warming)
    connection.settle(250)
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (1, 0)
    assert connection.send() is None
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (1, 1)
    connection.settle(250)
    assert connection.send() is None
    connection.settle(451)
    refused = connection.send()
    assert refused is not None and refused.budget == WARMUP_QUOTA
    quota = warmup.quota("cold", "other")
    assert quota is not None and (quota.used, quota.in_flight) == (3, 0)
