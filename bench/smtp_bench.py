"""Messages per second through egressd's SMTP door, against the same C load going direct.

Run it through ``scripts/bench smtp`` (``--help`` for the knobs)::

    scripts/bench smtp            # quick: 10 KiB, 50 sessions, sink with and without PIPELINING
    scripts/bench smtp --full     # the matrix: 1, 10, 100 KiB x 1, 50 sessions x PIPELINING on/off
    scripts/bench smtp --client python   # second opinion: the Python client as the generator
    scripts/bench smtp --baseline DIR    # also an egressd from checkout DIR (before/after)
    scripts/bench smtp --compiled        # the mypyc-compiled build against the pure one

The load generator and the sink are Postfix's own C test tools, so that the figure is
egressd's cost and not the generator's: ``smtp-source`` (``-d``: one session sends its
messages one after the other; HELO, MAIL, RCPT, DATA, an 80-column body of ``-l`` bytes, the
dot, lock-step since smtp-source has no pipelining) and ``smtp-sink`` (accepts and discards;
``-p`` when the case has PIPELINING off). "PIPELINING on/off" is therefore the egressd ->
sink leg: with it egressd sends MAIL FROM and RCPT TO in one write, as towards most MXs.
The Python client (``--client python``) pipelines towards egressd as Postfix does.

What it does, all on loopback, every process started here and stopped by its PID:

1. starts one smtp-sink per PIPELINING setting and one egressd per sink, egressd with only
   the SMTP door (one listener, one pool with one source, 127.0.0.3, ``[smtp.routes] "*"``
   pointing at its sink, so no DNS: the figure is the relay's own cost), logging one line
   per transaction to a file as in production;
2. per case, a warm-up run through each contender sizes the runs to about ``--seconds``;
3. ``--rounds`` rounds, each running every case once straight into the sink and once through
   egressd, alternating which goes first (this shared machine drifts by tens of percent);
With ``--baseline DIR`` a third contender, egressd imported from the checkout ``DIR`` (say
``git archive main | tar -x -C DIR``), sits in front of the same sink and is measured in the
same rounds, so a before/after comparison does not depend on how busy the machine was.

4. prints the medians: messages/s direct and through egressd, the ratio, and the CPU per
   message of egressd, the generator and the sink (user + system, from ``/proc/PID/stat``
   for the servers and ``getrusage`` for the generator), and egressd's share of one core.
   egressd near 100% of a core means egressd is the bottleneck, as it should be.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import procs
from procs import (
    binary,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    python_env,
    running,
)

SOURCE_ADDRESS = "127.0.0.3"
SENDER = "bench@sender.bench"
RECIPIENT = "rcpt@dest.bench"
EGRESSD = [sys.executable, "-m", "egressd"]
KIB = 1024


@dataclass(frozen=True)
class Case:
    size: int  # body bytes (smtp-source -l)
    sessions: int
    pipelining: bool  # the sink offers PIPELINING

    @property
    def name(self) -> str:
        pipelining = "pipelining" if self.pipelining else "no pipelining"
        return f"{self.size // KIB} KiB, {self.sessions} sess, {pipelining}"


QUICK = [Case(10 * KIB, 50, True), Case(10 * KIB, 50, False)]
FULL = [
    Case(size * KIB, sessions, pipelining)
    for pipelining, size, sessions in itertools.product((True, False), (1, 10, 100), (1, 50))
]


@dataclass
class Run:
    """One run of one contender: messages, wall seconds and CPU seconds of each process."""

    messages: int
    seconds: float
    generator_cpu: float
    sink_cpu: float
    egressd_cpu: float = 0.0
    supervisor_cpu: float = 0.0
    """The supervisor's own CPU (``--workers`` above 1), included in ``egressd_cpu``."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def per_message_ms(self, cpu: float) -> float:
        return cpu * 1000 / self.messages


