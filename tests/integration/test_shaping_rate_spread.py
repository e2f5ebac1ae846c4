"""A message rate spreads an MTA's backlog over time at the real SMTP door, seen at the sink.

dnsmasq serves the MX of a fake provider on loopback, an aiosmtpd sink behind it stamps
each message's arrival, and the provider's ``max_message_rate = "5/s,max_burst=1"`` allows
2 messages at once (KumoMTA's ``max_burst=1`` is a burst of 2), then one per 200 ms. One
MTA session sends a backlog for 2.5 s and retries every ``451 4.7.0`` at once.

What the sink sees is asserted one-sided where it can be: a rate limiter must never let
more through than the GCRA allows, while being late under load is not its bug.

- The first 2 messages arrive at once (within one interval of each other).
- In no stretch of arrivals, from message ``i`` to message ``j``, are there more than
  ``burst + floor((t_j - t_i + tolerance) / T)`` messages: that is what the GCRA promises
  for any window (see tests/shaping/test_shaping_message_spread.py). ``tolerance`` only covers
  the latency between the shaper's decision and the sink's stamp, which varies by a few
  milliseconds from one message to the next. With a burst of 2, one gap may be shorter
  than T right after a message that was late (the burst absorbs its lateness), but no two
  gaps in a row are.
- The total is at least ``burst + floor(elapsed / T) - 1`` for the elapsed time between
  the first and last arrival: the limiter does not hold back what it should let through
  (the MTA retries at once, so at most a little lateness is lost).
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon, smtp_door_lines
from smtp_harness import dnsmasq, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

RATE = "5/s,max_burst=1"
BURST = 2  # KumoMTA's max_burst=1: redis-cell allows max_burst + 1 at once
INTERVAL = 0.2  # 1 s / 5
TOLERANCE = 0.05  # decision-to-stamp latency jitter; a quarter of the interval
SENDING = 2.5  # seconds the MTA keeps retrying its backlog

SHAPING = f"""
[provider."bigmail"]
match = [{{ MXSuffix = ".bigmail-mx.test" }}]
max_message_rate = "{RATE}"
"""


def send_backlog(port: int, seconds: float) -> tuple[int, list[str]]:
    """One MTA session that sends message after message for ``seconds``, retrying each
    ``451 4.7.0`` at once: how many were accepted, and the distinct refusals."""
    accepted = 0
    refusals: set[str] = set()
    deadline = time.monotonic() + seconds
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        while time.monotonic() < deadline:
            recipient = f"r{accepted}@bigmail.test"
            body = f"Subject: m{accepted}\r\n\r\nbody {accepted}\r\n".encode()
            try:
                client.sendmail("a@sender.test", [recipient], body)
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[recipient]
                refusals.add(f"{code} {text.decode().split('; next in')[0]}")
                continue
            accepted += 1
    return accepted, sorted(refusals)


async def backlog_through_the_door(tmp_path: Path) -> tuple[int, list[str], list[float]]:
    (tmp_path / "shaping.toml").write_text(SHAPING)
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"]}
    with smtp_sink() as sink, dnsmasq(mx=mx, hosts=hosts) as dns:
        text = f"""
{smtp_door_lines(dns.nameserver, shaping=True)}
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink.port}
[pool."main"."a"]
"""
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            accepted, refusals = await trio.to_thread.run_sync(send_backlog, port, SENDING)
        arrivals = [message.arrived for message in sink.messages]
    return accepted, refusals, arrivals


def most_allowed(first: float, last: float) -> int:
    """What the GCRA lets through between two arrivals, with the stamp's jitter."""
    return BURST + int((last - first + TOLERANCE) // INTERVAL)


async def test_a_message_rate_lets_the_burst_through_then_one_per_interval(
    tmp_path: Path,
) -> None:
    accepted, refusals, arrivals = await backlog_through_the_door(tmp_path)
    assert accepted == len(arrivals)
    assert refusals == [
        '451 4.7.0 no source of pool "main" may connect to provider "bigmail" now (a: '
        f'max_message_rate {RATE} used up for source "a" to site "mx1.bigmail-mx.test"'
    ]
    relative = [round(t - arrivals[0], 3) for t in arrivals]
    assert relative[1] < INTERVAL, relative  # the burst: both at once
    for first in range(len(arrivals)):
        for last in range(first + 1, len(arrivals)):
            count = last - first + 1
            assert count <= most_allowed(arrivals[first], arrivals[last]), (first, last, relative)
    elapsed = arrivals[-1] - arrivals[0]
    assert len(arrivals) >= BURST + int(elapsed // INTERVAL) - 1, relative
    assert elapsed >= SENDING - 0.5, relative  # messages kept coming until the MTA stopped
