"""Durable state: one narrow interface (:class:`Store`) and its embedded SQLite backend.

- :mod:`egressd.state.records`: the records (progress, day counts, events, suspensions,
  overrides, and the :class:`Batch` a flush writes);
- :mod:`egressd.state.interface`: :class:`Store`, the Protocol every backend implements,
  and :class:`StateError`;
- :mod:`egressd.state.sqlite`: the embedded backend (stdlib ``sqlite3``, WAL).

No trio here: every call blocks, and the daemon runs it in a worker thread.
"""

from egressd.state.interface import StateError, Store
from egressd.state.records import (
    Batch,
    DayCount,
    Event,
    Override,
    Progress,
    Snapshot,
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
    "DayCount",
    "Event",
    "Override",
    "Progress",
    "Snapshot",
    "SqliteStore",
    "StateError",
    "Store",
    "Suspension",
    "open_store",
    "state_directory",
]
