"""Which TLS policy one delivery gets: the configured default, an override, MTA-STS.

Theory of operation
-------------------
Every delivery to a recipient domain runs under one :class:`TlsPolicy`, named by its
``label`` in the transaction's log line and the metrics:

``none``
    no STARTTLS (``[smtp.tls] mode = "disabled"``, or the override ``none``);
``opportunistic``
    STARTTLS when offered, any certificate, plaintext when it fails (RFC 7435; the
    default, or the override ``may``);
``encrypt``
    TLS or nothing, any certificate (``mode = "required"``, or the override ``encrypt``);
``verify``
    TLS with a certificate that chains to the CA store (``[smtp.tls] ca_file``, else the
    system's) and is valid for the MX name (``verify = true``, or the override ``verify``);
``mta-sts enforce``
    the domain's MTA-STS policy (RFC 8461 section 5): only MX hosts its patterns allow,
    and ``verify``'s TLS to them; otherwise the delivery fails with a 4xx naming the policy;
``mta-sts testing``
    the same checks, but a failure is logged and counted, and the mail goes on as
    ``opportunistic`` would (section 5.2);
``dane``
    an MX host with DNSSEC-validated TLSA records (RFC 7672, :mod:`egressd.tlspolicy.dane`):
    TLS or nothing, and the certificate must match a usable record; with no usable record,
    TLS without authentication (:func:`dane_policy`).

Precedence (:func:`with_mta_sts`): an ``[smtp.tls.policy]`` entry for the domain is the
operator's word and wins, like Postfix's ``smtp_tls_policy_maps``; otherwise a domain's
MTA-STS policy in ``enforce`` or ``testing`` mode applies over the configured default
(``testing`` never weakens a configured ``verify``); a policy in ``none`` mode changes
nothing.

DANE (``[smtp.tls] dane = true``, or the override ``dane``; :func:`wants_dane`) is decided
per MX host, after the rest: a host with validated TLSA records gets :func:`dane_policy`
whatever the domain's policy is (RFC 8461 section 2: DANE over MTA-STS); the other hosts
keep the domain's policy. The override ``dane`` is ``may`` for hosts without DANE, like
Postfix's ``dane`` level; any other override turns DANE off for the domain.

A connection opened for one domain may carry another domain's mail (the same MX) only when
that domain's policy for the host accepts the connection as it is (:func:`accepts`): what
its own opening would have insisted on (TLS; a certificate verified for the MX name; a
DANE match), the MX allowed by its MTA-STS patterns, and no failed DANE look-up. A
connection shared by address only (another MX name) fits only a domain that asks for
nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from egressd.tlspolicy.dane import DaneHost
from egressd.tlspolicy.mtasts import MtaStsPolicy, mx_matches
from egressd.tlspolicy.tlsa import Tlsa

__all__ = [
    "LABELS",
    "Connected",
    "Override",
    "TlsPolicy",
    "TlsTry",
    "accepts",
    "configured_policy",
    "dane_policy",
    "policy_for_host",
    "tries",
    "wants_dane",
    "with_mta_sts",
]

Label = Literal[
    "none", "opportunistic", "encrypt", "verify", "mta-sts enforce", "mta-sts testing", "dane"
]
LABELS: tuple[Label, ...] = (
    "none",
    "opportunistic",
    "encrypt",
    "verify",
    "mta-sts enforce",
    "mta-sts testing",
    "dane",
)
Override = Literal["none", "may", "encrypt", "verify", "dane"]


@dataclass(frozen=True)
class TlsPolicy:
    """How to do TLS towards one domain's MX hosts (see the module doc)."""

    label: Label
    starttls: bool = True
    """Send STARTTLS when the remote offers it."""
    required: bool = False
    """No TLS (not offered, refused, failed handshake) makes the host fail."""
    verify: bool = False
    """The certificate must chain to the CA store and be valid for the MX name."""
    mx: tuple[str, ...] = ()
    """MTA-STS: the MX patterns allowed (empty: every MX host)."""
    testing: bool = False
    """MTA-STS testing: check as ``verify`` would, report failures, deliver anyway."""
    origin: str = ""
    """What set the policy, for replies and logs (``MTA-STS policy of example.com ...``)."""
    tlsa: tuple[Tlsa, ...] = ()
    """DANE: the host's TLSA records (the certificate must match a usable one)."""

    def allows_mx(self, host: str) -> bool:
        """True when MX ``host`` may be used (MTA-STS's patterns, if any, allow it)."""
        return not self.mx or any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def enforced(self) -> bool:
        """True when a host that breaks the policy must not get the mail."""
        return not self.testing


_BY_OVERRIDE: dict[str, TlsPolicy] = {
    "none": TlsPolicy("none", starttls=False),
    "may": TlsPolicy("opportunistic"),
    "encrypt": TlsPolicy("encrypt", required=True),
    "verify": TlsPolicy("verify", required=True, verify=True),
    "dane": TlsPolicy("opportunistic"),
}


