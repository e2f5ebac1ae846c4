"""Nonsense on the real daemon's control socket: an error reply each, and status keeps working.

``seconds = Infinity`` or ``1e300`` used to be accepted (and ``egressd status`` then crashed
with OverflowError), ``NaN`` answered ok and suspended nothing, and a line of 3,000 ``[``
raised RecursionError inside the handler.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import running_daemon

from egressd.status import command_status

pytestmark = pytest.mark.integration

NONSENSE = [
    b'{"command": "suspend", "source": "a", "seconds": Infinity}',
    b'{"command": "suspend", "source": "a", "seconds": -Infinity}',
    b'{"command": "suspend", "source": "a", "seconds": NaN}',
    b'{"command": "suspend", "source": "a", "seconds": 1e300}',
    b'{"command": "suspend", "source": "a", "seconds": 1e999}',
    b'{"command": "suspend", "source": "a", "seconds": ' + b"9" * 400 + b"}",
    b'{"command": "suspend", "source": "a", "seconds": 0}',
    b'{"command": "suspend", "source": "a", "seconds": "600"}',
    b"[" * 3000,
    b'{"command": ' * 300,
    b"\xff\xfe{",
]


async def exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send every line on one connection; one parsed reply per line."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(b"".join(line + b"\n" for line in lines))
        data = b""
        with trio.fail_after(10):
            while data.count(b"\n") < len(lines):
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed early: {data!r}"
                data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def test_each_nonsense_line_gets_an_error_and_status_still_works(short_dir: Path) -> None:
    socket_path = short_dir / "c.sock"
    text = f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[control]
socket = "{socket_path}"
"""
    async with running_daemon(text, short_dir) as daemon:
        replies = await exchange(socket_path, [*NONSENSE, b"status"])
        assert not daemon.runtime.health.is_suspended("a")
        out = io.StringIO()
        code = await trio.to_thread.run_sync(command_status, daemon.runtime.config, out)
    for line, reply in zip(NONSENSE, replies, strict=False):
        assert reply["ok"] is False and reply["error"], (line[:60], reply)
    assert replies[-1]["ok"] is True
    assert code == 0
    assert "healthy" in out.getvalue()
