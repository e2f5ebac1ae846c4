"""A shaping ``connection_limit`` of 2 holds under many concurrent sessions, per source.

The destination is a sink on loopback (a trio listener that counts its open connections
per source address, i.e. per egressd source). Through the SOCKS5 door, 12 clients CONNECT
at once to a pool of two sources with ``connection_limit = 2``: exactly 4 get through (2 per
source) and 8 get reply 01 with the budget in the log; once the 4 close, the leases are
back. Through the SMTP door, dnsmasq serves the MX of a fake provider and 12 MTA sessions
send at once to a slow sink: at most 2 connections per source at any moment, and the
sessions that find no budget get ``451 4.7.0`` naming it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from smtp_harness import dnsmasq, send_one

from egressd.daemon import Daemon
from egressd.doors.smtp import SmtpDoor
from egressd.doors.socks5 import Socks5Door

pytestmark = pytest.mark.integration

SESSIONS = 12
SOURCES = """
[source."a"]
source_address = "127.0.0.3"
{extra}
[source."b"]
source_address = "127.0.0.4"
{extra}
[pool."main"."a"]
[pool."main"."b"]
"""


class CountingSink:
    """Accepts connections and counts how many are open at once per peer address."""

    def __init__(self, *, smtp: bool = False, hold: float = 0.0) -> None:
        self.smtp = smtp
        self.hold = hold
        self.open: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        self.open[peer] += 1
        self.total[peer] += 1
        self.peak[peer] = max(self.peak[peer], self.open[peer])
        try:
            async with stream:
                if self.smtp:
                    await self.converse(stream)
                else:
                    while await stream.receive_some(4096):
                        pass
        except trio.BrokenResourceError:
            pass
        finally:
            self.open[peer] -= 1

    async def converse(self, stream: trio.SocketStream) -> None:
        """A minimal SMTP server that takes ``hold`` seconds over each final dot."""
        await stream.send_all(b"220 sink.test\r\n")
        buffer, in_data = b"", False
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            while True:
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    buffer, in_data = buffer[end + 5 :], False
                    await trio.sleep(self.hold)
                    await stream.send_all(b"250 2.0.0 queued\r\n")
                    continue
                line, sep, rest = buffer.partition(b"\r\n")
                if not sep:
                    break
                buffer = rest
                verb = line[:4].upper()
                if verb == b"EHLO":
                    await stream.send_all(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    in_data = True
                    buffer = b"\r\n" + buffer  # the body's first line may be the dot
                    await stream.send_all(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    await stream.send_all(b"221 bye\r\n")
                    return
                else:
                    await stream.send_all(b"250 ok\r\n")


async def socks5_connect(port: int, target: int) -> tuple[int, trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"\x05\x01\x00")
    assert await stream.receive_some(2) == b"\x05\x00"
    await stream.send_all(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = await stream.receive_some(10 - len(reply))
        assert chunk
        reply += chunk
    return reply[1], stream


def connections(daemon: Daemon, metric: str) -> list[float | None]:
    """The metric for sources a and b; the destination is no provider: ``other``."""
    registry = daemon.metrics.registry
    return [
        registry.get_sample_value(metric, {"source": name, "provider": "other"})
        for name in ("a", "b")
    ]


async def leases_returned(daemon: Daemon, deadline: float = 10.0) -> None:
    """Wait until the door's side of every session has ended (its leases are back): the
    sink sees the door close, and the door's task ends a little later."""
    with trio.move_on_after(deadline):
        while connections(daemon, "egressd_provider_open_connections") != [0.0, 0.0]:
            await trio.sleep(0.02)


async def test_connection_limit_holds_through_the_socks5_door(tmp_path: Path) -> None:
    sink = CountingSink()
    (tmp_path / "shaping.toml").write_text('["default"]\nconnection_limit = 2\n')
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        text = (
            'shaping_files = ["shaping.toml"]\n'
            f"[access]\ndeny_destinations = []\ndestination_ports = [{sink.port}]\n"
            '[[socks5.listener]]\naddress = "127.0.0.1:0"\npool = "main"\n'
        ) + SOURCES.format(extra="")
        async with running_daemon(text, tmp_path, {"socks5": Socks5Door()}) as daemon:
            port = port_of(daemon, "socks5")
            codes: list[int] = []
            streams: list[trio.SocketStream] = []
            all_answered = trio.Event()

            async def client() -> None:
                code, stream = await socks5_connect(port, sink.port)
                codes.append(code)
                streams.append(stream)
                if len(codes) == SESSIONS:
                    all_answered.set()

            with trio.fail_after(20):
                async with trio.open_nursery() as clients:
                    for _ in range(SESSIONS):
                        clients.start_soon(client)
                await all_answered.wait()
                assert sorted(codes) == [0] * 4 + [1] * (SESSIONS - 4)
                while sum(sink.total.values()) < 4:  # the sink accepts the 4 in its own time
                    await trio.sleep(0.02)
                assert sink.peak == {"127.0.0.3": 2, "127.0.0.4": 2}
                assert connections(daemon, "egressd_provider_open_connections") == [2.0, 2.0]
                for stream in streams:
                    await stream.aclose()
                while sum(sink.open.values()):
                    await trio.sleep(0.02)
                await leases_returned(daemon)
                assert connections(daemon, "egressd_provider_open_connections") == [0.0, 0.0]
                assert connections(daemon, "egressd_provider_connections_total") == [2.0, 2.0]
                code, stream = await socks5_connect(port, sink.port)  # the leases are back
                await stream.aclose()
                assert code == 0
        nursery.cancel_scope.cancel()


async def test_connection_limit_holds_through_the_smtp_door(tmp_path: Path) -> None:
    sink = CountingSink(smtp=True, hold=0.5)
    (tmp_path / "shaping.toml").write_text(
        '[provider."bigmail"]\nmatch = [{ MXSuffix = ".bigmail-mx.test" }]\nconnection_limit = 2\n'
    )
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10)]
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        with dnsmasq(mx=mx, hosts={"mx1.bigmail-mx.test": ["127.0.0.1"]}) as dns:
            text = (
                'shaping_files = ["shaping.toml"]\n'
                f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
                "[access]\ndeny_destinations = []\n"
                '[[smtp.listener]]\naddress = "127.0.0.1:0"\npool = "main"\n'
            ) + SOURCES.format(extra=f"remote_port = {sink.port}")
            async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
                port = port_of(daemon, "smtp")
                outcomes: list[str] = []

                async def session() -> None:
                    outcome = await trio.to_thread.run_sync(send_one, port, "u@bigmail.test")
                    outcomes.append(outcome)

                with trio.fail_after(30):
                    async with trio.open_nursery() as sessions:
                        for _ in range(SESSIONS):
                            sessions.start_soon(session)
        nursery.cancel_scope.cancel()
    assert sink.peak == {"127.0.0.3": 2, "127.0.0.4": 2}
    refused = [o for o in outcomes if o != "sent"]
    assert outcomes.count("sent") >= 4
    assert refused, outcomes
    for outcome in refused:
        assert outcome.startswith('451 4.7.0 no source of pool "main" may connect to provider'), (
            outcome
        )
        assert "connection_limit 2 reached for all 2 sources" in outcome
