"""A real Postfix as the receiving MX answers ``421 4.7.0 [TSS04] ...`` to one source.

Postfix's access maps can return any 4xx/5xx text; with ``smtpd_delay_reject = no`` a
``check_client_access`` verdict is given at connect time, in place of the banner, and
Postfix hangs up (a ``421`` result disconnects). So the ``bigmail`` MX (127.0.0.1) greets
source ``a`` (127.0.0.3) with::

    421 4.7.0 <unknown[127.0.0.3]>: Client host rejected: [TSS04] Messages from 127.0.0.3
    temporarily deferred due to unexpected volume

and accepts source ``b`` (127.0.0.4). The ``other`` provider's MX is the same Postfix on
127.0.0.2, whose listener has no such restriction. dnsmasq serves both MX on loopback;
Postfix discards what it accepts and logs each message's client and recipient.

The shaping file suspends (source, provider) on ``[TSS04]``: the banner reply fires it, the
plan moves the message to the pool's other source at once, the next messages to bigmail
leave from ``b`` only, and ``a`` still delivers to the other provider.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon, smtp_door_lines
from harness import free_port
from smtp_harness import Postfix, dnsmasq, postfix, send_one

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration

TSS04 = "[TSS04] Messages from 127.0.0.3 temporarily deferred due to unexpected volume"
MX_MAIN_CF = """
mynetworks = 127.0.0.0/8
relay_domains = bigmail.test, other.test
default_transport = discard
relay_transport = discard
smtpd_delay_reject = no
smtpd_client_restrictions = check_client_access inline:{{ {{ 127.0.0.3 = 421 4.7.0 {tss04} }} }}
"""
MX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
127.0.0.2:{port} inet n - n - - smtpd -o smtpd_client_restrictions=
"""
SHAPING = r"""
[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]

[[provider."bigmail".automation]]
regex = "\\[TSS04\\]"
action = "Suspend"
duration = "1h"

[provider."other"]
match = [{ MXSuffix = ".other-mx.test" }]
"""


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture(scope="module")
def postfix_mx(mx_port: int) -> Iterator[Postfix]:
    main = MX_MAIN_CF.format(tss04=TSS04)
    with postfix(0, main, MX_MASTER_CF.format(port=mx_port)) as instance:
        yield instance


def deliveries(log: str) -> list[tuple[str, str]]:
    """(recipient, client address) of each message Postfix accepted, in its log order."""
    clients = dict(re.findall(r"\]: ([0-9A-F]+): client=unknown\[([0-9.]+)\]", log))
    return [
        (recipient, clients.get(queue_id, "?"))
        for queue_id, recipient in re.findall(r"\]: ([0-9A-F]+): to=<([^>]+)>.*status=sent", log)
    ]


async def test_a_tss04_banner_moves_mail_to_the_other_source_for_that_provider_only(
    tmp_path: Path, postfix_mx: Postfix, mx_port: int
) -> None:
    (tmp_path / "shaping.toml").write_text(SHAPING)
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10), ("other.test", "mx1.other-mx.test", 10)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx1.other-mx.test": ["127.0.0.2"]}
    with dnsmasq(mx=mx, hosts=hosts) as dns:
        text = f"""
{smtp_door_lines(dns.nameserver, shaping=True)}
[source."a"]
source_address = "127.0.0.3"
remote_port = {mx_port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {mx_port}
[pool."main"."a"]
[pool."main"."b"]
"""
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")

            async def send(recipient: str) -> str:
                return await trio.to_thread.run_sync(send_one, port, recipient)

            # a is picked first; Postfix's banner to it fires the rule, b carries it
            assert await send("first@bigmail.test") == "sent"
            shaper = daemon.runtime.shaper
            assert shaper is not None
            [suspension] = shaper.active()
            assert suspension.scope == ("a", "provider", "bigmail")
            assert "automation[0]" in suspension.reason  # the rule that fired
            assert [await send(f"n{n}@bigmail.test") for n in range(3)] == ["sent"] * 3
            assert [await send(f"o{n}@other.test") for n in range(2)] == ["sent"] * 2
            log = await trio.to_thread.run_sync(
                lambda: "\n".join(postfix_mx.wait_for_log(lambda line: "o1@other.test" in line))
            )
    got = deliveries(log)
    by_domain: dict[str, set[str]] = {}
    for recipient, client in got:
        by_domain.setdefault(recipient.split("@")[1], set()).add(client)
    assert len(got) == 6, got
    assert by_domain == {"bigmail.test": {"127.0.0.4"}, "other.test": {"127.0.0.3", "127.0.0.4"}}
    rejected = re.findall(r"reject: CONNECT from unknown\[([0-9.]+)\]: 421 4.7.0", log)
    assert rejected == ["127.0.0.3"]  # once: the suspended source never came back to bigmail


async def test_repeated_tss04_greetings_close_the_site_to_that_source_only(
    tmp_path: Path, postfix_mx: Postfix, mx_port: int
) -> None:
    """No shaping file: the destination breaker alone. Three rejected greetings to ``a``
    open the (a, site) path, so ``a``'s next turn goes to ``b`` without dialing, and ``b``
    keeps the site (a breaker per address used to close it to every source)."""
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10)]
    with dnsmasq(mx=mx, hosts={"mx1.bigmail-mx.test": ["127.0.0.1"]}) as dns:
        text = f"""
{smtp_door_lines(dns.nameserver)}
[source."a"]
source_address = "127.0.0.3"
remote_port = {mx_port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {mx_port}
[pool."main"."a"]
[pool."main"."b"]
"""
        before = len(re.findall(r"reject: CONNECT from unknown\[127\.0\.0\.3\]", postfix_mx.log()))
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            outcomes = [
                await trio.to_thread.run_sync(send_one, port, f"p{n}@bigmail.test")
                for n in range(8)
            ]
            suspended = [s.name for s in daemon.runtime.health.snapshot() if s.suspended]
            [path] = daemon.runtime.breaker.open_breakers()  # what egressd status lists
        log = await trio.to_thread.run_sync(
            lambda: "\n".join(postfix_mx.wait_for_log(lambda line: "p7@bigmail.test" in line))
        )
    assert [o[:3] for o in outcomes[:6]] == ["451", "sen", "451", "sen", "451", "sen"], outcomes
    assert "[TSS04]" in outcomes[0]
    assert outcomes[6:] == ["sent", "sent"]  # a's turn went to b, and b kept the site
    assert suspended == []
    assert (path.destination, path.source) == ((ip_address("127.0.0.1"), mx_port), "a")
    rejected = re.findall(r"reject: CONNECT from unknown\[127\.0\.0\.3\]", log)
    assert len(rejected) - before == 3  # a was not dialed again once its path was open
    senders = {client for recipient, client in deliveries(log) if recipient.startswith("p")}
    assert senders == {"127.0.0.4"}
