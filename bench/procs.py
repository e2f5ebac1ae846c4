"""Process helpers shared by the benchmarks: start a server, wait for its port, read its CPU.

Every server is started in its own session (``start_new_session``) and stopped by its PID.
Its CPU is that of its whole process tree (Dante forks children that come and go; egressd
with ``[daemon] workers`` has a supervisor and workers), counted so that a child that
exits between two readings cannot make the difference negative:

* where this process may create a cgroup (cgroup v1 ``cpuacct`` or v2, as root here), each
  server and every process of its session go into a cgroup of their own as soon as it
  listens; children inherit it, and its ``cpuacct.usage`` (``cpu.stat``'s ``usage_usec``)
  keeps the CPU of the ones that exited;
* otherwise from ``/proc``: user + system of each process of the session plus the CPU of
  the children it waited for (``cutime``/``cstime``), so a child's CPU moves to its parent
  when it exits instead of vanishing from the sum (exact except for a child reaped between
  the reading of its parent and its own).
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
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin", os.environ.get("PATH", "")])
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CGROUP_ROOTS = (
    Path("/sys/fs/cgroup/cpuacct"),  # cgroup v1
    Path("/sys/fs/cgroup/unified"),  # v2 beside v1 (hybrid)
    Path("/sys/fs/cgroup"),  # v2 alone
)
_GROUPS: dict[int, Path] = {}
"""The cgroup of each server started by :func:`running`, by its PID (= session id)."""


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


def compiled_build() -> Path:
    """This checkout's mypyc-compiled egressd (``scripts/compiled`` builds it once per state
    of the sources): the directory to import it from, as ``root`` of :func:`running`."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "compiled")], stdout=subprocess.PIPE, text=True, check=True
    )
    return Path(done.stdout.strip())


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
        group = _cpu_group(process.pid, name)
        if group is not None:
            _GROUPS[process.pid] = group
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
        group = _GROUPS.pop(process.pid, None)
        if group is not None:
            _remove_group(group)


def _cpu_group(session: int, name: str) -> Path | None:
    """A new cgroup holding every process of ``session`` (None: cgroups are not writable
    here). Moved twice: a child forked by a process not yet moved is caught the second time."""
    for root in CGROUP_ROOTS:
        usage = "cpuacct.usage" if root.name == "cpuacct" else "cpu.stat"
        if not (root / usage).exists() and not (root / "cgroup.procs").exists():
            continue
        group = root / f"egressd-bench-{name}-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            for _ in range(2):
                for pid in _session_pids(session):
                    with contextlib.suppress(ProcessLookupError):
                        (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            _remove_group(group)
            continue
        if _group_seconds(group) is not None:
            return group
        _remove_group(group)
    return None


def _remove_group(group: Path) -> None:
    for _ in range(50):  # the killed processes leave it as they are reaped
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _group_seconds(group: Path) -> float | None:
    """CPU seconds used in ``group`` since its processes joined; None if unreadable."""
    try:
        if (group / "cpuacct.usage").exists():
            return int((group / "cpuacct.usage").read_text()) / 1e9
        for line in (group / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        return None
    return None


def _session_stats(session: int) -> Iterator[tuple[int, list[str]]]:
    """(PID, the fields after the command name of ``/proc/PID/stat``) of every process of
    ``session``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:  # field 6, session id
            yield int(entry), fields


def _session_pids(session: int) -> list[int]:
    return [pid for pid, _ in _session_stats(session)]


def cpu_seconds(session: int) -> float:
    """User + system CPU of the server ``session`` and its process tree, children that
    exited included (see the module doc): from its cgroup when it has one, else from
    ``/proc/PID/stat`` of every process in the session (fields 14 to 17: utime, stime and
    the waited-for children's cutime, cstime; all threads included)."""
    group = _GROUPS.get(session)
    if group is not None:
        seconds = _group_seconds(group)
        if seconds is not None:
            return seconds
    ticks = 0
    for _, fields in _session_stats(session):
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User + system CPU of this process's children that were waited for (the generators:
    the servers are only waited for at the end)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
