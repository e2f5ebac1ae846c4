"""KumoMTA at the SOCKS5 door: a BIND of a source that has used its warm-up quota gets 01.

kumod picks the source by ``BIND source:0`` and, on a refusal, tries another source for
that connection, so a used quota moves KumoMTA's traffic to warm sources too.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon

from egressd.doors.socks5 import Socks5Door

pytestmark = pytest.mark.integration


def config(state: Path) -> str:
    return f"""
[access]
deny_destinations = []
[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"
[state]
directory = "{state}"
[warmup.plan.test]
days = [2]
[source."cold"]
source_address = "127.0.0.3"
warmup = "test"
[source."warm"]
source_address = "127.0.0.4"
[pool."main"."cold"]
[pool."main"."warm"]
"""


async def bind(port: int, address: str) -> int:
    """KumoMTA's first request, ``BIND address:0``: the reply code."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await stream.receive_some(2) == b"\x05\x00"
        packed = ipaddress.IPv4Address(address).packed
        await stream.send_all(b"\x05\x02\x00\x01" + packed + b"\x00\x00")
        reply = b""
        while len(reply) < 2:
            chunk = await stream.receive_some(10 - len(reply))
            assert chunk
            reply += chunk
        return reply[1]


async def test_bind_of_a_source_whose_quota_is_used_is_refused_01(tmp_path: Path) -> None:
    async with running_daemon(config(tmp_path / "state"), tmp_path, {"socks5": Socks5Door()}) as d:
        port = port_of(d, "socks5")
        assert await bind(port, "127.0.0.3") == 0
        assert d.runtime.warmup is not None
        for _ in range(2):  # what the SMTP door counts for the same source
            d.runtime.warmup.record("cold", "other", "sent")
        assert await bind(port, "127.0.0.3") == 1
        assert await bind(port, "127.0.0.4") == 0
