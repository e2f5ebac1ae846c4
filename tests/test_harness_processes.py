"""harness.start_process: when it returns, every process the daemon started is gone.

A daemon's helpers do not all stay where ``killpg`` reaches them: one calls setsid (it
leaves the process group), one double-forks (it is re-parented to the test process and is
nobody's descendant), one ignores SIGTERM and forks while it is being stopped. Each of
them writes its PID to a file; none may exist afterwards, not even as a zombie.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import harness
import pytest
from harness import start_process

# Helpers each write "<role> <pid>" to pids.txt; the leader then prints "ready".
FAMILY = r"""
import os, signal, sys, time

def note(role):
    with open("pids.txt", "a") as f:
        f.write(f"{role} {os.getpid()}\n")

def helper(role, setup):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        setup()
        note(role)
        while True:
            if role == "forker" and os.fork() == 0:
                note("forked")
                time.sleep(60)
                os._exit(0)
            time.sleep(0.05)
        os._exit(0)

def double_fork():
    if os.fork() != 0:
        os._exit(0)  # the intermediate exits: its child is orphaned at once
    os.setsid()

helper("setsid", os.setsid)
helper("daemon", double_fork)
helper("forker", lambda: None)
while sum(1 for _ in open("pids.txt")) < 4:
    time.sleep(0.01)
open("ready", "w").close()
time.sleep(60)
"""


def pids_of(directory: Path) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {}
    for line in (directory / "pids.txt").read_text().splitlines():
        role, pid = line.split()
        roles.setdefault(role, []).append(int(pid))
    return roles


def test_no_helper_outlives_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "pids.txt").touch()
    argv = [sys.executable, "-c", FAMILY]
    with start_process(argv, (tmp_path / "ready").exists, cwd=tmp_path) as process:
        leader = process.pid
    roles = pids_of(tmp_path)
    assert set(roles) == {"setsid", "daemon", "forker", "forked"}
    left = [
        (role, pid) for role, pids in roles.items() for pid in pids if Path(f"/proc/{pid}").exists()
    ]
    assert left == [], f"helpers of daemon {leader} still exist (zombies count)"
    assert not Path(f"/proc/{leader}").exists()
    assert os.getpid() != leader


# The leader forks a "forker" that forks one child and exits; the leader exits once both
# noted their PIDs. The forker is then a zombie and its child lives on in the group.
FORKER_AND_CHILD = r"""
import os, time

def note(role):
    with open("pids.txt", "a") as f:
        f.write(f"{role} {os.getpid()}\n")

if os.fork() == 0:
    if os.fork() == 0:
        note("child")
        time.sleep(60)
        os._exit(0)
    note("forker")
    os._exit(0)
while sum(1 for _ in open("pids.txt")) < 2:
    time.sleep(0.01)
"""


def test_a_helper_forked_after_the_scan_is_reaped_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan of /proc cannot see a helper forked after it, which the same pass's killpg
    kills: the stop may end only once a later scan finds nothing, or that helper is left
    a zombie. The first scan here misses the child, as if it were forked just after."""
    (tmp_path / "pids.txt").touch()
    harness._become_subreaper()
    leader = subprocess.Popen(
        [sys.executable, "-c", FORKER_AND_CHILD], cwd=tmp_path, start_new_session=True
    )
    assert leader.wait(10) == 0
    roles = pids_of(tmp_path)
    [forker], [child] = roles["forker"], roles["child"]
    try:
        deadline = time.monotonic() + 10
        while harness._state(forker) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        scan = harness._family
        scans = 0

        def scan_missing_the_child(leader: int, mark: str, known: Collection[int] = ()) -> set[int]:
            nonlocal scans
            scans += 1
            return scan(leader, mark, known) - ({child} if scans == 1 else set())

        monkeypatch.setattr(harness, "_family", scan_missing_the_child)
        left = harness._kill_family(leader.pid, "", set(), time.monotonic() + 5)
        assert left == {}
        assert harness._state(child) == "", "the helper forked after the scan is still there"
    finally:
        for pid in (child, forker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
