"""The embedded store: WAL, upgrades, and clear errors for bad files (the round trips every
backend must make are in test_store_contract.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from egressd.state import (
    DATABASE_NAME,
    SCHEMA_VERSION,
    Batch,
    DayCount,
    Progress,
    StateError,
    Suspension,
    open_store,
    state_directory,
)
from egressd.state.sqlite import UPGRADES, SqliteStore


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    mode = sqlite3.connect(tmp_path / DATABASE_NAME).execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_a_version_1_database_is_upgraded_keeping_its_schedule(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    db.executescript(UPGRADES[0])
    db.execute("INSERT INTO progress VALUES ('ip-1', 'google', 'standard', 4, '2026-11-29', 1.0)")
    db.execute("INSERT INTO counts VALUES ('ip-1', 'google', '2026-11-29', 380)")
    db.execute(
        "INSERT INTO events (at, source, provider, kind, step_from, step_to, reason) "
        "VALUES (1.0, 'ip-1', 'google', 'advanced', 3, 4, 'sending day')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    store = open_store(tmp_path)
    snapshot = store.load(since_day="2026-11-01", now=0.0)
    assert snapshot.progress == (
        Progress("ip-1", "google", "standard", 4, "2026-11-29", None, 1.0),
    )
    assert snapshot.counts == (DayCount("ip-1", "google", "2026-11-29", 380, 0, 0),)
    assert store.history()[0].reason == "sending day"
    store.write(Batch(suspensions=(Suspension("ip-1", 10.0, "new table works"),)))
    version = sqlite3.connect(tmp_path / DATABASE_NAME).execute("PRAGMA user_version")
    assert version.fetchone() == (SCHEMA_VERSION,)


def test_a_version_2_database_is_upgraded_keeping_holds_counts_and_suspensions(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    db.executescript(UPGRADES[0] + UPGRADES[1])
    db.execute(
        "INSERT INTO progress VALUES ('ip-1', 'google', 'standard', 2, '2026-11-29', 1.0, 'desk')"
    )
    db.execute("INSERT INTO counts VALUES ('ip-1', 'google', '2026-11-29', 30, 2, 1)")
    db.execute("INSERT INTO suspensions VALUES ('ip-1@provider:yahoo', 9000.0, 'TSS04')")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()

    store = open_store(tmp_path)
    snapshot = store.load(since_day="2026-11-01", now=0.0)
    assert snapshot.progress == (
        Progress("ip-1", "google", "standard", 2, "2026-11-29", "desk", 1.0, None),
    )
    assert snapshot.counts == (DayCount("ip-1", "google", "2026-11-29", 30, 2, 1, 0),)
    assert snapshot.suspensions == (Suspension("ip-1@provider:yahoo", 9000.0, "TSS04"),)
    store.write(Batch(counts=(DayCount("ip-1", "google", "2026-11-29", connected=3),)))
    assert store.load("2026-11-01", 0.0).counts[0].connected == 3
    version = sqlite3.connect(tmp_path / DATABASE_NAME).execute("PRAGMA user_version")
    assert version.fetchone() == (SCHEMA_VERSION,)


def test_a_corrupt_database_is_an_error_naming_the_file_and_is_left_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / DATABASE_NAME
    garbage = b"this is no SQLite database, but it holds someone's schedule" * 100
    path.write_bytes(garbage)
    with pytest.raises(StateError) as caught:
        open_store(tmp_path)
    assert str(path) in str(caught.value)
    assert "corrupt" in str(caught.value)
    assert path.read_bytes() == garbage


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer egressd"):
        open_store(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_an_unwritable_database_is_an_error_naming_the_file(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    for name in os.listdir(tmp_path):
        os.chmod(tmp_path / name, 0o444)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(StateError) as caught:
            open_store(tmp_path)
        assert str(tmp_path / DATABASE_NAME) in str(caught.value)
    finally:
        os.chmod(tmp_path, 0o755)


def test_a_directory_that_cannot_be_created_is_an_error_naming_the_file(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=str(blocker / "state" / DATABASE_NAME)):
        open_store(blocker / "state")


def test_a_database_path_that_is_a_directory_is_an_error_naming_the_file(
    tmp_path: Path,
) -> None:
    (tmp_path / DATABASE_NAME).mkdir()
    with pytest.raises(StateError, match=str(tmp_path / DATABASE_NAME)):
        open_store(tmp_path)


def test_the_directory_is_the_configured_one_else_systemds_else_the_default() -> None:
    assert state_directory("/srv/e", {"STATE_DIRECTORY": "/x"}) == Path("/srv/e")
    assert state_directory(None, {"STATE_DIRECTORY": "/var/lib/egressd:/other"}) == Path(
        "/var/lib/egressd"
    )
    assert state_directory(None, {"STATE_DIRECTORY": "/run/x"}) == Path("/run/x")
    assert state_directory(None, {}) == Path("/var/lib/egressd")


class _OtherWorkerFirst:
    """A connection on which, just before this store takes the write lock, another
    worker's store creates the schema (two workers opening a new file at once)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db, self.path, self.raced = db, path, False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE" and not self.raced:
            self.raced = True
            SqliteStore(self.path).close()
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def test_two_workers_opening_a_new_database_at_once_both_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / DATABASE_NAME
    connect = SqliteStore._connect
    first: list[_OtherWorkerFirst] = []

    def racing(p: Path) -> object:
        if first:  # the other worker's own connection
            return connect(p)
        first.append(_OtherWorkerFirst(connect(p), p))
        return first[0]

    monkeypatch.setattr(SqliteStore, "_connect", staticmethod(racing))
    store = SqliteStore(path)  # the other one created the tables first: nothing to redo
    assert first[0].raced
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
