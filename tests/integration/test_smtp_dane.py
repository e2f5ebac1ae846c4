"""DANE on the SMTP door end to end (RFC 7672), on loopback, with a real validating resolver.

One module-wide DNS (see ``dnssec_harness``): the zone ``dane.test`` is signed and its DS is
unbound's trust anchor; ``plain.test`` is not signed. The MX hosts resolve to two random
127/8 addresses where each test starts aiosmtpd sinks with STARTTLS (certificates from a
trustme CA); the TLSA records name the SPKI of the "good" certificate or of a stranger's.
egressd's source has ``remote_port`` set to the test's sink port; the TLSA names stay
``_25._tcp.<mx>``. Each test uses its own domains.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import smtplib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from daemon_helpers import port_of, running_daemon
from dnssec_harness import SignedDns, Zone, forwarding_dnsmasq, signed_dns
from harness import free_port
from service_harness import sample, scrape
from smtp_harness import SmtpSink, _SinkHandler, send_lockstep, server_tls_context, smtp_sink

from egressd.checks import dane_resolver_warnings
from egressd.config import load_config
from egressd.doors.smtp import SmtpDoor
from egressd.explain import command_explain
from egressd.tlspolicy.tlsa import selected

pytestmark = pytest.mark.integration

BODY = b"From: a@sender.test\r\nSubject: dane\r\n\r\nbody\r\n"


def _random_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


HOST_A = _random_loopback()
HOST_B = _random_loopback()
POLICY_HOST = _random_loopback()


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def tlsa_3_1_1(cert: trustme.LeafCert) -> str:
    leaf = der(cert.cert_chain_pems[0].bytes())
    return f"3 1 1 {hashlib.sha256(selected(leaf, 1)).hexdigest()}"


class World:
    """The module's CA, certificates and DNS."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        names = ["*.dane.test", "*.plain.test", "mx.ok.dane.test"]
        self.good = self.ca.issue_cert(*names)
        self.stranger = trustme.CA().issue_cert(*names)
        self.directory = directory
        self.dns: SignedDns | None = None

    def zones(self) -> list[Zone]:
        good, bad = tlsa_3_1_1(self.good), tlsa_3_1_1(self.stranger)
        signed = [
            *_mx_host("ok", "mx", HOST_A, f"TLSA {good}"),
            *_mx_host("bad", "mx", HOST_A, f"TLSA {bad}"),
            *_mx_host("two", "mx1", HOST_B, f"TLSA {bad}", preference=10),
            *_mx_host("two", "mx2", HOST_A, f"TLSA {good}", preference=20),
            *_mx_host("pkix", "mx", HOST_A, f"TLSA 1 1 1 {'00' * 32}"),
            *_mx_host("notls", "mx", HOST_A, f"TLSA {good}"),
            *_mx_host("none", "mx", HOST_A, None),
            *_mx_host("sts", "mx", HOST_A, f"TLSA {bad}"),  # the stranger's
            '_mta-sts.sts IN TXT "v=STSv1; id=1;"',
            f"mta-sts.sts IN A {POLICY_HOST}",
            *_mx_host("bogus", "mx1", HOST_B, None, preference=10),
            *_mx_host("bogus", "mx2", HOST_A, f"TLSA {good}", preference=20),
            *_mx_host("allbogus", "mx", HOST_A, None),
        ]
        bogus = [
            f"_25._tcp.mx1.bogus.dane.test. 300 IN TLSA {good}",
            f"_25._tcp.mx.allbogus.dane.test. 300 IN TLSA {good}",
        ]
        unsigned = _mx_host("", "mx", HOST_A, f"TLSA {bad}")
        return [
            Zone("dane.test", signed, bogus=bogus),
            Zone("plain.test", unsigned, signed=False),
        ]


def _mx_host(
    domain: str, host: str, address: str, tlsa: str | None, preference: int = 10
) -> list[str]:
    """Zone lines: ``domain`` (relative; "" is the apex) has MX ``host.domain`` at
    ``address``, with TLSA ``tlsa`` at ``_25._tcp.host.domain``."""
    owner = domain or "@"
    name = f"{host}.{domain}" if domain else host
    lines = [f"{owner} IN MX {preference} {name}", f"{name} IN A {address}"]
    if tlsa is not None:
        lines.append(f"_25._tcp.{name} IN {tlsa}")
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The CA, the certificates and the signed DNS, started once for the module."""
    world = World(tmp_path_factory.mktemp("dnssec"))
    with signed_dns(world.zones(), world.directory) as dns:
        world.dns = dns
        yield world


@pytest.fixture
def resolver(world: World) -> str:
    assert world.dns is not None
    return world.dns.validating


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.1")


def config(nameserver: str, remote_port: int, extra: str = "", tls: str = "dane = true") -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[dns]
nameservers = ["{nameserver}"]
timeout = "2s"
[dial]
timeout = "3s"
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.tls]
{tls}
[source."a"]
source_address = "127.0.0.3"
ehlo_domain = "out-a.test"
remote_port = {remote_port}
[pool."main"."a"]
{extra}"""


