"""How many workers the kernel wakes per connection, and what a worker's death costs, for
the ways N worker processes can share a listening port (issue 12: workers without a
thundering herd).

Run it through ``scripts/bench accept-wakeups`` (``--help`` for the knobs). Each worker is a
forked process with an epoll loop shaped like trio's: it blocks in ``epoll_wait`` on its own
epoll, and when woken accepts until EAGAIN. The parent connects ``--connections`` times, one
at a time with a short gap, so every worker is idle at each arrival: the worst case for a
herd. Per connection it reports the wake-ups that reached user space, the failed accepts
(EAGAIN: woken for a connection another worker took) and the voluntary context switches
(a wake-up the kernel absorbs inside ``epoll_wait``, because the connection was gone when
the woken worker looked, costs a switch but no return to user space), the workers' CPU
(user + system, microseconds: the accept itself and the loop, in C here, so the figure
is the kernel's share of a connection's cost), and each worker's share.

variants
  shared       one socket; each worker's epoll holds it with EPOLLIN | EPOLLONESHOT and
               re-arms it after each wake-up, as trio's ``wait_readable`` does (egressd today).
  exclusive    one socket, registered with EPOLLIN | EPOLLEXCLUSIVE in the epoll the worker
               blocks in. trio cannot do this: its epoll is private and re-arms with
               EPOLL_CTL_MOD, which EPOLLEXCLUSIVE refuses.
  nested       one socket, registered with EPOLLEXCLUSIVE in an inner epoll per worker,
               whose descriptor the worker's (trio-like) epoll waits on, then drained with
               ``poll(0)``. The kernel's exclusive wake-up stops at an epoll that has a task
               blocked in it (ep_poll_callback in fs/eventpoll.c); nobody blocks in the inner
               epoll, so the walk goes on and every worker's outer epoll is woken.
  reuseport    a socket per worker with SO_REUSEPORT: the kernel hashes each connection to one.

Then the cost of a worker's death: with every worker stopped (SIGSTOP), ``--queued``
clients connect (the kernel completes their handshakes into the backlog); worker 1 is
killed, the others continue, and each client learns whether it was accepted or reset.
On one shared socket the backlog belongs to no worker; with SO_REUSEPORT the connections
hashed to the dead worker's socket are reset with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence

VARIANTS = ("shared", "exclusive", "nested", "reuseport")
ONESHOT = select.EPOLLIN | select.EPOLLONESHOT


def listeners(variant: str, workers: int) -> list[socket.socket]:
    """The listening sockets: one shared, or one per worker (reuseport), on one port."""
    count = workers if variant == "reuseport" else 1
    sockets: list[socket.socket] = []
    port = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if variant == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        sock.listen(4096)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def context_switches() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(variant: str, listener: socket.socket, report: int, seconds: float) -> None:
    """One worker's loop for ``seconds``; writes its counts to ``report`` as a JSON line."""
    outer = select.epoll()
    inner = None
    if variant == "exclusive":
        outer.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
    elif variant == "nested":
        inner = select.epoll()
        inner.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        outer.register(inner.fileno(), ONESHOT)
    else:
        outer.register(listener.fileno(), ONESHOT)
    counts = {"wakeups": 0, "accepted": 0, "failed": 0}
    switches, cpu = context_switches(), cpu_seconds()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not outer.poll(min(left, 0.2)):
            continue
        counts["wakeups"] += 1
        if inner is not None:
            inner.poll(0)
        while True:
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                counts["failed"] += 1
                break
            connection.close()
            counts["accepted"] += 1
        if variant != "exclusive":
            outer.modify(inner.fileno() if inner is not None else listener.fileno(), ONESHOT)
    counts["switches"] = context_switches() - switches
    counts["cpu_us"] = round((cpu_seconds() - cpu) * 1e6)
    os.write(report, (json.dumps(counts) + "\n").encode())


def start_workers(
    variant: str, sockets: list[socket.socket], workers: int, seconds: float
) -> tuple[list[int], int]:
    """Fork the workers; their pids and the pipe their reports come back on."""
    read, write = os.pipe()
    pids = []
    for number in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                worker(variant, sockets[number % len(sockets)], write, seconds)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write)
    return pids, read


def reports(pids: Sequence[int], read: int) -> list[dict[str, int]]:
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(read) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def wakeups(variant: str, workers: int, connections: int, gap: float) -> dict[str, object]:
    """Per connection: wake-ups, failed accepts, context switches; each worker's share."""
    sockets = listeners(variant, workers)
    address = sockets[0].getsockname()
    seconds = 0.5 + connections * (gap + 0.001) + 1.0
    pids, read = start_workers(variant, sockets, workers, seconds)
    for sock in sockets:
        sock.close()
    time.sleep(0.3)
    for _ in range(connections):
        with socket.create_connection(address):
            pass
        time.sleep(gap)
    counts = reports(pids, read)
    accepted = sum(c["accepted"] for c in counts)
    return {
        "variant": variant,
        "accepted": accepted,
        "wakeups": sum(c["wakeups"] for c in counts) / connections,
        "failed": sum(c["failed"] for c in counts) / connections,
        "switches": sum(c["switches"] for c in counts) / connections,
        "cpu_us": sum(c["cpu_us"] for c in counts) / connections,
        "shares": [c["accepted"] for c in counts],
    }


def death(variant: str, workers: int, queued: int) -> dict[str, object]:
    """``queued`` clients wait in the backlog while every worker is stopped; worker 1 is
    killed, the others continue: how many clients are served, how many reset."""
    sockets = listeners(variant, workers)
    address = sockets[0].getsockname()
    pids, read = start_workers(variant, sockets, workers, 3.0)
    for sock in sockets:
        sock.close()
    time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    clients = [socket.create_connection(address) for _ in range(queued)]
    os.kill(pids[0], signal.SIGKILL)
    for pid in pids[1:]:
        os.kill(pid, signal.SIGCONT)
    served = reset = 0
    for client in clients:
        client.settimeout(5)
        try:
            served += client.recv(1) == b""  # accepted, then closed by a worker: EOF
        except ConnectionResetError:
            reset += 1
        except TimeoutError:
            pass  # neither: counted as lost below
        client.close()
    reports(pids, read)
    return {"variant": variant, "queued": queued, "served": served, "reset": reset}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench accept-wakeups", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--connections", type=int, default=1000, help="per variant (1000)")
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between them")
    parser.add_argument("--queued", type=int, default=200, help="clients queued at a death")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    print(
        f"{args.workers} workers, {args.connections} connections one at a time"
        f" ({args.gap * 1000:g} ms apart); per connection:"
    )
    print(
        f"{'variant':<10} {'wake-ups':>9} {'EAGAIN':>7} {'switches':>9} {'CPU us':>7}"
        "  accepted per worker"
    )
    for variant in variants:
        row = wakeups(variant, args.workers, args.connections, args.gap)
        print(
            f"{variant:<10} {row['wakeups']:>9.2f} {row['failed']:>7.2f}"
            f" {row['switches']:>9.2f} {row['cpu_us']:>7.1f}  {row['shares']}",
            flush=True,
        )
    print(f"\nworker 1 killed with {args.queued} clients queued and every worker stopped:")
    for variant in variants:
        row = death(variant, args.workers, args.queued)
        lost = args.queued - int(str(row["served"]))
        print(f"{variant:<10} served {row['served']}, reset {row['reset']}, lost {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
