"""egressd as a service: the real daemon process, real signals, a real $NOTIFY_SOCKET.

Every test starts ``python -m egressd run -c FILE`` (see ``service_harness.py``), waits for
READY=1, talks to its SOCKS5 front door on loopback with a real SOCKS5 client, and checks
what an operator or a client would notice: which source address a loopback sink sees,
whether a connection keeps flowing or is refused, what the log, ``egressd status`` and the
metrics endpoint say, and how the process exits.

Sources are loopback addresses (127.0.0.2 = "a", 127.0.0.3 = "b"), which Linux lets any
process bind; 203.0.113.7 is only ever a source that is expected to fail at bind.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from harness import DEFAULT_BANNER, Sink, free_port
from service_harness import (
    SocksRefused,
    daemon_process,
    sample,
    scrape,
    socks_connect,
)

from egressd.config import ConfigError, load_config

pytestmark = pytest.mark.integration

POOL_A_ONLY = """
[pool."p"."a"]
weight = 1

[pool."p"."b"]
weight = 0
"""

SOURCES = """
[source."a"]
source_address = "127.0.0.2"

[source."b"]
source_address = "127.0.0.3"
"""


@dataclass
class Setup:
    """A working directory, the ports a test's daemon uses, and the sink it reaches."""

    directory: Path
    sink: Sink
    socks_port: int
    metrics_port: int

    @property
    def config(self) -> Path:
        return self.directory / "egressd.toml"

    @property
    def control(self) -> Path:
        return self.directory / "control.sock"

    def write(
        self,
        pools: str = POOL_A_ONLY,
        *,
        sources: str = SOURCES,
        grace: str = "20s",
        listeners: tuple[int, ...] | None = None,
        extra: str = "",
    ) -> Path:
        """Write the main configuration file (and return its path)."""
        socks_listeners = "".join(
            f'[[socks5.listener]]\naddress = "127.0.0.1:{port}"\npool = "p"\n\n'
            for port in (listeners if listeners is not None else (self.socks_port,))
        )
        self.config.write_text(
            f"""{extra}
{sources}
{pools}

[access]
deny_destinations = []
destination_ports = [{self.sink.port}]

[limits]
shutdown_grace = "{grace}"

[metrics]
listen = "127.0.0.1:{self.metrics_port}"

[control]
socket = "{self.control}"

{socks_listeners}"""
        )
        return self.config

    async def open(self, port: int | None = None) -> tuple[str, bytes]:
        """One SOCKS5 connection to the sink: (source address the sink saw, banner)."""
        connection = await socks_connect(port or self.socks_port, "127.0.0.1", self.sink.port)
        banner = await connection.receive_until(DEFAULT_BANNER)
        await connection.finish()
        return self.sink.connections[-1].peer[0], banner

    async def peers_of(self, count: int) -> list[str]:
        """The source address of each of ``count`` new connections, in order."""
        return [(await self.open())[0] for _ in range(count)]

    async def metrics(self) -> str:
        return await scrape(self.metrics_port)

    async def wait_sessions_done(self) -> str:
        """Scrape until no SOCKS5 session is active any more; the last exposition."""
        while True:
            text = await self.metrics()
            if sample(text, "egressd_active_sessions", door="socks5") == 0:
                return text
            await trio.sleep(0.02)


@pytest.fixture
def setup(short_dir: Path, sink: Sink) -> Setup:
    return Setup(short_dir, sink, free_port(), free_port())


async def egressd_status(config: Path) -> tuple[int, str, str]:
    """``egressd status -c config``: exit status, stdout, stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "status", "-c", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def status_rows(table: str) -> dict[str, list[str]]:
    """The status table's rows by source name (the header row is keyed "SOURCE")."""
    rows = {}
    for line in table.splitlines():
        words = line.split()
        if len(words) >= 5 and words[1] in ("healthy", "suspended", "STATE"):
            rows[words[0]] = words
    return rows


# --------------------------------------------------------------------------- reload


