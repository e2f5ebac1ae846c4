"""The Redis client from ``[state]``, against a real redis-server: plain, AUTH, ACL user,
TLS, wrong credentials, and an outage (killed, then started again on the same port)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from redis_harness import RedisServer

from egressd.config import load_config
from egressd.config.state import StateSettings
from egressd.fleet.client import FleetClient, RedisUnavailable, open_client


def settings(tmp_path: Path, url: str, *extra: str) -> StateSettings:
    path = tmp_path / "egressd.toml"
    lines = ["[state]", 'backend = "redis"', f'url = "{url}"', 'connect_timeout = "1s"', *extra]
    path.write_text("\n".join(lines) + "\n")
    return load_config(path).state


async def round_trip(client: FleetClient) -> None:
    await client.command("SET", client.key("probe"), "1")
    assert await client.command("GET", client.key("probe")) == b"1"


async def test_commands_scripts_and_transactions_under_the_prefix(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    state = settings(tmp_path, redis_server.url, 'prefix = "fleet-a"')
    async with open_client(state) as client:
        await round_trip(client)
        assert client.key("day", "2026-11-30") == "fleet-a:day:2026-11-30"
        adder = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
        assert await client.script(adder, [client.key("n")], [5]) == 5
        assert await client.script(adder, [client.key("n")], [2]) == 7
        replies = await client.transaction(
            [["HINCRBY", client.key("h"), "sent", 2], ["HINCRBY", client.key("h"), "sent", 3]]
        )
        assert replies == [2, 5]
        assert sorted(await client.command("KEYS", "*")) == [
            b"fleet-a:h",
            b"fleet-a:n",
            b"fleet-a:probe",
        ]


async def test_requirepass_from_a_password_file(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory(password="pa:ss@word")
    (tmp_path / "redis.password").write_text("pa:ss@word\n")
    async with open_client(settings(tmp_path, server.url, 'password_file = "redis.password"')) as c:
        await round_trip(c)


async def test_an_acl_user_and_password_in_the_url(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory(users={"egressd": "s3cret"})
    async with open_client(settings(tmp_path, server.url_with("egressd", "s3cret"))) as client:
        await round_trip(client)
        assert await client.command("ACL", "WHOAMI") == b"egressd"


async def test_a_wrong_password_is_an_error_naming_the_server_not_the_password(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory(password="right")
    async with open_client(settings(tmp_path, server.url_with(None, "wrong"))) as client:
        with pytest.raises(RedisUnavailable) as caught:
            await client.ping()
    message = str(caught.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "wrong" not in message.replace("WRONGPASS", "")


async def test_tls_with_the_configured_ca(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory(tls=True, password="tls-secret")
    assert server.url.startswith("rediss://")
    url = server.url_with(None, "tls-secret")
    async with open_client(settings(tmp_path, url, f'ca_file = "{server.ca_file}"')) as client:
        await round_trip(client)


async def test_tls_without_trusting_the_ca_fails(
    tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory(tls=True)
    async with open_client(settings(tmp_path, server.url)) as client:
        with pytest.raises(RedisUnavailable):
            await client.ping()


async def test_an_outage_fails_calls_and_the_client_comes_back_on_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with open_client(settings(tmp_path, redis_server.url)) as client:
        await round_trip(client)
        redis_server.kill()
        with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{redis_server.port}"):
            await client.command("GET", client.key("probe"))
        redis_server.start()
        with trio.fail_after(5):
            while True:
                try:
                    await client.ping()
                    break
                except RedisUnavailable:
                    await trio.sleep(0.05)
        assert await client.command("GET", client.key("probe")) is None  # nothing persisted


async def test_a_client_set_up_while_redis_is_down_works_once_it_is_up(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.kill()
    async with open_client(settings(tmp_path, redis_server.url)) as client:
        with pytest.raises(RedisUnavailable):
            await client.ping()
        redis_server.start()
        with trio.fail_after(5):
            while True:
                try:
                    await round_trip(client)
                    break
                except RedisUnavailable:
                    await trio.sleep(0.05)
