"""Which build of egressd is running: pure Python, or its sans-IO layers compiled by mypyc.

A compiled build (README, "Compiled build"; setup.py with ``EGRESSD_MYPYC=1``) installs a C
extension module beside each .py of egressd/proto and egressd/relay, and Python imports the
extension first. Whether the modules loaded here are extensions is therefore the answer, as
the import system found it, not what an installer meant to build. ``egressd --version`` and
the daemon's "starting" log line print it.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from types import ModuleType
from typing import Final

from egressd.proto import smtp_client, smtp_server
from egressd.relay import core

COMPILED: Final = "compiled (mypyc)"
PURE: Final = "pure Python"
PARTLY: Final = "partly compiled (mypyc)"

# The SMTP door's machines and the relay core: what setup.py compiles.
_HOT_PATH: Final = (smtp_server, smtp_client, core)


def is_compiled(module: ModuleType) -> bool:
    """True when ``module`` was loaded from a C extension (a mypyc-compiled .so)."""
    return str(getattr(module, "__file__", "")).endswith(tuple(EXTENSION_SUFFIXES))


def build() -> str:
    """``compiled (mypyc)``, ``pure Python``, or ``partly compiled (mypyc)`` (a broken mix)."""
    compiled = [is_compiled(module) for module in _HOT_PATH]
    if all(compiled):
        return COMPILED
    return PARTLY if any(compiled) else PURE
