"""One tenant's dead destination never changes another tenant's outcome (issue 10, item 1).

Two tenants share one pool of two sources (127.0.0.3 "a", 127.0.0.4 "b"). Tenant A sends
to a destination that never answers: a loopback listener whose accept queue is full, so
the kernel drops every SYN and each connect runs into ``[dial] timeout``. A dead
destination is the destination's problem: it must not suspend the shared sources, so
tenant B, sending to a live destination through the same pool right after, is served.
Once the destination has failed three times its circuit breaker answers at once, naming
the destination (a text only the breaker writes), without dialing again.

Both front doors that take a pool are covered: SOCKS5 (CONNECT to the dead port) and SMTP
(dnsmasq serves an MX for ``dead.test`` whose host is the silent listener).
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from harness import Sink, free_port
from service_harness import sample, scrape
from smtp_harness import dnsmasq, start_scripted_mx

from egressd.config import load_config
from egressd.daemon import Daemon
from egressd.doors.smtp import SmtpDoor
from egressd.status import command_status

pytestmark = pytest.mark.integration

TENANT_A_ATTEMPTS = 6  # three per source: enough to suspend both under the old rule


@contextlib.contextmanager
def silent_destination(host: str, port: int = 0) -> Iterator[int]:
    """A listener nobody accepts on, its queue filled: SYNs to it are dropped (a connect
    gets no answer, as from an unroutable host). Yields its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    with listener:
        listener.bind((host, port))
        listener.listen(0)
        bound: int = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, bound))
            fillers.append(filler)
        try:
            yield bound
        finally:
            for filler in fillers:
                filler.close()


def sources_text(remote_port: int | None = None) -> str:
    port = f"remote_port = {remote_port}\n" if remote_port is not None else ""
    return (
        f'[source."a"]\nsource_address = "127.0.0.3"\n{port}'
        f'[source."b"]\nsource_address = "127.0.0.4"\n{port}'
        '[pool."shared"."a"]\n[pool."shared"."b"]\n'
        '[dial]\ntimeout = "1s"\n'
    )


def suspended(daemon: Daemon) -> list[str]:
    return [s.name for s in daemon.runtime.health.snapshot() if s.suspended]


# --------------------------------------------------------------------------- SOCKS5


async def socks_connect(port: int, host: str, target: int) -> int:
    """A SOCKS5 CONNECT without authentication; the reply code (0 = success)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await stream.receive_some(2) == b"\x05\x00"
        request = b"\x05\x01\x00\x01" + socket.inet_aton(host) + target.to_bytes(2, "big")
        await stream.send_all(request)
        reply = b""
        while len(reply) < 10:
            chunk = await stream.receive_some(10 - len(reply))
            assert chunk, "the door closed without a reply"
            reply += chunk
        return reply[1]


async def test_socks5_tenant_a_dead_destination_leaves_tenant_b_served(
    tmp_path: Path, sink: Sink
) -> None:
    with silent_destination("127.0.0.1") as dead:
        text = (
            sources_text()
            + f"[access]\ndestination_ports = [{dead}, {sink.port}]\ndeny_destinations = []\n"
            + '[[socks5.listener]]\naddress = "127.0.0.1:0"\npool = "shared"\n'
        )
        records: list[str] = []
        async with running_daemon(text, tmp_path) as daemon:
            daemon.runtime.session_hooks.append(lambda r: records.append(r.detail or ""))
            door = port_of(daemon, "socks5")
            tenant_a: list[int] = []

            async def dead_connect() -> None:
                tenant_a.append(await socks_connect(door, "127.0.0.1", dead))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(TENANT_A_ATTEMPTS):
                        nursery.start_soon(dead_connect)
            assert tenant_a == [6] * TENANT_A_ATTEMPTS  # TTL expired: the destination's

            with trio.fail_after(5):
                tenant_b = [await socks_connect(door, "127.0.0.1", sink.port) for _ in range(2)]
            assert tenant_b == [0, 0]
            with trio.fail_after(5):
                await sink.wait_for_connections(2)
            assert suspended(daemon) == []
            assert sorted(sink.peers) == ["127.0.0.3", "127.0.0.4"]  # both sources still serve

            assert await socks_connect(door, "127.0.0.1", dead) == 6  # the breaker answers
            with trio.fail_after(5):
                while len(records) < TENANT_A_ATTEMPTS + 3:
                    await trio.sleep(0.01)
        assert f"destination 127.0.0.1:{dead} is failing" in records[-1]


# --------------------------------------------------------------------------- SMTP


async def smtp_reply(stream: trio.SocketStream, buffer: bytearray) -> str:
    """The last line of the next reply (``250 ...`` after ``250-...`` lines), or EOF."""
    while True:
        while b"\r\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return "EOF"
            buffer += chunk
        end = buffer.index(b"\r\n")
        line = bytes(buffer[:end]).decode()
        del buffer[: end + 2]
        if line[3:4] != "-":
            return line


async def smtp_session(port: int, recipient: str, body: bool = True) -> list[str]:
    """EHLO, MAIL, RCPT (and DATA with a short body when accepted): the last line of each
    reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = bytearray()
    replies: list[str] = []
    async with stream:
        assert (await smtp_reply(stream, buffer)).startswith("220")
        for line in ("EHLO mta.test", "MAIL FROM:<a@sender.test>", f"RCPT TO:<{recipient}>"):
            await stream.send_all(line.encode() + b"\r\n")
            replies.append(await smtp_reply(stream, buffer))
        if body and replies[-1].startswith("250"):
            await stream.send_all(b"DATA\r\n")
            replies.append(await smtp_reply(stream, buffer))
            await stream.send_all(b"Subject: t\r\n\r\nhello\r\n.\r\n")
            replies.append(await smtp_reply(stream, buffer))
        await stream.send_all(b"QUIT\r\n")
    return replies


