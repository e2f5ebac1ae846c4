"""Outbound TLS policy for the SMTP door, pure (no trio, no sockets).

* :mod:`egressd.tlspolicy.mtasts`: MTA-STS (RFC 8461): the ``_mta-sts`` TXT record, the
  policy file, MX patterns, and the cache's decisions on an injected clock.
* :mod:`egressd.tlspolicy.dane` and :mod:`egressd.tlspolicy.tlsa`: DANE (RFC 7672), what
  DNSSEC says of each MX host, and TLSA matching.
* :mod:`egressd.tlspolicy.choice`: which TLS policy a delivery gets (the configured
  default, a per-destination override, MTA-STS, DANE per MX host), as one
  :class:`TlsPolicy`.

The look-ups and the HTTPS fetch are in :mod:`egressd.net.mtasts` and
:mod:`egressd.net.dane`; the SMTP open path
(:mod:`egressd.doors.smtp_remote`) applies the result.
"""

from egressd.tlspolicy.choice import TlsPolicy, TlsTry, configured_policy, tries, with_mta_sts
from egressd.tlspolicy.mtasts import (
    CachedPolicy,
    MemoryPolicyStore,
    MtaStsError,
    MtaStsPolicy,
    PolicyStore,
    mx_matches,
    parse_policy,
    parse_txt,
)

__all__ = [
    "CachedPolicy",
    "MemoryPolicyStore",
    "MtaStsError",
    "MtaStsPolicy",
    "PolicyStore",
    "TlsPolicy",
    "TlsTry",
    "configured_policy",
    "mx_matches",
    "parse_policy",
    "parse_txt",
    "tries",
    "with_mta_sts",
]
