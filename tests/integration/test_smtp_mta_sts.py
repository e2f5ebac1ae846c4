"""MTA-STS on the SMTP door end to end (RFC 8461), on loopback.

dnsmasq serves each domain's MX, its ``_mta-sts`` TXT record and ``mta-sts.<domain>``; a
trio HTTPS server with a trustme certificate serves the policies on port 443 of a random
127/8 address (so parallel runs do not collide); an aiosmtpd sink with STARTTLS and a
certificate from the same CA stands in for every MX. egressd trusts the CA only through
``[smtp.tls] ca_file``. Each test uses its own domains: the policy cache lives for the
process.
"""

from __future__ import annotations

import logging
import random
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from daemon_helpers import port_of, running_daemon
from harness import free_port
from service_harness import sample, scrape
from smtp_harness import (
    Dnsmasq,
    SmtpSink,
    dnsmasq,
    send_lockstep,
    server_tls_context,
    smtp_sink,
)

from egressd.config import load_config
from egressd.doors.smtp import SmtpDoor
from egressd.net import mtasts
from egressd.state import StsPolicy, open_store
from egressd.tlspolicy import CachedPolicy, MemoryPolicyStore, parse_policy

pytestmark = pytest.mark.integration

BODY = b"From: a@sender.test\r\nSubject: sts\r\n\r\nbody\r\n"
POLICY_HOST = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
MX_NAMES = [
    "mx.sts-ok.test",
    "mx.elsewhere.test",
    "mx.sts-change.test",
    "mx.sts-nocache.test",
    "mx7.sts-wild.test",
    "mx.sts-testing.test",
    "mx.sts-badcert.test",
    "mx.sts-restart.test",
    "mx.sts-refresh.test",
    "mx.sts-share.test",
]


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


@dataclass
class PolicyServer:
    """``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for every domain in ``policies``
    (domain -> (status, body)); ``fetches`` counts the requests per domain."""

    policies: dict[str, tuple[int, str]] = field(default_factory=dict)
    fetches: dict[str, int] = field(default_factory=dict)

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
        headers = request.decode().split("\r\n")
        path = headers[0].split(" ")[1]
        host = next(h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("host:"))
        domain = host.removeprefix("mta-sts.")
        self.fetches[domain] = self.fetches.get(domain, 0) + 1
        status, body = self.policies.get(domain, (404, "no policy"))
        if path != "/.well-known/mta-sts.txt":
            status, body = 404, "wrong path"
        data = body.encode()
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + data)
        await stream.aclose()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def policies(nursery: trio.Nursery, ca: trustme.CA) -> PolicyServer:
    """The policy server on POLICY_HOST:443, for every domain's ``mta-sts`` name."""
    server = PolicyServer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    names = [f"mta-sts.{name.split('.', 1)[1]}" for name in MX_NAMES]
    names += ["mta-sts.sts-badmx.test", "mta-sts.sts-testing.test"]
    ca.issue_cert(*names).configure_cert(context)
    listeners = await trio.open_ssl_over_tcp_listeners(443, context, host=POLICY_HOST)
    nursery.start_soon(partial(trio.serve_listeners, server.handle, listeners))
    return server


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.1")


@contextmanager
def sts_dns(
    mx: list[tuple[str, str]], ids: Mapping[str, str], port: int | None = None
) -> Iterator[Dnsmasq]:
    """dnsmasq: ``mx`` (domain, exchange) -> 127.0.0.1, ``ids`` (domain -> TXT id), and
    ``mta-sts.<domain>`` -> the policy server for every domain."""
    domains = {domain for domain, _ in mx} | set(ids)
    hosts = {exchange: ["127.0.0.1"] for _, exchange in mx}
    hosts |= {f"mta-sts.{domain}": [POLICY_HOST] for domain in domains}
    txt = {f"_mta-sts.{domain}": f"v=STSv1; id={i};" for domain, i in ids.items()}
    with dnsmasq(mx=[(d, e, 10) for d, e in mx], hosts=hosts, txt=txt, port=port) as server:
        yield server


