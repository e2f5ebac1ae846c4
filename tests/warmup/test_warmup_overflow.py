"""Overflow, never refusal: a warming source whose quota is used leaves the rotation.

The egress selection (pure) asks the warm-up engine (pure) on a fake clock.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from fake_clock import FakeClock
from warmup_helpers import DAY, at

from egressd.config import load_config
from egressd.egress import Egress, EgressFailure, Failure, GiveUp, Plan
from egressd.health import SourceHealth
from egressd.pools import PoolSet
from egressd.warmup import Warmup

CONFIG = """
[source.a]
source_address = "127.0.0.2"
[source.b]
source_address = "127.0.0.3"
[source.cold]
source_address = "127.0.0.4"
warmup = "test"
[pool.main.a]
weight = 2
[pool.main.b]
[pool.main.cold]
weight = 3
[pool.lonely.cold]
[warmup.plan.test]
days = [3]
"""


def make(tmp_path: Path) -> tuple[Egress, Warmup, FakeClock]:
    path = tmp_path / "egressd.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    clock = FakeClock(at("2026-11-30T10:00:00+00:00"))
    warmup = Warmup(config.warmup, config.warming_sources, clock)
    egress = Egress(
        config,
        PoolSet.from_config(config),
        SourceHealth(config.sources),
        quotas=warmup,
    )
    return egress, warmup, clock


def pick_and_send(egress: Egress, warmup: Warmup, pool: str = "main") -> str:
    name = egress.pick(pool).name
    warmup.record(name, "other", "sent")
    return name


def test_once_the_quota_is_used_the_warm_sources_share_by_their_weights(
    tmp_path: Path,
) -> None:
    egress, warmup, _ = make(tmp_path)
    picks = [pick_and_send(egress, warmup) for _ in range(300)]
    assert picks.count("cold") == 3
    after = picks[picks.index("cold", picks.index("cold", picks.index("cold") + 1) + 1) + 1 :]
    assert Counter(after[:30]) == {"a": 20, "b": 10}  # exact 2:1 shares


def test_a_new_day_brings_the_warming_source_back(tmp_path: Path) -> None:
    egress, warmup, clock = make(tmp_path)
    for _ in range(30):
        pick_and_send(egress, warmup)
    clock.advance(DAY)
    picks = [pick_and_send(egress, warmup) for _ in range(30)]
    assert "cold" in picks


def test_a_pool_with_no_source_left_fails_fast_with_a_typed_failure(tmp_path: Path) -> None:
    egress, warmup, _ = make(tmp_path)
    for _ in range(3):
        pick_and_send(egress, warmup, "lonely")
    with pytest.raises(EgressFailure) as caught:
        egress.pick("lonely")
    assert caught.value.kind is Failure.WARMUP_QUOTA
    assert "plan test, step 1 of 1" in str(caught.value)
    assert "resets at 2026-12-01 00:00+00:00 (UTC)" in str(caught.value)


def test_the_plan_gives_up_with_that_failure_without_dialing(tmp_path: Path) -> None:
    egress, warmup, _ = make(tmp_path)
    for _ in range(3):
        pick_and_send(egress, warmup, "lonely")
    plan = Plan(egress, pool="lonely", host="127.0.0.1", port=25)
    step = plan.next_step()
    assert isinstance(step, GiveUp) and step.failure.kind is Failure.WARMUP_QUOTA
