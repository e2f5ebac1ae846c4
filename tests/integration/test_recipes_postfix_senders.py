"""The README's Postfix recipes for one pool per sender, run with a real Postfix.

Two ways to tag a sender's mail with a pool, both exactly as the README prints them:

* ``sender_dependent_relayhost_maps``: each sender's mail goes to the egressd listener of
  its pool (listeners tag by pool; ``relayhost`` is the fallback listener).
* sender-dependent SASL: one listener with ``[auth.users]``; Postfix logs in as the pool
  named for the sender (``smtp_sender_dependent_authentication``,
  ``smtp_sasl_password_maps``). ``smtp_sasl_security_options = noanonymous`` is needed
  because Postfix's default ``noplaintext`` refuses PLAIN and LOGIN, the only mechanisms
  egressd offers; the client mechanisms come from libsasl2-modules.

What the operator notices: two senders' messages (and a third sender's, in neither map,
through the fallback) arrive from two source addresses with
their sources' EHLO names, and a login egressd refuses leaves the message deferred in
Postfix's queue (``smtp_sasl_auth_soft_bounce``, on by default), never bounced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import running_daemon
from harness import free_port
from smtp_harness import Dnsmasq, Postfix, SmtpSink, dnsmasq, postfix, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

ALERTS = "alerts@postfix.test"
NEWS = "news@postfix.test"
OTHER = "other@postfix.test"  # in no map: the fallback
SOURCES = {
    "transactional": ("127.0.0.3", "tx.egress.test"),
    "bulk": ("127.0.0.4", "bulk.egress.test"),
}


@pytest.fixture(scope="module")
def dns() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[("good.test", "mx.good.test", 10)], hosts={"mx.good.test": ["127.0.0.1"]}
    ) as server:
        yield server


def sources_and_pools(sink_port: int) -> str:
    """One source per pool, each with its own address and EHLO name."""
    text = ""
    for pool, (address, ehlo) in SOURCES.items():
        text += f"""
[source."{pool}-1"]
source_address = "{address}"
ehlo_domain = "{ehlo}"
remote_port = {sink_port}
[pool."{pool}"."{pool}-1"]
"""
    return text


def egressd_header(dns: Dnsmasq) -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[dns]
nameservers = ["{dns.nameserver}"]
"""


def by_listener_config(ports: dict[str, int], sink_port: int, dns: Dnsmasq) -> str:
    listeners = "".join(
        f'[[smtp.listener]]\naddress = "127.0.0.1:{port}"\npool = "{pool}"\n'
        for pool, port in ports.items()
    )
    return egressd_header(dns) + listeners + sources_and_pools(sink_port)


# The README's main.cf lines for the listener recipe ({bulk_port}: the bulk listener).
BY_LISTENER_MAIN_CF = """\
sender_dependent_relayhost_maps = inline:{{ {{news@postfix.test = [127.0.0.1]:{bulk_port}}} }}
"""


def by_login_config(port: int, sink_port: int, dns: Dnsmasq) -> str:
    return (
        egressd_header(dns)
        + f"""
[auth.users]
transactional = "tx-secret"
bulk = "bulk-secret"
[[smtp.listener]]
address = "127.0.0.1:{port}"
"""
        + sources_and_pools(sink_port)
    )


# The README's main.cf lines for the SASL recipe ({bulk_password}: the password Postfix
# sends for news@, so one test can give a wrong one). The last entry, keyed by the next
# hop, serves every other sender: without it their MAIL gets egressd's 451 4.7.0, and
# their mail waits in Postfix's queue until the map has it.
BY_LOGIN_MAIN_CF = """\
smtp_sasl_auth_enable = yes
smtp_sasl_security_options = noanonymous
smtp_sender_dependent_authentication = yes
smtp_sasl_password_maps = inline:{{
    {{ alerts@postfix.test = transactional:tx-secret }}
    {{ news@postfix.test = bulk:{bulk_password} }}
    {{ [127.0.0.1]:{port} = transactional:tx-secret }} }}
"""
# The same without the next hop's entry: a sender in neither map goes without a login.
NO_FALLBACK_MAIN_CF = """\
smtp_sasl_auth_enable = yes
smtp_sasl_security_options = noanonymous
smtp_sender_dependent_authentication = yes
smtp_sasl_password_maps = inline:{{
    {{ alerts@postfix.test = transactional:tx-secret }}
    {{ news@postfix.test = bulk:bulk-secret }} }}
"""