async def test_reload_changes_new_connections_while_an_open_one_keeps_flowing(
    setup: Setup,
) -> None:
    async with daemon_process(setup.write(), args=("--json-logs",)) as daemon:
        with trio.fail_after(20):
            before = await socks_connect(setup.socks_port, "127.0.0.1", setup.sink.port)
            await before.receive_until(DEFAULT_BANNER)
            await before.stream.send_all(b"EHLO before\r\n")
            await before.receive_until(b"EHLO before\r\n")

            setup.write('[pool."p"."a"]\nweight = 1\n\n[pool."p"."b"]\nweight = 3\n')
            await daemon.reload()
            peers = await setup.peers_of(4)

            await before.stream.send_all(b"EHLO after\r\n")
            received = await before.finish()
            metrics = await setup.wait_sessions_done()

    assert sorted(peers) == ["127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.3"]
    assert setup.sink.connections[0].peer[0] == "127.0.0.2"
    assert received == DEFAULT_BANNER + b"EHLO before\r\nEHLO after\r\n"
    assert bytes(setup.sink.connections[0].received) == b"EHLO before\r\nEHLO after\r\n"
    assert sample(metrics, "egressd_reloads_total") == 1
    # --json-logs outlives the reload (the file says [log] format = "text" by default).
    messages = [json.loads(line)["message"] for line in daemon.log().splitlines()]
    assert messages.index("configuration reloaded") < messages.index("draining")


async def test_broken_reload_keeps_the_old_configuration_and_logs_each_error(
    setup: Setup,
) -> None:
    config = setup.write(extra='[log]\nformat = "json"\n')
    async with daemon_process(config) as daemon:
        with trio.fail_after(20):
            broken = config.read_text().replace('"127.0.0.3"', '"127.0.0.300"')
            broken = broken.replace('shutdown_grace = "20s"', 'shutdown_grace = "soon"')
            config.write_text(broken + '\n[pool."p"."ghost"]\n')
            with pytest.raises(ConfigError) as invalid:
                load_config(config)
            await daemon.reload()
            peers = await setup.peers_of(2)
            metrics = await setup.metrics()
            # FILE is broken now, yet status still reaches the daemon through it.
            code, table, _ = await egressd_status(config)

    errors = invalid.value.errors
    assert len(errors) == 3
    messages = [json.loads(line)["message"] for line in daemon.log().splitlines()]
    for error in errors:
        assert f"reload refused: {error}" in messages
    assert "reload failed, still running on the previous configuration" in messages
    assert peers == ["127.0.0.2", "127.0.0.2"]
    assert sample(metrics, "egressd_reload_failures_total") == 1
    assert sample(metrics, "egressd_reloads_total") == 0
    assert code == 0
    assert "generation 1 (1 failed reloads)" in table


async def test_sources_file_change_is_noticed_within_its_ttl_without_sighup(
    setup: Setup,
) -> None:
    sources_file = setup.directory / "sources.toml"
    ttl_sources = SOURCES.replace('"127.0.0.2"', '"127.0.0.2"\nttl = "1s"')
    sources_file.write_text(ttl_sources + '\n[pool."p"."a"]\n')
    config = setup.write(pools="", sources="", extra='sources_files = ["sources.toml"]')
    async with daemon_process(config) as daemon:
        with trio.fail_after(20):
            first = await setup.peers_of(1)
            sources_file.write_text(ttl_sources + '\n[pool."p"."b"]\nweight = 5\n')
            with trio.fail_after(3):  # the ttl, plus the time to start a few connections
                await daemon.notify.wait_for("RELOADING=1")
                await daemon.notify.wait_for("READY=1")
            second = await setup.peers_of(2)
    assert first == ["127.0.0.2"]
    assert second == ["127.0.0.3", "127.0.0.3"]
    assert 'configuration reloaded trigger="file change"' in daemon.log()


async def test_reload_adds_and_removes_listeners_without_disturbing_the_others(
    setup: Setup,
) -> None:
    first_port, second_port = setup.socks_port, free_port()
    async with daemon_process(setup.write()) as daemon:
        with trio.fail_after(20):
            open_on_first = await socks_connect(first_port, "127.0.0.1", setup.sink.port)
            await open_on_first.receive_until(DEFAULT_BANNER)

            setup.write(listeners=(first_port, second_port))
            await daemon.reload()
            both = [(await setup.open(first_port))[0], (await setup.open(second_port))[0]]

            setup.write(listeners=(second_port,))
            await daemon.reload()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", first_port)
            after = (await setup.open(second_port))[0]

            await open_on_first.stream.send_all(b"still here\r\n")
            received = await open_on_first.finish()
    assert both == ["127.0.0.2", "127.0.0.2"]
    assert after == "127.0.0.2"
    assert received == DEFAULT_BANNER + b"still here\r\n"


# --------------------------------------------------------------------------- shutdown


