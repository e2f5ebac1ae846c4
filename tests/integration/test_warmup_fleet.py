"""Two egressd daemons on one real redis-server send exactly a warming source's daily
quota together (:mod:`egressd.fleet.quotas`): the day's count per (source, provider) is a
counter in Redis, each daemon taking tickets ahead. Each daemon is ``python -m egressd
run`` with ``[state] backend = "redis"``, stopped by PID; mail goes to a loopback sink.
Redis killed: local shares, said by ``egressd status``; back empty: the count resumes."""

from __future__ import annotations

import smtplib
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_pool
from harness import free_port
from redis_harness import RedisServer
from service_harness import daemon_process
from smtp_harness import smtp_sink

pytestmark = pytest.mark.integration

QUOTA = 4
MESSAGES = 3 * QUOTA


def node(directory: Path, redis: RedisServer, mx_port: int) -> tuple[Path, int]:
    directory.mkdir()
    port = free_port()
    config = directory / "egressd.toml"
    config.write_text(
        f"""
[state]
backend = "redis"
url = "{redis.url}"
connect_timeout = "0.5s"
command_timeout = "0.5s"
heartbeat_interval = "0.3s"
[control]
socket = "{directory / "control.sock"}"
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:{port}"
pool = "main"
"""
        + cold_and_warm_pool(QUOTA, mx_port)
    )
    return config, port


def send(port: int, index: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: q\r\n\r\nhi\r\n")


def both_nodes_at_once(ports: tuple[int, int]) -> None:
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, ports[i % 2], i) for i in range(MESSAGES)]
        for future in futures:
            future.result()


async def test_two_daemons_on_one_redis_send_exactly_the_warming_sources_quota(
    short_dir: Path, redis_server: RedisServer
) -> None:
    with smtp_sink() as mx:
        one, one_port = node(short_dir / "one", redis_server, mx.port)
        two, two_port = node(short_dir / "two", redis_server, mx.port)
        async with AsyncExitStack() as stack:
            for config in (one, two):
                await stack.enter_async_context(daemon_process(config))
            with trio.fail_after(30):
                await trio.to_thread.run_sync(both_nodes_at_once, (one_port, two_port))
                await mx.wait(MESSAGES)
            peers = [m.peer for m in mx.messages]
            assert (peers.count("127.0.0.3"), peers.count("127.0.0.4")) == (QUOTA, 2 * QUOTA)
            status = await trio.run_process(
                [sys.executable, "-m", "egressd", "status", "-c", str(one)], capture_stdout=True
            )
            assert "shaping budgets and warm-up quotas: shared through the store" in (
                status.stdout.decode()
            )


async def status_of(config: Path) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "status", "-c", str(config)],
        capture_stdout=True,
        check=False,
    )
    return result.stdout.decode()


def sequential(port: int, first: int, count: int) -> None:
    for index in range(first, first + count):
        send(port, index)


async def test_without_redis_each_daemon_sends_its_local_share_and_the_count_resumes_after(
    short_dir: Path, redis_server: RedisServer
) -> None:
    """Redis killed: a daemon sends half the quota (two daemons alive), and the status
    says so; Redis back (empty): what it sent meanwhile counts, so the fleet still sends
    the quota and no more."""
    with smtp_sink() as mx:
        one, one_port = node(short_dir / "one", redis_server, mx.port)
        two, two_port = node(short_dir / "two", redis_server, mx.port)
        async with AsyncExitStack() as stack:
            for config in (one, two):
                await stack.enter_async_context(daemon_process(config))
            with trio.fail_after(30):
                while "(2 nodes alive)" not in await status_of(one):
                    await trio.sleep(0.1)
                redis_server.kill()
                await trio.to_thread.run_sync(sequential, one_port, 0, QUOTA)
                peers = [m.peer for m in mx.messages]
                assert (peers.count("127.0.0.3"), peers.count("127.0.0.4")) == (QUOTA // 2, 2)
                assert "warm-up quotas: LOCAL SHARES (1/2 of each)" in await status_of(one)
                redis_server.start()  # empty: the day's counter is gone
                while "warm-up quotas: shared through the store" not in await status_of(one):
                    await trio.sleep(0.1)
                await trio.to_thread.run_sync(sequential, two_port, QUOTA, QUOTA)
                await mx.wait(2 * QUOTA)
        peers = [m.peer for m in mx.messages]
        assert (peers.count("127.0.0.3"), peers.count("127.0.0.4")) == (QUOTA, QUOTA)
