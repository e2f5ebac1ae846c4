"""A real Postfix relaying through egressd: the mail leaves from the pool's source, and the
remote's own 4xx and 5xx replies reach Postfix's log (deferred or bounced), nothing lost.

Postfix runs from a private configuration directory (``relayhost = [127.0.0.1]:PORT``,
egressd's listener), submitted to with ``sendmail -C DIR``; egressd resolves the recipient
domains at dnsmasq and delivers to aiosmtpd sinks on 127.0.0.1 and 127.0.0.2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import running_daemon
from harness import free_port
from smtp_harness import Dnsmasq, Postfix, dnsmasq, postfix, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

MESSAGE = b"From: sender@postfix.test\nSubject: through egressd\n\nHello from Postfix.\n"


@pytest.fixture(scope="module")
def dns() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[("good.test", "mx.good.test", 10), ("other.test", "mx.other.test", 10)],
        hosts={"mx.good.test": ["127.0.0.1"], "mx.other.test": ["127.0.0.2"]},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def relay_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture(scope="module")
def postfix_instance(relay_port: int) -> Iterator[Postfix]:
    """One Postfix for the module (it takes seconds to start); each test starts egressd."""
    with postfix(relay_port) as instance:
        yield instance


@pytest.fixture
def mta(postfix_instance: Postfix) -> Iterator[Postfix]:
    """The module's Postfix, with an empty queue after the test."""
    yield postfix_instance
    postfix_instance.clear_queue()


@pytest.fixture
def sink_port() -> int:
    while True:
        port = free_port("127.0.0.1")
        try:
            import socket

            with socket.socket() as probe:
                probe.bind(("127.0.0.2", port))
        except OSError:
            continue
        return port


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
ehlo_domain = "out-a.test"
remote_port = {sink_port}
[pool."main"."a"]
"""


def delivery_line(log: list[str], recipient: str, status: str) -> str:
    pattern = re.compile(rf"to=<{re.escape(recipient)}>.*status={status}")
    return next(line for line in log if pattern.search(line))


async def wait_for_log(instance: Postfix, pattern: str) -> list[str]:
    return await trio.to_thread.run_sync(instance.wait_for_log, pattern)


async def test_postfix_mail_leaves_from_the_pool_source_with_its_ehlo_name(
    tmp_path: Path, dns: Dnsmasq, mta: Postfix, relay_port: int, sink_port: int
) -> None:
    with smtp_sink("127.0.0.1", sink_port) as sink:
        text = egressd_config(relay_port, sink_port, dns)
        async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}):
            await trio.to_thread.run_sync(
                mta.sendmail, "sender@postfix.test", ["rcpt@good.test"], MESSAGE
            )
            log = await wait_for_log(mta, r"to=<rcpt@good.test>.*status=sent")
            [message] = await sink.wait(1)
    assert message.peer == "127.0.0.3"
    assert message.ehlo == "out-a.test"
    assert message.mail_from == "sender@postfix.test"
    assert b"Hello from Postfix." in message.body
    line = delivery_line(log, "rcpt@good.test", "sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{relay_port}" in line
    assert "(250 2.0.0 sink queued message 1)" in line  # the sink's own reply


async def test_remote_4xx_and_5xx_reach_postfix_as_deferred_and_bounced(
    tmp_path: Path, dns: Dnsmasq, mta: Postfix, relay_port: int, sink_port: int
) -> None:
    replies = {
        "later@good.test": "451 4.7.1 sink says come back later",
        "nobody@good.test": "550 5.1.1 sink says no such user",
    }
    with smtp_sink("127.0.0.1", sink_port, rcpt_replies=replies) as sink:
        text = egressd_config(relay_port, sink_port, dns)
        async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}):
            for recipient in replies:
                await trio.to_thread.run_sync(
                    mta.sendmail, "", [recipient], MESSAGE
                )  # null sender: no bounce message to deliver afterwards
            await wait_for_log(mta, r"to=<later@good.test>.*status=deferred")
            log = await wait_for_log(mta, r"to=<nobody@good.test>.*status=bounced")
            queued = await trio.to_thread.run_sync(mta.queue_ids)
    assert sink.messages == []
    deferred = delivery_line(log, "later@good.test", "deferred")
    assert "said: 451 4.7.1 sink says come back later (in reply to RCPT TO command)" in deferred
    bounced = delivery_line(log, "nobody@good.test", "bounced")
    assert "said: 550 5.1.1 sink says no such user (in reply to RCPT TO command)" in bounced
    assert len(queued) == 1  # the deferred message is still in Postfix's queue


async def test_a_second_destination_is_deferred_by_452_and_delivered_on_retry(
    tmp_path: Path, dns: Dnsmasq, mta: Postfix, relay_port: int, sink_port: int
) -> None:
    with (
        smtp_sink("127.0.0.1", sink_port) as good,
        smtp_sink("127.0.0.2", sink_port) as other,
    ):
        text = egressd_config(relay_port, sink_port, dns)
        async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}):
            await trio.to_thread.run_sync(
                mta.sendmail, "", ["one@good.test", "two@other.test"], MESSAGE
            )
            log = await wait_for_log(mta, r"to=<two@other.test>.*status=deferred")
            await trio.to_thread.run_sync(mta.flush)
            log = await wait_for_log(mta, r"to=<two@other.test>.*status=sent")
            [first] = await good.wait(1)
            [second] = await other.wait(1)
    assert first.rcpt_tos == ("one@good.test",)
    assert second.rcpt_tos == ("two@other.test",)
    assert second.peer == "127.0.0.3"
    deferred = delivery_line(log, "two@other.test", "deferred")
    assert "452 4.5.3 other.test has another next hop" in deferred
