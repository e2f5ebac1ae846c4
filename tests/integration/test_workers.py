"""``[daemon] workers = 2``: one supervisor, two worker processes, one daemon to the outside.

Every test runs the real ``python -m egressd run`` (see ``service_harness.py``) with two
workers and talks to it on loopback as an MTA, systemd, an operator and Prometheus would.

Which worker gets a connection is the kernel's choice. To make it ours, a test stops the
other worker with SIGSTOP for the length of one exchange (:meth:`Workers.only`): a stopped
process does not accept, so the one left running takes the connection from the shared
listening socket; SIGCONT gives it back its share. Which worker served a session shows in
the log (every line carries ``worker=N``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import smtplib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import DEFAULT_BANNER, Sink, free_port, receive_until
from service_harness import DaemonProcess, daemon_process, sample, scrape, socks_connect
from smtp_harness import SmtpSink, smtp_sink

from egressd import __version__
from egressd.proto.proxy import build_v2
from egressd.state import DATABASE_NAME
from egressd.status import ask

pytestmark = pytest.mark.integration

POOLS_A = '[pool."p"."a"]\nweight = 1\n[pool."p"."b"]\nweight = 0\n'
POOLS_B = '[pool."p"."a"]\nweight = 0\n[pool."p"."b"]\nweight = 1\n'


@dataclass
class Workers:
    """A running two-worker egressd and what its tests reach it with."""

    process: DaemonProcess
    directory: Path
    sink: Sink
    metrics_port: int

    @property
    def control(self) -> str:
        return str(self.directory / "control.sock")

    async def status(self) -> dict[str, Any]:
        reply = await trio.to_thread.run_sync(ask, self.control, {"command": "status"})
        assert reply["ok"], reply
        status: dict[str, Any] = reply["status"]
        return status

    async def port(self, door: str) -> int:
        (port,) = [
            item["port"] for item in (await self.status())["listeners"] if item["door"] == door
        ]
        return int(port)

    async def pids(self) -> dict[int, int]:
        return {row["worker"]: row["pid"] for row in (await self.status())["workers"]}

    @asynccontextmanager
    async def only(self, worker: int) -> AsyncIterator[None]:
        """Every other worker stopped (SIGSTOP) inside the block: ``worker`` accepts all."""
        others = [pid for number, pid in (await self.pids()).items() if number != worker]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    async def socks(self, port: int) -> str:
        """One SOCKS5 session to the sink: the source address the sink saw."""
        connection = await socks_connect(port, "127.0.0.1", self.sink.port)
        assert await connection.receive_until(DEFAULT_BANNER)
        await connection.finish()
        return self.sink.connections[-1].peer[0]

    async def proxy(self, port: int, source: str) -> bytes:
        """One PROXY v2 session from ``source`` to the sink: the banner relayed."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            header = build_v2(
                ipaddress.ip_address(source),
                0,
                ipaddress.ip_address("127.0.0.1"),
                self.sink.port,
            )
            await stream.send_all(header)
            return await receive_until(stream, b"\r\n")

    def session_lines(self, door: str) -> list[str]:
        """The log's connection lines of ``door`` (one per finished session)."""
        return [
            line
            for line in self.process.log().splitlines()
            if "egressd.session: connection" in line and f"door={door}" in line
        ]

    def sessions_of(self, door: str, worker: int) -> int:
        return sum(1 for line in self.session_lines(door) if f" worker={worker}" in line)

    async def wait_sessions_logged(self, door: str, count: int) -> None:
        while len(self.session_lines(door)) < count:
            await trio.sleep(0.02)


def write_config(
    directory: Path,
    sink: Sink,
    metrics_port: int,
    pools: str = POOLS_A,
    extra: str = "",
    shaping: bool = False,
    workers: int = 2,
) -> Path:
    config = directory / "egressd.toml"
    text = f"""{'shaping_files = ["shaping.toml"]' if shaping else ""}
[daemon]
workers = {workers}
{extra}

[source."a"]
source_address = "127.0.0.2"
[source."b"]
source_address = "127.0.0.3"
{pools}

[access]
deny_destinations = []
destination_ports = [{sink.port}]

[limits]
shutdown_grace = "20s"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[control]
socket = "{directory / "control.sock"}"

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "p"

[[proxy.listener]]
address = "127.0.0.1:0"

[[smtp.listener]]
address = "127.0.0.1:0"
pool = "p"
"""
    temporary = config.with_suffix(".new")
    temporary.write_text(text)
    temporary.replace(config)  # atomically: the file watch never sees half a file
    return config


