"""The warm-up engine on a fake clock: sending days, the day boundary, signals, operators."""

from __future__ import annotations

from fake_clock import FakeClock
from warmup_helpers import DAY, MemoryStore, at, engine, send, settings, step

from egressd.state import Event
from egressd.warmup import Calendar

MONDAY = at("2026-11-30T09:00:00+00:00")


def test_a_sending_day_advances_one_step() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 8)  # 80% of step 0's 10
    assert step(warmup) == 0
    clock.advance(DAY)
    assert step(warmup) == 1
    assert warmup.quota("ip-1", "other").limit == 20  # type: ignore[union-attr]


def test_quiet_days_and_weekends_do_not_advance() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 7)  # 70%: below the 80% share
    clock.advance(DAY)
    assert step(warmup) == 0
    clock.advance(3 * DAY)  # nothing sent for three days
    assert step(warmup) == 0
    send(warmup, 10)
    clock.advance(DAY)
    assert step(warmup) == 1


def test_the_sending_day_share_is_configurable() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock, sending_day_share=0.5)
    send(warmup, 5)
    clock.advance(DAY)
    assert step(warmup) == 1


def test_each_provider_has_its_own_step_and_schedule() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 5, provider="google")  # google's step 0 is 5 a day
    send(warmup, 2, provider="yahoo")
    assert warmup.refusal("ip-1", "google") is not None
    assert warmup.refusal("ip-1", "yahoo") is None
    clock.advance(DAY)
    assert (step(warmup, "google"), step(warmup, "yahoo")) == (1, 0)


def test_a_source_past_its_last_step_is_warm_and_has_no_quota() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    for volume in (5, 10):
        send(warmup, volume, provider="google")
        clock.advance(DAY)
    assert warmup.quota("ip-1", "google") is None
    assert warmup.refusal("ip-1", "google") is None
    assert warmup.quota("ip-9", "google") is None  # not warming at all


def test_the_day_ends_at_midnight_in_the_configured_time_zone() -> None:
    # 23:59:59 in Tokyo is 14:59:59 UTC: the UTC day goes on, Tokyo's ends.
    clock = FakeClock(at("2026-11-30T23:59:59+09:00"))
    warmup = engine(clock, timezone="Asia/Tokyo")
    send(warmup, 10)
    quota = warmup.quota("ip-1", "other")
    assert quota is not None and quota.used_up
    assert quota.resets_at == at("2026-12-01T00:00:00+09:00")
    clock.advance(1)
    quota = warmup.quota("ip-1", "other")
    assert quota is not None
    assert (quota.step, quota.used, quota.used_up) == (1, 0, False)


def test_the_same_moment_is_still_the_same_day_in_utc() -> None:
    clock = FakeClock(at("2026-11-30T23:59:59+09:00"))
    warmup = engine(clock)  # UTC
    send(warmup, 10)
    clock.advance(1)
    assert warmup.refusal("ip-1", "other") is not None


def test_a_day_with_a_daylight_saving_change_ends_at_local_midnight() -> None:
    calendar = Calendar("Europe/Paris")
    start = at("2026-10-25T00:00:00+02:00")  # the 25-hour day
    assert calendar.next_midnight(start) - start == 25 * 3600
    assert calendar.day(start + 25 * 3600 - 1) == "2026-10-25"


def test_a_deferral_rate_above_the_hold_threshold_holds_the_step() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    send(warmup, 8)
    send(warmup, 2, outcome="deferred")  # 20% of 10: the default hold threshold
    clock.advance(DAY)
    assert step(warmup) == 0
    assert [(e.kind, e.reason) for e in events] == [
        ("held", "deferral rate 20% of 10 messages today >= 20%")
    ]


def test_a_rejection_rate_above_the_hold_threshold_holds_the_step() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events, hold_rejection_rate=0.1)
    send(warmup, 9)
    send(warmup, 1, outcome="rejected")
    clock.advance(DAY)
    assert step(warmup) == 0
    assert events[0].kind == "held" and events[0].reason.startswith("rejection rate 10%")


def test_rates_below_the_thresholds_or_on_too_few_messages_do_not_hold() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock, min_messages=20)
    send(warmup, 5)
    send(warmup, 5, outcome="deferred")  # 50%, but only 10 messages of the 20 needed
    clock.advance(DAY)
    assert step(warmup) == 1


