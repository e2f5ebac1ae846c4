"""Effective limits: KumoMTA's precedence across default, provider, site, domain and source."""

from __future__ import annotations

from shaping_helpers import policy_from

from egressd.shaping.params import DEFAULT_ORIGIN, Params
from egressd.shaping.sites import Destination
from egressd.shaping.throttle import LimitSpec, ThrottleSpec

SITE = "(a|b).mx.p.example"
LAYERS = """
["default"]
connection_limit = 1
max_deliveries_per_connection = 1
max_message_rate = "1/s"
max_connection_rate = "1/s"
source_selection_rate = "1/s"
consecutive_connection_failures_before_delay = 1

[provider."p"]
match = [{ MXSuffix = ".mx.p.example" }]
max_deliveries_per_connection = 2
max_message_rate = "2/s"
max_connection_rate = "2/s"
source_selection_rate = "2/s"
consecutive_connection_failures_before_delay = 2
provider_connection_limit = 7

[provider."p".sources."ip-1"]
max_message_rate = "3/s"
max_connection_rate = "3/s"
source_selection_rate = "3/s"
consecutive_connection_failures_before_delay = 3
provider_source_selection_rate = "9/d"

["rolled.example"]
max_connection_rate = "4/s"
source_selection_rate = "4/s"
consecutive_connection_failures_before_delay = 4

["plain.example"]
mx_rollup = false
source_selection_rate = "5/s"
consecutive_connection_failures_before_delay = 5

["rolled.example".sources."ip-1"]
consecutive_connection_failures_before_delay = 6
additional_connection_limits = { "x" = 6 }

["plain.example".sources."ip-1"]
additional_connection_limits = { "x" = 7 }
"""
PLAIN = Destination(SITE, "plain.example", ("a.mx.p.example", "b.mx.p.example"))


def test_each_layer_wins_over_the_ones_before() -> None:
    policy = policy_from(LAYERS, {"rolled.example": SITE})
    limits = policy.limits("ip-1", PLAIN)
    by_label = {b.label: b for b in limits.budgets}
    assert by_label["connection_limit"].value == LimitSpec(1)  # default
    assert limits.max_deliveries_per_connection.value == 2  # provider
    assert by_label["max_message_rate"].value == ThrottleSpec(3, 1)  # provider source
    assert by_label["max_connection_rate"].value == ThrottleSpec(4, 1)  # site
    assert by_label["source_selection_rate"].value == ThrottleSpec(5, 1)  # domain
    assert limits.failures_before_delay.value == 6  # site source
    assert by_label['additional_connection_limits."x"'].value == LimitSpec(7)  # domain source
    assert by_label["provider_connection_limit"].key == (
        "additional_connection_limits",
        "shaping-provider-p-ip-1-limit",
    )
    assert by_label["provider_connection_limit"].value == LimitSpec(7)
    assert by_label["provider_source_selection_rate"].key[:2] == (
        "additional_source_selection_rates",
        "shaping-provider-p-ip-1-selection-rate",
    )
    assert limits.provider == "p"


def test_values_keep_the_file_and_section_they_came_from() -> None:
    policy = policy_from(LAYERS, {"rolled.example": SITE}, file="custom.toml")
    limits = policy.limits("ip-1", PLAIN)
    by_label = {b.label: b for b in limits.budgets}
    assert str(by_label["max_connection_rate"].origin) == '["rolled.example"] in custom.toml'
    assert str(by_label["max_message_rate"].origin) == (
        '[provider."p".sources."ip-1"] in custom.toml'
    )
    assert str(limits.failures_before_delay.origin) == (
        '["rolled.example".sources."ip-1"] in custom.toml'
    )
    lines = limits.explain()
    assert 'max_connection_rate 4/s  (["rolled.example"] in custom.toml)' in lines
    assert 'max_deliveries_per_connection 2  ([provider."p"] in custom.toml)' in lines


def test_another_source_skips_the_source_sections() -> None:
    policy = policy_from(LAYERS, {"rolled.example": SITE})
    limits = policy.limits("ip-2", PLAIN)
    by_label = {b.label: b for b in limits.budgets}
    assert by_label["max_message_rate"].value == ThrottleSpec(2, 1)
    assert limits.failures_before_delay.value == 5
    assert 'additional_connection_limits."x"' not in by_label
    assert "provider_source_selection_rate" not in by_label
    assert by_label["provider_connection_limit"].key[1] == "shaping-provider-p-ip-2-limit"