@asynccontextmanager
async def two_workers(
    short_dir: Path,
    sink: Sink,
    extra: str = "",
    smtp_port: int | None = None,
    *,
    shaping: bool = False,
    watchdog_usec: int | None = None,
) -> AsyncIterator[Workers]:
    metrics_port = free_port()
    routes = "" if smtp_port is None else f'[smtp.routes]\n"*" = "127.0.0.1:{smtp_port}"\n'
    config = write_config(short_dir, sink, metrics_port, extra=extra + routes, shaping=shaping)
    async with daemon_process(config, watchdog_usec=watchdog_usec) as process:
        yield Workers(process, short_dir, sink, metrics_port)


def smtp_send(port: int, sender: str) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, "rcpt@dest.test", "workers"
    message.set_content("through one of two workers\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(message)


@pytest.fixture
def mx() -> Any:
    with smtp_sink() as server:
        yield server


async def test_two_workers_serve_all_three_doors_and_the_metrics_add_up(
    short_dir: Path, sink: Sink, mx: SmtpSink
) -> None:
    async with two_workers(short_dir, sink, smtp_port=mx.port) as w:
        status = await w.status()
        assert [row["state"] for row in status["workers"]] == ["ready", "ready"]
        assert len(set((await w.pids()).values())) == 2
        socks, proxy, smtp = await w.port("socks5"), await w.port("proxy"), await w.port("smtp")
        for worker, socks_sessions in ((1, 2), (2, 3)):
            async with w.only(worker):
                with trio.fail_after(10):
                    for _ in range(socks_sessions):
                        assert await w.socks(socks) == "127.0.0.2"
                    assert await w.proxy(proxy, "127.0.0.3") == DEFAULT_BANNER
                    await trio.to_thread.run_sync(smtp_send, smtp, f"w{worker}@sender.test")
        with trio.fail_after(10):
            messages = await mx.wait(2)
            for door, count in (("socks5", 5), ("proxy", 2), ("smtp", 2)):
                await w.wait_sessions_logged(door, count)
        assert sorted(m.mail_from for m in messages) == ["w1@sender.test", "w2@sender.test"]
        assert {m.peer for m in messages} == {"127.0.0.2"}
        assert (w.sessions_of("socks5", 1), w.sessions_of("socks5", 2)) == (2, 3)
        for door in ("proxy", "smtp"):
            assert (w.sessions_of(door, 1), w.sessions_of(door, 2)) == (1, 1), door

        text = await scrape(w.metrics_port)
        socks_ok = {"door": "socks5", "pool": "p", "source": "a", "outcome": "ok"}
        assert sample(text, "egressd_connections_total", **socks_ok) == 5
        proxy_ok = {"door": "proxy", "pool": "", "source": "b", "outcome": "ok"}
        assert sample(text, "egressd_connections_total", **proxy_ok) == 2
        delivered = {"door": "smtp", "pool": "p", "source": "a", "outcome": "delivered"}
        assert sample(text, "egressd_connections_total", **delivered) == 2
        assert sample(text, "proxy_connections_accepted_total", listener="127.0.0.1:0") == 5
        assert sample(text, "egressd_active_sessions", door="socks5") == 0
        assert sample(text, "egressd_source_active_connections", source="a") == 0
        assert sample(text, "egressd_workers", state="ready") == 2
        assert sample(text, "egressd_build_info", version=__version__) == 1
        assert text.count("# TYPE process_cpu_seconds_total") == 1
        cpu = sample(text, "process_cpu_seconds_total")
        assert cpu is not None and cpu > 0


async def test_a_reload_applies_to_both_workers_or_to_none(short_dir: Path, sink: Sink) -> None:
    async with two_workers(short_dir, sink) as w:
        socks = await w.port("socks5")
        (short_dir / "egressd.toml").write_text("[daemon]\nworkers = 2\n[pool.p.nosuch]\n")
        with trio.fail_after(20):
            await w.process.reload()  # invalid: no worker is asked
            status = await w.status()
            for worker in (1, 2):
                async with w.only(worker):
                    assert await w.socks(socks) == "127.0.0.2"
        assert (status["generation"], status["reload_failures"]) == (1, 1)
        assert [row["generation"] for row in status["workers"]] == [1, 1]
        log = w.process.log()
        assert "reload failed, every worker still runs the previous configuration" in log
        assert sample(await scrape(w.metrics_port), "egressd_reload_failures_total") == 1

        write_config(short_dir, sink, w.metrics_port, pools=POOLS_B)
        with trio.fail_after(20):
            await w.process.reload()
            status = await w.status()
            for worker in (1, 2):
                async with w.only(worker):
                    assert await w.socks(socks) == "127.0.0.3"
            await w.wait_sessions_logged("socks5", 4)
        assert status["generation"] == 2
        assert [row["generation"] for row in status["workers"]] == [2, 2]
        assert (w.sessions_of("socks5", 1), w.sessions_of("socks5", 2)) == (2, 2)
        reloaded = re.findall(r"configuration reloaded.* generation=2 worker=", w.process.log())
        assert len(reloaded) == 2
        assert sample(await scrape(w.metrics_port), "egressd_reloads_total") == 1

        for workers in (3, 1):  # a third worker starts; then two drain and retire
            write_config(short_dir, sink, w.metrics_port, pools=POOLS_B, workers=workers)
            with trio.fail_after(30):
                await w.process.reload()
                while [row["state"] for row in (await w.status())["workers"]] != [
                    "ready"
                ] * workers:
                    await trio.sleep(0.05)
                async with w.only(workers):
                    assert await w.socks(socks) == "127.0.0.3"
        assert "worker retired worker=3" in w.process.log()
        assert "worker retired worker=2" in w.process.log()


async def test_status_counts_both_workers_and_sigterm_drains_both(
    short_dir: Path, sink: Sink
) -> None:
    async with two_workers(short_dir, sink, watchdog_usec=1_000_000) as w:
        socks = await w.port("socks5")
        sessions = []
        with trio.fail_after(10):
            for worker in (1, 2):
                async with w.only(worker):
                    connection = await socks_connect(socks, "127.0.0.1", sink.port)
                    await connection.receive_until(DEFAULT_BANNER)
                    sessions.append(connection)
            status = await w.status()
            shown = await trio.run_process(
                [sys.executable, "-m", "egressd", "status", "-c", str(w.process.config)],
                capture_stdout=True,
            )
            metrics = await scrape(w.metrics_port)
        assert status["active_sessions"] == 2
        assert [row["active_sessions"] for row in status["workers"]] == [1, 1]
        (source,) = [s for s in status["sources"] if s["name"] == "a"]
        assert source["active_connections"] == 2
        text = shown.stdout.decode()
        assert "(2 workers)" in text and "2 active sessions" in text
        assert re.search(r"^1\s+\d+\s+ready\s+1\s+1\s+0", text, re.MULTILINE), text
        assert sample(metrics, "egressd_active_sessions", door="socks5") == 2
        assert sample(metrics, "egressd_source_active_connections", source="a") == 2
        w.process.send(signal.SIGTERM)
        with trio.fail_after(10):
            await w.process.notify.wait_for("STOPPING=1")
            while not all(
                f"draining sessions=1 grace_seconds=20.0 worker={n}" in w.process.log()
                for n in (1, 2)
            ):
                await trio.sleep(0.02)
            while True:  # once every copy of the listening socket is closed: refused
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", socks)
                except OSError:
                    break
                await stream.aclose()
                await trio.sleep(0.02)
            for number, connection in enumerate(sessions):
                await connection.stream.send_all(b"still here %d\n" % number)
                await connection.receive_until(b"still here %d\n" % number)
                await connection.finish()
            assert await w.process.wait_exit() == 0
        log = w.process.log()
        assert "grace period over" not in log
        # the supervisor alone speaks to systemd: one READY=1 (once both workers were
        # ready), its watchdog pings, STOPPING=1
        assert w.process.notify.states() == ["READY=1", "STOPPING=1"]
        assert "WATCHDOG=1" in w.process.notify.history
        assert (w.sessions_of("socks5", 1), w.sessions_of("socks5", 2)) == (1, 1)


async def restarted(w: Workers, worker: int, old_pid: int) -> dict[int, dict[str, Any]]:
    """Wait until ``worker`` runs again under a new pid; every worker's status row."""
    while True:
        rows = {row["worker"]: row for row in (await w.status())["workers"]}
        if rows[worker]["state"] == "ready" and rows[worker]["pid"] != old_pid:
            return rows
        await trio.sleep(0.05)


async def test_a_dead_or_hung_worker_is_restarted_while_the_other_serves(
    short_dir: Path, sink: Sink
) -> None:
    async with two_workers(short_dir, sink, extra='worker_timeout = "3s"') as w:
        socks = await w.port("socks5")
        pids = await w.pids()
        labels = {"door": "socks5", "pool": "p", "source": "a", "outcome": "ok"}
        with trio.fail_after(10):
            async with w.only(1):
                assert await w.socks(socks) == "127.0.0.2"
            await w.wait_sessions_logged("socks5", 1)  # logged after the close
            assert sample(await scrape(w.metrics_port), "egressd_connections_total", **labels) == 1
        os.kill(pids[1], signal.SIGKILL)
        with trio.fail_after(15):
            assert await w.socks(socks) == "127.0.0.2"  # worker 2 alone, at once
            rows = await restarted(w, 1, pids[1])
            assert rows[1]["restarts"] == 1
            assert (rows[2]["pid"], rows[2]["restarts"]) == (pids[2], 0)
            async with w.only(1):
                assert await w.socks(socks) == "127.0.0.2"
            await w.wait_sessions_logged("socks5", 3)
        assert (w.sessions_of("socks5", 1), w.sessions_of("socks5", 2)) == (2, 1)
        log = w.process.log()
        assert "worker died, starting it again worker=1" in log
        assert 'exit="signal SIGKILL"' in log
        metrics = await scrape(w.metrics_port)
        assert sample(metrics, "egressd_worker_restarts_total", worker="1") == 1
        assert sample(metrics, "egressd_connections_total", **labels) == 3  # the dead one's too

        os.kill(pids[2], signal.SIGSTOP)  # its event loop says nothing any more
        with trio.fail_after(20):
            rows = await restarted(w, 2, pids[2])
            async with w.only(2):
                assert await w.socks(socks) == "127.0.0.2"
        assert rows[2]["restarts"] == 1
        assert "worker hung, killing it worker=2" in w.process.log()


async def socks_code(port: int, target: int) -> tuple[int, trio.SocketStream]:
    """A SOCKS5 CONNECT to 127.0.0.1:``target``: the reply code and the open stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"\x05\x01\x00")
    assert await stream.receive_some(2) == b"\x05\x00"
    await stream.send_all(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = await stream.receive_some(10 - len(reply))
        assert chunk
        reply += chunk
    return reply[1], stream


async def test_a_connection_limit_is_exact_across_workers_and_a_dead_workers_slots_return(
    short_dir: Path, sink: Sink
) -> None:
    (short_dir / "shaping.toml").write_text('["default"]\nconnection_limit = 2\n')
    async with two_workers(short_dir, sink, shaping=True) as w:
        socks = await w.port("socks5")

        async def held_slots() -> int:
            return sum((await w.status())["host_budgets"]["slots"].values())

        async def until_held(count: int) -> None:
            while await held_slots() != count:
                await trio.sleep(0.02)

        with trio.fail_after(20):
            async with w.only(1):
                first = [await socks_code(socks, sink.port) for _ in range(2)]
            assert [code for code, _ in first] == [0, 0]
            await until_held(2)
            shown = await trio.run_process(
                [sys.executable, "-m", "egressd", "status", "-c", str(w.process.config)],
                capture_stdout=True,
            )
            assert re.search(
                r"^connection slots held in egressd:leases:\S+: 2$", shown.stdout.decode(), re.M
            ), shown.stdout.decode()
            async with w.only(2):  # worker 2 finds the budget used by worker 1
                code, refused = await socks_code(socks, sink.port)
                await refused.aclose()
            assert code == 1
            await first[0][1].aclose()
            await until_held(1)
            async with w.only(2):
                code, second = await socks_code(socks, sink.port)
            assert code == 0
            await until_held(2)
            killed = (await w.pids())[1]
            os.kill(killed, signal.SIGKILL)  # holding one slot
            await until_held(1)
            await restarted(w, 1, killed)  # so that only(2) stops the new worker 1
            async with w.only(2):
                code, third = await socks_code(socks, sink.port)
                assert code == 0
                code, refused = await socks_code(socks, sink.port)
                await refused.aclose()
            assert code == 1
            for stream in (second, third):
                await stream.aclose()
        assert "a stopped worker's connection slots returned worker=1 slots=1" in w.process.log()


async def test_a_worker_that_cannot_start_stops_the_startup_with_its_exit_status(
    tmp_path: Path,
) -> None:
    """A corrupt state database: every worker exits 78 (EX_CONFIG) before it is ready, so
    the supervisor does too, and systemd's RestartPreventExitStatus=78 applies."""
    (tmp_path / "state").mkdir()
    database = tmp_path / "state" / DATABASE_NAME
    database.write_bytes(b"not a database at all " * 200)
    config = tmp_path / "egressd.toml"
    config.write_text(
        f"""
[daemon]
workers = 2
[state]
directory = "{tmp_path / "state"}"
[warmup.plan.test]
days = [10, 100]
[source."cold"]
source_address = "127.0.0.3"
warmup = "test"
[pool."main"."cold"]
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
"""
    )
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "egressd", "run", "-c", str(config)],
            capture_stderr=True,
            check=False,
        )
    log = result.stderr.decode()
    assert result.returncode == 78, log
    assert re.search(r"supervisor: cannot start: worker \d exited \(status 78\) before", log), log
    assert str(database) in log and "corrupt" in log


