"""Egress: selection around health and limits, against real sockets on loopback."""

from __future__ import annotations

import trio
from harness import receive_exactly

from egressd.config import Config, Endpoint, LimitSettings, Pool, PoolEntry, Source
from egressd.health import SourceHealth
from egressd.net.egress import Egress, EgressRefused
from egressd.pools import PoolSet


def egress_for(hop_port: int) -> Egress:
    source = Source(
        name="slow",
        socks5_proxy_server=Endpoint("127.0.0.1", hop_port),
        socks5_proxy_source_address=None,
    )
    pool = Pool("p", (PoolEntry("slow", 1),))
    config = Config(
        path=__file__,  # type: ignore[arg-type]
        sources={"slow": source},
        pools={"p": pool},
        limits=LimitSettings(max_connections_per_source=1),
    )
    return Egress(config, PoolSet.from_config(config), SourceHealth(config.sources))


async def test_dials_in_flight_count_against_the_per_source_cap(nursery: trio.Nursery) -> None:
    greeted = trio.Event()
    release = trio.Event()

    async def silent_hop(stream: trio.SocketStream) -> None:
        await receive_exactly(stream, 3)  # the SOCKS5 greeting, then nothing until released
        greeted.set()
        await release.wait()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, silent_hop, listeners)
    egress = egress_for(listeners[0].socket.getsockname()[1])
    refusals: list[str] = []

    async def first_dial() -> None:
        with trio.move_on_after(5):
            await egress.connect("127.0.0.1", 25, pool="p")

    async with trio.open_nursery() as dials:
        dials.start_soon(first_dial)
        with trio.fail_after(5):
            await greeted.wait()
        try:
            await egress.connect("127.0.0.1", 25, pool="p")
        except EgressRefused as exc:
            refusals.append(exc.kind)
        release.set()
        dials.cancel_scope.cancel()
    assert refusals == ["source_limit"]
    assert egress.health.active_connections("slow") == 0