def test_without_a_provider_match_provider_values_do_not_apply() -> None:
    policy = policy_from(LAYERS, {"rolled.example": SITE})
    mixed = Destination("elsewhere", "other.example", ("a.mx.p.example", "mx.other.example"))
    limits = policy.limits("ip-1", mixed)
    assert limits.provider is None
    assert limits.max_deliveries_per_connection.value == 1
    assert [b.label for b in limits.budgets] == [
        "connection_limit",
        "max_message_rate",
        "max_connection_rate",
        "source_selection_rate",
    ]


def test_kumomta_defaults_fill_what_no_file_sets() -> None:
    limits = policy_from("").limits("ip-1", Destination("mx.example"))
    (budget,) = limits.budgets
    assert budget.label == "connection_limit"
    assert budget.value == LimitSpec(32)
    assert budget.key == ("connection_limit", "ip-1", "mx.example")
    assert budget.origin == DEFAULT_ORIGIN
    assert limits.max_deliveries_per_connection.value == 1024
    assert limits.failures_before_delay.value == 100


def test_rolled_up_domains_apply_to_every_domain_of_their_site() -> None:
    text = '["gmail.com"]\nconnection_limit = 3\n'
    site = "alt1?.gmail-smtp-in.l.google.com"
    policy = policy_from(text, {"gmail.com": site})
    vanity = Destination(site, "vanity.example")
    assert policy.limits("ip-1", vanity).budgets[0].value == LimitSpec(3)
    assert policy.limits("ip-1", Destination("other-site", "gmail.com")).budgets[0].value == (
        LimitSpec(32)
    )


def test_unresolved_and_null_mx_rollups_apply_nowhere_with_a_warning() -> None:
    text = '["gone.example"]\nconnection_limit = 3\n\n["null.example"]\nconnection_limit = 4\n'
    policy = policy_from(text, {"null.example": ""})
    messages = [f.message for f in policy.findings]
    assert any("its MX hosts are unknown" in m for m in messages)
    assert any("null MX" in m for m in messages)
    assert policy.limits("ip-1", Destination("", "null.example")).budgets[0].value == (
        LimitSpec(32)
    )


def test_same_site_domains_merge_in_load_order() -> None:
    text = (
        '["a.example"]\nconnection_limit = 3\nmax_deliveries_per_connection = 9\n'
        '["b.example"]\nconnection_limit = 4\n'
    )
    policy = policy_from(text, {"a.example": "shared", "b.example": "shared"})
    limits = policy.limits("ip-1", Destination("shared", "c.example"))
    assert limits.budgets[0].value == LimitSpec(4)
    assert limits.max_deliveries_per_connection.value == 9


def test_overrides_apply_last() -> None:
    policy = policy_from(LAYERS, {"rolled.example": SITE})
    override = Params()
    override.set_value("connection_limit", LimitSpec(1), DEFAULT_ORIGIN)
    override.set_value("max_deliveries_per_connection", 99, DEFAULT_ORIGIN)
    limits = policy.limits("ip-1", PLAIN, [override])
    assert limits.max_deliveries_per_connection.value == 99


def test_rules_come_in_kumomta_order_with_their_scope() -> None:
    text = """
[["default".automation]]
regex = "d"
action = "Suspend"
duration = 1

[provider."p"]
match = [{ DomainSuffix = ".p.example" }]

[[provider."p".automation]]
regex = "p"
action = "Suspend"
duration = 1

[["rolled.example".automation]]
regex = "s"
action = "Suspend"
duration = 1

["plain.p.example"]
mx_rollup = false

[["plain.p.example".automation]]
regex = "o"
action = "Suspend"
duration = 1
"""
    policy = policy_from(text, {"rolled.example": "site-1"})
    rules = policy.rules_for(Destination("site-1", "plain.p.example"))
    assert [(b.rule.patterns[0].pattern, b.scope, b.provider) for b in rules] == [
        ("d", "site", None),
        ("p", "provider", "p"),
        ("s", "site", None),
        ("o", "domain", None),
    ]
    assert policy.provider_of(Destination("x", "mail.p.example")) == (
        "p",
        'domain mail.p.example ends with ".p.example" (DomainSuffix)',
    )
    assert policy.provider_of(Destination("x", "mail.q.example")) is None


def test_domain_sections_match_whatever_case_they_were_written_in() -> None:
    policy = policy_from('["Solo.Example"]\nmx_rollup = false\nconnection_limit = 3\n')
    limits = policy.limits("ip-1", Destination("mx.solo.example", "solo.example"))
    assert limits.budgets[0].value == LimitSpec(3)