@asynccontextmanager
async def egressd(tmp_path: Path, text: str) -> AsyncIterator[int]:
    async with running_daemon(text, tmp_path, doors={"smtp": SmtpDoor()}) as daemon:
        yield port_of(daemon, "smtp")


@contextmanager
def tls_sink(host: str, port: int, cert: Any | None) -> Iterator[SmtpSink]:
    context = server_tls_context(cert) if cert is not None else None
    with smtp_sink(host, port, tls_context=context) as sink:
        yield sink


async def send(relay_port: int, rcpt: str) -> str:
    return await send_lockstep(relay_port, rcpt, BODY)


def logs(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "egressd.smtp" and r.getMessage() == "transaction"
    ]


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="egressd")


# --------------------------------------------------------------------------- DANE-EE


async def test_a_matching_dane_ee_record_delivers_and_is_logged_as_dane(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    metrics_port = free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    with tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port, extra)) as relay:
            reply = await send(relay, "rcpt@ok.dane.test")
            exposition = await scrape(metrics_port)
        [message] = await sink.wait(1)
    assert reply.startswith("250 ")
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    [line] = logs(caplog)
    assert (line["tls_policy"], line["tls_result"]) == ("dane", "verified")
    assert sample(exposition, "egressd_smtp_tls_total", policy="dane", outcome="verified") == 1


async def test_a_mismatching_record_is_a_4xx_naming_the_mx_and_nothing_is_delivered(
    tmp_path: Path, world: World, resolver: str, port: int
) -> None:
    metrics_port = free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    with tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port, extra)) as relay:
            reply = await send(relay, "rcpt@bad.dane.test")
            exposition = await scrape(metrics_port)
        assert sink.messages == []
    assert reply.startswith("451 4.4.1 "), reply
    assert f"mx.bad.dane.test[{HOST_A}]:{port}" in reply
    assert "the certificate matches none of the DANE TLSA records" in reply
    assert "DANE TLSA records of _25._tcp.mx.bad.dane.test (3 1 1 " in reply
    assert sample(exposition, "egressd_smtp_tls_total", policy="dane", outcome="failed") == 1


