"""The SMTP door's STARTTLS certificate is read again after it was renewed and reloaded."""

from __future__ import annotations

import os
import smtplib
import ssl
from pathlib import Path

import trio
import trustme
from daemon_helpers import port_of, running_daemon
from harness import free_port

from egressd.doors.smtp import SmtpDoor


def install_certificate(ca: trustme.CA, name: str, directory: Path) -> None:
    """Write a certificate for ``name`` as certbot does: new files renamed into place."""
    cert = ca.issue_cert(name)
    for pem, final in ((cert.cert_chain_pems[0], "cert.pem"), (cert.private_key_pem, "key.pem")):
        pem.write_to_path(str(directory / f"{final}.new"))
        os.replace(directory / f"{final}.new", directory / final)


def served_certificate_name(port: int, ca: trustme.CA) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False  # smtplib sends the IP literal as the server name
    ca.configure_trust(context)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mta.test")
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        peer = client.sock.getpeercert()
    assert peer is not None
    alt_names: tuple[tuple[str, str], ...] = peer.get("subjectAltName", ())  # type: ignore[assignment]
    return next(value for kind, value in alt_names if kind == "DNS")


async def test_a_renewed_certificate_is_served_after_reload(tmp_path: Path) -> None:
    ca = trustme.CA()
    install_certificate(ca, "before.test", tmp_path)
    text = f"""
hostname = "relay.test"
[[smtp.listener]]
address = "127.0.0.1:{free_port()}"
pool = "p"
[source."a"]
source_address = "127.0.0.2"
[pool."p"."a"]
[smtp.tls]
certificate = "{tmp_path / "cert.pem"}"
private_key = "{tmp_path / "key.pem"}"
"""
    async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
        port = port_of(daemon, "smtp")
        with trio.fail_after(20):
            first = await trio.to_thread.run_sync(served_certificate_name, port, ca)
            again = await trio.to_thread.run_sync(served_certificate_name, port, ca)
            install_certificate(ca, "after.test", tmp_path)
            assert await daemon.reload("certificate renewed")
            renewed = await trio.to_thread.run_sync(served_certificate_name, port, ca)
    assert (first, again, renewed) == ("before.test", "before.test", "after.test")


async def test_a_bad_renewal_is_refused_and_the_old_certificate_kept(tmp_path: Path) -> None:
    """A renewal that left a key which does not match the certificate: the reload is
    refused (as ``check`` refuses it) and STARTTLS still serves the certificate that
    worked, instead of 454."""
    ca = trustme.CA()
    install_certificate(ca, "before.test", tmp_path)
    text = f"""
hostname = "relay.test"
[[smtp.listener]]
address = "127.0.0.1:{free_port()}"
pool = "p"
[source."a"]
source_address = "127.0.0.2"
[pool."p"."a"]
[smtp.tls]
certificate = "{tmp_path / "cert.pem"}"
private_key = "{tmp_path / "key.pem"}"
"""
    async with running_daemon(text, tmp_path, {"smtp": SmtpDoor()}) as daemon:
        port = port_of(daemon, "smtp")
        with trio.fail_after(20):
            first = await trio.to_thread.run_sync(served_certificate_name, port, ca)
            ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
            refused = not await daemon.reload("certificate renewed badly")
            kept = await trio.to_thread.run_sync(served_certificate_name, port, ca)
    assert refused
    assert (first, kept) == ("before.test", "before.test")
