"""AUTH on the SMTP door end to end: a real egressd, raw clients, an aiosmtpd sink.

* With a certificate, AUTH is offered and accepted only after STARTTLS, except for
  loopback clients. The non-loopback client lives in a network namespace the test creates
  (192.0.2.0/24 on its own ``lo``) and leaves when it ends, so nothing leaves this host.
* With ``[auth.users]``, MAIL needs AUTH (``451 4.7.0``: deferred) unless the listener says
  ``auth = "optional"``; ``[smtp.sender_pools]`` never leads out of the user's pools.
  The aiosmtpd sink behind egressd must see nothing of a refused attempt.
* Wrong passwords: three per connection, then ``421 4.7.0`` and a close; each is logged
  with the client address and the username, and counted in ``egressd_login_failures``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from daemon_helpers import port_of, running_daemon
from harness import require_binary
from smtp_harness import smtp_sink

from egressd.daemon import Daemon
from egressd.doors.smtp import SmtpDoor
from egressd.login import LoginThrottle

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
OUTSIDE = "192.0.2.10"  # the namespace's non-loopback client address
INSIDE = "192.0.2.1"  # the namespace's listener address


def config(listen: str = "127.0.0.1", extra: str = "") -> str:
    return f"""
hostname = "relay.test"
[access]
clients = ["127.0.0.0/8", "192.0.2.0/24"]
[[smtp.listener]]
address = "{listen}:0"
pool = "main"
[source."a"]
source_address = "127.0.0.3"
[pool."main"."a"]
[smtp.routes]
"*" = "127.0.0.1:9"
[auth.users]
main = "right"
{extra}
"""


@asynccontextmanager
async def egressd(tmp_path: Path, text: str) -> AsyncIterator[Daemon]:
    async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}) as daemon:
        yield daemon


class Mta:
    """A raw SMTP client: exact replies, and STARTTLS by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def reply(self) -> str:
        lines: list[str] = []
        with trio.fail_after(10):
            while True:
                while b"\r\n" not in self.buffer:
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        return "\n".join(lines) or "EOF"
                    self.buffer += chunk
                end = self.buffer.index(b"\r\n")
                line = self.buffer[:end].decode()
                del self.buffer[: end + 2]
                lines.append(line)
                if line[3:4] != "-":
                    return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert (await self.command("STARTTLS")).startswith("220 ")
        tls = trio.SSLStream(self.stream, context, server_hostname="relay.test")
        await tls.do_handshake()
        self.stream = tls


@asynccontextmanager
async def mta(host: str, port: int, local: str | None = None) -> AsyncIterator[Mta]:
    stream = await trio.open_tcp_stream(host, port, local_address=local)
    async with stream:
        client = Mta(stream)
        assert (await client.reply()).startswith("220 ")
        yield client


def plain(username: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode()).decode()


def has_auth(ehlo: str) -> bool:
    return any(line[4:].startswith("AUTH ") for line in ehlo.splitlines())


