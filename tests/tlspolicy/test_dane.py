"""DANE's pure parts (RFC 7672): which domains look for it, a DANE host's policy and tries."""

from __future__ import annotations

import pytest

from egressd.tlspolicy import configured_policy, tries
from egressd.tlspolicy.choice import dane_policy, wants_dane
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
