"""NextHopCache: next hops kept between messages for their DNS TTL, equal-preference MX
hosts reordered on every use, everything dropped when the configuration changes.

A one-zone name server on loopback answers from :class:`Zone` (its records and TTLs can
change between look-ups) and counts the questions; dnspython's own answer cache is flushed
where a test must see whether the next-hop cache asked again.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing

import egressd.net.mx as mx
from egressd.config import Config, DnsSettings, Endpoint, SmtpSettings
from egressd.net.mx import NextHopCache, NextHopError, resolver_for

ip = ipaddress.ip_address


@dataclass
class Zone:
    """``records[(name, type)] = (ttl, [rdata text...])``; other names are NXDOMAIN."""

    records: dict[tuple[str, str], tuple[int, list[str]]] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        kind = dns.rdatatype.to_text(question.rdtype)
        self.asked.append((name, kind))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        found = self.records.get((name, kind))
        if found is None:
            if not any(key[0] == name for key in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        ttl, rdatas = found
        response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", kind, rdatas))
        return response


async def serve(server: trio.socket.SocketType, zone: Zone) -> None:
    while True:
        data, peer = await server.recvfrom(4096)
        await server.sendto(zone.answer(dns.message.from_wire(data)).to_wire(), peer)


@pytest.fixture
async def zone(nursery: trio.Nursery) -> AsyncIterator[tuple[Zone, Config]]:
    """The zone, and a configuration whose ``[dns]`` asks its name server."""
    zone = Zone()
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as server:
        await server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        nursery.start_soon(serve, server, zone)
        settings = DnsSettings(nameservers=(Endpoint("127.0.0.1", port),), timeout=5.0)
        config = Config(path=Path("egressd.toml"), sources={}, pools={}, dns=settings)
        yield zone, config
        resolver_for(settings).cache.flush()


def forget_dns_answers(config: Config) -> None:
    """Empty dnspython's cache, so that only the next-hop cache can answer without asking."""
    resolver_for(config.dns).cache.flush()


async def test_a_next_hop_is_kept_as_long_as_its_shortest_ttl(
    zone: tuple[Zone, Config], autojump_clock: trio.testing.MockClock
) -> None:
    records, config = zone
    records.records[("kept.test", "MX")] = (300, ["10 mx.kept.test."])
    records.records[("mx.kept.test", "A")] = (60, ["127.0.0.10"])
    cache = NextHopCache()
    first = await cache.resolve("Kept.Test.", config, 4)
    assert first.hosts[0].addresses == (ip("127.0.0.10"),)
    assert records.asked == [("kept.test", "MX"), ("mx.kept.test", "A")]
    forget_dns_answers(config)
    records.records[("mx.kept.test", "A")] = (60, ["127.0.0.11"])
    await trio.sleep(59)
    assert await cache.resolve("kept.test", config, 4) is first  # no question asked
    assert len(records.asked) == 2
    await trio.sleep(2)  # the A record's 60 s are over (the MX's 300 s are not)
    again = await cache.resolve("kept.test", config, 4)
    assert again.hosts[0].addresses == (ip("127.0.0.11"),)
    assert records.asked[2:] == [("kept.test", "MX"), ("mx.kept.test", "A")]
    records.records[("mx.kept.test", "AAAA")] = (60, ["::1"])
    v6 = await cache.resolve("kept.test", config, 6)  # kept per IP version
    assert v6.hosts[0].addresses == (ip("::1"),)
    assert await cache.resolve("kept.test", config, 4) is again


async def test_answers_without_ttl_and_failures_are_not_kept(
    zone: tuple[Zone, Config], autojump_clock: trio.testing.MockClock
) -> None:
    records, config = zone
    cache = NextHopCache()
    with pytest.raises(NextHopError):
        await cache.resolve("late.test", config, 4)  # NXDOMAIN
    forget_dns_answers(config)
    records.records[("late.test", "MX")] = (0, ["10 mx.late.test."])
    records.records[("mx.late.test", "A")] = (0, ["127.0.0.12"])
    first = await cache.resolve("late.test", config, 4)
    assert first.hosts[0].addresses == (ip("127.0.0.12"),)
    second = await cache.resolve("late.test", config, 4)
    assert second == first and second is not first
    assert records.asked.count(("late.test", "MX")) == 3


