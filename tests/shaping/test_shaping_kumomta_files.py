"""KumoMTA's own shipped shaping files load unchanged, and their dead rules are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_clock import FakeClock

from egressd.shaping.files import ShapingFiles, load_shaping_files
from egressd.shaping.policy import ShapingPolicy
from egressd.shaping.shaper import Override, Shaper, Suspension
from egressd.shaping.sites import Destination, site_name
from egressd.shaping.throttle import LimitSpec

FIXTURES = Path(__file__).parent / "fixtures"
SHIPPED = FIXTURES / "kumomta-policy-extras-shaping.toml"
COMMUNITY = FIXTURES / "kumomta-community-shaping.toml"

GMAIL_MX = [(5, "gmail-smtp-in.l.google.com"), (10, "alt1.gmail-smtp-in.l.google.com")]
GMAIL = Destination(site_name(GMAIL_MX), "gmail.com", tuple(h for _, h in GMAIL_MX))
YAHOO = Destination(
    "(mta5|mta6).am0.yahoodns.net", "yahoo.com", ("mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net")
)
COMCAST = Destination(
    "(mx1|mx2).comcast.net", "comcast.net", ("mx1.comcast.net", "mx2.comcast.net")
)
KPN = Destination("mx1.kpnmail.nl", "kpn.example", ("mx1.kpnmail.nl",))
SITES = {"comcast.net": COMCAST.site, "mail.com": "mx.mail.com"}


@pytest.fixture(scope="module")
def both() -> ShapingFiles:
    return load_shaping_files([SHIPPED, COMMUNITY])


def test_the_shipped_file_loads_alone() -> None:
    files = load_shaping_files([SHIPPED])
    assert {f.level for f in files.findings} == {"notice"}
    assert sorted(files.providers) == [
        "apple",
        "google",
        "mimecast",
        "office365",
        "office365-dane",
        "orange",
        "outlook",
        "yahoo",
    ]
    assert files.rollup_domains() == ["comcast.net", "mail.com", "smtp.mailgun.com"]


def test_mta_keys_and_actions_are_each_named_once(both: ShapingFiles) -> None:
    notices = [f for f in both.findings if f.level == "notice"]
    keys = [n.message.split(" ")[0] for n in notices]
    assert keys == [
        "idle_timeout",
        "data_timeout",
        "data_dot_timeout",
        "enable_tls",
        "remember_broken_tls",
        "SuspendTenant",
        "max_ready",
        "system_shutdown_timeout",
    ]
    assert notices[5].key == '["comcast.net"].automation[1].action'


def test_the_dead_rules_are_named(both: ShapingFiles) -> None:
    warnings = {(f.file, f.key): f.message for f in both.findings if f.level == "warning"}
    community = str(COMMUNITY)
    gmail = warnings[(community, '[provider."gmail"]')]
    assert "it has no match entry" in gmail
    assert "2 automation rules are dead" in gmail
    assert "google" in gmail
    for provider, suffix in (
        ("barracuda", ".barracudanetworks.com."),
        ("netvigator", ".netvigator.com."),
        ("kpn", ".kpnmail.nl."),
    ):
        entry = warnings[(community, f'[provider."{provider}"].match[0].MXSuffix')]
        assert f"{suffix!r} ends with a dot" in entry
        assert (
            "none of its match entries can match"
            in warnings[(community, f'[provider."{provider}"]')]
        )
    assert "needs a backslash" in warnings[(community, '[provider."apple"].automation[2].regex')]
    assert len(warnings) == 8


def test_google_limits_come_from_the_shipped_file(both: ShapingFiles) -> None:
    policy = ShapingPolicy.from_files(both, SITES)
    limits = policy.limits("ip-1", GMAIL)
    assert limits.provider == "google"
    by_label = {b.label: b for b in limits.budgets}
    assert by_label["connection_limit"].value == LimitSpec(10)
    assert by_label["provider_connection_limit"].value == LimitSpec(5)
    assert by_label["provider_connection_limit"].key == (
        "additional_connection_limits",
        "shaping-provider-google-ip-1-limit",
    )
    assert str(by_label["max_connection_rate"].value) == "100/m"
    assert str(by_label["max_message_rate"].value) == "100/s"
    assert limits.max_deliveries_per_connection.value == 50
    assert limits.failures_before_delay.value == 5
    assert str(limits.failures_before_delay.origin) == f'[provider."google"] in {SHIPPED}'
    # the community gmail rules never apply: only default and google rules (none) remain
    assert [b.rule.origin.section for b in policy.rules_for(GMAIL)] == ['["default"] automation[0]']


def test_a_kpn_domain_gets_no_kpn_limits(both: ShapingFiles) -> None:
    policy = ShapingPolicy.from_files(both, SITES)
    limits = policy.limits("ip-1", KPN)
    assert limits.provider is None
    assert limits.max_deliveries_per_connection.value == 100  # ["default"], not kpn's 10


def test_yahoo_tss04_suspends_source_and_provider(both: ShapingFiles) -> None:
    clock = FakeClock()
    shaper = Shaper(ShapingPolicy.from_files(both, SITES), clock)
    reply = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to user complaints"
    effects = shaper.reply("ip-1", YAHOO, reply)
    suspensions = [e for e in effects if isinstance(e, Suspension)]
    assert {s.scope for s in suspensions} == {("ip-1", "provider", "yahoo")}
    assert max(s.until for s in suspensions) == clock.now + 7200
    assert shaper.check_open("ip-1", YAHOO) is not None
    assert shaper.check_open("ip-2", YAHOO) is None
    assert shaper.check_open("ip-1", GMAIL) is None


def test_default_rules_lower_rates_per_site(both: ShapingFiles) -> None:
    clock = FakeClock()
    shaper = Shaper(ShapingPolicy.from_files(both, SITES), clock)
    reply = "421 4.7.28 Messages from 192.0.2.1 temporarily deferred"
    effects = shaper.reply("ip-1", GMAIL, reply)
    assert [(e.name, e.scope) for e in effects if isinstance(e, Override)] == [
        ("max_message_rate", ("ip-1", "site", GMAIL.site)),
        ("connection_limit", ("ip-1", "site", GMAIL.site)),
    ]
    limits = shaper.limits("ip-1", GMAIL)
    by_label = {b.label: b for b in limits.budgets}
    assert by_label["connection_limit"].value == LimitSpec(1)
    assert str(by_label["max_message_rate"].value) == "1/m"


def test_comcast_threshold_rule_needs_two_matches_an_hour(both: ShapingFiles) -> None:
    clock = FakeClock()
    shaper = Shaper(ShapingPolicy.from_files(both, SITES), clock)
    assert shaper.reply("ip-1", COMCAST, "421 RL0000 rate limited") == []
    clock.advance(600)
    (effect,) = shaper.reply("ip-1", COMCAST, "421 RL0000 rate limited")
    assert isinstance(effect, Override) and effect.name == "max_connection_rate"
    rates = shaper.limits("ip-1", COMCAST).of_kind("connection rate")
    assert [str(b.value) for b in rates] == ["10000/h"]
    assert shaper.limits("ip-1", COMCAST).budgets[0].value == LimitSpec(25)
