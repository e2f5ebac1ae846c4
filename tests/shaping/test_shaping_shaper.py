"""The shaper on a fake clock: leases, rates, deliveries, reply rules, expiry, reasons."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock
from shaping_helpers import policy_from

from egressd.shaping.rules import reply_line
from egressd.shaping.shaper import Lease, Override, Refusal, Shaper, Suspension, refusal_summary
from egressd.shaping.sites import Destination

GOOGLE_SITE = "alt1?.gmail-smtp-in.l.google.com"
GMAIL = Destination(
    GOOGLE_SITE, "gmail.com", ("gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com")
)
WORKSPACE = Destination("aspmx.l.google.com", "corp.example", ("aspmx.l.google.com",))
YAHOO = Destination("(mta5|mta6).am0.yahoodns.net", "yahoo.com", ("mta5.am0.yahoodns.net",))
OTHER = Destination("mx.other.example", "other.example", ("mx.other.example",))

SHAPING = """
["default"]
connection_limit = 2
max_deliveries_per_connection = 3

[provider."google"]
match = [{ MXSuffix = ".google.com" }]
provider_connection_limit = 3

[provider."yahoo"]
match = [{ MXSuffix = ".yahoodns.net" }]
max_message_rate = "10/s"
max_connection_rate = "2/min"

[[provider."yahoo".automation]]
regex = "\\\\[TSS04\\\\]"
action = "Suspend"
duration = "2 hours"

[[provider."yahoo".automation]]
regex = "\\\\[TS02\\\\]"
trigger = { Threshold = "3/hr" }
action = { SetConfig = { name = "max_message_rate", value = "1/minute" } }
duration = "30m"

[["other.example".automation]]
regex = "Too many connections"
action = { SetConfig = { name = "connection_limit", value = 1 } }
duration = "10m"

[["other.example".automation]]
regex = "domain only"
action = { SetDomainConfig = { name = "max_deliveries_per_connection", value = 1 } }
duration = "10m"

