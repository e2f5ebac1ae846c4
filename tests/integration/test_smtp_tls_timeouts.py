"""The command timeout over STARTTLS, end to end: the MTA's reads then go through TLS over
the connection's deadline task (egressd.net.connection), whose TooSlowError must reach
the door as a timeout and leave the TLS stream able to carry the 421."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import trio
import trustme
from harness import free_port
from smtp_harness import start_scripted_mx
from test_smtp_door import egressd, starttls_config

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration


async def test_an_mta_silent_after_starttls_gets_the_421_timeout_over_tls(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = free_port("127.0.0.1")
    await start_scripted_mx(nursery, port=port)
    text, context = starttls_config(tmp_path, trustme.CA(), port)

    def silent_after_mail(relay_port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            client.starttls(context=context)
            client.ehlo("mta.test")
            assert client.mail("a@sender.test")[0] == 250
            return client.getreply()  # nothing sent: the next thing said is egressd's

    async with egressd(tmp_path, text, SmtpDoor(command_timeout=0.3)) as relay_port:
        code, message = await trio.to_thread.run_sync(silent_after_mail, relay_port)
    assert (code, message) == (421, b"4.4.2 relay.test timeout waiting for a command")
