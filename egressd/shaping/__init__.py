"""Shaping: per (source x destination) limits and reply-driven rules, from KumoMTA shaping files.

Pure: no trio, no socket, no clock of its own (time is passed in or injected). Not wired into
the doors yet; see README "Shaping (not wired yet)". The modules, bottom up:

- :mod:`~egressd.shaping.throttle`: ThrottleSpec / LimitSpec grammar, GCRA;
- :mod:`~egressd.shaping.durations`: KumoMTA (humantime) durations;
- :mod:`~egressd.shaping.sites`: site names from MX hosts, provider ``match`` entries;
- :mod:`~egressd.shaping.params`: which egress-path keys egressd enforces or ignores;
- :mod:`~egressd.shaping.rules`: reply rules and threshold windows;
- :mod:`~egressd.shaping.files`: loading and checking shaping files;
- :mod:`~egressd.shaping.policy`: effective limits in KumoMTA's precedence order;
- :mod:`~egressd.shaping.shaper`: leases, buckets, suspensions, overrides on a clock.
- :mod:`~egressd.shaping.ledger`: where the shaper counts: in process, or in a store shared
  by a fleet (Redis, :mod:`egressd.fleet.budgets`) or by a host's workers.
"""

from egressd.shaping.files import Finding, ShapingError, ShapingFiles, load_shaping_files
from egressd.shaping.policy import Budget, Limits, ShapingPolicy
from egressd.shaping.shaper import Lease, Override, Refusal, Shaper, Suspension, refusal_summary
from egressd.shaping.sites import Destination, site_name
from egressd.shaping.throttle import Gcra, LimitSpec, ThrottleSpec

__all__ = [
    "Budget",
    "Destination",
    "Finding",
    "Gcra",
    "Lease",
    "LimitSpec",
    "Limits",
    "Override",
    "Refusal",
    "Shaper",
    "ShapingError",
    "ShapingFiles",
    "ShapingPolicy",
    "Suspension",
    "ThrottleSpec",
    "load_shaping_files",
    "refusal_summary",
    "site_name",
]
