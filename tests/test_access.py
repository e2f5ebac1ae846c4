"""Access rules: the default deny list and IPv4 addresses embedded in IPv6 destinations."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.access import client_refusal, destination_refusal, embedded_ipv4
from egressd.config import AccessSettings

DEFAULT = AccessSettings()
ONLY_TEN = AccessSettings(deny_destinations=(ipaddress.ip_network("10.0.0.0/8"),))


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("64:ff9b::a00:1", ["10.0.0.1"]),
        ("64:ff9b::808:808", ["8.8.8.8"]),
        ("64:ff9b:1::a00:1", ["10.0.0.1", "0.0.0.0"]),
        ("64:ff9b:1:a00:0:100::", ["0.0.0.0", "10.0.0.1"]),  # RFC 6052 /48 layout, u = 0
        ("2002:a00:1::1", ["10.0.0.1"]),
        ("::a00:1", ["10.0.0.1"]),
        ("::ffff:0:a00:1", ["10.0.0.1"]),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", ["65.54.227.120", "10.0.0.1"]),  # Teredo
        ("2a00:1450::1", []),
        ("100::1", []),
    ],
)
def test_embedded_ipv4(address: str, embedded: list[str]) -> None:
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert [str(a) for a in found] == embedded


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a00:1",
        "64:ff9b:1::a00:1",
        "64:ff9b:1:a00:0:100::",
        "2002:a00:1::1",
        "::a00:1",
        "::ffff:0:a00:1",
        "::ffff:10.0.0.1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
)
def test_an_embedded_denied_ipv4_is_refused_and_named(address: str) -> None:
    refusal = destination_refusal(ONLY_TEN, address, 25)
    assert refusal is not None
    assert "10.0.0.1" in refusal and "access.deny_destinations (10.0.0.0/8)" in refusal


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:0:808:808", "2a00:1450::1"]
)
def test_an_embedded_global_ipv4_is_allowed(address: str) -> None:
    assert destination_refusal(DEFAULT, address, 25) is None


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("198.18.0.1", "198.18.0.0/15"),
        ("198.19.255.254", "198.18.0.0/15"),
        ("192.0.0.8", "192.0.0.0/24"),
        ("255.255.255.255", "240.0.0.0/4"),
        ("100::1", "100::/64"),
        ("64:ff9b:1::808:808", "64:ff9b:1::/48"),
        ("2001:2::1", "2001::/23"),
        ("3fff::1", "3fff::/20"),
        ("fec0::1", "fec0::/10"),
        ("64:ff9b::7f00:1", "127.0.0.0/8"),
    ],
)
def test_default_denies_non_global_ranges(address: str, network: str) -> None:
    refusal = destination_refusal(DEFAULT, address, 25)
    assert refusal is not None and f"({network})" in refusal


@given(st.ip_addresses())
def test_default_denies_every_address_python_calls_not_global(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    refusal = destination_refusal(DEFAULT, address, 25)
    if not address.is_global or address.is_multicast:
        assert refusal is not None
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else ()
    if any(not inner.is_global for inner in embedded):
        assert refusal is not None


def test_an_operator_list_replaces_the_default() -> None:
    allow_all = AccessSettings(deny_destinations=())
    assert destination_refusal(allow_all, "198.18.0.1", 25) is None
    assert destination_refusal(allow_all, "64:ff9b::a00:1", 25) is None


def test_clients_and_ports() -> None:
    assert client_refusal(DEFAULT, "127.0.0.1") is None
    assert client_refusal(DEFAULT, "::ffff:127.0.0.1") is None
    assert client_refusal(DEFAULT, "192.0.2.1") == "client 192.0.2.1 is not in access.clients"
    assert destination_refusal(DEFAULT, "8.8.8.8", 22) == (
        "port 22 is not in access.destination_ports"
    )


def test_a_reloaded_client_list_decides_for_an_address_seen_before() -> None:
    """The verdict on a client address is remembered per configuration: a reload that
    admits (or drops) a network changes the answer for an address asked about before."""
    narrow = AccessSettings(clients=(ipaddress.ip_network("127.0.0.0/8"),))
    wide = AccessSettings(
        clients=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"))
    )
    for _ in range(2):  # the second round answers from what was remembered
        assert client_refusal(narrow, "192.0.2.7") == "client 192.0.2.7 is not in access.clients"
        assert client_refusal(wide, "192.0.2.7") is None
        assert client_refusal(narrow, "127.0.0.1") is None
        assert client_refusal(narrow, "not an address") == (
            "client not an address is not an IP address"
        )


def test_remembered_client_verdicts_are_bounded() -> None:
    """A scan from many addresses cannot grow the remembered verdicts without bound, and
    the answers stay right after they are forgotten."""
    from egressd import access

    settings = AccessSettings(clients=(ipaddress.ip_network("10.0.0.0/8"),))
    for number in range(access._CLIENT_VERDICTS + 10):
        client = str(ipaddress.IPv4Address(0x0A000000 + number))
        assert client_refusal(settings, client) is None
    assert len(access._client_verdicts(settings.clients)) <= access._CLIENT_VERDICTS
    assert client_refusal(settings, "10.0.0.1") is None
    assert client_refusal(settings, "192.0.2.1") == "client 192.0.2.1 is not in access.clients"
