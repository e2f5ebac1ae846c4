"""A message rate spreads an MTA's backlog over time at the real SMTP door.

dnsmasq serves the MX of a fake provider on loopback, an aiosmtpd sink stands behind it, and
the provider's ``max_message_rate = "5/s,max_burst=1"`` allows 2 messages at once (KumoMTA's
``max_burst=1`` is a burst of 2), then one per 200 ms. One MTA session sends a backlog for
2.5 s and retries every ``451 4.7.0`` at once.

The shaper decides while the MTA's MAIL and RCPT are answered. The MTA stamps each attempt
just before its MAIL and just after its RCPT's reply, so every decision lies inside its
attempt's window, on the same monotonic clock as the shaper's. The assertions use those
windows and need no allowance for jitter:

- The first 2 messages are accepted without a refusal between them: the burst.
- For any accepted messages ``i`` < ``j``, no more than ``burst + floor((replied_j -
  asked_i) / T)`` were accepted from ``i`` to ``j``: the GCRA's promise for any window,
  here for the widest window the two decisions can span (see
  tests/shaping/test_shaping_message_spread.py).
- The total is at least ``burst + floor((asked_last - replied_first) / T) - 1``, for the
  narrowest window the decisions can span: the limiter does not hold back what it should
  let through (the MTA retries at once, so at most a little lateness is lost). Where a busy
  machine stalled the MTA itself between two attempts for whole intervals, those are
  allowed for too: the limiter cannot hand a message to an MTA that is not asking.
- Every accepted message reached the sink.
"""

from __future__ import annotations

import smtplib
import time
from dataclasses import dataclass, field
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
SENDING = 2.5  # seconds the MTA keeps retrying its backlog

SHAPING = f"""
[provider."bigmail"]
match = [{{ MXSuffix = ".bigmail-mx.test" }}]
max_message_rate = "{RATE}"
"""


@dataclass
class Attempt:
    """One message's MAIL and RCPT: asked just before MAIL, replied just after RCPT's reply
    (monotonic seconds), and whether RCPT was accepted. The shaper decides in between."""

    asked: float
    replied: float
    accepted: bool


@dataclass
class Backlog:
    """What one MTA session saw: every attempt in order, and the refusals' texts."""

    attempts: list[Attempt] = field(default_factory=list)
    refusals: set[str] = field(default_factory=set)

    @property
    def accepted(self) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.accepted]

    def stalls(self) -> int:
        """The intervals the MTA itself let pass between one attempt's reply and its next
        ask (a busy machine can stall it): what the limiter may have emitted unasked."""
        pairs = zip(self.attempts, self.attempts[1:], strict=False)
        return sum(int((after.asked - before.replied) // INTERVAL) for before, after in pairs)


def send_backlog(port: int, seconds: float) -> Backlog:
    """One MTA session that sends message after message for ``seconds``, retrying each
    ``451 4.7.0`` at RCPT at once."""
    backlog = Backlog()
    deadline = time.monotonic() + seconds
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo()
        while time.monotonic() < deadline:
            count = len(backlog.accepted)
            asked = time.monotonic()
            code, text = client.mail("a@sender.test")
            assert code == 250, (code, text)
            code, text = client.rcpt(f"r{count}@bigmail.test")
            attempt = Attempt(asked, time.monotonic(), code == 250)
            backlog.attempts.append(attempt)
            if not attempt.accepted:
                backlog.refusals.add(f"{code} {text.decode().split('; next in')[0]}")
                client.rset()
                continue
            code, text = client.data(f"Subject: m{count}\r\n\r\nbody {count}\r\n".encode())
            assert code == 250, (code, text)
    return backlog


async def backlog_through_the_door(tmp_path: Path) -> tuple[Backlog, int]:
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
            backlog = await trio.to_thread.run_sync(send_backlog, port, SENDING)
        arrived = len(sink.messages)
    return backlog, arrived


async def test_a_message_rate_lets_the_burst_through_then_one_per_interval(
    tmp_path: Path,
) -> None:
    backlog, arrived = await backlog_through_the_door(tmp_path)
    accepted = backlog.accepted
    assert arrived == len(accepted)
    assert sorted(backlog.refusals) == [
        '451 4.7.0 no source of pool "main" may connect to provider "bigmail" now (a: '
        f'max_message_rate {RATE} used up for source "a" to site "mx1.bigmail-mx.test"'
    ]
    assert [a.accepted for a in backlog.attempts[:BURST]] == [True] * BURST  # the burst
    start = accepted[0].asked
    relative = [(round(a.asked - start, 3), round(a.replied - start, 3)) for a in accepted]
    for first in range(len(accepted)):
        for last in range(first + 1, len(accepted)):
            widest = accepted[last].replied - accepted[first].asked
            allowed = BURST + int(widest // INTERVAL)
            assert last - first + 1 <= allowed, (first, last, relative)
    narrowest = accepted[-1].asked - accepted[0].replied
    stalls = backlog.stalls()
    assert len(accepted) >= BURST + int(narrowest // INTERVAL) - 1 - stalls, (stalls, relative)
    assert narrowest >= SENDING - 0.5, relative  # messages kept coming until the MTA stopped
