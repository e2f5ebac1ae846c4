"""Helpers for the shaping tests: the shared fake clock and a policy from TOML text."""

from __future__ import annotations

import sys

from egressd.shaping.files import load_shaping_data
from egressd.shaping.policy import ShapingPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


def policy_from(
    text: str, sites: dict[str, str] | None = None, file: str = "t.toml"
) -> ShapingPolicy:
    """A bound policy from one TOML document; ``sites`` maps rolled-up domains to sites."""
    files = load_shaping_data(file, tomllib.loads(text))
    return ShapingPolicy.from_files(files, sites or {})
