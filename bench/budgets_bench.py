"""The SMTP door's cost with shaping budgets counted in process against shared through Redis.

Run it through ``scripts/bench budgets``::

    scripts/bench budgets              # 10 KiB, 50 sessions, kept and one-message sessions
    scripts/bench budgets --rounds 5 --seconds 3

Three contenders in front of one smtp-sink (Postfix's C tools, as ``scripts/bench smtp``):
the sink directly; egressd with a shaping file whose ``["default"]`` has a
``connection_limit`` and a ``max_message_rate`` (neither reached: the budgets are counted,
never refused) counted in process; the same egressd with ``[state] backend = "redis"``
(a redis-server started here on loopback), so every budget is shared through Redis. Two
load shapes from smtp-source: ``kept`` (``-d``: each of the 50 sessions sends its messages
on one connection, so Redis is asked per message and per batch of cells) and ``fresh``
(one message per MTA session, so every message needs a new remote connection and its
slot from Redis). Rounds alternate the order of the contenders; the table prints medians:
messages per second and egressd's CPU per message for both backends, and the Redis
backend's cost against the in-process one. Redis's own CPU per message is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from procs import binary, children_cpu_seconds, cpu_seconds, free_port, python_env, running
from smtp_bench import EGRESSD, EGRESSD_CONFIG, RECIPIENT, SENDER, SOURCE_ADDRESS, sink_argv

SHAPING = """\
["default"]
connection_limit = 1000
max_message_rate = "3600000/h"
"""
SESSIONS = 50
SIZE = 10 * 1024
SHAPES = ("kept", "fresh")


@dataclass
class Contender:
    name: str
    port: int
    pid: int | None = None
    runs: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    """Per shape: (messages/s, egressd CPU ms per message, Redis CPU ms per message)."""
    size_for: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def contenders(workdir: Path) -> Iterator[tuple[list[Contender], int, int]]:
    """[direct, in-process budgets, Redis budgets], the sink's and Redis's session ids."""
    sink_port, redis_port = free_port(), free_port()
    (workdir / "shaping.toml").write_text(SHAPING)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(running(sink_argv(sink_port, True), sink_port, workdir, "sink"))
        redis_argv = [
            binary("redis-server"),
            *("--bind", "127.0.0.1", "--port", str(redis_port)),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ]
        redis = stack.enter_context(running(redis_argv, redis_port, workdir, "redis-server"))
        found = [Contender("direct", sink_port)]
        for name, state in (
            ("in-process", ""),
            ("redis", f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\n'),
        ):
            relay_port = free_port()
            config = workdir / f"egressd-{name}.toml"
            config.write_text(
                'shaping_files = ["shaping.toml"]\n'
                + EGRESSD_CONFIG.format(
                    sink_port=sink_port, relay_port=relay_port, source=SOURCE_ADDRESS
                )
                + state
            )
            argv = [*EGRESSD, "run", "-c", str(config)]
            pid = stack.enter_context(running(argv, relay_port, workdir, f"egressd-{name}"))
            found.append(Contender(name, relay_port, pid))
        yield found, sink, redis


def load(port: int, shape: str, messages: int) -> list[str]:
    keep = ["-d"] if shape == "kept" else []
    return [
        binary("smtp-source"),
        *("-s", str(SESSIONS), "-m", str(messages), "-l", str(SIZE), *keep),
        *("-f", SENDER, "-t", RECIPIENT, "-M", "client.bench"),
        f"127.0.0.1:{port}",
    ]


def run_once(contender: Contender, shape: str, messages: int, redis: int) -> tuple[float, ...]:
    egressd_before = cpu_seconds(contender.pid) if contender.pid else 0.0
    redis_before = cpu_seconds(redis)
    started = time.perf_counter()
    done = subprocess.run(
        load(contender.port, shape, messages), capture_output=True, check=False, env=python_env()
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench: smtp-source failed: {(done.stdout + done.stderr).decode()[-2000:]}")
    egressd = cpu_seconds(contender.pid) - egressd_before if contender.pid else 0.0
    redis_cpu = cpu_seconds(redis) - redis_before
    return messages / seconds, egressd * 1000 / messages, redis_cpu * 1000 / messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench budgets", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--seconds", type=float, default=2.0, help="about this long per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    children_cpu_seconds()
    with (
        tempfile.TemporaryDirectory(prefix="egressd-budgets-bench-") as tmp,
        contenders(Path(tmp)) as (found, _sink, redis),
    ):
        for contender in found:
            for shape in SHAPES:
                rate = run_once(contender, shape, SESSIONS * 10, redis)[0]
                contender.size_for[shape] = max(SESSIONS * 5, int(rate * args.seconds))
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            order = found if number % 2 == 0 else list(reversed(found))
            for shape in SHAPES:
                for contender in order:
                    result = run_once(contender, shape, contender.size_for[shape], redis)
                    contender.runs.setdefault(shape, []).append(result)
    rows = [row(shape, found) for shape in SHAPES]
    if args.json:
        print(json.dumps({"rounds": args.rounds, "shapes": rows}))
    else:
        print_table(rows, args.rounds)
    return 0


def median(runs: list[tuple[float, float, float]], index: int) -> float:
    return float(statistics.median(run[index] for run in runs))


def row(shape: str, found: list[Contender]) -> dict[str, object]:
    direct, local, shared = (c.runs[shape] for c in found)
    return {
        "shape": shape,
        "direct_msgs_per_s": round(median(direct, 0), 1),
        "in_process_msgs_per_s": round(median(local, 0), 1),
        "redis_msgs_per_s": round(median(shared, 0), 1),
        "in_process_cpu_ms_per_msg": round(median(local, 1), 3),
        "redis_cpu_ms_per_msg": round(median(shared, 1), 3),
        "redis_server_cpu_ms_per_msg": round(median(shared, 2), 4),
        "in_process_rounds": [round(run[0]) for run in local],
        "redis_rounds": [round(run[0]) for run in shared],
    }


def print_table(rows: list[dict[str, object]], rounds: int) -> None:
    print(
        f"SMTP door with shaping budgets (connection_limit + max_message_rate), medians of"
        f" {rounds} alternating rounds.\nCPU in ms per message (user+system) of egressd;"
        " 'redis-server' is Redis's own CPU per message."
    )
    header = (
        f"{'shape':<6} {'direct/s':>9} {'local/s':>9} {'redis/s':>9} {'rate':>6}"
        f" {'local CPU':>10} {'redis CPU':>10} {'CPU':>6} {'redis-server':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        local_rate, shared_rate = float(r["in_process_msgs_per_s"]), float(r["redis_msgs_per_s"])  # type: ignore[arg-type]
        local_cpu, shared_cpu = (
            float(r["in_process_cpu_ms_per_msg"]),
            float(r["redis_cpu_ms_per_msg"]),
        )  # type: ignore[arg-type]
        print(
            f"{r['shape']:<6} {r['direct_msgs_per_s']:>9.0f} {local_rate:>9.0f} {shared_rate:>9.0f}"
            f" {shared_rate / local_rate - 1:>+6.0%} {local_cpu:>8.3f}ms {shared_cpu:>8.3f}ms"
            f" {shared_cpu / local_cpu - 1:>+6.0%} {r['redis_server_cpu_ms_per_msg']:>11.4f}ms"
        )


if __name__ == "__main__":
    sys.exit(main())
