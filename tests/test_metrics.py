"""Metrics: values in a private registry, scraped over loopback from the trio endpoint."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from egressd import metrics as metrics_module
from egressd.config import Endpoint, MetricsSettings, SuspendPolicy
from egressd.config.model import LOOPBACK
from egressd.health import SourceHealth
from egressd.metrics import Metrics, PidOnlyProcessCollector, reply_class, serve_metrics
from egressd.observe import KnownNames, TransactionCounters

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


def samples(exposition: str, name: str) -> dict[str, float]:
    """``{labels text: value}`` of every sample named ``name``."""
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"] == name:
            found[match["labels"] or ""] = float(match["value"])
    return found


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` raw, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_all(stream)


async def read_all(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def split_response(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


@pytest.fixture
async def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def port(metrics: Metrics, nursery: trio.Nursery) -> AsyncIterator[int]:
    listeners = await nursery.start(serve_metrics, Endpoint("127.0.0.1", 0), metrics.registry)
    yield listeners[0].socket.getsockname()[1]


async def scrape(port: int) -> str:
    status, headers, body = split_response(await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n"))
    assert status == "HTTP/1.0 200 OK"
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    return body.decode()


async def test_scrape_shows_exactly_the_counted_values(metrics: Metrics, port: int) -> None:
    metrics.count_connection("smtp", "pool-1", "ip-1", "ok")
    metrics.count_connection("smtp", "pool-1", "ip-1", "ok")
    metrics.count_connection("socks5", "pool-2", "", "no_source")
    metrics.count_bytes("smtp", "pool-1", "ip-1", "upstream", 1234)
    metrics.active_sessions.labels("smtp").inc()
    metrics.observe_dial("ip-1", "haproxy", 0.02)
    metrics.count_suspension("ip-1", "unplumbed")
    metrics.reloads.inc()
    metrics.count_transaction("pool-1", 250, "ip-1")
    metrics.count_transaction("pool-1", 451, "ip-1")
    metrics.count_transaction("pool-1", 452, "ip-2")

    with trio.fail_after(5):
        text = await scrape(port)

    assert samples(text, "egressd_connections_total") == {
        'door="smtp",outcome="ok",pool="pool-1",source="ip-1"': 2.0,
        'door="socks5",outcome="no_source",pool="pool-2",source=""': 1.0,
    }
    assert samples(text, "egressd_bytes_total") == {
        'direction="upstream",door="smtp",pool="pool-1",source="ip-1"': 1234.0
    }
    assert samples(text, "egressd_active_sessions") == {'door="smtp"': 1.0}
    assert samples(text, "egressd_dial_duration_seconds_count") == {
        'source="ip-1",via="haproxy"': 1.0
    }
    assert (
        samples(text, "egressd_dial_duration_seconds_bucket")[
            'le="0.025",source="ip-1",via="haproxy"'
        ]
        == 1.0
    )
    assert samples(text, "egressd_source_suspensions_total") == {
        'kind="unplumbed",source="ip-1"': 1.0
    }
    assert samples(text, "egressd_reloads_total") == {"": 1.0}
    assert samples(text, "egressd_reload_failures_total") == {"": 0.0}
    assert samples(text, "egressd_smtp_transactions_total") == {
        'pool="pool-1",reply_class="2xx",source="ip-1"': 1.0,
        'pool="pool-1",reply_class="4xx",source="ip-1"': 1.0,
        'pool="pool-1",reply_class="4xx",source="ip-2"': 1.0,
    }
    assert not [line for line in text.splitlines() if "_created" in line]


async def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.reloads.inc()
    assert samples(second.exposition().decode(), "egressd_reloads_total") == {"": 0.0}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),
        (b"GET /metricsX HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.0 404 Not Found"),
        (b"POST /metrics HTTP/1.0\r\n\r\n", "HTTP/1.0 405 Method Not Allowed"),
        (b"nonsense\r\n\r\n", "HTTP/1.0 400 Bad Request"),
        (b"GET /metrics?x=1 HTTP/1.1\nHost: x\n\n", "HTTP/1.0 200 OK"),
    ],
)
async def test_status_codes(port: int, request_bytes: bytes, status: str) -> None:
    with trio.fail_after(5):
        response = await exchange(port, request_bytes)
    assert split_response(response)[0] == status


async def test_head_request_has_no_body(port: int) -> None:
    with trio.fail_after(5):
        status, headers, body = split_response(
            await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        )
    assert status == "HTTP/1.0 200 OK"
    assert int(headers["content-length"]) > 0
    assert body == b""


async def test_request_trickled_byte_by_byte(port: int) -> None:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n":
                await stream.send_all(bytes([byte]))
            response = await read_all(stream)
    assert split_response(response)[0] == "HTTP/1.0 200 OK"


async def test_oversized_head_is_refused_and_server_keeps_serving(port: int) -> None:
    oversized = b"GET /metrics HTTP/1.0\r\nX-Padding: " + b"a" * 20000 + b"\r\n\r\n"
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(oversized)
                response = await read_all(stream)
            except trio.BrokenResourceError:
                response = b""  # the server closed with our bytes unread: a reset
        assert response == b"" or response.startswith(b"HTTP/1.0 431 ")
        await scrape(port)


async def test_slow_client_is_dropped_without_blocking_others(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT", 0.3)
    with trio.fail_after(5):
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        async with slow:
            await slow.send_all(b"GET /metr")
            await scrape(port)  # served while the slow one is pending
            assert await read_all(slow) == b""  # closed by the server, no answer


async def test_silent_client_that_hangs_up(port: int) -> None:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
        await scrape(port)


async def test_before_scrape_refreshes_source_gauges(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    health = SourceHealth(["ip-1", "ip-2"])
    listeners = await nursery.start(
        lambda task_status: serve_metrics(
            Endpoint("127.0.0.1", 0),
            metrics.registry,
            before_scrape=lambda: metrics.refresh_sources(health.snapshot()),
            task_status=task_status,
        )
    )
    port = listeners[0].socket.getsockname()[1]
    health.record_failure("ip-1", "unplumbed", "EADDRNOTAVAIL", SuspendPolicy(duration=60.0))
    health.connection_opened("ip-2")
    with trio.fail_after(5):
        text = await scrape(port)
    assert samples(text, "egressd_source_suspended") == {
        'reason="unplumbed",source="ip-1"': 1.0,
        'reason="",source="ip-2"': 0.0,
    }
    assert samples(text, "egress_source_health_suspended") == {
        'reason="unplumbed",source="ip-1"': 1.0
    }
    assert samples(text, "egressd_source_active_connections") == {
        'source="ip-1"': 0.0,
        'source="ip-2"': 1.0,
    }
    assert samples(text, "egressd_source_recent_failures")['source="ip-1"'] == 1.0

    health.update_sources(["ip-2"])
    with trio.fail_after(5):
        text = await scrape(port)
    assert samples(text, "egressd_source_suspended") == {'reason="",source="ip-2"': 0.0}
    assert samples(text, "egress_source_health_suspended") == {}


def test_reply_class() -> None:
    assert [reply_class(c) for c in (250, 354, 421, 554)] == ["2xx", "other", "4xx", "5xx"]


def test_build_info() -> None:
    text = Metrics().exposition().decode()
    [(labels, value)] = samples(text, "egressd_build_info").items()
    assert labels.startswith('version="') and value == 1.0


def test_failures_and_suspensions_are_counters_under_both_names() -> None:
    metrics = Metrics()
    metrics.count_failure("ip-1", "connect")
    metrics.count_failure("ip-1", "connect")
    metrics.count_failure("ip-1", "unplumbed")
    metrics.count_suspension("ip-1", "unplumbed")
    metrics.count_suspension("ip-2", None)  # egressd suspend
    health = SourceHealth(["ip-1", "ip-2"])
    health.suspend("ip-2", 60.0, "listed")
    metrics.refresh_sources(health.snapshot())
    text = metrics.exposition().decode()
    failures = {'kind="connect",source="ip-1"': 2.0, 'kind="unplumbed",source="ip-1"': 1.0}
    assert samples(text, "egressd_source_failures_total") == failures
    assert samples(text, "egress_source_connection_failures_total") == failures
    suspensions = {'kind="unplumbed",source="ip-1"': 1.0, 'kind="operator",source="ip-2"': 1.0}
    assert samples(text, "egressd_source_suspensions_total") == suspensions
    assert samples(text, "egress_source_health_suspensions_total") == {
        'reason="unplumbed",source="ip-1"': 1.0,
        'reason="operator",source="ip-2"': 1.0,
    }
    assert samples(text, "egress_source_health_suspended") == {
        'reason="operator",source="ip-2"': 1.0
    }
    health.resume("ip-2")
    metrics.refresh_sources(health.snapshot())  # the gauge drops, the counters stay
    text = metrics.exposition().decode()
    assert samples(text, "egress_source_health_suspended") == {}
    assert samples(text, "egressd_source_failures_total") == failures


def test_proxy_metrics_are_kumoproxy_families_from_plain_counts() -> None:
    """The SOCKS5 door adds to plain integers; a scrape shows KumoProxy's counter and gauge
    families with their types, and completed/failed only once counted for a listener."""
    metrics = Metrics()
    a, b = metrics.proxy.counts("127.0.0.1:1080"), metrics.proxy.counts("[::1]:1080")
    a.accepted, a.active, a.completed, a.bytes_received, a.bytes_sent = 3, 1, 2, 10, 20
    b.accepted, b.failed = 1, 1
    metrics.proxy.tls_failures.labels("[::1]:1080").inc()
    text = metrics.exposition().decode()
    v4, v6 = 'listener="127.0.0.1:1080"', 'listener="[::1]:1080"'
    assert samples(text, "proxy_connections_accepted_total") == {v4: 3.0, v6: 1.0}
    assert samples(text, "proxy_connections_completed_total") == {v4: 2.0}
    assert samples(text, "proxy_connections_failed_total") == {v6: 1.0}
    assert samples(text, "proxy_bytes_received_total") == {v4: 10.0, v6: 0.0}
    assert samples(text, "proxy_bytes_sent_total") == {v4: 20.0, v6: 0.0}
    assert samples(text, "proxy_active_connections") == {v4: 1.0, v6: 0.0}
    assert samples(text, "proxy_tls_handshake_failures_total") == {v6: 1.0}
    assert "# TYPE proxy_connections_accepted_total counter" in text
    assert "# TYPE proxy_active_connections gauge" in text
    assert "proxy_connections_accepted_created" not in text


def test_process_metrics_count_this_process_open_files() -> None:
    text = Metrics().exposition().decode()
    open_fds = samples(text, "process_open_fds")[""]
    assert open_fds == pytest.approx(len(os.listdir("/proc/self/fd")), abs=3)
    assert samples(text, "process_max_fds")[""] > 0
    assert samples(text, "process_start_time_seconds")[""] > 0


def test_last_reload_success_and_its_time() -> None:
    metrics = Metrics()
    metrics.config_loaded(True, 1000.0)
    metrics.config_loaded(False, 2000.0)
    text = metrics.exposition().decode()
    assert samples(text, "egressd_config_last_reload_successful") == {"": 0.0}
    assert samples(text, "egressd_config_last_reload_success_timestamp_seconds") == {"": 1000.0}
    metrics.config_loaded(True, 3000.0)
    text = metrics.exposition().decode()
    assert samples(text, "egressd_config_last_reload_successful") == {"": 1.0}
    assert samples(text, "egressd_config_last_reload_success_timestamp_seconds") == {"": 3000.0}


async def test_only_metrics_clients_are_served_and_at_most_max_connections(
    metrics: Metrics, nursery: trio.Nursery
) -> None:
    settings = MetricsSettings(clients=LOOPBACK[:1], max_connections=1)
    listeners = await nursery.start(
        functools.partial(
            serve_metrics, Endpoint("127.0.0.1", 0), metrics.registry, settings=lambda: settings
        )
    )
    port = listeners[0].socket.getsockname()[1]
    held = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.testing.wait_all_tasks_blocked()
    busy = await trio.open_tcp_stream("127.0.0.1", port)
    async with busy:  # (no request sent: closing with one unread would be a reset)
        assert (await read_all(busy)).startswith(b"HTTP/1.0 503 ")
    await held.aclose()
    await trio.testing.wait_all_tasks_blocked()
    await scrape(port)
    settings = MetricsSettings(clients=(ipaddress.ip_network("10.0.0.0/8"),))
    outsider = await trio.open_tcp_stream("127.0.0.1", port)
    async with outsider:
        assert await read_all(outsider) == b""  # closed at once, nothing said


def test_process_metrics_survive_procsubset_pid(tmp_path: Path) -> None:
    """Under systemd's ProcSubset=pid only /proc/PID exists: no /proc/stat for boot time."""
    (tmp_path / "self").symlink_to("/proc/self")
    registry = CollectorRegistry()
    PidOnlyProcessCollector(proc=str(tmp_path), registry=registry)
    text = generate_latest(registry).decode()
    assert samples(text, "process_open_fds")[""] > 0
    started = samples(text, "process_start_time_seconds")[""]
    assert time.time() - 3600 < started <= time.time()
    stock = CollectorRegistry()
    ProcessCollector(proc=str(tmp_path), registry=stock)
    assert "process_open_fds" not in generate_latest(stock).decode()  # what it fixes


