"""The SMTP front door end to end on loopback: real egressd, dnsmasq, aiosmtpd, swaks, smtplib.

An MTA (swaks, smtplib, or a raw client when the exact bytes matter) talks to an in-process
egressd; egressd resolves MX records at dnsmasq and delivers to an aiosmtpd sink or a
scripted trio SMTP server. Sources are loopback addresses (127.0.0.3 "a", 127.0.0.4 "b"),
so the server sees which source a message left from. Sources set ``remote_port`` to the
sink's port, because MX records always mean port 25.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from daemon_helpers import port_of, running_daemon
from harness import free_port, require_binary
from service_harness import sample, scrape
from smtp_harness import (
    DROP,
    GARBAGE,
    HANG,
    Dnsmasq,
    dnsmasq,
    server_tls_context,
    smtp_sink,
    start_scripted_mx,
)

from egressd.doors.smtp import SmtpDoor
from egressd.net import tls as egress_tls

pytestmark = pytest.mark.integration

BODY = (
    b"From: a@sender.test\r\nTo: rcpt@good.test\r\nSubject: test\r\n\r\n"
    b"first line\r\n..a line that began with a dot\r\n.\tdot-tab\r\nlast line\r\n"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dns() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[
            ("good.test", "mx.good.test", 10),
            ("alias.test", "mx.alias.test", 10),
            ("other.test", "mx.other.test", 10),
            ("fallback.test", "dead.fallback.test", 10),
            ("fallback.test", "live.fallback.test", 20),
            ("dead.test", "mx1.dead.test", 10),
            ("dead.test", "mx2.dead.test", 20),
            ("dual.test", "mx.dual.test", 10),
        ],
        hosts={
            "mx.good.test": ["127.0.0.1"],
            "mx.alias.test": ["127.0.0.1"],
            "mx.other.test": ["127.0.0.2"],
            "dead.fallback.test": ["127.0.0.9"],
            "live.fallback.test": ["127.0.0.1"],
            "mx1.dead.test": ["127.0.0.9"],
            "mx2.dead.test": ["127.0.0.10"],
            "implicit.test": ["127.0.0.1"],
            "mx.dual.test": ["127.0.0.1", "::1"],
        },
        null_mx=["nullmx.test"],
    ) as server:
        yield server


@pytest.fixture
def port() -> int:
    """A port free on 127.0.0.1 and 127.0.0.2: every MX of a test listens on it."""
    while True:
        candidate = free_port("127.0.0.1")
        try:
            free_port_on("127.0.0.2", candidate)
        except OSError:
            continue
        return candidate


def free_port_on(host: str, port: int) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind((host, port))


def routed(remote_port: int, extra: str = "") -> str:
    """A configuration that routes every domain to 127.0.0.1 (the test's scripted MX)."""
    return config(remote_port, routes={"*": f"127.0.0.1:{remote_port}"}, extra=extra)


def config(
    remote_port: int,
    *,
    dns: Dnsmasq | None = None,
    routes: dict[str, str] | None = None,
    listener_pool: str | None = "main",
    extra: str = "",
) -> str:
    text = f"""
hostname = "relay.test"
[access]
deny_destinations = []
[dns]
nameservers = [{f'"{dns.nameserver}"' if dns else ""}]
timeout = "2s"
[dial]
timeout = "3s"
[[smtp.listener]]
address = "127.0.0.1:0"
{f'pool = "{listener_pool}"' if listener_pool else ""}
[source."a"]
source_address = "127.0.0.3"
ehlo_domain = "out-a.test"
remote_port = {remote_port}
[source."b"]
source_address = "127.0.0.4"
ehlo_domain = "out-b.test"
remote_port = {remote_port}
[pool."main"."a"]
[pool."other"."b"]
"""
    if routes:
        text += "[smtp.routes]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in routes.items())
    return text + extra


@asynccontextmanager
async def egressd(tmp_path: Path, text: str, door: SmtpDoor | None = None) -> AsyncIterator[int]:
    """Run egressd with only the SMTP door; yield its listener's port."""
    async with running_daemon(text, tmp_path, doors={"smtp": door or SmtpDoor()}) as daemon:
        yield port_of(daemon, "smtp")


class Mta:
    """A raw SMTP client, for asserting the exact replies an MTA gets."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.sent = self.received = 0  # bytes, as egressd's connection line counts them

    async def reply(self) -> str:
        """One reply as text: every line joined with newlines (``250-a\\n250 b``)."""
        lines: list[str] = []
        with trio.fail_after(10):
            while True:
                while b"\r\n" not in self.buffer:
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        return "\n".join(lines) or "EOF"
                    self.received += len(chunk)
                    self.buffer += chunk
                end = self.buffer.index(b"\r\n")
                line = self.buffer[:end].decode()
                del self.buffer[: end + 2]
                lines.append(line)
                if line[3:4] != "-":
                    return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.sent += len(data)


@asynccontextmanager
async def mta(port: int, ehlo: bool = True) -> AsyncIterator[Mta]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = Mta(stream)
        assert (await client.reply()).startswith("220 ")
        if ehlo:
            assert (await client.command("EHLO mta.test")).startswith("250-relay.test")
        yield client


async def transaction(client: Mta, recipients: list[str], body: bytes = BODY) -> list[str]:
    """MAIL, RCPTs, DATA, body: every reply, in order (stops after a refused DATA)."""
    replies = [await client.command("MAIL FROM:<a@sender.test>")]
    for rcpt in recipients:
        replies.append(await client.command(f"RCPT TO:<{rcpt}>"))
    data = await client.command("DATA")
    replies.append(data)
    if data.startswith("354"):
        await client.send(body + b".\r\n")
        replies.append(await client.reply())
    return replies


def swaks(port: int, *args: str) -> list[str]:
    return [require_binary("swaks"), "--server", "127.0.0.1", "--port", str(port), *args]


async def run_swaks(port: int, *args: str) -> str:
    result = await trio.run_process(swaks(port, *args), capture_stdout=True, check=False)
    return result.stdout.decode(errors="replace")


def transaction_logs(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "egressd.smtp" and r.getMessage() == "transaction"
    ]


# --------------------------------------------------------------------------- delivery


async def test_mail_leaves_from_the_pool_source_with_its_ehlo_name(
    tmp_path: Path, dns: Dnsmasq, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, config(port, dns=dns)) as relay_port:
            output = await run_swaks(
                relay_port,
                "--from", "a@sender.test",
                "--to", "rcpt@good.test",
                "--header", "Subject: via egressd",
                "--body", "hello\n.dotted\n",
            )  # fmt: skip
            assert "250 2.0.0 sink queued message 1" in output
            [message] = await sink.wait(1)
    assert message.peer == "127.0.0.3"
    assert message.ehlo == "out-a.test"
    assert message.rcpt_tos == ("rcpt@good.test",)
    assert b"Subject: via egressd" in message.body
    assert b"\r\n.dotted\r\n" in message.body  # dot-stuffing undone by the sink: intact
    [line] = transaction_logs(caplog)
    assert line["pool"] == "main"
    assert line["source"] == "a"
    assert line["local_address"].startswith("127.0.0.3:")
    assert line["mx"] == "mx.good.test"
    assert line["mx_address"] == f"mx.good.test[127.0.0.1]:{port}"
    assert line["recipients"] == "rcpt@good.test=250"
    assert line["reply"] == "250 2.0.0 sink queued message 1"
    assert line["outcome"] == "delivered"


async def test_the_body_reaches_the_remote_octet_for_octet(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    async with egressd(tmp_path, routed(port)) as relay:
        body = BODY + b"." * 1200 + b"\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
        async with mta(relay) as client:
            replies = await transaction(client, ["rcpt@good.test"], body)
            assert replies[-1] == "250 2.0.0 scripted queued"
    [session] = remote.sessions
    assert bytes(session.body) == body  # still dot-stuffed, as the MTA sent it
    assert session.got_final_dot


async def test_the_connection_line_counts_the_bytes_each_way(
    tmp_path: Path, nursery: trio.Nursery, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """bytes_up: what the MTA sent; bytes_down: what egressd answered (as the SOCKS5 and
    PROXY doors count their client's side)."""
    caplog.set_level(logging.INFO, logger="egressd")
    await start_scripted_mx(nursery, port=port)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        replies = await transaction(client, ["rcpt@good.test"], BODY)
        assert replies[-1] == "250 2.0.0 scripted queued"
        assert (await client.command("QUIT")).startswith("221 ")
        assert await client.reply() == "EOF"
    [line] = [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.getMessage() == "connection" and getattr(r, "fields", {}).get("door") == "smtp"
    ]
    assert (line["bytes_up"], line["bytes_down"]) == (client.sent, client.received)
    assert client.sent > len(BODY) and client.received > 0


async def test_the_pool_comes_from_auth_then_sender_then_listener(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    text = config(port, dns=dns, extra='[smtp.sender_pools]\n"@special.test" = "other"\n')

    def submit(relay_port: int, sender: str, login: str | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            client.ehlo("mta.test")
            if login:
                client.login(login, "any password")
            client.sendmail(sender, ["rcpt@good.test"], BODY)

    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, text) as relay_port:
            await trio.to_thread.run_sync(submit, relay_port, "x@plain.test")
            await trio.to_thread.run_sync(submit, relay_port, "Y@Special.Test")
            await trio.to_thread.run_sync(submit, relay_port, "z@special.test", "main")
            messages = await sink.wait(3)
    assert [(m.mail_from, m.peer, m.ehlo) for m in messages] == [
        ("x@plain.test", "127.0.0.3", "out-a.test"),  # the listener's pool
        ("Y@Special.Test", "127.0.0.4", "out-b.test"),  # sender_pools by domain
        ("z@special.test", "127.0.0.3", "out-a.test"),  # AUTH beats sender_pools
    ]


async def test_auth_checks_the_password_when_users_are_configured(
    tmp_path: Path, port: int
) -> None:
    text = config(port, routes={"*": f"127.0.0.1:{port}"}, extra='[auth.users]\nother = "s3cret"\n')
    async with egressd(tmp_path, text) as relay_port, mta(relay_port) as client:
        assert await client.command("AUTH PLAIN AG90aGVyAHdyb25n") == (
            "535 5.7.8 Authentication credentials invalid"
        )  # \0other\0wrong
        assert (await client.command("AUTH PLAIN AG90aGVyAHMzY3JldA==")).startswith("235 ")


async def test_no_pool_is_a_451_4_3_5_with_the_reason(tmp_path: Path, port: int) -> None:
    text = config(port, routes={"*": f"127.0.0.1:{port}"}, listener_pool=None)
    async with egressd(tmp_path, text) as relay_port, mta(relay_port) as client:
        reply = await client.command("MAIL FROM:<nobody@sender.test>")
    assert reply.startswith("451 4.3.5 no pool for sender <nobody@sender.test>")


async def test_greeting_and_ehlo_name_egressd_and_its_extensions(tmp_path: Path, port: int) -> None:
    text = config(
        port, routes={"*": f"127.0.0.1:{port}"}, extra="[smtp]\nmax_message_size = 1000\n"
    )
    async with egressd(tmp_path, text) as relay_port, mta(relay_port, ehlo=False) as client:
        ehlo = await client.command("EHLO mta.test")
    keywords = {line[4:].split(" ")[0] for line in ehlo.splitlines()[1:]}
    assert ehlo.splitlines()[0].startswith("250-relay.test")
    assert "250-SIZE 1000" in ehlo.splitlines()
    assert keywords >= {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "AUTH"}
    assert "STARTTLS" not in keywords  # no certificate configured


async def test_esmtp_parameters_pass_when_the_remote_supports_them(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    dsn = await start_scripted_mx(
        nursery, port=port, extensions=("SIZE 100000", "8BITMIME", "SMTPUTF8", "DSN")
    )
    plain = await start_scripted_mx(nursery, host="127.0.0.2", port=port, extensions=("SIZE",))
    routes = {"dsn.test": f"127.0.0.1:{port}", "plain.test": f"127.0.0.2:{port}"}
    async with egressd(tmp_path, config(port, routes=routes)) as relay_port:
        for domain in ("dsn.test", "plain.test"):
            async with mta(relay_port) as client:
                assert (
                    await client.command(
                        "MAIL FROM:<a@sender.test> SIZE=300 RET=HDRS ENVID=QQ314159"
                    )
                ).startswith("250")
                reply = await client.command(
                    f"RCPT TO:<r@{domain}> NOTIFY=FAILURE ORCPT=rfc822;r@{domain}"
                )
                assert reply.startswith("250")
    assert dsn.commands()[1:] == [
        "MAIL FROM:<a@sender.test> SIZE=300 RET=HDRS ENVID=QQ314159",
        "RCPT TO:<r@dsn.test> NOTIFY=FAILURE ORCPT=rfc822;r@dsn.test",
    ]
    assert plain.commands()[1:] == ["MAIL FROM:<a@sender.test> SIZE=300", "RCPT TO:<r@plain.test>"]


# --------------------------------------------------------------------------- routing


async def test_a_recipient_with_another_next_hop_is_told_452_4_5_3(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, config(port, dns=dns)) as relay_port:
            async with mta(relay_port) as client:
                replies = await transaction(
                    client, ["one@good.test", "two@alias.test", "three@other.test"]
                )
            [message] = await sink.wait(1)
    assert replies[1].startswith("250")
    assert replies[2].startswith("250")  # another MX name, but the same address
    assert replies[3].startswith("452 4.5.3 other.test has another next hop")
    assert message.rcpt_tos == ("one@good.test", "two@alias.test")


async def test_the_next_mx_is_tried_when_the_first_is_unreachable(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, config(port, dns=dns)) as relay_port:
            async with mta(relay_port) as client:
                replies = await transaction(client, ["rcpt@fallback.test"])
            await sink.wait(1)
    assert replies[-1].startswith("250 2.0.0 sink queued")


async def test_every_mx_unreachable_is_a_4xx_naming_source_addresses_and_error(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    async with egressd(tmp_path, config(port, dns=dns)) as relay_port, mta(relay_port) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        reply = await client.command("RCPT TO:<rcpt@dead.test>")
    assert reply.startswith('451 4.4.1 source "a" (127.0.0.3): no mail server of dead.test')
    assert f"mx1.dead.test[127.0.0.9]:{port}" in reply
    assert f"mx2.dead.test[127.0.0.10]:{port}" in reply
    assert "refused" in reply.lower()


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("nowhere.test", "550 5.1.2 domain nowhere.test does not exist (NXDOMAIN)"),
        ("nullmx.test", "556 5.1.10 nullmx.test accepts no mail"),
        ("example.org", "451 4.4.3 DNS lookup of the MX of example.org failed"),
    ],
)
async def test_dns_failures_and_null_mx_get_their_reply(
    tmp_path: Path, dns: Dnsmasq, port: int, domain: str, expected: str
) -> None:
    async with egressd(tmp_path, config(port, dns=dns)) as relay_port, mta(relay_port) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        reply = await client.command(f"RCPT TO:<rcpt@{domain}>")
    assert reply.startswith(expected)


async def test_an_mx_in_deny_destinations_is_not_dialed(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    text = config(port, dns=dns).replace(
        "deny_destinations = []", 'deny_destinations = ["127.0.0.1/32"]'
    )
    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, text) as relay_port, mta(relay_port) as client:
            await client.command("MAIL FROM:<a@sender.test>")
            reply = await client.command("RCPT TO:<rcpt@good.test>")
        assert sink.connections == []
    assert reply.startswith("451 4.4.4 every address of the next hop of good.test")


# --------------------------------------------------------------------------- pass-through


@pytest.mark.parametrize("code", ["451 4.7.1 greylisted, come back later", "550 5.7.1 no thanks"])
@pytest.mark.parametrize("step", ["mail", "rcpt", "data", "dot"])
async def test_remote_refusals_reach_the_mta_unchanged(
    tmp_path: Path, nursery: trio.Nursery, port: int, step: str, code: str
) -> None:
    reply = code.replace("come back later", "come back later\nsecond line")  # multi-line too
    remote = await start_scripted_mx(nursery, {step: reply}, port=port)
    expected = "\n".join(
        f"{reply[:3]}{'-' if i == 0 and len(reply.splitlines()) > 1 else ' '}{line}"
        for i, line in enumerate(reply[4:].split("\n"))
    )
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        replies = await transaction(client, ["one@good.test", "two@good.test"])
    if step == "mail":  # each RCPT gets the MAIL refusal; DATA has no recipient
        assert replies[1:3] == [expected, expected]
        assert replies[3].startswith("503")
    elif step == "rcpt":
        assert replies[1:3] == [expected, expected]
    else:
        assert replies[-1] == expected
    if step != "dot":
        assert not any(s.got_final_dot for s in remote.sessions)


@pytest.mark.parametrize("step", ["banner", "ehlo", "mail", "rcpt", "data", "dot"])
async def test_a_remote_dropping_the_connection_is_a_4xx_naming_source_and_address(
    tmp_path: Path, nursery: trio.Nursery, port: int, step: str
) -> None:
    await start_scripted_mx(nursery, {step: DROP}, port=port)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        replies = await transaction(client, ["one@good.test"])
    failure = next(r for r in replies if not r.startswith(("250", "354")))
    assert failure.startswith("451 4.4.")
    assert 'source "a" (127.0.0.3)' in failure
    assert f"127.0.0.1]:{port}" in failure
    assert not any(r.startswith("250 2.0.0") for r in replies[-1:])


async def test_a_silent_remote_times_out_into_a_4xx(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    await start_scripted_mx(nursery, {"rcpt": HANG}, port=port)
    text = config(
        port, routes={"*": f"127.0.0.1:{port}"}, extra='[smtp.timeouts]\ncommand = "300ms"\n'
    )
    async with egressd(tmp_path, text) as relay, mta(relay) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        reply = await client.command("RCPT TO:<one@good.test>")
        assert reply.startswith('451 4.4.2 source "a" (127.0.0.3) to 127.0.0.1[127.0.0.1]')
        assert "no reply to MAIL FROM and RCPT TO within 0.3s" in reply  # pipelined
        assert (await client.command("DATA")).startswith("503")


async def test_the_mta_dropping_mid_data_delivers_nothing(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    async with egressd(tmp_path, routed(port)) as relay:
        async with mta(relay) as client:
            await client.command("MAIL FROM:<a@sender.test>")
            await client.command("RCPT TO:<one@good.test>")
            assert (await client.command("DATA")).startswith("354")
            await client.send(b"Subject: half\r\n\r\nthe first half\r\n")
        await remote.wait_closed()
    [session] = remote.sessions
    assert bytes(session.body).startswith(b"Subject: half")
    assert not session.got_final_dot


async def test_the_mta_dropping_mid_data_leaves_the_sink_empty(
    tmp_path: Path, dns: Dnsmasq, port: int
) -> None:
    with smtp_sink("127.0.0.1", port) as sink:
        async with egressd(tmp_path, config(port, dns=dns)) as relay:
            async with mta(relay) as client:
                await client.command("MAIL FROM:<a@sender.test>")
                await client.command("RCPT TO:<one@good.test>")
                await client.command("DATA")
                await client.send(b"Subject: half\r\n\r\n" + b"x" * 70000 + b"\r\n")
            # the same relay still works, and the first message never arrives
            async with mta(relay) as client:
                replies = await transaction(client, ["two@good.test"])
            messages = await sink.wait(1)
            await trio.sleep(0.2)
    assert replies[-1].startswith("250 2.0.0 sink queued")
    assert [m.rcpt_tos for m in sink.messages] == [("two@good.test",)]
    assert messages == sink.messages


async def test_an_mta_stalling_mid_data_is_cut_and_the_remote_gets_no_dot(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    door = SmtpDoor(data_timeout=0.3)
    async with egressd(tmp_path, routed(port), door) as relay, mta(relay) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        await client.command("RCPT TO:<one@good.test>")
        await client.command("DATA")
        await client.send(b"Subject: stall\r\n\r\nwaiting")
        assert (await client.reply()).startswith("421 4.4.2")
        await remote.wait_closed()
    assert not remote.sessions[0].got_final_dot


async def test_what_an_mta_sent_before_stalling_mid_data_is_at_the_remote(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    """The door batches a body's reads (one write to the remote for what arrived at
    once), but never holds what it has while it waits for the MTA."""
    remote = await start_scripted_mx(nursery, port=port)
    door = SmtpDoor(data_timeout=0.5)
    pieces = [b"Subject: pieces\r\n\r\n", b"one\r\n", b"two\r\n"]
    async with egressd(tmp_path, routed(port), door) as relay, mta(relay) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        await client.command("RCPT TO:<one@good.test>")
        await client.command("DATA")
        for piece in pieces:
            await client.send(piece)
            await trio.sleep(0.05)
        assert (await client.reply()).startswith("421 4.4.2")
        await remote.wait_closed()
    assert bytes(remote.sessions[0].body) == b"".join(pieces)
    assert not remote.sessions[0].got_final_dot


async def test_a_body_over_the_advertised_size_never_reaches_the_remote(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    text = routed(port, extra="[smtp]\nmax_message_size = 2000\n")
    async with egressd(tmp_path, text) as relay, mta(relay) as client:
        replies = await transaction(client, ["one@good.test"], BODY + b"x" * 3000 + b"\r\n")
        await remote.wait_closed()
    assert replies[-1] == "552 5.3.4 Message exceeds the maximum size of 2000 bytes"
    assert not remote.sessions[0].got_final_dot


async def test_an_ipv6_source_reaches_the_mx_over_ipv6(tmp_path: Path, dns: Dnsmasq) -> None:
    port = free_port("::1")
    text = config(port, dns=dns, listener_pool="six") + (
        f'[source."six"]\nsource_address = "::1"\nehlo_domain = "out-6.test"\n'
        f"remote_port = {port}\n"
        '[pool."six"."six"]\n'
    )
    with smtp_sink("::1", port) as sink:
        async with egressd(tmp_path, text) as relay, mta(relay) as client:
            replies = await transaction(client, ["rcpt@dual.test"])
        [message] = await sink.wait(1)
    assert replies[-1].startswith("250 2.0.0 sink queued")
    assert (message.peer, message.ehlo) == ("::1", "out-6.test")


async def test_a_bare_line_feed_aborts_the_remote_transaction(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        smuggled = b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x>\r\n"
        replies = await transaction(client, ["one@good.test"], smuggled)
        await remote.wait_closed()
    assert replies[-1].startswith("550 5.6.11")
    assert not any(s.got_final_dot for s in remote.sessions)
    assert "MAIL FROM:<evil@x>" not in remote.commands()


# --------------------------------------------------------------------------- sessions


async def test_transactions_of_a_session_reuse_the_connection_while_the_source_fits(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    text = config(
        port,
        routes={"*": f"127.0.0.1:{port}"},
        extra='[smtp.sender_pools]\n"b@sender.test" = "other"\n',
    )
    async with egressd(tmp_path, text) as relay, mta(relay) as client:
        for sender in ("a@sender.test", "a@sender.test", "b@sender.test"):
            assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
            assert (await client.command("RCPT TO:<r@good.test>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            await client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            assert (await client.reply()).startswith("250 2.0.0 scripted")
            assert (await client.command("RSET")).startswith("250")
    await remote.wait_closed(2)
    first, second = remote.sessions
    assert first.peer == "127.0.0.3"
    assert [c for c in first.commands if c.startswith("MAIL")] == ["MAIL FROM:<a@sender.test>"] * 2
    assert first.commands[-1] == "QUIT"
    assert second.peer == "127.0.0.4"


async def test_a_kept_connection_the_remote_closed_is_replaced_transparently(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, {"after_dot": DROP}, port=port)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        for _ in range(2):
            replies = await transaction(client, ["r@good.test"])
            assert replies[-1] == "250 2.0.0 scripted queued"
    assert len(remote.sessions) == 2
    assert all(s.got_final_dot for s in remote.sessions)


async def test_a_remote_421_closes_the_mta_session_with_it(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    await start_scripted_mx(nursery, {"rcpt": "421 4.3.2 remote going down"}, port=port)
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        assert await client.command("RCPT TO:<one@good.test>") == "421 4.3.2 remote going down"
        assert await client.reply() == "EOF"


async def test_drain_says_421_between_transactions_but_never_mid_data(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(nursery, port=port)
    text = routed(port)
    async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}) as daemon:
        relay = port_of(daemon, "smtp")
        async with mta(relay) as busy, mta(relay) as idle:
            await busy.command("MAIL FROM:<a@sender.test>")
            await busy.command("RCPT TO:<one@good.test>")
            assert (await busy.command("DATA")).startswith("354")
            await busy.send(b"Subject: during drain\r\n\r\nfirst half\r\n")
            daemon.runtime.begin_drain()
            assert await idle.reply() == "421 4.3.2 relay.test shutting down; try again later"
            await busy.send(b"second half\r\n.\r\n")
            assert (await busy.reply()).startswith("250 2.0.0 scripted")
            assert (await busy.command("MAIL FROM:<a@sender.test>")).startswith("421 4.3.2")
    assert remote.sessions[0].got_final_dot


# --------------------------------------------------------------------------- STARTTLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_to_a_sink_with_a_self_signed_certificate(
    tmp_path: Path, dns: Dnsmasq, port: int, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    context = server_tls_context(ca.issue_cert("mx.good.test"))
    with smtp_sink("127.0.0.1", port, tls_context=context) as sink:
        async with egressd(tmp_path, config(port, dns=dns)) as relay, mta(relay) as client:
            replies = await transaction(client, ["rcpt@good.test"])
        [message] = await sink.wait(1)
    assert replies[-1].startswith("250 2.0.0 sink queued")
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert message.ehlo == "out-a.test"
    assert transaction_logs(caplog)[0]["tls"] == message.tls_version


async def test_a_failed_handshake_falls_back_to_plaintext(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    remote = await start_scripted_mx(
        nursery, {"starttls": GARBAGE}, port=port, extensions=("STARTTLS", "8BITMIME")
    )
    async with egressd(tmp_path, routed(port)) as relay, mta(relay) as client:
        replies = await transaction(client, ["rcpt@good.test"])
    assert replies[-1] == "250 2.0.0 scripted queued"
    first, second = remote.sessions[:2]
    assert "STARTTLS" in first.commands
    assert "STARTTLS" not in second.commands
    assert second.got_final_dot


async def test_required_tls_refuses_a_remote_without_starttls(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    await start_scripted_mx(nursery, port=port)
    text = config(port, routes={"*": f"127.0.0.1:{port}"}, extra='[smtp.tls]\nmode = "required"\n')
    async with egressd(tmp_path, text) as relay, mta(relay) as client:
        await client.command("MAIL FROM:<a@sender.test>")
        reply = await client.command("RCPT TO:<one@good.test>")
    assert reply.startswith("451 4.4.1")
    assert "does not offer STARTTLS" in reply


async def test_verified_tls_checks_the_certificate_against_the_trust_store(
    tmp_path: Path, dns: Dnsmasq, port: int, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = config(port, dns=dns, extra="[smtp.tls]\nverify = true\n")
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    egress_tls.client_context.cache_clear()
    try:
        for name, ok in (("mx.good.test", True), ("wrong.test", False)):
            context = server_tls_context(ca.issue_cert(name))
            with smtp_sink("127.0.0.1", port, tls_context=context) as sink:
                async with egressd(tmp_path, text) as relay, mta(relay) as client:
                    replies = await transaction(client, ["rcpt@good.test"])
                assert replies[-1].startswith("250") == ok
                if not ok:
                    assert "certificate" in replies[1].lower()
                    assert sink.messages == []
    finally:
        egress_tls.client_context.cache_clear()


def starttls_config(tmp_path: Path, ca: trustme.CA, port: int) -> tuple[str, ssl.SSLContext]:
    """A configuration routing everything to 127.0.0.1:``port`` whose SMTP door offers
    STARTTLS with a certificate of ``ca`` for relay.test, and an MTA's context trusting it."""
    cert = ca.issue_cert("relay.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    text = config(
        port,
        routes={"*": f"127.0.0.1:{port}"},
        extra=f'[smtp.tls]\ncertificate = "{cert_path}"\nprivate_key = "{key_path}"\n',
    )
    client_context = ssl.create_default_context()
    client_context.check_hostname = False  # smtplib sends the IP literal as the server name
    ca.configure_trust(client_context)
    return text, client_context


async def test_the_mta_can_starttls_to_egressd(
    tmp_path: Path, port: int, ca: trustme.CA, nursery: trio.Nursery
) -> None:
    await start_scripted_mx(nursery, port=port)
    text, client_context = starttls_config(tmp_path, ca, port)

    def submit(relay_port: int) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
            client.ehlo("mta.test")
            assert client.has_extn("starttls")
            client.starttls(context=client_context)
            client.ehlo("mta.test")
            refused: dict[str, Any] = client.sendmail("a@sender.test", ["r@good.test"], BODY)
            return refused

    async with egressd(tmp_path, text) as relay_port:
        assert await trio.to_thread.run_sync(submit, relay_port) == {}


async def test_metrics_count_relayed_transactions_by_reply_class(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    metrics_port = free_port()
    remote = await start_scripted_mx(nursery, {"dot": "550 5.7.1 no thanks"}, port=port)
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    async with egressd(tmp_path, routed(port, extra=extra)) as relay:
        for _ in range(2):
            async with mta(relay) as client:
                replies = await transaction(client, ["rcpt@good.test"])
                assert replies[-1] == "550 5.7.1 no thanks"
        exposition = await scrape(metrics_port)
    assert len(remote.sessions) == 2
    name = "egressd_smtp_transactions_total"
    assert sample(exposition, name, pool="main", source="a", reply_class="5xx") == 2
    assert sample(exposition, name, pool="main", source="a", reply_class="2xx") in (None, 0)


async def test_an_unplumbed_source_is_retried_once_on_the_pools_next_source(
    tmp_path: Path, nursery: trio.Nursery, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    remote = await start_scripted_mx(nursery, port=port)
    extra = (
        '[source."gone"]\nsource_address = "203.0.113.7"\n'
        '[pool."mixed"."gone"]\nweight = 5\n[pool."mixed"."a"]\n'
        '[smtp.sender_pools]\n"@sender.test" = "mixed"\n'
    )
    async with egressd(tmp_path, routed(port, extra=extra)) as relay, mta(relay) as client:
        replies = await transaction(client, ["rcpt@good.test"])
    assert replies[-1] == "250 2.0.0 scripted queued"
    assert [s.peer for s in remote.sessions] == ["127.0.0.3"]
    retries = [r for r in caplog.records if r.getMessage() == "retrying on the pool's next source"]
    assert [dict(getattr(r, "fields", {})) for r in retries] == [
        {"pool": "mixed", "failed": "gone", "next": "a"}
    ]


async def test_a_remote_being_greeted_counts_once_against_its_source(
    tmp_path: Path, nursery: trio.Nursery, port: int
) -> None:
    """``max_connections_per_source = 2``: while one remote's greeting is still pending, a
    second connection from the same source opens. The greeting's attempt and the session
    it becomes hold one slot between them, not one each."""
    slow = await start_scripted_mx(nursery, {"banner": HANG}, host="127.0.0.6", port=port)
    await start_scripted_mx(nursery, port=port)
    routes = {"slow.test": f"127.0.0.6:{port}", "*": f"127.0.0.1:{port}"}
    text = config(port, routes=routes, extra="[limits]\nmax_connections_per_source = 2\n")
    async with egressd(tmp_path, text) as relay, mta(relay) as first, mta(relay) as second:
        assert (await first.command("MAIL FROM:<a@sender.test>")).startswith("250 ")
        await first.send(b"RCPT TO:<r@slow.test>\r\n")  # its remote never sends a banner
        with trio.fail_after(5):
            while not slow.sessions:
                await trio.sleep(0.01)
        replies = await transaction(second, ["r@good.test"])
    assert replies[1] == "250 2.1.5 recipient ok", replies
    assert replies[-1] == "250 2.0.0 scripted queued", replies
