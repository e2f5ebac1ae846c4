"""A live spliced session has TCP keepalive on the daemon's both legs, seen with ``ss -tno``.

KumoProxy's values (idle 300 s, interval 30 s, 3 probes): a peer that vanished without a FIN
or RST is found dead by the kernel instead of holding a source slot until the idle timeout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from daemon_helpers import recording_daemon
from harness import Sink, receive_exactly, receive_until, require_binary

pytestmark = pytest.mark.integration

CONFIG = """
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{port}]
deny_destinations = []

[[{door}.listener]]
address = "127.0.0.1:0"
{extra}
"""


async def sockets_shown(filter_expression: str) -> list[str]:
    """``ss -tno`` lines (one per established TCP socket) that match the filter."""
    binary = require_binary("ss")
    with trio.fail_after(5):
        done = await trio.run_process(
            [binary, "-H", "-tno", "state", "established", filter_expression],
            capture_stdout=True,
        )
    return [line for line in done.stdout.decode().splitlines() if line.strip()]


async def assert_both_legs_keepalive(door_port: int, sink_port: int) -> None:
    client_leg = await sockets_shown(f"( sport = :{door_port} )")
    remote_leg = await sockets_shown(f"( dport = :{sink_port} )")
    assert len(client_leg) == 1, client_leg
    assert len(remote_leg) == 1, remote_leg
    for line in client_leg + remote_leg:
        # timer:(keepalive,4min59sec,0) or (keepalive,5min,0): first probe within 300 s.
        match = re.search(r"timer:\(keepalive,([^,]+),", line)
        assert match is not None, line
        assert 280 <= timer_seconds(match.group(1)) <= 300, line


def timer_seconds(text: str) -> float:
    """``ss``'s timer text (``5min``, ``4min59sec``, ``299sec``, ``120ms``) in seconds."""
    units = {"min": 60.0, "sec": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+)(min|sec|ms)", text)
    assert parts, text
    return sum(int(number) * units[unit] for number, unit in parts)


async def test_socks5_session_keeps_both_legs_alive(sink: Sink, tmp_path: Path) -> None:
    text = CONFIG.format(port=sink.port, door="socks5", extra='pool = "main"')
    async with recording_daemon(text, tmp_path, "socks5") as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(
            b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + sink.port.to_bytes(2, "big")
        )
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        assert (await receive_exactly(stream, 10))[1] == 0
        await receive_until(stream, b"ESMTP\r\n")
        await assert_both_legs_keepalive(e.port, sink.port)
        await stream.aclose()


async def test_proxy_session_keeps_both_legs_alive(sink: Sink, tmp_path: Path) -> None:
    text = CONFIG.format(port=sink.port, door="proxy", extra="")
    async with recording_daemon(text, tmp_path, "proxy") as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(f"PROXY TCP4 127.0.0.2 127.0.0.1 0 {sink.port}\r\n".encode())
        await receive_until(stream, b"ESMTP\r\n")
        await assert_both_legs_keepalive(e.port, sink.port)
        await stream.aclose()
