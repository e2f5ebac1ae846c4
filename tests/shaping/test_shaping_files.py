"""Loading shaping files: typed keys, errors naming file and key path, notices, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egressd.shaping.files import Finding, ShapingError, load_shaping_files
from egressd.shaping.params import Origin
from egressd.shaping.rules import SetConfig, Suspend
from egressd.shaping.throttle import LimitSpec, ThrottleSpec


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(paths: list[Path]) -> list[str]:
    with pytest.raises(ShapingError) as caught:
        load_shaping_files(paths)
    assert all(f.level == "error" for f in caught.value.findings)
    return [str(f) for f in caught.value.findings]


def test_enforced_keys_are_typed_with_their_origin(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "s.toml",
        """
["default"]
connection_limit = "local:10"
max_connection_rate = "100/min"
max_message_rate = "1,000/h"
source_selection_rate = "50/day,max_burst=1"
max_deliveries_per_connection = 100
consecutive_connection_failures_before_delay = 5
additional_connection_limits = { "global" = 100 }
additional_message_rate_throttles = { "all" = "10/s" }
additional_source_selection_rates = { "warm" = "500/d" }
""",
    )
    files = load_shaping_files([path])
    params = files.default.params
    origin = Origin(str(path), '["default"]')
    assert params.values["connection_limit"].value == LimitSpec(10, force_local=True)
    assert params.values["connection_limit"].origin == origin
    assert params.values["max_connection_rate"].value == ThrottleSpec(100, 60)
    assert params.values["max_message_rate"].value == ThrottleSpec(1000, 3600)
    assert params.values["source_selection_rate"].value == ThrottleSpec(50, 86400, 1)
    assert params.values["max_deliveries_per_connection"].value == 100
    assert params.values["consecutive_connection_failures_before_delay"].value == 5
    assert params.tables["additional_connection_limits"]["global"].value == LimitSpec(100)
    assert params.tables["additional_message_rate_throttles"]["all"].value == ThrottleSpec(10, 1)
    assert params.tables["additional_source_selection_rates"]["warm"].value == ThrottleSpec(
        500, 86400
    )
    assert files.findings == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["default"]\nmax_message_rate = "100/our"', '["default"].max_message_rate'),
        ('["default"]\nmax_message_rate = 100', '["default"].max_message_rate'),
        ('["default"]\nconnection_limit = 0', '["default"].connection_limit: limit 0'),
        ('["default"]\nmax_deliveries_per_connection = "x"', "max_deliveries_per_connection"),
        ('["default"]\nconection_limit = 5', '["default"].conection_limit: is not a'),
        (
            '["a.com"]\nprovider_connection_limit = 5',
            '["a.com"].provider_connection_limit: is only valid in a [provider',
        ),
        ('["a.com"]\nmatch = []', '["a.com"].match: is only valid'),
        (
            '["a.com"]\nprovider_source_selection_rate = "1/s"',
            '["a.com"].provider_source_selection_rate: is only valid',
        ),
        ('["a.com"]\nmx_rollup = "yes"', '["a.com"].mx_rollup: expected true or false'),
        ('["a.com"]\nreplace_base = 1', '["a.com"].replace_base: expected true or false'),
        ('["a.com"]\nadditional_connection_limits = 5', "additional_connection_limits: expected"),
        (
            '["a.com"]\nadditional_connection_limits = { x = "many" }',
            '["a.com"].additional_connection_limits."x": \'many\' is not a number',
        ),
        ('["a.com"]\nsources = 5', '["a.com"].sources: expected a table'),
        ('["a.com".sources."ip-1"]\nmx_rollup = false', '["a.com".sources."ip-1"].mx_rollup'),
        ('["a.com"]\nsources = { "ip-1" = 5 }', '["a.com".sources."ip-1"]: expected a table'),
        ('["a.com"]\nautomation = 5', '["a.com"].automation: expected an array'),
        ("provider = 5", "provider: expected a table of providers"),
        ('[provider."p"]\nmatch = 5', '[provider."p"].match: expected an array'),
        ('[provider."p"]\nmatch = [{ MXSuffix = 5 }]', '[provider."p"].match[0]: expected'),
        ('[provider."p"]\nmatch = [{ Suffix = ".x" }]', "got 'Suffix'"),
        ('[provider."p"]\nmatch = ["x"]', '[provider."p"].match[0]: expected'),
        ('[provider."p"]\nmatch = [{ Network = "10.0.0/33" }]', "match[0].Network: '10.0.0/33'"),
        ('[provider."p"]\nmx_rollup = false', '[provider."p"].mx_rollup: is not a'),
        ('"a.com" = 5', '["a.com"]: expected a table'),
    ],
)
def test_errors_name_file_and_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "bad.toml", text)
    errors = errors_of([path])
    assert any(expected in error and error.startswith(f"error: {path}: ") for error in errors), (
        errors
    )


RULE = '[["a.com".automation]]\n'


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('regex = "x"\naction = "Suspend"', '["a.com"].automation[0].duration: is required'),
        ('regex = "x"\naction = "Suspend"\nduration = "soon"', "automation[0].duration"),
        ('regex = "("\naction = "Suspend"\nduration = 5', "automation[0].regex: '(' is not"),
        ('regex = ["a", "("]\naction = "Suspend"\nduration = 5', "automation[0].regex[1]"),
        ("regex = []\naction = 'Suspend'\nduration = 5", "regex: expected a regex"),
        ('action = "Suspend"\nduration = 5', "automation[0].regex: expected"),
        ('regex = "x"\naction = "Nap"\nduration = 5', 'automation[0].action: expected "Suspend"'),
        (
            'regex = "x"\naction = ["Suspend", "Nap"]\nduration = 5',
            "automation[0].action[1]: expected",
        ),
        (
            'regex = "x"\naction = {SetConfig={name="connection_limt", value=1}}\nduration = 5',
            "action.SetConfig.name: 'connection_limt' is not a make_egress_path key",
        ),
        (
            'regex = "x"\naction = {SetConfig={name="connection_limit", value=0}}\nduration = 5',
            "action.SetConfig.value: limit 0 must be 1 or larger",
        ),
        (
            'regex = "x"\naction = {SetConfig={name="connection_limit"}}\nduration = 5',
            "action.SetConfig: expected { name = KEY, value = VALUE }",
        ),
        ('regex = "x"\naction = "Suspend"\nduration = 5\ntrigger = "Later"', "trigger: expected"),
        (
            'regex = "x"\naction = "Suspend"\nduration = 5\ntrigger = {Threshold="2/fortnight"}',
            "automation[0].trigger.Threshold: throttle '2/fortnight'",
        ),
        ('regex = "x"\naction = "Suspend"\nduration = 5\nmatch_internal = 1', "match_internal"),
    ],
)
def test_rule_errors_name_the_rule(tmp_path: Path, rule: str, expected: str) -> None:
    path = write(tmp_path, "rules.toml", RULE + rule)
    errors = errors_of([path])
    assert any(expected in error for error in errors), errors


def test_a_rule_reads_into_actions_trigger_and_duration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.toml",
        """