async def test_a_mismatching_mx_is_passed_over_for_the_next_one(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """mx1 (preference 10) fails its TLSA records; mx2 (20) matches and gets the mail."""
    with tls_sink(HOST_B, port, world.good) as first, tls_sink(HOST_A, port, world.good) as second:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            reply = await send(relay, "rcpt@two.dane.test")
        await second.wait(1)
        assert first.messages == []
    assert reply.startswith("250 ")
    assert logs(caplog)[0]["mx"] == "mx2.two.dane.test"


async def test_unusable_records_still_require_tls_without_authentication(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """PKIX-EE(1) is unusable for SMTP (RFC 7672 section 3.1.3): any certificate, but TLS;
    a host without STARTTLS under valid TLSA records gets nothing (no plaintext)."""
    with tls_sink(HOST_A, port, world.stranger) as sink:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            reply = await send(relay, "rcpt@pkix.dane.test")
        await sink.wait(1)
    assert reply.startswith("250 ")
    [line] = logs(caplog)
    assert (line["tls_policy"], line["tls_result"]) == ("dane", "encrypted; no usable TLSA record")
    with tls_sink(HOST_A, port, None) as plain:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            refused = await send(relay, "rcpt@notls.dane.test")
        assert plain.messages == []
    assert refused.startswith("451 ") and "does not offer STARTTLS" in refused
    assert "mx.notls.dane.test" in refused


async def test_a_host_whose_tlsa_look_up_fails_is_skipped_never_used_without_dane(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """mx1.bogus.dane.test's TLSA records have no signature (the validating resolver says
    SERVFAIL): that host is not contacted at all, mx2 (DANE) gets the mail; with no other
    host the MTA gets a 4xx naming the look-up."""
    with tls_sink(HOST_B, port, world.good) as first, tls_sink(HOST_A, port, world.good) as ok:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            delivered = await send(relay, "rcpt@bogus.dane.test")
            refused = await send(relay, "rcpt@allbogus.dane.test")
        await ok.wait(1)
        assert first.connections == [] and len(ok.messages) == 1
    assert delivered.startswith("250 ")
    assert logs(caplog)[0]["mx"] == "mx2.bogus.dane.test"
    assert refused.startswith("451 4.4.3 "), refused
    assert "mx.allbogus.dane.test: DANE: the TLSA look-up of _25._tcp.mx.allbogus" in refused


# --------------------------------------------------------------------------- no DANE


async def test_no_dane_without_tlsa_records_or_in_an_unsigned_zone(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """plain.test is not signed: its (mismatching) TLSA record is ignored; none.dane.test
    is signed but has no TLSA record. Both go out as the default policy says."""
    with tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            unsigned = await send(relay, "rcpt@plain.test")
            no_tlsa = await send(relay, "rcpt@none.dane.test")
        await sink.wait(2)
    assert unsigned.startswith("250 ") and no_tlsa.startswith("250 ")
    assert [line["tls_policy"] for line in logs(caplog)] == ["opportunistic", "opportunistic"]


async def test_dane_is_off_unless_asked_for_and_an_override_asks_per_domain(
    tmp_path: Path, world: World, resolver: str, port: int
) -> None:
    with tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port, tls="")) as relay:
            assert (await send(relay, "rcpt@bad.dane.test")).startswith("250 ")
        overrides = '[smtp.tls.policy]\n"bad.dane.test" = "dane"\n'
        async with egressd(tmp_path, config(resolver, port, tls="", extra=overrides)) as relay:
            assert (await send(relay, "rcpt@bad.dane.test")).startswith("451 ")
        assert len(sink.messages) == 1


async def test_a_resolver_that_does_not_validate_means_no_dane(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Through dnsmasq (no AD bit), the mismatching TLSA record is not trusted."""
    with forwarding_dnsmasq(resolver) as plain, tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(plain, port)) as relay:
            reply = await send(relay, "rcpt@bad.dane.test")
        await sink.wait(1)
    assert reply.startswith("250 ")
    assert logs(caplog)[0]["tls_policy"] == "opportunistic"


# --------------------------------------------------------------------------- MTA-STS


async def serve_policy(stream: trio.SSLStream[trio.SocketStream], body: bytes) -> None:
    with trio.move_on_after(5):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)
        await stream.aclose()


async def test_dane_takes_precedence_over_an_mta_sts_policy(
    tmp_path: Path, world: World, resolver: str, port: int, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """sts.dane.test's MTA-STS policy (enforce) names another MX, and its MX's certificate
    is not from the CA egressd trusts; its TLSA records match that certificate: DANE
    applies and the mail goes (RFC 8461 section 2). Without DANE, MTA-STS refuses."""
    body = b"version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.test\r\nmax_age: 86400\r\n"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    world.ca.issue_cert("mta-sts.sts.dane.test").configure_cert(context)
    listeners = await trio.open_ssl_over_tcp_listeners(443, context, host=POLICY_HOST)
    handler = partial(serve_policy, body=body)
    nursery.start_soon(partial(trio.serve_listeners, handler, listeners))
    ca_file = tmp_path / "ca.pem"
    world.ca.cert_pem.write_to_path(str(ca_file))
    tls = f'dane = true\nca_file = "{ca_file}"'
    with tls_sink(HOST_A, port, world.stranger) as sink:
        async with egressd(tmp_path, config(resolver, port, tls=tls)) as relay:
            delivered = await send(relay, "rcpt@sts.dane.test")
        await sink.wait(1)
        tls = f'ca_file = "{ca_file}"'
        async with egressd(tmp_path, config(resolver, port, tls=tls)) as relay:
            refused = await send(relay, "rcpt@sts.dane.test")
        tls = f'dane = true\nca_file = "{ca_file}"'
        shown = await trio.to_thread.run_sync(
            explain, tmp_path, config(resolver, port, tls=tls), "sts.dane.test"
        )
    assert delivered.startswith("250 ")
    assert logs(caplog)[0]["tls_policy"] == "dane"
    assert refused.startswith("451 4.7.5 ") and "MTA-STS policy of sts.dane.test" in refused
    assert (
        "  MTA-STS: MTA-STS policy of sts.dane.test (enforce, mx: mx.elsewhere.test) "
        "[MTA-STS policy id 1 (fetched)]\n"
        "  DANE: DANE TLSA records of _25._tcp.mx.sts.dane.test (3 1 1 "
    ) in shown
    assert "  MX mx.sts.dane.test: dane\n" in shown


def explain(tmp_path: Path, text: str, domain: str) -> str:
    """What ``egressd explain DOMAIN`` prints (its TLS part and the rest)."""
    path = tmp_path / "egressd.toml"
    path.write_text(text)
    out = io.StringIO()
    assert command_explain(load_config(path), domain, None, out) == 0
    return out.getvalue()


def test_explain_shows_each_mx_hosts_dane_state_and_policy(tmp_path: Path, resolver: str) -> None:
    shown = explain(tmp_path, config(resolver, 25), "two.dane.test")
    assert "  [smtp.tls] mode = opportunistic, verify = false: opportunistic\n" in shown
    assert "  MTA-STS: none [no MTA-STS policy]\n" in shown
    assert "  DANE: DANE TLSA records of _25._tcp.mx1.two.dane.test (3 1 1 " in shown
    assert "  MX mx1.two.dane.test: dane\n  MX mx2.two.dane.test: dane\n" in shown
    unsigned = explain(tmp_path, config(resolver, 25), "plain.test")
    assert "  DANE: no DANE for mx.plain.test: the MX records of plain.test are not " in unsigned
    assert "  MX mx.plain.test: opportunistic\n" in unsigned
    pkix = explain(tmp_path, config(resolver, 25), "pkix.dane.test")
    assert "none usable, TLS required without authentication" in pkix
    off = explain(tmp_path, config(resolver, 25, tls=""), "ok.dane.test")
    assert "  DANE: off (" in off and "  MX mx.ok.dane.test: opportunistic\n" in off


# --------------------------------------------------------------------------- check


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "egressd.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "egressd", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def warnings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "egressd.toml"
    path.write_text(text)
    return list(dane_resolver_warnings(load_config(path)))


def test_check_warns_when_dane_is_on_and_the_resolver_does_not_validate(
    tmp_path: Path, resolver: str
) -> None:
    probe = 'dane = true\ndane_probe = "dane.test"'
    with forwarding_dnsmasq(resolver) as plain:
        warned = check(tmp_path, config(plain, 25, tls=probe))
    assert warned.returncode == 0, warned.stderr
    assert "egressd: warning: smtp.tls.dane: the resolver does not validate DNSSEC" in (
        warned.stderr
    )
    assert "no AD bit on the DNSKEY of dane.test" in warned.stderr
    assert warnings(tmp_path, config(resolver, 25, tls=probe)) == []
    override = '[smtp.tls.policy]\n"x.test" = "dane"\n'
    [unsigned] = warnings(tmp_path, config(resolver, 25, override, tls=""))
    assert "the DNSKEY look-up of . failed" in unsigned  # the root is not served here
    assert warnings(tmp_path, config("127.0.0.1:9", 25, tls="")) == []


# --------------------------------------------------------------------------- REQUIRETLS


class RequireTlsSmtp(SMTP):
    """aiosmtpd taking MAIL ... REQUIRETLS (it refuses unknown parameters otherwise); the
    raw option stays in the envelope's mail_options."""

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        found: dict[str, str | bool] | None = super()._getparams(params)
        if found is not None:
            found.pop("REQUIRETLS", None)
        return found


class RequireTlsHandler(_SinkHandler):
    """Offers REQUIRETLS after STARTTLS (RFC 8689: only over TLS)."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        if session.ssl is not None:
            responses.insert(len(responses) - 1, "250-REQUIRETLS")
        return responses


class RequireTlsController(Controller):
    def factory(self) -> SMTP:
        return RequireTlsSmtp(self.handler, **self.SMTP_kwargs)


@contextmanager
def requiretls_sink(host: str, port: int, cert: trustme.LeafCert) -> Iterator[SmtpSink]:
    sink = SmtpSink(host, port)
    controller = RequireTlsController(
        RequireTlsHandler(sink, {}),
        hostname=host,
        port=port,
        server_hostname="sink.test",
        tls_context=server_tls_context(cert),
        require_starttls=False,
    )
    controller.start()
    try:
        sink.connections.clear()
        yield sink
    finally:
        controller.stop()


def send_requiretls(port: int, rcpt: str, ca_file: Path) -> tuple[bool, bool, str]:
    """An MTA's message with REQUIRETLS (smtplib, STARTTLS to egressd): whether egressd
    offered REQUIRETLS before and after STARTTLS, and the reply (RCPT's when refused)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("mta.test")
        before = client.has_extn("requiretls")
        client.starttls(context=context)
        client.ehlo("mta.test")
        after = client.has_extn("requiretls")
        try:
            client.sendmail("a@sender.test", [rcpt], BODY, mail_options=["REQUIRETLS"])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            return before, after, f"{code} {text.decode()}"
    return before, after, "250"


@pytest.fixture
def relay_tls(tmp_path: Path, world: World) -> str:
    """``[smtp.tls]`` lines: egressd's own certificate (for 127.0.0.1) and DANE on."""
    cert = world.ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    world.ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return (
        f'dane = true\ncertificate = "{tmp_path / "relay.pem"}"\n'
        f'private_key = "{tmp_path / "relay.key"}"'
    )


async def test_requiretls_is_carried_over_dane_to_a_remote_that_offers_it(
    tmp_path: Path, world: World, resolver: str, port: int, relay_tls: str
) -> None:
    with requiretls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port, tls=relay_tls)) as relay:
            before, after, reply = await trio.to_thread.run_sync(
                send_requiretls, relay, "rcpt@ok.dane.test", tmp_path / "ca.pem"
            )
        [message] = await sink.wait(1)
    assert (before, after, reply) == (False, True, "250")
    assert "REQUIRETLS" in message.mail_options


async def test_requiretls_is_refused_where_tls_is_only_opportunistic_or_not_offered(
    tmp_path: Path, world: World, resolver: str, port: int, relay_tls: str
) -> None:
    """plain.test has no DANE (unsigned) and no MTA-STS: only opportunistic TLS, so
    ``550 5.7.30`` and nothing sent; ok.dane.test's MX does not offer REQUIRETLS: the same."""
    with requiretls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port, tls=relay_tls)) as relay:
            _, _, opportunistic = await trio.to_thread.run_sync(
                send_requiretls, relay, "rcpt@plain.test", tmp_path / "ca.pem"
            )
        assert sink.messages == []
    with tls_sink(HOST_A, port, world.good) as plain_sink:
        async with egressd(tmp_path, config(resolver, port, tls=relay_tls)) as relay:
            _, _, not_offered = await trio.to_thread.run_sync(
                send_requiretls, relay, "rcpt@ok.dane.test", tmp_path / "ca.pem"
            )
        assert plain_sink.messages == []
    assert opportunistic.startswith("550 5.7.30 "), opportunistic
    assert "REQUIRETLS cannot be honoured for plain.test" in opportunistic
    assert "this host has opportunistic TLS (encrypted)" in opportunistic
    assert not_offered.startswith("550 5.7.30 ")
    assert f"mx.ok.dane.test[{HOST_A}]:{port}: REQUIRETLS is not offered" in not_offered


