"""A warming source's daily quota holds across ``[daemon] workers = 2``: each worker counts
its own messages, and the day's count per (source, provider) lives in the supervisor's
book (:mod:`egressd.fleet.quotas`), so the two together send exactly the quota from the
warming source and the rest from the warm one. The real ``python -m egressd run`` on
loopback; which worker serves is chosen by stopping the other (``Workers.only``)."""

from __future__ import annotations

import smtplib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_pool
from harness import Sink, free_port
from service_harness import daemon_process, sample, scrape
from smtp_harness import smtp_sink
from test_workers import Workers

from egressd.status import ask

pytestmark = pytest.mark.integration

QUOTA = 4
ROUNDS = 4  # worker 1, worker 2, worker 1, worker 2
PER_ROUND = 3 * QUOTA // ROUNDS
CLIENTS = 3


def config(directory: Path, mx_port: int, metrics_port: int = 0) -> Path:
    path = directory / "egressd.toml"
    metrics = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    path.write_text(
        f"""
[daemon]
workers = 2
[state]
directory = "{directory / "state"}"
heartbeat_interval = "1s"
{metrics}[control]
socket = "{directory / "control.sock"}"
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
"""
        + cold_and_warm_pool(QUOTA, mx_port)
    )
    return path


def send(port: int, first: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for index in range(first, first + count):
            client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: q\r\n\r\nhi\r\n")


def concurrent_sends(port: int, first: int) -> None:
    share = PER_ROUND // CLIENTS
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(send, port, first + i * share, share) for i in range(CLIENTS)]
        for future in futures:
            future.result()


async def test_two_workers_send_exactly_the_warming_sources_quota_together(
    short_dir: Path, sink: Sink
) -> None:
    """... and ``warmup status`` and ``egressd_warmup_used`` show the host's count of the
    day (the shared counter, read with each heartbeat), not the answering worker's."""
    metrics_port = free_port()
    with smtp_sink() as mx:
        async with daemon_process(config(short_dir, mx.port, metrics_port)) as process:
            w = Workers(process, short_dir, sink, metrics_port)
            port = await w.port("smtp")
            with trio.fail_after(40):
                for index in range(ROUNDS):
                    async with w.only(1 + index % 2):
                        await trio.to_thread.run_sync(concurrent_sends, port, index * PER_ROUND)
                await mx.wait(3 * QUOTA)
                await w.wait_sessions_logged("smtp", ROUNDS * CLIENTS)
            served = (w.sessions_of("smtp", 1), w.sessions_of("smtp", 2))
            assert served == (ROUNDS * CLIENTS // 2, ROUNDS * CLIENTS // 2)
            peers = [m.peer for m in mx.messages]
            assert (peers.count("127.0.0.3"), peers.count("127.0.0.4")) == (QUOTA, 2 * QUOTA)
            with trio.fail_after(10):  # each worker sent half: 2 of 4 on its own
                while (await cold_used(w), await scraped_used(w)) != (QUOTA, QUOTA):
                    await trio.sleep(0.1)


async def cold_used(w: Workers) -> int:
    """``warmup status``'s "used" of the cold source to "other" (one worker answers)."""
    request = {"command": "warmup", "action": "status", "source": "cold"}
    reply = await trio.to_thread.run_sync(ask, w.control, request)
    assert reply["ok"], reply
    (row,) = [r for r in reply["warmup"]["rows"] if r["provider"] == "other"]
    return int(row["used"])


async def scraped_used(w: Workers) -> int:
    text = await scrape(w.metrics_port)
    value = sample(text, "egressd_warmup_used", source="cold", provider="other")
    return -1 if value is None else int(value)


async def test_a_kept_connection_of_the_warming_source_carries_its_quota_then_moves_over(
    short_dir: Path, sink: Sink
) -> None:
    """Later messages on a kept connection take their shared ticket before MAIL: the
    warming source's quota goes over one connection, then the warm source takes over."""
    with smtp_sink() as mx:
        async with daemon_process(config(short_dir, mx.port)) as process:
            w = Workers(process, short_dir, sink, 0)
            port = await w.port("smtp")
            with trio.fail_after(20):
                async with w.only(2):
                    await trio.to_thread.run_sync(send, port, 0, QUOTA + 2)
        peers = [m.peer for m in mx.messages]
        assert peers == ["127.0.0.3"] * QUOTA + ["127.0.0.4"] * 2
        opened = [line.split()[0] for line in mx.connections]  # "PEER EHLO name"
        assert (opened.count("127.0.0.3"), opened.count("127.0.0.4")) == (1, 1)
