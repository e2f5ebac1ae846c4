"""Warm-up through the real SMTP door on loopback: quota, overflow, fail-fast, a new day.

An in-process egressd relays smtplib's messages to an aiosmtpd sink; the sink sees which
source each one left from (127.0.0.3 is warming up, 127.0.0.4 is warm). Days pass through
the warm-up clock's offset (a hook for tests only), never by sleeping.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from smtp_harness import smtp_sink

from egressd.doors.smtp import SmtpDoor
from egressd.state import open_store

pytestmark = pytest.mark.integration

QUOTA = 3
DAY = 86400.0


def config(port: int, state: Path, warm_weight: int) -> str:
    text = f"""
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{port}"
[state]
directory = "{state}"
[warmup]
flush_interval = "0.1s"
[warmup.plan.test]
days = [{QUOTA}, {2 * QUOTA}]
[source."cold"]
source_address = "127.0.0.3"
remote_port = {port}
warmup = "test"
[source."warm"]
source_address = "127.0.0.4"
remote_port = {port}
[pool."main"."cold"]
weight = 1000
"""
    if warm_weight:
        text += f'[pool."main"."warm"]\nweight = {warm_weight}\n'
    return text


async def send(relay_port: int, count: int) -> list[tuple[int, str]]:
    """:func:`send_sync` in a thread, so the in-process daemon keeps running."""
    return await trio.to_thread.run_sync(send_sync, relay_port, count)


def send_sync(relay_port: int, count: int) -> list[tuple[int, str]]:
    """``count`` messages through the door, each in its own session: the final replies."""
    replies = []
    for index in range(count):
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            try:
                client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: t\r\n\r\nhi\r\n")
                replies.append((250, "accepted"))
            except smtplib.SMTPResponseException as exc:
                error = exc.smtp_error
                replies.append(
                    (exc.smtp_code, error.decode() if isinstance(error, bytes) else error)
                )
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = next(iter(exc.recipients.values()))
                replies.append((code, text.decode() if isinstance(text, bytes) else str(text)))
    return replies


async def test_the_cold_source_sends_its_quota_and_the_rest_leaves_from_the_warm_one(
    tmp_path: Path,
) -> None:
    with smtp_sink() as sink:
        text = config(sink.port, tmp_path / "state", warm_weight=1)
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            relay_port = port_of(daemon, "smtp")
            replies = await send(relay_port, QUOTA + 2)
            assert [code for code, _ in replies] == [250] * (QUOTA + 2)
            assert [m.peer for m in sink.messages] == ["127.0.0.3"] * QUOTA + ["127.0.0.4"] * 2

            assert daemon.warming is not None
            daemon.warming.clock.offset += DAY  # a new day: step 2, twice the quota
            await send(relay_port, 2 * QUOTA + 1)
            peers = [m.peer for m in sink.messages[QUOTA + 2 :]]
            assert peers == ["127.0.0.3"] * (2 * QUOTA) + ["127.0.0.4"]


async def test_a_pool_with_no_warm_source_left_fails_fast_naming_plan_step_and_reset(
    tmp_path: Path,
) -> None:
    with smtp_sink() as sink:
        text = config(sink.port, tmp_path / "state", warm_weight=0)
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            replies = await send(port_of(daemon, "smtp"), QUOTA + 1)
    assert len(sink.messages) == QUOTA
    code, reply = replies[-1]
    assert code == 451
    assert "4.4.5" in reply and "plan test, step 1 of 2" in reply
    assert "has used its 3 messages for today" in reply and "quota resets at" in reply


async def test_counts_reach_the_database_within_the_flush_interval(tmp_path: Path) -> None:
    with smtp_sink() as sink:
        text = config(sink.port, tmp_path / "state", warm_weight=1)
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            await send(port_of(daemon, "smtp"), 2)
            await trio.sleep(0.5)  # a few flush intervals of 0.1 s
            store = open_store(tmp_path / "state")
            counts = store.load("0000-00-00", 0.0).counts
            store.close()
    assert [(c.source, c.provider, c.sent) for c in counts] == [("cold", "other", 2)]
