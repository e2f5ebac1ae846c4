"""Configuration loading: KumoMTA compatibility, merging, and strict validation."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egressd.config import (
    ConfigError,
    Endpoint,
    Problem,
    config_path_from,
    load_config,
    parse_duration,
    parse_hostport,
)

REPO = Path(__file__).resolve().parent.parent


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_kumomta_example_loads_unchanged() -> None:
    config = load_config(REPO / "config" / "sources.toml")
    assert set(config.sources) == {"ip-1", "ip-2", "ip-3"}
    assert config.sources["ip-2"].source_address == ipaddress.ip_address("10.0.0.2")
    assert config.sources["ip-2"].ehlo_domain == "mta2.examplecorp.com"
    assert [(e.source, e.weight) for e in config.pools["pool-1"].entries] == [("ip-1", 1)]
    assert [(e.source, e.weight) for e in config.pools["pool-2"].entries] == [
        ("ip-2", 2),
        ("ip-3", 1),
    ]


def test_shipped_config_loads() -> None:
    config = load_config(REPO / "config" / "egressd.toml")
    assert config.pools
    for listener in (*config.socks5_listeners, *config.proxy_listeners, *config.smtp.listeners):
        ip = listener.address.ip
        assert ip is not None and ip.is_loopback


def test_sources_files_merge_key_by_key_later_file_wins(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", '[source.s]\nsource_address = "127.0.0.2"\nehlo_domain = "a.test"\n')
    write(tmp_path, "b.toml", '[source.s]\nehlo_domain = "b.test"\n[pool.p.s]\nweight = 3\n')
    main = write(tmp_path, "main.toml", 'sources_files = ["a.toml", "b.toml"]\n')
    config = load_config(main)
    source = config.sources["s"]
    assert source.source_address == ipaddress.ip_address("127.0.0.2")
    assert source.ehlo_domain == "b.test"
    assert config.pools["p"].entries[0].weight == 3


def test_example_error_message_names_file_and_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, "sources.toml", '[source."ip-2"]\nsource_address = "10.0.0.300"\n')
    assert errors_of(path) == [
        f'{path}: source "ip-2": source_address: "10.0.0.300" is not an IP address'
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[source.s]\nsource_adress = "127.0.0.1"\n', 'source "s": source_adress: unknown key'),
        ("[source.s]\nsource_address = 127\n", 'source "s": source_address: expected a string'),
        ("[source.s]\nremote_port = 70000\n", 'source "s": remote_port: 70000 is outside 1-65535'),
        ('[source.s]\nremote_port = "25"\n', 'source "s": remote_port: expected an integer'),
        (
            '[source.s]\nttl = "5 fortnights"\n',
            'source "s": ttl: "5 fortnights" has an unknown unit',
        ),
        ('[source.s]\nttl = "soon"\n', 'source "s": ttl: "soon" is not a duration'),
        (
            '[source.s]\nha_proxy_server = "127.0.0.1:5000"\n',
            'source "s": ha_proxy_server: is set without ha_proxy_source_address',
        ),
        (
            '[source.s]\nha_proxy_source_address = "127.0.0.5"\n',
            'source "s": ha_proxy_source_address: is set without ha_proxy_server',
        ),
        (
            '[source.s]\nsocks5_proxy_server = "127.0.0.1:1080"\nsocks5_proxy_username = "u"\n',
            'source "s": socks5_proxy_username: is set without socks5_proxy_password',
        ),
        (
            '[source.s]\nsocks5_proxy_server = "127.0.0.1:99999"\n',
            'source "s": socks5_proxy_server: "127.0.0.1:99999" has a port 99999 outside 1-65535',
        ),
        (
            '[source.s]\nha_proxy_server = "::1:5000"\nha_proxy_source_address = "::1"\n',
            "is an IPv6 address without brackets",
        ),
        (
            '[source.s]\nsource_address = "::1"\nha_proxy_server = "127.0.0.1:5000"\n'
            'ha_proxy_source_address = "127.0.0.5"\n',
            'source "s": source_address: IPv6 address ::1 can never connect to the IPv4 '
            "ha_proxy_server 127.0.0.1:5000",
        ),
        ("[source.s]\n[pool.p.t]\n", 'pool "p": source "t": names a source that is not defined'),
        ("[source.s]\n[pool.p.s]\nweight = -1\n", 'pool "p": source "s": weight: -1 is outside'),
        (
            "[source.s]\n[pool.p.s]\nweight = 1.5\n",
            'pool "p": source "s": weight: expected an integer',
        ),
        ("[source.s]\n[pool.p.s]\nwieght = 2\n", 'pool "p": source "s": wieght: unknown key'),
        (
            '[source.s]\nsuspend_when_unplumbed = { duration = "5m", trigger = "Sometimes" }\n',
            'source "s": suspend_when_unplumbed: trigger: expected "Immediate"',
        ),
        ("[acces]\nclients = []\n", "acces: unknown key"),
        ('[access]\nclients = ["10.0.0.0/33"]\n', 'access: clients[0]: "10.0.0.0/33" is not an IP'),
        ('[[socks5.listener]]\naddress = "localhost:1080"\n', "socks5: listener[0]: address:"),
        ('[[socks5.listener]]\naddress = "127.0.0.1:1080"\npool = "nope"\n', 'pool: "nope" is not'),
        (
            '[smtp.tls.policy]\n"example.com" = "secure"\n',
            'smtp: tls: policy: example.com: "secure" is not one of "none", "may"',
        ),
        ("[smtp.tls]\nmta_sts = 1\n", "smtp: tls: mta_sts: expected"),
        ('[log]\nflush_interval = "2s"\n', "log: flush_interval: 2s is longer than 1s"),
        ('[log]\nflush_interval = "soon"\n', 'log: flush_interval: "soon" is not a duration'),
        ("[log]\nflush_interval = -1\n", "log: flush_interval: -1 is negative"),
        (
            '[smtp.timeouts]\ndata_init = "120s"\n',
            "smtp: timeouts: data_init: 120s must stay below Postfix's client timeout "
            "(at most 110s)",
        ),
    ],
)
def test_each_class_of_bad_config_names_file_and_key_path(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, "egressd.toml", text)
    errors = errors_of(path)
    assert any(e.startswith(f"{path}: ") and expected in e for e in errors), errors


@pytest.mark.parametrize(("text", "seconds"), [("", 0.05), ('flush_interval = "250ms"', 0.25),
                                               ("flush_interval = 0", 0.0)])  # fmt: skip
def test_log_flush_interval_defaults_to_50ms_and_reads_a_duration(
    tmp_path: Path, text: str, seconds: float
) -> None:
    config = load_config(write(tmp_path, "egressd.toml", f"[log]\n{text}\n"))
    assert config.log.flush_interval == seconds


def test_problems_are_records_with_file_key_path_and_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "egressd.toml",
        '[source.s]\nremote_port = 0\n[log]\nformat = "xml"\n[smtp.tls]\nmod = "required"\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (
        Problem(str(path), 'source "s": remote_port', "0 is outside 1-65535"),
        Problem(str(path), "log: format", '"xml" is not one of "text", "json"'),
        Problem(str(path), "smtp: tls: mod", "unknown key"),
    )
    assert caught.value.errors == [str(problem) for problem in caught.value.problems]


def test_a_required_key_and_a_check_across_keys_are_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "egressd.toml",
        '[[smtp.listener]]\npool = "p"\n[smtp.tls]\ncertificate = "c.pem"\n',
    )
    assert errors_of(path) == [
        f"{path}: smtp: listener[0]: address: is required",
        f"{path}: smtp: tls: certificate: certificate and private_key go together; "
        "set both or neither",
    ]


def test_same_pool_entry_in_two_files_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", "[source.s]\n[pool.p.s]\n")
    second = write(tmp_path, "b.toml", "[pool.p.s]\nweight = 2\n")
    main = write(tmp_path, "main.toml", 'sources_files = ["a.toml", "b.toml"]\n')
    errors = errors_of(main)
    first = tmp_path / "a.toml"
    assert errors == [
        f'{second}: pool "p": source "s": is already listed in {first}; list each entry once'
    ]


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sources.toml",
        '[source.a]\nsource_address = "1.2.3"\n[source.b]\nremote_port = 0\n[pool.p.c]\n',
    )
    main = write(
        tmp_path, "main.toml", 'sources_files = ["sources.toml"]\n[limits]\nmax_connections = "x"\n'
    )
    errors = errors_of(main)
    assert len(errors) == 4, errors
    joined = "\n".join(errors)
    assert 'source "a": source_address' in joined
    assert 'source "b": remote_port' in joined
    assert 'pool "p": source "c"' in joined
    assert "limits: max_connections" in joined


def test_missing_sources_file_and_bad_toml_are_named(tmp_path: Path) -> None:
    main = write(tmp_path, "main.toml", 'sources_files = ["missing.toml"]\n')
    assert errors_of(main) == [f"{tmp_path / 'missing.toml'}: file not found"]
    broken = write(tmp_path, "broken.toml", "[source.s\n")
    assert errors_of(broken)[0].startswith(f"{broken}: not valid TOML")


def test_weight_zero_and_empty_pool_are_valid(tmp_path: Path) -> None:
    path = write(tmp_path, "s.toml", "[source.s]\n[pool.empty]\n[pool.cold.s]\nweight = 0\n")
    config = load_config(path)
    assert config.pools["empty"].entries == ()
    assert config.pools["cold"].entries[0].weight == 0


def test_suspend_policies_parse_kumomta_forms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "s.toml",
        '[source.s]\nsuspend_when_unplumbed = { duration = "5m", trigger = "Immediate" }\n'
        'suspend_when_proxy_unhealthy = { duration = "1h", trigger = { Threshold = "3/5m" } }\n',
    )
    source = load_config(path).sources["s"]
    assert source.suspend_when_unplumbed is not None
    assert (source.suspend_when_unplumbed.duration, source.suspend_when_unplumbed.count) == (300, 1)
    assert source.suspend_when_proxy_unhealthy is not None
    policy = source.suspend_when_proxy_unhealthy
    assert (policy.duration, policy.count, policy.window) == (3600, 3, 300)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60),
        ("5 mins", 300),
        ("5 minutes", 300),
        ("1h", 3600),
        ("5m", 300),
        ("1h 30m", 5400),
        ("250ms", 0.25),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:1080", Endpoint("127.0.0.1", 1080)),
        ("[::1]:1080", Endpoint("::1", 1080)),
        ("proxy.example.net:3128", Endpoint("proxy.example.net", 3128)),
    ],
)
def test_proxy_server_forms(text: str, endpoint: Endpoint) -> None:
    assert parse_hostport(text) == endpoint
    assert str(endpoint) == text


def test_config_path_precedence() -> None:
    assert config_path_from("a.toml", {"EGRESSD_CONFIG": "b.toml"}) == "a.toml"
    assert config_path_from(None, {"EGRESSD_CONFIG": "b.toml"}) == "b.toml"
    assert config_path_from(None, {}) == "/etc/egressd/egressd.toml"
