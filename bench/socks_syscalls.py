"""System calls per short SOCKS5 session, egressd and Dante side by side, counted by perf.

Run it through ``scripts/bench socks-syscalls`` (``--help`` for the knobs; needs ``perf`` and
root). Each contender (an egressd from this checkout, one from ``--baseline DIR``, and Dante)
runs under ``perf stat`` on every ``syscalls:sys_enter_*`` tracepoint, inherited by the
processes it forks (Dante's children are forked on demand, after any ``perf stat -p`` would
have attached), with counting off (``-D -1``) until ``--control`` turns it on for the
counted sessions, after a warm-up. The sessions are those of ``scripts/bench relay``: curl
--parallel (``--curls`` processes) through the door to an HAProxy that answers itself and
closes. The table lists each system call made at least once per 50 sessions by a
contender, per session, and the context switches. Unlike strace, perf does not slow the
daemon down, so a read that would fail with EAGAIN under load fails here too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from procs import ROOT, binary, free_port, is_listening, python_env
from relay_bench import DANTE_CONFIG, EGRESSD, curl_sessions, egressd_config, pong_sink

WARM_UP = 1000
_PREFIX = "syscalls:sys_enter_"


class Counted:
    """One contender under ``perf stat``, counting only between enable() and disable()."""

    def __init__(
        self, workdir: Path, name: str, port: int, argv: list[str], root: Path = ROOT
    ) -> None:
        self.name = name
        self.port = port
        self.control = workdir / f"{name}.control"
        self.ack = workdir / f"{name}.ack"
        os.mkfifo(self.control)
        os.mkfifo(self.ack)
        self.output = workdir / f"{name}.perf"
        perf = [binary("perf"), "stat", "-D", "-1", "-x", ",", "-o", str(self.output)]
        perf += ["--control", f"fifo:{self.control},{self.ack}"]
        perf += ["-e", f"{_PREFIX}*", "-e", "context-switches", "--"]
        self.log = (workdir / f"{name}.log").open("wb")
        self.process = subprocess.Popen(
            [*perf, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,  # python -m egressd imports from root (PYTHONPATH), not from here
            start_new_session=True,
            env=python_env(root),
        )
        deadline = time.monotonic() + 30
        while not is_listening(port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: {name} did not start:\n{(workdir / f'{name}.log').read_text()}")
            time.sleep(0.05)

    def command(self, word: str) -> None:
        with self.control.open("w") as control:
            control.write(word + "\n")
        with self.ack.open() as ack:
            ack.readline()

    def stop(self) -> dict[str, int]:
        """Stop the daemon (perf's child, by PID) and return perf's counts."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for child in children.read_text().split():
            os.kill(int(child), signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()
        counts: dict[str, int] = {}
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit():
                counts[fields[2].removeprefix(_PREFIX)] = int(fields[0])
        return counts


def print_table(columns: dict[str, dict[str, int]], sessions: int) -> None:
    names = list(columns)
    rows = {
        call
        for counts in columns.values()
        for call, count in counts.items()
        if call != "context-switches" and count * 50 >= sessions
    }
    print(f"system calls per short SOCKS5 session ({sessions} sessions each)")
    print(f"{'':22}" + "".join(f"{name:>12}" for name in names))
    for call in sorted(rows, key=lambda c: (-max(t.get(c, 0) for t in columns.values()), c)):
        print(f"{call:22}" + "".join(f"{columns[n].get(call, 0) / sessions:12.2f}" for n in names))
    totals = {
        name: sum(v for k, v in counts.items() if k != "context-switches")
        for name, counts in columns.items()
    }
    print(f"{'all system calls':22}" + "".join(f"{totals[n] / sessions:12.2f}" for n in names))
    switches = "context switches"
    print(
        f"{switches:22}"
        + "".join(f"{columns[n].get('context-switches', 0) / sessions:12.2f}" for n in names)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench socks-syscalls", description=__doc__)
    parser.add_argument("--sessions", type=int, default=3000, help="counted sessions (3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at a time (32)")
    parser.add_argument("--curls", type=int, default=4, help="curl processes (4)")
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also count checkout DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="egressd-syscalls-") as tmp:
        workdir = Path(tmp)
        with pong_sink(workdir) as (sink, _pid):
            roots = [("egressd", ROOT)]
            if args.baseline is not None:
                roots.append(("baseline", args.baseline.resolve()))
            contenders: list[Counted] = []
            try:
                for name, root in roots:
                    port = free_port()
                    config = egressd_config(workdir, port, [sink])
                    daemon = [*EGRESSD, "run", "-c", str(config)]
                    contenders.append(Counted(workdir, name, port, daemon, root))
                port = free_port()
                dante_config = workdir / "danted.conf"
                dante_config.write_text(DANTE_CONFIG.format(port=port))
                dante = [binary("danted"), "-f", str(dante_config), "-N", "2"]
                contenders.append(Counted(workdir, "Dante", port, dante))
                for contender in contenders:
                    curl_sessions(contender.port, sink, WARM_UP, args.concurrency, args.curls)
                    time.sleep(0.3)
                    contender.command("enable")
                    curl_sessions(contender.port, sink, args.sessions, args.concurrency, args.curls)
                    time.sleep(0.5)  # the last sessions' closes and log lines
                    contender.command("disable")
            finally:
                columns = {contender.name: contender.stop() for contender in contenders}
    print_table(columns, args.sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
