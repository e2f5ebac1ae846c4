"""egressd.net.mx against a real dnsmasq on loopback: MX order, implicit MX, null MX, failures."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rrset
import pytest
import trio
from smtp_harness import Dnsmasq, dnsmasq

from egressd.config import Config, DnsSettings, Endpoint, SmtpSettings
from egressd.net.mx import NextHop, NextHopError, NextHopProblem, resolve_next_hop, resolver_for

pytestmark = pytest.mark.integration

ip = ipaddress.ip_address


@pytest.fixture(scope="module")
def dns_server() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[
            ("good.test", "mx2.good.test", 20),
            ("good.test", "mx1.good.test", 10),
            ("v6only.test", "mx.v6only.test", 10),
            ("dangling.test", "missing.good.test", 10),
            ("alias.test", "mx1.good.test", 5),
        ],
        hosts={
            "mx1.good.test": ["127.0.0.5"],
            "mx2.good.test": ["127.0.0.6", "::1"],
            "mx.v6only.test": ["::1"],
            "implicit.test": ["127.0.0.7"],
            "smarthost.test": ["127.0.0.8"],
        },
        null_mx=["nullmx.test"],
    ) as server:
        yield server


def config_for(server: Dnsmasq | None, *, routes: dict[str, str] | None = None) -> Config:
    nameservers = (Endpoint(server.host, server.port),) if server else ()
    parsed = {}
    for domain, target in (routes or {}).items():
        host, _, port = target.partition(":")
        parsed[domain] = Endpoint(host, int(port or 25))
    return Config(
        path=Path("egressd.toml"),
        sources={},
        pools={},
        dns=DnsSettings(nameservers=nameservers, timeout=2.0),
        smtp=SmtpSettings(routes=parsed),
    )


async def failure(domain: str, config: Config, version: int | None = 4) -> NextHopError:
    with pytest.raises(NextHopError) as caught:
        await resolve_next_hop(domain, config, version)
    return caught.value


async def test_mx_hosts_come_in_preference_order_with_their_addresses(
    dns_server: Dnsmasq,
) -> None:
    hop = await resolve_next_hop("Good.Test.", config_for(dns_server), None)
    assert hop.kind == "mx"
    assert [(h.name, h.preference) for h in hop.hosts] == [
        ("mx1.good.test", 10),
        ("mx2.good.test", 20),
    ]
    assert hop.hosts[0].addresses == (ip("127.0.0.5"),)
    assert set(hop.hosts[1].addresses) == {ip("127.0.0.6"), ip("::1")}
    assert all(h.port == 25 for h in hop.hosts)


async def test_addresses_are_filtered_by_the_source_family(dns_server: Dnsmasq) -> None:
    v6 = await resolve_next_hop("good.test", config_for(dns_server), 6)
    assert [(h.name, h.addresses) for h in v6.hosts] == [("mx2.good.test", (ip("::1"),))]
    v4 = await resolve_next_hop("good.test", config_for(dns_server), 4)
    assert [a for h in v4.hosts for a in h.addresses] == [ip("127.0.0.5"), ip("127.0.0.6")]


async def test_a_domain_without_mx_is_its_own_implicit_mx(dns_server: Dnsmasq) -> None:
    hop = await resolve_next_hop("implicit.test", config_for(dns_server), 4)
    assert hop.kind == "implicit"
    assert [(h.name, h.addresses) for h in hop.hosts] == [("implicit.test", (ip("127.0.0.7"),))]


async def test_null_mx_is_permanent(dns_server: Dnsmasq) -> None:
    error = await failure("nullmx.test", config_for(dns_server))
    assert error.kind is NextHopProblem.NULL_MX and error.kind.permanent
    assert "null MX" in error.text


async def test_nxdomain_is_permanent(dns_server: Dnsmasq) -> None:
    error = await failure("nowhere.test", config_for(dns_server))
    assert error.kind is NextHopProblem.NO_SUCH_DOMAIN and error.kind.permanent
    assert "nowhere.test" in error.text


async def test_a_refusing_or_failing_server_is_a_temporary_dns_failure(
    dns_server: Dnsmasq,
) -> None:
    error = await failure("example.org", config_for(dns_server))  # dnsmasq: REFUSED
    assert error.kind is NextHopProblem.DNS_FAILURE
    assert not error.kind.permanent


async def test_a_silent_name_server_is_a_temporary_dns_failure() -> None:
    silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with silent:
        await silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        config = Config(
            path=Path("egressd.toml"),
            sources={},
            pools={},
            dns=DnsSettings(nameservers=(Endpoint("127.0.0.1", port),), timeout=0.3),
        )
        error = await failure("good.test", config)
    assert error.kind is NextHopProblem.DNS_FAILURE
    assert "timed out" in error.text


async def test_mx_hosts_without_an_address_of_the_family_are_no_address(
    dns_server: Dnsmasq,
) -> None:
    error = await failure("v6only.test", config_for(dns_server), 4)
    assert error.kind is NextHopProblem.NO_ADDRESS and not error.kind.permanent
    assert "mx.v6only.test" in error.text
    dangling = await failure("dangling.test", config_for(dns_server), 4)
    assert dangling.kind is NextHopProblem.NO_ADDRESS


async def test_routes_win_over_mx_and_star_matches_every_domain(dns_server: Dnsmasq) -> None:
    config = config_for(
        dns_server, routes={"good.test": "127.0.0.9:2525", "*": "smarthost.test:587"}
    )
    exact = await resolve_next_hop("good.test", config, 4)
    assert exact.kind == "route"
    assert [(h.addresses, h.port) for h in exact.hosts] == [((ip("127.0.0.9"),), 2525)]
    star = await resolve_next_hop("nowhere.test", config, 4)
    assert [(h.name, h.addresses, h.port) for h in star.hosts] == [
        ("smarthost.test", (ip("127.0.0.8"),), 587)
    ]


async def test_a_domain_literal_is_its_own_host() -> None:
    hop = await resolve_next_hop("[127.0.0.9]", config_for(None), 4)
    assert [(h.addresses, h.port) for h in hop.hosts] == [((ip("127.0.0.9"),), 25)]
    v6 = await resolve_next_hop("[IPv6:::1]", config_for(None), 6)
    assert v6.hosts[0].addresses == (ip("::1"),)
    error = await failure("[IPv6:::1]", config_for(None), 4)
    assert error.kind is NextHopProblem.NO_ADDRESS


async def test_domains_share_a_next_hop_when_their_hosts_or_best_address_match(
    dns_server: Dnsmasq,
) -> None:
    config = config_for(dns_server)
    good: NextHop = await resolve_next_hop("good.test", config, 4)
    alias = await resolve_next_hop("alias.test", config, 4)
    implicit = await resolve_next_hop("implicit.test", config, 4)
    connected = (ip("127.0.0.5"), 25)
    assert good.same_destination(good, connected)
    assert good.same_destination(alias, connected)  # other MX name, same best address
    assert not good.same_destination(implicit, connected)


def test_mx_hosts_of_equal_preference_come_in_random_order() -> None:
    import random

    from egressd.net.mx import order_by_preference

    records = [(20, "backup.test"), (10, "a.test"), (10, "b.test")]
    orders = {tuple(order_by_preference(records, random.Random(seed))) for seed in range(32)}
    assert orders == {
        ((10, "a.test"), (10, "b.test"), (20, "backup.test")),
        ((10, "b.test"), (10, "a.test"), (20, "backup.test")),
    }


async def _answer_with_ttl(server: trio.socket.SocketType, ttl: int, asked: list[str]) -> None:
    """A one-zone name server: every A question gets 127.0.0.9 with ``ttl``; counts them."""
    while True:
        data, peer = await server.recvfrom(4096)
        query = dns.message.from_wire(data)
        question = query.question[0]
        asked.append(question.name.to_text())
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", "A", "127.0.0.9"))
        await server.sendto(response.to_wire(), peer)


@pytest.mark.parametrize(("ttl", "queries"), [(300, 1), (0, 2)])
async def test_answers_are_cached_for_their_ttl(ttl: int, queries: int) -> None:
    """Issue 11: DNS answers are cached (dnspython's cache), for their TTL and no longer."""
    asked: list[str] = []
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as server:
        await server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        settings = DnsSettings(nameservers=(Endpoint("127.0.0.1", port),), timeout=5.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_with_ttl, server, ttl, asked)
            resolver = resolver_for(settings)
            for _ in range(2):
                answer = await resolver.resolve(f"cached-{ttl}.test", "A")
                assert [rdata.to_text() for rdata in answer] == ["127.0.0.9"]
            nursery.cancel_scope.cancel()
    assert asked == [f"cached-{ttl}.test."] * queries
