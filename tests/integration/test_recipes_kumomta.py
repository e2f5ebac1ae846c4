"""The README's KumoMTA recipe, on the wire: kumod's SOCKS5 client (recipes_harness,
byte for byte from crates/kumod/src/egress_source.rs) against egressd's SOCKS5 door.

KumoMTA itself cannot be installed here. What kumod does for a source with
``socks5_proxy_server`` and ``socks5_proxy_source_address``: offer NOAUTH, plus
USERNAME/PASSWORD when ``socks5_proxy_username``/``socks5_proxy_password`` are set; log in
if the proxy chose it; ``BIND source:0``; ``CONNECT`` the MX address it resolved; speak
SMTP with its own ``ehlo_domain``. A BIND failure is a ``ProxyBindError`` (kumod records
``ProxyUnhealthy`` against the source and may suspend it); a failed CONNECT or login is a
plain error, no source health event.

What the operator notices: each message leaves from exactly the address kumod's source
names, kumod logs that address (the CONNECT reply's BND.ADDR), a BIND egressd will not
serve suspends only that source in kumod, and a destination's failure suspends nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from daemon_helpers import port_of, running_daemon
from harness import free_port
from recipes_harness import (
    CONNECT,
    NOAUTH,
    USERNAME_PASSWORD,
    KumodHandshakeError,
    KumodProxyBindError,
    kumod_health_event,
    kumod_socks5_connect,
    read_request_status,
    smtp_transaction,
    socks_host,
)
from smtp_harness import SmtpSink, smtp_sink

from egressd.doors.socks5 import Socks5Door

pytestmark = pytest.mark.integration

KUMO = ("kumo", "kumo-pw")  # socks5_proxy_username / socks5_proxy_password
# kumod's sources: the address it BINDs, and its own ehlo_domain.
KUMOD_SOURCES = {"127.0.0.3": "mta3.kumo.test", "127.0.0.4": "mta4.kumo.test"}
NOT_ALLOWED, GENERAL_FAILURE, CONNECTION_REFUSED = 0x02, 0x01, 0x05

USERS = """
[auth.users]
kumo = { password = "kumo-pw", pools = ["kumo-a", "kumo-b"] }
"""


def egressd_config(sink_ports: list[int], users: str) -> str:
    """egressd's side of the recipe: a source for each address kumod BINDs, in pools of
    the kumo login; 127.0.0.9 is a source of another pool, 203.0.113.7 one that is not
    plumbed on this host (it fails at bind, no packet is sent)."""
    return f"""
[access]
deny_destinations = []
destination_ports = {sink_ports}
[[socks5.listener]]
address = "127.0.0.1:0"
pool = "kumo-a"
{users}
[source."ip-3"]
source_address = "127.0.0.3"
[source."ip-4"]
source_address = "127.0.0.4"
[source."ip-9"]
source_address = "127.0.0.9"
[source."gone"]
source_address = "203.0.113.7"
[pool."kumo-a"."ip-3"]
[pool."kumo-b"."ip-4"]
[pool."kumo-b"."gone"]
[pool."others"."ip-9"]
"""


@asynccontextmanager
async def egressd(
    tmp_path: Path, sink: SmtpSink, users: str = USERS, closed_port: int | None = None
) -> AsyncIterator[int]:
    """egressd serving the recipe (``closed_port``: one more port access allows); the
    SOCKS5 door's port."""
    config = egressd_config([sink.port] + ([closed_port] if closed_port else []), users)
    async with running_daemon(config, tmp_path, {"socks5": Socks5Door()}) as daemon:
        yield port_of(daemon, "socks5")


async def deliver(
    port: int, sink: SmtpSink, source: str, credentials: tuple[str, str] | None = KUMO
) -> tuple[str, int]:
    """One message as kumod sends it through ``source``; the source address kumod logs
    and the method egressd chose."""
    tunnel = await kumod_socks5_connect(
        ("127.0.0.1", port), source, (sink.host, sink.port), credentials
    )
    replies = await smtp_transaction(
        tunnel.stream, KUMOD_SOURCES[source], "bounce@kumo.test", "r@good.test", b"Hi."
    )
    assert replies[-2].startswith("250 "), replies
    return tunnel.source_address[0], tunnel.chosen_method