[["other.example".automation]]
regex = "go away"
action = "Suspend"
duration = "1m"
"""


def make(text: str = SHAPING) -> tuple[Shaper, FakeClock]:
    clock = FakeClock()
    policy = policy_from(text, {"other.example": OTHER.site})
    return Shaper(policy, clock), clock


def lease(result: Lease | Refusal) -> Lease:
    assert isinstance(result, Lease), result
    return result


def refused(result: Lease | Refusal | None) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# --------------------------------------------------------------------------- leases


def test_connection_limit_is_a_lease_given_back_however_the_connection_ends() -> None:
    shaper, _ = make()
    first = lease(shaper.open("ip-1", OTHER))
    second = lease(shaper.open("ip-1", OTHER))
    refusal = refused(shaper.open("ip-1", OTHER))
    assert refusal.budget == "connection_limit"
    assert refusal.reason == (
        'connection_limit 2 reached for source "ip-1" to site "mx.other.example" '
        '(["default"] in t.toml)'
    )
    # another source has its own path budget
    lease(shaper.open("ip-2", OTHER)).release()
    first.release()
    first.release()  # twice is harmless
    with pytest.raises(RuntimeError), lease(shaper.open("ip-1", OTHER)):
        raise RuntimeError("connection reset")
    lease(shaper.open("ip-1", OTHER)).failed()
    third = lease(shaper.open("ip-1", OTHER))
    assert refused(shaper.open("ip-1", OTHER)).budget == "connection_limit"
    second.release()
    third.release()
    assert shaper.leases == {}


def test_provider_connection_limit_spans_the_providers_sites() -> None:
    shaper, _ = make()
    held = [lease(shaper.open("ip-1", GMAIL)), lease(shaper.open("ip-1", GMAIL))]
    held.append(lease(shaper.open("ip-1", WORKSPACE)))
    refusal = refused(shaper.open("ip-1", WORKSPACE))
    assert refusal.budget == "provider_connection_limit"
    assert refusal.reason.startswith(
        'provider_connection_limit 3 reached for source "ip-1" across its provider'
    )
    assert shaper.check_open("ip-2", WORKSPACE) is None
    held[0].release()
    assert shaper.check_open("ip-1", WORKSPACE) is None


def test_check_open_changes_nothing() -> None:
    shaper, _ = make()
    for _ in range(5):
        assert shaper.check_open("ip-1", YAHOO) is None
    lease(shaper.open("ip-1", YAHOO)).release()
    lease(shaper.open("ip-1", YAHOO)).release()
    assert refused(shaper.check_open("ip-1", YAHOO)).budget == "max_connection_rate"


# --------------------------------------------------------------------------- rates


def test_connection_rate_on_the_fake_clock() -> None:
    shaper, clock = make()
    lease(shaper.open("ip-1", YAHOO)).release()
    lease(shaper.open("ip-1", YAHOO)).release()
    refusal = refused(shaper.open("ip-1", YAHOO))
    assert refusal.budget == "max_connection_rate"
    assert refusal.retry_after == pytest.approx(30.0)
    assert 'max_connection_rate 2/m used up for source "ip-1"' in refusal.reason
    clock.advance(29.999)
    assert refused(shaper.open("ip-1", YAHOO)).retry_after == pytest.approx(0.001)
    clock.advance(0.001)
    lease(shaper.open("ip-1", YAHOO)).release()


def test_message_rate_spreads_messages_over_time() -> None:
    shaper, clock = make('["default"]\nmax_message_rate = "2/s,max_burst=1"\n')
    conn = lease(shaper.open("ip-1", OTHER))
    sent_at = []
    for _ in range(40):
        refusal = conn.send()
        if refusal is None:
            sent_at.append(round(clock.now - 1000.0, 3))
            continue
        assert refusal.budget == "max_message_rate"
        assert refusal.retry_after is not None
        clock.advance(refusal.retry_after)
    # two at once (KumoMTA's max_burst=1 allows 2), then one every 0.5 s
    assert sent_at[:6] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert len(sent_at) == 21


def test_max_deliveries_per_connection_counts_messages_of_one_lease() -> None:
    shaper, _ = make()
    conn = lease(shaper.open("ip-1", OTHER))
    assert [conn.send() for _ in range(3)] == [None, None, None]
    refusal = refused(conn.send())
    assert refusal.budget == "max_deliveries_per_connection"
    assert refusal.reason == (
        'max_deliveries_per_connection 3 reached on this connection (["default"] in t.toml)'
    )
    assert lease(shaper.open("ip-1", OTHER)).send() is None
    conn.release()
    with pytest.raises(ValueError):
        conn.send()


def test_source_selection_rate_is_checked_at_open_and_counted_per_message() -> None:
    text = '["other.example".sources."new"]\nsource_selection_rate = "2/d"\n'
    shaper, clock = make(text)
    conn = lease(shaper.open("new", OTHER))
    assert conn.send() is None
    assert conn.send() is None
    assert refused(conn.send()).budget == "source_selection_rate"
    refusal = refused(shaper.open("new", OTHER))
    assert refusal.budget == "source_selection_rate"
    assert refusal.retry_after == pytest.approx(43200.0)
    assert shaper.check_open("established", OTHER) is None
    clock.advance(43200)
    assert conn.send() is None


# --------------------------------------------------------------------------- reply rules


def test_immediate_suspend_of_a_provider_rule_hits_source_and_provider_only() -> None:
    shaper, clock = make()
    reply = reply_line(421, ["4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred"])
    assert reply == "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred"
    (effect,) = shaper.reply("ip-1", YAHOO, reply)
    assert isinstance(effect, Suspension)
    assert effect.scope == ("ip-1", "provider", "yahoo")
    assert effect.until == clock.now + 7200
    other_yahoo_site = Destination("mx.yahoo.example", "ymail.com", ("mx9.am0.yahoodns.net",))
    refusal = refused(shaper.check_open("ip-1", other_yahoo_site))
    assert refusal.budget == "suspended"
    assert 'source "ip-1" is suspended for provider "yahoo" for 7200s more' in refusal.reason
    assert '[provider."yahoo"] automation[0] in t.toml' in refusal.reason
    assert shaper.check_open("ip-2", YAHOO) is None
    assert shaper.check_open("ip-1", OTHER) is None
    clock.advance(7199)
    assert refused(shaper.check_open("ip-1", YAHOO)).retry_after == pytest.approx(1.0)
    clock.advance(1)
    assert shaper.check_open("ip-1", YAHOO) is None
    assert shaper.active() == []


def test_a_suspension_also_stops_messages_on_open_connections() -> None:
    shaper, _ = make()
    conn = lease(shaper.open("ip-1", OTHER))
    shaper.reply("ip-1", OTHER, "421 go away")
    assert refused(conn.send()).budget == "suspended"


def test_threshold_counts_within_its_window() -> None:
    shaper, clock = make()
    ts02 = "421 4.7.0 [TS02] unusual traffic"
    assert shaper.reply("ip-1", YAHOO, ts02) == []
    clock.advance(1800)
    assert shaper.reply("ip-1", YAHOO, ts02) == []
    clock.advance(1801)  # the first match is now older than an hour
    assert shaper.reply("ip-1", YAHOO, ts02) == []
    assert shaper.reply("ip-2", YAHOO, ts02) == []  # counted per source
    (effect,) = shaper.reply("ip-1", YAHOO, ts02)
    assert isinstance(effect, Override)
    assert effect.scope == ("ip-1", "provider", "yahoo")
    rates = shaper.limits("ip-1", YAHOO).of_kind("message rate")
    assert [str(b.value) for b in rates] == ["1/m"]
    assert str(rates[0].origin) == '[provider."yahoo"] automation[1] in t.toml'
    assert [str(b.value) for b in shaper.limits("ip-2", YAHOO).of_kind("message rate")] == ["10/s"]
    clock.advance(1800)
    assert [str(b.value) for b in shaper.limits("ip-1", YAHOO).of_kind("message rate")] == ["10/s"]


def test_set_config_lowers_a_limit_for_its_duration() -> None:
    shaper, clock = make()
    held = lease(shaper.open("ip-1", OTHER))
    (effect,) = shaper.reply("ip-1", OTHER, "421 Too many connections from your IP")
    assert isinstance(effect, Override) and effect.name == "connection_limit"
    assert effect.scope == ("ip-1", "site", OTHER.site)
    refusal = refused(shaper.open("ip-1", OTHER))
    assert refusal.reason.startswith("connection_limit 1 reached")
    assert '["other.example"] automation[0] in t.toml' in refusal.reason
    assert len(shaper.active()) == 1
    clock.advance(600)
    assert shaper.active() == []
    lease(shaper.open("ip-1", OTHER)).release()
    held.release()


def test_set_domain_config_applies_to_the_domain_only() -> None:
    shaper, _ = make()
    (effect,) = shaper.reply("ip-1", OTHER, "450 domain only")
    assert effect.scope == ("ip-1", "domain", "other.example")
    assert shaper.limits("ip-1", OTHER).max_deliveries_per_connection.value == 1
    sibling = Destination(OTHER.site, "sibling.example", OTHER.mx_hosts)
    assert shaper.limits("ip-1", sibling).max_deliveries_per_connection.value == 3


def test_a_later_trigger_extends_and_a_shorter_one_does_not_shorten() -> None:
    shaper, clock = make()
    first = shaper.suspend(("ip-1", "site", OTHER.site), 300, "operator")
    clock.advance(10)
    (effect,) = shaper.reply("ip-1", OTHER, "421 go away")  # 60 s, ends before 300 s
    assert effect == first
    assert shaper.resume(("ip-1", "site", OTHER.site))
    assert not shaper.resume(("ip-1", "site", OTHER.site))
    assert shaper.check_open("ip-1", OTHER) is None


def test_rules_match_reply_text_only_when_the_regex_matches() -> None:
    shaper, _ = make()
    assert shaper.reply("ip-1", YAHOO, "250 2.0.0 OK") == []
    assert shaper.reply("ip-1", OTHER, "421 [TSS04] but not yahoo") == []


# --------------------------------------------------------------------------- failures


def test_consecutive_connection_failures_hold_the_path() -> None:
    shaper, clock = make('["default"]\nconsecutive_connection_failures_before_delay = 2\n')
    lease(shaper.open("ip-1", OTHER)).failed()
    assert shaper.check_open("ip-1", OTHER) is None
    lease(shaper.open("ip-1", OTHER)).failed()
    refusal = refused(shaper.open("ip-1", OTHER))
    assert refusal.budget == "consecutive_connection_failures_before_delay"
    assert "2 failed connections in a row; next try in 60s" in refusal.reason
    assert shaper.check_open("ip-2", OTHER) is None
    clock.advance(60)
    retry = lease(shaper.open("ip-1", OTHER))
    retry.failed()  # still failing: held again at once
    assert refused(shaper.open("ip-1", OTHER)).retry_after == pytest.approx(60)
    clock.advance(60)
    ok = lease(shaper.open("ip-1", OTHER))
    ok.connected()
    lease(shaper.open("ip-1", OTHER)).failed()
    assert shaper.check_open("ip-1", OTHER) is None


# --------------------------------------------------------------------------- reasons


def test_refusal_summary_names_the_budget() -> None:
    same = [
        Refusal(f"ip-{n}", "connection_limit", "connection_limit 5 reached for ...")
        for n in (1, 2, 3)
    ]
    assert refusal_summary("bulk", 'provider "google"', same) == (
        'no source of pool "bulk" may connect to provider "google" now '
        "(connection_limit 5 reached for all 3 sources)"
    )
    mixed = [
        Refusal("ip-1", "suspended", 'source "ip-1" is suspended for provider "google"'),
        Refusal("ip-2", "max_connection_rate", "max_connection_rate 2/m used up"),
    ]
    assert refusal_summary("bulk", 'site "x"', mixed) == (
        'no source of pool "bulk" may connect to site "x" now (ip-1: source "ip-1" is '
        'suspended for provider "google"; ip-2: max_connection_rate 2/m used up)'
    )
    assert refusal_summary("empty", 'site "x"', []).endswith("(the pool has no source)")


def test_expire_forgets_idle_state() -> None:
    shaper, clock = make()
    lease(shaper.open("ip-1", YAHOO)).release()
    shaper.reply("ip-1", YAHOO, "421 [TS02] x")
    assert shaper.buckets and shaper.windows
    clock.advance(3601)
    shaper.expire()
    assert shaper.buckets == {} and shaper.windows == {}


def test_usage_shows_what_is_used_of_each_budget() -> None:
    shaper, _ = make()
    held = lease(shaper.open("ip-1", YAHOO))
    assert held.send() is None
    assert shaper.usage("ip-1", YAHOO) == [
        "connection_limit 2: 1 open",
        "max_message_rate 10/s: available",
        "max_connection_rate 2/m: available",
    ]
    lease(shaper.open("ip-1", YAHOO)).release()
    shaper.reply("ip-1", YAHOO, "421 [TSS04] deferred")
    lines = shaper.usage("ip-1", YAHOO)
    assert lines[2] == "max_connection_rate 2/m: next in 30s"
    assert lines[3].startswith('source "ip-1" is suspended for provider "yahoo"')


def test_a_reloaded_policy_keeps_leases_and_suspensions() -> None:
    shaper, _ = make()
    held = lease(shaper.open("ip-1", OTHER))
    shaper.reply("ip-1", YAHOO, "421 [TSS04] deferred")
    shaper.reply("ip-1", YAHOO, "421 [TS02] x")
    reloaded = (
        '["default"]\nconnection_limit = 1\n[provider.yahoo]\nmatch = [{MXSuffix=".yahoodns.net"}]'
    )
    shaper.replace_policy(policy_from(reloaded))
    assert refused(shaper.open("ip-1", OTHER)).reason.startswith("connection_limit 1 reached")
    assert refused(shaper.open("ip-1", YAHOO)).budget == "suspended"
    assert shaper.windows == {}
    held.release()
    lease(shaper.open("ip-1", OTHER)).release()


def test_rules_of_a_domain_without_rollup_act_on_that_domain_or_its_site() -> None:
    text = """
