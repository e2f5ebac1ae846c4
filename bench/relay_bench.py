"""Benchmark egressd's SOCKS5 door and splice against socat, HAProxy and Dante, on loopback.

Run it through ``scripts/bench`` (``--help`` for the knobs). Everything runs side by side in
one invocation, each server as its own process started here and stopped by its PID:

throughput      one connection moves ``--gib`` GiB (default 1) client -> sink through
                egressd's SOCKS5 door (os.splice path), socat (``-b65536``), HAProxy (tcp
                mode) and directly; GiB/s and each proxy's CPU per GiB. Issue 12's
                target: egressd >= 1.3x socat.
splice paths    the same through a bare trio relay built on egressd.net.splice, zero-copy
                vs the portable trio path.
session rate    ``--sessions`` short sessions (curl --parallel: connect, SOCKS5 handshake,
                one HTTP exchange, close), ``--concurrency`` at a time, through egressd
                and through Dante (which forks: its CPU is its whole process tree's, see
                procs.py). ``--workers 1,2`` measures egressd with ``[daemon] workers =
                1`` and ``2`` (supervisor and workers summed) in the same rounds, and
                beside each N above 1 the *ideal N*: N independent single-worker daemons
                on N ports in one session and cgroup (as a supervisor and its workers
                are), each driven by its own curl with 1/N of the sessions and of the
                concurrency: no shared listening socket, supervisor or session board, so
                the machine's ceiling for N workers. ``--syscalls`` also counts, with
                ``perf stat`` on the syscall tracepoints of each contender's processes,
                failed accepts (EAGAIN: a worker woken for a connection another took),
                ``epoll_wait`` calls and context switches per session. Issue 12's
                targets: a rate >= 2x Dante's (workers allowed), CPU per session <= 0.6x
                Dante's.
idle memory     ``--idle`` sessions (10,000) opened through a fresh egressd, one exchange
                each, then left idle; the daemon's RSS growth per session. A spliced
                session holds two sockets, so one process cannot hold 10,000 under a
                hard descriptor limit of 20,000 (no CAP_SYS_RESOURCE here): egressd then
                runs with as many ``[daemon] workers`` as it needs (``--idle-workers``),
                and its RSS is the supervisor's and the workers' summed. The holder
                (client side) and the echo sink (server side) are processes of their
                own. Issue 12's target: <= 8 KiB per session at 10,000.

``--baseline DIR`` adds an egressd imported from the checkout ``DIR`` (say ``git worktree add
DIR COMMIT``; it runs with this checkout's .venv) to the throughput and session-rate runs
of every round, and to the idle-memory runs (alternating, ``--idle-rounds``), so a
before/after comparison does not depend on how busy the machine was. ``--compiled`` makes
that baseline this checkout's mypyc-compiled build (``scripts/compiled``), against the pure
one. ``--gib 0``, ``--sessions 0`` and ``--idle 0`` leave out the throughput, session-rate
and idle-memory parts.

All servers run at once and the measurements alternate: each of ``--repeat`` rounds takes
one throughput run through each contender and one session-rate run through egressd and
through Dante; the table shows medians over the rounds. (This machine's speed drifts by tens
of percent over minutes; measuring in rounds spreads the drift over every contender.)

Throughput is the noisiest figure (three busy processes, the generator, the proxy and the
sink, on a shared 2-core machine: one transfer through the same proxy reads anywhere from
0.5 to 1.9 GiB/s). So egressd runs back to back with socat and with the baseline in every
round (the order reverses every other round), and those comparisons are the median of the
per-round ratios, not the ratio of two medians taken minutes apart; below it the 95%
interval of that median (distribution-free, from the binomial; 6 rounds at least) and the
range, and for the target whether the interval settles it. Use ``--repeat 9`` or more
when it says "not settled". Each contender's note also shows its CPU per GiB with the
generator's and the sink's, and the three summed: with three processes on two cores, the
sum is what bounds the throughput once the machine is busy.

The load generators are bench/relay_load.py processes, so the client, the proxy and the
sink do not share an interpreter. Nothing is installed: scripts/test sets up .venv and
the Debian packages (haproxy, dante-server, socat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from procs import (
    ROOT,
    binary,
    children_cpu_seconds,
    compiled_build,
    cpu_seconds,
    free_port,
    is_listening,
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


IDEAL_PORTS: dict[int, list[int]] = {}
"""The ports of an ideal contender's daemons, by the first one (the contender's port)."""


@contextlib.contextmanager
def ideal(
    workdir: Path, destination_ports: Sequence[int], count: int, root: Path = ROOT
) -> Iterator[tuple[int, int]]:
    """``count`` independent egressd daemons with one worker each, started by one shell in
    one session (and one cgroup: its CPU is theirs, as a supervisor's is its workers'):
    (the first daemon's port, the shell's pid); every port is in :data:`IDEAL_PORTS`."""
    ports = [free_port() for _ in range(count)]
    argvs = [
        [*EGRESSD, "run", "-c", str(egressd_config(workdir, port, destination_ports))]
        for port in ports
    ]
    script = " & ".join(shlex.join(argv) for argv in argvs) + " & wait"
    name = f"egressd-ideal{count}-{ports[0]}"
    with running(["sh", "-c", script], ports[0], workdir, name, root=root) as pid:
        deadline = time.monotonic() + 30
        while not all(is_listening(port) for port in ports):
            if time.monotonic() > deadline:
                sys.exit(f"bench: the ideal's daemons did not start:\n{workdir / name}.log")
            time.sleep(0.05)
        IDEAL_PORTS[ports[0]] = ports
        try:
            yield ports[0], pid
        finally:
            del IDEAL_PORTS[ports[0]]


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
def haproxy(workdir: Path, sink: int) -> Iterator[tuple[int, int]]:
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, sink=sink))
    with running([binary("haproxy"), "-f", str(config), "-db"], port, workdir, "haproxy") as pid:
        yield port, pid


@contextlib.contextmanager
def socat(workdir: Path, sink: int) -> Iterator[tuple[int, int]]:
    port = free_port()
    argv = [
        binary("socat"),
        "-b65536",
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
        f"TCP:127.0.0.1:{sink}",
    ]
    with running(argv, port, workdir, "socat") as pid:
        yield port, pid


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
def bare_relay(workdir: Path, sink: int, zero_copy: bool) -> Iterator[tuple[int, int]]:
    port = free_port()
    argv = [*LOAD, "relay", str(port), "--dest", f"127.0.0.1:{sink}"]
    argv += ["--zero-copy", "yes" if zero_copy else "no"]
    with running(argv, port, workdir, f"relay-{'splice' if zero_copy else 'trio'}") as pid:
        yield port, pid


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


def ideal_name(workers: int) -> str:
    return f"ideal {workers}"


def session_proxies(
    servers: contextlib.ExitStack,
    workdir: Path,
    args: argparse.Namespace,
    ours: tuple[int, int],
    ports: Sequence[int],
) -> dict[str, tuple[int, int]]:
    """The short-session contenders, (port, pid) by name: egressd with each ``--workers``
    count (``ours``, the throughput egressd, is the one with one worker), the ideal for
    each count above 1, Dante, and the baseline egressd with the same counts."""
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
        if name == "egressd" and args.client == "curl":  # the ideal needs one curl per port
            for count in (count for count in args.workers if count > 1):
                proxies[ideal_name(count)] = servers.enter_context(ideal(workdir, ports, count))
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
    paired: float | None = None  # the median of per-round ratios, shown instead

    @property
    def ratio(self) -> float | None:
        if self.paired is not None:
            return self.paired
        if self.reference_value:
            return self.value / self.reference_value
        return None


@dataclass
class Blast:
    """One transfer: GiB/s, and CPU seconds per GiB of the proxy, generator and sink."""

    rate: float
    proxy: float
    generator: float
    sink: float


def blast_once(
    proxy: tuple[str, int] | None, sink: tuple[int, int], size: int, socks: bool
) -> Blast:
    """One ``size``-byte transfer to ``sink`` (port, pid), directly or through ``proxy``
    (address, pid)."""
    port, sink_pid = sink
    if proxy is None:
        args = ["blast", "--dest", f"127.0.0.1:{port}"]
    elif socks:
        args = ["blast", "--proxy", proxy[0], "--dest", f"127.0.0.1:{port}"]
    else:  # a plain TCP forwarder: connect to it as if it were the sink
        args = ["blast", "--dest", proxy[0]]
    proxy_before = cpu_seconds(proxy[1]) if proxy else 0.0
    sink_before = cpu_seconds(sink_pid)
    result = load(*args, "--bytes", str(size))
    gib = result["bytes"] / GIB
    return Blast(
        rate=gib / result["seconds"],
        proxy=(cpu_seconds(proxy[1]) - proxy_before) / gib if proxy else 0.0,
        generator=result["cpu"] / gib,  # the transfer's, not the interpreter's start-up
        sink=(cpu_seconds(sink_pid) - sink_before) / gib,
    )


@dataclass
class Sample:
    """One session-rate run: sessions/s and CPU ms per session of proxy, generator, sink;
    with ``--syscalls``, the proxy's counts per session (:data:`SYSCALL_EVENTS`)."""

    rate: float
    proxy_ms: float
    generator_ms: float
    sink_ms: float
    syscalls: dict[str, float] = field(default_factory=dict)