async def test_sigterm_drains_in_flight_transfers_refuses_new_ones_and_exits_0(
    setup: Setup,
) -> None:
    async with daemon_process(setup.write(grace="20s")) as daemon:
        with trio.fail_after(20):
            transfer = await socks_connect(setup.socks_port, "127.0.0.1", setup.sink.port)
            await transfer.receive_until(DEFAULT_BANNER)
            await transfer.stream.send_all(b"DATA part 1\r\n")
            await transfer.receive_until(b"part 1\r\n")

            daemon.send(signal.SIGTERM)
            await daemon.notify.wait_for("STOPPING=1")
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", setup.socks_port)
            still_running = daemon.running()

            await transfer.stream.send_all(b"DATA part 2\r\n" * 1000)
            received = await transfer.finish()
            code = await daemon.wait_exit()

    assert still_running
    assert received == DEFAULT_BANNER + b"DATA part 1\r\n" + b"DATA part 2\r\n" * 1000
    assert code == 0
    assert "grace period over" not in daemon.log()


async def test_connection_lines_wait_at_most_the_flush_interval_and_precede_the_shutdown(
    setup: Setup,
) -> None:
    config = setup.write(extra='[log]\nflush_interval = "200ms"\n')
    async with daemon_process(config) as daemon:
        with trio.fail_after(20):
            await setup.open()
            while " connection " not in daemon.log():  # written with nothing else to push it
                await trio.sleep(0.02)
            await setup.open()
            await setup.wait_sessions_done()
            daemon.send(signal.SIGTERM)
            code = await daemon.wait_exit()

    lines = daemon.log().splitlines()
    connections = [n for n, line in enumerate(lines) if " connection " in line]
    shutdown = next(n for n, line in enumerate(lines) if "shutting down" in line)
    assert code == 0
    assert len(connections) == 2
    assert connections[-1] < shutdown


async def test_sigint_after_the_grace_period_closes_what_is_left_and_exits_0(
    setup: Setup,
) -> None:
    async with daemon_process(setup.write(grace="1s")) as daemon:
        with trio.fail_after(20):
            idle = await socks_connect(setup.socks_port, "127.0.0.1", setup.sink.port)
            await idle.receive_until(DEFAULT_BANNER)
            daemon.send(signal.SIGINT)
            code = await daemon.wait_exit()
            leftover = await idle.stream.receive_some(100)
    assert code == 0
    assert leftover == b""
    assert "grace period over, closing remaining sessions sessions=1" in daemon.log()


async def test_startup_failure_exits_1_and_says_why(setup: Setup) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", setup.socks_port))
        taken.listen()
        result = await trio.run_process(
            [sys.executable, "-m", "egressd", "run", "-c", str(setup.write())],
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    last_line = result.stderr.decode().splitlines()[-1]
    timestamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.match(timestamp + " error egressd.daemon: cannot start:", last_line)
    assert f"cannot listen on 127.0.0.1:{setup.socks_port} (socks5)" in last_line


# --------------------------------------------------------------------------- systemd


async def test_notifications_arrive_in_order_with_watchdog_pings(setup: Setup) -> None:
    async with daemon_process(
        setup.write(), watchdog_usec=200_000, watchdog_pid_self=True
    ) as daemon:
        with trio.fail_after(20):
            peer, _ = await setup.open()  # READY=1 came: the listener is bound
            await daemon.notify.wait_for("WATCHDOG=1")
            await daemon.notify.wait_for("WATCHDOG=1")
            await daemon.reload()
            daemon.send(signal.SIGTERM)
            await daemon.notify.wait_for("STOPPING=1")
            code = await daemon.wait_exit()
    assert peer == "127.0.0.2"
    assert daemon.notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert code == 0


# --------------------------------------------------------------------------- metrics


async def test_metrics_show_exactly_the_connections_made(setup: Setup) -> None:
    pools = '[pool."p"."a"]\nweight = 2\n\n[pool."p"."b"]\nweight = 1\n'
    payloads = [b"x" * 1000, b"y" * 20, b"z" * 300]
    async with daemon_process(setup.write(pools)):
        with trio.fail_after(20):
            for payload in payloads:
                connection = await socks_connect(setup.socks_port, "127.0.0.1", setup.sink.port)
                await connection.stream.send_all(payload)
                await connection.receive_until(DEFAULT_BANNER + payload)
                await connection.finish()
            with pytest.raises(SocksRefused) as refused:
                await socks_connect(setup.socks_port, "127.0.0.1", setup.sink.port + 1)
            metrics = await setup.wait_sessions_done()
    assert setup.sink.peers == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]
    assert refused.value.reply == 2  # connection not allowed by ruleset

    def connections(source: str, outcome: str) -> float | None:
        return sample(
            metrics,
            "egressd_connections_total",
            door="socks5",
            pool="p",
            source=source,
            outcome=outcome,
        )

    def sent(source: str, direction: str) -> float | None:
        return sample(
            metrics,
            "egressd_bytes_total",
            door="socks5",
            pool="p",
            source=source,
            direction=direction,
        )

    banner = len(DEFAULT_BANNER)
    assert connections("a", "ok") == 2
    assert connections("b", "ok") == 1
    assert sent("a", "upstream") == 1300
    assert sent("a", "downstream") == 2 * banner + 1300
    assert sent("b", "upstream") == 20
    assert sent("b", "downstream") == banner + 20
    denied = [
        line
        for line in metrics.splitlines()
        if line.startswith("egressd_connections_total{") and 'source=""' in line
    ]
    assert len(denied) == 1 and denied[0].endswith(" 1.0"), denied
    assert sample(metrics, "egressd_dial_duration_seconds_count", source="a", via="direct") == 2
    assert sample(metrics, "egressd_dial_duration_seconds_count", source="b", via="direct") == 1
    assert sample(metrics, "egressd_active_sessions", door="socks5") == 0
    assert sample(metrics, "egressd_source_active_connections", source="a") == 0


