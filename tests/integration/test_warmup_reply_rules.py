"""A shaping reply rule firing at the real SMTP door holds the warm-up step.

dnsmasq serves a fake provider's MX on loopback, a shaping file names it with a
``[TSS04]`` Suspend rule, and an aiosmtpd sink answers one recipient's RCPT with Yahoo's
``421 4.7.0 [TSS04]``: the warming source's step for that provider is held with the rule
as the reason, ``egressd warmup status`` shows it, and its other providers are not held.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, port_of, running_daemon, smtp_door_lines
from smtp_harness import dnsmasq, smtp_sink
from test_warmup_control import egressd
from test_warmup_providers import HOSTS, MX, send_sync

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

TSS04 = "421 4.7.0 [TSS04] Messages from 127.0.0.3 temporarily deferred due to unexpected volume"
SHAPING = r"""
[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]
[[provider."bigmail".automation]]
regex = "\\[TSS04\\]"
action = "Suspend"
duration = "1h"
[provider."minimail"]
match = [{ MXSuffix = ".minimail-mx.test" }]
"""


def config(nameserver: str, port: int, directory: Path) -> str:
    return f"""
{smtp_door_lines(nameserver, shaping=True, home=directory)}
[warmup.plan.test]
days = [10, 20]
{cold_and_warm_sources(port)}
"""


async def test_tss04_holds_the_warming_step_for_that_provider(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (short_dir / "shaping.toml").write_text(SHAPING)
    with (
        smtp_sink(rcpt_replies={"tss@big.test": TSS04}) as sink,
        dnsmasq(mx=MX, hosts=HOSTS) as dns,
        caplog.at_level(logging.WARNING),
    ):
        text = config(dns.nameserver, sink.port, short_dir)
        async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            sent = await trio.to_thread.run_sync(
                send_sync, port, ["m0@mini.test", "tss@big.test", "m1@mini.test"]
            )
            assert sent[0] == "sent" and sent[2] == "sent"
            assert sent[1].startswith("failed") and "TSS04" in sent[1]
            code, out, err = await egressd(short_dir, "status", "cold")
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("cold ")}
    assert "shaping rule" in rows["bigmail"] and "TSS04" in rows["bigmail"], out
    assert "shaping rule" not in rows["minimail"], out
    held = [
        r
        for r in caplog.records
        if r.getMessage() == "warm-up held" and getattr(r, "fields", {}).get("source") == "cold"
    ]
    assert [r.fields["provider"] for r in held] == ["bigmail"]  # type: ignore[attr-defined]
    assert "TSS04" in held[0].fields["reason"]  # type: ignore[attr-defined]
