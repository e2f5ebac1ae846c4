"""The executor: a plan run with real sockets on loopback, and with a per-address step."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
import trio
from harness import Sink, receive_exactly
from smtp_harness import Dnsmasq, dnsmasq

from egressd.config import (
    Config,
    DialSettings,
    DnsSettings,
    Endpoint,
    LimitSettings,
    Pool,
    PoolEntry,
    Source,
)
from egressd.egress import (
    Attempt,
    Destination,
    Egress,
    EgressFailure,
    EgressObserver,
    Failure,
    Plan,
    Progress,
    Resolve,
    Stage,
)
from egressd.health import SourceHealth
from egressd.net.dialer import connect
from egressd.net.egress import connect_within, open_within
from egressd.pools import PoolSet

ip = ipaddress.ip_address


def make_egress(
    sources: dict[str, Source],
    *,
    cap: int = 2000,
    timeout: float = 30.0,
    dns: Dnsmasq | None = None,
) -> Egress:
    pool = Pool("p", tuple(PoolEntry(name, 1) for name in sources))
    servers = (Endpoint(dns.host, dns.port),) if dns is not None else ()
    config = Config(
        path=__file__,  # type: ignore[arg-type]
        sources=sources,
        pools={"p": pool},
        limits=LimitSettings(max_connections_per_source=cap),
        dial=DialSettings(timeout=timeout),
        dns=DnsSettings(nameservers=servers),
    )
    return Egress(config, PoolSet.from_config(config), SourceHealth(config.sources))


async def test_dials_in_flight_count_against_the_per_source_cap(nursery: trio.Nursery) -> None:
    greeted = trio.Event()
    release = trio.Event()

    async def silent_proxy(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, 3)  # the SOCKS5 greeting, then nothing until released
        greeted.set()
        await release.wait()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, silent_proxy, listeners)
    proxy = Endpoint("127.0.0.1", listeners[0].socket.getsockname()[1])
    slow = Source(name="slow", socks5_proxy_server=proxy, egressd_socks5_plain_connect=True)
    egress = make_egress({"slow": slow}, cap=1)
    refusals: list[Failure] = []

    async def first_dial() -> None:
        with trio.move_on_after(5):
            await connect_within(Plan(egress, pool="p", host="127.0.0.1", port=25))

    async with trio.open_nursery() as dials:
        dials.start_soon(first_dial)
        with trio.fail_after(5):
            await greeted.wait()
        try:
            await connect_within(Plan(egress, pool="p", host="127.0.0.1", port=25))
        except EgressFailure as exc:
            refusals.append(exc.kind)
        release.set()
        dials.cancel_scope.cancel()
    assert refusals == [Failure.SOURCE_LIMIT]
    assert egress.health.active_connections("slow") == 0


async def test_a_held_slot_counts_the_connection_from_its_dial_until_it_is_released(
    sink: Sink,
) -> None:
    """``hold_slot``: the dial's connection slot stays taken while the connection lives
    (the SOCKS5 and PROXY doors' sessions), so the per-source cap counts it without the
    door taking a second slot, and closing the connection gives it back once."""
    source = Source(name="a", source_address=ip("127.0.0.2"))
    egress = make_egress({"a": source}, cap=1)
    plan = Plan(egress, pool="p", host="127.0.0.1", port=sink.port)
    dialed = await connect_within(plan, hold_slot=True)
    dialed.release = plan.release_connection
    try:
        assert plan.held_slot == "a"
        assert egress.health.active_connections("a") == 1
        with pytest.raises(EgressFailure) as refused:
            await connect_within(Plan(egress, pool="p", host="127.0.0.1", port=sink.port))
        assert refused.value.kind is Failure.SOURCE_LIMIT
    finally:
        dialed.close()
    assert egress.health.active_connections("a") == 0
    dialed.close()  # a second close gives nothing back twice
    assert egress.health.active_connections("a") == 0
    again = await connect_within(Plan(egress, pool="p", host="127.0.0.1", port=sink.port))
    again.close()
    assert egress.health.active_connections("a") == 0  # without hold_slot: given back at once


async def test_an_unplumbed_source_moves_on_to_the_pools_next_source(sink: Sink) -> None:
    egress = make_egress(
        {
            "gone": Source(name="gone", source_address=ip("203.0.113.7")),
            "good": Source(name="good", source_address=ip("127.0.0.2")),
        }
    )
    plan = Plan(egress, pool="p", host="127.0.0.1", port=sink.port)
    dialed = await connect_within(plan)
    async with dialed.stream:
        await sink.wait_for_connections(1)
    assert plan.tried == ["gone", "good"]
    assert dialed.source.name == "good"
    assert sink.peers == ["127.0.0.2"]
    assert egress.health.is_suspended("gone")


async def test_a_per_address_step_moves_on_when_the_server_rejects(sink: Sink) -> None:
    """The SMTP door's shape: connect, then greet; a refusal moves to the next address."""
    source = Source(name="a", source_address=ip("127.0.0.2"))
    egress = make_egress({"a": source})
    seen: list[str] = []

    async def resolve(step: Resolve) -> Sequence[Destination]:
        return [
            Destination(ip("127.0.0.1"), sink.port, "mx1.test"),
            Destination(ip("127.0.0.1"), sink.port, "mx2.test"),
        ]

    async def greet(attempt: Attempt, progress: Progress) -> str:
        dialed = await connect(attempt, progress)
        progress.at(Stage.SESSION)
        async with dialed.stream:
            banner = await receive_exactly(dialed.stream, 5)
        seen.append(f"{attempt.destination.name} {banner.decode()}")
        if attempt.destination.name == "mx1.test":
            raise EgressFailure(
                Failure.REJECTED,
                "greeting was 421",
                source=attempt.source.name,
                stage=Stage.SESSION,
                address=attempt.address,
            )
        return "ready"

    plan = Plan(egress, pool="p")
    assert await open_within(plan, greet, resolve) == "ready"
    assert seen == ["mx1.test 220 s", "mx2.test 220 s"]
    assert [f.kind for f in plan.failures] == [Failure.REJECTED]
    assert not egress.health.is_suspended("a")


async def test_the_dial_latency_is_the_connect_without_the_steps_greeting(
    sink: Sink, autojump_clock: trio.testing.MockClock
) -> None:
    """The SMTP door's step waits for a banner after connecting: that wait is the
    remote's, not the dial's, and stays out of egressd_dial_duration_seconds."""
    source = Source(name="a", source_address=ip("127.0.0.2"))
    egress = make_egress({"a": source})
    latencies: list[float] = []
    egress.observer = EgressObserver(dialed=lambda source, seconds: latencies.append(seconds))

    async def slow_greeting(attempt: Attempt, progress: Progress) -> float:
        dialed = await connect(attempt, progress)
        started = trio.current_time()
        async with dialed.stream:
            await trio.sleep(20)  # the remote takes its time to greet
        return trio.current_time() - started

    plan = Plan(egress, pool="p", host="127.0.0.1", port=sink.port)
    greeting = await open_within(plan, slow_greeting)
    assert greeting >= 20
    assert len(latencies) == 1
    assert latencies[0] < 1


async def test_one_deadline_covers_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    """Two silent addresses: the plan's deadline expires once, not once per address."""
    egress = make_egress({"a": Source(name="a")}, timeout=30)
    starts: list[float] = []

    async def resolve(step: Resolve) -> Sequence[Destination]:
        return [Destination(ip("192.0.2.1"), 25), Destination(ip("192.0.2.2"), 25)]

    async def slow_step(attempt: Attempt, progress: Progress) -> None:
        starts.append(trio.current_time())
        await trio.sleep(20)
        raise EgressFailure(
            Failure.TIMEOUT, "slow", source="a", stage=Stage.CONNECT, address=attempt.address
        )

    plan = Plan(egress, pool="p")
    began = trio.current_time()
    with pytest.raises(EgressFailure) as caught:
        await open_within(plan, slow_step, resolve)
    assert trio.current_time() - began == pytest.approx(30)
    assert [s - began for s in starts] == pytest.approx([0, 20])
    failure = caught.value
    assert failure.kind is Failure.TIMEOUT
    assert failure.stage is Stage.CONNECT
    assert failure.address == (ip("192.0.2.2"), 25)
    assert "no result within 30s while connecting to 192.0.2.2:25" in str(failure)
    assert egress.health.active_connections("a") == 0


async def test_a_name_that_resolves_into_the_deny_list_is_never_dialed() -> None:
    with dnsmasq(hosts={"inside.test": ["127.0.0.1"]}) as server:
        egress = make_egress({"a": Source(name="a")}, dns=server)
        access = egress.config.access
        plan = Plan(egress, pool="p", host="inside.test", port=25, access=access)
        with pytest.raises(EgressFailure) as caught:
            await connect_within(plan)
    assert caught.value.kind is Failure.DENIED
    assert str(caught.value).startswith("inside.test resolves to a denied address")
    assert plan.tried == ["a"]  # the source was chosen; its dial never happened
    assert egress.health.active_connections("a") == 0
