"""Shaping suspensions and SetConfig overrides survive a restart with no warming source,
and a reload that adds (or drops) warm-up takes effect without a restart.

The restart test runs ``python -m egressd run`` as a process, with shaping files and a
``[state] directory`` but no warm-up: dnsmasq serves a fake provider's MX, an aiosmtpd
sink answers one recipient with ``[TSS04]`` (a Suspend rule) and one with ``[TS02]`` (a
SetConfig rule). After SIGTERM and a new start, ``egressd status`` still lists both, with
their expiry, and bigmail's mail still leaves from the warm source.
"""

from __future__ import annotations

import signal
import smtplib
import sys
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, port_of, running_daemon, smtp_door_lines
from harness import free_port
from service_harness import daemon_process
from smtp_harness import dnsmasq, smtp_sink
from test_warmup_providers import HOSTS, MX, send_sync
from test_warmup_reply_rules import TSS04

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

TS02 = "451 4.7.0 [TS02] Messages from 127.0.0.3 temporarily deferred due to user complaints"
SHAPING = r"""
[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]
[[provider."bigmail".automation]]
regex = "\\[TSS04\\]"
action = "Suspend"
duration = "1h"
[[provider."bigmail".automation]]
regex = "\\[TS02\\]"
action = { SetConfig = { name = "max_message_rate", value = "5/h" } }
duration = "2h"
[provider."minimail"]
match = [{ MXSuffix = ".minimail-mx.test" }]
"""


def write_config(directory: Path, nameserver: str, sink_port: int, relay_port: int) -> Path:
    (directory / "shaping.toml").write_text(SHAPING)
    path = directory / "egressd.toml"
    path.write_text(
        f"""
{smtp_door_lines(nameserver, shaping=True, home=directory, port=relay_port)}
{cold_and_warm_sources(sink_port, warming=False)}
"""
    )
    return path


async def send(relay_port: int, recipients: list[str]) -> list[str]:
    return await trio.to_thread.run_sync(send_sync, relay_port, recipients)


async def status(config: Path) -> str:
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "status", "-c", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def shaping_rows(text: str) -> dict[str, str]:
    """``egressd status``'s shaping rows by their RULE column (``suspend``, ``set KEY``)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("cold ") and "provider bigmail" in line:
            for rule in ("suspend", "set max_message_rate"):
                if f" {rule} " in line:
                    rows[rule] = line
    return rows


async def test_suspensions_and_overrides_survive_a_restart_without_warm_up(
    short_dir: Path,
) -> None:
    relay_port = free_port()
    with (
        smtp_sink(rcpt_replies={"tss@big.test": TSS04, "ts02@big.test": TS02}) as sink,
        dnsmasq(mx=MX, hosts=HOSTS) as dns,
    ):
        config = write_config(short_dir, dns.nameserver, sink.port, relay_port)
        async with daemon_process(config) as daemon:
            deferred = await send(relay_port, ["ts02@big.test", "tss@big.test"])
            assert "TS02" in deferred[0] and "TSS04" in deferred[1]
            before = shaping_rows(await status(config))
            assert set(before) == {"suspend", "set max_message_rate"}
            daemon.send(signal.SIGTERM)
            with trio.fail_after(10):
                assert await daemon.wait_exit() == 0

        async with daemon_process(config):
            after = shaping_rows(await status(config))
            sent = await send(relay_port, ["a@big.test", "m@mini.test"])
    assert set(after) == {"suspend", "set max_message_rate"}
    assert "TS02" in after["set max_message_rate"] and "TSS04" in after["suspend"]
    assert sent == ["sent"] * 2
    peers = [(m.rcpt_tos[0], m.peer) for m in sink.messages]
    assert peers == [
        ("a@big.test", "127.0.0.4"),  # cold is still suspended for bigmail
        ("m@mini.test", "127.0.0.3"),  # but not for minimail
    ]


RELOAD_CONFIG = """
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{port}"
[state]
directory = "{state}"
[warmup.plan.test]
days = [2]
[source."cold"]
source_address = "127.0.0.3"
remote_port = {port}
{warmup}
[source."warm"]
source_address = "127.0.0.4"
remote_port = {port}
[pool."main"."cold"]
weight = 1000
[pool."main"."warm"]
"""


def send_messages(relay_port: int, count: int) -> None:
    for index in range(count):
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            client.sendmail("a@sender.test", [f"r{index}@x.test"], b"Subject: t\r\n\r\nhi\r\n")


async def test_a_reload_adds_warm_up_and_another_drops_it(tmp_path: Path) -> None:
    with smtp_sink() as sink:
        text = RELOAD_CONFIG.format(port=sink.port, state=tmp_path / "state", warmup="")
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            relay_port = port_of(daemon, "smtp")
            assert daemon.warming is None  # nothing needs the state store yet
            await trio.to_thread.run_sync(send_messages, relay_port, 3)

            with_warmup = RELOAD_CONFIG.format(
                port=sink.port, state=tmp_path / "state", warmup='warmup = "test"'
            )
            (tmp_path / "egressd.toml").write_text(with_warmup)
            assert await daemon.reload("test")
            assert daemon.warming is not None
            await trio.to_thread.run_sync(send_messages, relay_port, 3)

            (tmp_path / "egressd.toml").write_text(text)
            assert await daemon.reload("test")
            await trio.to_thread.run_sync(send_messages, relay_port, 2)
    peers = [m.peer for m in sink.messages]
    cold, warm = "127.0.0.3", "127.0.0.4"
    assert peers == [cold] * 3 + [cold, cold, warm] + [cold, cold]
