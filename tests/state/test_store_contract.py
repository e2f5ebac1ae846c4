"""The state contract: what every backend (SQLite, Redis) must do, run against each one
(``open_backend`` in conftest.py is parametrized by backend)."""

from __future__ import annotations

from state_helpers import StoreOpener

from egressd.state import Batch, DayCount, Event, Override, Progress, StsPolicy, Suspension


async def test_a_batch_survives_closing_and_reopening(open_backend: StoreOpener) -> None:
    store = await open_backend()
    await store.write(
        Batch(
            progress=(
                Progress("ip-1", "google", "standard", 3, "2026-11-30", "abuse desk", 5.0, "TSS04"),
            ),
            counts=(DayCount("ip-1", "google", "2026-11-30", sent=7, deferred=1, connected=4),),
            events=(Event(5.0, "ip-1", "google", "held", 3, 3, "operator: abuse desk"),),
            suspensions=(Suspension("ip-1@yahoo", 7200.0, "TSS04"),),
            overrides=(Override("ip-1", "max_message_rate", '"10/h"', 7200.0, "rule"),),
        )
    )
    await store.write(Batch(counts=(DayCount("ip-1", "google", "2026-11-30", sent=3, rejected=2),)))
    await store.close()

    again = await open_backend()
    snapshot = await again.load(since_day="2026-11-30", now=100.0)
    assert snapshot.progress == (
        Progress("ip-1", "google", "standard", 3, "2026-11-30", "abuse desk", 5.0, "TSS04"),
    )
    assert snapshot.counts == (DayCount("ip-1", "google", "2026-11-30", 10, 1, 2, 4),)
    assert snapshot.suspensions == (Suspension("ip-1@yahoo", 7200.0, "TSS04"),)
    assert [o.key for o in snapshot.overrides] == ["max_message_rate"]
    assert await again.history("ip-1") == [
        Event(5.0, "ip-1", "google", "held", 3, 3, "operator: abuse desk")
    ]
    assert await again.history("ip-2") == []


async def test_load_leaves_out_older_days_and_ended_suspensions(open_backend: StoreOpener) -> None:
    store = await open_backend()
    await store.write(
        Batch(
            counts=(
                DayCount("ip-1", "other", "2026-11-28", sent=1),
                DayCount("ip-1", "other", "2026-11-29", sent=2),
            ),
            suspensions=(Suspension("a", 50.0, "x"), Suspension("b", 500.0, "y")),
        )
    )
    await store.write(Batch(lifted=("b",)))
    snapshot = await store.load(since_day="2026-11-29", now=100.0)
    assert [c.day for c in snapshot.counts] == ["2026-11-29"]
    assert snapshot.suspensions == ()


async def test_history_is_newest_first_and_limited(open_backend: StoreOpener) -> None:
    store = await open_backend()
    events = tuple(Event(float(i), "s", "p", "advanced", i, i + 1, "day") for i in range(5))
    await store.write(Batch(events=events))
    assert [e.step_to for e in await store.history(limit=2)] == [5, 4]


async def test_mta_sts_policies_are_replaced_by_domain_and_expire(
    open_backend: StoreOpener,
) -> None:
    store = await open_backend()
    await store.write(
        Batch(
            mta_sts=(
                StsPolicy("a.example", "1", 0.0, "enforce", 1000, "mx.a.example"),
                StsPolicy("b.example", "1", 0.0, "testing", 50, "*.b.example"),
            )
        )
    )
    await store.write(Batch(mta_sts=(StsPolicy("a.example", "2", 10.0, "none", 1000, ""),)))
    await store.close()
    snapshot = await (await open_backend()).load(since_day="2026-11-30", now=100.0)
    assert snapshot.mta_sts == (StsPolicy("a.example", "2", 10.0, "none", 1000, ""),)


async def test_two_writers_add_their_counts_to_the_same_day(open_backend: StoreOpener) -> None:
    first, second = await open_backend(), await open_backend()
    day = "2026-11-30"
    await first.write(Batch(counts=(DayCount("ip-1", "google", day, sent=5, deferred=1),)))
    await second.write(Batch(counts=(DayCount("ip-1", "google", day, sent=7, connected=2),)))
    await first.write(Batch(counts=(DayCount("ip-1", "google", day, rejected=3),)))
    snapshot = await (await open_backend()).load(since_day=day, now=0.0)
    assert snapshot.counts == (DayCount("ip-1", "google", day, 12, 1, 3, 2),)


async def test_progress_suspensions_and_overrides_are_replaced_lifted_and_cleared(
    open_backend: StoreOpener,
) -> None:
    store = await open_backend()
    await store.write(
        Batch(
            progress=(Progress("ip-1", "other", "standard", 1, "2026-11-29"),),
            suspensions=(Suspension("ip-1@provider:yahoo", 500.0, "TSS04"),),
            overrides=(
                Override("ip-1", "a", "1", 500.0, "r"),
                Override("ip-1", "b", "2", 500.0, "r"),
            ),
        )
    )
    await store.write(
        Batch(
            progress=(Progress("ip-1", "other", "standard", 2, "2026-11-30", "held"),),
            suspensions=(Suspension("ip-1@provider:yahoo", 900.0, "TSS04 again"),),
            cleared=(("ip-1", "a"),),
        )
    )
    snapshot = await store.load(since_day="2026-11-30", now=100.0)
    assert snapshot.progress == (Progress("ip-1", "other", "standard", 2, "2026-11-30", "held"),)
    assert snapshot.suspensions == (Suspension("ip-1@provider:yahoo", 900.0, "TSS04 again"),)
    assert snapshot.overrides == (Override("ip-1", "b", "2", 500.0, "r"),)
    await store.write(Batch(lifted=("ip-1@provider:yahoo",)))
    assert (await store.load(since_day="2026-11-30", now=100.0)).suspensions == ()
