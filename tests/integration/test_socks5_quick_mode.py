"""``egressd socks5 --listen ADDR``: KumoProxy's ``proxy-server --listen`` with no file.

BIND of any local address picks it as the source; the access rules are the default ones.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
import subprocess
import sys
from functools import partial

import pytest
import trio
from harness import Sink, free_port, receive_exactly, receive_until

from egressd.cli import quick_config
from egressd.config import AccessSettings, Endpoint
from egressd.daemon import serve

pytestmark = pytest.mark.integration


def request(command: int, host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    atyp = 1 if ip.version == 4 else 4
    return bytes([5, command, 0, atyp]) + ip.packed + struct.pack("!H", port)


async def reply_code(stream: trio.SocketStream) -> int:
    head = await receive_exactly(stream, 4)
    await receive_exactly(stream, 6 if head[3] == 1 else 18)
    return head[1]


async def greeted(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"\x05\x01\x00")
    assert await receive_exactly(stream, 2) == b"\x05\x00"
    return stream


async def test_bind_of_a_local_address_of_no_source_then_connect_leaves_from_it(
    nursery: trio.Nursery, sink: Sink
) -> None:
    config = quick_config([Endpoint("127.0.0.1", 0)])
    # The sink is on loopback, which the default access rules deny: open just its port.
    config = dataclasses.replace(
        config, access=AccessSettings(destination_ports=(sink.port,), deny_destinations=())
    )
    daemon = await nursery.start(partial(serve, config))
    (port,) = daemon.bound_ports().values()
    stream = await greeted(port)
    await stream.send_all(request(2, "127.0.0.2", 0))
    assert await reply_code(stream) == 0
    await stream.send_all(request(1, "127.0.0.1", sink.port))
    assert await reply_code(stream) == 0
    await receive_until(stream, b"ESMTP\r\n")
    assert sink.peers == ["127.0.0.2"]
    await stream.aclose()


async def test_the_command_serves_socks5_with_the_default_access_rules(sink: Sink) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "egressd", "socks5", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await greeted(port)
                    break
                except OSError:
                    await trio.sleep(0.05)
            await stream.send_all(request(2, "127.0.0.2", 0))
            assert await reply_code(stream) == 0  # a local address of no source
            await stream.send_all(request(1, "127.0.0.1", sink.port))
            assert await reply_code(stream) == 2  # loopback and the port: denied by default
            await stream.aclose()
            stream = await greeted(port)
            await stream.send_all(request(2, "203.0.113.7", 0))
            assert await reply_code(stream) == 1  # not an address of this host
            await stream.aclose()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr.decode()
    assert sink.peers == []
    assert b"outcome=denied" in stderr


async def test_the_command_needs_a_listen_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "egressd", "socks5"], capture_output=True, check=False
    )
    assert done.returncode == 2
    assert b"--listen" in done.stderr
