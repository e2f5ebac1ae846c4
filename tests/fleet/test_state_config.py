"""``[state]``: the backend, the Redis URL, secrets kept out of the main file, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from daemon_helpers import running_daemon

from egressd.checks import effective_settings
from egressd.config import ConfigError, RedisUrl, load_config
from egressd.config.state import parse_redis_url


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "egressd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_the_default_backend_is_sqlite_and_needs_no_url(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert config.state.backend == "sqlite"
    assert config.state.url is None
    assert config.state.prefix == "egressd"


def test_a_redis_backend_with_user_password_file_and_tls(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cr:et@\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = load_config(
        _write(
            tmp_path,
            '[state]\nbackend = "redis"\nurl = "rediss://egressd@redis.example:6380/2"\n'
            'password_file = "secret"\nca_file = "ca.pem"\nprefix = "fleet-a"\n'
            'connect_timeout = "500ms"\ncommand_timeout = 2\n',
        )
    )
    state = config.state
    assert state.url == RedisUrl("redis.example", 6380, tls=True, username="egressd", database=2)
    assert state.password == "s3cr:et@"  # one trailing newline dropped, the rest kept
    assert state.ca_file == str(tmp_path / "ca.pem")
    assert (state.prefix, state.connect_timeout, state.command_timeout) == ("fleet-a", 0.5, 2.0)


def test_a_password_in_the_url_is_masked_by_check_effective(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, '[state]\nbackend = "redis"\nurl = "redis://u:hunter2@127.0.0.1"\n')
    )
    assert config.state.password == "hunter2"
    lines = effective_settings(config)
    assert 'state.url = "redis://u:***@127.0.0.1:6379/0"  # default: (unset)' in lines
    assert not any("hunter2" in line for line in lines)


def test_a_password_file_is_masked_by_check_effective(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("hunter2")
    config = load_config(
        _write(
            tmp_path,
            '[state]\nbackend = "redis"\nurl = "redis://127.0.0.1"\npassword_file = "secret"\n',
        )
    )
    lines = effective_settings(config)
    assert 'state.password_file = "***"  # default: (unset)' in lines
    assert not any("hunter2" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('backend = "redis"', 'state: url: is required with backend = "redis"'),
        ('backend = "etcd"', 'state: backend: "etcd" is not one of'),
        ('url = "http://x"', 'state: url: "http://x" is not a redis:// or rediss:// URL'),
        ('url = "redis+unix:///run/r.sock"', "is not a redis:// or rediss:// URL"),
        ('url = "redis://h/db1"', 'has "db1" as database'),
        ('url = "redis://h:99999"', "is not a valid URL"),
        ('prefix = "a b"', 'state: prefix: "a b" must be 1-64 letters'),
        ('password_file = "nothere"', "state: password_file: names the file"),
        ("command_timeout = 0", "state: command_timeout: must be above zero"),
        (
            'backend = "redis"\nurl = "redis://h"\nca_file = "egressd.toml"',
            "state: ca_file: is set but url is not rediss://",
        ),
    ],
)
def test_bad_state_keys_name_the_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    found = errors(tmp_path, f"[state]\n{text}\n")
    assert any(problem in error and str(tmp_path / "egressd.toml") in error for error in found), (
        found
    )


def test_a_missing_redis_client_is_a_config_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "glide" else real(name, *a)
    )
    found = errors(tmp_path, '[state]\nbackend = "redis"\nurl = "redis://127.0.0.1"\n')
    assert any("state: backend:" in e and "pip install egressd[redis]" in e for e in found), found


def test_url_forms() -> None:
    assert parse_redis_url("redis://h") == RedisUrl("h", 6379)
    assert parse_redis_url("redis://:p%40ss@[::1]:7000/3") == RedisUrl(
        "::1", 7000, password="p@ss", database=3
    )
    assert str(parse_redis_url("rediss://u:p@h")) == "rediss://u:***@h:6379/0"


def _write(directory: Path, text: str) -> Path:
    path = directory / "egressd.toml"
    path.write_text(text)
    return path


async def test_a_reload_that_changes_state_says_it_waits_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = '[[socks5.listener]]\naddress = "127.0.0.1:0"\npool = "p"\n[pool.p]\n'
    async with running_daemon(base + '[state]\nprefix = "a"\n', tmp_path, {}) as daemon:
        _write(tmp_path, base + '[state]\nprefix = "b"\n')
        assert await daemon.reload("test")
        assert daemon.runtime.config.state.prefix == "b"
    assert any("[state] changed" in r.getMessage() for r in caplog.records)