@dataclass
class Contender:
    """Where a case's load goes (the sink, or egressd in front of it) and what to measure."""

    port: int
    sink_pid: int
    egressd_pid: int | None = None
    workers: int = 1
    """``[daemon] workers`` of this egressd (``--workers``)."""
    ideal: list[int] = field(default_factory=list)
    """The "ideal" contender of ``--workers``: the ports of ``workers`` independent
    single-worker daemons, every one driven by its own share of the sessions."""
    sessions: list[int] = field(default_factory=list)
    """The ideal's sessions (one, or one per daemon with ``--ideal-apart``), whose CPU
    is egressd's."""
    runs: dict[Case, list[Run]] = field(default_factory=dict)
    size_for: dict[Case, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- servers


def sink_argv(port: int, pipelining: bool) -> list[str]:
    argv = [binary("smtp-sink")]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
    if not pipelining:
        argv.append("-p")
    return [*argv, f"127.0.0.1:{port}", "1024"]


EGRESSD_CONFIG = """\
hostname = "relay.bench"
[access]
deny_destinations = []
destination_ports = [{sink_port}]
[limits]
max_connections = 10000
[log]
level = "info"
[[smtp.listener]]
address = "127.0.0.1:{relay_port}"
pool = "bench"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
[source."bench"]
source_address = "{source}"
ehlo_domain = "out.bench"
[pool."bench"."bench"]
[daemon]
workers = {workers}
"""


@contextlib.contextmanager
def contenders(
    workdir: Path,
    pipelining: bool,
    baseline: Path | None,
    workers: Sequence[int] = (),
    ideal_apart: bool = False,
    this: Path = procs.ROOT,
) -> Iterator[list[Contender]]:
    """A sink and an egressd in front of it, and the baseline egressd if asked for:
    [direct, through egressd, (through the baseline)]; with ``workers``, one egressd per
    number of workers instead: [direct, through egressd with workers[0], ...]. ``this`` is
    where "this checkout's" egressd is imported from (its compiled build with --compiled)."""
    name = "pipelining" if pipelining else "plain"
    sink_port = free_port()
    with contextlib.ExitStack() as stack:
        sink_log = f"sink-{name}"
        sink = stack.enter_context(
            running(sink_argv(sink_port, pipelining), sink_port, workdir, sink_log)
        )
        found = [Contender(sink_port, sink)]
        if workers:
            setups = [(this, count) for count in workers]
        else:
            setups = [(root, 1) for root in ([this] if baseline is None else [this, baseline])]
        for number, (root, count) in enumerate(setups):
            relay_port = free_port()
            config = workdir / f"egressd-{name}-{number}.toml"
            config.write_text(
                EGRESSD_CONFIG.format(
                    sink_port=sink_port,
                    relay_port=relay_port,
                    source=SOURCE_ADDRESS,
                    workers=count,
                )
            )
            argv = [*EGRESSD, "run", "-c", str(config)]
            log = f"egressd-{name}-{number}"
            pid = stack.enter_context(running(argv, relay_port, workdir, log, root=root))
            if count > 1:
                wait_ready(workdir / f"{log}.log")
            found.append(Contender(relay_port, sink, pid, count))
        for count in (count for count in workers if count > 1):
            contender = ideal(workdir, name, sink_port, sink, count, ideal_apart)
            found.append(stack.enter_context(contender))
        yield found


@contextlib.contextmanager
def ideal(
    workdir: Path, name: str, sink_port: int, sink: int, count: int, apart: bool
) -> Iterator[Contender]:
    """``count`` independent egressd daemons with ``workers = 1`` on ``count`` ports in
    front of the same sink: the machine's ceiling for ``count`` workers, with no shared
    listener, supervisor or budget book between them.

    They run in one session, as a supervisor and its workers do, unless ``apart``: with
    the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on
    here) CPU is shared fairly between sessions first, so on a busy machine N daemons in
    N sessions get N shares where one egressd with N workers gets one."""
    ports = [free_port() for _ in range(count)]
    argvs = []
    for number, relay_port in enumerate(ports):
        config = workdir / f"egressd-{name}-ideal{count}-{number}.toml"
        config.write_text(
            EGRESSD_CONFIG.format(
                sink_port=sink_port, relay_port=relay_port, source=SOURCE_ADDRESS, workers=1
            )
        )
        argvs.append([*EGRESSD, "run", "-c", str(config)])
    log = f"egressd-{name}-ideal{count}"
    with contextlib.ExitStack() as stack:
        if apart:
            sessions = [
                stack.enter_context(running(argv, port, workdir, f"{log}-{number}"))
                for number, (argv, port) in enumerate(zip(argvs, ports, strict=True))
            ]
        else:  # one shell in a new session starts them all; stopped with its group
            script = " & ".join(shlex.join(argv) for argv in argvs) + " & wait"
            sessions = [stack.enter_context(running(["sh", "-c", script], ports[0], workdir, log))]
            wait_listening(ports[1:], workdir / f"{log}.log")
        yield Contender(ports[0], sink, sessions[0], count, ideal=ports, sessions=sessions)


def wait_listening(ports: Sequence[int], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(procs.is_listening(port) for port in ports):
        if time.monotonic() > deadline:
            sys.exit(f"bench: the ideal's daemons did not start:\n{log.read_text()}")
        time.sleep(0.05)


def wait_ready(log: Path, timeout: float = 60.0) -> None:
    """Until the supervisor logged that every worker is ready (the port listens before)."""
    deadline = time.monotonic() + timeout
    while "egressd.supervisor: egressd ready" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            sys.exit(f"bench: the workers did not start:\n{log.read_text()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- generators


def generator_argv(client: str, port: int, case: Case, messages: int) -> list[str]:
    if client == "smtp-source":
        return [
            binary("smtp-source"),
            *("-s", str(case.sessions), "-m", str(messages), "-l", str(case.size)),
            *("-d", "-f", SENDER, "-t", RECIPIENT, "-M", "client.bench"),
            f"127.0.0.1:{port}",
        ]
    me = [sys.executable, str(Path(__file__).resolve())]
    argv = [*me, "--python-load", str(port), "--messages", str(messages)]
    argv += ["--sessions", str(case.sessions), "--size", str(case.size)]
    return argv


def run_once(client: str, contender: Contender, case: Case, messages: int) -> Run:
    """One generator run against ``contender``; CPU read around it."""
    if contender.ideal:
        return run_split(contender, case, messages)
    argv = generator_argv(client, contender.port, case, messages)
    sink_before = cpu_seconds(contender.sink_pid)
    egressd_before = cpu_seconds(contender.egressd_pid) if contender.egressd_pid else 0.0
    supervisor_before = process_cpu_seconds(contender.egressd_pid) if contender.workers > 1 else 0
    generator_before = children_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False, env=python_env())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        sys.exit(f"bench: {' '.join(argv)} failed ({done.returncode}):\n{output[-3000:]}")
    if client == "python":  # the interpreter's start-up is not the contender's time
        seconds = json.loads(done.stdout)["seconds"]
    return Run(
        messages=messages,
        seconds=seconds,
        generator_cpu=children_cpu_seconds() - generator_before,
        sink_cpu=cpu_seconds(contender.sink_pid) - sink_before,
        egressd_cpu=(
            cpu_seconds(contender.egressd_pid) - egressd_before if contender.egressd_pid else 0.0
        ),
        supervisor_cpu=(
            process_cpu_seconds(contender.egressd_pid) - supervisor_before
            if contender.workers > 1 and contender.egressd_pid
            else 0.0
        ),
    )


def run_split(contender: Contender, case: Case, messages: int) -> Run:
    """The ideal contender: one smtp-source per daemon at once, each with its share of the
    sessions and messages; the run lasts until the last one is done."""
    count = len(contender.ideal)
    share = Case(case.size, max(1, case.sessions // count), case.pipelining)
    pids = contender.sessions
    sink_before = cpu_seconds(contender.sink_pid)
    egressd_before = sum(cpu_seconds(pid) for pid in pids)
    generator_before = children_cpu_seconds()
    started = time.perf_counter()
    generators = [
        subprocess.Popen(
            generator_argv("smtp-source", port, share, messages // count),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for port in contender.ideal
    ]
    outputs = [generator.communicate()[0] for generator in generators]
    seconds = time.perf_counter() - started
    for generator, output in zip(generators, outputs, strict=True):
        if generator.returncode != 0:
            sys.exit(f"bench: smtp-source failed ({generator.returncode}):\n{output[-3000:]!r}")
    return Run(
        messages=messages // count * count,
        seconds=seconds,
        generator_cpu=children_cpu_seconds() - generator_before,
        sink_cpu=cpu_seconds(contender.sink_pid) - sink_before,
        egressd_cpu=sum(cpu_seconds(pid) for pid in pids) - egressd_before,
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of the one process ``pid`` (the supervisor without its workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / procs.CLOCK_TICKS


def calibrate(client: str, contender: Contender, case: Case, seconds: float) -> None:
    """A warm-up run (imports, pools, first connections); size later runs to ``seconds``."""
    warm = max(case.sessions * 10, 100)
    rate = run_once(client, contender, case, warm).rate
    messages = int(rate * seconds)
    contender.size_for[case] = max(case.sessions * 5, min(messages, 500_000))


# --------------------------------------------------------------------------- report


def median(runs: Sequence[Run], value: str) -> float:
    return float(statistics.median(getattr(run, value) for run in runs))


def median_ms(runs: Sequence[Run], cpu: str) -> float:
    return statistics.median(run.per_message_ms(getattr(run, cpu)) for run in runs)


def figures(case: Case, contenders: Sequence[Contender]) -> dict[str, object]:
    direct, relayed = contenders[:2]
    d, r = direct.runs[case], relayed.runs[case]
    baseline: dict[str, object] = {}
    if len(contenders) > 2:
        b = contenders[2].runs[case]
        baseline = {
            "baseline_msgs_per_s": round(median(b, "rate"), 1),
            "baseline_ratio": round(median(b, "rate") / median(d, "rate"), 3),
            "baseline_cpu_ms_per_msg": round(median_ms(b, "egressd_cpu"), 3),
            "baseline_core_share": round(
                statistics.median(run.egressd_cpu / run.seconds for run in b), 2
            ),
            "baseline_rounds": [round(run.rate, 1) for run in b],
        }
    return baseline | {
        "case": case.name,
        "size": case.size,
        "sessions": case.sessions,
        "pipelining": case.pipelining,
        "direct_msgs_per_s": round(median(d, "rate"), 1),
        "egressd_msgs_per_s": round(median(r, "rate"), 1),
        "ratio": round(median(r, "rate") / median(d, "rate"), 3),
        "egressd_cpu_ms_per_msg": round(median_ms(r, "egressd_cpu"), 3),
        "egressd_core_share": round(
            statistics.median(run.egressd_cpu / run.seconds for run in r), 2
        ),
        "generator_cpu_ms_per_msg": {
            "direct": round(median_ms(d, "generator_cpu"), 3),
            "egressd": round(median_ms(r, "generator_cpu"), 3),
        },
        "sink_cpu_ms_per_msg": {
            "direct": round(median_ms(d, "sink_cpu"), 3),
            "egressd": round(median_ms(r, "sink_cpu"), 3),
        },
        "direct_rounds": [round(run.rate, 1) for run in d],
        "egressd_rounds": [round(run.rate, 1) for run in r],
    }


def print_table(
    rows: Sequence[dict[str, object]], client: str, rounds: int, names: tuple[str, str]
) -> None:
    print(
        f"SMTP door, generator {client}, sink smtp-sink; medians of {rounds} alternating rounds."
        "\nCPU in ms per message (user+system); gen and sink as direct/through egressd;"
        " 'core' is egressd's share of one core while loaded."
    )
    header = (
        f"{'case':<34} {'direct/s':>9} {'egressd/s':>9} {'ratio':>6} {'egressd':>8}"
        f" {'core':>5} {'gen d/e':>13} {'sink d/e':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        gen = row["generator_cpu_ms_per_msg"]
        sink = row["sink_cpu_ms_per_msg"]
        assert isinstance(gen, dict) and isinstance(sink, dict)
        print(
            f"{row['case']:<34} {row['direct_msgs_per_s']:>9.0f} {row['egressd_msgs_per_s']:>9.0f}"
            f" {row['ratio']:>5.3f}x {row['egressd_cpu_ms_per_msg']:>6.3f}ms"
            f" {row['egressd_core_share']:>4.0%}"
            f" {gen['direct']:>6.3f}/{gen['egressd']:<6.3f}"
            f" {sink['direct']:>6.3f}/{sink['egressd']:<6.3f}"
        )
    if rows and "baseline_msgs_per_s" in rows[0]:
        print_baseline(rows, names)


def print_baseline(rows: Sequence[dict[str, object]], names: tuple[str, str]) -> None:
    """egressd against the baseline checkout, measured in the same rounds."""
    print(f"\negressd ({names[0]}) against {names[1]}, same rounds:")
    header = (
        f"{'case':<34} {'base/s':>9} {'ratio':>6} {'base':>8} {'core':>5}"
        f" {'egressd/s':>9} {'ratio':>6} {'egressd':>8} {'CPU/msg':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        before, after = row["baseline_cpu_ms_per_msg"], row["egressd_cpu_ms_per_msg"]
        assert isinstance(before, float) and isinstance(after, float)
        print(
            f"{row['case']:<34} {row['baseline_msgs_per_s']:>9.0f}"
            f" {row['baseline_ratio']:>5.3f}x {before:>6.3f}ms {row['baseline_core_share']:>4.0%}"
            f" {row['egressd_msgs_per_s']:>9.0f} {row['ratio']:>5.3f}x {after:>6.3f}ms"
            f" {after / before - 1:>+7.0%}"
        )


def cores(runs: Sequence[Run], cpu: str) -> float:
    """CPU seconds per wall second of one process (or group), median over the rounds."""
    return round(statistics.median(getattr(run, cpu) / run.seconds for run in runs), 2)


def workers_figures(case: Case, contenders: Sequence[Contender]) -> dict[str, object]:
    """One row per number of workers (and per ideal contender): rate, speed-up over the
    first, rate as a fraction of the ideal with as many workers, CPU per message and cores
    of egressd, its supervisor, the generator and the sink."""
    direct = contenders[0].runs[case]
    first = median(contenders[1].runs[case], "rate")
    ideals = {c.workers: median(c.runs[case], "rate") for c in contenders[1:] if c.ideal}
    rows = []
    for contender in contenders[1:]:
        r = contender.runs[case]
        rate = median(r, "rate")
        ceiling = ideals.get(contender.workers, first if contender.workers == 1 else None)
        rows.append(
            {
                "workers": contender.workers,
                "contender": "ideal" if contender.ideal else "workers",
                "msgs_per_s": round(rate, 1),
                "speedup": round(rate / first, 3),
                "of_ideal": None if ceiling is None else round(rate / ceiling, 3),
                "egressd_cpu_ms_per_msg": round(median_ms(r, "egressd_cpu"), 3),
                "egressd_cores": cores(r, "egressd_cpu"),
                "supervisor_cpu_ms_per_msg": round(median_ms(r, "supervisor_cpu"), 3),
                "generator_cpu_ms_per_msg": round(median_ms(r, "generator_cpu"), 3),
                "generator_cores": cores(r, "generator_cpu"),
                "sink_cpu_ms_per_msg": round(median_ms(r, "sink_cpu"), 3),
                "sink_cores": cores(r, "sink_cpu"),
                "rounds": [round(run.rate, 1) for run in r],
            }
        )
    return {
        "case": case.name,
        "direct_msgs_per_s": round(median(direct, "rate"), 1),
        "direct_generator_cpu_ms_per_msg": round(median_ms(direct, "generator_cpu"), 3),
        "workers": rows,
    }


def print_workers_table(
    rows: Sequence[dict[str, object]], rounds: int, load: str, apart: bool
) -> None:
    print(
        f"SMTP door by [daemon] workers, generator smtp-source, sink smtp-sink; medians of"
        f" {rounds} alternating rounds; load average {load} at the start.\n"
        "CPU in ms per message (user+system) and cores (CPU seconds per second) of egressd"
        " (the supervisor and every worker summed; 'sup' is the supervisor's part), the"
        " generator and the sink.\n'ideal N' is N independent single-worker daemons on N"
        " ports, each driven by its own smtp-source with 1/N of the sessions, "
        + ("each in its own session" if apart else "all in one session as the workers are")
        + "; 'of ideal' is the rate against the ideal with as many workers."
    )
    header = (
        f"{'case':<34} {'egressd':>9} {'msgs/s':>7} {'speedup':>7} {'ofideal':>7}"
        f" {'CPU/msg':>8} {'cores':>5} {'sup':>7} {'gen':>7} {'cores':>5}"
        f" {'sink':>7} {'cores':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        per_count = row["workers"]
        assert isinstance(per_count, list)
        for item in per_count:
            label = f"{item['contender']} {item['workers']}"
            of_ideal = "" if item["of_ideal"] is None else f"{item['of_ideal']:.2f}"
            print(
                f"{row['case']:<34} {label:>9} {item['msgs_per_s']:>7.0f}"
                f" {item['speedup']:>6.2f}x {of_ideal:>7}"
                f" {item['egressd_cpu_ms_per_msg']:>6.3f}ms {item['egressd_cores']:>5.2f}"
                f" {item['supervisor_cpu_ms_per_msg']:>5.3f}ms"
                f" {item['generator_cpu_ms_per_msg']:>5.3f}ms {item['generator_cores']:>5.2f}"
                f" {item['sink_cpu_ms_per_msg']:>5.3f}ms {item['sink_cores']:>5.2f}"
            )
        print(f"{'':<34} {'direct':>9} {row['direct_msgs_per_s']:>7.0f}")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    cases = FULL if args.full else QUICK
    if args.case:
        cases = [c for c in FULL if c.name in args.case] or sys.exit("bench: no such case")
    if args.sessions_per_case:
        cases = [Case(c.size, args.sessions_per_case, c.pipelining) for c in cases]
    sets: dict[bool, list[Contender]] = {}
    baseline = Path(args.baseline).resolve() if args.baseline else None
    this, names = procs.ROOT, ("this checkout", "the --baseline checkout")
    if args.compiled:  # compiled against pure, this checkout's unless --baseline says
        this, names = procs.compiled_build(), ("this checkout compiled by mypyc", names[1])
        if baseline is None:
            baseline, names = procs.ROOT, (names[0], "this checkout in pure Python")
    workers = [int(n) for n in args.workers.split(",")] if args.workers else []
    if workers and (baseline is not None or args.client != "smtp-source"):
        sys.exit("bench: --workers goes with neither --baseline nor --client python")
    load = load_average()
    with (
        tempfile.TemporaryDirectory(prefix="egressd-smtp-bench-") as tmp,
        contextlib.ExitStack() as servers,
    ):
        for pipelining in sorted({case.pipelining for case in cases}, reverse=True):
            sets[pipelining] = servers.enter_context(
                contenders(Path(tmp), pipelining, baseline, workers, args.ideal_apart, this)
            )
        for case in cases:
            for contender in sets[case.pipelining]:
                calibrate(args.client, contender, case, args.seconds)
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for case in cases:
                order = sets[case.pipelining]
                for contender in order if number % 2 == 0 else reversed(order):
                    messages = contender.size_for[case]
                    result = run_once(args.client, contender, case, messages)
                    contender.runs.setdefault(case, []).append(result)
    if workers:
        table = [workers_figures(case, sets[case.pipelining]) for case in cases]
        if args.json:
            apart = args.ideal_apart
            print(
                json.dumps(
                    {"cpus": os.cpu_count(), "load": load, "ideal_apart": apart, "cases": table}
                )
            )
        else:
            print_workers_table(table, args.rounds, load, args.ideal_apart)
            print(f"load average {load_average()} at the end")
        return 0
    rows = [figures(case, sets[case.pipelining]) for case in cases]
    if args.json:
        print(json.dumps({"client": args.client, "cpus": os.cpu_count(), "cases": rows}))
    else:
        print_table(rows, args.client, args.rounds, names)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench smtp", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole matrix (12 cases)")
    parser.add_argument("--quick", action="store_true", help="the default: 10 KiB, 50 sessions")
    parser.add_argument(
        "--case", action="append", help="only this case, by its printed name (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--seconds", type=float, default=1.5, help="about this long per run")
    parser.add_argument(
        "--client",
        choices=("smtp-source", "python"),
        default="smtp-source",
        help="the load generator (python: the second opinion, pipelining towards egressd)",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure an egressd imported from the checkout DIR, in the same rounds",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="run this checkout's mypyc-compiled build (scripts/compiled) against its pure"
        " Python (or against --baseline DIR), in the same rounds",
    )
    parser.add_argument(
        "--sessions-per-case",
        type=int,
        metavar="N",
        help="N concurrent sessions in every case instead of the case's own",
    )
    parser.add_argument(
        "--workers",
        metavar="N,M",
        help="egressd with [daemon] workers = N, M... side by side (e.g. 1,2)",
    )
    parser.add_argument(
        "--ideal-apart",
        action="store_true",
        help="with --workers: each ideal daemon in its own session (its own CPU share under"
        " autogroup scheduling), not all in one as a supervisor and its workers are",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--python-load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.python_load:
        from smtp_load import main as load_main

        return load_main(args.python_load, args.messages, args.sessions, args.size)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
