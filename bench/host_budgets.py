"""Where the host's shared budgets live with [daemon] workers: the supervisor or SQLite.

Run it through ``scripts/bench host-budgets``. Two ways for the workers of one host to
count one connection limit exactly, each measured as what a worker waits per exchange:

* **the supervisor** (what egressd does, :mod:`egressd.hostbudgets`): a worker sends one
  batch of ops over its channel (:mod:`egressd.net.channel`, JSON over a unix socket) and
  awaits the answer of another process running trio; measured with one and two workers
  asking at once;
* **SQLite**: one ``BEGIN IMMEDIATE`` transaction (count the live slots, add one, commit)
  in a WAL database, from one process and from two processes writing at once (then
  SQLite's busy handler sleeps while the other holds the lock, blocking the caller).

Prints the mean, the 99th percentile and the worst exchange, and the load average.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from egressd.hostbudgets import BudgetBook
from egressd.net.channel import Channel, ChannelClosed, socket_pair

OPS = {
    "keys": ["egressd:leases:connection_limit:a:mx.example:5"],
    "args": ["30000", "A", "w/1", "5", "", ""],
}


def summary(name: str, waits: list[float]) -> str:
    waits = sorted(waits)
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    return (
        f"{name:<44} mean {statistics.mean(waits) * 1e6:7.0f} us   p99 {p99 * 1e6:7.0f} us"
        f"   max {waits[-1] * 1e3:6.1f} ms"
    )


# --------------------------------------------------------------------------- the supervisor


async def supervisor(channels: list[Channel]) -> None:
    book = BudgetBook()

    async def serve(owner: int, channel: Channel) -> None:
        try:
            while True:
                message, _ = await channel.receive()
                now = time.monotonic_ns() // 1000
                book.leases.clear()
                reply = book.run(owner, message["keys"], message["args"], now)
                await channel.send({"type": "answer", "id": message["id"], "reply": reply})
        except ChannelClosed:
            return

    async with trio.open_nursery() as nursery:
        for owner, channel in enumerate(channels, 1):
            nursery.start_soon(serve, owner, channel)


async def worker(fd: int, count: int) -> None:
    channel = Channel(socket.socket(fileno=fd))
    waits = []
    for number in range(count):
        began = time.perf_counter()
        await channel.send({**OPS, "id": number})
        await channel.receive()
        waits.append(time.perf_counter() - began)
    print(" ".join(f"{wait:.9f}" for wait in waits))
    channel.close()


def channel_waits(workers: int, count: int) -> list[float]:
    pairs = [socket_pair() for _ in range(workers)]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(theirs.fileno()), str(count)],
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
        )
        for _, theirs in pairs
    ]
    for _, theirs in pairs:
        theirs.close()
    trio.run(supervisor, [Channel(mine) for mine, _ in pairs])
    return [float(w) for child in children for w in child.communicate()[0].split()]


# --------------------------------------------------------------------------- SQLite


def sqlite_writer(path: str, tag: str, count: int) -> None:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("pragma synchronous=normal")
    waits = []
    for number in range(count):
        began = time.perf_counter()
        db.execute("begin immediate")
        db.execute("delete from leases where expiry < ?", (number,))
        live = db.execute("select count(*) from leases where key = 'k'").fetchone()[0]
        if live < 5:
            db.execute("insert or replace into leases values ('k', ?, ?)", (tag, number + 5))
        db.execute("commit")
        waits.append(time.perf_counter() - began)
    print(" ".join(f"{wait:.9f}" for wait in waits))


def sqlite_waits(writers: int, count: int, directory: Path) -> list[float]:
    path = str(directory / f"budgets-{writers}.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("create table leases (key text, member text, expiry int, primary key(key, member))")
    db.close()
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--sqlite", path, f"w{n}", str(count)],
            stdout=subprocess.PIPE,
        )
        for n in range(writers)
    ]
    return [float(w) for child in children for w in child.communicate()[0].split()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench host-budgets", description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="exchanges per worker")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sqlite", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        trio.run(partial(worker, int(args.worker[0]), int(args.worker[1])))
        return 0
    if args.sqlite:
        sqlite_writer(args.sqlite[0], args.sqlite[1], int(args.sqlite[2]))
        return 0
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"one connection-limit exchange, {args.count} per worker; load average {load}")
    with tempfile.TemporaryDirectory(prefix="egressd-host-budgets-") as tmp:
        for workers in (1, 2):
            print(
                summary(
                    f"supervisor over the channel, {workers} worker(s)",
                    channel_waits(workers, args.count),
                )
            )
        for writers in (1, 2):
            print(
                summary(
                    f"SQLite BEGIN IMMEDIATE, {writers} writer(s)",
                    sqlite_waits(writers, args.count, Path(tmp)),
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
