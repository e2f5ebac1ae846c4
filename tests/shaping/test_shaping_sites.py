"""Site names (KumoMTA's factor_names cases) and provider matching, without DNS."""

from __future__ import annotations

import ipaddress

import pytest

from egressd.shaping.sites import (
    Destination,
    ProviderMatch,
    factor_names,
    order_mx,
    provider_matches,
    proxy_destination,
    site_name,
    smtp_destination,
)


@pytest.mark.parametrize(
    ("hosts", "site"),
    [
        (
            ["mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net", "mta7.am0.yahoodns.net"],
            "(mta5|mta6|mta7).am0.yahoodns.net",
        ),
        (
            ["mta5.AM0.yahoodns.net", "mta6.am0.yAHOodns.net", "mta7.am0.yahoodns.net"],
            "(mta5|mta6|mta7).am0.yahoodns.net",
        ),
        (
            [
                "gmail-smtp-in.l.google.com",
                "alt1.gmail-smtp-in.l.google.com",
                "alt2.gmail-smtp-in.l.google.com",
                "alt3.gmail-smtp-in.l.google.com",
                "alt4.gmail-smtp-in.l.google.com",
            ],
            "(alt1|alt2|alt3|alt4)?.gmail-smtp-in.l.google.com",
        ),
        (
            [
                "example-com.mail.protection.outlook.com.",
                "mx-biz.mail.am0.yahoodns.net.",
                "mx-biz.mail.am0.yahoodns.net.",
            ],
            "(example-com|mx-biz).mail.(protection|am0).(outlook|yahoodns).(com|net)",
        ),
        (
            [
                "mx-biz.mail.am0.yahoodns.net.",
                "mx-biz.mail.am0.yahoodns.net.",
                "example-com.mail.protection.outlook.com.",
            ],
            "(mx-biz|example-com).mail.(am0|protection).(yahoodns|outlook).(net|com)",
        ),
        (["mx.example.net"], "mx.example.net"),
        (["."], ""),
        ([], ""),
    ],
)
def test_factor_names_matches_kumomta(hosts: list[str], site: str) -> None:
    assert factor_names(hosts) == site


def test_site_orders_by_preference_then_name() -> None:
    records = [(20, "b.mx.example.net"), (10, "Z.mx.example.net."), (10, "a.mx.example.net")]
    assert order_mx(records) == ("a.mx.example.net", "z.mx.example.net", "b.mx.example.net")
    assert site_name(records) == "(a|z|b).mx.example.net"
    # the same hosts in another DNS answer order make the same site
    assert site_name(list(reversed(records))) == site_name(records)


def test_null_mx_has_the_empty_site() -> None:
    assert site_name([(0, ".")]) == ""


GOOGLE = [ProviderMatch("MXSuffix", ".google.com"), ProviderMatch("MXSuffix", ".googlemail.com")]


def test_every_mx_host_must_match() -> None:
    both = Destination("s", "example.org", ("aspmx.l.google.com", "alt1.aspmx.l.googlemail.com"))
    mixed = Destination("s", "example.org", ("aspmx.l.google.com", "mx.other.net"))
    assert provider_matches(GOOGLE, both) is not None
    assert "every MX host" in (provider_matches(GOOGLE, both) or "")
    assert provider_matches(GOOGLE, mixed) is None


def test_mx_rules_need_mx_hosts() -> None:
    assert provider_matches(GOOGLE, Destination("s", "gmail.com")) is None


def test_domain_suffix_needs_no_dns() -> None:
    outlook = [ProviderMatch("DomainSuffix", ".outlook.com")]
    assert provider_matches(outlook, Destination("s", "eu.outlook.com")) is not None
    # KumoMTA: ".outlook.com" is not a suffix of "outlook.com"
    assert provider_matches(outlook, Destination("s", "outlook.com")) is None
    assert provider_matches(outlook, Destination("s", "EU.Outlook.COM.")) is not None
    assert provider_matches(outlook, Destination("s")) is None


def test_host_name_is_exact_and_ignores_the_trailing_dot() -> None:
    yahoo = [ProviderMatch("HostName", "mta5.am0.yahoodns.net")]
    assert provider_matches(yahoo, Destination("s", "y", ("mta5.am0.yahoodns.net.",)))
    assert not provider_matches(yahoo, Destination("s", "y", ("xmta5.am0.yahoodns.net",)))


def test_network_matches_addresses_only_destinations() -> None:
    net = [ProviderMatch("Network", "192.0.2.0/24")]
    inside = Destination("192.0.2.7", address=ipaddress.ip_address("192.0.2.7"))
    outside = Destination("198.51.100.1", address=ipaddress.ip_address("198.51.100.1"))
    assert "is in 192.0.2.0/24" in (provider_matches(net, inside) or "")
    assert provider_matches(net, outside) is None


@pytest.mark.parametrize(
    ("match", "dead"),
    [
        (ProviderMatch("MXSuffix", ".barracudanetworks.com."), "ends with a dot"),
        (ProviderMatch("DomainSuffix", ".Example.com"), "capitals"),
        (ProviderMatch("HostName", ""), "empty"),
        (ProviderMatch("MXSuffix", ".google.com"), None),
        (ProviderMatch("Network", "10.0.0.0/8"), None),
    ],
)
def test_dead_match_entries_are_recognised(match: ProviderMatch, dead: str | None) -> None:
    reason = match.dead_reason()
    if dead is None:
        assert reason is None
    else:
        assert reason is not None and dead in reason


def test_a_trailing_dot_suffix_really_never_matches() -> None:
    dotted = [ProviderMatch("MXSuffix", ".kpnmail.nl.")]
    for host in ("mx1.kpnmail.nl", "mx1.kpnmail.nl."):
        assert provider_matches(dotted, Destination("s", "kpn.com", (host,))) is None


def test_door_destinations() -> None:
    smtp = smtp_destination(
        "Gmail.COM", [(10, "alt1.gmail-smtp-in.l.google.com."), (5, "gmail-smtp-in.l.google.com")]
    )
    assert smtp == Destination(
        "alt1?.gmail-smtp-in.l.google.com",
        "gmail.com",
        ("gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"),
    )
    address = ipaddress.ip_address("192.0.2.25")
    named = proxy_destination(address, "MX1.Example.NET.")
    assert named == Destination("mx1.example.net", None, ("mx1.example.net",), address)
    assert provider_matches([ProviderMatch("HostName", "mx1.example.net")], named)
    assert proxy_destination(address) == Destination("192.0.2.25", None, (), address)
