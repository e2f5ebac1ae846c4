"""A remote that drops the connection in the middle of a body or of its reply to the final
dot, end to end on loopback: the MTA gets a 4xx naming the source, never the 250 the
remote had begun, and its session goes on (the scripted MX of ``smtp_harness`` drops only
between replies)."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import pytest
import trio
from harness import free_port
from test_smtp_door import egressd, mta, routed

pytestmark = pytest.mark.integration

BODY = b"Subject: long\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300


async def remote_dropping(nursery: trio.Nursery, port: int, where: str) -> None:
    """An MX that accepts MAIL, RCPT and DATA, then closes ``mid-body`` (after 10 kB of
    it) or ``mid-reply`` (after the first line of a multi-line 250 to the final dot)."""

    async def handle(stream: trio.SocketStream) -> None:
        buffer = bytearray()

        async def fill(until: bytes | int) -> bool:
            while (until not in buffer) if isinstance(until, bytes) else len(buffer) < until:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return False
                buffer.extend(chunk)
            return True

        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"220 drops.test ESMTP\r\n")
            while await fill(b"\r\n"):
                end = buffer.index(b"\r\n")
                verb = bytes(buffer[:4]).upper()
                del buffer[: end + 2]
                if verb == b"EHLO":
                    await stream.send_all(b"250-drops.test\r\n250 PIPELINING\r\n")
                elif verb != b"DATA":
                    await stream.send_all(b"250 ok\r\n")
                else:
                    await stream.send_all(b"354 go ahead\r\n")
                    if where == "mid-body":
                        await fill(10000)
                    elif await fill(b"\r\n.\r\n"):
                        await stream.send_all(b"250-2.0.0 first line of a longer reply\r\n")
                        await trio.sleep(0.05)
                    break
        await stream.aclose()

    await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))


@pytest.mark.parametrize("where", ["mid-body", "mid-reply"])
async def test_a_remote_dropping_mid_body_or_mid_reply_is_a_4xx_and_the_session_goes_on(
    tmp_path: Path, nursery: trio.Nursery, where: str
) -> None:
    port = free_port("127.0.0.1")
    await remote_dropping(nursery, port, where)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        assert (await client.command("MAIL FROM:<a@sender.test>")).startswith("250")
        assert (await client.command("RCPT TO:<one@good.test>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        async with trio.open_nursery() as sending:  # the reply may come before it is all sent
            sending.start_soon(client.send, BODY + b".\r\n")
            reply = await client.reply()
        assert reply.startswith('451 4.4.2 source "a" (127.0.0.3) to 127.0.0.1[127.0.0.1]')
        assert (await client.command("NOOP")).startswith("250")
