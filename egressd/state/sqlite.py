"""The embedded backend: one SQLite database (stdlib ``sqlite3``) in WAL mode.

Theory of operation
-------------------
The file is ``egressd.db`` under ``[state] directory`` (default ``/var/lib/egressd``, the
unit's ``StateDirectory=egressd``). WAL lets ``egressd warmup status`` read while the daemon
writes, and ``synchronous = NORMAL`` makes a commit durable at the next checkpoint, which is
what a flush every few seconds needs: a power cut may lose the last flush, never corrupt
the file.

Schema versions live in ``PRAGMA user_version``. Opening a database of an older version
upgrades it in one transaction (:data:`UPGRADES`); a newer one, a corrupt one, or one that
cannot be written is a :class:`~egressd.state.interface.StateError` naming the file. A
schedule is never reset silently: nothing here deletes or recreates a database that exists.

One connection, used by one thread at a time (the daemon's flusher, or a worker thread the
control socket borrows), guarded by a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from egressd.state.interface import StateError
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

__all__ = [
    "DATABASE_NAME",
    "DEFAULT_DIRECTORY",
    "SCHEMA_VERSION",
    "UPGRADES",
    "SqliteStore",
    "open_store",
    "state_directory",
]

_T = TypeVar("_T")

DATABASE_NAME = "egressd.db"
SCHEMA_VERSION = 4

_V1 = """
CREATE TABLE progress (
    source TEXT NOT NULL, provider TEXT NOT NULL, plan TEXT NOT NULL,
    step INTEGER NOT NULL, day TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (source, provider));
CREATE TABLE counts (
    source TEXT NOT NULL, provider TEXT NOT NULL, day TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, provider, day));
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    source TEXT NOT NULL, provider TEXT NOT NULL, kind TEXT NOT NULL,
    step_from INTEGER NOT NULL, step_to INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE INDEX events_by_source ON events (source, id);
