"""DANE's pure parts (RFC 7672): which domains look for it, a DANE host's policy and tries."""

from __future__ import annotations

import pytest

from egressd.tlspolicy import TlsPolicy, configured_policy, tries
from egressd.tlspolicy.choice import Connected, accepts, dane_policy, wants_dane
from egressd.tlspolicy.dane import DaneHost, describe_records, tlsa_name
from egressd.tlspolicy.tlsa import Tlsa

EE = Tlsa(3, 1, 1, bytes(range(32)))
TA = Tlsa(2, 0, 1, bytes(32))
PKIX = Tlsa(1, 1, 1, bytes(32))


@pytest.mark.parametrize(
    ("dane", "override", "expected"),
    [
        (False, None, False),
        (True, None, True),
        (False, "dane", True),
        (True, "dane", True),
        (True, "may", False),  # the operator's word for the domain: no DANE there
        (True, "verify", False),
    ],
)
def test_which_domains_look_for_dane(dane: bool, override: str | None, expected: bool) -> None:
    assert wants_dane(dane, override) is expected


def test_the_override_dane_is_opportunistic_for_hosts_without_dane() -> None:
    assert configured_policy("disabled", False, "dane").label == "opportunistic"


def test_a_dane_host_requires_tls_and_checks_its_records() -> None:
    host = DaneHost("MX.Example.test.", "dane", (EE, PKIX))
    policy = dane_policy(host)
    assert (policy.label, policy.required, policy.verify, policy.tlsa) == (
        "dane",
        True,
        False,  # no PKIX check: the TLSA records decide (RFC 7672 section 3.1.1)
        (EE, PKIX),
    )
    [only] = tries(policy)
    assert (only.starttls, only.required, only.dane, only.tlsa) == (True, True, True, (EE, PKIX))
    assert policy.origin == (
        "DANE TLSA records of _25._tcp.mx.example.test (3 1 1 00010203..., 1 1 1 00000000...)"
    )
    assert policy.allows_mx("anything.test")


def test_usable_means_dane_ee_while_python_gives_no_chain() -> None:
    assert DaneHost("mx.test", "dane", (EE,)).usable
    assert not DaneHost("mx.test", "dane", (TA, PKIX)).usable
    assert not DaneHost("mx.test", "dane", (Tlsa(3, 1, 9, b"x"),)).usable


def test_names_and_descriptions() -> None:
    assert tlsa_name("Mx.Example.COM.") == "_25._tcp.mx.example.com"
    assert tlsa_name("mx.example.com", 587) == "_587._tcp.mx.example.com"
    assert describe_records([Tlsa(3, 0, 0, b"\x01\x02")]) == "3 0 0 0102"
    none = DaneHost("mx.test", "none", why="no TLSA records")
    assert none.describe() == "no DANE for mx.test: no TLSA records"


# --------------------------------------------------------------------------- sharing


STS = TlsPolicy("mta-sts enforce", required=True, verify=True, mx=("mx.a.test",), origin="x")
PLAIN = configured_policy("opportunistic", False)
DANE_MX = {"mx.a.test": DaneHost("mx.a.test", "dane", (EE,))}
HOSTS = {"mx.a.test"}


@pytest.mark.parametrize(
    ("connected", "policy", "dane", "expected"),
    [
        # a connection opened without a policy fits a domain that asks for nothing
        (Connected("mx.a.test", "opportunistic", "plaintext", False), PLAIN, {}, True),
        # ... but not MTA-STS enforce, nor DANE, nor encrypt
        (Connected("mx.a.test", "opportunistic", "encrypted", True), STS, {}, False),
        (Connected("mx.a.test", "opportunistic", "encrypted", True), PLAIN, DANE_MX, False),
        (
            Connected("mx.a.test", "opportunistic", "plaintext", False),
            configured_policy("required", False),
            {},
            False,
        ),
        (
            Connected("mx.a.test", "opportunistic", "encrypted", True),
            configured_policy("required", False),
            {},
            True,
        ),
        # verified for the MX name under verify or enforce: fits enforce naming that MX
        (Connected("mx.a.test", "verify", "verified", True), STS, {}, True),
        (Connected("mx.a.test", "mta-sts enforce", "verified", True), STS, {}, True),
        # DANE-verified is not PKIX-verified (no name check), and the reverse
        (Connected("mx.a.test", "dane", "verified", True), STS, {}, False),
        (Connected("mx.a.test", "mta-sts enforce", "verified", True), PLAIN, DANE_MX, False),
        (Connected("mx.a.test", "dane", "verified", True), PLAIN, DANE_MX, True),
        # a failed DANE look-up for the host: never
        (
            Connected("mx.a.test", "dane", "verified", True),
            PLAIN,
            {"mx.a.test": DaneHost("mx.a.test", "failed", why="SERVFAIL")},
            False,
        ),
    ],
)
def test_which_connections_another_domain_may_use(
    connected: Connected, policy: TlsPolicy, dane: dict[str, DaneHost], expected: bool
) -> None:
    assert accepts(connected, HOSTS, policy, dane) is expected


def test_a_connection_shared_by_address_only_fits_only_a_domain_asking_nothing() -> None:
    verified = Connected("mx.other.test", "mta-sts enforce", "verified", True)
    assert accepts(verified, HOSTS, PLAIN, {})
    assert not accepts(verified, HOSTS, STS, {})
    assert not accepts(verified, HOSTS, PLAIN, DANE_MX)
    no_dane = {"mx.a.test": DaneHost("mx.a.test", "none", why="no TLSA records")}
    assert accepts(verified, HOSTS, PLAIN, no_dane)


def test_an_mx_outside_the_mta_sts_patterns_never_fits() -> None:
    verified = Connected("mx.b.test", "verify", "verified", True)
    assert not accepts(verified, {"mx.a.test", "mx.b.test"}, STS, {})
