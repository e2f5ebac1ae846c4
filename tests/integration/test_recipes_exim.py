"""The README's Exim recipes, run with Debian 12's Exim 4.96 (exim4-daemon-light, unpacked
with ``dpkg -x``; see recipes_harness) on loopback.

* SOCKS5: Exim's own ``socks_proxy`` on the smtp transport, logging in as the pool. egressd
  picks the source, and its reply's BND.ADDR (the source address) reaches Exim as
  ``$proxy_external_address``, from which ``helo_data`` looks up the source's EHLO name:
  ``ehlo_domain`` cannot reach a SOCKS client, egressd only splices its bytes.
* Smarthost: a ``manualroute`` router to egressd's SMTP door, logging in with a plaintext
  authenticator; egressd sends its source's ``ehlo_domain`` itself.

What the operator notices: the messages arrive from the pool's sources, each with its own
EHLO name, and a failure leaves the message deferred in Exim's spool, never bounced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from harness import free_port
from recipes_harness import Exim, exim
from smtp_harness import SmtpSink, smtp_sink

from egressd.doors.smtp import SmtpDoor
from egressd.doors.socks5 import Socks5Door

pytestmark = pytest.mark.integration

SOURCES = {"127.0.0.3": "mta3.egress.test", "127.0.0.4": "mta4.egress.test"}
MESSAGE = b"From: sender@exim.test\nSubject: through egressd\n\nHello from Exim.\n"


def egressd_config(sink_port: int, *, door: str) -> str:
    """A pool of two sources behind one door (``socks5`` or ``smtp``) with a login."""
    text = f"""
hostname = "relay.test"
[access]
deny_destinations = []
destination_ports = [{sink_port}]
[auth.users]
transactional = "s3cret"
[[{door}.listener]]
address = "127.0.0.1:0"
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
"""
    for number, (address, ehlo) in enumerate(SOURCES.items(), start=1):
        text += f"""
[source."ip-{number}"]
source_address = "{address}"
ehlo_domain = "{ehlo}"
[pool."transactional"."ip-{number}"]
"""
    return text


# The README's Exim SOCKS5 recipe: the router stays the operator's own (here manualroute to
# the loopback sink; dnslookup in production), the transport is the recipe.
SOCKS_RECIPE = """
begin routers
to_the_sink:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = remote_smtp_via_egressd
begin transports
remote_smtp_via_egressd:
  driver = smtp
  port = {sink_port}
  socks_proxy = 127.0.0.1 port={socks_port} auth=name name=transactional pass=s3cret
  helo_data = ${{lookup{{$proxy_external_address}}lsearch{{{{dir}}/egress_helo}}\\
{{$value}}{{$primary_hostname}}}}
begin retry
* * F,1h,10m
"""

# The README's Exim smarthost recipe.
SMARTHOST_RECIPE = """
domainlist local_domains = exim.test
begin routers
smarthost_egressd:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.1
  self = send
  transport = smtp_to_egressd
begin transports
smtp_to_egressd:
  driver = smtp
  port = {smtp_port}
  hosts_require_auth = 127.0.0.1
begin authenticators
egressd_plain:
  driver = plaintext
  public_name = PLAIN
  client_send = ^transactional^s3cret
