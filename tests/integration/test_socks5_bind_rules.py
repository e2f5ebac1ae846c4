"""Who may BIND what, through the SOCKS5 door of a running egressd (issue 10, findings 2-3).

KumoMTA picks its source with ``BIND source:0`` and sends one credential for all sources.
With ``[auth.users]``, a BIND succeeds only for a source in a pool the user may use (else
02); a suspended source and an address this host cannot bind get 01, as KumoProxy answers,
so kumod suspends the source on its side. Sources: ``a`` 127.0.0.2 (pool ``main``), ``b``
127.0.0.3 (pool ``other``), ``gone`` 203.0.113.7 (pool ``broken``: not configured on this
host, so it cannot be bound; no packet ever leaves).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import Sink, free_port, receive_exactly

pytestmark = pytest.mark.integration

SUCCEEDED, GENERAL_FAILURE, NOT_ALLOWED = 0, 1, 2

USERS = """
[auth.users]
main = "main-pw"
kumo = { password = "kumo-pw", pools = ["main", "other"] }
alpha = { password = "alpha-pw", pools = ["main"] }
"""


def config_text(sink_port: int, users: str = USERS) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
[source.b]
source_address = "127.0.0.3"
[source.gone]
source_address = "203.0.113.7"
[pool.main.a]
[pool.other.b]
[pool.broken.gone]

[access]
destination_ports = [{sink_port}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:{free_port()}"
pool = "main"
{users}"""


@asynccontextmanager
async def egressd(tmp_path: Path, sink: Sink, users: str = USERS) -> AsyncIterator[RecordingDaemon]:
    async with recording_daemon(config_text(sink.port, users), tmp_path, "socks5") as daemon:
        yield daemon


async def login(port: int, user: str | None, password: str = "") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if user is None:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        return stream
    await stream.send_all(b"\x05\x01\x02")
    assert await receive_exactly(stream, 2) == b"\x05\x02"
    name, secret = user.encode(), password.encode()
    await stream.send_all(b"\x01" + bytes([len(name)]) + name + bytes([len(secret)]) + secret)
    assert await receive_exactly(stream, 2) == b"\x01\x00"
    return stream


async def request(stream: trio.SocketStream, command: int, address: str, port: int) -> int:
    """Send a request for an IPv4 address; the reply code."""
    packed = ipaddress.IPv4Address(address).packed
    await stream.send_all(bytes([5, command, 0, 1]) + packed + struct.pack("!H", port))
    with trio.fail_after(5):
        reply = await receive_exactly(stream, 10)
    return reply[1]


async def bind(port: int, user: str | None, password: str, address: str) -> int:
    stream = await login(port, user, password)
    async with stream:
        return await request(stream, 2, address, 0)


async def bind_then_connect(
    port: int, user: str, password: str, address: str, sink: Sink
) -> tuple[int, int, str]:
    """BIND then CONNECT to the sink: both reply codes and the source the sink saw."""
    stream = await login(port, user, password)
    async with stream:
        bound = await request(stream, 2, address, 0)
        connected = await request(stream, 1, "127.0.0.1", sink.port)
        assert await receive_exactly(stream, len(sink.banner)) == sink.banner
    return bound, connected, sink.connections[-1].peer[0]


async def test_a_user_binds_only_sources_of_its_own_pools(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, sink) as e:
        assert await bind(e.port, "alpha", "alpha-pw", "127.0.0.3") == NOT_ALLOWED
        record = await e.record()
        assert record.outcome == "denied"
        assert record.detail == (
            "BIND 127.0.0.3: source 'b' is in none of the pools user 'alpha' may use (main)"
        )
        # the plain form: the username is the one pool
        assert await bind(e.port, "main", "main-pw", "127.0.0.3") == NOT_ALLOWED
        assert await bind_then_connect(e.port, "alpha", "alpha-pw", "127.0.0.2", sink) == (
            SUCCEEDED,
            SUCCEEDED,
            "127.0.0.2",
        )


async def test_one_credential_reaches_every_pool_it_lists(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, sink) as e:
        for address in ("127.0.0.2", "127.0.0.3"):
            bound, connected, peer = await bind_then_connect(
                e.port, "kumo", "kumo-pw", address, sink
            )
            assert (bound, connected, peer) == (SUCCEEDED, SUCCEEDED, address)
        # without BIND, the listener's pool when the user may use it
        stream = await login(e.port, "kumo", "kumo-pw")
        async with stream:
            assert await request(stream, 1, "127.0.0.1", sink.port) == SUCCEEDED
            await receive_exactly(stream, len(sink.banner))
        assert sink.connections[-1].peer[0] == "127.0.0.2"


async def test_a_suspended_source_is_refused_at_bind_with_01(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, sink) as e:
        e.daemon.runtime.health.suspend("b", 3600)
        assert await bind(e.port, "kumo", "kumo-pw", "127.0.0.3") == GENERAL_FAILURE
        record = await e.record()
        assert (record.outcome, record.source) == ("refused", "b")
        assert record.detail == "BIND 127.0.0.3: source 'b' is suspended"
        assert sink.connections == []
        e.daemon.runtime.health.resume("b")
        assert (await bind_then_connect(e.port, "kumo", "kumo-pw", "127.0.0.3", sink))[2] == (
            "127.0.0.3"
        )


async def test_an_address_this_host_cannot_bind_is_refused_at_bind_with_01(
    sink: Sink, tmp_path: Path
) -> None:
    async with egressd(tmp_path, sink, users="") as e:
        assert await bind(e.port, None, "", "203.0.113.7") == GENERAL_FAILURE
        record = await e.record()
        assert (record.outcome, record.source) == ("dial_failed", "gone")
        assert (record.detail or "").startswith(
            "BIND 203.0.113.7: source 'gone' address 203.0.113.7 cannot be bound on this host:"
        )


def test_a_user_table_naming_an_undefined_pool_is_a_config_error(tmp_path: Path) -> None:
    from egressd.config import ConfigError, load_config

    path = tmp_path / "egressd.toml"
    users = '\n[auth.users]\nkumo = { password = "pw", pools = ["main", "nope"] }\n'
    path.write_text(config_text(25, users))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith('auth: users: kumo: pools[1]: "nope" is not a defined pool')


def test_a_user_table_with_no_pools_is_a_config_error(tmp_path: Path) -> None:
    from egressd.config import ConfigError, load_config

    path = tmp_path / "egressd.toml"
    path.write_text(config_text(25, '\n[auth.users]\nkumo = { password = "pw", pools = [] }\n'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith("auth: users: kumo: pools: lists no pool")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("kumo = 5", "auth: users: kumo: expected a password string or a table, got an integer"),
        ('kumo = { passwd = "pw" }', "auth: users: kumo: password: is required"),
        ('kumo = { password = "pw", pool = ["main"] }', "auth: users: kumo: pool: unknown key"),
    ],
    ids=["number", "no-password", "typo"],
)
def test_a_bad_user_entry_names_its_key(entry: str, problem: str, tmp_path: Path) -> None:
    from egressd.config import ConfigError, load_config

    path = tmp_path / "egressd.toml"
    path.write_text(config_text(25, f"\n[auth.users]\n{entry}\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert problem in str(info.value)
