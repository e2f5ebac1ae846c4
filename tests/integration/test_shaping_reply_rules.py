"""A provider's reply rule at the real SMTP door: ``421 4.7.0 [TSS04]`` suspends (source,
provider), the next messages to that provider leave from the pool's other source, and the
suspended source still delivers to other providers.

dnsmasq serves the MX of two fake providers on loopback; an aiosmtpd sink behind both
answers RCPT for one address with Yahoo's TSS04 deferral.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon, smtp_door_lines
from smtp_harness import dnsmasq, send_one, smtp_sink, start_scripted_mx

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
"""


async def test_tss04_suspends_the_source_for_that_provider_only(tmp_path: Path) -> None:
    (tmp_path / "shaping.toml").write_text(SHAPING)
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10), ("other.test", "mx.other.test", 10)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx.other.test": ["127.0.0.1"]}
    with (
        smtp_sink(rcpt_replies={"tss@bigmail.test": TSS04}) as sink,
        dnsmasq(mx=mx, hosts=hosts) as dns,
    ):
        text = f"""
{smtp_door_lines(dns.nameserver, shaping=True)}
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink.port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {sink.port}
[pool."main"."a"]
[pool."main"."b"]
"""
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")

            async def send(recipient: str) -> str:
                return await trio.to_thread.run_sync(send_one, port, recipient)

            first = await send("tss@bigmail.test")  # the first pick is source a
            assert first.startswith("4"), first
            shaper = daemon.runtime.shaper
            assert shaper is not None
            [suspension] = shaper.active()
            assert suspension.scope == ("a", "provider", "bigmail")
            assert [await send("ok@bigmail.test") for _ in range(3)] == ["sent"] * 3
            assert [await send("ok@other.test") for _ in range(2)] == ["sent"] * 2
            messages = await sink.wait(5)
    by_domain: dict[str, set[str]] = {}
    for message in messages:
        by_domain.setdefault(message.rcpt_tos[0].split("@")[1], set()).add(message.peer)
    assert by_domain == {"bigmail.test": {"127.0.0.4"}, "other.test": {"127.0.0.3", "127.0.0.4"}}


OPENING_RULES = r"""
[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]

[[provider."bigmail".automation]]
regex = "\\[TS03\\]"
action = "Suspend"
duration = "1h"

[[provider."bigmail".automation]]
regex = "TLS not available"
action = { SetConfig = { name = "connection_limit", value = 1 } }
duration = "10m"
"""


@pytest.mark.parametrize(
    ("replies", "effect"),
    [
        ({"ehlo": "421 4.7.0 [TS03] All messages from 127.0.0.3 will be deferred"}, "suspension"),
        ({"starttls": "454 4.7.0 TLS not available"}, "override"),
    ],
)
async def test_replies_to_ehlo_and_starttls_go_to_the_reply_rules(
    tmp_path: Path, nursery: trio.Nursery, replies: dict[str, str], effect: str
) -> None:
    (tmp_path / "shaping.toml").write_text(OPENING_RULES)
    mx_server = await start_scripted_mx(
        nursery, replies, extensions=("PIPELINING", "STARTTLS", "ENHANCEDSTATUSCODES")
    )
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10)]
    with dnsmasq(mx=mx, hosts={"mx1.bigmail-mx.test": ["127.0.0.1"]}) as dns:
        text = f"""
{smtp_door_lines(dns.nameserver, shaping=True)}
[source."a"]
source_address = "127.0.0.3"
remote_port = {mx_server.port}
[pool."main"."a"]
"""
        async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            outcome = await trio.to_thread.run_sync(send_one, port, "r@bigmail.test")
            shaper = daemon.runtime.shaper
            assert shaper is not None
            [active] = shaper.active()
    assert active.scope == ("a", "provider", "bigmail")
    assert type(active).__name__.lower() == effect
    if effect == "suspension":  # the 421 to EHLO: the open failed, nothing was sent
        assert outcome.startswith("4"), outcome
        assert "[TS03]" in outcome, outcome
    else:  # a refused STARTTLS goes on in plaintext: the message went
        assert outcome == "sent"
