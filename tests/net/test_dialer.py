"""The dialer against real servers on loopback: sinks, a transparent HAProxy, Dante, and a
scripted KumoMTA-style SOCKS5 proxy checking the BIND-then-CONNECT bytes."""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
from harness import (
    Dante,
    HAProxy,
    Sink,
    StaticResolver,
    dante,
    free_port,
    receive_exactly,
    receive_until,
    start_sink,
)
from smtp_harness import Dnsmasq, dnsmasq

from egressd.config import Config, DialSettings, DnsSettings, Endpoint, IPAddress, Source
from egressd.egress import Egress, EgressFailure, Party, Plan, Stage, destination_port
from egressd.health import SourceHealth
from egressd.net.dialer import Dialed
from egressd.net.egress import connect_within, dial
from egressd.pools import PoolSet

ip = ipaddress.ip_address
BANNER = b"220 sink.test ESMTP\r\n"
UNPLUMBED = "203.0.113.7"  # TEST-NET-3: never configured here; only ever a bind address


async def dial_within(
    seconds: float, source: Source, host: str | IPAddress, port: int | None = None
) -> Dialed:
    """The doors' path for one exact source: a plan under one deadline of ``seconds``."""
    config = Config(
        path=None,  # type: ignore[arg-type]
        sources={source.name: source},
        pools={},
        dial=DialSettings(timeout=seconds),
    )
    egress = Egress(config, PoolSet.from_config(config), SourceHealth([source.name]))
    return await connect_within(Plan(egress, source=source, host=host, port=port))


def peer(address: tuple[IPAddress, int] | None) -> tuple[str, int]:
    assert address is not None
    return str(address[0]), address[1]


async def banner_of(dialed: Dialed) -> bytes:
    return await receive_until(dialed.stream, b"\r\n", dialed.initial_data)


async def echo_check(dialed: Dialed) -> None:
    await dialed.stream.send_all(b"EHLO egressd.test\r\n")
    assert await receive_until(dialed.stream, b"EHLO egressd.test\r\n") == b"EHLO egressd.test\r\n"


# --------------------------------------------------------------------------- pure parts


def test_port_remote_port_wins() -> None:
    assert destination_port(Source(name="s", remote_port=2525), 587) == 2525
    assert destination_port(Source(name="s", remote_port=2525), None) == 2525


def test_port_caller_then_25() -> None:
    assert destination_port(Source(name="s"), 587) == 587
    assert destination_port(Source(name="s"), None) == 25


# --------------------------------------------------------------------------- direct


@pytest.mark.parametrize("address", ["127.0.0.2", "127.0.0.3"])
async def test_direct_binds_source_address(sink: Sink, address: str) -> None:
    source = Source(name="a", source_address=ip(address))
    dialed = await dial(source, "127.0.0.1", sink.port)
    async with dialed.stream:
        assert await banner_of(dialed) == BANNER
        await echo_check(dialed)
        (connection,) = await sink.wait_for_connections(1)
    assert connection.peer[0] == address
    assert dialed.via == "direct"
    assert peer(dialed.local_address) == connection.peer
    assert peer(dialed.remote_address) == ("127.0.0.1", sink.port)
    assert dialed.proxy_address is None


