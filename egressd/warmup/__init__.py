"""Automatic IP warm-up, pure: plans, steps, quotas, sending days, holds, on an injected clock.

- :mod:`egressd.warmup.days`: days in the configured time zone;
- :mod:`egressd.warmup.engine`: :class:`Warmup`, the engine.

The plans themselves are configuration (:mod:`egressd.config.warmup`); what must survive a
restart goes to a :class:`~egressd.state.Store` through the batches the engine hands out.
No trio, no sockets, no clock of its own.
"""

from egressd.warmup.days import Calendar
from egressd.warmup.engine import ALL_PROVIDERS, Counts, Quota, Warmup, describe_used_quota

__all__ = ["ALL_PROVIDERS", "Calendar", "Counts", "Quota", "Warmup", "describe_used_quota"]