async def send_from(mta: Postfix, sink: SmtpSink, *senders: str) -> dict[str, tuple[str, str]]:
    """One message from each sender: the source address and EHLO name each arrived with."""
    for sender in senders:
        mta.sendmail(sender, ["r@good.test"], f"Subject: from {sender}\n\nHello.\n".encode())
    messages = await sink.wait(len(senders), timeout=20)
    if len(messages) < len(senders):  # say why: Postfix's log has each attempt's status
        pytest.fail(f"{len(messages)} of {len(senders)} arrived; Postfix's log:\n{mta.log()}")
    return {message.mail_from: (message.peer, message.ehlo) for message in messages}


async def test_sender_dependent_relayhost_picks_the_listener_of_each_senders_pool(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    ports = {"transactional": free_port(), "bulk": free_port()}
    main_cf = BY_LISTENER_MAIN_CF.format(bulk_port=ports["bulk"])
    with smtp_sink("127.0.0.1") as sink, postfix(ports["transactional"], main_cf) as mta:
        text = by_listener_config(ports, sink.port, dns)
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}):
            seen = await send_from(mta, sink, ALERTS, NEWS, OTHER)
    assert seen == {
        ALERTS: SOURCES["transactional"],
        NEWS: SOURCES["bulk"],
        OTHER: SOURCES["transactional"],
    }


async def test_sender_dependent_sasl_logs_in_as_each_senders_pool(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    port = free_port()
    main_cf = BY_LOGIN_MAIN_CF.format(bulk_password="bulk-secret", port=port)
    with smtp_sink("127.0.0.1") as sink, postfix(port, main_cf) as mta:
        async with running_daemon(
            by_login_config(port, sink.port, dns), tmp_path, {"smtp": SmtpDoor()}
        ):
            seen = await send_from(mta, sink, ALERTS, NEWS, OTHER)
    assert seen == {
        ALERTS: SOURCES["transactional"],
        NEWS: SOURCES["bulk"],
        OTHER: SOURCES["transactional"],
    }


async def test_a_refused_login_leaves_the_message_deferred_in_postfixs_queue(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    port = free_port()
    main_cf = BY_LOGIN_MAIN_CF.format(bulk_password="wrong", port=port)
    with smtp_sink("127.0.0.1") as sink, postfix(port, main_cf) as mta:
        async with running_daemon(
            by_login_config(port, sink.port, dns), tmp_path, {"smtp": SmtpDoor()}
        ):
            mta.sendmail(NEWS, ["r@good.test"], b"Subject: wrong password\n\nHello.\n")
            lines = await trio.to_thread.run_sync(mta.wait_for_log, r"status=deferred")
            queued = mta.queue_ids()
    deferred = next(line for line in lines if "status=deferred" in line)
    assert "SASL authentication failed" in deferred and "535" in deferred, deferred
    assert not any("status=bounced" in line for line in lines)
    assert len(queued) == 1
    assert sink.messages == []


async def test_a_sender_without_a_login_waits_in_postfixs_queue(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    """Forgetting a sender in the map defers its mail (451 4.7.0), it never bounces."""
    port = free_port()
    with smtp_sink("127.0.0.1") as sink, postfix(port, NO_FALLBACK_MAIN_CF.format()) as mta:
        async with running_daemon(
            by_login_config(port, sink.port, dns), tmp_path, {"smtp": SmtpDoor()}
        ):
            mta.sendmail(OTHER, ["r@good.test"], b"Subject: no login\n\nHello.\n")
            lines = await trio.to_thread.run_sync(mta.wait_for_log, r"status=(deferred|bounced)")
            queued = mta.queue_ids()
    final = next(line for line in lines if "status=" in line)
    assert "status=deferred" in final and "451 4.7.0 Authentication required" in final, final
    assert len(queued) == 1
    assert sink.messages == []
