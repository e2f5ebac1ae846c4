"""DANE for SMTP (RFC 7672): what DNSSEC says about each MX host, pure.

Theory of operation
-------------------
DANE applies to a recipient domain only when its MX records are DNSSEC-validated
(section 2.2.1): egressd asks ``[dns] nameservers`` with the AD and DO bits set and trusts
the AD bit of the answer, as Postfix does with a local validating resolver. Then, for each
MX host (section 2.2.2):

* the host's address records must be validated too, else there is no TLSA lookup;
* ``_25._tcp.<host>`` TLSA records, validated: the host is a DANE host
  (:attr:`HostDane.state` ``dane``); no TLSA records (NXDOMAIN, NODATA) or records that
  are not validated: no DANE for that host (``none``), it gets the domain's other policy;
* a TLSA lookup that fails (SERVFAIL, a timeout): the host cannot be used (``failed``),
  the next MX is tried (section 2.2: a failed lookup is never read as "no DANE").

A DANE host requires TLS (no plaintext, whatever the remote offers) and its certificate
must match a usable TLSA record (:func:`egressd.tlspolicy.tlsa.match_tlsa`): DANE-EE(3)
with no name or expiry check (section 3.1.1). When no record is usable (PKIX usages,
unknown values, DANE-TA(2) without the peer's chain, which Python's ``ssl`` does not give
before 3.13) TLS is still mandatory, without authentication (sections 2.2 and 3.1).

DANE takes precedence over MTA-STS (RFC 8461 section 2): a DANE host is used under DANE
even when the domain's MTA-STS policy does not name it, and MTA-STS never rescues a host
whose certificate fails its TLSA records.

The lookups are made by :mod:`egressd.net.dane`; this module only names the outcomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from egressd.tlspolicy.tlsa import Tlsa

__all__ = ["DaneHost", "DaneState", "describe_records", "tlsa_name"]

DaneState = Literal["dane", "none", "failed"]


def tlsa_name(host: str, port: int = 25) -> str:
    """The TLSA base name of an MX host (section 3): ``_25._tcp.mx.example.com``."""
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


@dataclass(frozen=True)
class DaneHost:
    """What DNSSEC says about one MX host (see the module doc)."""

    host: str
    state: DaneState
    tlsa: tuple[Tlsa, ...] = ()
    why: str = ""
    """For ``none`` and ``failed``: the reason, for the log and the 4xx."""
    port: int = 25

    @property
    def name(self) -> str:
        return tlsa_name(self.host, self.port)

    @property
    def usable(self) -> bool:
        """True when a record can authenticate the peer (DANE-EE; DANE-TA needs a chain)."""
        return any(record.usable and record.usage == 3 for record in self.tlsa)

    def describe(self) -> str:
        """``DANE TLSA records of _25._tcp.mx.example.com (3 1 1 ab12...)`` and the like."""
        if self.state == "dane":
            return f"DANE TLSA records of {self.name} ({describe_records(self.tlsa)})"
        return f"no DANE for {self.host}: {self.why}"


def describe_records(records: Sequence[Tlsa]) -> str:
    """``3 1 1 ab12cd34...`` for each record, the data shortened to 8 hex digits."""
    return ", ".join(
        f"{r.usage} {r.selector} {r.mtype} {r.data.hex()[:8]}{'...' if len(r.data) > 4 else ''}"
        for r in records
    )
