"""The README's Haraka recipe, run with Haraka from npm (see recipes_harness) relaying
through egressd's SMTP door on loopback: ``queue/smtp_forward`` to the door, logging in as
the pool, with ``one_message_per_rcpt=true``.

egressd delivers each transaction to one next hop, and answers a recipient whose domain
has another one ``452 4.5.3``. ``smtp_forward`` hands the whole message over in one
transaction and gives its client a ``450`` for the whole message when any recipient was
refused, so without ``one_message_per_rcpt`` a message for two domains is refused at every
try and never delivered, not even to the first domain. With it, every recipient is a
transaction of its own: both domains get the message, and the client gets its 250 only
after both were delivered. The transactions share one Haraka session, and egressd keeps
its connection to a next hop across them: two recipients at one domain are two
transactions on one remote connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from recipes_harness import Haraka, haraka
from smtp_harness import SmtpSink, smtp_sink

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

RECIPIENTS = ["a@good.test", "b@good.test", "c@other.test"]
MESSAGE = b"From: app@haraka.test\r\nSubject: through egressd\r\n\r\nHello from Haraka.\r\n"

# The README's Haraka files ({port}: egressd's SMTP listener).
RECIPE = {
    "plugins": "relay\nqueue/smtp_forward\n",
    "relay.ini": "[relay]\nacl=true\n",
    "relay_acl_allow": "127.0.0.0/8\n",
    "smtp_forward.ini": """\
host=127.0.0.1
port={port}
enable_outbound=true
one_message_per_rcpt=true
auth_type=plain
auth_user=transactional
auth_pass=s3cret
""",
}


def egressd_config(good: SmtpSink, other: SmtpSink) -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
destination_ports = [{good.port}, {other.port}]
[auth.users]
transactional = "s3cret"
[[smtp.listener]]
address = "127.0.0.1:0"
[smtp.routes]
"good.test" = "{good.host}:{good.port}"
"other.test" = "{other.host}:{other.port}"
[source."tx-1"]
source_address = "127.0.0.6"
ehlo_domain = "tx1.egress.test"
[pool."transactional"."tx-1"]
"""


def recipe(egressd_port: int, *, one_message_per_rcpt: bool = True) -> dict[str, str]:
    files = {name: text.replace("{port}", str(egressd_port)) for name, text in RECIPE.items()}
    if not one_message_per_rcpt:
        files["smtp_forward.ini"] = files["smtp_forward.ini"].replace(
            "one_message_per_rcpt=true\n", ""
        )
    return files


async def submit(mta: Haraka) -> tuple[int, str]:
    return await trio.to_thread.run_sync(mta.submit, "app@haraka.test", RECIPIENTS, MESSAGE)


async def test_one_message_per_rcpt_delivers_a_message_for_two_domains(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as good, smtp_sink("127.0.0.2") as other:
        config = egressd_config(good, other)
        async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            with haraka(recipe(port_of(daemon, "smtp"))) as mta:
                code, text = await submit(mta)
    assert code == 250, text
    assert sorted(m.rcpt_tos for m in good.messages) == [("a@good.test",), ("b@good.test",)]
    assert [m.rcpt_tos for m in other.messages] == [("c@other.test",)]
    # One Haraka session: egressd kept the connection to good.test for its second message.
    assert len(good.connections) == 1 and len(other.connections) == 1
    received = good.messages + other.messages
    assert {(m.peer, m.ehlo) for m in received} == {("127.0.0.6", "tx1.egress.test")}


async def test_without_one_message_per_rcpt_such_a_message_is_never_delivered(
    tmp_path: Path,
) -> None:
    with smtp_sink("127.0.0.1") as good, smtp_sink("127.0.0.2") as other:
        config = egressd_config(good, other)
        async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            files = recipe(port_of(daemon, "smtp"), one_message_per_rcpt=False)
            with haraka(files) as mta:
                replies = [await submit(mta) for _ in range(2)]  # the client's retry
    for code, text in replies:
        assert code == 450 and text.startswith("4.5.3 other.test has another next hop"), text
    assert good.messages == [] and other.messages == []
