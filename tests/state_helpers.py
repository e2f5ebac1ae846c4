"""Types shared by the state tests and their fixture (tests/state/conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from egressd.state import Store

StoreOpener = Callable[[], Awaitable[Store]]
"""Opens the test's state (again): a fresh :class:`~egressd.state.Store` on the same data."""