SYSCALL_EVENTS = (
    ("failed accepts", ["-e", "syscalls:sys_exit_accept4", "--filter", "ret < 0"]),
    ("epoll_wait", ["-e", "syscalls:sys_enter_epoll_wait"]),
    ("context switches", ["-e", "context-switches"]),
)
"""What ``--syscalls`` counts in each contender's processes, with ``perf stat``. With one
worker, a connection costs one failed accept (the loop accepts until EAGAIN); every one
above that is a worker that woke for a connection another worker took."""


@contextlib.contextmanager
def syscall_counts(pid: int | None, counts: dict[str, float]) -> Iterator[None]:
    """Count :data:`SYSCALL_EVENTS` in ``pid`` and its children (a supervisor's workers,
    the ideal's daemons) while the block runs, into ``counts``; nothing when ``pid`` is
    None."""
    if pid is None:
        yield
        return
    output = Path(tempfile.mkstemp(prefix="egressd-bench-perf-")[1])
    argv = [binary("perf"), "stat", "-x", ",", "-o", str(output)]
    for _, event in SYSCALL_EVENTS:
        argv += event
    argv += ["-p", ",".join(str(member) for member in family(pid))]
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # perf attaches
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    lines = [line.split(",") for line in output.read_text().splitlines() if "," in line]
    output.unlink()
    for (name, _), fields in zip(SYSCALL_EVENTS, lines, strict=False):
        counts[name] = float(fields[0]) if fields[0].isdigit() else math.nan


