"""Process helpers shared by the benchmarks: start a server, wait for its port, read its CPU.

Every server is started in its own session (``start_new_session``), so its CPU can be read
from ``/proc`` for the whole process tree (Dante forks), and it is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin", os.environ.get("PATH", "")])
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
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


def python_env(root: Path = ROOT) -> dict[str, str]:
    """The environment for Python children: egressd imported from ``root``."""
    return {**os.environ, "PYTHONPATH": str(root)}


@contextlib.contextmanager
def running(
    argv: Sequence[str], port: int, workdir: Path, name: str, root: Path = ROOT
) -> Iterator[int]:
    """Start ``argv``, wait until ``port`` listens, yield its PID; stop it by PID.
    A Python child imports egressd from ``root``."""
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
        env=python_env(root),
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


def cpu_seconds(session: int) -> float:
    """User + system CPU of every process in session ``session`` (a server and its children),
    from ``/proc/PID/stat`` (fields 14 and 15, all threads included)."""
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
    return ticks / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User + system CPU of this process's children that were waited for (the generators:
    the servers are only waited for at the end)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
