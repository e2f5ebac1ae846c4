"""The metrics endpoint of the real daemon: only ``[metrics] clients``, and a cap on scrapes.

A local user who could hold any number of idle connections to ``/metrics`` took the
descriptors the front doors need. Clients here are told apart by the loopback address they
bind (127.0.0.1 is allowed, 127.0.0.2 is not).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_helpers import running_daemon
from harness import read_to_eof
from service_harness import scrape

from egressd.daemon import Daemon

pytestmark = pytest.mark.integration

CAP = 4


@asynccontextmanager
async def egressd(tmp_path: Path) -> AsyncIterator[Daemon]:
    text = f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[metrics]
listen = "127.0.0.1:0"
clients = ["127.0.0.1/32"]
max_connections = {CAP}
"""
    async with running_daemon(text, tmp_path) as daemon:
        yield daemon


def metrics_port(daemon: Daemon) -> int:
    assert daemon.extras is not None and daemon.extras.metrics_port is not None
    return daemon.extras.metrics_port


async def test_a_client_outside_metrics_clients_is_closed_without_an_answer(
    tmp_path: Path,
) -> None:
    async with egressd(tmp_path) as daemon:
        port = metrics_port(daemon)
        with trio.fail_after(5):
            outsider = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            async with outsider:
                await outsider.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                try:
                    answer = await read_to_eof(outsider)
                except trio.BrokenResourceError:
                    answer = b""  # closed with the request unread: a reset
            assert b"egressd_" not in answer and not answer.startswith(b"HTTP/1.0 200")
            assert "egressd_build_info" in await scrape(port)  # 127.0.0.1 is allowed


async def test_scrapes_beyond_the_cap_get_503_at_once(tmp_path: Path) -> None:
    extra = 8
    async with egressd(tmp_path) as daemon:
        port = metrics_port(daemon)
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(CAP + extra)]
        answers: dict[int, bytes] = {}

        async def read(index: int) -> None:
            answers[index] = await read_to_eof(streams[index])

        with trio.fail_after(5):  # the endpoint's own request timeout is 10 s
            async with trio.open_nursery() as nursery:
                for index in range(len(streams)):
                    nursery.start_soon(read, index)
                while len(answers) < extra:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)  # room for a wrong extra answer to show
                assert len(answers) == extra
                assert all(a.startswith(b"HTTP/1.0 503 ") for a in answers.values()), answers
                nursery.cancel_scope.cancel()
            for stream in streams:
                await stream.aclose()
            # The held connections are gone: a scrape is served again.
            while not (await get(port)).startswith(b"HTTP/1.0 200 "):
                await trio.sleep(0.01)


async def get(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        return await read_to_eof(stream)
