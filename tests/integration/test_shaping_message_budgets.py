"""Per-message shaping budgets at the real SMTP door, one MTA session each.

dnsmasq serves the MX of a fake provider on loopback; an aiosmtpd sink behind it counts
the remote connections (one EHLO each) and the messages. ``max_deliveries_per_connection
= 2`` makes 5 messages of one MTA session use 3 remote connections; ``max_message_rate =
"2/h"`` lets 2 of 4 messages through and the other 2 get ``451 4.7.0`` naming the budget,
with nothing of them reaching the sink and no connection opened for them; with two
sources at ``"1/h"`` each, the second message of a session leaves the kept connection of
the first source for a connection of the other.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon, smtp_door_lines
from smtp_harness import SmtpSink, dnsmasq, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

PROVIDER = """
[provider."bigmail"]
match = [{{ MXSuffix = ".bigmail-mx.test" }}]
{key} = {value}
"""


def send_all(port: int, recipients: list[str], pauses: dict[int, float] | None = None) -> list[str]:
    """Each recipient's message in turn on one MTA session: "sent" or the refusal
    (``pauses``: seconds to wait before the message of that number)."""
    outcomes: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        for number, recipient in enumerate(recipients):
            time.sleep((pauses or {}).get(number, 0.0))
            body = f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode()
            try:
                client.sendmail("a@sender.test", [recipient], body)
                outcomes.append("sent")
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[recipient]
                outcomes.append(f"{code} {text.decode()}")
    return outcomes


async def through_the_door(
    tmp_path: Path,
    key: str,
    value: str,
    count: int,
    sources: int = 1,
    pauses: dict[int, float] | None = None,
) -> tuple[list[str], SmtpSink]:
    """``count`` messages on one MTA session through a pool of ``sources`` sources
    (a 127.0.0.3, b 127.0.0.4...)."""
    (tmp_path / "shaping.toml").write_text(PROVIDER.format(key=key, value=value))
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"]}
    with smtp_sink() as sink, dnsmasq(mx=mx, hosts=hosts) as dns:
        text = f"""
{smtp_door_lines(dns.nameserver, shaping=True)}
"""
        for number in range(sources):
            name = "abcd"[number]
            text += f"""
[source."{name}"]
source_address = "127.0.0.{3 + number}"
remote_port = {sink.port}
[pool."main"."{name}"]
"""
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            recipients = [f"r{n}@bigmail.test" for n in range(count)]
            outcomes = await trio.to_thread.run_sync(send_all, port, recipients, pauses)
    return outcomes, sink


async def test_max_deliveries_per_connection_spreads_one_session_over_connections(
    tmp_path: Path,
) -> None:
    outcomes, sink = await through_the_door(tmp_path, "max_deliveries_per_connection", "2", 5)
    assert outcomes == ["sent"] * 5
    assert [m.rcpt_tos for m in sink.messages] == [(f"r{n}@bigmail.test",) for n in range(5)]
    assert len(sink.connections) == 3, sink.connections  # 2 + 2 + 1 messages
    assert all(c.startswith("127.0.0.3 ") for c in sink.connections), sink.connections


async def test_max_message_rate_lets_two_of_four_through_and_defers_the_rest(
    tmp_path: Path,
) -> None:
    outcomes, sink = await through_the_door(tmp_path, "max_message_rate", '"2/h"', 4)
    assert outcomes[:2] == ["sent", "sent"]
    for refusal in outcomes[2:]:
        assert refusal.startswith(
            '451 4.7.0 no source of pool "main" may connect to provider "bigmail" now (a: '
            'max_message_rate 2/h used up for source "a"'
        ), refusal
    assert [m.rcpt_tos for m in sink.messages] == [("r0@bigmail.test",), ("r1@bigmail.test",)]
    assert len(sink.connections) == 1  # no connection opened for the messages refused


async def test_a_kept_connection_out_of_message_rate_hands_the_next_message_to_the_other_source(
    tmp_path: Path,
) -> None:
    outcomes, sink = await through_the_door(tmp_path, "max_message_rate", '"1/h"', 3, sources=2)
    assert outcomes[:2] == ["sent", "sent"]
    assert outcomes[2].startswith(
        '451 4.7.0 no source of pool "main" may connect to provider "bigmail" now '
        "(max_message_rate 1/h used up for all 2 sources)"
    ), outcomes[2]
    assert [m.peer for m in sink.messages] == ["127.0.0.3", "127.0.0.4"]
    assert [c.split()[0] for c in sink.connections] == ["127.0.0.3", "127.0.0.4"]


async def test_a_kept_connection_out_of_message_rate_is_kept_when_no_source_has_budget(
    tmp_path: Path,
) -> None:
    """At a steady backlog at the rate limit, the refused message leaves the connection
    open (no other source could take it either), and the next message, once the rate
    allows it, rides the same connection: one remote connection, not one per message."""
    pauses = {2: 1.2}  # the third message once the rate of one a second allows another
    outcomes, sink = await through_the_door(tmp_path, "max_message_rate", '"1/s"', 3, pauses=pauses)
    assert outcomes[0] == outcomes[2] == "sent", outcomes
    assert outcomes[1].startswith(
        '451 4.7.0 no source of pool "main" may connect to provider "bigmail" now (a: '
        'max_message_rate 1/s used up for source "a"'
    ), outcomes[1]
    assert [m.rcpt_tos for m in sink.messages] == [("r0@bigmail.test",), ("r2@bigmail.test",)]
    assert len(sink.connections) == 1, sink.connections  # was 2: QUIT at the refusal


async def test_a_connection_at_max_deliveries_is_replaced_even_at_the_connection_limit(
    tmp_path: Path,
) -> None:
    """A new connection from the same source starts its deliveries afresh, so the kept one
    is QUIT and replaced without asking selection (which would count the kept connection's
    own slot of ``connection_limit = 1`` and find no source)."""
    value = "1\nmax_deliveries_per_connection = 2"
    outcomes, sink = await through_the_door(tmp_path, "connection_limit", value, 3)
    assert outcomes == ["sent"] * 3
    assert len(sink.connections) == 2, sink.connections  # 2 + 1 messages
