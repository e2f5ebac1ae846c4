"""The outbound path, pure: which sources, which addresses, in what order, under which deadline.

- :mod:`egressd.egress.failures`: failure kinds (an enum and a detail) and whom they blame.
- :mod:`egressd.egress.selection`: a configuration generation's pools, health and limits.
- :mod:`egressd.egress.plan`: the plan, a sans-IO machine with the one retry policy.
- :mod:`egressd.egress.breaker`: the per-destination circuit breaker.
- :mod:`egressd.egress.quotas`: warm-up quotas, held from the pick until counted.

The trio executor that runs a plan is :mod:`egressd.net.egress`. Nothing here imports trio.
"""

from egressd.egress.breaker import BreakerSettings, DestinationBreaker
from egressd.egress.failures import EgressFailure, Failure, Party, Stage, blame
from egressd.egress.plan import (
    Attempt,
    Destination,
    GiveUp,
    Plan,
    Progress,
    Resolve,
    Step,
    destination_port,
)
from egressd.egress.quotas import ConnectionQuota, NoQuotas, QuotaHold, Quotas
from egressd.egress.selection import Egress, EgressObserver

__all__ = [
    "Attempt",
    "BreakerSettings",
    "ConnectionQuota",
    "Destination",
    "DestinationBreaker",
    "Egress",
    "EgressFailure",
    "EgressObserver",
    "Failure",
    "GiveUp",
    "NoQuotas",
    "Party",
    "Plan",
    "Progress",
    "QuotaHold",
    "Quotas",
    "Resolve",
    "Stage",
    "Step",
    "blame",
    "destination_port",
]
