"""A ``421 4.7.0 [TSS04]`` from a real Postfix MX holds the warming source's step.

The same Postfix MX as the shaping test (:mod:`test_shaping_postfix_mx`): its access map
greets source ``cold`` (127.0.0.3) with ``421 4.7.0 ... [TSS04] ...`` and hangs up. The
``[TSS04]`` rule fires on that banner: the warm-up holds cold's step for provider
``bigmail`` for the rest of the day, with the rule as the reason, while its other providers
are not held; ``egressd warmup status`` shows it, the history has it, and a restart the
same day keeps it (the hold is written with the flush).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, port_of, running_daemon, smtp_door_lines
from harness import free_port
from smtp_harness import Postfix, dnsmasq, postfix, send_one
from test_shaping_postfix_mx import MX_MAIN_CF, MX_MASTER_CF, SHAPING, TSS04

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

MX = [("bigmail.test", "mx1.bigmail-mx.test", 10), ("other.test", "mx1.other-mx.test", 10)]
HOSTS = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx1.other-mx.test": ["127.0.0.2"]}


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture(scope="module")
def postfix_mx(mx_port: int) -> Iterator[Postfix]:
    with postfix(0, MX_MAIN_CF.format(tss04=TSS04), MX_MASTER_CF.format(port=mx_port)) as mx:
        yield mx


def config(directory: Path, nameserver: str, mx_port: int) -> str:
    return f"""
{smtp_door_lines(nameserver, shaping=True, home=directory)}
[warmup.plan.test]
days = [10, 20]
{cold_and_warm_sources(mx_port)}
"""


async def warmup_status(directory: Path) -> str:
    config = str(directory / "egressd.toml")
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "warmup", "status", "cold", "-c", config],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def row(status: str, provider: str) -> str:
    return next(line for line in status.splitlines() if line.split()[:2] == ["cold", provider])


async def test_a_tss04_banner_from_postfix_holds_the_step_for_that_provider(
    short_dir: Path, postfix_mx: Postfix, mx_port: int
) -> None:
    (short_dir / "shaping.toml").write_text(SHAPING)
    with dnsmasq(mx=MX, hosts=HOSTS) as dns:
        text = config(short_dir, dns.nameserver, mx_port)
        async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            sent = await trio.to_thread.run_sync(send_one, port, "first@bigmail.test")
            assert sent == "sent"  # Postfix greeted cold with 421; warm carried it
            assert await trio.to_thread.run_sync(send_one, port, "o@other.test") == "sent"
            engine = daemon.runtime.warmup
            assert engine is not None
            held = engine.quota("cold", "bigmail")
            assert held is not None and held.hold is not None
            assert held.hold.startswith('shaping rule: rule [provider."bigmail"] automation[0]')
            assert engine.quota("cold", "other").hold is None  # type: ignore[union-attr]
            assert daemon.warming is not None
            await daemon.warming.flush()
            status = await warmup_status(short_dir)
    assert "shaping rule" in row(status, "bigmail") and "TSS04" in status
    assert "shaping rule" not in row(status, "other")

    async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as again:
        assert again.runtime.warmup is not None
        kept = again.runtime.warmup.quota("cold", "bigmail")
        assert kept is not None and kept.hold == held.hold  # the same day: still held