def curl_sessions(
    proxy: int | None, sink: int, sessions: int, concurrency: int, curls: int = 1
) -> float:
    """``sessions`` HTTP requests with curl --parallel, each on a new connection (the sink
    closes), through the SOCKS5 proxy or straight; returns the seconds they took. ``curls``
    processes run at once, each with its share of the sessions and of the concurrency: one
    curl caps sessions through a SOCKS5 proxy near 1,400/s on the 2-core VM, Dante's and
    egressd's alike, well below what it does straight (see the README). Through an ideal
    contender, the curls are dealt out over its daemons, one at least for each."""
    ports: list[int | None] = [proxy]
    if proxy is not None and proxy in IDEAL_PORTS:
        ports = list(IDEAL_PORTS[proxy])
    ports = [ports[n % len(ports)] for n in range(max(curls, len(ports)))]
    shares = [sessions // len(ports) + (n < sessions % len(ports)) for n in range(len(ports))]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            curl_argv(port, sink, share, max(1, concurrency // len(ports))),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for port, share in zip(ports, shares, strict=True)
    ]
    outputs = [process.communicate()[0] for process in processes]
    seconds = time.perf_counter() - started
    ok = sum(output.split().count(b"200") for output in outputs)
    if ok != sessions:
        sys.exit(f"bench: {sessions - ok} of {sessions} curl sessions failed")
    return seconds


