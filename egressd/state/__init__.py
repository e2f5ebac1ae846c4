"""Durable state: one narrow interface (:class:`Store`) and its backends.

- :mod:`egressd.state.records`: the records (progress, day counts, events, suspensions,
  overrides, and the :class:`Batch` a flush writes);
- :mod:`egressd.state.interface`: :class:`Store`, the asynchronous Protocol the daemon
  awaits, :class:`BlockingStore` (its blocking twin) and :class:`StateError`;
- :mod:`egressd.state.sqlite`: the embedded backend (stdlib ``sqlite3``, WAL), blocking:
  the daemon runs it behind :class:`egressd.fleet.stores.ThreadedStore`;
- :mod:`egressd.state.redis`: the Redis/Valkey backend, shared by a fleet (its client is
  injected; imported only with ``[state] backend = "redis"``).

No trio here (the pure-layer contract); the thread shell lives in :mod:`egressd.fleet`.
"""

from egressd.state.interface import (
    BlockingStore,
    StateError,
    StateKept,
    StateUnavailable,
    Store,
)
from egressd.state.records import (
    Batch,
    DayCount,
    Event,
    Override,
    Progress,
    Snapshot,
    StsPolicy,
    Suspension,
)
from egressd.state.sqlite import (
    DATABASE_NAME,
    DEFAULT_DIRECTORY,
    SCHEMA_VERSION,
    SqliteStore,
    open_store,
    state_directory,
)

__all__ = [
    "DATABASE_NAME",
    "DEFAULT_DIRECTORY",
    "SCHEMA_VERSION",
    "Batch",
    "BlockingStore",
    "DayCount",
    "Event",
    "Override",
    "Progress",
    "Snapshot",
    "SqliteStore",
    "StateError",
    "StateKept",
    "StateUnavailable",
    "Store",
    "StsPolicy",
    "Suspension",
    "open_store",
    "state_directory",
]
