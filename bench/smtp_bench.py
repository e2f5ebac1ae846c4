"""Messages per second through egressd's SMTP relay, against the same client going direct.

Usage (from the repository root)::

    .venv/bin/python bench/smtp_bench.py [--messages 5000] [--sessions 50] [--size 10240]
                                         [--rounds 3] [--pipelining] [--json]

Without ``--pipelining`` the client sends one command at a time (like smtplib) and the sink
does not offer PIPELINING; with it, the sink offers it and the client sends MAIL, RCPT and
DATA in one write (like Postfix), and egressd pipelines MAIL and RCPT towards the sink.

What it does, all on loopback:

1. starts an aiosmtpd sink in its own process (it accepts everything and discards it);
2. starts egressd in its own process with only the SMTP door: one listener, one pool with
   one source (127.0.0.3), and ``[smtp.routes] "*"`` pointing at the sink (no DNS, so the
   figure is the relay's own cost), logging one line per transaction to a file;
3. runs the load generator (a trio SMTP client in this process): ``--sessions`` concurrent
   sessions, each sending its share of ``--messages`` messages of ``--size`` bytes, one
   after the other (MAIL, RCPT, DATA, body, dot) on one connection, straight to the sink
   and then through egressd;
4. repeats 3 and 4 ``--rounds`` times, alternating, and prints the median rates and their
   ratio (through egressd / direct).

Every process it starts is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
SOURCE_ADDRESS = "127.0.0.3"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process {process.args!r} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout:g}s")


@contextmanager
def child(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the block ends; stop it by its PID."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_listening(port, process)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# --------------------------------------------------------------------------- children


def serve_sink(port: int, pipelining: bool) -> None:
    """The sink: aiosmtpd, accepting and discarding every message. With ``pipelining`` it
    advertises PIPELINING (aiosmtpd reads commands in order, so it handles it)."""
    from aiosmtpd.controller import Controller

    class Discard:
        async def handle_EHLO(
            self, server: object, session: Any, envelope: object, name: str, lines: list[str]
        ) -> list[str]:
            session.host_name = name  # what aiosmtpd's own EHLO does before the hook
            if pipelining:
                lines.insert(1, "250-PIPELINING")
            return lines

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 discarded"

    controller = Controller(Discard(), hostname="127.0.0.1", port=port, data_size_limit=0)
    controller.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


EGRESSD_CONFIG = """\
hostname = "relay.bench"
[access]
deny_destinations = []
destination_ports = [{sink_port}]
[limits]
max_connections = 10000
[log]
level = "info"
[[smtp.listener]]
address = "127.0.0.1:{relay_port}"
pool = "bench"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
[source."bench"]
source_address = "{source}"
ehlo_domain = "out.bench"
[pool."bench"."bench"]
"""


def serve_egressd(config_path: str) -> None:
    """egressd with only the SMTP door (so it runs whatever other doors exist)."""
    sys.path.insert(0, str(REPO))
    from egressd.config import load_config
    from egressd.daemon import serve
    from egressd.doors.smtp import SmtpDoor
    from egressd.log import setup_logging

    config = load_config(config_path)
    setup_logging(config.log.format, config.log.level)
    trio.run(partial(serve, config, doors={"smtp": SmtpDoor()}))


# --------------------------------------------------------------------------- load


class SmtpClient:
    """A minimal SMTP client: one command, one reply, like smtplib; or, when told to and the
    server offers PIPELINING, MAIL, RCPT and DATA in one write, as Postfix does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def reply(self) -> int:
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                self.buffer += chunk
                end = self.buffer.find(b"\r\n")
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, line: bytes, expect: int) -> None:
        await self.stream.send_all(line + b"\r\n")
        code = await self.reply()
        if code != expect:
            raise RuntimeError(f"{line!r} got {code}, expected {expect}")

    async def ehlo(self) -> set[str]:
        await self.stream.send_all(b"EHLO client.bench\r\n")
        keywords: set[str] = set()
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                self.buffer += chunk
                end = self.buffer.find(b"\r\n")
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            keywords.add(line[4:].split(b" ")[0].decode().upper())
            if line[3:4] != b"-":
                return keywords


def message_body(size: int) -> bytes:
    header = b"From: bench@sender.bench\r\nTo: rcpt@dest.bench\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = header + line * ((size - len(header)) // len(line) + 1)
    return body[: size - 2] + b"\r\n"


