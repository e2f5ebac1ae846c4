"""Held log lines (``[log] flush_interval``) are never lost and never cut, with two workers.

Each worker holds its connection lines up to ``flush_interval`` and writes them in one
write of at most PIPE_BUF bytes to the stderr both share with the supervisor. What an
operator would notice: sessions that ended just before a SIGTERM missing from the log
(the workers exit with lines still held), or one worker's batch cutting through a line of
the other's. A second's interval makes the lines certainly held when the signal comes.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import DEFAULT_BANNER, Sink
from service_harness import socks_connect
from test_workers import two_workers

pytestmark = pytest.mark.integration

HELD = '[log]\nflush_interval = "1s"\n'
LINE = re.compile(r"^\S+ (debug|info|warning|error|critical) egressd[.\w]*: ")


async def test_lines_held_by_both_workers_at_a_sigterm_are_all_written_whole(
    short_dir: Path, sink: Sink
) -> None:
    async with two_workers(short_dir, sink, extra=HELD) as w:
        socks = await w.port("socks5")
        opened: list[Any] = []

        async def open_one() -> None:
            connection = await socks_connect(socks, "127.0.0.1", sink.port)
            await connection.receive_until(DEFAULT_BANNER)
            opened.append(connection)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(open_one)
            held = [row["active_sessions"] for row in (await w.status())["workers"]]
            for connection in opened:
                await connection.finish()
            while len(sink.connections) < 16:
                await trio.sleep(0.01)
            for sunk in sink.connections:  # every session over: its line is logged or held
                await sunk.closed.wait()
            w.process.send(signal.SIGTERM)  # at once: the lines are still held
            assert await w.process.wait_exit() == 0
        assert min(held) > 0, held  # both workers served some, so both held lines
        log = w.process.log()
        assert w.sessions_of("socks5", 1) + w.sessions_of("socks5", 2) == 16, log
        for line in log.splitlines():
            assert LINE.match(line), line  # no line cut by another process's write
