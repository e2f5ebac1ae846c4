"""The README's Postfix recipe, observed with a real Postfix relaying through egressd.

``smtp_destination_recipient_limit = 1`` was once recommended so that a message for several
domains would not wait for a queue run per domain. Observed instead: every recipient
becomes its own delivery request, delivered in parallel, so 10 recipients at one domain
cost 10 Postfix sessions into egressd and 10 connections to the remote server. With
Postfix's default limit the same message is one session, one connection, one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import running_daemon
from harness import free_port
from service_harness import sample
from smtp_harness import Dnsmasq, SmtpSink, dnsmasq, postfix, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

RECIPIENTS = [f"r{i}@good.test" for i in range(10)]


@pytest.fixture(scope="module")
def dns() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[("good.test", "mx.good.test", 10)], hosts={"mx.good.test": ["127.0.0.1"]}
    ) as server:
        yield server


def egressd_config(relay_port: int, sink_port: int, dns: Dnsmasq) -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[dns]
nameservers = ["{dns.nameserver}"]
[[smtp.listener]]
address = "127.0.0.1:{relay_port}"
pool = "main"
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink_port}
[pool."main"."a"]
"""


async def deliver_ten(tmp_path: Path, dns: Dnsmasq, main_cf: str) -> tuple[SmtpSink, float]:
    """One message for 10 recipients at one domain through Postfix and egressd: the remote
    sink, and how many SMTP sessions egressd served."""
    relay_port = free_port()
    with smtp_sink("127.0.0.1") as sink, postfix(relay_port, main_cf) as mta:
        text = egressd_config(relay_port, sink.port, dns)
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            mta.sendmail("sender@postfix.test", RECIPIENTS, b"Subject: ten\n\nHello.\n")
            with trio.fail_after(30):
                while sum(len(m.rcpt_tos) for m in sink.messages) < len(RECIPIENTS):
                    await trio.sleep(0.1)
                await trio.to_thread.run_sync(mta.wait_for_log, r"to=<r9@good.test>.*status=sent")
                # A session is counted when it closes, a moment after Postfix's QUIT.
                while open_sessions(exposition := daemon.metrics.exposition().decode()):
                    await trio.sleep(0.05)
    sessions = sample(
        exposition,
        "egressd_connections_total",
        door="smtp",
        outcome="delivered",
        pool="main",
        source="a",
    )
    return sink, sessions or 0.0


async def test_recipient_limit_1_costs_a_session_and_a_connection_per_recipient(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    sink, sessions = await deliver_ten(tmp_path, dns, "smtp_destination_recipient_limit = 1")
    assert sessions == 10
    assert len(sink.connections) == 10
    assert [len(message.rcpt_tos) for message in sink.messages] == [1] * 10


async def test_the_default_limit_sends_one_transaction_on_one_connection(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    sink, sessions = await deliver_ten(tmp_path, dns, "")
    assert sessions == 1
    assert len(sink.connections) == 1
    assert [sorted(message.rcpt_tos) for message in sink.messages] == [sorted(RECIPIENTS)]


def open_sessions(exposition: str) -> float:
    """SMTP sessions egressd still has open, from its metrics."""
    return sample(exposition, "egressd_active_sessions", door="smtp") or 0.0