def configured_policy(mode: str, verify: bool, override: str | None = None) -> TlsPolicy:
    """The policy the configuration gives a domain: its ``[smtp.tls.policy]`` entry
    (``override``), else ``[smtp.tls] mode`` and ``verify``."""
    if override is not None:
        return _BY_OVERRIDE[override]
    if mode == "disabled":
        return _BY_OVERRIDE["none"]
    if verify:
        return _BY_OVERRIDE["verify"]
    return _BY_OVERRIDE["encrypt" if mode == "required" else "may"]


def wants_dane(dane: bool, override: str | None) -> bool:
    """True when DANE is looked for: the override ``dane``, or ``[smtp.tls] dane`` and no
    override for the domain."""
    return override == "dane" or (override is None and dane)


def dane_policy(host: DaneHost) -> TlsPolicy:
    """The policy of a DANE host (``host.state == "dane"``): TLS required, and the
    certificate checked against its TLSA records (none usable: not authenticated)."""
    return TlsPolicy("dane", required=True, tlsa=host.tlsa, origin=host.describe())


def policy_for_host(policy: TlsPolicy, dane: Mapping[str, DaneHost] | None, host: str) -> TlsPolicy:
    """The policy of one MX host: DANE's for a DANE host, else the domain's ``policy``."""
    state = (dane or {}).get(host)
    if state is not None and state.state == "dane":
        return dane_policy(state)
    return policy


@dataclass(frozen=True)
class Connected:
    """What an open connection is: its MX host, the label of the policy it was opened
    under, its ``tls_result`` (``verified``, ``encrypted...``, ``plaintext``) and whether
    TLS is on."""

    host: str
    label: str
    result: str
    encrypted: bool


def accepts(
    connected: Connected, hosts: Collection[str], policy: TlsPolicy, dane: Mapping[str, DaneHost]
) -> bool:
    """True when a domain whose MX hosts are ``hosts``, with ``policy`` and ``dane``
    states, may use ``connected`` (see the module doc)."""
    host = connected.host
    if host not in hosts:  # shared by address only
        asks_nothing = policy.label in ("none", "opportunistic")
        return asks_nothing and all(state.state == "none" for state in dane.values())
    state = dane.get(host)
    if (state is not None and state.state == "failed") or not policy.allows_mx(host):
        return False
    wanted = policy_for_host(policy, dane, host)
    if wanted.label in ("none", "opportunistic", "mta-sts testing"):
        return True
    if wanted.label == "encrypt":
        return connected.encrypted
    if wanted.label == "dane":
        return connected.label == "dane" and connected.encrypted
    return connected.result == "verified" and connected.label in ("verify", "mta-sts enforce")


def with_mta_sts(
    base: TlsPolicy, policy: MtaStsPolicy | None, domain: str, *, overridden: bool = False
) -> TlsPolicy:
    """``base`` with the domain's MTA-STS ``policy`` applied (see the module doc)."""
    if overridden or policy is None or policy.mode == "none":
        return base
    origin = policy.describe(domain)
    if policy.mode == "enforce":
        return TlsPolicy("mta-sts enforce", required=True, verify=True, mx=policy.mx, origin=origin)
    if base.verify:
        return base
    return TlsPolicy(
        "mta-sts testing",
        required=base.required,
        verify=True,
        mx=policy.mx,
        testing=True,
        origin=origin,
    )


@dataclass(frozen=True)
class TlsTry:
    """One connection attempt to an address: whether to STARTTLS, verify, insist."""

    starttls: bool
    verify: bool = False
    required: bool = False
    """No TLS on this try (not offered, refused, failed) makes the host fail."""
    tlsa: tuple[Tlsa, ...] = ()
    dane: bool = False
    """DANE: the certificate must match ``tlsa`` (no usable record: any certificate)."""


def tries(policy: TlsPolicy) -> tuple[TlsTry, ...]:
    """The attempts on one address, in order; the next one only after a failed handshake
    (the remote's state after it is unknowable, so each try is a new connection).

    ``opportunistic`` falls back to plaintext; ``mta-sts testing`` verifies first, then
    encrypts without verifying, then goes plaintext; the others have one try.
    """
    if policy.label == "dane":
        return (TlsTry(starttls=True, required=True, tlsa=policy.tlsa, dane=True),)
    if not policy.starttls:
        return (TlsTry(starttls=False),)
    if policy.testing:
        return (
            TlsTry(starttls=True, verify=True, required=policy.required),
            TlsTry(starttls=True, required=policy.required),
            *(() if policy.required else (TlsTry(starttls=False),)),
        )
    if policy.required:
        return (TlsTry(starttls=True, verify=policy.verify, required=True),)
    return (TlsTry(starttls=True), TlsTry(starttls=False))