async def test_each_message_leaves_from_the_address_kumods_source_binds(tmp_path: Path) -> None:
    order = ["127.0.0.4", "127.0.0.3", "127.0.0.4"]  # not the pools' own rotation
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, sink) as port:
            results = [await deliver(port, sink, source) for source in order]
            messages = await sink.wait(len(order))
    assert results == [(source, USERNAME_PASSWORD) for source in order]  # kumod logs these
    assert [(m.peer, m.ehlo) for m in messages] == [(s, KUMOD_SOURCES[s]) for s in order]


async def test_without_auth_users_kumods_login_only_tags(tmp_path: Path) -> None:
    """A KumoProxy without ``require_auth`` replaced by egressd without ``[auth.users]``:
    kumod's file need not change, with or without its credentials."""
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, sink, users="") as port:
            with_login = await deliver(port, sink, "127.0.0.4")
            without = await deliver(port, sink, "127.0.0.3", credentials=None)
            messages = await sink.wait(2)
    assert with_login == ("127.0.0.4", USERNAME_PASSWORD)
    assert without == ("127.0.0.3", NOAUTH)
    assert [m.peer for m in messages] == ["127.0.0.4", "127.0.0.3"]


async def test_kumod_without_credentials_is_refused_before_any_bind(tmp_path: Path) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, sink) as port:
            with pytest.raises(
                KumodHandshakeError, match="incompatible SOCKS5 authentication"
            ) as err:
                await kumod_socks5_connect(("127.0.0.1", port), "127.0.0.3", (sink.host, sink.port))
    assert kumod_health_event(err.value) is None  # kumod logs it; its source stays healthy
    assert sink.connections == []


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ("127.0.0.9", NOT_ALLOWED),  # a source, but in no pool of the kumo login
        ("127.0.0.99", NOT_ALLOWED),  # no source has this address
        ("203.0.113.7", GENERAL_FAILURE),  # a source this host cannot bind, as KumoProxy
    ],
)
async def test_a_bind_egressd_will_not_serve_is_a_proxy_bind_error_in_kumod(
    tmp_path: Path, source: str, status: int
) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, sink) as port:
            with pytest.raises(KumodProxyBindError) as err:
                await kumod_socks5_connect(
                    ("127.0.0.1", port), source, (sink.host, sink.port), KUMO
                )
            # kumod's other sources go on.
            assert await deliver(port, sink, "127.0.0.3") == ("127.0.0.3", USERNAME_PASSWORD)
    assert err.value.status == status
    assert kumod_health_event(err.value) == "ProxyUnhealthy"
    assert [m.peer for m in sink.messages] == ["127.0.0.3"]


async def test_a_destinations_failure_suspends_nothing(tmp_path: Path) -> None:
    closed = ("127.0.0.1", free_port())  # nobody listens there
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, sink, closed_port=closed[1]) as port:
            with pytest.raises(KumodHandshakeError, match="status 0x05") as err:
                await kumod_socks5_connect(("127.0.0.1", port), "127.0.0.3", closed, KUMO)
            # Neither kumod nor egressd holds it against the source: the next message goes.
            assert await deliver(port, sink, "127.0.0.3") == ("127.0.0.3", USERNAME_PASSWORD)
    assert kumod_health_event(err.value) is None


# The client against the socksv5 crate's own test vectors (socksv5 0.3.1,
# src/v5/client_commands.rs and src/v5/mod.rs), so its bytes are kumod's.


def test_requests_are_encoded_as_socksv5_writes_them() -> None:
    assert bytes([5, CONNECT, 0]) + socks_host("127.0.0.1", 1080) == bytes(
        [5, 1, 0, 1, 127, 0, 0, 1, 4, 56]
    )
    ipv6 = "102:304:506:708:900:102:304:506"
    assert bytes([5, CONNECT, 0]) + socks_host(ipv6, 1080) == bytes(
        [5, 1, 0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 4, 56]
    )


async def test_replies_are_read_as_socksv5_reads_them() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(bytes([5, 0, 0, 1, 127, 0, 0, 1, 4, 56]))
    assert await read_request_status(receive) == (0, ("127.0.0.1", 1080))
    await send.send_all(bytes([5, 0, 0, 3, 1, 65, 4, 56]))  # a domain: kumod refuses it
    assert await read_request_status(receive) == (0, None)
