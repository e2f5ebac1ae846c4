"""Helpers for the shaping tests: a fake clock and a policy from TOML text."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from egressd.shaping.files import load_shaping_data
from egressd.shaping.policy import ShapingPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


@dataclass
class FakeClock:
    """Seconds that move only when a test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy_from(
    text: str, sites: dict[str, str] | None = None, file: str = "t.toml"
) -> ShapingPolicy:
    """A bound policy from one TOML document; ``sites`` maps rolled-up domains to sites."""
    files = load_shaping_data(file, tomllib.loads(text))
    return ShapingPolicy.from_files(files, sites or {})