# --------------------------------------------------------------------------- health


UNPLUMBED = """
[source."bad"]
source_address = "203.0.113.7"
suspend_when_unplumbed = { duration = "4s", trigger = "Immediate" }

[source."good"]
source_address = "127.0.0.2"
"""

BAD_AND_GOOD = """
[pool."p"."bad"]

[pool."p"."good"]
"""


async def test_unplumbed_source_is_suspended_skipped_reported_and_comes_back(
    setup: Setup,
) -> None:
    config = setup.write(BAD_AND_GOOD, sources=UNPLUMBED)
    async with daemon_process(config) as daemon:
        with trio.fail_after(20):
            # Everything here must happen while "bad" is suspended: `egressd status` is a
            # new Python process, which alone takes 1 s or more on a loaded machine, so the
            # suspension lasts 4 s (2 s could end before the status was taken).
            peers = await setup.peers_of(4)
            suspended_metrics = await setup.metrics()
            code, table, _ = await egressd_status(config)

            while "source back in service source=bad" not in daemon.log():
                await trio.sleep(0.1)
            recovered_metrics = await setup.metrics()
            _, table_after, _ = await egressd_status(config)
            peers_after = await setup.peers_of(2)
            metrics_after = await setup.metrics()

    assert peers == ["127.0.0.2"] * 4
    assert code == 0
    rows = status_rows(table)
    assert rows["bad"][1] == "suspended"
    assert rows["bad"][2].endswith("s") and 0 < float(rows["bad"][2][:-1]) <= 4.0
    assert rows["bad"][4:6] == ["0", "1"]  # active connections, recent failures
    assert "unplumbed:" in table and "203.0.113.7" in table
    assert rows["good"][1:5] == ["healthy", "-", "0", "0"]
    suspended = "egressd_source_suspended"
    assert sample(suspended_metrics, suspended, source="bad", reason="unplumbed") == 1
    assert sample(suspended_metrics, suspended, source="good", reason="") == 0
    assert (
        sample(suspended_metrics, "egressd_source_failures_total", source="bad", kind="unplumbed")
        == 1
    )
    assert (
        sample(
            suspended_metrics, "egressd_source_suspensions_total", source="bad", kind="unplumbed"
        )
        == 1
    )

    assert sample(recovered_metrics, "egressd_source_suspended", source="bad", reason="") == 0
    assert status_rows(table_after)["bad"][1] == "healthy"
    # Back in rotation: picked again, fails again, and the connection still goes out via good.
    assert peers_after == ["127.0.0.2"] * 2
    assert (
        sample(metrics_after, "egressd_source_suspensions_total", source="bad", kind="unplumbed")
        == 2
    )


async def test_status_says_so_when_the_daemon_is_not_running(setup: Setup) -> None:
    code, out, err = await egressd_status(setup.write())
    assert code == 1
    assert out == ""
    assert f"cannot reach egressd at {setup.control}" in err
