"""``egressd probe --mx/--a DOMAIN``: the mail hosts as the SMTP door finds them, each
dialed as a front door would, with ``[access]`` applied unless ``--ignore-access``.

dnsmasq on loopback serves ``mail.test`` (MX 10 mx1.test -> 127.0.0.1, MX 20 mx2.test ->
127.0.0.9 where nothing listens) and ``direct.test`` (A 127.0.0.1). The mail server is an
aiosmtpd sink offering STARTTLS with a trustme certificate for mx1.test; sources send to its
port through ``remote_port``. The probe runs as a real process, as an operator runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from smtp_harness import Dnsmasq, SmtpSink, dnsmasq, server_tls_context, smtp_sink

pytestmark = pytest.mark.integration


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mx(ca: trustme.CA) -> Iterator[SmtpSink]:
    cert = ca.issue_cert("mx1.test", common_name="mx1.test")
    with smtp_sink(tls_context=server_tls_context(cert)) as sink:
        yield sink


@pytest.fixture
def dns() -> Iterator[Dnsmasq]:
    with dnsmasq(
        mx=[("mail.test", "mx1.test", 10), ("mail.test", "mx2.test", 20)],
        hosts={"mx1.test": ["127.0.0.1"], "mx2.test": ["127.0.0.9"], "direct.test": ["127.0.0.1"]},
    ) as server:
        yield server


def write_config(
    tmp_path: Path, dns: Dnsmasq, mx: SmtpSink, *, access: str = "", ca_file: str = ""
) -> str:
    path = tmp_path / "egressd.toml"
    path.write_text(
        f"""
hostname = "relay.test"
[source.a]
source_address = "127.0.0.2"
ehlo_domain = "out-a.test"
remote_port = {mx.port}
[pool.p.a]

[dns]
nameservers = ["{dns.nameserver}"]
[dial]
timeout = "5s"
[access]
{access}
[smtp.tls]
{ca_file}
"""
    )
    return str(path)


async def probe(*args: str) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(60):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [sys.executable, "-m", "egressd", "probe", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def test_access_rules_refuse_the_mx_and_name_the_rule(
    tmp_path: Path, dns: Dnsmasq, mx: SmtpSink
) -> None:
    path = write_config(tmp_path, dns, mx)  # the default [access]: loopback is denied
    done = await probe("-c", path, "--source", "a", "--mx", "mail.test", "--json")
    assert done.returncode == 1
    hosts = json.loads(done.stdout)["hosts"]
    assert [(h["mx"], h["kind"]) for h in hosts] == [("mx1.test", "denied"), ("mx2.test", "denied")]
    assert "in access.deny_destinations (127.0.0.0/8)" in hosts[0]["error"]
    assert "in access.deny_destinations (127.0.0.0/8)" in done.stderr
    assert mx.connections == []


async def test_each_mx_is_dialed_with_its_ehlo_reply_and_verified_starttls(
    tmp_path: Path, dns: Dnsmasq, mx: SmtpSink, ca: trustme.CA
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    access = "destination_ports = [25]\ndeny_destinations = []"  # 25: the MX's port
    path = write_config(tmp_path, dns, mx, access=access, ca_file=f'ca_file = "{tmp_path}/ca.pem"')
    done = await probe("-c", path, "--pool", "p", "--mx", "mail.test", "--json")
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout)["hosts"]
    assert (first["mx"], first["preference"], first["source"]) == ("mx1.test", 10, "a")
    assert first["local_address"].startswith("127.0.0.2:")
    assert first["greeting"].startswith("220 sink.test")
    assert first["ehlo"][0] == "250 sink.test"
    assert "250 STARTTLS" in first["ehlo"]
    tls = first["starttls"]
    assert (tls["offered"], tls["verified"], tls["error"]) == (True, True, None)
    assert "CN=mx1.test" in tls["subject"]
    assert tls["version"].startswith("TLSv1.")
    assert (second["mx"], second["kind"]) == ("mx2.test", "refused")  # nothing on 127.0.0.9
    text = await probe("-c", path, "--pool", "p", "--mx", "mail.test")
    assert "starttls        TLSv1." in text.stdout and ", verified" in text.stdout
    assert "mx              mx2.test (preference 20)" in text.stdout


async def test_a_certificate_that_does_not_verify_is_shown_with_why(
    tmp_path: Path, dns: Dnsmasq, mx: SmtpSink
) -> None:
    """Without the CA (the system store does not know trustme's): the subject still shows,
    read over a second connection, with the verification error; ``--a`` dials the
    domain's own address and ``--ignore-access`` bypasses the loopback rule."""
    path = write_config(tmp_path, dns, mx)
    done = await probe(
        "-c", path, "--source", "a", "--a", "direct.test", "--ignore-access", "--json"
    )
    assert done.returncode == 0, done.stderr
    (host,) = json.loads(done.stdout)["hosts"]
    assert host["mx"] == "direct.test"
    tls = host["starttls"]
    assert tls["verified"] is False
    assert "certificate" in tls["verify_error"]
    assert "CN=mx1.test" in tls["subject"]


async def test_a_host_probe_honours_access_too(tmp_path: Path, dns: Dnsmasq, mx: SmtpSink) -> None:
    path = write_config(tmp_path, dns, mx)
    denied = await probe("-c", path, "--source", "a", "127.0.0.1:25", "--json")
    allowed = await probe("-c", path, "--source", "a", "127.0.0.1:25", "--ignore-access")
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["kind"] == "denied"
    assert "in access.deny_destinations (127.0.0.0/8)" in denied.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert "greeting        220 sink.test" in allowed.stdout
