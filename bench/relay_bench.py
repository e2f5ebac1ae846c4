"""Benchmark egressd's SOCKS5 door and splice against socat, HAProxy and Dante, on loopback.

Run it through ``scripts/bench`` (``--help`` for the knobs). Everything runs side by side in
one invocation, each server as its own process started here and stopped by its PID:

throughput      one connection moves ``--gib`` GiB (default 1) client -> sink through
                egressd's SOCKS5 door (os.splice path), socat (``-b65536``), HAProxy (tcp
                mode) and directly. Target: egressd >= socat.
splice paths    the same through a bare trio relay built on egressd.net.splice, zero-copy
                vs the portable trio path.
session rate    ``--sessions`` short sessions (connect, SOCKS5 handshake, one line echoed,
                close), ``--concurrency`` at a time, through egressd and through Dante.
                Target: egressd >= Dante.
idle memory     ``--idle`` sessions opened through a fresh egressd, one exchange each, then
                left idle; the daemon's RSS growth per session. Target: <= 20 KiB.

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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOAD = [sys.executable, str(ROOT / "bench" / "relay_load.py")]
EGRESSD = [sys.executable, "-m", "egressd"]
SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin", os.environ.get("PATH", "")])
GIB = 1 << 30


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as handle:
            next(handle, None)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def binary(name: str) -> str:
    path = shutil.which(name, path=SBIN)
    if path is None:
        sys.exit(f"bench: {name} is not installed (scripts/test installs it)")
    return path


@contextlib.contextmanager
def running(argv: Sequence[str], port: int, workdir: Path, name: str) -> Iterator[int]:
    """Start ``argv``, wait until ``port`` listens, yield its PID; stop it by PID."""
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 15
        while not is_listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                sys.exit(f"bench: {name} did not start:\n{(workdir / f'{name}.log').read_text()}")
            time.sleep(0.02)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def load(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [*LOAD, *args],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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


def cpu_seconds(session: int) -> float:
    """User + system CPU of every process in session ``session`` (a server and its children)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:  # field 6, session id
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- servers


def egressd_config(workdir: Path, port: int, destination_ports: Sequence[int]) -> Path:
    path = workdir / f"egressd-{port}.toml"
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
"""
    )
    return path


@contextlib.contextmanager
def egressd(workdir: Path, destination_ports: Sequence[int]) -> Iterator[tuple[int, int]]:
    port = free_port()
    config = egressd_config(workdir, port, destination_ports)
    with running([*EGRESSD, "run", "-c", str(config)], port, workdir, f"egressd-{port}") as pid:
        yield port, pid


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


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    name: str
    value: float
    unit: str
    reference: str | None = None
    reference_value: float | None = None
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value:
            return self.value / self.reference_value
        return None


def blast_once(proxy: str | None, sink: int, size: int, socks: bool) -> float:
    """GiB/s of one ``size``-byte transfer to ``sink``, directly or through ``proxy``."""
    if proxy is None:
        args = ["blast", "--dest", f"127.0.0.1:{sink}"]
    elif socks:
        args = ["blast", "--proxy", proxy, "--dest", f"127.0.0.1:{sink}"]
    else:  # a plain TCP forwarder: connect to it as if it were the sink
        args = ["blast", "--dest", proxy]
    result = load(*args, "--bytes", str(size))
    return result["bytes"] / result["seconds"] / GIB


def sessions_once(proxy: int, pid: int, sink: int, sessions: int, concurrency: int) -> Sample:
    """One run of ``sessions`` short sessions through the SOCKS5 proxy at ``proxy``."""
    cpu_before = cpu_seconds(pid)
    result = load(
        "rate",
        "--proxy",
        f"127.0.0.1:{proxy}",
        "--dest",
        f"127.0.0.1:{sink}",
        "--sessions",
        str(sessions),
        "--concurrency",
        str(concurrency),
    )
    if result["failures"]:
        sys.exit(f"bench: {result['failures']} of {sessions} sessions failed")
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / sessions
    return Sample(result["sessions"] / result["seconds"], cpu_ms)


@dataclass
class Sample:
    rate: float
    cpu_ms: float


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
            env={**os.environ, "PYTHONPATH": str(ROOT)},
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
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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


def run(args: argparse.Namespace) -> int:
    size = int(args.gib * GIB)
    rows: list[Row] = []
    rounds = Rounds()
    with tempfile.TemporaryDirectory(prefix="egressd-bench-") as tmp:
        workdir = Path(tmp)
        blast_sink, echo_sink = free_port(), free_port()
        with contextlib.ExitStack() as servers:
            for name, sink in (("blast-sink", blast_sink), ("echo-sink", echo_sink)):
                servers.enter_context(running([*LOAD, name, str(sink)], sink, workdir, name))
            ours, ours_pid = servers.enter_context(egressd(workdir, [blast_sink, echo_sink]))
            forwarders = {
                "socat": servers.enter_context(socat(workdir, blast_sink)),
                "HAProxy": servers.enter_context(haproxy(workdir, blast_sink)),
                "zero-copy": servers.enter_context(bare_relay(workdir, blast_sink, True)),
                "trio path": servers.enter_context(bare_relay(workdir, blast_sink, False)),
            }
            theirs, dante_pid = servers.enter_context(dante(workdir))
            print(
                f"{args.repeat} rounds; each: {args.gib:g} GiB through each, then"
                f" {args.sessions} short sessions through egressd and through Dante",
                flush=True,
            )
            for number in range(1, args.repeat + 1):
                print(f"round {number}", flush=True)
                rounds.add("direct", blast_once(None, blast_sink, size, socks=False))
                rounds.add("egressd", blast_once(f"127.0.0.1:{ours}", blast_sink, size, True))
                for name, port in forwarders.items():
                    rounds.add(name, blast_once(f"127.0.0.1:{port}", blast_sink, size, False))
                for name, port, pid in (("egressd", ours, ours_pid), ("Dante", theirs, dante_pid)):
                    sample = sessions_once(port, pid, echo_sink, args.sessions, args.concurrency)
                    rounds.add(f"{name} rate", sample.rate)
                    rounds.add(f"{name} cpu", sample.cpu_ms)
            print(f"idle memory: {args.idle} sessions", flush=True)
            per_session, fds = idle_memory(workdir, echo_sink, args.idle)
    med = rounds.median
    rows += [
        Row("throughput, no proxy (loopback ceiling)", med("direct"), "GiB/s"),
        Row(
            "throughput, egressd SOCKS5 (splice)",
            med("egressd"),
            "GiB/s",
            "socat",
            med("socat"),
            ">= 1.0x",
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
        Row(
            "short sessions, egressd",
            med("egressd rate"),
            "/s",
            "Dante",
            med("Dante rate"),
            ">= 1.0x",
        ),
        Row("proxy CPU per short session", med("egressd cpu"), "ms", "Dante", med("Dante cpu")),
        Row(f"RSS per idle session ({args.idle} open)", per_session, "KiB", target="<= 20 KiB"),
        Row(f"daemon fds with {args.idle} idle sessions", fds, "fds"),
    ]
    print()
    print_table(rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB per throughput run (1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument("--sessions", type=int, default=5000, help="short sessions per run")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at a time (32)")
    parser.add_argument("--idle", type=int, default=5000, help="idle sessions (5000)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
