"""Python calls per short SOCKS5 session: a count that does not drift with the machine's load.

Run it through ``scripts/bench socks-calls`` (``--help`` for the knobs). CPU per session
(``scripts/bench relay``) is the measure that matters, but on a shared machine its rounds
spread by tens of percent; the number of Python calls a session makes is exact, and on this
path CPU follows it (about half a microsecond per call). An egressd from this checkout (and
one from ``--baseline DIR``) runs under bench/call_counter.py with one worker; ``--sessions``
curl sessions (connect, SOCKS5, one HTTP exchange with an HAProxy that answers itself,
close), ``--concurrency`` at a time, go through it after a warm-up, and the calls it made
between the two are divided by the sessions. ``--top N`` also lists the N functions with
the most calls made under them (inclusive, per session): where to cut next.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from procs import ROOT, free_port, running
from relay_bench import curl_sessions, egressd_config, pong_sink, wait_ready

COUNTER = [sys.executable, str(ROOT / "bench" / "call_counter.py")]
WARM_UP = 200


def count_calls(
    workdir: Path, root: Path, sink: int, sessions: int, concurrency: int
) -> dict[str, object]:
    """The call report (see call_counter.py) of ``sessions`` through an egressd from
    ``root`` (the caller divides the counts by the sessions)."""
    port = free_port()
    config = egressd_config(workdir, port, [sink])
    return calls_during(
        config,
        port,
        workdir,
        root,
        warm_up=lambda: curl_sessions(port, sink, WARM_UP, concurrency),
        load=lambda: curl_sessions(port, sink, sessions, concurrency),
    )


def calls_during(
    config: Path,
    port: int,
    workdir: Path,
    root: Path,
    warm_up: Callable[[], object],
    load: Callable[[], object],
) -> dict[str, object]:
    """The call report (see call_counter.py) of an egressd from ``root`` running ``config``
    (its door on ``port``) while ``load`` runs, after ``warm_up`` (not counted); for
    smtp_calls.py too."""
    name = f"calls-{port}"
    out = workdir / f"{name}.json"
    os.environ["EGRESSD_CALLS_OUT"] = str(out)
    with running([*COUNTER, "run", "-c", str(config)], port, workdir, name, root=root) as pid:
        wait_ready(workdir / f"{name}.log")
        warm_up()
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
        load()
        time.sleep(0.5)  # the last sessions' log lines and closes
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() or not out.stat().st_size:
            if time.monotonic() > deadline:
                sys.exit(f"bench: no call report from {name}")
            time.sleep(0.05)
        time.sleep(0.2)
        report: dict[str, object] = json.loads(out.read_text())
    return report


def compare(
    baseline: Path | None,
    count: Callable[[Path], dict[str, object]],
    units: int,
    unit: str,
    top: int,
) -> None:
    """Count this checkout (and ``baseline``) with ``count(root)``; print the calls per
    ``unit`` of each, the ``top`` costliest functions, and the ratio (for smtp_calls.py
    too)."""
    roots = [("egressd", ROOT)]
    if baseline is not None:
        roots.append(("baseline", baseline.resolve()))
    totals: dict[str, float] = {}
    for name, root in roots:
        report = count(root)
        calls, inclusive = report["calls"], report["inclusive"]
        assert isinstance(calls, int) and isinstance(inclusive, list)
        totals[name] = calls / units
        print(f"{name}: {totals[name]:.1f} Python calls per {unit} ({root})")
        for function, under, own in inclusive[:top]:
            print(f"  {under / units:8.1f} under  {own / units:6.1f} own  {function}")
    if "baseline" in totals:
        print(f"egressd / baseline: {totals['egressd'] / totals['baseline']:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench socks-calls", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000, help="counted sessions (1000)")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at a time (32)")
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also count checkout DIR")
    parser.add_argument("--top", type=int, default=0, help="list the N costliest functions")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="egressd-calls-") as tmp:
        workdir = Path(tmp)
        with pong_sink(workdir) as (sink, _pid):
            compare(
                args.baseline,
                lambda root: count_calls(workdir, root, sink, args.sessions, args.concurrency),
                args.sessions,
                "short session",
                args.top,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
