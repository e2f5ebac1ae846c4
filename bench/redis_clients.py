"""Redis clients under trio: calls per second against a real local redis-server.

Theory of operation
-------------------
egressd's Redis backend (issue 16) needs a client that runs on trio. Two are native to
anyio and so run on trio: coredis (since 6.0) and valkey-glide (a Rust core behind an FFI,
2.x). This starts Debian's ``redis-server`` in the foreground on a free loopback port with a
private directory and no persistence, then measures, for each client installed, in one
trio loop:

- ``set+get``: sequential ``SET`` then ``GET`` round trips (one call at a time);
- ``evalsha``: sequential ``EVALSHA`` of a small Lua script (an ``INCRBY`` with
  ``PEXPIRE``, the shape of a budget call), loaded once with ``SCRIPT LOAD``;
- ``get, N tasks``: N trio tasks each issuing ``GET`` in a loop on one shared client.

Each figure is calls per second (wall) and the client process's CPU per call (µs, from
``time.process_time``, which includes glide's Rust threads). Every case runs ``--rounds``
times; the median is printed. The server's CPU is printed too, so a figure limited by the
server shows as such.

    scripts/bench redis-client [--calls 5000] [--rounds 3] [--tasks 16,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import binary, cpu_seconds, free_port, running

SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 60000)
return n
"""

Call = Callable[[], Awaitable[Any]]


@dataclass
class Figure:
    calls_per_second: float
    cpu_us_per_call: float
    server_cpu_us_per_call: float


class Client:
    """One client library's calls, behind the same four coroutines."""

    name = ""

    async def set_get(self, key: str) -> None:
        raise NotImplementedError

    async def get(self, key: str) -> None:
        raise NotImplementedError

    async def evalsha(self, key: str) -> None:
        raise NotImplementedError


class Coredis(Client):
    name = "coredis"

    def __init__(self, client: Any, sha: str) -> None:
        self.client, self.sha = client, sha

    async def set_get(self, key: str) -> None:
        await self.client.set(key, "v")
        await self.client.get(key)

    async def get(self, key: str) -> None:
        await self.client.get(key)

    async def evalsha(self, key: str) -> None:
        await self.client.evalsha(self.sha, keys=[key], args=[1])


class Glide(Client):
    name = "valkey-glide"

    def __init__(self, client: Any, sha: str) -> None:
        self.client, self.sha = client, sha

    async def set_get(self, key: str) -> None:
        await self.client.set(key, "v")
        await self.client.get(key)

    async def get(self, key: str) -> None:
        await self.client.get(key)

    async def evalsha(self, key: str) -> None:
        await self.client.custom_command(["EVALSHA", self.sha, "1", key, "1"])


async def measure(calls: int, tasks: int, call: Call, server_pid: int) -> Figure:
    """``calls`` calls of ``call`` spread over ``tasks`` concurrent tasks."""
    each = calls // tasks

    async def worker() -> None:
        for _ in range(each):
            await call()

    cpu0, server0, wall0 = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    wall = time.perf_counter() - wall0
    cpu, server = time.process_time() - cpu0, cpu_seconds(server_pid) - server0
    done = each * tasks
    return Figure(done / wall, cpu / done * 1e6, server / done * 1e6)


async def run_cases(
    client: Client, args: argparse.Namespace, server_pid: int
) -> dict[str, list[Figure]]:
    cases: list[tuple[str, int, Call]] = [
        ("set+get (2 calls)", 1, lambda: client.set_get("bench:k")),
        ("evalsha", 1, lambda: client.evalsha("bench:e")),
    ]
    for tasks in args.tasks:
        cases.append((f"get, {tasks} tasks", tasks, lambda: client.get("bench:k")))
    results: dict[str, list[Figure]] = {}
    await measure(200, 1, cases[0][2], server_pid)  # warm the connection
    for _ in range(args.rounds):
        for label, tasks, call in cases:
            calls = args.calls // 2 if label.startswith("set+get") else args.calls
            figure = await measure(calls, tasks, call, server_pid)
            if label.startswith("set+get"):
                figure = Figure(
                    figure.calls_per_second * 2,
                    figure.cpu_us_per_call / 2,
                    figure.server_cpu_us_per_call / 2,
                )
            results.setdefault(label, []).append(figure)
    return results


async def with_coredis(
    port: int, args: argparse.Namespace, server_pid: int
) -> dict[str, list[Figure]] | str:
    try:
        import coredis
    except ImportError as exc:
        return f"not installed ({exc})"
    coredis.Config.optimized = True  # its fastest setting: most runtime validation off
    async with coredis.Redis(host="127.0.0.1", port=port, max_connections=256) as client:
        sha = await client.script_load(SCRIPT)
        sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return await run_cases(Coredis(client, sha), args, server_pid)


async def with_glide(
    port: int, args: argparse.Namespace, server_pid: int
) -> dict[str, list[Figure]] | str:
    try:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress
    except ImportError as exc:
        return f"not installed ({exc})"
    client = await GlideClient.create(
        GlideClientConfiguration([NodeAddress("127.0.0.1", port)], request_timeout=5000)
    )
    try:
        sha = await client.custom_command(["SCRIPT", "LOAD", SCRIPT])
        sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return await run_cases(Glide(client, sha), args, server_pid)
    finally:
        await client.close()


def print_table(results: dict[str, dict[str, list[Figure]] | str], rounds: int) -> None:
    print(
        f"Redis clients under trio {trio.__version__}, local redis-server, "
        f"median of {rounds} rounds"
    )
    print(
        f"{'client':<14} {'case':<20} {'calls/s':>10} {'client µs/call':>15} {'server µs/call':>15}"
    )
    for name, cases in results.items():
        if isinstance(cases, str):
            print(f"{name:<14} {cases}")
            continue
        for label, figures in cases.items():
            rate = statistics.median(f.calls_per_second for f in figures)
            cpu = statistics.median(f.cpu_us_per_call for f in figures)
            server = statistics.median(f.server_cpu_us_per_call for f in figures)
            print(f"{name:<14} {label:<20} {rate:>10,.0f} {cpu:>15.1f} {server:>15.1f}")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench redis-client", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000, help="calls per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tasks",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16, 64],
        help="concurrent task counts, comma-separated",
    )
    parser.add_argument("--clients", default="coredis,glide", help="which clients (coredis, glide)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="egressd-bench-redis-") as directory:
        workdir = Path(directory)
        argv_server = [
            binary("redis-server"),
            "--bind", "127.0.0.1", "--port", str(port), "--dir", directory,
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        with running(argv_server, port, workdir, "redis-server") as pid:
            results: dict[str, dict[str, list[Figure]] | str] = {}
            chosen = args.clients.split(",")
            if "coredis" in chosen:
                results["coredis"] = trio.run(with_coredis, port, args, pid)
            if "glide" in chosen:
                results["valkey-glide"] = trio.run(with_glide, port, args, pid)
    print_table(results, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
