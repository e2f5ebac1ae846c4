"""Warm-up state survives the real daemon's restarts; an unusable database stops it.

``python -m egressd run`` as a process: SIGTERM flushes at shutdown; after kill -9 only
counts newer than the last flush (``flush_interval``) can be lost.
"""

from __future__ import annotations

import signal
import smtplib
import sys
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources
from harness import free_port
from service_harness import daemon_process
from smtp_harness import smtp_sink
from state_helpers import StateBackend

from egressd.state import DATABASE_NAME

pytestmark = pytest.mark.integration

QUOTA = 4


def write_config(
    directory: Path,
    sink_port: int,
    relay_port: int,
    flush: str = "0.2s",
    state: StateBackend | None = None,
) -> Path:
    path = directory / "egressd.toml"
    table = state.toml() if state is not None else f'[state]\ndirectory = "{directory / "state"}"'
    path.write_text(
        f"""
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:{relay_port}"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
{table}
[warmup]
flush_interval = "{flush}"
[warmup.plan.test]
days = [{QUOTA}, 100]
{cold_and_warm_sources(sink_port)}
"""
    )
    return path


def send_sync(relay_port: int, count: int) -> None:
    for index in range(count):
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: t\r\n\r\nhi\r\n")


async def send(relay_port: int, count: int) -> None:
    await trio.to_thread.run_sync(send_sync, relay_port, count)


async def stored_sent(state: StateBackend) -> int:
    return sum(c.sent for c in (await state.snapshot()).counts if c.source == "cold")


async def test_counts_survive_sigterm_and_kill_9_after_a_flush(
    tmp_path: Path, state_backend: StateBackend
) -> None:
    """Against each backend (``state_backend``: SQLite, and a real redis-server)."""
    relay_port = free_port()
    with smtp_sink() as sink:
        # An hour between flushes: only the flush at shutdown can write the count.
        config = write_config(tmp_path, sink.port, relay_port, flush="1h", state=state_backend)
        async with daemon_process(config) as daemon:
            await send(relay_port, 1)
            daemon.send(signal.SIGTERM)
            with trio.fail_after(10):
                assert await daemon.wait_exit() == 0
        assert await stored_sent(state_backend) == 1

        config = write_config(tmp_path, sink.port, relay_port, state=state_backend)
        async with daemon_process(config) as daemon:
            await send(relay_port, 2)
            with trio.fail_after(5):  # the flusher writes within its 0.2 s interval
                while await stored_sent(state_backend) < 3:
                    await trio.sleep(0.05)
            daemon.send(signal.SIGKILL)
            with trio.fail_after(10):
                await daemon.wait_exit()

        async with daemon_process(config):
            await send(relay_port, 2)  # the 4th is the cold source's last, then the warm one
    assert [m.peer for m in sink.messages] == ["127.0.0.3"] * QUOTA + ["127.0.0.4"]


async def test_a_corrupt_database_stops_startup_naming_the_file(tmp_path: Path) -> None:
    relay_port = free_port()
    config = write_config(tmp_path, 9, relay_port)
    (tmp_path / "state").mkdir()
    database = tmp_path / "state" / DATABASE_NAME
    database.write_bytes(b"not a database at all " * 200)
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "run", "-c", str(config)],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 78
    last_line = result.stderr.decode().splitlines()[-1]
    assert "cannot start:" in last_line and str(database) in last_line and "corrupt" in last_line
    assert database.read_bytes() == b"not a database at all " * 200