def test_transactions_are_labelled_by_the_names_and_providers_known_now() -> None:
    """The door's transaction hook keeps the labelled children; a reload that adds a pool
    and a source, and shaping files that add a provider, show in the next count."""
    metrics = Metrics()
    names = KnownNames()
    runtime: Any = SimpleNamespace(shaper=None)
    counters = TransactionCounters(metrics, names, lambda: runtime)
    counters.count("p", 250, "s", "gmail")
    counters.count("p", 250, "s", "gmail")
    names.pools.add("p")
    names.sources.add("s")
    counters.forget()  # what a reload does
    counters.count("p", 451, "s", "gmail")
    providers = SimpleNamespace(sections=SimpleNamespace(providers={"gmail": None}))
    runtime.shaper = SimpleNamespace(policy=providers)
    counters.count("p", 451, "s", "gmail")
    text = generate_latest(metrics.registry).decode()
    assert samples(text, "egressd_smtp_transactions_total") == {
        'pool="",reply_class="2xx",source=""': 2.0,
        'pool="p",reply_class="4xx",source="s"': 2.0,
    }
    assert samples(text, "egressd_provider_messages_total") == {
        'provider="other",reply_class="2xx",source=""': 2.0,
        'provider="other",reply_class="4xx",source="s"': 1.0,
        'provider="gmail",reply_class="4xx",source="s"': 1.0,
    }
