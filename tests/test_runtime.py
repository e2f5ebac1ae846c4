"""Runtime: the session record's log fields and the session's accounting."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from egressd.runtime import SessionRecord


def reference_fields(record: SessionRecord) -> dict[str, Any]:
    """What ``fields()`` was first written as: asdict, ``started`` becomes ``duration``."""
    values = dataclasses.asdict(record)
    values.pop("started")
    values["duration"] = 0.0
    return {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize(
    "record",
    [
        SessionRecord(door="socks5", client="127.0.0.1:4000"),
        SessionRecord(
            door="socks5",
            client="[::1]:4000",
            pool="main",
            source="a",
            local_address="127.0.0.2:5000",
            destination="mx.example:25 (192.0.2.1)",
            bytes_up=10,
            bytes_down=20,
            outcome="ok",
            detail="fine",
        ),
        SessionRecord(door="proxy", client="127.0.0.1:1", outcome="denied", detail="no"),
    ],
)
def test_fields_are_the_set_fields_in_order_then_duration(record: SessionRecord) -> None:
    record.started = time.monotonic() - 1.5
    fields = record.fields()
    assert 1.5 <= fields.pop("duration") < 10
    expected = reference_fields(record)
    expected.pop("duration")
    assert list(fields.items()) == list(expected.items())


def test_fields_cover_every_dataclass_field() -> None:
    # ``listener`` labels the proxy_* metrics; the log line has ``door`` already.
    names = {f.name for f in dataclasses.fields(SessionRecord)} - {"started", "listener"}
    record = SessionRecord(door="d", client="c", pool="p", source="s", local_address="l",
                           destination="x", detail="t")  # fmt: skip
    assert set(record.fields()) == names | {"duration"}