async def test_mx_hosts_of_equal_preference_are_reordered_on_every_use(
    zone: tuple[Zone, Config],
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RFC 5321 5.1: the order among hosts of equal preference is random for each
    delivery, not fixed for the life of the cached answer."""
    monkeypatch.setattr(mx, "MX_SHUFFLE", random.Random(5))
    records, config = zone
    records.records[("spread.test", "MX")] = (
        300,
        ["10 a.spread.test.", "10 b.spread.test.", "20 backup.spread.test."],
    )
    for number, host in enumerate(("a", "b", "backup")):
        records.records[(f"{host}.spread.test", "A")] = (300, [f"127.0.0.{20 + number}"])
    cache = NextHopCache()
    await cache.resolve("spread.test", config, 4)
    asked = len(records.asked)
    forget_dns_answers(config)
    orders = set()
    for _ in range(32):
        hop = await cache.resolve("spread.test", config, 4)
        orders.add(tuple(host.name for host in hop.hosts))
    assert orders == {
        ("a.spread.test", "b.spread.test", "backup.spread.test"),
        ("b.spread.test", "a.spread.test", "backup.spread.test"),
    }
    assert len(records.asked) == asked  # all from the one answer


async def test_a_new_configuration_drops_every_next_hop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(
        path=Path("egressd.toml"),
        sources={},
        pools={},
        smtp=SmtpSettings(routes={"*": Endpoint("127.0.0.1", 2526)}),
    )
    cache = NextHopCache()
    first = await cache.resolve("routed.test", config, 4)
    assert await cache.resolve("routed.test", config, 4) is first  # a route has no TTL
    await trio.sleep(86400)
    assert await cache.resolve("routed.test", config, 4) is first
    moved = replace(config, smtp=SmtpSettings(routes={"*": Endpoint("127.0.0.2", 2526)}))
    hop = await cache.resolve("routed.test", moved, 4)
    assert [(h.addresses, h.port) for h in hop.hosts] == [((ip("127.0.0.2"),), 2526)]
    reloaded = replace(moved)  # a reload of the same file: equal, yet a new generation
    again = await cache.resolve("routed.test", reloaded, 4)
    assert again == hop and again is not hop


async def test_the_cache_holds_at_most_its_size_dropping_the_oldest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(path=Path("egressd.toml"), sources={}, pools={})
    cache = NextHopCache(size=2)
    first = await cache.resolve("[127.0.0.1]", config, 4)
    second = await cache.resolve("[127.0.0.2]", config, 4)
    await cache.resolve("[127.0.0.3]", config, 4)
    assert await cache.resolve("[127.0.0.2]", config, 4) is second
    assert await cache.resolve("[127.0.0.1]", config, 4) is not first


async def test_a_next_hop_missing_a_host_is_not_kept(
    zone: tuple[Zone, Config], autojump_clock: trio.testing.MockClock
) -> None:
    """An MX host whose address look-up failed is left out of the next hop; kept, the
    next hop would leave it out for the MX record's whole TTL."""
    records, config = zone
    records.records[("half.test", "MX")] = (300, ["10 up.half.test.", "20 down.half.test."])
    records.records[("up.half.test", "A")] = (300, ["127.0.0.30"])
    cache = NextHopCache()
    first = await cache.resolve("half.test", config, 4)
    assert [host.name for host in first.hosts] == ["up.half.test"]
    records.records[("down.half.test", "A")] = (300, ["127.0.0.31"])
    forget_dns_answers(config)
    again = await cache.resolve("half.test", config, 4)
    assert [host.name for host in again.hosts] == ["up.half.test", "down.half.test"]
