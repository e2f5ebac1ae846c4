"""Python calls per SMTP message through the SMTP door: a count that does not drift with the
machine's load.

Run it through ``scripts/bench smtp-calls`` (``--help`` for the knobs). CPU per message
(``scripts/bench smtp``) is the measure that matters, but on a shared machine its rounds
spread by tens of percent; the number of Python calls a message costs is exact (it moves by
a few between runs, with how the sessions interleave), and on this path CPU follows it. An
egressd from this checkout (and one from ``--baseline DIR``) runs under
bench/call_counter.py with one worker, configured as ``scripts/bench smtp`` configures it
(one listener, one pool with one source, a route to the sink, one log line per transaction);
``smtp-source -s SESSIONS -d -l SIZE`` sends ``--messages`` through it into ``smtp-sink``
(PIPELINING on, ``--no-pipelining`` for off) after a warm-up, and the calls egressd made
between the two are divided by the messages. ``--top N`` also lists the N functions with the
most calls made under them (inclusive, per message): where to cut next.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from procs import free_port, running
from smtp_bench import EGRESSD_CONFIG, KIB, SOURCE_ADDRESS, Case, generator_argv, sink_argv
from socks_calls import calls_during, compare

WARM_UP = 500


def send(port: int, case: Case, messages: int) -> None:
    """``messages`` through ``port`` with smtp-source; exits the bench if it fails."""
    argv = generator_argv("smtp-source", port, case, messages)
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        sys.exit(f"bench: {' '.join(argv)} failed ({done.returncode}):\n{output[-3000:]}")


def count_calls(
    workdir: Path, root: Path, sink_port: int, case: Case, messages: int
) -> dict[str, object]:
    """The call report (see call_counter.py) of ``messages`` through an egressd from
    ``root`` in front of the sink at ``sink_port``."""
    port = free_port()
    name = f"calls-{port}"
    config = workdir / f"{name}.toml"
    config.write_text(
        EGRESSD_CONFIG.format(
            sink_port=sink_port, relay_port=port, source=SOURCE_ADDRESS, workers=1
        )
    )
    return calls_during(
        config,
        port,
        workdir,
        root,
        warm_up=lambda: send(port, case, WARM_UP),
        load=lambda: send(port, case, messages),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench smtp-calls", description=__doc__)
    parser.add_argument("--messages", type=int, default=2000, help="counted messages (2000)")
    parser.add_argument("--sessions", type=int, default=50, help="smtp-source -s (50)")
    parser.add_argument("--size", type=int, default=10 * KIB, help="smtp-source -l (10240)")
    parser.add_argument(
        "--no-pipelining", action="store_true", help="the sink does not offer PIPELINING"
    )
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also count checkout DIR")
    parser.add_argument("--top", type=int, default=0, help="list the N costliest functions")
    args = parser.parse_args(argv)
    case = Case(args.size, args.sessions, not args.no_pipelining)
    with tempfile.TemporaryDirectory(prefix="egressd-smtp-calls-") as tmp:
        workdir = Path(tmp)
        sink_port = free_port()
        with running(sink_argv(sink_port, case.pipelining), sink_port, workdir, "sink"):
            compare(
                args.baseline,
                lambda root: count_calls(workdir, root, sink_port, case, args.messages),
                args.messages,
                f"message, {case.name}",
                args.top,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
