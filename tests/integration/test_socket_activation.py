"""systemd socket activation: egressd takes the listening sockets it inherits (``LISTEN_FDS``)
for the listeners whose address they have, with one process or with workers.

The test binds the socket itself, as systemd does for a socket unit, and a client connects
to it *before* egressd runs: the kernel queues that connection on the inherited socket, so
the banner it gets can only come from an egressd accepting on that very socket (a socket
egressd bound itself would not exist yet when the client connected). A launcher puts the
socket at descriptor 3, sets ``LISTEN_FDS`` and ``LISTEN_PID`` and execs egressd, as
systemd does (``service_harness.SOCKET_ACTIVATION``). A second listener that no inherited
socket matches is bound by egressd as usual, and a socket no listener matches is logged.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from harness import Sink
from service_harness import daemon_process, socks_connect

pytestmark = pytest.mark.integration


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


def write_config(directory: Path, smtp_port: int, sink: Sink, workers: int) -> Path:
    config = directory / "egressd.toml"
    config.write_text(
        f"""
[daemon]
workers = {workers}
[source."a"]
source_address = "127.0.0.2"
[pool."p"."a"]
[access]
deny_destinations = []
destination_ports = [{sink.port}]
[[smtp.listener]]
address = "127.0.0.1:{smtp_port}"
pool = "p"
[[socks5.listener]]
address = "127.0.0.1:0"
pool = "p"
[control]
socket = "{directory / "control.sock"}"
"""
    )
    return config


async def banner(client: socket.socket) -> bytes:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    received = b""
    with trio.fail_after(10):
        while not received.endswith(b"\r\n"):
            chunk = await stream.receive_some(1024)
            if not chunk:
                break
            received += chunk
    await stream.aclose()
    return received


@pytest.mark.parametrize("workers", [1, 2])
async def test_inherited_sockets_serve_the_listener_at_their_address(
    short_dir: Path, sink: Sink, workers: int
) -> None:
    smtp = listening_socket()
    smtp_port = smtp.getsockname()[1]
    stray = listening_socket()  # no listener has its address
    early = socket.create_connection(("127.0.0.1", smtp_port))  # queued: nobody accepts yet
    config = write_config(short_dir, smtp_port, sink, workers)
    try:
        async with daemon_process(config, inherit=(smtp, stray)) as process:
            smtp.close()  # egressd's copy alone is left
            assert (await banner(early)).startswith(b"220 ")
            later = socket.create_connection(("127.0.0.1", smtp_port))
            assert (await banner(later)).startswith(b"220 ")
            log = process.log()
            assert f"socket activation: inherited 127.0.0.1:{smtp_port}" in log
            stray_port = stray.getsockname()[1]
            assert f"inherited 127.0.0.1:{stray_port} (no listener has this address" in log
            socks_port = int(log.split("door=socks5 address=127.0.0.1:0 port=")[1].split()[0])
            connection = await socks_connect(socks_port, "127.0.0.1", sink.port)  # bound itself
            await connection.finish()
    finally:
        smtp.close()
        stray.close()
        early.close()