async def test_a_closed_connection_leaves_its_descriptor_to_the_next(sink: Sink) -> None:
    """Closing a connection whose last wait was cancelled (trio may still hold the
    descriptor) gives back the lease, and the next socket given the same descriptor is
    waited on as usual."""
    source = Source(name="a", source_address=ip("127.0.0.2"))
    dialed = await dial(source, "127.0.0.1", sink.port)
    released: list[bool] = []
    dialed.release = lambda: released.append(True)
    assert await banner_of(dialed) == BANNER
    async with trio.open_nursery() as nursery:  # trio registers the socket for a read
        nursery.start_soon(dialed.stream.receive_some, 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    descriptor = dialed.stream.fileno()
    dialed.close()
    assert released == [True]
    assert dialed.stream.socket.fileno() == -1
    again = await dial(source, "127.0.0.1", sink.port)
    assert again.stream.fileno() == descriptor
    with trio.fail_after(5):
        async with again.stream:
            assert await banner_of(again) == BANNER
            await echo_check(again)  # a wait on the reused descriptor, woken as usual


async def test_closing_a_connection_wakes_a_task_still_waiting_on_it(sink: Sink) -> None:
    """A task still reading the connection when its owner closes it wakes with
    ClosedResourceError instead of waiting forever on a descriptor that is gone."""
    source = Source(name="a", source_address=ip("127.0.0.2"))
    dialed = await dial(source, "127.0.0.1", sink.port)
    assert await banner_of(dialed) == BANNER  # the sink now waits: so does the reader
    woken: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await dialed.stream.receive_some(10)
        except trio.ClosedResourceError as exc:
            woken.append(type(exc))

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            dialed.close()
    assert woken == [trio.ClosedResourceError]


async def test_direct_many_connections_share_nothing_but_the_address(sink: Sink) -> None:
    source = Source(name="a", source_address=ip("127.0.0.2"))
    dials = [await dial(source, "127.0.0.1", sink.port) for _ in range(20)]
    await sink.wait_for_connections(20)
    assert {str(d.local_address[0]) for d in dials} == {"127.0.0.2"}
    assert len({d.local_address for d in dials}) == 20
    for dialed in dials:
        await dialed.stream.aclose()


async def test_direct_ipv6_from_loopback(sink6: Sink) -> None:
    source = Source(name="v6", source_address=ip("::1"))
    dialed = await dial(source, "::1", sink6.port)
    async with dialed.stream:
        assert await banner_of(dialed) == BANNER
    assert sink6.peers == ["::1"]
    assert str(dialed.local_address[0]) == "::1"
    assert peer(dialed.remote_address) == ("::1", sink6.port)


async def test_direct_without_source_address_lets_kernel_choose(sink: Sink) -> None:
    dialed = await dial(Source(name="any"), ip("127.0.0.1"), sink.port)
    async with dialed.stream:
        await sink.wait_for_connections(1)
    assert sink.peers == ["127.0.0.1"]


async def test_remote_port_overrides_callers_port(sink: Sink) -> None:
    source = Source(name="a", source_address=ip("127.0.0.2"), remote_port=sink.port)
    dialed = await dial(source, "127.0.0.1", 25)
    async with dialed.stream:
        await sink.wait_for_connections(1)
    assert peer(dialed.remote_address) == ("127.0.0.1", sink.port)


def through(server: Dnsmasq) -> DnsSettings:
    """``[dns]`` with ``server`` as the only name server (names resolve through [dns])."""
    return DnsSettings(nameservers=(Endpoint(server.host, server.port),), timeout=5.0)


async def test_names_are_resolved_and_every_address_tried(sink: Sink) -> None:
    source = Source(name="a", source_address=ip("127.0.0.2"))
    # ::1 is not asked for (IPv4 source); nothing listens on 127.0.0.9: refused, then 127.0.0.1.
    with dnsmasq(hosts={"mx.test": ["::1", "127.0.0.9", "127.0.0.1"]}) as server:
        dialed = await dial(source, "mx.test", sink.port, dns=through(server))
    async with dialed.stream:
        assert await banner_of(dialed) == BANNER
    assert peer(dialed.remote_address) == ("127.0.0.1", sink.port)


# --------------------------------------------------------------------------- HAProxy


async def test_haproxy_transparent(haproxy: HAProxy, nursery: trio.Nursery) -> None:
    destination = await start_sink(nursery, "127.0.0.7")
    source = Source(
        name="ha",
        ha_proxy_server=Endpoint(haproxy.host, haproxy.port),
        ha_proxy_source_address=ip("127.0.0.5"),
    )
    with trio.fail_after(10):
        dialed = await dial_within(10, source, "127.0.0.7", destination.port)
        async with dialed.stream:
            assert await banner_of(dialed) == BANNER, haproxy.process.output()
            await echo_check(dialed)
            (connection,) = await destination.wait_for_connections(1)
    assert connection.peer[0] == "127.0.0.5"
    assert connection.local == ("127.0.0.7", destination.port)
    assert dialed.via == "haproxy"
    assert peer(dialed.local_address) == ("127.0.0.5", 0)
    assert peer(dialed.remote_address) == ("127.0.0.7", destination.port)
    assert peer(dialed.proxy_address) == ("127.0.0.1", haproxy.port)


async def test_haproxy_header_carries_remote_port(haproxy: HAProxy, sink: Sink) -> None:
    source = Source(
        name="ha",
        source_address=ip("127.0.0.2"),
        remote_port=sink.port,
        ha_proxy_server=Endpoint(haproxy.host, haproxy.port),
        ha_proxy_source_address=ip("127.0.0.6"),
    )
    with trio.fail_after(10):
        dialed = await dial(source, "127.0.0.1", 25)
        async with dialed.stream:
            assert await banner_of(dialed) == BANNER, haproxy.process.output()
    assert sink.peers == ["127.0.0.6"]


async def test_haproxy_skips_destinations_of_other_family(haproxy: HAProxy) -> None:
    source = Source(
        name="ha",
        ha_proxy_server=Endpoint(haproxy.host, haproxy.port),
        ha_proxy_source_address=ip("127.0.0.5"),
    )
    with pytest.raises(EgressFailure) as caught:
        await dial(source, "::1", 25)
    assert caught.value.kind == "no_address"


# --------------------------------------------------------------------------- Dante


def dante_source(server: Dante, **keys: object) -> Source:
    return Source(
        name="dante",
        socks5_proxy_server=Endpoint(server.host, server.port),
        egressd_socks5_plain_connect=True,
        **keys,  # type: ignore[arg-type]
    )


async def test_dante_without_auth(dante_open: Dante, sink: Sink) -> None:
    with trio.fail_after(10):
        dialed = await dial(dante_source(dante_open), "127.0.0.1", sink.port)
        async with dialed.stream:
            assert await banner_of(dialed) == BANNER
            await echo_check(dialed)
            (connection,) = await sink.wait_for_connections(1)
    assert connection.peer[0] == "127.0.0.3"
    assert dialed.via == "socks5"
    assert peer(dialed.local_address) == connection.peer  # Dante's BND.ADDR/BND.PORT
    assert peer(dialed.proxy_address) == ("127.0.0.1", dante_open.port)


async def test_dante_with_auth(dante_auth: Dante, sink: Sink) -> None:
    source = dante_source(
        dante_auth,
        source_address=ip("127.0.0.2"),
        socks5_proxy_username=dante_auth.username,
        socks5_proxy_password=dante_auth.password,
    )
    with trio.fail_after(10):
        dialed = await dial(source, "127.0.0.1", sink.port)
        async with dialed.stream:
            assert await banner_of(dialed) == BANNER
            (connection,) = await sink.wait_for_connections(1)
    assert connection.peer[0] == "127.0.0.3"
    assert peer(dialed.local_address) == connection.peer


async def test_dante_rejects_wrong_password(dante_auth: Dante, sink: Sink) -> None:
    source = dante_source(
        dante_auth, socks5_proxy_username=dante_auth.username, socks5_proxy_password="wrong"
    )
    with pytest.raises(EgressFailure) as caught:
        await dial_within(10, source, "127.0.0.1", sink.port)
    assert caught.value.kind == "proxy_refused"
    assert caught.value.party is Party.SOURCE
    assert "username/password" in str(caught.value)
    assert sink.connections == []


async def test_dante_without_credentials_when_auth_required(dante_auth: Dante) -> None:
    with pytest.raises(EgressFailure) as caught:
        await dial_within(10, dante_source(dante_auth), "127.0.0.1", 25)
    assert caught.value.kind == "proxy_refused"


async def test_dante_reports_destination_refused() -> None:
    closed_port = free_port()
    with dante() as server, pytest.raises(EgressFailure) as caught:
        await dial_within(10, dante_source(server), "127.0.0.1", closed_port)
    assert caught.value.kind == "refused"  # Dante's reply 05, a fact about the destination
    assert caught.value.party is Party.DESTINATION
    assert caught.value.stage == Stage.CONNECT


async def test_dante_ruleset_refusal_is_the_proxys() -> None:
    with dante(allow_to="127.0.0.1/32") as server, pytest.raises(EgressFailure) as caught:
        await dial_within(10, dante_source(server), "127.0.0.9", 25)
    assert caught.value.kind == "proxy_refused"
    assert "CONNECT: 2 (NOT_ALLOWED)" in str(caught.value)  # the proxy's own ruleset
    assert caught.value.party is Party.SOURCE


async def test_proxy_name_resolves_and_every_address_is_tried(
    dante_open: Dante, sink: Sink
) -> None:
    trio.socket.set_custom_hostname_resolver(
        StaticResolver({"proxy.test": ["127.0.0.9", dante_open.host]})
    )
    source = Source(
        name="n",
        socks5_proxy_server=Endpoint("proxy.test", dante_open.port),
        egressd_socks5_plain_connect=True,
    )
    with trio.fail_after(10):
        dialed = await dial(source, "127.0.0.1", sink.port)
        async with dialed.stream:
            assert await banner_of(dialed) == BANNER
    assert peer(dialed.proxy_address) == (dante_open.host, dante_open.port)


# --------------------------------------------------------------------------- KumoMTA's convention


@dataclass
class KumoProxy:
    """A scripted KumoProxy: records each message byte for byte, BINDs then CONNECTs."""

    port: int
    credentials: tuple[str, str] | None
    connect_reply: int
    transcript: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.errors.append(repr(exc))
        finally:
            await stream.aclose()

    async def _serve(self, client: trio.SocketStream) -> None:
        head = await receive_exactly(client, 2)
        self.transcript.append(head + await receive_exactly(client, head[1]))
        if self.credentials is None:
            await client.send_all(b"\x05\x00")
        else:
            await client.send_all(b"\x05\x02")
            head = await receive_exactly(client, 2)
            user = await receive_exactly(client, head[1])
            length = await receive_exactly(client, 1)
            password = await receive_exactly(client, length[0])
            self.transcript.append(head + user + length + password)
            await client.send_all(b"\x01\x00")
        bind = await receive_exactly(client, 10)
        self.transcript.append(bind)
        source_ip = str(ipaddress.IPv4Address(bind[4:8]))
        await client.send_all(b"\x05\x00\x00\x01" + bind[4:8] + b"\x00\x00")
        connect = await receive_exactly(client, 10)
        self.transcript.append(connect)
        if self.connect_reply != 0:
            await client.send_all(bytes([5, self.connect_reply, 0, 1, 0, 0, 0, 0, 0, 0]))
            return
        target = (str(ipaddress.IPv4Address(connect[4:8])), int.from_bytes(connect[8:10], "big"))
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.bind((source_ip, 0))
        await sock.connect(target)
        upstream = trio.SocketStream(sock)
        bound_ip, bound_port = sock.getsockname()
        banner = await upstream.receive_some(65536)
        # The reply and the destination's first bytes in one write: they reach the dialer
        # together, so the banner must come back as Dialed.initial_data.
        reply = b"\x05\x00\x00\x01" + ip(bound_ip).packed + bound_port.to_bytes(2, "big")
        await client.send_all(reply + banner)
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            nursery.start_soon(_pump, upstream, client)


async def _pump(source: trio.SocketStream, destination: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await destination.send_all(data)
        await destination.send_eof()


@pytest.fixture
async def kumo_proxy(nursery: trio.Nursery) -> AsyncIterator[KumoProxy]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy = KumoProxy(
        port=listeners[0].socket.getsockname()[1], credentials=("kumo", "pw"), connect_reply=0
    )
    nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
    yield proxy
    assert proxy.errors == []


def kumo_source(proxy: KumoProxy, **keys: object) -> Source:
    return Source(
        name="kumo",
        socks5_proxy_server=Endpoint("127.0.0.1", proxy.port),
        socks5_proxy_source_address=ip("127.0.0.6"),
        socks5_proxy_username="kumo",
        socks5_proxy_password="pw",
        **keys,  # type: ignore[arg-type]
    )


async def test_kumomta_bind_then_connect_bytes(kumo_proxy: KumoProxy, sink: Sink) -> None:
    with trio.fail_after(10):
        dialed = await dial(kumo_source(kumo_proxy), "127.0.0.1", sink.port)
        async with dialed.stream:
            assert dialed.initial_data == BANNER
            await echo_check(dialed)
            (connection,) = await sink.wait_for_connections(1)
    assert kumo_proxy.transcript == [
        b"\x05\x02\x00\x02",  # greeting: no auth, username/password
        b"\x01\x04kumo\x02pw",  # RFC 1929
        b"\x05\x02\x00\x01\x7f\x00\x00\x06\x00\x00",  # BIND 127.0.0.6:0
        b"\x05\x01\x00\x01\x7f\x00\x00\x01" + sink.port.to_bytes(2, "big"),  # CONNECT
    ]
    assert connection.peer[0] == "127.0.0.6"
    assert peer(dialed.local_address) == connection.peer


async def test_socks_proxy_refusal_is_the_proxys_fault(kumo_proxy: KumoProxy, sink: Sink) -> None:
    kumo_proxy.connect_reply = 2
    with pytest.raises(EgressFailure) as caught:
        await dial_within(10, kumo_source(kumo_proxy), "127.0.0.1", sink.port)
    error = caught.value
    assert error.kind == "proxy_refused"
    assert "CONNECT: 2 (NOT_ALLOWED)" in str(error)
    assert error.party is Party.SOURCE
    assert sink.connections == []


# --------------------------------------------------------------------------- failures


async def test_unplumbed_source_fails_at_bind(sink: Sink) -> None:
    source = Source(name="gone", source_address=ip(UNPLUMBED))
    with pytest.raises(EgressFailure) as caught:
        await dial(source, "127.0.0.1", sink.port)
    error = caught.value
    assert error.kind == "unplumbed"
    assert error.errno == errno.EADDRNOTAVAIL
    assert error.party is Party.SOURCE
    assert UNPLUMBED in str(error) and "gone" in str(error)
    await trio.sleep(0.05)
    assert sink.connections == []


async def test_unplumbed_source_in_front_of_a_proxy(dante_open: Dante) -> None:
    source = dante_source(dante_open, source_address=ip(UNPLUMBED))
    with pytest.raises(EgressFailure) as caught:
        await dial(source, "127.0.0.1", 25)
    assert caught.value.kind == "unplumbed"


@pytest.mark.parametrize("proxy", ["socks5", "haproxy"])
async def test_proxy_down(proxy: str) -> None:
    down = Endpoint("127.0.0.1", free_port())
    if proxy == "socks5":
        source = Source(name="h", socks5_proxy_server=down, egressd_socks5_plain_connect=True)
    else:
        source = Source(name="h", ha_proxy_server=down, ha_proxy_source_address=ip("127.0.0.5"))
    with pytest.raises(EgressFailure) as caught:
        await dial(source, "127.0.0.1", 25)
    error = caught.value
    assert error.kind == "proxy_unreachable"
    assert error.errno == errno.ECONNREFUSED
    assert error.address == (ip("127.0.0.1"), down.port)
    assert error.party is Party.SOURCE
    assert "Connection refused (ECONNREFUSED)" in str(error)


async def test_destination_refused() -> None:
    port = free_port()
    with pytest.raises(EgressFailure) as caught:
        await dial(Source(name="a", source_address=ip("127.0.0.2")), "127.0.0.1", port)
    error = caught.value
    assert error.kind == "refused"
    assert error.party is Party.DESTINATION
    assert f"127.0.0.1:{port}" in str(error)


async def test_deadline_expires_in_socks_greeting() -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with silent:
        await silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # the kernel accepts; nobody ever answers the greeting
        port = silent.getsockname()[1]
        source = Source(
            name="slow",
            socks5_proxy_server=Endpoint("127.0.0.1", port),
            egressd_socks5_plain_connect=True,
        )
        with pytest.raises(EgressFailure) as caught:
            await dial_within(0.3, source, "127.0.0.1", 25)
    error = caught.value
    assert error.kind == "proxy_timeout"
    assert error.stage == "proxy_handshake"
    assert error.party is Party.SOURCE


async def test_ipv6_source_ipv4_destination_has_no_address() -> None:
    with pytest.raises(EgressFailure) as caught:
        await dial(Source(name="v6", source_address=ip("::1")), "127.0.0.1", 25)
    assert caught.value.kind == "no_address"


async def test_name_without_address_of_the_family() -> None:
    source = Source(name="v6", source_address=ip("::1"))
    with (
        dnsmasq(hosts={"v4only.test": ["127.0.0.1"]}) as server,
        pytest.raises(EgressFailure) as caught,
    ):
        await dial(source, "v4only.test", 25, dns=through(server))
    assert caught.value.kind == "no_address"
    assert caught.value.party is Party.DESTINATION


async def test_resolution_failure() -> None:
    with dnsmasq() as server, pytest.raises(EgressFailure) as caught:
        await dial(Source(name="a"), "nowhere.test", 25, dns=through(server))
    assert caught.value.kind == "resolve"
    assert "nowhere.test does not exist" in str(caught.value)


async def test_proxy_closing_during_greeting_is_proxy_refused(nursery: trio.Nursery) -> None:
    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, close_at_once, listeners)
    source = Source(
        name="rude",
        socks5_proxy_server=Endpoint("127.0.0.1", listeners[0].socket.getsockname()[1]),
        egressd_socks5_plain_connect=True,
    )
    with pytest.raises(EgressFailure) as caught:
        await dial_within(10, source, "127.0.0.1", 25)
    assert caught.value.kind == "proxy_refused"
    assert "greeting" in str(caught.value)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_failures_close_their_sockets(nursery: trio.Nursery) -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await silent.bind(("127.0.0.1", 0))
    silent.listen(100)
    slow = Source(
        name="slow",
        socks5_proxy_server=Endpoint("127.0.0.1", silent.getsockname()[1]),
        egressd_socks5_plain_connect=True,
    )
    closed = free_port()
    with pytest.raises(EgressFailure):  # the run's Connection reactor (an epoll set) starts
        await dial_within(0.01, slow, "127.0.0.1", 25)
    gc.collect()  # earlier tests' garbage (sockets in reference cycles) closes now, not mid-count
    before = open_fds()
    for _ in range(20):
        with pytest.raises(EgressFailure):
            await dial(Source(name="a", source_address=ip("127.0.0.2")), "127.0.0.1", closed)
        with pytest.raises(EgressFailure):
            await dial(Source(name="b", source_address=ip(UNPLUMBED)), "127.0.0.1", closed)
        with pytest.raises(EgressFailure):
            await dial(
                Source(
                    name="c",
                    socks5_proxy_server=Endpoint("127.0.0.1", closed),
                    egressd_socks5_plain_connect=True,
                ),
                "::1",
                25,
            )
        with pytest.raises(EgressFailure):
            await dial_within(0.01, slow, "127.0.0.1", 25)
    assert open_fds() == before
    silent.close()


async def test_deadline_expires_while_the_destination_does_not_answer_the_connect() -> None:
    """A destination whose accept queue is full drops SYNs: the dial waits, then times out."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # nobody accepts: the queue fills after a connection or two
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            with pytest.raises(EgressFailure) as caught:
                await dial_within(0.3, Source(name="a"), "127.0.0.1", port)
        finally:
            for filler in fillers:
                filler.close()
    error = caught.value
    assert error.kind == "timeout"
    assert error.stage == "connect"
    assert error.party is Party.DESTINATION
