"""Metrics counted by a running daemon: KumoProxy's proxy_* for the SOCKS5 door, reloads,
and failures blamed on a source, as a scrape shows them."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from daemon_helpers import running_daemon
from harness import Sink, free_port
from service_harness import SocksRefused, sample, socks_connect

from egressd.doors.socks5 import Socks5Door


def config_text(sink: Sink, socks_port: int, extra: str = "") -> str:
    return f"""
[access]
deny_destinations = []
destination_ports = [{sink.port}]
[[socks5.listener]]
address = "127.0.0.1:{socks_port}"
pool = "p"
[source."a"]
source_address = "127.0.0.2"
[source."gone"]
source_address = "203.0.113.7"
[pool."p"."a"]
[pool."q"."gone"]
{extra}"""


async def test_socks5_sessions_count_kumoproxy_metrics_by_listener(
    tmp_path: Path, sink: Sink
) -> None:
    socks_port = free_port()
    listener = f"127.0.0.1:{socks_port}"
    text = config_text(sink, socks_port)
    async with running_daemon(text, tmp_path, {"socks5": Socks5Door()}) as daemon:
        with trio.fail_after(10):
            open_one = await socks_connect(socks_port, "127.0.0.1", sink.port)
            await open_one.receive_until(b"\r\n")
            during = daemon.metrics.exposition().decode()
            await open_one.stream.send_all(b"hello")
            await open_one.receive_until(b"hello")
            await open_one.finish()
            with pytest.raises(SocksRefused):
                await socks_connect(socks_port, "127.0.0.1", 9)  # port not allowed
            while sample(daemon.metrics.exposition().decode(), "proxy_active_connections",
                         listener=listener) != 0:  # fmt: skip
                await trio.sleep(0.01)
            after = daemon.metrics.exposition().decode()
    assert sample(during, "proxy_active_connections", listener=listener) == 1
    assert sample(during, "proxy_connections_accepted_total", listener=listener) == 1
    assert sample(after, "proxy_connections_accepted_total", listener=listener) == 2
    assert sample(after, "proxy_connections_completed_total", listener=listener) == 1
    assert sample(after, "proxy_connections_failed_total", listener=listener) == 1
    assert sample(after, "proxy_bytes_received_total", listener=listener) == 5
    banner = len(sink.banner)
    assert sample(after, "proxy_bytes_sent_total", listener=listener) == banner + 5


async def test_source_failures_count_and_reloads_set_the_last_reload_gauges(
    tmp_path: Path, sink: Sink
) -> None:
    socks_port = free_port()
    text = config_text(sink, socks_port)
    async with running_daemon(text, tmp_path, {"socks5": Socks5Door()}) as daemon:
        with trio.fail_after(10):
            first = daemon.metrics.exposition().decode()
            (tmp_path / "egressd.toml").write_text(text + "[limits]\nmax_connections = -1\n")
            assert not await daemon.reload("test")
            refused = daemon.metrics.exposition().decode()
            (tmp_path / "egressd.toml").write_text(text.replace('pool = "p"', 'pool = "q"'))
            assert await daemon.reload("test")
            with pytest.raises(SocksRefused):
                await socks_connect(socks_port, "127.0.0.1", sink.port)  # through "gone"
            reloaded = daemon.metrics.exposition().decode()
    stamp = "egressd_config_last_reload_success_timestamp_seconds"
    assert sample(first, "egressd_config_last_reload_successful") == 1
    assert sample(refused, "egressd_config_last_reload_successful") == 0
    assert sample(refused, stamp) == sample(first, stamp)
    assert sample(reloaded, "egressd_config_last_reload_successful") == 1
    assert (sample(reloaded, stamp) or 0) >= (sample(first, stamp) or 0) > 0
    for name in ("egressd_source_failures_total", "egress_source_connection_failures_total"):
        assert sample(reloaded, name, source="gone", kind="unplumbed") == 1
    assert sample(reloaded, "egress_source_health_suspensions_total",
                  source="gone", reason="unplumbed") == 1  # fmt: skip
