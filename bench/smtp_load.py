"""The Python SMTP load generator, the second opinion next to smtp-source (``--client python``).

A trio client in its own process: ``sessions`` concurrent sessions, each sending its share
of ``messages`` messages of ``size`` body bytes one after the other on one connection. When
the server offers PIPELINING it sends MAIL, RCPT and DATA in one write, as Postfix does;
otherwise one command at a time, as smtplib does. Prints ``{"seconds": ...}`` as JSON.
It costs more CPU per message than smtp-source: its own figure is printed next to egressd's.
"""

from __future__ import annotations

import json
import time

import trio

SENDER = b"bench@sender.bench"
RECIPIENT = b"rcpt@dest.bench"


class SmtpClient:
    """A minimal SMTP client over one trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        end = self.buffer.find(b"\r\n")
        while end < 0:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
            end = self.buffer.find(b"\r\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = await self.line()
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    async def command(self, line: bytes, expect: int) -> None:
        await self.stream.send_all(line + b"\r\n")
        code, _ = await self.reply()
        if code != expect:
            raise RuntimeError(f"{line!r} got {code}, expected {expect}")


def message_body(size: int) -> bytes:
    """Headers, then 80-column lines (as smtp-source sends them), ``size`` bytes in all."""
    header = b"From: <%s>\r\nTo: <%s>\r\nSubject: bench\r\n\r\n" % (SENDER, RECIPIENT)
    line = b"X" * 78 + b"\r\n"
    body = header + line * ((size - len(header)) // len(line) + 1)
    return body[: size - 2] + b"\r\n"


async def one_session(port: int, count: int, body: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = SmtpClient(stream)
        if (await client.reply())[0] != 220:
            raise RuntimeError("no 220 greeting")
        await stream.send_all(b"EHLO client.bench\r\n")
        _, lines = await client.reply()
        together = any(line.upper().startswith(b"PIPELINING") for line in lines)
        mail = b"MAIL FROM:<%s>\r\n" % SENDER
        rcpt = b"RCPT TO:<%s>\r\n" % RECIPIENT
        for _ in range(count):
            if together:
                await stream.send_all(mail + rcpt + b"DATA\r\n")
                codes = [(await client.reply())[0] for _ in range(3)]
                if codes != [250, 250, 354]:
                    raise RuntimeError(f"envelope refused: {codes}")
            else:
                await client.command(mail[:-2], 250)
                await client.command(rcpt[:-2], 250)
                await client.command(b"DATA", 354)
            await stream.send_all(body + b".\r\n")
            if (await client.reply())[0] != 250:
                raise RuntimeError("message refused")
        await client.command(b"QUIT", 221)


async def load(port: int, messages: int, sessions: int, size: int) -> float:
    body = message_body(size)
    share = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for count in share:
            if count:
                nursery.start_soon(one_session, port, count, body)
    return time.perf_counter() - started


def main(port: int, messages: int, sessions: int, size: int) -> int:
    seconds = trio.run(load, port, messages, sessions, size)
    print(json.dumps({"seconds": seconds}))
    return 0