[[provider."p".automation]]
regex = ["one", "two"]
action = [{SetConfig={name="max_message_rate", value="1/minute"}}, "Suspend",
          {SetDomainConfig={name="connection_limit", value=1}}]
trigger = {Threshold="3/hr"}
duration = "90m"
match_internal = true
""",
    )
    rule = load_shaping_files([path]).providers["p"].automation[0]
    assert [p.pattern for p in rule.patterns] == ["one", "two"]
    assert rule.threshold == ThrottleSpec(3, 3600)
    assert rule.duration == 5400.0
    assert rule.match_internal
    first, second, third = rule.actions
    assert isinstance(first, SetConfig) and first.name == "max_message_rate"
    assert first.params.values["max_message_rate"].value == ThrottleSpec(1, 60)
    assert first.params.values["max_message_rate"].origin.section == (
        '[provider."p"] automation[0]'
    )
    assert isinstance(second, Suspend)
    assert isinstance(third, SetConfig) and third.domain_only
    assert rule.label == f'[provider."p"] automation[0] in {path}'
    assert rule.matches("421 two things") and not rule.matches("421 three")


def test_mta_keys_and_actions_are_noticed_once_each(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "a.toml",
        """
["default"]
enable_tls = "Opportunistic"
idle_timeout = "60s"