async def one_session(port: int, count: int, body: bytes, pipelining: bool) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = SmtpClient(stream)
        if await client.reply() != 220:
            raise RuntimeError("no 220 greeting")
        offered = await client.ehlo()
        together = pipelining and "PIPELINING" in offered
        envelope = (b"MAIL FROM:<bench@sender.bench>\r\n", b"RCPT TO:<rcpt@dest.bench>\r\n")
        for _ in range(count):
            if together:
                await stream.send_all(b"".join(envelope) + b"DATA\r\n")
                codes = [await client.reply() for _ in range(3)]
                if codes != [250, 250, 354]:
                    raise RuntimeError(f"envelope refused: {codes}")
            else:
                await client.command(envelope[0][:-2], 250)
                await client.command(envelope[1][:-2], 250)
                await client.command(b"DATA", 354)
            await stream.send_all(body + b".\r\n")
            if await client.reply() != 250:
                raise RuntimeError("message refused")
        await client.command(b"QUIT", 221)


async def load(port: int, messages: int, sessions: int, size: int, pipelining: bool) -> float:
    """Send ``messages`` over ``sessions`` concurrent sessions; return messages per second."""
    body = message_body(size)
    share = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for count in share:
            nursery.start_soon(one_session, port, count, body, pipelining)
    return messages / (time.perf_counter() - started)


@dataclass
class Result:
    """Rates of each round; the figures are the medians (this box is shared and noisy)."""

    direct_rounds: list[float]
    relayed_rounds: list[float]

    @property
    def direct(self) -> float:
        return statistics.median(self.direct_rounds)

    @property
    def relayed(self) -> float:
        return statistics.median(self.relayed_rounds)

    @property
    def ratio(self) -> float:
        return self.relayed / self.direct


def run(
    messages: int, sessions: int, size: int, rounds: int, pipelining: bool, workdir: Path
) -> Result:
    sink_port, relay_port = free_port(), free_port()
    config = workdir / "egressd.toml"
    config.write_text(
        EGRESSD_CONFIG.format(sink_port=sink_port, relay_port=relay_port, source=SOURCE_ADDRESS)
    )
    me = [sys.executable, str(Path(__file__).resolve())]
    with (
        child(
            [*me, "--serve-sink", str(sink_port), *(["--pipelining"] if pipelining else [])],
            sink_port,
            workdir / "sink.log",
        ),
        child([*me, "--serve-egressd", str(config)], relay_port, workdir / "egressd.log"),
    ):
        warm_up = min(500, messages)
        trio.run(load, sink_port, warm_up, sessions, size, pipelining)
        trio.run(load, relay_port, warm_up, sessions, size, pipelining)
        result = Result([], [])
        for _ in range(rounds):  # alternate, so that both see the same background load
            for port, rates in (
                (sink_port, result.direct_rounds),
                (relay_port, result.relayed_rounds),
            ):
                rates.append(trio.run(load, port, messages, sessions, size, pipelining))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument(
        "--pipelining",
        action="store_true",
        help="the sink offers PIPELINING and the client uses it, as Postfix does",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-egressd", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink:
        serve_sink(args.serve_sink, args.pipelining)
        return 0
    if args.serve_egressd:
        serve_egressd(args.serve_egressd)
        return 0
    with tempfile.TemporaryDirectory(prefix="egressd-smtp-bench-") as name:
        result = run(
            args.messages, args.sessions, args.size, args.rounds, args.pipelining, Path(name)
        )
    figures = {
        "messages": args.messages,
        "sessions": args.sessions,
        "size": args.size,
        "pipelining": args.pipelining,
        "direct_msgs_per_s": round(result.direct, 1),
        "egressd_msgs_per_s": round(result.relayed, 1),
        "ratio": round(result.ratio, 3),
        "direct_rounds": [round(r, 1) for r in result.direct_rounds],
        "egressd_rounds": [round(r, 1) for r in result.relayed_rounds],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"SMTP relay, {args.messages} messages of {args.size} bytes over {args.sessions}"
            f" sessions{' (pipelining)' if args.pipelining else ''}:"
            f" direct {result.direct:.0f} msg/s, through egressd"
            f" {result.relayed:.0f} msg/s, ratio {result.ratio:.2f} (medians of"
            f" {args.rounds} rounds; direct {figures['direct_rounds']},"
            f" egressd {figures['egressd_rounds']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