@contextlib.contextmanager
def private_network() -> Iterator[None]:
    """This thread in a new network namespace whose ``lo`` has 192.0.2.1 and .10; back to
    the original namespace at exit (the new one goes with its last socket)."""
    ip = shutil.which("ip")
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if ip is None or libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip("cannot create a network namespace here")
        try:
            subprocess.run([ip, "link", "set", "lo", "up"], check=True)
            for address in (INSIDE, OUTSIDE):
                subprocess.run([ip, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original namespace")
    finally:
        os.close(original)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, ssl.SSLContext]:
    """``[smtp.tls]`` lines for a certificate, and a client context that trusts it."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return f'[smtp.tls]\ncertificate = "{cert_path}"\nprivate_key = "{key_path}"\n', context


async def test_auth_before_starttls_is_refused_to_a_non_loopback_client(
    tmp_path: Path, certificate: tuple[str, ssl.SSLContext]
) -> None:
    tls, context = certificate
    with private_network():
        async with egressd(tmp_path, config(INSIDE, tls)) as daemon:
            port = port_of(daemon, "smtp")
            async with mta(INSIDE, port, local=OUTSIDE) as client:
                assert not has_auth(await client.command("EHLO mta.test"))
                assert await client.command(plain("main", "right")) == (
                    "530 5.7.0 Must issue a STARTTLS command first"
                )
                await client.starttls(context)
                assert has_auth(await client.command("EHLO mta.test"))
                assert await client.command(plain("main", "right")) == (
                    "235 2.7.0 Authentication succeeded"
                )


async def test_a_loopback_client_may_auth_without_starttls(
    tmp_path: Path, certificate: tuple[str, ssl.SSLContext]
) -> None:
    tls, _ = certificate
    async with egressd(tmp_path, config("127.0.0.1", tls)) as daemon:
        port = port_of(daemon, "smtp")
        async with mta("127.0.0.1", port, local="127.0.0.2") as client:
            ehlo = await client.command("EHLO mta.test")
            assert has_auth(ehlo) and "STARTTLS" in ehlo
            assert await client.command(plain("main", "right")) == (
                "235 2.7.0 Authentication succeeded"
            )


async def test_three_wrong_passwords_close_the_connection_and_each_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with egressd(tmp_path, config()) as daemon:
        daemon.runtime.logins = LoginThrottle(trio.current_time, base_delay=0.01)  # no waiting
        async with mta("127.0.0.1", port_of(daemon, "smtp"), local="127.0.0.2") as client:
            assert (await client.command("EHLO mta.test")).startswith("250-")
            for username in ("main", "admin", "main"):
                assert await client.command(plain(username, "guess")) == (
                    "535 5.7.8 Authentication credentials invalid"
                )
            assert await client.reply() == (
                "421 4.7.0 relay.test Error: too many failed authentications"
            )
            assert await client.reply() == "EOF"
        failures = daemon.metrics.registry.get_sample_value(
            "egressd_login_failures_total", {"door": "smtp"}
        )
    logged = [
        dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == "login failed"
    ]
    assert [(f["door"], f["client"].rpartition(":")[0], f["username"]) for f in logged] == [
        ("smtp", "127.0.0.2", "main"),
        ("smtp", "127.0.0.2", "admin"),
        ("smtp", "127.0.0.2", "main"),
    ]
    assert failures == 3


# --------------------------------------------------------------------------- AUTH required


def tenants(sink_port: int) -> str:
    """Pools alpha (127.0.0.3) and beta (127.0.0.4), mail routed to the sink; listener 0
    (127.0.0.1) requires AUTH, listener 1 (127.0.0.2) is ``auth = "optional"``; both tag
    pool alpha."""
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "alpha"
[[smtp.listener]]
address = "127.0.0.2:0"
pool = "alpha"
auth = "optional"
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink_port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {sink_port}
[pool."alpha"."a"]
[pool."beta"."b"]
[smtp.routes]
"*" = "127.0.0.1:{sink_port}"
[smtp.sender_pools]
"@beta.example" = "beta"
[auth.users]
beta = "beta-secret"
tenant = {{ password = "tenant-secret", pools = ["alpha"] }}
"""


async def run_swaks(port: int, *args: str) -> str:
    argv = [require_binary("swaks"), "--server", "127.0.0.1", "--port", str(port), *args]
    result = await trio.run_process(argv, capture_stdout=True, check=False)
    return result.stdout.decode(errors="replace")


async def test_with_users_an_unauthenticated_relay_attempt_is_deferred_451(
    tmp_path: Path,
) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, tenants(sink.port)) as daemon:
            port = port_of(daemon, "smtp", 0)
            transcript = await run_swaks(
                port, "--from", "x@alpha.example", "--to", "r@good.test", "--ehlo", "mta.test"
            )
            async with mta("127.0.0.1", port) as client:  # the forged sender
                assert (await client.command("EHLO mta.test")).startswith("250-")
                reply = await client.command("MAIL FROM:<x@beta.example>")
                assert reply == "451 4.7.0 Authentication required"
                assert (await client.command("RCPT TO:<r@good.test>")).startswith("503 ")
        assert "<** 451 4.7.0 Authentication required" in transcript
        assert sink.connections == [] and sink.messages == []


async def test_an_optional_listener_relays_the_unauthenticated_through_its_own_pool(
    tmp_path: Path,
) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, tenants(sink.port)) as daemon:
            async with mta("127.0.0.2", port_of(daemon, "smtp", 1)) as client:
                assert (await client.command("EHLO mta.test")).startswith("250-")
                assert await client.command("MAIL FROM:<x@beta.example>") == (
                    "250 2.1.0 Sender OK"  # names no pool
                )
                assert (await client.command("RCPT TO:<r@good.test>")).startswith("250 ")
                assert (await client.command("DATA")).startswith("354 ")
                assert (await client.command("Subject: t\r\n\r\nhi\r\n.")).startswith("250 ")
            [message] = await sink.wait(1)
    assert (message.mail_from, message.peer) == ("x@beta.example", "127.0.0.3")  # alpha's


async def test_a_forged_sender_keeps_an_authenticated_user_in_its_own_pools(
    tmp_path: Path,
) -> None:
    with smtp_sink("127.0.0.1") as sink:
        async with egressd(tmp_path, tenants(sink.port)) as daemon:
            transcript = await run_swaks(
                port_of(daemon, "smtp", 0),
                *("--from", "x@beta.example", "--to", "r@good.test", "--ehlo", "mta.test"),
                *("--auth", "PLAIN", "--auth-user", "tenant", "--auth-password", "tenant-secret"),
            )
            [message] = await sink.wait(1)
    assert "250 2.1.0 Sender OK (pool alpha by listener)" in transcript
    assert (message.mail_from, message.peer) == ("x@beta.example", "127.0.0.3")  # not beta's