def config(dns: Dnsmasq, remote_port: int, ca_file: Path, extra: str = "") -> str:
    return f"""
hostname = "relay.test"
[access]
deny_destinations = []
[dns]
nameservers = ["{dns.nameserver}"]
timeout = "2s"
[dial]
timeout = "3s"
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.tls]
ca_file = "{ca_file}"
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
def tls_sink(port: int, cert: Any) -> Iterator[SmtpSink]:
    with smtp_sink("127.0.0.1", port, tls_context=server_tls_context(cert)) as sink:
        yield sink


async def send(relay_port: int, rcpt: str) -> str:
    return await send_lockstep(relay_port, rcpt, BODY)


def logs(caplog: pytest.LogCaptureFixture, message: str = "transaction") -> list[dict[str, Any]]:
    return [
        dict(getattr(r, "fields", {}))
        for r in caplog.records
        if r.name == "egressd.smtp" and r.getMessage() == message
    ]


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="egressd")


# --------------------------------------------------------------------------- enforce


async def test_enforce_delivers_over_verified_tls_to_a_matching_mx(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    policies.policies["sts-ok.test"] = (200, policy("enforce", "mx.sts-ok.test"))
    with (
        sts_dns([("sts-ok.test", "mx.sts-ok.test")], {"sts-ok.test": "1"}) as dns,
        tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
            reply = await send(relay, "rcpt@sts-ok.test")
        [message] = await sink.wait(1)
    assert reply.startswith("250 ")
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    [line] = logs(caplog)
    assert (line["tls_policy"], line["tls_result"]) == ("mta-sts enforce", "verified")
    assert policies.fetches == {"sts-ok.test": 1}


async def test_enforce_refuses_an_mx_the_policy_does_not_name(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int
) -> None:
    policies.policies["sts-badmx.test"] = (200, policy("enforce", "mx.sts-badmx.test"))
    metrics_port = free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    with (
        sts_dns([("sts-badmx.test", "mx.elsewhere.test")], {"sts-badmx.test": "1"}) as dns,
        tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file, extra)) as relay:
            reply = await send(relay, "rcpt@sts-badmx.test")
            exposition = await scrape(metrics_port)
            failed = sample(
                exposition, "egressd_smtp_tls_total", policy="mta-sts enforce", outcome="failed"
            )
            assert failed == 1
        assert sink.messages == [] and sink.connections == []
    assert reply.startswith("451 4.7.5 ")
    assert "mx.elsewhere.test" in reply
    assert "MTA-STS policy of sts-badmx.test (enforce, mx: mx.sts-badmx.test)" in reply


async def test_enforce_refuses_an_mx_whose_certificate_does_not_verify(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int
) -> None:
    policies.policies["sts-badcert.test"] = (200, policy("enforce", "mx.sts-badcert.test"))
    stranger = trustme.CA().issue_cert("mx.sts-badcert.test")
    with (
        sts_dns([("sts-badcert.test", "mx.sts-badcert.test")], {"sts-badcert.test": "1"}) as dns,
        tls_sink(port, stranger) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
            reply = await send(relay, "rcpt@sts-badcert.test")
        assert sink.messages == []
    assert reply.startswith("451 4.4.1 ")
    assert "CERTIFICATE_VERIFY_FAILED" in reply
    assert "required by the MTA-STS policy of sts-badcert.test (enforce" in reply


async def test_a_wildcard_pattern_allows_one_label(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    policies.policies["sts-wild.test"] = (200, policy("enforce", "*.sts-wild.test"))
    with (
        sts_dns([("sts-wild.test", "mx7.sts-wild.test")], {"sts-wild.test": "1"}) as dns,
        tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
            reply = await send(relay, "rcpt@sts-wild.test")
        await sink.wait(1)
    assert reply.startswith("250 ")
    assert logs(caplog)[0]["tls_policy"] == "mta-sts enforce"


# --------------------------------------------------------------------------- testing


async def test_testing_mode_delivers_and_logs_what_enforce_would_refuse(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    policies.policies["sts-testing.test"] = (200, policy("testing", "mx.sts-testing.test"))
    metrics_port = free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    with (
        sts_dns([("sts-testing.test", "mx.elsewhere.test")], {"sts-testing.test": "1"}) as dns,
        tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file, extra)) as relay:
            reply = await send(relay, "rcpt@sts-testing.test")
            exposition = await scrape(metrics_port)
        await sink.wait(1)
    assert reply.startswith("250 ")
    name = "egressd_smtp_tls_total"
    assert sample(exposition, name, policy="mta-sts testing", outcome="testing_failure") == 1
    [line] = logs(caplog)
    assert line["tls_policy"] == "mta-sts testing"
    assert line["tls_result"].startswith("verified; testing failure: MX mx.elsewhere.test not in")
    [warning] = logs(caplog, "mta-sts testing failure")
    assert warning["domain"] == "sts-testing.test"


# --------------------------------------------------------------------------- the cache


async def test_the_cache_refreshes_on_a_new_id_and_survives_a_failed_fetch(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    domain, mx = "sts-change.test", [("sts-change.test", "mx.sts-change.test")]
    policies.policies[domain] = (200, policy("enforce", "mx.sts-change.test"))
    with tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink:
        with sts_dns(mx, {domain: "1"}) as dns:
            dns_port = dns.port
            async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
                assert (await send(relay, f"a@{domain}")).startswith("250 ")
                assert (await send(relay, f"b@{domain}")).startswith("250 ")
        assert policies.fetches[domain] == 1  # the second used the cached policy
        # A new id: fetched again before max_age is over; the new policy names another MX.
        policies.policies[domain] = (200, policy("enforce", "mx.moved.test"))
        with sts_dns(mx, {domain: "2"}, port=dns_port) as dns:
            async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
                refused = await send(relay, f"c@{domain}")
        assert policies.fetches[domain] == 2
        assert refused.startswith("451 4.7.5 ") and "mx: mx.moved.test" in refused
        # Another id, and the fetch fails: the cached policy (id 2) still applies.
        policies.policies[domain] = (500, "oops")
        with sts_dns(mx, {domain: "3"}, port=dns_port) as dns:
            async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
                still = await send(relay, f"d@{domain}")
        assert policies.fetches[domain] == 3
        assert still.startswith("451 4.7.5 ") and "mx: mx.moved.test" in still
        assert len(sink.messages) == 2


async def test_a_failed_fetch_without_a_cached_policy_delivers_as_before(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    policies.policies["sts-nocache.test"] = (500, "oops")
    mx = [("sts-nocache.test", "mx.sts-nocache.test")]
    with (
        sts_dns(mx, {"sts-nocache.test": "1"}) as dns,
        tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink,
    ):
        async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
            reply = await send(relay, "rcpt@sts-nocache.test")
        await sink.wait(1)
    assert reply.startswith("250 ")
    assert logs(caplog)[0]["tls_policy"] == "opportunistic"
    [warning] = logs(caplog, "mta-sts")
    assert "HTTP 500" in warning["note"] and "no cached policy" in warning["note"]
    assert policies.fetches == {"sts-nocache.test": 1}


# --------------------------------------------------------------------------- [smtp.tls.policy]


async def test_a_per_destination_override_wins_over_mta_sts(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """``none`` for a domain whose MTA-STS policy would refuse its MX: delivered in
    plaintext, no policy fetched; ``verify`` for a domain without MTA-STS: a certificate
    from an unknown CA is refused."""
    policies.policies["sts-override.test"] = (200, policy("enforce", "mx.nowhere.test"))
    mx = [("sts-override.test", "mx.sts-ok.test"), ("plain-verify.test", "mx.sts-ok.test")]
    extra = '[smtp.tls.policy]\n"STS-Override.test" = "none"\n"plain-verify.test" = "verify"\n'
    stranger = trustme.CA().issue_cert(*MX_NAMES)
    with sts_dns(mx, {"sts-override.test": "1"}) as dns, tls_sink(port, stranger) as sink:
        async with egressd(tmp_path, config(dns, port, ca_file, extra)) as relay:
            delivered = await send(relay, "rcpt@sts-override.test")
            refused = await send(relay, "rcpt@plain-verify.test")
        [message] = await sink.wait(1)
    assert delivered.startswith("250 ") and message.tls_version is None
    assert logs(caplog)[0]["tls_policy"] == "none"
    assert "sts-override.test" not in policies.fetches
    assert refused.startswith("451 4.4.1 ") and "CERTIFICATE_VERIFY_FAILED" in refused


# --------------------------------------------------------------------------- persistence


async def test_the_cache_survives_a_restart_in_the_state_store(
    tmp_path: Path, policies: PolicyServer, ca: trustme.CA, ca_file: Path, port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With a state store (a warming source), a fetched policy is written with the flush;
    a new process (a fresh in-memory cache) gets it back and applies it without fetching,
    while the policy server fails. Without the store it would have no policy and deliver."""
    domain, mx = "sts-restart.test", [("sts-restart.test", "mx.sts-restart.test")]
    policies.policies[domain] = (200, policy("enforce", "mx.moved.test"))
    state = f"""[state]
directory = "{tmp_path / "state"}"
[warmup]
flush_interval = "0.2s"
[warmup.plan.test]
days = [1000]
"""
    with sts_dns(mx, {domain: "1"}) as dns, tls_sink(port, ca.issue_cert(*MX_NAMES)) as sink:
        text = config(dns, port, ca_file, state).replace(
            'ehlo_domain = "out-a.test"\n', 'ehlo_domain = "out-a.test"\nwarmup = "test"\n'
        )
        monkeypatch.setattr(mtasts, "DEFAULT_STORE", MemoryPolicyStore())
        async with egressd(tmp_path, text) as relay:
            first = await send(relay, f"a@{domain}")
            await stored_policy(tmp_path / "state", domain)  # the next flush wrote it
        monkeypatch.setattr(mtasts, "DEFAULT_STORE", MemoryPolicyStore())  # a new process
        policies.policies[domain] = (500, "oops")
        async with egressd(tmp_path, text) as relay:
            again = await send(relay, f"b@{domain}")
        assert sink.messages == []
    assert first.startswith("451 4.7.5 ") and "mx: mx.moved.test" in first
    assert again.startswith("451 4.7.5 ") and "mx: mx.moved.test" in again
    assert policies.fetches[domain] == 1  # same id, restored and fresh: not fetched again