def curl_argv(proxy: int | None, sink: int, sessions: int, concurrency: int) -> list[str]:
    argv = [binary("curl"), "-s", "--parallel", "--parallel-max", str(concurrency)]
    argv += ["-o", "/dev/null", "-w", "%{http_code}\\n"]
    if proxy is not None:
        argv += ["--socks5", f"127.0.0.1:{proxy}"]
    argv.append(f"http://127.0.0.1:{sink}/[1-{sessions}]")
    return argv


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
    syscalls: bool = False,
    curls: int = 1,
) -> Sample:
    """One run of ``sessions`` short sessions through ``proxy`` (port, pid) or straight to
    ``sink`` (port, pid); the CPU of the proxy, the generator and the sink per session,
    and with ``syscalls`` the proxy's :data:`SYSCALL_EVENTS` per session."""
    counts: dict[str, float] = {}
    with syscall_counts(proxy[1] if syscalls and proxy else None, counts):
        proxy_before = cpu_seconds(proxy[1]) if proxy else 0.0
        sink_before = cpu_seconds(sink[1])
        generator_before = children_cpu_seconds()
        target = proxy[0] if proxy else None
        if client == "curl":
            seconds = curl_sessions(target, sink[0], sessions, concurrency, curls)
        else:
            seconds = python_sessions(target, sink[0], sessions, concurrency)
        per_session = 1000 / sessions
        sample = Sample(
            rate=sessions / seconds,
            proxy_ms=(cpu_seconds(proxy[1]) - proxy_before) * per_session if proxy else 0.0,
            generator_ms=(children_cpu_seconds() - generator_before) * per_session,
            sink_ms=(cpu_seconds(sink[1]) - sink_before) * per_session,
        )
    sample.syscalls = {name: count / sessions for name, count in counts.items()}
    return sample


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


@dataclass
class IdleMemory:
    """RSS growth per idle session, summed over a daemon's processes, and the most
    descriptors one of them held."""

    per_session: float
    fds: int


