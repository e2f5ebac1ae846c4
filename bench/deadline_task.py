"""CPU of the connections' deadline task in a run of timeouts (egressd.net.connection).

``python bench/deadline_task.py [--waits N] [--apart SECONDS] [--baseline DIR]``: N
connections each wait for bytes under a time limit, the limits ``--apart`` seconds apart,
so every wait ends at its own deadline, one after the other (idle MTA sessions timing out
after a network outage). The run uses trio's MockClock, so the figure is the CPU of the
bookkeeping alone: the process's CPU time from the first wait to the last timeout. With
``--baseline DIR`` the same for the ``egressd/net/connection.py`` of checkout ``DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

import trio
import trio.testing


def load(root: Path) -> ModuleType:
    path = root / "egressd" / "net" / "connection.py"
    spec = importlib.util.spec_from_file_location(f"connection_{abs(hash(root))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(module: ModuleType, waits: int, apart: float) -> float:
    pairs = [socket.socketpair() for _ in range(waits)]
    connections = [module.Connection(ours) for ours, _ in pairs]

    async def wait(connection: object, limit: float) -> None:
        connection.time_limit(limit)  # type: ignore[attr-defined]
        with contextlib.suppress(trio.TooSlowError):
            await connection.receive_some(10)  # type: ignore[attr-defined]

    async def main() -> float:
        started = time.process_time()
        async with trio.open_nursery() as nursery:
            for index, connection in enumerate(connections):
                nursery.start_soon(wait, connection, 300 + index * apart)
        return time.process_time() - started

    try:
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        for ours, theirs in pairs:  # outside the run: no trio to tell
            ours.close()
            theirs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", type=int, default=8000)
    parser.add_argument("--apart", type=float, default=0.001)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    roots = [("this", Path(__file__).resolve().parent.parent)]
    if args.baseline:
        roots.append(("baseline", args.baseline))
    for name, root in roots:
        seconds = measure(load(root), args.waits, args.apart)
        print(f"{name}: {args.waits} timeouts {args.apart:g}s apart: {seconds:.2f} s CPU")


if __name__ == "__main__":
    main()