async def stored_policy(directory: Path, domain: str) -> StsPolicy:
    """The state store's record of ``domain``'s policy, once a flush has written it."""
    with trio.fail_after(5):
        while True:
            store = open_store(directory)
            try:
                found = [p for p in store.load("0000-00-00", time.time()).mta_sts]
            finally:
                store.close()
            if any(p.domain == domain for p in found):
                return next(p for p in found if p.domain == domain)
            await trio.sleep(0.05)


async def test_a_refresh_fetches_the_policy_again_under_the_same_id(
    tmp_path: Path, policies: PolicyServer, ca_file: Path, port: int
) -> None:
    """What the background refresher does for a policy due (RFC 8461 section 3.3): fetch
    again although the id did not change, and cache it anew; without a TXT record, leave
    the policy to expire."""
    domain = "sts-refresh.test"
    policies.policies[domain] = (200, policy("testing", "mx.sts-refresh.test", max_age=600))
    store = MemoryPolicyStore()
    old = CachedPolicy(parse_policy(policy("enforce", "mx.old.test")), "7", time.time() - 80000)
    store.put(domain, old)
    with sts_dns([(domain, "mx.sts-refresh.test")], {domain: "7"}) as dns:
        (tmp_path / "egressd.toml").write_text(config(dns, port, ca_file))
        loaded = load_config(tmp_path / "egressd.toml")
        note = await mtasts.refresh_policy(domain, loaded, store)
        gone = await mtasts.refresh_policy("sts-none.test", loaded, store)
    assert note == "refreshed, id 7"
    entry = store.get(domain)
    assert entry is not None and entry.policy.mode == "testing" and entry.policy_id == "7"
    assert entry.fetched_at > old.fetched_at
    assert "left to expire" in gone
    assert policies.fetches == {domain: 1}