["solo.example"]
mx_rollup = false

[["solo.example".automation]]
regex = "slow down"
action = [{ SetConfig = { name = "max_deliveries_per_connection", value = 1 } }, "Suspend"]
duration = "5m"
"""
    shaper, _ = make(text)
    solo = Destination("mx.shared.example", "solo.example", ("mx.shared.example",))
    override, suspension = shaper.reply("ip-1", solo, "452 slow down")
    assert override.scope == ("ip-1", "domain", "solo.example")
    assert suspension.scope == ("ip-1", "site", "mx.shared.example")


def test_named_budgets_are_shared_by_every_path_naming_them() -> None:
    shaper, _ = make('["default"]\nadditional_connection_limits = { "global" = 1 }\n')
    held = lease(shaper.open("ip-1", OTHER))
    refusal = refused(shaper.open("ip-2", YAHOO))
    assert refusal.budget == 'additional_connection_limits."global"'
    assert "(shared by every path that names it)" in refusal.reason
    held.release()
    assert shaper.check_open("ip-2", YAHOO) is None


def test_summary_of_sources_all_suspended_lists_each() -> None:
    refusals = [Refusal(f"ip-{n}", "suspended", f'source "ip-{n}" is suspended') for n in (1, 2)]
    assert refusal_summary("p", 'site "x"', refusals) == (
        'no source of pool "p" may connect to site "x" now (all 2 sources are suspended)'
    )