async def test_every_short_session_is_served_and_both_workers_take_a_share(
    short_dir: Path, sink: Sink
) -> None:
    """Both workers accept from the one listening socket: 32 sessions opened eight at a
    time all reach the sink, and while they are open each worker holds some of them (a
    busier worker lets the other accept first, :mod:`egressd.net.balance`)."""
    async with two_workers(short_dir, sink) as w:
        socks = await w.port("socks5")
        opened: list[Any] = []

        async def open_one() -> None:
            connection = await socks_connect(socks, "127.0.0.1", sink.port)
            await connection.receive_until(DEFAULT_BANNER)
            opened.append(connection)

        with trio.fail_after(20):
            for _ in range(4):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(open_one)
            held = [row["active_sessions"] for row in (await w.status())["workers"]]
            for connection in opened:
                await connection.finish()
            await w.wait_sessions_logged("socks5", 32)
        assert len(sink.connections) == 32
        assert sum(held) == 32 and min(held) >= 32 // 4, held
        assert w.sessions_of("socks5", 1) + w.sessions_of("socks5", 2) == 32


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:``port`` (for a
    listening socket, /proc/net/tcp's rx_queue is that queue's length)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # TCP_LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


async def test_a_worker_killed_loses_no_connection_waiting_in_the_backlog(
    short_dir: Path, sink: Sink
) -> None:
    """Connections the kernel queued on the shared listening socket belong to no worker: with
    both workers stopped, ten clients connect and wait; worker 1 is killed, worker 2 goes on,
    and all ten are served (with a socket per worker, SO_REUSEPORT, the kernel would have
    hashed about half of them to worker 1's socket and reset them with it)."""
    async with two_workers(short_dir, sink) as w:
        socks = await w.port("socks5")
        pids = await w.pids()
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        served: list[bytes] = []

        async def one_session() -> None:
            connection = await socks_connect(socks, "127.0.0.1", sink.port)
            await connection.receive_until(DEFAULT_BANNER)
            served.append(await connection.finish())

        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(one_session)
                    while accept_queue(socks) < 10:  # connected, queued, nobody accepts
                        await trio.sleep(0.02)
                    os.kill(pids[1], signal.SIGKILL)
                    os.kill(pids[2], signal.SIGCONT)
                await w.wait_sessions_logged("socks5", 10)
                # Worker 2 can serve all ten before the supervisor has seen worker 1 die and
                # logged it: wait for the restart that follows the log line.
                await restarted(w, 1, pids[1])
        finally:
            os.kill(pids[2], signal.SIGCONT)
        assert len(served) == len(sink.connections) == 10
        assert all(DEFAULT_BANNER in received for received in served)
        assert "worker died, starting it again worker=1" in w.process.log()
