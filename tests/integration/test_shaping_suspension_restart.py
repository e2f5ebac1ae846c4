"""A provider's suspension of a source survives a restart of the real daemon.

``python -m egressd run`` as a process, with a warming source (so the state store is
open), dnsmasq serving a fake provider's MX and an aiosmtpd sink that answers one
recipient with ``421 4.7.0 [TSS04]``: the reply rule suspends (cold, bigmail) for an
hour; after SIGTERM and a new start, bigmail's mail still leaves from the warm source.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from daemon_helpers import cold_and_warm_sources, smtp_door_lines
from harness import free_port
from service_harness import daemon_process
from smtp_harness import dnsmasq, smtp_sink
from state_helpers import StateBackend
from test_warmup_providers import HOSTS, MX, send_sync
from test_warmup_reply_rules import SHAPING, TSS04

pytestmark = pytest.mark.integration


def write_config(
    directory: Path, nameserver: str, sink_port: int, relay_port: int, state: StateBackend
) -> Path:
    (directory / "shaping.toml").write_text(SHAPING)
    path = directory / "egressd.toml"
    path.write_text(
        f"""
{smtp_door_lines(nameserver, shaping=True, port=relay_port)}
{state.toml()}
[warmup]
flush_interval = "1h"
[warmup.plan.test]
days = [100, 200]
{cold_and_warm_sources(sink_port)}
"""
    )
    return path


async def send(relay_port: int, recipients: list[str]) -> list[str]:
    return await trio.to_thread.run_sync(send_sync, relay_port, recipients)


async def test_a_suspension_survives_a_restart(tmp_path: Path, state_backend: StateBackend) -> None:
    """Against each backend (``state_backend``: SQLite, and a real redis-server)."""
    relay_port = free_port()
    with (
        smtp_sink(rcpt_replies={"tss@big.test": TSS04}) as sink,
        dnsmasq(mx=MX, hosts=HOSTS) as dns,
    ):
        config = write_config(tmp_path, dns.nameserver, sink.port, relay_port, state_backend)
        async with daemon_process(config) as daemon:
            [deferred] = await send(relay_port, ["tss@big.test"])
            assert "TSS04" in deferred
            daemon.send(signal.SIGTERM)
            with trio.fail_after(10):
                assert await daemon.wait_exit() == 0
        [stored] = (await state_backend.snapshot()).suspensions
        assert stored.scope == "cold@provider:bigmail" and "TSS04" in stored.reason

        async with daemon_process(config):
            sent = await send(relay_port, ["a@big.test", "b@big.test", "m@mini.test"])
    assert sent == ["sent"] * 3
    peers = [(m.rcpt_tos[0], m.peer) for m in sink.messages]
    assert peers == [
        ("a@big.test", "127.0.0.4"),  # cold is still suspended for bigmail
        ("b@big.test", "127.0.0.4"),
        ("m@mini.test", "127.0.0.3"),  # but not for minimail
    ]
