"""The SOCKS5 front door end to end on loopback: an in-process egressd, real curl, a raw client.

Sources are loopback addresses, so the destination sees which one a connection left from:
``a`` 127.0.0.2 (pool ``main``, the listener's default), ``b`` 127.0.0.3 (pool ``other``),
``six`` ::1 (pool ``six``) and ``gone`` 203.0.113.7 (pool ``broken``: not configured on
this host, so its bind fails before any packet leaves). Destinations are a whoami HTTP
server (for curl: it answers with the peer address it saw), the harness's banner+echo sink,
and small scripted servers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import (
    Sink,
    free_port,
    read_until_closed,
    receive_exactly,
    receive_until,
    require_binary,
)
from smtp_harness import dnsmasq

from egressd.config import Endpoint, Source
from egressd.log import TextFormatter
from egressd.net.egress import dial

pytestmark = pytest.mark.integration

CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3


# --------------------------------------------------------------------------- servers


@dataclass
class Whoami:
    """An HTTP server that answers every request with the peer address it saw."""

    host: str
    port: int
    peers: list[str] = field(default_factory=list)

    def url(self, host: str | None = None) -> str:
        shown = host or self.host
        return f"http://[{shown}]:{self.port}/" if ":" in shown else f"http://{shown}:{self.port}/"


async def start_whoami(nursery: trio.Nursery, host: str) -> Whoami:
    listeners = await trio.open_tcp_listeners(0, host=host)
    server = Whoami(host, listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        peer = str(stream.socket.getpeername()[0])
        server.peers.append(peer)
        await receive_until(stream, b"\r\n\r\n")
        body = f"peer={peer}\n".encode()
        await stream.send_all(
            b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return server


async def start_quit_server(nursery: trio.Nursery) -> int:
    """Reads until the client's EOF, then answers ``221 bye`` and closes."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        while await stream.receive_some(4096):
            pass
        await trio.sleep(0.05)
        await stream.send_all(b"221 bye\r\n")

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


# --------------------------------------------------------------------------- egressd


def config_text(
    ports: Sequence[int],
    *,
    users: dict[str, str] | None = None,
    limits: str = "",
    deny_loopback: bool = False,
    nameserver: str | None = None,
) -> str:
    dns = f'nameservers = ["{nameserver}"]' if nameserver else ""
    text = f"""
[source.a]
source_address = "127.0.0.2"
[source.b]
source_address = "127.0.0.3"
[source.six]
source_address = "::1"
[source.gone]
source_address = "203.0.113.7"
[pool.main.a]
[pool.other.b]
[pool.six.six]
[pool.broken.gone]

[access]
destination_ports = [{", ".join(str(p) for p in ports)}]
{"" if deny_loopback else "deny_destinations = []"}

[limits]
{limits}

[dns]
{dns}

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"
"""
    if users:
        text += "\n[auth.users]\n" + "".join(
            f"{u} = {p}\n" if p.startswith("{") else f'{u} = "{p}"\n' for u, p in users.items()
        )
    return text


Egressd = RecordingDaemon


@asynccontextmanager
async def egressd(
    tmp_path: Path, ports: Sequence[int], **options: object
) -> AsyncIterator[Egressd]:
    text = config_text(ports, **options)  # type: ignore[arg-type]
    async with recording_daemon(text, tmp_path, "socks5") as daemon:
        yield daemon