def family(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, the parent
                    pids.append(int(entry))
    return pids


def family_rss_kib(pid: int) -> int:
    return sum(rss_kib(member) for member in family(pid))


def idle_workers(count: int) -> int:
    """Worker processes needed to hold ``count`` spliced sessions (two sockets each) within
    this process's descriptor limit, which they inherit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 1
    room = hard - 256  # listeners, epoll, logs, pooled pipes
    return max(1, -(-2 * count // room))


def idle_memory(
    workdir: Path, sink: int, count: int, workers: int, root: Path = ROOT
) -> IdleMemory:
    """KiB of RSS per idle spliced session through a fresh egressd from checkout ``root``
    with ``workers`` workers (summed over the supervisor and its workers)."""
    with egressd(workdir, [sink], root, workers) as (port, pid):
        hold(port, sink, 200)  # warm up: imports, pools, first allocations (every worker)
        time.sleep(0.5)
        before = family_rss_kib(pid)
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
            after = family_rss_kib(pid)
            fds = max(open_fds(member) for member in family(pid))
            holder.stdin.close()
            holder.wait(60)
        finally:
            if holder.poll() is None:
                holder.kill()
    return IdleMemory((after - before) / count, fds)


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
        for line in row.note.splitlines():
            print(f"{'':<46}{line}")


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
                if size:
                    contenders = blast_contenders(ours, forwarders, proxies)
                    if number % 2 == 0:  # alternate which runs first
                        contenders.reverse()
                    throughput_round(contenders, blast, size, rounds)
                through: list[tuple[str, tuple[int, int] | None]] = [("direct", None)]
                order = list(proxies.items())
                if number % 2 == 0:  # alternate which proxy runs first
                    order.reverse()
                for name, via in [*through, *order] if args.sessions else []:
                    sample = sessions_once(
                        args.client,
                        via,
                        session_sink,
                        args.sessions,
                        args.concurrency,
                        args.syscalls and name != "Dante",
                        args.curls,
                    )
                    rounds.add(f"{name} rate", sample.rate)
                    rounds.add(f"{name} cpu", sample.proxy_ms)
                    rounds.add(f"{name} session gen", sample.generator_ms)
                    rounds.add(f"{name} session sink", sample.sink_ms)
                    for event, per_session in sample.syscalls.items():
                        rounds.add(f"{name} {event}", per_session)
                    counted = "".join(f", {v:.2f} {k}" for k, v in sample.syscalls.items())
                    print(
                        f"  {name}: {sample.rate:.0f}/s, {sample.proxy_ms:.3f} ms CPU/session"
                        + counted,
                        flush=True,
                    )
            if args.idle:
                idle_rounds(workdir, echo_port, args, rounds)
    print()
    print_table(table_rows(rounds, args))
    return 0


Contender = tuple[str, tuple[str, int] | None, bool]

PAIRED = (("egressd", "socat"), ("egressd", "baseline"), ("zero-copy", "trio path"))
"""Contenders compared round by round: each round's ratio, then their median and spread."""


def blast_contenders(
    ours: tuple[int, int],
    forwarders: dict[str, tuple[int, int]],
    proxies: dict[str, tuple[int, int]],
) -> list[Contender]:
    """(name, (address, pid) or None for direct, speaks SOCKS5) for one throughput round,
    egressd between socat and the baseline: the ratios that matter come from transfers
    run back to back, whichever way round the order goes."""
    address = {name: (f"127.0.0.1:{p}", pid) for name, (p, pid) in forwarders.items()}
    contenders: list[Contender] = [
        ("direct", None, False),
        ("socat", address["socat"], False),
        ("egressd", (f"127.0.0.1:{ours[0]}", ours[1]), True),
    ]
    if "baseline" in proxies:
        port, pid = proxies["baseline"]
        contenders.append(("baseline", (f"127.0.0.1:{port}", pid), True))
    contenders += [(n, a, False) for n, a in address.items() if n != "socat"]
    return contenders


def throughput_round(
    contenders: Sequence[Contender], blast: tuple[int, int], size: int, rounds: Rounds
) -> None:
    """One transfer through each contender; each pair of :data:`PAIRED`'s ratio."""
    for name, proxy, socks in contenders:
        blasted = blast_once(proxy, blast, size, socks)
        rounds.add(name, blasted.rate)
        rounds.add(f"{name} cpu/GiB", blasted.proxy)
        rounds.add(f"{name} gen", blasted.generator)
        rounds.add(f"{name} sink", blasted.sink)
        print(f"  {name}: {blasted.rate:.2f} GiB/s, {blasted.proxy:.2f} s CPU/GiB", flush=True)
    ratios = []
    for name, reference in PAIRED:
        if reference in rounds.values:
            ratio = rounds.values[name][-1] / rounds.values[reference][-1]
            rounds.add(f"{name}/{reference}", ratio)
            ratios.append(f"{name}/{reference} {ratio:.2f}x")
            if reference != "trio path":
                cpu = rounds.values[f"{name} cpu/GiB"][-1]
                cpu_reference = rounds.values[f"{reference} cpu/GiB"][-1]
                rounds.add(f"{name}/{reference} cpu", cpu / cpu_reference)
    print(f"  this round: {', '.join(ratios)}", flush=True)


def idle_rounds(workdir: Path, sink: int, args: argparse.Namespace, rounds: Rounds) -> None:
    """``--idle-rounds`` of idle memory through a fresh egressd each time, alternating
    with the baseline's when there is one."""
    roots = {"egressd": ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
    workers = args.idle_workers or idle_workers(args.idle)
    args.idle_workers = workers
    for number in range(1, args.idle_rounds + 1):
        order = list(roots.items())
        if number % 2 == 0:
            order.reverse()
        for name, root in order:
            print(f"idle memory, {name}: {args.idle} sessions, {workers} worker(s)", flush=True)
            measured = idle_memory(workdir, sink, args.idle, workers, root)
            print(f"  {measured.per_session:.2f} KiB per session, {measured.fds} fds", flush=True)
            rounds.add(f"{name} idle KiB", measured.per_session)
            rounds.add(f"{name} idle fds", measured.fds)


def table_rows(rounds: Rounds, args: argparse.Namespace) -> list[Row]:
    med = rounds.median

    def session_note(name: str) -> str:
        gen, sink = med(f"{name} session gen"), med(f"{name} session sink")
        return f"{args.client} {gen:.3f} ms, sink {sink:.3f} ms per session"

    if not args.sessions:
        return throughput_rows(rounds, args) + idle_rows(rounds, args)

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
    for count in (count for count in args.workers if f"{ideal_name(count)} rate" in rounds.values):
        sessions += ideal_rows(rounds, count, session_note)
    if args.syscalls:
        sessions += syscall_rows(rounds)
    for count in args.workers if args.baseline is not None else []:
        sessions += session_rows(
            rounds, "baseline", count, contender_name("egressd", count), session_note
        )
    return throughput_rows(rounds, args) + sessions + idle_rows(rounds, args)


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval holding the true median with ``confidence``: the
    k-th smallest and k-th largest value, k from the binomial distribution (each value
    falls below the median with probability 1/2); None when there are too few values
    (fewer than 6 for 95%)."""
    ordered, count = sorted(values), len(values)
    k, below = 0, 0.0  # below: P(fewer than k+1 values under the median)
    while k < count // 2:
        below += math.comb(count, k) / 2**count
        if 2 * below > 1 - confidence:
            break
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[count - k]


def paired_note(values: Sequence[float], target: float | None = None, cpu: bool = False) -> str:
    """Per-round ratios: their median, the 95% interval of that median and the range; with
    a ``target`` (a floor, or a ceiling for CPU) whether the interval settles it."""
    what = "CPU" if cpu else "GiB/s"
    text = f"{what} ratio per round: median {statistics.median(values):.2f}x"
    interval = median_interval(values)
    if interval is not None:
        text += f", 95% interval of the median {interval[0]:.2f}-{interval[1]:.2f}x"
    text += f", range {min(values):.2f}-{max(values):.2f}x over {len(values)} rounds"
    if target is not None:
        if interval is None:
            text += "; too few rounds to settle the target (6 at least)"
        elif interval[0] >= target:
            text += "; target met"
        elif interval[1] < target:
            text += "; target not met"
        else:
            text += "; not settled: the interval straddles the target (more rounds)"
    return text


def throughput_rows(rounds: Rounds, args: argparse.Namespace) -> list[Row]:
    """Medians; a pair measured back to back in every round (:data:`PAIRED`) shows the
    median of its per-round ratios (steadier than the ratio of medians when the machine's
    speed drifts between rounds) and that median's 95% interval."""
    if not args.gib:
        return []
    med, values = rounds.median, rounds.values

    def note(name: str) -> str:
        proxy, gen, sink = (med(f"{name} {part}") for part in ("cpu/GiB", "gen", "sink"))
        return (
            f"{proxy:.2f} s CPU/GiB; gen {gen:.2f}, sink {sink:.2f}, all three"
            f" {proxy + gen + sink:.2f} s/GiB; GiB/s range {min(values[name]):.2f}"
            f"-{max(values[name]):.2f}"
        )

    def row(name: str, label: str, reference: str, target: float | None = None) -> Row:
        paired = values.get(f"{name}/{reference}")
        return Row(
            label,
            med(name),
            "GiB/s",
            reference,
            med(reference),
            f">= {target:g}x" if target else "",
            note(name) + ("\n" + paired_note(paired, target) if paired else ""),
            statistics.median(paired) if paired else None,
        )

    def cpu_row(reference: str) -> Row:
        paired = values.get(f"egressd/{reference} cpu")
        return Row(
            "egressd CPU per GiB",
            med("egressd cpu/GiB"),
            "s",
            reference,
            med(f"{reference} cpu/GiB"),
            note=paired_note(paired, cpu=True) if paired else "",
            paired=statistics.median(paired) if paired else None,
        )

    rows = [
        Row("throughput, no proxy (loopback ceiling)", med("direct"), "GiB/s", note=note("direct")),
        row("egressd", "throughput, egressd SOCKS5 (splice)", "socat", 1.3),
        cpu_row("socat"),
        row("egressd", "throughput, egressd SOCKS5 (splice)", "HAProxy"),
    ]
    if "baseline" in values:  # the baseline egressd with one worker
        rows += [row("egressd", "throughput, egressd SOCKS5 (splice)", "baseline")]
        rows += [cpu_row("baseline")]
    rows += [row("zero-copy", "throughput, splice.relay zero-copy", "trio path")]
    return rows


def idle_rows(rounds: Rounds, args: argparse.Namespace) -> list[Row]:
    if not args.idle:
        return []
    med = rounds.median
    processes = (
        "1 process"
        if args.idle_workers == 1
        else f"{args.idle_workers} workers, RSS of supervisor + workers"
    )
    rows = [
        Row(
            f"RSS per idle session ({args.idle:,} open)",
            med("egressd idle KiB"),
            "KiB",
            target="<= 8 KiB at 10,000",
            note=processes,
        ),
        Row("most fds in one egressd process", med("egressd idle fds"), "fds"),
    ]
    if args.baseline is not None:
        rows.append(
            Row(
                "RSS per idle session",
                med("egressd idle KiB"),
                "KiB",
                "baseline",
                med("baseline idle KiB"),
            )
        )
    return rows


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


def ideal_rows(rounds: Rounds, workers: int, session_note: Callable[[str], str]) -> list[Row]:
    """egressd with ``workers`` workers against the ideal with as many daemons: rate (its
    ratio is "of ideal") and CPU per session."""
    med, contender, ideal = rounds.median, contender_name("egressd", workers), ideal_name(workers)
    return [
        Row(
            f"short sessions, w{workers} / {ideal}",
            med(f"{contender} rate"),
            "/s",
            ideal,
            med(f"{ideal} rate"),
            "of ideal",
            session_note(ideal),
        ),
        Row(
            f"proxy CPU per short session, w{workers} / {ideal}",
            med(f"{contender} cpu"),
            "ms",
            ideal,
            med(f"{ideal} cpu"),
        ),
    ]


def syscall_rows(rounds: Rounds) -> list[Row]:
    """``--syscalls``: each counted event per session, for every contender but Dante."""
    rows = []
    for event, _ in SYSCALL_EVENTS:
        for name in rounds.values:
            if name.endswith(f" {event}"):
                label = name.removesuffix(f" {event}")
                rows.append(Row(f"{event} per session, {label}", rounds.median(name), ""))
    return rows


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
    parser.add_argument(
        "--sessions", type=int, default=5000, help="short sessions per run (0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at a time (32)")
    parser.add_argument(
        "--curls",
        type=int,
        default=4,
        help="curl processes sharing the sessions and the concurrency (4: one caps a SOCKS5"
        " proxy's rate near 1,400/s here)",
    )
    parser.add_argument(
        "--idle", type=int, default=10000, help="idle sessions (10000; 0: no idle memory)"
    )
    parser.add_argument(
        "--idle-workers",
        type=int,
        default=0,
        help="[daemon] workers for the idle sessions (default: as few as the descriptor limit"
        " allows; RSS is summed over the supervisor and its workers)",
    )
    parser.add_argument(
        "--idle-rounds", type=int, default=1, help="idle-memory runs per egressd (1)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the session rate of an egressd from checkout DIR in the same rounds",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="the baseline is this checkout's mypyc-compiled build (scripts/compiled): its"
        " rows, labelled baseline, compare it with this checkout in pure Python",
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
        "--syscalls",
        action="store_true",
        help="count failed accepts, epoll_wait calls and context switches per short session"
        " in each egressd contender (perf stat on syscall tracepoints; needs perf and root)",
    )
    parser.add_argument(
        "--client",
        choices=("curl", "python"),
        default="curl",
        help="short-session generator: curl --parallel (C) into an HAProxy that answers"
        " HTTP itself (default), or the asyncio client into an asyncio echo sink",
    )
    args = parser.parse_args(argv)
    if args.compiled:
        if args.baseline is not None:
            parser.error("--compiled is the baseline: not with --baseline")
        args.baseline = compiled_build()
        print(f"baseline: this checkout compiled by mypyc ({args.baseline})", flush=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
