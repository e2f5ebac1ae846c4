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
#
# Not the trio shells (doors/smtp*.py, socks5.py, net/connection.py, egress.py, mx.py, log.py,
# access.py): mypyc compiles them and trio runs the compiled coroutines (cancellation,
# nursery.start, tracebacks), but they cost CPU instead of saving it. Measured 2026-11-30
# at bd99302 against this list's build, same rounds (scripts/bench smtp --compiled --baseline DIR
# --rounds 9 --seconds 3): +8% CPU per message with PIPELINING, +16% without; SOCKS5 short
# sessions 1.01x pure; the door's three modules alone (doors/smtp*.py, at 7f9f4a4) +4% and
# -8%, within the noise. Part of the cost, not all of it: a compiled function adds a
# traceback entry for every exception that passes through it, caught or not (a raise and
# catch: 0.93 us against 0.28 us), paid on every EAGAIN and at each session's end.
# They would also need source changes: mypyc ignores a raise's ``from`` clause (the dialer
# reads the errno from Connection's __cause__), checks argument types at run time (the tests
# hand memory streams to parameters typed Connection), keeps a narrowing of an attribute
# across an await that changes it, forbids Python subclasses of its classes (the SMTP door's
# tests subclass Relay), and net/splice.py and zerocopy.py compiled miscount traffic.
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