def test_a_rejection_rate_above_the_step_back_threshold_steps_back_at_once() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    send(warmup, 8)
    clock.advance(DAY)
    send(warmup, 16)
    clock.advance(DAY)
    assert step(warmup) == 2  # 40 a day
    send(warmup, 8)
    send(warmup, 2, outcome="rejected")  # 20%: the default step-back threshold
    quota = warmup.quota("ip-1", "other")
    assert quota is not None and (quota.step, quota.limit) == (1, 20)
    send(warmup, 10, outcome="rejected")  # at most once a day
    assert step(warmup) == 1
    clock.advance(DAY)
    assert step(warmup) == 1  # that day does not advance either
    assert [(e.kind, e.step_from, e.step_to) for e in events][-1] == ("stepped back", 2, 1)
    assert events[-1].reason == "rejection rate 20% of 10 messages today >= 20%"


def test_a_deferral_rate_above_the_step_back_threshold_steps_back() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 8)
    clock.advance(DAY)
    send(warmup, 5)
    send(warmup, 5, outcome="deferred")
    assert step(warmup) == 0


def test_an_operator_hold_stops_advancing_until_resumed() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    send(warmup, 10)
    warmup.hold("ip-1", None, "complaint from the abuse desk")
    clock.advance(DAY)
    assert step(warmup) == 0
    quota = warmup.quota("ip-1", "other")
    assert quota is not None and quota.hold == "complaint from the abuse desk"
    warmup.resume("ip-1", None)
    send(warmup, 10)
    clock.advance(DAY)
    assert step(warmup) == 1
    kinds = [(e.provider, e.kind) for e in events]
    assert ("other", "held") in kinds and ("*", "held") in kinds
    assert ("other", "resumed") in kinds
    assert events[0].reason == "operator: complaint from the abuse desk"


def test_an_operator_hold_of_one_provider_leaves_the_others() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 5, provider="google")
    send(warmup, 10, provider="yahoo")
    warmup.hold("ip-1", "google", "postmaster tools say bad")
    clock.advance(DAY)
    assert (step(warmup, "google"), step(warmup, "yahoo")) == (0, 1)


def test_an_operator_sets_the_step_and_a_new_provider_starts_there() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    warmup.set_step("ip-1", None, 2, "moved from the old cluster")
    assert step(warmup, "never-seen") == 2
    assert events[-1].reason == "moved from the old cluster"


def test_the_fail_fast_text_names_the_plan_the_step_and_the_reset_time() -> None:
    clock = FakeClock(at("2026-11-30T15:00:00+01:00"))
    warmup = engine(clock, timezone="Europe/Paris")
    send(warmup, 5, provider="google")
    assert warmup.refusal("ip-1", "google") == (
        "source ip-1 is warming up (plan standard, step 1 of 2) and has used its 5 messages "
        "for today to google; the quota resets at 2026-12-01 00:00+01:00 (Europe/Paris)"
    )


def test_progress_and_todays_use_survive_a_restart_through_the_store() -> None:
    clock = FakeClock(MONDAY)
    store = MemoryStore()
    first = engine(clock, store)
    send(first, 10)
    clock.advance(DAY)
    send(first, 15)
    first.hold("ip-1", "google", "checking")
    store.write(first.take_batch())

    clock.advance(60)
    second = engine(clock, store)
    quota = second.quota("ip-1", "other")
    assert quota is not None and (quota.step, quota.used) == (1, 15)
    assert second.quota("ip-1", "google").hold == "checking"  # type: ignore[union-attr]
    assert [e.kind for e in store.history("ip-1")][-1] == "advanced"


def test_a_restart_keeps_a_days_signal_hold() -> None:
    clock = FakeClock(MONDAY)
    store = MemoryStore()
    first = engine(clock, store)
    send(first, 8)
    send(first, 2, outcome="deferred")
    store.write(first.take_batch())
    second = engine(clock, store)
    clock.advance(DAY)
    assert step(second) == 0


