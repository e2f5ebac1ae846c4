"""The Redis state backend with real daemons and a real redis-server on loopback.

- two daemons (``python -m egressd run``) add their warm-up counts to the same day, see
  each other in ``egressd status --fleet`` (each flagging the other's different
  configuration), and one killed with ``kill -9`` turns stale;
- Redis unreachable (SIGSTOP) under a running daemon: mail keeps flowing, the outage is
  logged once, shown by the metric and by status, and once Redis answers again every
  count is there exactly once;
- Redis down at startup: the daemon refuses to start, exit 75, naming the server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from harness import free_port
from redis_harness import RedisServer
from service_harness import daemon_process
from smtp_harness import smtp_sink
from state_helpers import StateBackend
from test_warmup_smtp import send

from egressd.config import Endpoint
from egressd.daemon import Daemon
from egressd.doors.smtp import SmtpDoor
from egressd.observe import DaemonControls
from egressd.status import ask, format_state_line, scrape

pytestmark = pytest.mark.integration


def config_text(
    directory: Path, sink_port: int, relay: str, state: StateBackend, node: str, **extra: str
) -> str:
    control = f'[control]\nsocket = "{directory / "control.sock"}"\n'
    return f"""
{control}
[metrics]
listen = "127.0.0.1:0"
[access]
deny_destinations = []
[[smtp.listener]]
address = "{relay}"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
{state.toml(node_name=f'"{node}"', **extra)}
[warmup]
flush_interval = "0.1s"
[warmup.plan.test]
days = [1000, 2000]
[source."cold"]
source_address = "127.0.0.3"
remote_port = {sink_port}
warmup = "test"
[pool."main"."cold"]
weight = 1
"""


def write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "egressd.toml"
    path.write_text(text)
    return path


async def sent_in_store(state: StateBackend) -> int:
    return sum(c.sent for c in (await state.snapshot()).counts)


@pytest.fixture
def redis_state(tmp_path: Path, redis_server: RedisServer) -> StateBackend:
    return StateBackend("redis", tmp_path, redis_server)


async def test_two_daemons_share_a_day_see_each_other_and_a_killed_one_turns_stale(
    short_dir: Path, redis_state: StateBackend
) -> None:
    relay_a, relay_b = free_port(), free_port()
    with smtp_sink() as sink:
        text_a = config_text(short_dir / "a", sink.port, f"127.0.0.1:{relay_a}", redis_state, "a")
        text_b = config_text(short_dir / "b", sink.port, f"127.0.0.1:{relay_b}", redis_state, "b")
        config_a, config_b = write(short_dir / "a", text_a), write(short_dir / "b", text_b)
        async with daemon_process(config_a) as a, daemon_process(config_b) as b:
            await send(relay_a, 3)
            await send(relay_b, 2)
            with trio.fail_after(10):
                while await sent_in_store(redis_state) < 5:
                    await trio.sleep(0.05)
            assert await sent_in_store(redis_state) == 5
            [day] = (await redis_state.snapshot()).counts
            assert (day.source, day.sent) == ("cold", 5)

            socket_a = str(short_dir / "a" / "control.sock")
            with trio.fail_after(10):
                while len(await _members(socket_a)) < 2:
                    await trio.sleep(0.05)
            await _status(socket_a)
            members = {m["id"]: m for m in await _members(socket_a)}
            assert set(members) == {"a", "b"}
            assert members["b"]["pid"] == b.pid and members["a"]["pid"] == a.pid
            assert not members["a"]["other_config"] and members["b"]["other_config"]
            assert members["a"]["version"] and members["a"]["generation"]
            shown = await trio.run_process(
                [sys.executable, "-m", "egressd", "status", "--fleet", "-c", str(config_a)],
                capture_stdout=True,
            )
            rows = {
                line.split()[0]: line
                for line in shown.stdout.decode().splitlines()
                if line[:2] in ("a ", "b ")
            }
            assert "DIFFERENT" in rows["b"] and "DIFFERENT" not in rows["a"]
            assert str(b.pid) in rows["b"]

            b.send(signal.SIGKILL)
            with trio.fail_after(10):  # three heartbeat intervals (0.6 s) and a beat
                while "b" not in [s["id"] for s in (await _fleet(socket_a))["stale"]]:
                    await trio.sleep(0.1)
            assert [m["id"] for m in (await _fleet(socket_a))["members"]] == ["a"]


async def _status(socket_path: str) -> dict[str, Any]:
    reply = await trio.to_thread.run_sync(ask, socket_path, {"command": "status"})
    assert reply["ok"], reply
    status: dict[str, Any] = reply["status"]
    return status


async def _fleet(socket_path: str) -> dict[str, list[dict[str, Any]]]:
    state = (await _status(socket_path))["state"]
    fleet: dict[str, list[dict[str, Any]]] = state["fleet"] or {"members": [], "stale": []}
    return fleet


async def _members(socket_path: str) -> list[dict[str, Any]]:
    return (await _fleet(socket_path))["members"]


async def test_redis_unreachable_mail_flows_logged_once_and_nothing_counted_twice(
    tmp_path: Path,
    redis_state: StateBackend,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    with smtp_sink() as sink:
        text = config_text(
            tmp_path, sink.port, "127.0.0.1:0", redis_state, "solo", command_timeout='"0.3s"'
        )
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            relay = port_of(daemon, "smtp")
            assert await send(relay, 2) == [(250, "accepted")] * 2
            await _until_stored(redis_state, 2)

            os.kill(redis_server.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(10):
                    while _state(daemon)["up"]:
                        await trio.sleep(0.05)
                assert await send(relay, 3) == [(250, "accepted")] * 3  # mail keeps flowing
                await trio.sleep(0.5)  # several flushes and heartbeats fail meanwhile
                assert _state(daemon)["error"]
                assert "DOWN for" in format_state_line(_state(daemon), time.time())
                assert 'egressd_state_backend_up{backend="redis"} 0.0' in await _scrape(daemon)
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)
            with trio.fail_after(10):
                while not _state(daemon)["up"]:
                    await trio.sleep(0.05)
            await _until_stored(redis_state, 5)
            assert 'egressd_state_backend_up{backend="redis"} 1.0' in await _scrape(daemon)
            assert "egressd_fleet_alive_nodes 1.0" in await _scrape(daemon)
            await trio.sleep(0.3)  # a few more flushes: nothing may be added twice
            assert await sent_in_store(redis_state) == 5
            assert len(sink.messages) == 5
    texts = [r.getMessage() for r in caplog.records]
    assert sum("state backend DOWN" in t for t in texts) == 1
    assert sum("state backend back" in t for t in texts) == 1


def _state(daemon: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = DaemonControls(daemon).status()["state"]
    return state


async def _scrape(daemon: Daemon) -> str:
    assert daemon.extras is not None and daemon.extras.metrics_port is not None
    endpoint = Endpoint("127.0.0.1", daemon.extras.metrics_port)
    return await trio.to_thread.run_sync(scrape, endpoint)


async def _until_stored(state: StateBackend, count: int) -> None:
    with trio.fail_after(10):
        while await sent_in_store(state) < count:
            await trio.sleep(0.05)


async def test_redis_down_at_startup_refuses_to_start_exit_75(
    tmp_path: Path, redis_state: StateBackend, redis_server: RedisServer
) -> None:
    redis_server.kill()
    text = config_text(
        tmp_path, 9, f"127.0.0.1:{free_port()}", redis_state, "x", startup_wait='"0.5s"'
    )
    config = write(tmp_path, text)
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "run", "-c", str(config)],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 75
    last_line = result.stderr.decode().splitlines()[-1]
    assert "cannot start:" in last_line and f"127.0.0.1:{redis_server.port}" in last_line
    assert "unreachable" in last_line


async def test_each_worker_beats_its_own_heartbeat(
    short_dir: Path, redis_state: StateBackend
) -> None:
    with smtp_sink() as sink:
        text = config_text(short_dir, sink.port, f"127.0.0.1:{free_port()}", redis_state, "w")
        config = write(short_dir, "[daemon]\nworkers = 2\n" + text)
        async with daemon_process(config) as daemon:
            socket_path = str(short_dir / "control.sock")
            with trio.fail_after(10):
                while len(await _members(socket_path)) < 2:
                    await trio.sleep(0.05)
            members = await _members(socket_path)
            assert [m["id"] for m in members] == ["w/1", "w/2"]
            assert all(m["pid"] != daemon.pid for m in members)  # the workers, not the parent
            assert len({m["generation"] for m in members}) == 1
            assert not any(m["other_config"] for m in members)
