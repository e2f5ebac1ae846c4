"""Benchmark egressd's SOCKS5 door and splice against socat, HAProxy and Dante, on loopback.

Run it through ``scripts/bench`` (``--help`` for the knobs). Everything runs side by side in
one invocation, each server as its own process started here and stopped by its PID:

throughput      one connection moves ``--gib`` GiB (default 1) client -> sink through
                egressd's SOCKS5 door (os.splice path), socat (``-b65536``), HAProxy (tcp
                mode) and directly. Target: egressd >= socat.
splice paths    the same through a bare trio relay built on egressd.net.splice, zero-copy
                vs the portable trio path.
session rate    ``--sessions`` short sessions (curl --parallel: connect, SOCKS5 handshake,
                one HTTP exchange, close), ``--concurrency`` at a time, through egressd
                and through Dante (which forks: its CPU is its whole process tree's, see
                procs.py). ``--workers 1,2`` measures egressd with ``[daemon] workers =
                1`` and ``2`` (supervisor and workers summed) in the same rounds. Issue
                12's targets: a rate >= 2x Dante's (workers allowed), CPU per session
                <= 0.6x Dante's.
idle memory     ``--idle`` sessions opened through a fresh egressd, one exchange each, then
                left idle; the daemon's RSS growth per session. Target: <= 20 KiB.

``--baseline DIR`` adds an egressd imported from the checkout ``DIR`` (say ``git worktree add
DIR COMMIT``; it runs with this checkout's .venv) to the session-rate runs of every round, so
a before/after comparison does not depend on how busy the machine was. ``--gib 0`` and
``--idle 0`` leave out the throughput and idle-memory parts.

All servers run at once and the measurements alternate: each of ``--repeat`` rounds takes
one throughput run through each contender and one session-rate run through egressd and
through Dante; the table shows medians over the rounds. (This machine's speed drifts by tens
of percent over minutes; measuring in rounds spreads the drift over every contender.)

The load generators are bench/relay_load.py processes, so the client, the proxy and the
sink do not share an interpreter. Nothing is installed: scripts/test sets up .venv and
the Debian packages (haproxy, dante-server, socat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from procs import (
    ROOT,
    binary,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    python_env,
    running,
)

LOAD = [sys.executable, str(ROOT / "bench" / "relay_load.py")]
EGRESSD = [sys.executable, "-m", "egressd"]
GIB = 1 << 30


# --------------------------------------------------------------------------- processes


def load(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [*LOAD, *args],
        capture_output=True,
        check=False,
        env=python_env(),
    )
    if done.returncode != 0:
        sys.exit(f"bench: relay_load {' '.join(args)} failed:\n{done.stderr.decode()}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- servers


def egressd_config(
    workdir: Path, port: int, destination_ports: Sequence[int], workers: int = 1
) -> Path:
    path = workdir / f"egressd-{port}.toml"
    daemon = f"\n[daemon]\nworkers = {workers}\n" if workers > 1 else ""
    path.write_text(
        f"""
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{", ".join(str(p) for p in destination_ports)}]
deny_destinations = []

[limits]
max_connections = 100000
max_connections_per_source = 100000

[[socks5.listener]]
address = "127.0.0.1:{port}"
pool = "main"
{daemon}"""
    )
    return path


@contextlib.contextmanager
def egressd(
    workdir: Path, destination_ports: Sequence[int], root: Path = ROOT, workers: int = 1
) -> Iterator[tuple[int, int]]:
    """An egressd imported from the checkout ``root``, with ``[daemon] workers``: (port,
    pid); its CPU (:func:`cpu_seconds` of the pid) is the supervisor's and the workers'."""
    port = free_port()
    config = egressd_config(workdir, port, destination_ports, workers)
    argv = [*EGRESSD, "run", "-c", str(config)]
    name = f"egressd-{port}"
    with running(argv, port, workdir, name, root=root) as pid:
        if workers > 1:
            wait_ready(workdir / f"{name}.log")
        yield port, pid


def wait_ready(log: Path, timeout: float = 60.0) -> None:
    """Until the supervisor logged that every worker is ready (the port listens before)."""
    deadline = time.monotonic() + timeout
    while "egressd ready" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            sys.exit(f"bench: the workers did not start:\n{log.read_text()}")
        time.sleep(0.05)


HAPROXY_CONFIG = """\
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server sink 127.0.0.1:{sink}
"""


@contextlib.contextmanager
def haproxy(workdir: Path, sink: int) -> Iterator[int]:
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, sink=sink))
    with running([binary("haproxy"), "-f", str(config), "-db"], port, workdir, "haproxy"):
        yield port


@contextlib.contextmanager
def socat(workdir: Path, sink: int) -> Iterator[int]:
    port = free_port()
    argv = [
        binary("socat"),
        "-b65536",
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
        f"TCP:127.0.0.1:{sink}",
    ]
    with running(argv, port, workdir, "socat"):
        yield port


DANTE_CONFIG = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.3
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: connect error
}}
"""


