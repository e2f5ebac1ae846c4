"""The file watcher reloads only a change that two polls in a row saw the same.

A configuration rewritten in place is, for a moment, a valid prefix of itself: here one
without the SMTP listener. The daemon runs on trio's mock clock (time moves only when the
test jumps it), so each poll happens exactly when the test says, with real sockets.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from daemon_helpers import port_of, running_daemon

from egressd.daemon import Daemon, Fingerprint, SettledChange, watch_period

A: Fingerprint = [(1, 10, 100)]
B: Fingerprint = [(1, 20, 200)]
C: Fingerprint = [(1, 30, 300), None]


def test_a_change_counts_once_two_polls_in_a_row_saw_it() -> None:
    settled = SettledChange()
    assert settled.poll(A, A) is False
    assert settled.poll(A, B) is False  # first sight
    assert settled.poll(A, C) is False  # still moving
    assert settled.poll(A, C) is True  # settled
    assert settled.poll(C, C) is False  # applied: nothing more to do


def test_a_change_that_reverts_is_forgotten() -> None:
    settled = SettledChange()
    assert settled.poll(A, B) is False
    assert settled.poll(A, A) is False
    assert settled.poll(A, B) is False  # seen again, but not at two polls in a row
    assert settled.poll(A, B) is True


def config_text(*, pools: str) -> str:
    return f"""
[source.a]
source_address = "127.0.0.2"
ttl = "10s"
{pools}

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"

[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
"""


async def poll(clock: trio.testing.MockClock, daemon: Daemon) -> None:
    clock.jump(watch_period(daemon.runtime.config))
    await trio.testing.wait_all_tasks_blocked()


async def test_a_truncated_rewrite_is_never_applied(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    full = config_text(pools="[pool.main.a]")
    async with running_daemon(full, tmp_path) as daemon:
        ports = daemon.bound_ports()  # port 0: each listener picked a free port
        path = daemon.runtime.config.path
        changed = config_text(pools="[pool.main.a]\n[pool.other.a]")
        truncated = changed[: changed.index("[[smtp.listener]]")]  # valid TOML, no SMTP door
        path.write_text(truncated)
        await poll(mock_clock, daemon)  # sees the prefix
        path.write_text(changed)  # ... the writer finishes before the next poll
        await poll(mock_clock, daemon)
        assert daemon.reloads == 0
        assert [door for door, _ in daemon.listeners] == ["socks5", "smtp"]
        await poll(mock_clock, daemon)  # the same at two polls in a row: applied
        assert daemon.reloads == 1
        assert set(daemon.runtime.config.pools) == {"main", "other"}
        assert daemon.bound_ports() == ports  # the same sockets, each still on its door
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(daemon, "smtp"))
            async with stream:
                assert (await stream.receive_some(100)).startswith(b"220 ")
