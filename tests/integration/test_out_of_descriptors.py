"""The real daemon out of descriptors (RLIMIT_NOFILE 64): it pauses accepting, and serves again.

``python -m egressd run`` runs under ``prlimit --nofile=64:64``; the test holds more
connections to the SOCKS5 door than that, until the daemon logs ``accept paused``
(EMFILE), then lets them go. The accept loop must still be alive: the next client is
served. Only this one process is short of descriptors, not the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from harness import DEFAULT_BANNER, Sink, free_port, require_binary
from service_harness import daemon_process, socks_connect

pytestmark = pytest.mark.integration

OPEN_FILES = 64


async def test_emfile_pauses_accepting_and_the_daemon_serves_again(
    short_dir: Path, sink: Sink
) -> None:
    require_binary("prlimit")
    socks_port = free_port()  # a separate process: its port must be known beforehand
    config = short_dir / "egressd.toml"
    config.write_text(
        f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{sink.port}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:{socks_port}"
pool = "main"
"""
    )
    async with daemon_process(config, open_files=OPEN_FILES) as daemon:
        held: list[trio.SocketStream] = []
        with trio.fail_after(20):
            while "accept paused" not in daemon.log():
                assert len(held) < 4 * OPEN_FILES, "never ran out of descriptors"
                held.append(await trio.open_tcp_stream("127.0.0.1", socks_port))
                if len(held) > OPEN_FILES:
                    await trio.sleep(0.05)
            for stream in held:
                await stream.aclose()
            connection = await socks_connect(socks_port, "127.0.0.1", sink.port)
            assert await connection.receive_until(DEFAULT_BANNER) == DEFAULT_BANNER
            await connection.stream.aclose()
        assert daemon.running()
    assert "Too many open files" in daemon.log()
