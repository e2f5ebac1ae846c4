"""Warm-up per shaping provider at the real SMTP door, on loopback.

dnsmasq serves the MX of two fake providers (bigmail, minimail); a shaping file names
them by MX suffix; the warm-up plan gives each its own schedule. The cold source sends
its quota to one provider, overflows to the warm source for that provider only, and
keeps sending to the other provider under that provider's own quota. An aiosmtpd sink
behind both MX names sees which source each message left from.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, port_of, running_daemon, smtp_door_lines
from smtp_harness import dnsmasq, smtp_sink

from egressd.doors.smtp import SmtpDoor
from egressd.warming import warmup_command

pytestmark = pytest.mark.integration

COLD, WARM = "127.0.0.3", "127.0.0.4"
SHAPING = """
[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]
[provider."minimail"]
match = [{ MXSuffix = ".minimail-mx.test" }]
"""
MX = [("big.test", "mx1.bigmail-mx.test", 10), ("mini.test", "mx1.minimail-mx.test", 10)]
HOSTS = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx1.minimail-mx.test": ["127.0.0.1"]}


def config(nameserver: str, port: int, state: Path) -> str:
    return f"""
{smtp_door_lines(nameserver, shaping=True, state=state)}
[warmup.plan.test]
days = [10, 20]
[warmup.plan.test.provider.bigmail]
days = [2, 4]
[warmup.plan.test.provider.minimail]
days = [3, 6]
{cold_and_warm_sources(port, cold=COLD, warm=WARM)}
"""


def send_sync(relay_port: int, recipients: list[str]) -> list[str]:
    """One session per recipient; "sent" or the error."""
    results = []
    for recipient in recipients:
        try:
            with smtplib.SMTP("127.0.0.1", relay_port, timeout=15) as client:
                client.sendmail("a@sender.test", [recipient], b"Subject: t\r\n\r\nhi\r\n")
            results.append("sent")
        except (smtplib.SMTPException, OSError) as exc:
            results.append(f"failed: {exc}")
    return results


async def test_each_provider_has_its_own_quota_and_overflow(tmp_path: Path) -> None:
    (tmp_path / "shaping.toml").write_text(SHAPING)
    with smtp_sink() as sink, dnsmasq(mx=MX, hosts=HOSTS) as dns:
        text = config(dns.nameserver, sink.port, tmp_path / "state")
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            relay_port = port_of(daemon, "smtp")

            async def send(recipients: list[str]) -> list[str]:
                return await trio.to_thread.run_sync(send_sync, relay_port, recipients)

            assert await send([f"b{i}@big.test" for i in range(3)]) == ["sent"] * 3
            assert await send([f"m{i}@mini.test" for i in range(4)]) == ["sent"] * 4
            status = warmup_command(daemon.warming, "status", "cold", {})
    peers = [(m.rcpt_tos[0].split("@")[1], m.peer) for m in sink.messages]
    big = [peer for domain, peer in peers if domain == "big.test"]
    mini = [peer for domain, peer in peers if domain == "mini.test"]
    assert big == [COLD, COLD, WARM]  # bigmail's quota of 2, then the warm source
    assert mini == [COLD, COLD, COLD, WARM]  # minimail's own quota of 3
    used = {row["provider"]: (row["quota"], row["used"]) for row in status["rows"]}
    assert used["bigmail"] == (2, 2) and used["minimail"] == (3, 3)