def shared_port() -> int:
    """A port free on 127.0.0.1 and 127.0.0.9: the live and the dead MX both use it."""
    while True:
        candidate: int = free_port("127.0.0.1")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.9", candidate))
            except OSError:
                continue
        return candidate


async def test_smtp_tenant_a_dead_mx_leaves_tenant_b_served(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = shared_port()
    live = await start_scripted_mx(nursery, port=port)
    mx = [("dead.test", "mx.dead.test", 10), ("good.test", "mx.good.test", 10)]
    hosts = {"mx.dead.test": ["127.0.0.9"], "mx.good.test": ["127.0.0.1"]}
    with silent_destination("127.0.0.9", port), dnsmasq(mx=mx, hosts=hosts) as dns:
        text = (
            'hostname = "relay.test"\n'
            + sources_text(remote_port=port)
            + "[access]\ndeny_destinations = []\n"
            + f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "2s"\n'
            + '[[smtp.listener]]\naddress = "127.0.0.1:0"\npool = "shared"\n'
        )
        async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}) as daemon:
            relay = port_of(daemon, "smtp")
            tenant_a: list[list[str]] = []

            async def dead_mail() -> None:
                tenant_a.append(await smtp_session(relay, "someone@dead.test"))

            with trio.fail_after(15):
                async with trio.open_nursery() as sessions:
                    for _ in range(TENANT_A_ATTEMPTS):
                        sessions.start_soon(dead_mail)
            assert [replies[-1][:3] for replies in tenant_a] == ["451"] * TENANT_A_ATTEMPTS

            with trio.fail_after(10):
                tenant_b = [await smtp_session(relay, "rcpt@good.test") for _ in range(2)]
            assert [replies[-1] for replies in tenant_b] == ["250 2.0.0 scripted queued"] * 2
            assert suspended(daemon) == []
            assert sorted(s.peer for s in live.sessions) == ["127.0.0.3", "127.0.0.4"]

            with trio.fail_after(10):
                fast = await smtp_session(relay, "someone@dead.test")  # the breaker answers
            assert fast[-1].startswith("451 ")
            assert f"destination 127.0.0.9:{port} is failing" in fast[-1]


def daemon_metrics_port(daemon: Daemon) -> int:
    assert daemon.extras is not None and daemon.extras.metrics_port is not None
    return daemon.extras.metrics_port


async def test_open_breakers_show_in_status_and_metrics(
    tmp_path: Path, short_dir: Path, sink: Sink
) -> None:
    """A refused destination's breaker opens after 3 failures: ``egressd status`` lists it
    (destination, time left, failures, the last failure) and the gauge counts it by kind,
    with no per-destination label; a destination that works is not listed."""
    closed = free_port()
    text = (
        sources_text()
        + f"[access]\ndestination_ports = [{closed}, {sink.port}]\ndeny_destinations = []\n"
        + '[[socks5.listener]]\naddress = "127.0.0.1:0"\npool = "shared"\n'
        + f'[control]\nsocket = "{short_dir}/control.sock"\n'
        + '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    async with running_daemon(text, tmp_path) as daemon:
        door = port_of(daemon, "socks5")
        with trio.fail_after(10):
            before = await scrape(daemon_metrics_port(daemon))
            assert await socks_connect(door, "127.0.0.1", sink.port) == 0
            replies = [await socks_connect(door, "127.0.0.1", closed) for _ in range(4)]
            out = io.StringIO()
            code = await trio.to_thread.run_sync(
                command_status, load_config(tmp_path / "egressd.toml"), out
            )
            after = await scrape(daemon_metrics_port(daemon))
    assert replies == [5, 5, 5, 5]  # refused three times, then the breaker answers (05)
    assert code == 0
    status = out.getvalue()
    assert "open destination circuit breakers:" in status
    (row,) = [line for line in status.splitlines() if line.startswith(f"127.0.0.1:{closed}")]
    assert " 3 " in row and "refused: " in row and "Connection refused" in row
    assert f"127.0.0.1:{sink.port}" not in status
    assert sample(before, "egressd_destination_breakers_open", kind="refused") is None
    assert sample(after, "egressd_destination_breakers_open", kind="refused") == 1
    assert f"{closed}" not in "".join(
        line for line in after.splitlines() if line.startswith("egressd_destination_breakers")
    )