"""
"""Version 1: warm-up steps and sent counts only."""

_V1_TO_V2 = """
ALTER TABLE progress ADD COLUMN hold TEXT;
ALTER TABLE counts ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counts ADD COLUMN rejected INTEGER NOT NULL DEFAULT 0;
CREATE TABLE suspensions (
    scope TEXT PRIMARY KEY, until REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE overrides (
    scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    until REAL NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (scope, key));
"""
"""Version 2: operator holds, deferral and rejection counts, suspensions and overrides."""

_V2_TO_V3 = """
ALTER TABLE progress ADD COLUMN signal_hold TEXT;
ALTER TABLE counts ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
"""
"""Version 3: the day's hold by a provider's complaint (a reply rule survives a restart),
and the SOCKS5/PROXY doors' connections per day."""

_V3_TO_V4 = """
CREATE TABLE mta_sts (
    domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL, fetched_at REAL NOT NULL,
    mode TEXT NOT NULL, max_age INTEGER NOT NULL, mx TEXT NOT NULL);
"""
"""Version 4: the MTA-STS policy cache (a restart keeps each domain's policy for max_age)."""

UPGRADES: dict[int, str] = {0: _V1, 1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4}
"""The script that takes a database from version N to N+1 (0: an empty file)."""


DEFAULT_DIRECTORY = "/var/lib/egressd"


def state_directory(configured: str | None, environ: Mapping[str, str]) -> Path:
    """``[state] directory``, else systemd's ``$STATE_DIRECTORY`` (``StateDirectory=``;
    ``scripts/run`` sets it to ``.state/`` in the checkout), else /var/lib/egressd."""
    chosen = configured or environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(chosen or DEFAULT_DIRECTORY)


def open_store(directory: str | Path) -> SqliteStore:
    """The store in ``directory`` (created if missing), upgraded to :data:`SCHEMA_VERSION`."""
    path = Path(directory) / DATABASE_NAME
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{path}: cannot create its directory: {exc.strerror}") from None
    return SqliteStore(path)


class SqliteStore:
    """:class:`~egressd.state.interface.BlockingStore` on one SQLite file (the daemon
    awaits it through :class:`egressd.fleet.stores.ThreadedStore`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = self._guard(lambda: self._connect(path))
        self._guard(self._prepare)

    @property
    def location(self) -> str:
        return str(self.path)

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: {_explain(exc)}") from None
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror or exc}") from None

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _prepare(self) -> None:
        """Check the file, refuse a newer schema, upgrade an older one, prove it writable."""
        if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed")
        self._db.execute("BEGIN IMMEDIATE")  # fails here, at startup, when not writable
        try:
            # read under the write lock: two workers opening a new file at once must not
            # both see version 0 and both create the tables
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: schema version {version} was written by a newer egressd "
                    f"(this one knows up to {SCHEMA_VERSION}); refusing to touch it"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in _statements(UPGRADES[step]):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def load(self, since_day: str, now: float) -> Snapshot:
        with self._lock:
            return self._guard(lambda: self._load(since_day, now))

    def _load(self, since_day: str, now: float) -> Snapshot:
        db = self._db
        progress = db.execute(
            "SELECT source, provider, plan, step, day, hold, updated, signal_hold FROM progress"
        ).fetchall()
        counts = db.execute(
            "SELECT source, provider, day, sent, deferred, rejected, connected FROM counts "
            "WHERE day >= ?",
            (since_day,),
        ).fetchall()
        suspensions = db.execute(
            "SELECT scope, until, reason FROM suspensions WHERE until > ?", (now,)
        ).fetchall()
        overrides = db.execute(
            "SELECT scope, key, value, until, reason FROM overrides WHERE until > ?", (now,)
        ).fetchall()
        mta_sts = db.execute(
            "SELECT domain, policy_id, fetched_at, mode, max_age, mx FROM mta_sts "
            "WHERE fetched_at + max_age > ?",
            (now,),
        ).fetchall()
        return Snapshot(
            progress=tuple(Progress(*row) for row in progress),
            counts=tuple(DayCount(*row) for row in counts),
            suspensions=tuple(Suspension(*row) for row in suspensions),
            overrides=tuple(Override(*row) for row in overrides),
            mta_sts=tuple(StsPolicy(*row) for row in mta_sts),
        )

    def write(self, batch: Batch) -> None:
        if not batch:
            return
        with self._lock:
            self._guard(lambda: self._write(batch))

    def _write(self, batch: Batch) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO progress (source, provider, plan, step, day, hold, "
                "updated, signal_hold) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (p.source, p.provider, p.plan, p.step, p.day, p.hold, p.updated, p.signal_hold)
                    for p in batch.progress
                ],
            )
            db.executemany(
                "INSERT INTO counts (source, provider, day, sent, deferred, rejected, connected) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, provider, day) DO UPDATE SET "
                "sent = sent + excluded.sent, deferred = deferred + excluded.deferred, "
                "rejected = rejected + excluded.rejected, "
                "connected = connected + excluded.connected",
                [
                    (c.source, c.provider, c.day, c.sent, c.deferred, c.rejected, c.connected)
                    for c in batch.counts
                ],
            )
            db.executemany(
                "INSERT INTO events (at, source, provider, kind, step_from, step_to, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.at, e.source, e.provider, e.kind, e.step_from, e.step_to, e.reason)
                    for e in batch.events
                ],
            )
            db.executemany("DELETE FROM suspensions WHERE scope = ?", [(s,) for s in batch.lifted])
            db.executemany(
                "INSERT OR REPLACE INTO suspensions (scope, until, reason) VALUES (?, ?, ?)",
                [(s.scope, s.until, s.reason) for s in batch.suspensions],
            )
            db.executemany("DELETE FROM overrides WHERE scope = ? AND key = ?", batch.cleared)
            db.executemany(
                "INSERT OR REPLACE INTO overrides (scope, key, value, until, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                [(o.scope, o.key, o.value, o.until, o.reason) for o in batch.overrides],
            )
            db.executemany(
                "INSERT OR REPLACE INTO mta_sts (domain, policy_id, fetched_at, mode, max_age, "
                "mx) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (p.domain, p.policy_id, p.fetched_at, p.mode, p.max_age, p.mx)
                    for p in batch.mta_sts
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def history(self, source: str | None = None, limit: int = 50) -> list[Event]:
        query = "SELECT at, source, provider, kind, step_from, step_to, reason FROM events"
        params: tuple[object, ...] = ()
        if source is not None:
            query += " WHERE source = ?"
            params = (source,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._guard(lambda: self._db.execute(query, (*params, limit)).fetchall())
        return [Event(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._guard(self._db.close)


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def _explain(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "file is not a database" in text or "malformed" in text:
        return f"corrupt or not an egressd state database ({text}); move it aside to start over"
    if "readonly" in text or "unable to open" in text:
        return f"cannot be written ({text}); check the owner and mode of the file and directory"
    return text