def test_a_restart_the_same_day_keeps_a_reply_rules_hold_until_midnight() -> None:
    clock = FakeClock(MONDAY)
    store = MemoryStore()
    first = engine(clock, store)
    send(first, 5, provider="google")  # a full sending day, and then Yahoo-style TSS04
    first.signal("ip-1", "google", "shaping rule: 421 4.7.0 [TSS04]")
    first.signal("ip-1", "yahoo", "shaping rule: a banner")  # before any message to yahoo
    store.write(first.take_batch())
    clock.advance(3600)
    second = engine(clock, store)
    assert second.quota("ip-1", "google").hold == "shaping rule: 421 4.7.0 [TSS04]"  # type: ignore[union-attr]
    assert second.quota("ip-1", "yahoo").hold == "shaping rule: a banner"  # type: ignore[union-attr]
    clock.advance(DAY)
    assert step(second, "google") == 0  # the held day did not advance the step
    assert second.quota("ip-1", "google").hold is None  # type: ignore[union-attr]
    store.write(second.take_batch())
    assert store.progress[("ip-1", "google")].signal_hold is None


def test_connections_use_the_quota_but_not_the_rates() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 9, outcome="connected")
    send(warmup, 1, outcome="deferred")
    quota = warmup.quota("ip-1", "other")
    assert quota is not None and quota.used_up and quota.hold is None
    clock.advance(DAY)
    assert step(warmup) == 1  # a sending day: 10 of 10, one deferral is no rate yet


def test_counts_not_yet_flushed_are_lost_and_nothing_else() -> None:
    clock = FakeClock(MONDAY)
    store = MemoryStore()
    first = engine(clock, store)
    send(first, 4)
    store.write(first.take_batch())
    send(first, 3)  # the crash comes before the next flush
    second = engine(clock, store)
    assert second.quota("ip-1", "other").used == 4  # type: ignore[union-attr]


def test_a_batch_the_store_refused_is_written_with_the_next_one() -> None:
    clock = FakeClock(MONDAY)
    store = MemoryStore()
    warmup = engine(clock, store)
    send(warmup, 2)
    warmup.give_back(warmup.take_batch())
    send(warmup, 1)
    store.write(warmup.take_batch())
    assert [c.sent for c in store.counts.values()] == [3]


def test_the_projection_lists_each_remaining_step_by_date() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 8)
    clock.advance(DAY)
    assert warmup.projection("ip-1", "other") == [(1, "2026-12-01", 20), (2, "2026-12-02", 40)]
    assert warmup.warm_on("ip-1", "other") == "2026-12-03"


def test_a_reload_that_drops_a_warming_source_keeps_the_others_going() -> None:
    clock = FakeClock(MONDAY)
    warmup = engine(clock)
    send(warmup, 8)
    warmup.reconfigure(settings(), {})
    clock.advance(DAY)
    assert warmup.quota("ip-1", "other") is None
    assert warmup.take_batch().progress  # what changed before the reload is still written
    warmup.reconfigure(settings(), {"ip-1": "standard"})
    assert step(warmup) == 1  # back: its last day (a sending day) is judged now


def test_a_shaping_rule_signal_holds_that_providers_step_for_the_day() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    send(warmup, 5, provider="google")  # a full sending day to google (quota 5)
    send(warmup, 10)  # and to other
    warmup.signal("ip-1", "google", "shaping rule: [TSS04]")
    warmup.signal("ip-1", "google", "shaping rule: [TSS04] again")  # already held today
    assert warmup.quota("ip-1", "google").hold == "shaping rule: [TSS04]"  # type: ignore[union-attr]
    clock.advance(DAY)
    assert (step(warmup, "google"), step(warmup)) == (0, 1)
    assert [(e.kind, e.provider, e.reason) for e in events if e.kind == "held"] == [
        ("held", "google", "shaping rule: [TSS04]")
    ]
    assert warmup.quota("ip-1", "google").hold is None  # type: ignore[union-attr]


def test_a_shaping_rule_signal_for_a_warm_source_changes_nothing() -> None:
    clock = FakeClock(MONDAY)
    events: list[Event] = []
    warmup = engine(clock, events=events)
    warmup.signal("ip-2", "google", "shaping rule: [TSS04]")
    assert events == [] and warmup.quota("ip-2", "google") is None