["b.com"]
enable_tls = "Required"

["b.com".sources."ip-1"]
max_ready = 10

[["b.com".automation]]
regex = "x"
action = "SuspendTenant"
duration = "5m"

[["b.com".automation]]
regex = "y"
action = ["SuspendTenant", "Bounce", {SetConfig={name="enable_tls", value="Disabled"}}]
duration = "5m"

[["b.com".automation]]
regex = "z"
action = ["Suspend", "BounceCampaign"]
duration = "5m"
""",
    )
    second = write(tmp_path, "b.toml", '["c.com"]\nenable_tls = "Required"\n')
    files = load_shaping_files([first, second])
    notices = [f for f in files.findings if f.level == "notice"]
    assert [n.key for n in notices] == [
        '["default"].enable_tls',
        '["default"].idle_timeout',
        '["b.com".sources."ip-1"].max_ready',
        '["b.com"].automation[0].action',
        '["b.com"].automation[1].action[1]',
        '["b.com"].automation[1].action[2].SetConfig',
        '["b.com"].automation[2].action[1]',
    ]
    assert "SuspendTenant acts on the MTA's queues" in notices[3].message
    assert "Bounce acts" in notices[4].message
    # rules whose every action is the MTA's are dropped; the others keep egressd's actions
    section = files.domains[0]
    assert len(section.automation) == 1
    assert section.automation[0].actions == (Suspend(),)


def test_unknown_rule_keys_warn_as_kumomta_ignores_them(tmp_path: Path) -> None:
    path = write(tmp_path, "r.toml", RULE + 'regex="x"\naction="Suspend"\nduration=5\nnote="hi"')
    files = load_shaping_files([path])
    assert [str(f) for f in files.findings] == [
        f'warning: {path}: ["a.com"].automation[0].note: is not a rule key (KumoMTA ignores it)'
    ]


def test_single_label_domains_warn(tmp_path: Path) -> None:
    path = write(tmp_path, "s.toml", "[gmail]\nconnection_limit = 3\n")
    files = load_shaping_files([path])
    assert any("single DNS label" in f.message for f in files.findings)


def test_json_files_load_like_toml(tmp_path: Path) -> None:
    data = {
        "default": {"connection_limit": 3},
        "provider": {"p": {"match": [{"DomainSuffix": ".p.com"}], "provider_connection_limit": 2}},
        "x.com": {"mx_rollup": False, "sources": {"ip-1": {"max_message_rate": "5/s"}}},
    }
    for name in ("s.json", "s.conf"):
        path = write(tmp_path, name, json.dumps(data))
        files = load_shaping_files([path])
        assert files.default.params.values["connection_limit"].value == LimitSpec(3)
        assert files.providers["p"].provider_limits["provider_connection_limit"].value == (
            LimitSpec(2)
        )
        assert files.domains[0].sources["ip-1"].values["max_message_rate"].value == (
            ThrottleSpec(5, 1)
        )
        assert not files.domains[0].mx_rollup


def test_unreadable_and_malformed_files_are_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    broken = write(tmp_path, "broken.toml", "[default\n")
    not_table = write(tmp_path, "list.json", "[1, 2]")
    neither = write(tmp_path, "neither.conf", "{nope")
    errors = errors_of([missing, broken, not_table, neither])
    assert errors[0].startswith(f"error: {missing}: cannot be read")
    assert errors[1].startswith(f"error: {broken}: is not valid TOML")
    assert errors[2] == f"error: {not_table}: is JSON but not a table of sections"
    assert "is not valid TOML" in errors[3] and "is not valid JSON" in errors[3]


def test_later_files_merge_over_earlier_and_replace_base_replaces(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "base.toml",
        """
