"""``[daemon]``: the number of worker processes and how long one may stay silent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egressd.config import ConfigError, load_config

BASE = '[source.a]\nsource_address = "127.0.0.2"\n[pool.p.a]\n'


def load(tmp_path: Path, daemon: str) -> object:
    path = tmp_path / "egressd.toml"
    path.write_text(f"[daemon]\n{daemon}\n{BASE}")
    return load_config(path).daemon


def test_one_worker_by_default_and_auto_is_the_usable_cores(tmp_path: Path) -> None:
    path = tmp_path / "egressd.toml"
    path.write_text(BASE)
    assert load_config(path).daemon.workers == 1
    assert load(tmp_path, 'workers = "auto"') == load(
        tmp_path, f"workers = {len(os.sched_getaffinity(0))}"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("workers = 0", "daemon: workers: 0 is outside 1-256"),
        (
            'workers = "many"',
            'daemon: workers: is a string; expected a number of workers or "auto"',
        ),
        ("workers = true", "daemon: workers: is a boolean"),
        ('worker_timeout = "0.5s"', "daemon: worker_timeout: must be at least 1s"),
    ],
)
def test_a_wrong_value_names_the_file_and_the_key(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, value)
    assert any(message in error and "egressd.toml" in error for error in raised.value.errors), (
        raised.value.errors
    )
