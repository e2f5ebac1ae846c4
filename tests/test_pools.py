"""Smooth weighted round-robin: exact shares, smoothness, weight 0, empty pools, reload."""

from __future__ import annotations

from collections import Counter
from itertools import groupby

import pytest

from egressd.config import Pool, PoolEntry
from egressd.pools import NoSourcesAvailable, PoolSelector, PoolSet, UnknownPool


def make_pool(pool_name: str = "p", /, **weights: int) -> Pool:
    return Pool(pool_name, tuple(PoolEntry(source, weight) for source, weight in weights.items()))


def longest_run(picks: list[str]) -> int:
    return max(len(list(group)) for _, group in groupby(picks))


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 1},
        {"a": 2, "b": 1},
        {"a": 5, "b": 1, "c": 1},
        {"a": 100, "b": 1},
        {"a": 3, "b": 3, "c": 2, "d": 7},
        {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1},
    ],
)
def test_every_window_of_total_weight_gives_exact_shares(weights: dict[str, int]) -> None:
    selector = PoolSelector(make_pool(**weights))
    window = sum(weights.values())
    for _ in range(50):
        assert Counter(selector.take(window)) == Counter(weights)


def test_two_to_one_interleaves() -> None:
    selector = PoolSelector(make_pool(a=2, b=1))
    assert selector.take(6) == ["a", "b", "a", "a", "b", "a"]


def test_five_one_one_follows_nginx_sequence_and_never_bursts() -> None:
    selector = PoolSelector(make_pool(a=5, b=1, c=1))
    assert selector.take(7) == ["a", "a", "b", "a", "c", "a", "a"]
    # LVS-style rotation would give five a's in a row; the smooth sequence's longest
    # run is two at the end of one window plus two at the start of the next.
    assert longest_run(selector.take(7 * 100)) <= 4


def test_heavy_pool_does_not_send_heavy_source_a_hundred_times_in_a_row() -> None:
    selector = PoolSelector(make_pool(a=100, b=1))
    picks = selector.take(101 * 5)
    assert picks.count("b") == 5
    assert longest_run(picks) < 101


def test_weight_zero_stays_out_of_rotation() -> None:
    selector = PoolSelector(make_pool(a=0, b=1, c=2))
    picks = selector.take(300)
    assert "a" not in picks
    assert Counter(picks) == {"b": 100, "c": 200}
    assert selector.shares() == {"a": 0.0, "b": pytest.approx(100 / 3), "c": pytest.approx(200 / 3)}


@pytest.mark.parametrize("weights", [{}, {"a": 0, "b": 0}])
def test_empty_pool_fails_cleanly(weights: dict[str, int]) -> None:
    selector = PoolSelector(make_pool("warmup", **weights))
    with pytest.raises(NoSourcesAvailable, match="no sources available in pool warmup"):
        selector.next()


def test_selection_is_deterministic() -> None:
    pool = make_pool(a=3, b=2, c=1)
    assert PoolSelector(pool).take(60) == PoolSelector(pool).take(60)


def test_skipped_sources_keep_the_rest_in_proportion() -> None:
    selector = PoolSelector(make_pool(a=2, b=1, c=1))
    picks = selector.take(40) + [selector.next(skip=lambda s: s == "a") for _ in range(40)]
    assert "a" not in picks[40:]
    assert Counter(picks[40:]) == {"b": 20, "c": 20}


def test_all_skipped_says_every_source_is_suspended() -> None:
    selector = PoolSelector(make_pool("p1", a=1))
    with pytest.raises(NoSourcesAvailable, match="every source is suspended"):
        selector.next(skip=lambda s: True)


def test_reload_keeps_state_of_unchanged_pools_only() -> None:
    first = PoolSet(
        {"same": make_pool("same", a=2, b=1), "changed": make_pool("changed", a=1, b=1)}
    )
    assert first.next("same") == "a"
    assert first.next("changed") == "a"
    second = PoolSet(
        {"same": make_pool("same", a=2, b=1), "changed": make_pool("changed", a=1, b=2)}, first
    )
    assert second.next("same") == "b"  # continues a, b, ...
    assert second.next("changed") == "b"  # fresh selector: b has the higher weight
    with pytest.raises(UnknownPool, match='unknown pool "gone"'):
        second.next("gone")
