"""The README's OpenSMTPD recipes, run with Debian 12's OpenSMTPD 6.8.0p2 (unpacked with
``dpkg -x``; see recipes_harness) relaying through egressd's SMTP door on loopback.

* By listener: ``relay host smtp://127.0.0.1:PORT``; egressd's listener names the pool.
* By login: OpenSMTPD authenticates only over TLS (a credentials label is used with
  ``smtp+tls`` and ``smtps`` alone), so egressd offers STARTTLS with ``[smtp.tls]
  certificate`` and OpenSMTPD logs in with ``relay host smtp+tls://label@127.0.0.1:PORT
  auth <secrets>``; ``tls no-verify`` because egressd's certificate is not from a public CA.

What the operator notices: the message arrives from the pool's source with its EHLO name,
and a failure leaves it queued (``result="TempFail"``), never bounced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trustme
from daemon_helpers import port_of, running_daemon
from harness import free_port
from recipes_harness import OpenSmtpd, opensmtpd
from smtp_harness import SinkMessage, SmtpSink, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

MESSAGE = b"From: sender@opensmtpd.test\r\nSubject: through egressd\r\n\r\nHello.\r\n"

# The README's smtpd.conf for the listener recipe ({egressd}: egressd's SMTP listener).
BY_LISTENER = """\
listen on 127.0.0.1 port {port}
action "egressd" relay host smtp://127.0.0.1:{egressd}
match from local for any action "egressd"
"""

# The README's smtpd.conf for the login recipe; {dir}/secrets holds "egressd bulk:s3cret".
BY_LOGIN = """\
listen on 127.0.0.1 port {port}
table secrets file:{dir}/secrets
action "egressd" relay host smtp+tls://egressd@127.0.0.1:{egressd} auth <secrets> tls no-verify
match from local for any action "egressd"
"""
SECRETS = "egressd bulk:s3cret\n"


def egressd_config(sink_port: int, *, login: str = "") -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "bulk"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
[source."bulk-1"]
source_address = "127.0.0.5"
ehlo_domain = "bulk1.egress.test"
[pool."bulk"."bulk-1"]
{login}"""


def login_lines(tmp_path: Path) -> str:
    """``[auth.users]`` and a ``[smtp.tls]`` certificate (trustme), for the login recipe."""
    cert = trustme.CA().issue_cert("relay.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return f"""[auth.users]
bulk = "s3cret"
[smtp.tls]
certificate = "{cert_path}"
private_key = "{key_path}"
"""


async def relay_one(mta: OpenSmtpd, sink: SmtpSink) -> SinkMessage:
    await trio.to_thread.run_sync(mta.submit, "sender@opensmtpd.test", ["r@good.test"], MESSAGE)
    [message] = await sink.wait(1, timeout=15)
    await delivery_logged(mta)
    return message


async def delivery_logged(mta: OpenSmtpd) -> list[str]:
    """OpenSMTPD's ``mta delivery`` log lines, once there is one."""
    with trio.fail_after(15):
        while not mta.deliveries():
            await trio.sleep(0.05)
    return mta.deliveries()


async def test_relay_host_to_the_listener_of_a_pool(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with running_daemon(egressd_config(sink.port), tmp_path, {"smtp": SmtpDoor()}) as d:
            with opensmtpd(BY_LISTENER.replace("{egressd}", str(port_of(d, "smtp")))) as mta:
                message = await relay_one(mta, sink)
                assert 'result="Ok" stat="250 ' in "".join(mta.deliveries()), mta.log()
    assert (message.peer, message.ehlo) == ("127.0.0.5", "bulk1.egress.test")
    assert message.mail_from == "sender@opensmtpd.test"


async def test_relay_host_with_auth_over_starttls(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as sink:
        config = egressd_config(sink.port, login=login_lines(tmp_path))
        async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as d:
            recipe = BY_LOGIN.replace("{egressd}", str(port_of(d, "smtp")))
            with opensmtpd(recipe, {"secrets": SECRETS}) as mta:
                message = await relay_one(mta, sink)
                log = mta.log()
    assert (message.peer, message.ehlo) == ("127.0.0.5", "bulk1.egress.test")
    # egressd (with [auth.users]) answers MAIL without AUTH with 451: delivered = logged in.
    assert " mta tls ciphers=TLSv1." in log, log


async def test_a_failure_stays_queued(tmp_path: Path) -> None:
    config = egressd_config(free_port())  # nothing listens at the remote
    async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as d:
        with opensmtpd(BY_LISTENER.replace("{egressd}", str(port_of(d, "smtp")))) as mta:
            await trio.to_thread.run_sync(
                mta.submit, "sender@opensmtpd.test", ["r@good.test"], MESSAGE
            )
            deliveries, queued = await delivery_logged(mta), mta.queued()
    assert len(deliveries) == 1 and 'result="TempFail" stat="451 4.4.1 ' in deliveries[0], (
        deliveries
    )
    assert queued == 1
