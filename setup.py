"""Build hook for the optional compiled build (README, "Compiled build").

``pip install .`` builds the pure-Python package, as pyproject.toml describes it. With
``EGRESSD_MYPYC=1`` in the environment, the sans-IO modules listed in COMPILED are also
compiled with mypyc (the compiler that ships with mypy) into C extension modules that sit
beside their .py files in the wheel; Python imports the extension first. The compiled and
the pure modules behave the same: scripts/test runs the protocol, relay, fuzz and SMTP door
tests against both. Such a build needs mypy (for mypyc), setuptools and a C compiler with
Python's headers, and is made without build isolation so that it uses the mypy already
installed: ``EGRESSD_MYPYC=1 pip install --no-build-isolation .``.
"""

from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import setup

# The SMTP door's pure layers: its protocol machines and the relay core (no trio, no socket).
# Not proto/machine.py: the SOCKS5 and PROXY machines, which stay Python, subclass its errors,
# and Python classes cannot subclass compiled ones. Not those machines either: they are not on
# the SMTP door's path, and compiled they fail their tests (socks5's `ReplyCode | int` values
# become plain ints; proxy.py's next_event trusts a narrowing of self._header that _parse()
# changes).
COMPILED = ["egressd/proto/smtp*.py", "egressd/relay/*.py"]


def compiled_extensions() -> list[object]:
    """mypyc's extension modules for COMPILED, when EGRESSD_MYPYC=1 asks for them."""
    if os.environ.get("EGRESSD_MYPYC", "0") in ("", "0"):
        return []
    if {"develop", "editable_wheel", "--inplace", "-i"} & set(sys.argv):
        raise SystemExit(
            "EGRESSD_MYPYC=1 builds a wheel, not an editable install: compiled modules beside "
            "the .py files would shadow every later edit. For development, scripts/compiled "
            "builds the compiled variant outside the checkout."
        )
    try:
        from mypyc.build import mypycify
    except ImportError as error:
        raise SystemExit(
            "EGRESSD_MYPYC=1 needs mypy (it ships mypyc) in the build environment: "
            "pip install mypy setuptools wheel, then pip install --no-build-isolation ."
        ) from error
    paths = sorted(path for pattern in COMPILED for path in glob(pattern))
    return list(mypycify(paths, opt_level="3", group_name="egressd_native"))


setup(ext_modules=compiled_extensions())
