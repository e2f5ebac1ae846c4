"""KumoMTA files behave exactly as in KumoMTA (issue 11, items 1-7), read without sockets."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from egressd.checks import socks5_going_direct
from egressd.config import (
    DEFAULT_CONNECT_FAILURE_POLICY,
    ConfigError,
    Problem,
    load_config,
    parse_duration,
)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> tuple[Problem, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def messages_of(path: Path) -> list[str]:
    return [f"{problem.key}: {problem.message}" for problem in problems_of(path)]


SOCKS = (
    '[source.s]\nsocks5_proxy_server = "127.0.0.1:1080"\n'
    'socks5_proxy_source_address = "127.0.0.3"\n'
)


# --------------------------------------------------------------------------- 1. KeySource


def test_a_plain_string_password_is_the_path_of_a_file_read_at_each_load(tmp_path: Path) -> None:
    secret = write(tmp_path, "socks.pw", "first\n")
    main = write(
        tmp_path,
        "egressd.toml",
        SOCKS + 'socks5_proxy_username = "kumo"\nsocks5_proxy_password = "socks.pw"\n',
    )
    config = load_config(main)
    assert config.sources["s"].socks5_proxy_password == "first\n"  # its bytes, as KumoMTA
    assert config.key_files == (secret,)
    secret.write_text("second")
    assert load_config(main).sources["s"].socks5_proxy_password == "second"


def test_an_absolute_password_path_and_the_key_data_form(tmp_path: Path) -> None:
    secret = write(tmp_path, "abs.pw", "from-file")
    main = write(
        tmp_path,
        "egressd.toml",
        SOCKS
        + f'socks5_proxy_username = "kumo"\nsocks5_proxy_password = "{secret}"\n'
        + '[source.t]\nsocks5_proxy_server = "127.0.0.1:1080"\n'
        + 'socks5_proxy_source_address = "127.0.0.4"\nsocks5_proxy_username = "kumo"\n'
        + 'socks5_proxy_password = { key_data = "inline" }\n',
    )
    config = load_config(main)
    assert config.sources["s"].socks5_proxy_password == "from-file"
    assert config.sources["t"].socks5_proxy_password == "inline"
    assert config.key_files == (secret,)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"missing.pw"', 'names the file "{dir}/missing.pw", which does not exist'),
        (
            '{ vault_mount = "secret", vault_path = "socks" }',
            "is a Vault KeySource, which egressd does not read",
        ),
        (
            '{ event_name = "get_password", event_args = [] }',
            "is an event KeySource (a Lua callback), which egressd cannot run",
        ),
        ("{ key_data = 7 }", "key_data: expected a string, got an integer"),
        ('{ key = "x" }', "is a KeySource table with key; expected key_data"),
        ('{ key_data = "" }', "is empty (key_data holds no password)"),
        ("42", "expected a file name or a table"),
    ],
)
def test_password_forms_egressd_cannot_use_are_refused_naming_file_and_key(
    tmp_path: Path, value: str, message: str
) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        SOCKS + f'socks5_proxy_username = "kumo"\nsocks5_proxy_password = {value}\n',
    )
    [problem] = problems_of(main)
    assert (problem.file, problem.key) == (str(main), 'source "s": socks5_proxy_password')
    assert problem.message.startswith(message.format(dir=tmp_path)), problem.message


# --------------------------------------------------------------------------- 2. JSON files


def test_a_sources_file_not_ending_in_toml_is_json_with_comments(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sources.json",
        """{
  // KumoMTA strips comments before parsing
  "source": {
    "ip-1": { "source_address": "127.0.0.2", "ehlo_domain": "a//b.test" }, # shell style
    /* a block
       comment */
    "ip-2": { "source_address": "127.0.0.3", "ttl": 30 }
  },
  "pool": { "p": { "ip-1": { "weight": 4294967295 }, "ip-2": {} } }
}
""",
    )
    main = write(tmp_path, "egressd.toml", 'sources_files = ["sources.json"]\n')
    config = load_config(main)
    assert config.sources["ip-1"].ehlo_domain == "a//b.test"
    assert config.sources["ip-2"].ttl == 30
    assert [(e.source, e.weight) for e in config.pools["p"].entries] == [
        ("ip-1", 2**32 - 1),
        ("ip-2", 1),
    ]


def test_bad_json_in_a_sources_file_names_the_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "sources.conf", '{\n  "source": {,}\n}\n')
    main = write(tmp_path, "egressd.toml", 'sources_files = ["sources.conf"]\n')
    [problem] = problems_of(main)
    assert problem.file == str(bad)
    assert problem.message.startswith("not valid JSON:") and "line 2" in problem.message
    write(tmp_path, "sources.conf", json.dumps([1, 2]))
    assert problems_of(main)[0].message == (
        "not a sources file: expected a JSON object, got an array"
    )


# --------------------------------------------------------------------------- 3. durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0s", 0.0),
        ("60", None),
        ("2weeks", 1_209_600.0),
        ("1M", 2_630_016.0),
        ("1y", 31_557_600.0),
        ("1h 30m", 5400.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("5us", 5e-6),
        ("7ns", 7e-9),
    ],
)
def test_durations_as_humantime(value: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(value)  # a bare number in a string needs a unit, as in humantime
    else:
        assert parse_duration(value) == pytest.approx(seconds)


def test_ttl_numbers_are_seconds_and_zero_means_zero(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        '[source.a]\nttl = "0s"\n[source.b]\nttl = 90\n[source.c]\nttl = 1.5\n[source.d]\n',
    )
    sources = load_config(main).sources
    assert [sources[name].ttl for name in "abcd"] == [0.0, 90.0, 1.5, 60.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-5", "-5 is negative; a duration is 0 or more seconds"),
        ("true", 'expected a duration (seconds, or a string such as "5m"), got a boolean'),
        ('"5 Minutes"', '"5 Minutes" has an unknown unit "Minutes"'),
        ('""', '"" is empty'),
    ],
)
def test_bad_durations_are_refused(tmp_path: Path, value: str, message: str) -> None:
    main = write(tmp_path, "egressd.toml", f"[source.s]\nttl = {value}\n")
    assert messages_of(main) == [f'source "s": ttl: {message}']


# --------------------------------------------------------------------------- 4. thresholds


@pytest.mark.parametrize(
    ("spec", "count", "window"),
    [
        ("3/hr", 3, 3600),
        ("10/day", 10, 86400),
        ("3/5m", 3, 300),
        ("local:3/min", 3, 60),
        ("5/h,max_burst=2", 5, 3600),
        ("1,000/d", 1000, 86400),
        ("1_000/second", 1000, 1),
    ],
)
def test_suspension_thresholds_take_kumomta_throttle_specs(
    tmp_path: Path, spec: str, count: int, window: int
) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        "[source.s]\nsuspend_when_unplumbed = "
        f'{{ duration = "1h", trigger = {{ Threshold = "{spec}" }} }}\n',
    )
    policy = load_config(main).sources["s"].suspend_when_unplumbed
    assert policy is not None
    assert (policy.duration, policy.count, policy.window) == (3600, count, window)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3/fortnight", '"3/fortnight" has an unknown period "fortnight"'),
        ("0/hr", '"0/hr" has a quantity of 0; it must be at least 1'),
        ("3", '"3" is not quantity/period'),
        ("x/hr", '"x/hr" has "x" where a number belongs'),
    ],
)
def test_bad_thresholds_quote_values_as_toml(tmp_path: Path, spec: str, message: str) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        f'[health]\nsuspend_on_connect_failures = {{ duration = "1m", trigger = '
        f'{{ Threshold = "{spec}" }} }}\n',
    )
    [text] = messages_of(main)
    assert text.startswith(f"health: suspend_on_connect_failures: trigger: Threshold {message}")


# --------------------------------------------------------------------------- 5. name, weight, ehlo


def test_a_name_key_equal_to_the_table_name_is_accepted(tmp_path: Path) -> None:
    main = write(tmp_path, "egressd.toml", '[source."ip-1"]\nname = "ip-1"\n')
    assert load_config(main).sources["ip-1"].name == "ip-1"
    write(tmp_path, "egressd.toml", '[source."ip-1"]\nname = "ip-2"\n')
    assert messages_of(main) == [
        'source "ip-1": name: "ip-2" differs from the table\'s name "ip-1"; '
        "drop it or make them equal"
    ]


def test_weights_go_up_to_two_to_the_32_minus_one(tmp_path: Path) -> None:
    main = write(tmp_path, "egressd.toml", f"[source.s]\n[pool.p.s]\nweight = {2**32}\n")
    assert messages_of(main) == [f'pool "p": source "s": weight: {2**32} is outside 0-{2**32 - 1}']


@pytest.mark.parametrize(
    "name",
    ["mta1.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]", "mta_1.example.", "localhost"],
)
def test_any_ehlo_domain_kumomta_sends_is_accepted(tmp_path: Path, name: str) -> None:
    main = write(tmp_path, "egressd.toml", f'[source.s]\nehlo_domain = "{name}"\n')
    assert load_config(main).sources["s"].ehlo_domain == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("two words", "is not an EHLO name"),
        ("", "is not an EHLO name"),
        ("[192.0.2]", "is not an address literal"),
        ("[IPv6:192.0.2.1]", "is not an address literal"),
    ],
)
def test_ehlo_names_that_cannot_go_on_the_wire_are_refused(
    tmp_path: Path, name: str, message: str
) -> None:
    main = write(tmp_path, "egressd.toml", f'[source.s]\nehlo_domain = "{name}"\n')
    [text] = messages_of(main)
    assert text.startswith(f'source "s": ehlo_domain: "{name}" {message}')


# --------------------------------------------------------------------------- 6. SOCKS5 hop


def test_a_socks5_server_without_source_address_goes_direct_and_check_says_so(
    tmp_path: Path,
) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        '[source.kumo]\nsource_address = "127.0.0.2"\nsocks5_proxy_server = "127.0.0.1:1080"\n'
        + SOCKS
        + '[source.dante]\nsocks5_proxy_server = "127.0.0.1:1080"\n'
        + "egressd_socks5_plain_connect = true\n",
    )
    config = load_config(main)
    kumo, bind, dante = (config.sources[name] for name in ("kumo", "s", "dante"))
    assert (kumo.hop, kumo.egress_address) == ("direct", ipaddress.ip_address("127.0.0.2"))
    assert (bind.hop, bind.egress_address) == ("socks5", ipaddress.ip_address("127.0.0.3"))
    assert (dante.hop, dante.egress_address) == ("socks5", None)
    [warning] = socks5_going_direct(config)
    assert warning.startswith(
        'source "kumo": socks5_proxy_server 127.0.0.1:1080 is not used: without '
        "socks5_proxy_source_address KumoMTA (and egressd) connect directly"
    )


def test_the_plain_connect_key_needs_a_server_and_no_bind_address(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        "egressd.toml",
        "[source.a]\negressd_socks5_plain_connect = true\n"
        + SOCKS
        + "egressd_socks5_plain_connect = true\n",
    )
    assert messages_of(main) == [
        'source "a": egressd_socks5_plain_connect: is set without socks5_proxy_server',
        'source "s": egressd_socks5_plain_connect: is set together with '
        "socks5_proxy_source_address, which asks for KumoMTA's BIND; set one or the other",
    ]


# --------------------------------------------------------------------------- 7. suspension defaults


def test_without_suspend_keys_egressds_health_defaults_apply(tmp_path: Path) -> None:
    """KumoMTA's suspend_when_* are opt-in; egressd keeps its [health] defaults (README)."""
    main = write(tmp_path, "egressd.toml", '[source.s]\nsource_address = "127.0.0.2"\n')
    config = load_config(main)
    assert config.sources["s"].suspend_when_unplumbed is None
    assert config.health.suspend_on_connect_failures == DEFAULT_CONNECT_FAILURE_POLICY
    assert (DEFAULT_CONNECT_FAILURE_POLICY.count, DEFAULT_CONNECT_FAILURE_POLICY.window) == (3, 60)