# --------------------------------------------------------------------------- shared MX hosts


def send_two(port: int, first: list[str], second: list[str]) -> list[dict[str, tuple[int, bytes]]]:
    """Two transactions in one MTA session (smtplib): the refused recipients of each."""
    refused = []
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        for rcpts in (first, second):
            try:
                refused.append(client.sendmail("a@sender.test", rcpts, BODY))
            except smtplib.SMTPRecipientsRefused as exc:
                refused.append(exc.recipients)
    return refused


async def test_a_connection_opened_for_one_domain_carries_another_only_under_its_policy(
    tmp_path: Path, world: World, resolver: str, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """plain.test and bad.dane.test have their MX on the same address. A connection made
    for plain.test (opportunistic) must not carry bad.dane.test's mail, whose DANE
    records the certificate does not match: neither in the same transaction (452, the MTA
    sends it again on its own) nor in the next one on the kept connection (a new
    connection under DANE, which fails)."""
    with tls_sink(HOST_A, port, world.good) as sink:
        async with egressd(tmp_path, config(resolver, port)) as relay:
            same_tx, next_tx = await trio.to_thread.run_sync(
                send_two, relay, ["a@plain.test", "b@bad.dane.test"], ["c@plain.test"]
            )
            [_, kept] = await trio.to_thread.run_sync(
                send_two, relay, ["d@plain.test"], ["e@bad.dane.test"]
            )
        await sink.wait(3)
        delivered = [r for m in sink.messages for r in m.rcpt_tos]
    assert delivered == ["a@plain.test", "c@plain.test", "d@plain.test"]
    code, text = same_tx["b@bad.dane.test"]
    assert code == 452, text
    assert next_tx == {}
    code, text = kept["e@bad.dane.test"]
    assert code == 451 and b"matches none of the DANE TLSA records" in text, text