begin retry
* * F,1h,10m
"""

HELO_FILE = "".join(f"{address}: {ehlo}\n" for address, ehlo in SOURCES.items())


async def send_two(mta: Exim, sink: SmtpSink) -> set[tuple[str, str]]:
    """Two messages through Exim: the (source address, EHLO name) each arrived with."""
    for number in range(2):
        await trio.to_thread.run_sync(
            mta.submit, "sender@exim.test", [f"r{number}@good.test"], MESSAGE
        )
    messages = await sink.wait(2)
    return {(message.peer, message.ehlo) for message in messages}


async def test_socks_proxy_with_helo_data_from_proxy_external_address(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as sink:
        config = egressd_config(sink.port, door="socks5")
        async with running_daemon(config, tmp_path, {"socks5": Socks5Door()}) as daemon:
            recipe = SOCKS_RECIPE.format(sink_port=sink.port, socks_port=port_of(daemon, "socks5"))
            with exim(recipe, {"egress_helo": HELO_FILE}) as mta:
                seen = await send_two(mta, sink)
                assert all(" => " in line and "PRX=" in line for line in mta.deliveries())
    assert seen == set(SOURCES.items())


async def test_socks_proxy_failure_is_deferred_in_the_spool(tmp_path: Path) -> None:
    unused_port = free_port()
    config = egressd_config(unused_port, door="socks5")
    async with running_daemon(config, tmp_path, {"socks5": Socks5Door()}) as daemon:
        recipe = SOCKS_RECIPE.format(sink_port=unused_port, socks_port=port_of(daemon, "socks5"))
        with exim(recipe, {"egress_helo": HELO_FILE}) as mta:
            await trio.to_thread.run_sync(mta.submit, "sender@exim.test", ["r@good.test"], MESSAGE)
            deliveries, queued = mta.deliveries(), mta.queued()
    assert len(deliveries) == 1 and " == r@good.test " in deliveries[0], deliveries
    assert "Connection refused" in deliveries[0]  # egressd's SOCKS reply 05, as Exim words it
    assert queued == 1


async def test_smarthost_through_the_smtp_door(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as sink:
        config = egressd_config(sink.port, door="smtp")
        async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as daemon:
            with exim(SMARTHOST_RECIPE.format(smtp_port=port_of(daemon, "smtp"))) as mta:
                seen = await send_two(mta, sink)
                assert all(" A=egressd_plain " in line for line in mta.deliveries())
    assert seen == set(SOURCES.items())


async def test_smarthost_failure_is_deferred_with_egressds_reason(tmp_path: Path) -> None:
    config = egressd_config(free_port(), door="smtp")  # nothing listens at the remote
    async with running_daemon(config, tmp_path, {"smtp": SmtpDoor()}) as daemon:
        with exim(SMARTHOST_RECIPE.format(smtp_port=port_of(daemon, "smtp"))) as mta:
            await trio.to_thread.run_sync(mta.submit, "sender@exim.test", ["r@good.test"], MESSAGE)
            deliveries, queued = mta.deliveries(), mta.queued()
    assert len(deliveries) == 1 and " == r@good.test " in deliveries[0], deliveries
    assert ": 4" in deliveries[0] and "refused" in deliveries[0].lower(), deliveries[0]
    assert queued == 1


async def test_socks_proxy_to_an_ipv6_mx_with_a_quoted_helo_key(tmp_path: Path) -> None:
    """An IPv6 source: egressd's reply carries it in the request's family (Exim reads a
    fixed length), and the lsearch key holding colons is quoted, as the README says."""
    with smtp_sink("::1") as sink:
        config = f"""
[access]
deny_destinations = []
destination_ports = [{sink.port}]
[auth.users]
transactional = "s3cret"
[[socks5.listener]]
address = "127.0.0.1:0"
[source."ip6-1"]
source_address = "::1"
[pool."transactional"."ip6-1"]
"""
        async with running_daemon(config, tmp_path, {"socks5": Socks5Door()}) as daemon:
            recipe = SOCKS_RECIPE.format(sink_port=sink.port, socks_port=port_of(daemon, "socks5"))
            recipe = recipe.replace("route_list = * 127.0.0.1", 'route_list = * "<, ::1"')
            helo_file = HELO_FILE + '"::1": mta6.egress.test\n'
            with exim(recipe, {"egress_helo": helo_file}) as mta:
                await trio.to_thread.run_sync(
                    mta.submit, "sender@exim.test", ["r@good.test"], MESSAGE
                )
                [message] = await sink.wait(1)
    assert (message.peer, message.ehlo) == ("::1", "mta6.egress.test")
