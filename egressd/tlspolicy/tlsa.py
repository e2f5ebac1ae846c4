"""DANE TLSA matching for SMTP (RFC 7672, RFC 6698), pure (used by the SMTP door after the
handshake with a DANE host, :mod:`egressd.tlspolicy.dane`).

Theory of operation
-------------------
A TLSA record is (usage, selector, matching type, data). For SMTP only DANE-TA(2) and
DANE-EE(3) are usable (RFC 7672 section 3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable).
The selector picks the full certificate (0) or its SubjectPublicKeyInfo (1); the matching
type compares it exactly (0), or by SHA-256 (1) or SHA-512 (2) digest. Any other value
makes the record unusable.

* DANE-EE(3) matches the peer's leaf certificate; names and expiry are not checked
  (RFC 7672 section 3.1.1).
* DANE-TA(2) matches a certificate of the chain the peer sent, other than the leaf
  (the trust anchor); the leaf must then chain to it with the MX name checked. Python's
  ``ssl`` module gives the leaf only before 3.13 (``get_unverified_chain``), so without a
  chain DANE-TA records are unusable (RFC 7672 section 2.2: as if absent). Note that
  :func:`match_tlsa` only finds the anchor among the chain's certificates; it checks
  neither the chain's signatures nor the MX name, so a caller must not pass a chain until
  that check exists (the SMTP door passes none: an attacker could send the real anchor
  along with its own leaf).

:func:`match_tlsa` says ``match``, ``mismatch`` (usable records, none matched: the
delivery must fail, never fall back to plaintext) or ``unusable`` (no usable record:
TLS is still mandatory, without authentication).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["Tlsa", "TlsaResult", "match_tlsa", "selected"]

TlsaResult = Literal["match", "mismatch", "unusable"]
DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in (0, 1)
            and self.mtype
            in (
                0,
                1,
                2,
            )
        )


def selected(certificate_der: bytes, selector: int) -> bytes:
    """The certificate (selector 0) or its SubjectPublicKeyInfo (1), DER."""
    if selector == 0:
        return certificate_der
    key = x509.load_der_x509_certificate(certificate_der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(record: Tlsa, certificate_der: bytes) -> bool:
    return _digest(selected(certificate_der, record.selector), record.mtype) == record.data


def match_tlsa(
    records: Sequence[Tlsa], leaf_der: bytes, chain_der: Sequence[bytes] | None = None
) -> TlsaResult:
    """Whether the peer's ``leaf_der`` (and ``chain_der``, leaf first, when known)
    matches ``records``; see the module doc."""
    usable = [r for r in records if r.usable and (r.usage == DANE_EE or chain_der is not None)]
    if not usable:
        return "unusable"
    anchors = list(chain_der[1:]) if chain_der is not None else []
    for record in usable:
        candidates = [leaf_der] if record.usage == DANE_EE else anchors
        if any(_matches(record, der) for der in candidates):
            return "match"
    return "mismatch"
