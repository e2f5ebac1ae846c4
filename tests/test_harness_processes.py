"""harness.start_process: when it returns, every process the daemon started is gone.

A daemon's helpers do not all stay where ``killpg`` reaches them: one calls setsid (it
leaves the process group), one double-forks (it is re-parented to the test process and is
nobody's descendant), one ignores SIGTERM and forks while it is being stopped. Each of
them writes its PID to a file; none may exist afterwards, not even as a zombie.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
