"""TLSA matching (RFC 7672) on certificates generated in the test."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme

from egressd.tlspolicy.tlsa import Tlsa, match_tlsa, selected


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


@pytest.fixture(scope="module")
def certs() -> tuple[bytes, bytes, bytes]:
    """(leaf, its CA, another leaf of another CA), DER."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.test")
    other = trustme.CA().issue_cert("mx.example.test")
    return (
        der(leaf.cert_chain_pems[0].bytes()),
        der(ca.cert_pem.bytes()),
        der(other.cert_chain_pems[0].bytes()),
    )


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_by_each_selector_and_digest(
    certs: tuple[bytes, bytes, bytes], selector: int, mtype: int
) -> None:
    leaf, _ca, other = certs
    data = selected(leaf, selector)
    data = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]
    assert match_tlsa([Tlsa(3, selector, mtype, data)], leaf) == "match"
    assert match_tlsa([Tlsa(3, selector, mtype, data)], other) == "mismatch"


def test_spki_differs_from_the_full_certificate(certs: tuple[bytes, bytes, bytes]) -> None:
    leaf, _, _ = certs
    assert selected(leaf, 1) != leaf and selected(leaf, 1) in leaf


def test_dane_ta_needs_the_chain(certs: tuple[bytes, bytes, bytes]) -> None:
    leaf, ca, other = certs
    record = Tlsa(2, 1, 1, hashlib.sha256(selected(ca, 1)).digest())
    assert match_tlsa([record], leaf) == "unusable"  # Python < 3.13: the leaf only
    assert match_tlsa([record], leaf, [leaf, ca]) == "match"
    assert match_tlsa([record], other, [other]) == "mismatch"
    # the anchor must be above the leaf: a DANE-TA record naming the leaf does not match
    assert match_tlsa([Tlsa(2, 0, 0, leaf)], leaf, [leaf, ca]) == "mismatch"


def test_pkix_usages_and_unknown_values_are_unusable(certs: tuple[bytes, bytes, bytes]) -> None:
    leaf, _, _ = certs
    digest = hashlib.sha256(leaf).digest()
    for record in (Tlsa(0, 0, 1, digest), Tlsa(1, 0, 1, digest), Tlsa(3, 2, 1, digest)):
        assert match_tlsa([record], leaf) == "unusable"
    assert match_tlsa([Tlsa(1, 0, 1, digest), Tlsa(3, 0, 1, b"x" * 32)], leaf) == "mismatch"
    assert match_tlsa([Tlsa(3, 0, 3, digest), Tlsa(3, 0, 1, digest)], leaf) == "match"
