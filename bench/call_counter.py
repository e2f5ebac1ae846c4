"""Run ``egressd`` counting the Python calls it makes between two signals (for
bench/socks_calls.py).

``python bench/call_counter.py ARGS...`` runs ``egressd ARGS...`` (imported from
PYTHONPATH). SIGUSR1 starts counting with :func:`sys.setprofile` (every Python call, every
C call, and every resumption of a coroutine or generator counts one, as in cProfile);
SIGUSR2 stops and writes, as JSON to the file named by ``EGRESSD_CALLS_OUT``, the total and
each function's inclusive count (the calls made while it was on the stack, itself
included). Profiling slows the daemon several times: count calls with it, never time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from types import CodeType, FrameType
from typing import Any

_own: Counter[CodeType | str] = Counter()
_inclusive: Counter[CodeType | str] = Counter()


def _profile(frame: FrameType, event: str, arg: Any) -> None:
    if event == "call":
        key: CodeType | str = frame.f_code
    elif event == "c_call":
        key = f"<C> {getattr(arg, '__qualname__', arg)}"
    else:
        return
    _own[key] += 1
    _inclusive[key] += 1
    seen = {key}
    caller: FrameType | None = frame if event == "c_call" else frame.f_back
    while caller is not None:
        code = caller.f_code
        if code not in seen:
            seen.add(code)
            _inclusive[code] += 1
        caller = caller.f_back


def _name(key: CodeType | str) -> str:
    if isinstance(key, str):
        return key
    path = key.co_filename
    for marker, keep in (("/site-packages/", ""), ("/egressd/", "egressd/"), ("/lib/", "")):
        if marker in path:
            path = keep + path.rpartition(marker)[2]
            break
    return f"{path}:{key.co_firstlineno} {key.co_qualname}"


def _start(*_: object) -> None:
    _own.clear()
    _inclusive.clear()
    sys.setprofile(_profile)


def _stop(*_: object) -> None:
    sys.setprofile(None)
    report = {
        "calls": sum(_own.values()),
        "inclusive": [[_name(key), count, _own[key]] for key, count in _inclusive.most_common(400)],
    }
    with open(os.environ["EGRESSD_CALLS_OUT"], "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    from egressd.cli import main

    sys.exit(main(sys.argv[1:]))
