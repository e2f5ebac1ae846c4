"""A socks5_proxy_password file is read again at each reload (KumoMTA's KeySource file form).

The daemon runs in process with no front door; a SOCKS5 server in the test records the
RFC 1929 password each dial sends, then refuses it. Rewriting the password file makes the
daemon's watcher reload (the file is watched like a configuration file), and the next dial
sends the new password.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from egressd.config import load_config
from egressd.daemon import Daemon, serve
from egressd.egress import EgressFailure
from egressd.net.egress import dial


class RecordingSocks5:
    """Answers a SOCKS5 greeting with username/password and records each password sent."""

    def __init__(self) -> None:
        self.passwords: list[bytes] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = await self.read(stream, 2)
            await self.read(stream, data[1])  # the offered methods
            await stream.send_all(b"\x05\x02")  # username/password, RFC 1929
            version_and_length = await self.read(stream, 2)
            await self.read(stream, version_and_length[1])  # the username
            length = (await self.read(stream, 1))[0]
            self.passwords.append(await self.read(stream, length))
            await stream.send_all(b"\x01\x01")  # refused

    @staticmethod
    async def read(stream: trio.SocketStream, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = await stream.receive_some(count - len(data))
            if not chunk:
                raise trio.BrokenResourceError("peer closed")
            data += chunk
        return data


@asynccontextmanager
async def daemon_with_password_file(tmp_path: Path, proxy_port: int) -> AsyncIterator[Daemon]:
    (tmp_path / "socks.pw").write_bytes(b"first")
    path = tmp_path / "egressd.toml"
    path.write_text(
        f"""
[source.s]
socks5_proxy_server = "127.0.0.1:{proxy_port}"
socks5_proxy_source_address = "127.0.0.3"
socks5_proxy_username = "kumo"
socks5_proxy_password = "socks.pw"
ttl = "1s"
"""
    )
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(partial(serve, load_config(path), doors={}))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


async def dial_through_source(daemon: Daemon) -> None:
    with trio.fail_after(10), pytest.raises(EgressFailure):
        await dial(daemon.runtime.config.sources["s"], "127.0.0.1", 25)


async def test_a_rewritten_password_file_is_sent_after_the_reload(tmp_path: Path) -> None:
    proxy = RecordingSocks5()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        async with daemon_with_password_file(tmp_path, proxy.port) as daemon:
            await dial_through_source(daemon)
            replacement = tmp_path / "socks.pw.new"
            replacement.write_bytes(b"second")
            os.replace(replacement, tmp_path / "socks.pw")
            with trio.fail_after(10):
                while daemon.reloads == 0:
                    await trio.sleep(0.05)
            await dial_through_source(daemon)
            (tmp_path / "socks.pw").unlink()
            assert not await daemon.reload("test")  # a missing file refuses the reload...
            await dial_through_source(daemon)  # ...and the daemon keeps the last password
        nursery.cancel_scope.cancel()
    assert proxy.passwords == [b"first", b"second", b"second"]