# --------------------------------------------------------------------------- clients


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    binary = require_binary("curl")
    with trio.fail_after(15):
        return await trio.run_process(
            [binary, "-sS", "--max-time", "10", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def request_bytes(command: int, host: str, port: int) -> bytes:
    """An RFC 1928 request, built here independently of egressd's codec."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        address = bytes([3, len(host)]) + host.encode()
    else:
        address = bytes([1 if ip.version == 4 else 4]) + ip.packed
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


@dataclass(frozen=True)
class SocksReply:
    code: int
    atyp: int
    address: str
    port: int


async def read_reply(stream: trio.SocketStream) -> SocksReply:
    version, code, _rsv, atyp = await receive_exactly(stream, 4)
    assert version == 5
    if atyp == 1:
        address = str(ipaddress.IPv4Address(await receive_exactly(stream, 4)))
    elif atyp == 4:
        address = str(ipaddress.IPv6Address(await receive_exactly(stream, 16)))
    else:
        (length,) = await receive_exactly(stream, 1)
        address = (await receive_exactly(stream, length)).decode()
    (port,) = struct.unpack("!H", await receive_exactly(stream, 2))
    return SocksReply(code, atyp, address, port)


async def socks_client(
    port: int, user: str | None = None, password: str = "", *, expect_auth: int = 0
) -> trio.SocketStream:
    """Connected and past the greeting (and RFC 1929 when ``user`` is given)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if user is None:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        return stream
    await stream.send_all(b"\x05\x01\x02")
    assert await receive_exactly(stream, 2) == b"\x05\x02"
    await stream.send_all(
        bytes([1, len(user)]) + user.encode() + bytes([len(password)]) + password.encode()
    )
    assert await receive_exactly(stream, 2) == bytes([1, expect_auth])
    return stream


async def connect(
    port: int, host: str, dest_port: int, user: str | None = None, password: str = ""
) -> tuple[trio.SocketStream, SocksReply]:
    stream = await socks_client(port, user, password)
    await stream.send_all(request_bytes(CONNECT, host, dest_port))
    return stream, await read_reply(stream)


# --------------------------------------------------------------------------- curl, each ATYP


async def test_curl_ipv4_literal_leaves_from_the_listeners_pool(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    web = await start_whoami(nursery, "127.0.0.1")
    async with egressd(tmp_path, [web.port]) as e:
        done = await curl("--socks5", f"127.0.0.1:{e.port}", web.url())
        record = await e.record()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"peer=127.0.0.2\n"
    assert (record.outcome, record.pool, record.source) == ("ok", "main", "a")
    assert record.local_address is not None and record.local_address.startswith("127.0.0.2:")
    assert record.destination == f"127.0.0.1:{web.port}"
    assert record.bytes_up > 0 and record.bytes_down > len(b"peer=127.0.0.2\n")


async def test_curl_ipv6_literal(nursery: trio.Nursery, tmp_path: Path) -> None:
    web = await start_whoami(nursery, "::1")
    async with egressd(tmp_path, [web.port]) as e:
        done = await curl("--socks5", f"127.0.0.1:{e.port}", "--proxy-user", "six:x", web.url())
        record = await e.record()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"peer=::1\n"
    assert (record.outcome, record.source, record.destination) == (
        "ok",
        "six",
        f"[::1]:{web.port}",
    )


async def test_curl_socks5_hostname_is_resolved_by_egressd(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    web = await start_whoami(nursery, "127.0.0.1")
    with dnsmasq(hosts={"web.test": ["127.0.0.1"]}) as dns:  # through [dns] nameservers
        async with egressd(tmp_path, [web.port], nameserver=dns.nameserver) as e:
            done = await curl("--socks5-hostname", f"127.0.0.1:{e.port}", web.url("web.test"))
            record = await e.record()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"peer=127.0.0.2\n"
    assert record.destination == f"web.test:{web.port} (127.0.0.1)"


# --------------------------------------------------------------------------- auth and pools


async def test_username_picks_the_pool_and_password_is_checked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    web = await start_whoami(nursery, "127.0.0.1")
    users = {"main": "main-secret", "other": "other-secret"}
    async with egressd(tmp_path, [web.port], users=users) as e:
        proxy = f"127.0.0.1:{e.port}"
        good = await curl("-x", f"socks5h://other:other-secret@{proxy}", web.url())
        wrong = await curl("-x", f"socks5h://other:main-secret@{proxy}", web.url())
        anonymous = await curl("-x", f"socks5h://{proxy}", web.url())
        await e.record(3)
    assert good.returncode == 0, good.stderr
    assert good.stdout == b"peer=127.0.0.3\n"
    assert wrong.returncode != 0 and wrong.stdout == b""
    assert anonymous.returncode != 0 and anonymous.stdout == b""
    assert web.peers == ["127.0.0.3"]
    details = sorted((r.outcome, r.detail or "") for r in e.records)
    assert details == [
        ("denied", "RFC 1929 credentials refused for user 'other'"),
        ("denied", "client offers no acceptable authentication method"),
        ("ok", ""),
    ]


async def test_wrong_password_gets_rfc1929_failure_then_close(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port], users={"main": "pw"}) as e:
        stream = await socks_client(e.port, "main", "nope", expect_auth=1)
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b""
        unknown = await socks_client(e.port, "nobody", "pw", expect_auth=1)
        with trio.fail_after(5):
            assert await read_until_closed(unknown) == b""
        # Offering only "no authentication" when passwords are configured: 05 FF.
        bare = await trio.open_tcp_stream("127.0.0.1", e.port)
        await bare.send_all(b"\x05\x01\x00")
        with trio.fail_after(5):
            assert await read_until_closed(bare) == b"\x05\xff"
    assert sink.connections == []


async def test_without_auth_config_the_username_only_tags_the_pool(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    web = await start_whoami(nursery, "127.0.0.1")
    async with egressd(tmp_path, [web.port]) as e:
        done = await curl("--socks5", f"127.0.0.1:{e.port}", "--proxy-user", "other:x", web.url())
        record = await e.record()
    assert done.stdout == b"peer=127.0.0.3\n"
    assert (record.pool, record.source) == ("other", "b")


# --------------------------------------------------------------------------- BIND-then-CONNECT


async def test_bind_then_connect_leaves_from_exactly_that_source(
    sink: Sink, tmp_path: Path
) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await socks_client(e.port)
        await stream.send_all(request_bytes(BIND, "127.0.0.3", 0))
        bind_reply = await read_reply(stream)
        assert (bind_reply.code, bind_reply.address) == (0, "127.0.0.3")
        await stream.send_all(request_bytes(CONNECT, "127.0.0.1", sink.port))
        reply = await read_reply(stream)
        (connection,) = await sink.wait_for_connections()
        assert await receive_until(stream, b"\r\n") == b"220 sink.test ESMTP\r\n"
        await stream.send_all(b"EHLO kumo\r\n")
        assert await receive_until(stream, b"\r\n") == b"EHLO kumo\r\n"
        await stream.aclose()
        record = await e.record()
    assert connection.peer[0] == "127.0.0.3"
    # The success reply is the outbound connection's real local address, same family.
    assert (reply.code, reply.atyp, reply.address, reply.port) == (0, 1, *connection.peer)
    assert (record.source, record.pool, record.outcome) == ("b", None, "ok")


async def test_bind_to_an_address_of_no_source_is_refused_02(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await socks_client(e.port)
        await stream.send_all(request_bytes(BIND, "127.0.0.99", 0))
        reply = await read_reply(stream)
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b""
        record = await e.record()
    assert reply.code == 2
    assert sink.connections == []
    assert record.outcome == "denied"
    assert record.detail == "BIND 127.0.0.99: no configured source has this address"


async def test_bind_without_a_connect_gets_07(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await socks_client(e.port)
        await stream.send_all(request_bytes(BIND, "127.0.0.2", 0))
        assert (await read_reply(stream)).code == 0
        await stream.send_eof()
        assert (await read_reply(stream)).code == 7


async def test_udp_associate_gets_07(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await socks_client(e.port)
        await stream.send_all(request_bytes(UDP_ASSOCIATE, "0.0.0.0", 0))
        assert (await read_reply(stream)).code == 7
        record = await e.record()
    assert record.outcome == "protocol_error"


async def test_egressds_own_dialer_through_the_socks5_door(sink: Sink, tmp_path: Path) -> None:
    """A source with socks5_proxy_server = this door, as KumoMTA would configure it."""
    # One credential for all the sources KumoMTA uses (issue 10, finding 3).
    users = {"main": '{ password = "pw", pools = ["main", "other"] }'}
    async with egressd(tmp_path, [sink.port], users=users) as e:
        hop = Endpoint("127.0.0.1", e.port)
        kumo = Source(
            name="kumo",
            socks5_proxy_server=hop,
            socks5_proxy_source_address=ipaddress.ip_address("127.0.0.3"),
            socks5_proxy_username="main",
            socks5_proxy_password="pw",
        )
        plain = Source(
            name="plain",
            socks5_proxy_server=hop,
            egressd_socks5_plain_connect=True,
            socks5_proxy_username="main",
            socks5_proxy_password="pw",
        )
        with trio.fail_after(10):
            for source in (kumo, plain):
                dialed = await dial(source, "127.0.0.1", sink.port)
                async with dialed.stream:
                    banner = dialed.initial_data + await dialed.stream.receive_some(100)
                    assert banner == b"220 sink.test ESMTP\r\n"
        first, second = await sink.wait_for_connections(2)
    assert first.peer[0] == "127.0.0.3"  # BIND-then-CONNECT picked source b
    assert second.peer[0] == "127.0.0.2"  # a plain CONNECT: the username's pool "main"


# --------------------------------------------------------------------------- refusals


async def test_access_rules_refuse_with_02_and_name_the_rule(sink: Sink, tmp_path: Path) -> None:
    with dnsmasq(hosts={"inside.test": ["127.0.0.1"]}) as dns:
        options = {"deny_loopback": True, "nameserver": dns.nameserver}
        async with egressd(tmp_path, [sink.port], **options) as e:
            for host, port in (
                ("127.0.0.1", sink.port),  # deny_destinations
                ("inside.test", sink.port),  # a name that resolves into deny_destinations
                ("127.0.0.1", 22),  # destination_ports
            ):
                stream, reply = await connect(e.port, host, port)
                assert reply.code == 2
                await stream.aclose()
            records = [await e.record(n) for n in (1, 2, 3)]
    assert sink.connections == []
    assert [r.outcome for r in records] == ["denied"] * 3
    details = [r.detail or "" for r in records]
    assert "in access.deny_destinations (127.0.0.0/8)" in details[0]
    assert details[1].startswith("inside.test resolves to a denied address")
    assert details[2] == "port 22 is not in access.destination_ports"


async def test_dial_failures_map_to_reply_codes(tmp_path: Path) -> None:
    closed_port = free_port()
    async with egressd(tmp_path, [closed_port]) as e:
        _, refused = await connect(e.port, "127.0.0.1", closed_port)
        _, unplumbed = await connect(e.port, "127.0.0.1", closed_port, "broken")
        stream = await socks_client(e.port)
        await stream.send_all(request_bytes(BIND, "203.0.113.7", 0))
        # Refused at BIND now, as KumoProxy does (issue 10, finding 2), no longer at CONNECT.
        bound_unplumbed = await read_reply(stream)
        records = [await e.record(n) for n in (1, 2, 3)]
    assert (refused.code, unplumbed.code, bound_unplumbed.code) == (5, 1, 1)
    # The unplumbed dial suspended "gone" at once, so its BIND is refused as suspended.
    assert [r.outcome for r in records] == ["dial_failed", "dial_failed", "refused"]
    assert records[2].detail == "BIND 203.0.113.7: source 'gone' is suspended"
    assert "not configured on this host" in (records[1].detail or "")


async def test_garbage_is_refused_and_others_are_still_served(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        garbage = await trio.open_tcp_stream("127.0.0.1", e.port)
        await garbage.send_all(b"GET / HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            assert await read_until_closed(garbage) == b""
        stream, reply = await connect(e.port, "127.0.0.1", sink.port)
        assert reply.code == 0
        await stream.aclose()
        record = await e.record()
    assert record.outcome == "protocol_error"


# --------------------------------------------------------------------------- relay


async def test_half_close_still_delivers_the_last_reply(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await start_quit_server(nursery)
    async with egressd(tmp_path, [port]) as e:
        stream, reply = await connect(e.port, "127.0.0.1", port)
        assert reply.code == 0
        await stream.send_all(b"QUIT\r\n")
        await stream.send_eof()
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b"221 bye\r\n"
        record = await e.record()
    assert (record.outcome, record.bytes_up, record.bytes_down) == ("ok", 6, 9)


async def test_bytes_pipelined_after_connect_reach_the_destination(
    sink: Sink, tmp_path: Path
) -> None:
    async with egressd(tmp_path, [sink.port]) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(
            b"\x05\x01\x00" + request_bytes(CONNECT, "127.0.0.1", sink.port) + b"EHLO x\r\n"
        )
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        assert (await read_reply(stream)).code == 0
        echoed = await receive_until(stream, b"EHLO x\r\n")
        await stream.aclose()
    assert echoed == b"220 sink.test ESMTP\r\nEHLO x\r\n"


async def test_idle_timeout_closes_a_silent_session(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port], limits='idle_timeout = "1s"') as e:
        stream, reply = await connect(e.port, "127.0.0.1", sink.port)
        assert reply.code == 0
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b"220 sink.test ESMTP\r\n"
            (connection,) = await sink.wait_for_connections()
            await connection.closed.wait()
        record = await e.record()
    assert record.outcome == "idle_timeout"


async def test_handshake_timeout_closes_a_slow_client(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port], limits='handshake_timeout = "0.5s"') as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        await stream.send_all(b"\x05")  # half a greeting, then nothing
        with trio.fail_after(5):
            assert await read_until_closed(stream) == b""
        record = await e.record()
    assert (record.outcome, record.detail) == (
        "timeout",
        "SOCKS5 handshake not finished within 0.5s",
    )


async def hold_session(e: Egressd, sink: Sink, user: str | None = None) -> trio.SocketStream:
    stream, reply = await connect(e.port, "127.0.0.1", sink.port, user)
    assert reply.code == 0
    assert await receive_until(stream, b"\r\n") == b"220 sink.test ESMTP\r\n"
    return stream


async def test_max_connections_refuses_at_once_with_01(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port], limits="max_connections = 1") as e:
        held = await hold_session(e, sink)
        with trio.fail_after(3):  # refused at once, not parked
            _, reply = await connect(e.port, "127.0.0.1", sink.port, "other", "x")
        assert reply.code == 1
        await held.aclose()
        await e.record()
        with trio.fail_after(3):
            again = await hold_session(e, sink)  # a slot is free again
        await again.aclose()
    assert len(sink.connections) == 2


async def test_per_source_cap_refuses_at_once_with_01(sink: Sink, tmp_path: Path) -> None:
    async with egressd(tmp_path, [sink.port], limits="max_connections_per_source = 1") as e:
        held = await hold_session(e, sink)
        with trio.fail_after(3):
            _, from_pool = await connect(e.port, "127.0.0.1", sink.port)
            stream = await socks_client(e.port)
            await stream.send_all(request_bytes(BIND, "127.0.0.2", 0))
            assert (await read_reply(stream)).code == 0
            await stream.send_all(request_bytes(CONNECT, "127.0.0.1", sink.port))
            from_bind = await read_reply(stream)
            other = await hold_session(e, sink, "other")  # another source still has room
        refusals = [await e.record(n) for n in (1, 2)]
        await held.aclose()
        await other.aclose()
    assert (from_pool.code, from_bind.code) == (1, 1)
    assert [r.outcome for r in refusals] == ["refused", "refused"]
    assert all("max_connections_per_source" in (r.detail or "") for r in refusals)


# --------------------------------------------------------------------------- the session's trace


async def test_each_session_logs_one_line_and_counts_its_metrics(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start_quit_server(nursery)
    caplog.set_level(logging.INFO, logger="egressd")
    async with egressd(tmp_path, [port]) as e:
        for _ in range(2):
            stream, reply = await connect(e.port, "127.0.0.1", port)
            assert reply.code == 0
            await stream.send_all(b"QUIT\r\n")
            await stream.send_eof()
            with trio.fail_after(5):
                assert await read_until_closed(stream) == b"221 bye\r\n"
            await stream.aclose()
        await e.record(2)
        scrape = e.daemon.metrics.exposition().decode()
    lines = [r for r in caplog.records if r.name == "egressd.session"]
    assert len(lines) == 2
    for line in lines:
        assert line.getMessage() == "connection"
        fields = getattr(line, "fields", {})
        assert list(fields) == [
            "door",
            "client",
            "pool",
            "source",
            "local_address",
            "destination",
            "bytes_up",
            "bytes_down",
            "outcome",
            "duration",
        ]
        assert fields["door"] == "socks5"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", fields["client"])
        assert (fields["pool"], fields["source"]) == ("main", "a")
        assert re.fullmatch(r"127\.0\.0\.2:\d+", fields["local_address"])
        assert fields["destination"] == f"127.0.0.1:{port}"
        assert (fields["bytes_up"], fields["bytes_down"], fields["outcome"]) == (6, 9, "ok")
        assert isinstance(fields["duration"], float)
        text = TextFormatter().format(line)
        assert text == (
            f"info egressd.session: connection door=socks5 client={fields['client']} pool=main"
            f" source=a local_address={fields['local_address']} destination=127.0.0.1:{port}"
            f" bytes_up=6 bytes_down=9 outcome=ok duration={fields['duration']}"
        )
    labels = 'door="socks5",pool="main",source="a"'  # the exposition sorts labels by name
    assert (
        'egressd_connections_total{door="socks5",outcome="ok",pool="main",source="a"} 2.0' in scrape
    )
    assert f'egressd_bytes_total{{direction="upstream",{labels}}} 12.0' in scrape
    assert f'egressd_bytes_total{{direction="downstream",{labels}}} 18.0' in scrape
    assert 'egressd_active_sessions{door="socks5"} 0.0' in scrape