async def test_a_kept_connection_does_not_carry_mail_its_mta_sts_policy_would_refuse(
    tmp_path: Path, policies: PolicyServer, ca_file: Path, port: int
) -> None:
    """plain-share.test (no policy) and sts-share.test (enforce) share an MX whose
    certificate is from an unknown CA. The connection opened for plain-share.test
    (opportunistic: encrypted, not verified) is not reused for sts-share.test, in the same
    transaction (452) or the next (a new connection under the policy: refused)."""
    mx = [("plain-share.test", "mx.sts-share.test"), ("sts-share.test", "mx.sts-share.test")]
    policies.policies["sts-share.test"] = (200, policy("enforce", "mx.sts-share.test"))
    stranger = trustme.CA().issue_cert("mx.sts-share.test")
    with sts_dns(mx, {"sts-share.test": "1"}) as dns, tls_sink(port, stranger) as sink:
        async with egressd(tmp_path, config(dns, port, ca_file)) as relay:
            same_tx, kept = await trio.to_thread.run_sync(
                send_two, relay, ["a@plain-share.test", "b@sts-share.test"], ["c@sts-share.test"]
            )
        await sink.wait(1)
        assert [r for m in sink.messages for r in m.rcpt_tos] == ["a@plain-share.test"]
    assert same_tx["b@sts-share.test"][0] == 452
    code, text = kept["c@sts-share.test"]
    assert code == 451 and b"CERTIFICATE_VERIFY_FAILED" in text, text


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