["default"]
connection_limit = 10
additional_connection_limits = { "a" = 1 }

[provider."p"]
match = [{ DomainSuffix = ".p.com" }]
max_deliveries_per_connection = 20

[[provider."p".automation]]
regex = "one"
action = "Suspend"
duration = 60
""",
    )
    layer = write(
        tmp_path,
        "layer.toml",
        """
["default"]
additional_connection_limits = { "b" = 2 }

[provider."p"]
match = [{ DomainSuffix = ".q.com" }]
provider_max_message_rate = "5/s"

[[provider."p".automation]]
regex = "two"
action = "Suspend"
duration = 60

[provider."r"]
match = [{ DomainSuffix = ".r.com" }]
""",
    )
    replace = write(
        tmp_path,
        "replace.toml",
        """
[provider."r"]
replace_base = true
match = [{ DomainSuffix = ".s.com" }]
connection_limit = 4
""",
    )
    files = load_shaping_files([base, layer, replace])
    default = files.default.params
    assert default.values["connection_limit"].value == LimitSpec(10)
    assert set(default.tables["additional_connection_limits"]) == {"a", "b"}
    assert default.tables["additional_connection_limits"]["b"].origin.file == str(layer)
    p = files.providers["p"]
    assert [m.value for m in p.matches] == [".p.com", ".q.com"]
    assert [r.patterns[0].pattern for r in p.automation] == ["one", "two"]
    assert p.params.values["max_deliveries_per_connection"].value == 20
    assert p.provider_limits["provider_max_message_rate"].value == ThrottleSpec(5, 1)
    r = files.providers["r"]
    assert [m.value for m in r.matches] == [".s.com"]
    assert r.params.values["connection_limit"].origin.file == str(replace)


def test_providers_that_can_never_match_are_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """
[provider."google"]
match = [{ MXSuffix = ".google.com" }]

[[provider."gmail".automation]]
regex = "Our system has detected"
action = "Suspend"
duration = "1h"

[provider."kpn"]
match = [{ MXSuffix = ".kpnmail.nl." }]
""",
    )
    findings = load_shaping_files([path]).findings
    warnings = [f for f in findings if f.level == "warning"]
    assert (
        Finding(
            "warning",
            str(path),
            '[provider."kpn"].match[0].MXSuffix',
            "can never match: '.kpnmail.nl.' ends with a dot; names are compared without it",
        )
        in warnings
    )
    gmail = next(f for f in warnings if f.key == '[provider."gmail"]')
    assert "it has no match entry" in gmail.message
    assert "1 automation rule are dead" in gmail.message
    assert "providers that match: google" in gmail.message
    kpn = next(f for f in warnings if f.key == '[provider."kpn"]')
    assert "none of its match entries can match" in kpn.message


def test_regex_needing_a_backslash_is_suspect(tmp_path: Path) -> None:
    path = write(
        tmp_path, "r.toml", RULE + "regex='''\\\\[HCM1\\\\]'''\naction='Suspend'\nduration=5"
    )
    findings = load_shaping_files([path]).findings
    assert len(findings) == 1 and "needs a backslash in the reply" in findings[0].message


def test_default_sources_are_dead_as_in_kumomta(tmp_path: Path) -> None:
    path = write(tmp_path, "d.toml", '["default".sources."ip-1"]\nconnection_limit = 2\n')
    (finding,) = load_shaping_files([path]).findings
    assert finding.key == '["default".sources."ip-1"]'
    assert "never applies" in finding.message
