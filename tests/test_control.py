"""The control socket and ``egressd status``, against an in-process daemon on a real socket.

The daemon runs without front doors (no listeners configured), so these tests need nothing
but a unix socket; the client side (:func:`egressd.status.ask`, ``command_status``) is the
blocking one the CLI uses, run in a thread so the daemon keeps answering.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import free_port

from egressd.config import Config, load_config
from egressd.control import handle_request
from egressd.daemon import Daemon, serve
from egressd.observe import DaemonControls
from egressd.status import ask, command_status, format_status


def write_config(directory: Path, extra: str = "") -> Config:
    path = directory / "egressd.toml"
    path.write_text(
        f"""
[source."good"]
source_address = "127.0.0.2"

[source."bad"]
source_address = "203.0.113.7"

[pool."p"."good"]
weight = 2

[pool."p"."bad"]

[control]
socket = "{directory}/control.sock"
{extra}
"""
    )
    return load_config(path)


@asynccontextmanager
async def daemon_on(config: Config) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(partial(serve, config, doors={}))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


async def ask_async(path: str, request: dict[str, Any]) -> dict[str, Any]:
    return await trio.to_thread.run_sync(ask, path, request)


async def status_output(config: Config) -> tuple[int, str]:
    out = io.StringIO()
    code = await trio.to_thread.run_sync(command_status, config, out)
    return code, out.getvalue()


async def test_status_reports_pools_and_sources(short_dir: Path) -> None:
    config = write_config(short_dir)
    async with daemon_on(config):
        reply = await ask_async(str(short_dir / "control.sock"), {"command": "status"})
    assert reply["ok"] is True
    status = reply["status"]
    assert status["pid"] == os.getpid()
    assert status["generation"] == 1
    assert status["pools"] == {"p": {"good": 2, "bad": 1}}
    assert [(s["name"], s["state"]) for s in status["sources"]] == [
        ("bad", "healthy"),
        ("good", "healthy"),
    ]


async def test_suspend_shows_in_status_table_and_resume_lifts_it(short_dir: Path) -> None:
    config = write_config(short_dir)
    path = str(short_dir / "control.sock")
    async with daemon_on(config) as daemon:
        assert await ask_async(path, {"command": "suspend", "source": "bad", "seconds": 600})
        assert daemon.runtime.health.is_suspended("bad")
        code, table = await status_output(config)
        assert code == 0
        rows = {line.split()[0]: line for line in table.splitlines() if line}
        assert rows["bad"].split()[1] == "suspended"
        assert "599." in rows["bad"] or "600.0s" in rows["bad"]
        assert rows["good"].split()[1] == "healthy"
        reply = await ask_async(path, {"command": "resume", "source": "bad"})
        assert reply == {"ok": True, "was_suspended": True}
        assert not daemon.runtime.health.is_suspended("bad")


async def test_bad_requests_get_errors_and_the_connection_stays_usable(short_dir: Path) -> None:
    config = write_config(short_dir)
    path = str(short_dir / "control.sock")
    async with daemon_on(config):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b'{"command": 1}\nnot json\n{"command": "reboot"}\nstatus\n')
            data = b""
            while data.count(b"\n") < 4:
                data += await stream.receive_some(65536)
    lines = data.decode().splitlines()
    assert '"ok":false' in lines[0] and "command" in lines[0]
    assert '"ok":false' in lines[1] and "not JSON" in lines[1]
    assert 'unknown command \\"reboot\\"' in lines[2]
    assert lines[3].startswith('{"ok":true,"status":')


async def test_suspend_rejects_unknown_sources_and_bad_durations(short_dir: Path) -> None:
    config = write_config(short_dir)
    async with daemon_on(config) as daemon:
        controls = DaemonControls(daemon)
        unknown = handle_request(controls, b'{"command": "suspend", "source": "x", "seconds": 5}')
        negative = handle_request(
            controls, b'{"command": "suspend", "source": "bad", "seconds": -1}'
        )
    assert unknown == {"ok": False, "error": "unknown source 'x'"}
    assert negative["ok"] is False and "seconds" in negative["error"]


async def test_stale_socket_file_is_replaced_and_removed_at_exit(short_dir: Path) -> None:
    config = write_config(short_dir)
    path = short_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    async with daemon_on(config):
        assert (await ask_async(str(path), {"command": "status"}))["ok"] is True
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
    assert not path.exists()


async def test_a_socket_another_daemon_answers_on_is_not_taken(short_dir: Path) -> None:
    config = write_config(short_dir)
    async with daemon_on(config):
        with pytest.raises(BaseException) as caught:
            async with daemon_on(config):
                pass
    assert "another process answers on the control socket" in repr(caught.value)


async def test_status_exits_1_when_the_daemon_is_not_running(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(short_dir)
    code, output = await status_output(config)
    assert code == 1
    assert output == ""
    assert "cannot reach egressd at" in capsys.readouterr().err


async def test_status_without_control_socket_falls_back_to_metrics(short_dir: Path) -> None:
    port = free_port()
    metrics_config = write_config(short_dir, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    async with daemon_on(metrics_config) as daemon:
        daemon.runtime.health.suspend("bad", 60)
        without_control = (short_dir / "egressd.toml").read_text().replace("[control]", "[x]")
        (short_dir / "status.toml").write_text(
            without_control.replace(f'[x]\nsocket = "{short_dir}/control.sock"\n', "")
        )
        code, table = await status_output(load_config(short_dir / "status.toml"))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line}
    assert rows["bad"][1] == "suspended"
    assert rows["good"][1] == "healthy"
    assert "set [control] socket" in table


def test_format_status_shows_time_left_and_wall_time() -> None:
    status = {
        "version": "9.9",
        "pid": 42,
        "config": "/etc/egressd/egressd.toml",
        "started": 1000.0,
        "generation": 3,
        "reload_failures": 1,
        "active_sessions": 2,
        "draining": False,
        "pools": {"p": {"a": 2, "b": 1}},
        "sources": [
            {
                "name": "a",
                "state": "suspended",
                "suspended_until": 1130.0,
                "active_connections": 1,
                "recent_failures": 3,
                "last_failure_kind": "unplumbed",
                "last_failure_reason": "cannot bind",
                "configured": True,
            }
        ],
    }
    text = format_status(status, now=1100.0)
    assert "pid 42, up 1m40s" in text
    assert "generation 3 (1 failed reloads), 2 active sessions" in text
    assert "pool p: a (2), b (1)" in text
    row = text.splitlines()[-1].split()
    assert row[:3] == ["a", "suspended", "30.0s"]
    assert row[4:7] == ["1", "3", "unplumbed:"]