@contextlib.contextmanager
def dante(workdir: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    config = workdir / "danted.conf"
    config.write_text(DANTE_CONFIG.format(port=port))
    argv = [binary("danted"), "-f", str(config), "-N", "2"]
    with running(argv, port, workdir, "dante") as pid:
        yield port, pid


@contextlib.contextmanager
def bare_relay(workdir: Path, sink: int, zero_copy: bool) -> Iterator[int]:
    port = free_port()
    argv = [*LOAD, "relay", str(port), "--dest", f"127.0.0.1:{sink}"]
    argv += ["--zero-copy", "yes" if zero_copy else "no"]
    with running(argv, port, workdir, f"relay-{'splice' if zero_copy else 'trio'}"):
        yield port


PONG_CONFIG = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend pong
    bind 127.0.0.1:{port}
    option httpclose
    http-request return status 200 content-type text/plain string "PONG"
"""


@contextlib.contextmanager
def pong_sink(workdir: Path) -> Iterator[tuple[int, int]]:
    """HAProxy answering every HTTP request itself and closing: the C sink for curl."""
    port = free_port()
    config = workdir / "pong.cfg"
    config.write_text(PONG_CONFIG.format(port=port))
    with running([binary("haproxy"), "-f", str(config), "-db"], port, workdir, "pong") as pid:
        yield port, pid


def contender_name(name: str, workers: int) -> str:
    """``egressd`` or ``baseline`` with one worker, ``egressd w2`` with two."""
    return name if workers == 1 else f"{name} w{workers}"


def session_proxies(
    servers: contextlib.ExitStack,
    workdir: Path,
    args: argparse.Namespace,
    ours: tuple[int, int],
    ports: Sequence[int],
) -> dict[str, tuple[int, int]]:
    """The short-session contenders, (port, pid) by name: egressd with each ``--workers``
    count (``ours``, the throughput egressd, is the one with one worker), Dante, and the
    baseline egressd with the same counts."""
    proxies: dict[str, tuple[int, int]] = {}
    roots = [("egressd", ROOT)]
    if args.baseline is not None:
        roots.append(("baseline", args.baseline.resolve()))
    for name, root in roots:
        for count in args.workers:
            if name == "egressd" and count == 1:
                proxies["egressd"] = ours
            else:
                started = egressd(workdir, ports, root, workers=count)
                proxies[contender_name(name, count)] = servers.enter_context(started)
        if name == "egressd":
            proxies["Dante"] = servers.enter_context(dante(workdir))
    return proxies


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    name: str
    value: float
    unit: str
    reference: str | None = None
    reference_value: float | None = None
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value:
            return self.value / self.reference_value
        return None


def blast_once(
    proxy: str | None, sink: tuple[int, int], size: int, socks: bool
) -> tuple[float, float, float]:
    """GiB/s of one ``size``-byte transfer to ``sink`` (port, pid), directly or through
    ``proxy``; and the CPU seconds per GiB of the generator and of the sink."""
    port, sink_pid = sink
    if proxy is None:
        args = ["blast", "--dest", f"127.0.0.1:{port}"]
    elif socks:
        args = ["blast", "--proxy", proxy, "--dest", f"127.0.0.1:{port}"]
    else:  # a plain TCP forwarder: connect to it as if it were the sink
        args = ["blast", "--dest", proxy]
    sink_before, generator_before = cpu_seconds(sink_pid), children_cpu_seconds()
    result = load(*args, "--bytes", str(size))
    gib = result["bytes"] / GIB
    return (
        gib / result["seconds"],
        (children_cpu_seconds() - generator_before) / gib,
        (cpu_seconds(sink_pid) - sink_before) / gib,
    )


@dataclass
class Sample:
    """One session-rate run: sessions/s and CPU ms per session of proxy, generator, sink."""

    rate: float
    proxy_ms: float
    generator_ms: float
    sink_ms: float


def curl_sessions(proxy: int | None, sink: int, sessions: int, concurrency: int) -> float:
    """``sessions`` HTTP requests with curl --parallel, each on a new connection (the sink
    closes), through the SOCKS5 proxy or straight; returns the seconds they took."""
    argv = [binary("curl"), "-s", "--parallel", "--parallel-max", str(concurrency)]
    argv += ["-o", "/dev/null", "-w", "%{http_code}\\n"]
    if proxy is not None:
        argv += ["--socks5", f"127.0.0.1:{proxy}"]
    argv.append(f"http://127.0.0.1:{sink}/[1-{sessions}]")
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    ok = done.stdout.split().count(b"200")
    if ok != sessions:
        sys.exit(f"bench: {sessions - ok} of {sessions} curl sessions failed")
    return seconds


def python_sessions(proxy: int | None, sink: int, sessions: int, concurrency: int) -> float:
    """The same with the asyncio generator (connect, SOCKS5, one line echoed, close)."""
    args = ["rate", "--dest", f"127.0.0.1:{sink}", "--sessions", str(sessions)]
    args += ["--concurrency", str(concurrency)]
    if proxy is not None:
        args += ["--proxy", f"127.0.0.1:{proxy}"]
    result = load(*args)
    if result["failures"]:
        sys.exit(f"bench: {result['failures']} of {sessions} sessions failed")
    return result["seconds"]


def sessions_once(
    client: str,
    proxy: tuple[int, int] | None,
    sink: tuple[int, int],
    sessions: int,
    concurrency: int,
) -> Sample:
    """One run of ``sessions`` short sessions through ``proxy`` (port, pid) or straight to
    ``sink`` (port, pid); the CPU of the proxy, the generator and the sink per session."""
    proxy_before = cpu_seconds(proxy[1]) if proxy else 0.0
    sink_before = cpu_seconds(sink[1])
    generator_before = children_cpu_seconds()
    run = curl_sessions if client == "curl" else python_sessions
    seconds = run(proxy[0] if proxy else None, sink[0], sessions, concurrency)
    per_session = 1000 / sessions
    return Sample(
        rate=sessions / seconds,
        proxy_ms=(cpu_seconds(proxy[1]) - proxy_before) * per_session if proxy else 0.0,
        generator_ms=(children_cpu_seconds() - generator_before) * per_session,
        sink_ms=(cpu_seconds(sink[1]) - sink_before) * per_session,
    )


class Rounds:
    """Measurements taken in alternation, one of each per round, and their medians.

    The machine's speed drifts (a shared VM: +-30% over minutes); measuring every contender
    once per round, rather than one contender's repeats in a block, spreads that drift over
    all of them instead of biasing whichever ran in the slow minutes.
    """

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


def idle_memory(workdir: Path, sink: int, count: int) -> tuple[float, int]:
    """KiB of daemon RSS per idle spliced session, and the daemon's fds at ``count``."""
    with egressd(workdir, [sink]) as (port, pid):
        hold(port, sink, 200)  # warm up: imports, pools, first allocations
        before = rss_kib(pid)
        holder = subprocess.Popen(
            hold_argv(port, sink, count),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=python_env(),
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            if holder.stdout.readline().strip() != b"ready":
                sys.exit("bench: the idle-session holder failed")
            time.sleep(1.0)
            after, fds = rss_kib(pid), open_fds(pid)
            holder.stdin.close()
            holder.wait(30)
        finally:
            if holder.poll() is None:
                holder.kill()
    return (after - before) / count, fds


def hold_argv(port: int, sink: int, count: int) -> list[str]:
    proxy, dest = f"127.0.0.1:{port}", f"127.0.0.1:{sink}"
    return [*LOAD, "hold", "--proxy", proxy, "--dest", dest, "--count", str(count)]


def hold(port: int, sink: int, count: int) -> None:
    subprocess.run(
        hold_argv(port, sink, count),
        input=b"",
        capture_output=True,
        check=True,
        env=python_env(),
    )


# --------------------------------------------------------------------------- main


def print_table(rows: Sequence[Row]) -> None:
    header = f"{'measurement':<44} {'value':>12}  {'reference':<26} {'ratio':>6}  target"
    print(header)
    print("-" * len(header))
    for row in rows:
        value = f"{row.value:.2f} {row.unit}"
        reference = (
            f"{row.reference} {row.reference_value:.2f}" if row.reference_value is not None else ""
        )
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        print(f"{row.name:<44} {value:>12}  {reference:<26} {ratio:>6}  {row.target}")
        if row.note:
            print(f"{'':<46}{row.note}")


def raise_fd_limit(sessions: int) -> None:
    """Room for ``sessions`` idle spliced sessions in every process started from here (they
    inherit the limit): the holder's clients, the sink's ends, and egressd's two sockets
    and splice pipes per session. Root may raise the hard limit too (up to fs.nr_open)."""
    wanted = 8 * sessions + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
    top = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def run(args: argparse.Namespace) -> int:
    size = int(args.gib * GIB)
    if args.idle:
        raise_fd_limit(args.idle)
    rounds = Rounds()
    with tempfile.TemporaryDirectory(prefix="egressd-bench-") as tmp:
        workdir = Path(tmp)
        blast_port, echo_port = free_port(), free_port()
        with contextlib.ExitStack() as servers:
            sinks = {}
            for name, port in (("blast-sink", blast_port), ("echo-sink", echo_port)):
                pid = servers.enter_context(running([*LOAD, name, str(port)], port, workdir, name))
                sinks[name] = (port, pid)
            blast = sinks["blast-sink"]
            session_sink = sinks["echo-sink"]
            if args.client == "curl":
                session_sink = servers.enter_context(pong_sink(workdir))
            ours = servers.enter_context(egressd(workdir, [blast_port, session_sink[0]]))
            forwarders = {
                "socat": servers.enter_context(socat(workdir, blast_port)),
                "HAProxy": servers.enter_context(haproxy(workdir, blast_port)),
                "zero-copy": servers.enter_context(bare_relay(workdir, blast_port, True)),
                "trio path": servers.enter_context(bare_relay(workdir, blast_port, False)),
            }
            proxies = session_proxies(servers, workdir, args, ours, [blast_port, session_sink[0]])
            print(
                f"{args.repeat} rounds; each: {args.gib:g} GiB through each, then"
                f" {args.sessions} short sessions ({args.client}) straight to the sink, through"
                " egressd and through Dante",
                flush=True,
            )
            for number in range(1, args.repeat + 1):
                print(f"round {number}", flush=True)
                contenders: list[tuple[str, str | None, bool]] = [
                    ("direct", None, False),
                    ("egressd", f"127.0.0.1:{ours[0]}", True),
                ]
                contenders += [(n, f"127.0.0.1:{p}", False) for n, p in forwarders.items()]
                for name, proxy, socks in contenders if size else []:
                    rate, generator, sink = blast_once(proxy, blast, size, socks)
                    rounds.add(name, rate)
                    rounds.add(f"{name} gen", generator)
                    rounds.add(f"{name} sink", sink)
                through: list[tuple[str, tuple[int, int] | None]] = [("direct", None)]
                order = list(proxies.items())
                if number % 2 == 0:  # alternate which proxy runs first
                    order.reverse()
                for name, via in [*through, *order]:
                    sample = sessions_once(
                        args.client, via, session_sink, args.sessions, args.concurrency
                    )
                    rounds.add(f"{name} rate", sample.rate)
                    rounds.add(f"{name} cpu", sample.proxy_ms)
                    rounds.add(f"{name} session gen", sample.generator_ms)
                    rounds.add(f"{name} session sink", sample.sink_ms)
                    print(
                        f"  {name}: {sample.rate:.0f}/s, {sample.proxy_ms:.3f} ms CPU/session",
                        flush=True,
                    )
            per_session, fds = 0.0, 0
            if args.idle:
                print(f"idle memory: {args.idle} sessions", flush=True)
                per_session, fds = idle_memory(workdir, echo_port, args.idle)
    print()
    print_table(table_rows(rounds, args, per_session, fds))
    return 0


def table_rows(rounds: Rounds, args: argparse.Namespace, per_session: float, fds: int) -> list[Row]:
    med = rounds.median

    def blast_note(name: str) -> str:
        return f"gen {med(f'{name} gen'):.2f} s/GiB, sink {med(f'{name} sink'):.2f} s/GiB"

    def session_note(name: str) -> str:
        gen, sink = med(f"{name} session gen"), med(f"{name} session sink")
        return f"{args.client} {gen:.3f} ms, sink {sink:.3f} ms per session"

    def throughput() -> list[Row]:
        return [
            Row(
                "throughput, no proxy (loopback ceiling)",
                med("direct"),
                "GiB/s",
                note=blast_note("direct"),
            ),
            Row(
                "throughput, egressd SOCKS5 (splice)",
                med("egressd"),
                "GiB/s",
                "socat",
                med("socat"),
                ">= 1.0x",
                blast_note("egressd"),
            ),
            Row(
                "throughput, egressd SOCKS5 (splice)",
                med("egressd"),
                "GiB/s",
                "HAProxy",
                med("HAProxy"),
            ),
            Row(
                "throughput, splice.relay zero-copy",
                med("zero-copy"),
                "GiB/s",
                "trio path",
                med("trio path"),
            ),
        ]

    sessions = [
        Row(
            "short sessions, no proxy (generator ceiling)",
            med("direct rate"),
            "/s",
            note=session_note("direct"),
        ),
        Row(
            "short sessions, no proxy / fastest egressd",
            med("direct rate"),
            "/s",
            "egressd",
            max(med(f"{contender_name('egressd', n)} rate") for n in args.workers),
            ">= 3x: generator not the bottleneck",
        ),
        Row(
            "proxy CPU per short session, Dante", med("Dante cpu"), "ms", note=session_note("Dante")
        ),
    ]
    for count in args.workers:
        sessions += session_rows(rounds, "egressd", count, "Dante", session_note)
    for count in args.workers if args.baseline is not None else []:
        sessions += session_rows(
            rounds, "baseline", count, contender_name("egressd", count), session_note
        )
    idle = [
        Row(f"RSS per idle session ({args.idle} open)", per_session, "KiB", target="<= 20 KiB"),
        Row(f"daemon fds with {args.idle} idle sessions", fds, "fds"),
    ]
    return (throughput() if args.gib else []) + sessions + (idle if args.idle else [])


def session_rows(
    rounds: Rounds,
    name: str,
    workers: int,
    reference: str,
    session_note: Callable[[str], str],
) -> list[Row]:
    """Rate and CPU per session of the contender ``name`` with ``workers`` against
    ``reference`` (Dante, issue 12's targets; or egressd, for the baseline)."""
    med, contender = rounds.median, contender_name(name, workers)
    dante = reference == "Dante"
    label = f"{name} w{workers}"
    return [
        Row(
            f"short sessions, {label}",
            med(f"{contender} rate"),
            "/s",
            reference,
            med(f"{reference} rate"),
            ">= 2x (workers allowed)" if dante else "",
            session_note(contender),
        ),
        Row(
            f"proxy CPU per short session, {label}",
            med(f"{contender} cpu"),
            "ms",
            reference,
            med(f"{reference} cpu"),
            "<= 0.6x" if dante else "",
        ),
    ]


def worker_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"distinct worker counts >= 1, like 1,2: {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gib", type=float, default=1.0, help="GiB per throughput run (1; 0: no throughput)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument("--sessions", type=int, default=5000, help="short sessions per run")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at a time (32)")
    parser.add_argument(
        "--idle", type=int, default=5000, help="idle sessions (5000; 0: no idle memory)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the session rate of an egressd from checkout DIR in the same rounds",
    )
    parser.add_argument(
        "--workers",
        type=worker_counts,
        default=[1],
        metavar="N[,M]",
        help="short sessions through egressd with [daemon] workers = N (and M...) side by"
        " side with Dante (and the baseline with the same counts); default 1",
    )
    parser.add_argument(
        "--client",
        choices=("curl", "python"),
        default="curl",
        help="short-session generator: curl --parallel (C) into an HAProxy that answers"
        " HTTP itself (default), or the asyncio client into an asyncio echo sink",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
