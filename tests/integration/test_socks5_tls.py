"""TLS and mutual TLS on a SOCKS5 listener, as KumoProxy's ``start_proxy_listener`` offers
(``use_tls``, ``tls_certificate``, ``tls_private_key``; the client CA under KumoMTA's name
``tls_required_client_ca``).

curl speaks HTTPS proxies, not SOCKS5 over TLS, so the client here is Python's ssl (trio's
SSLStream) carrying the SOCKS5 bytes; certificates come from trustme. What a client sees
is checked: the certificate it is served, a refusal at the handshake without a valid
client certificate, and a working CONNECT to the banner sink through the tunnel.
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from daemon_helpers import RecordingDaemon, recording_daemon
from harness import Sink, receive_exactly

from egressd.cli import EXIT_CONFIG, main
from egressd.config import ConfigError, load_config

pytestmark = pytest.mark.integration


def install(ca: trustme.CA, name: str, directory: Path) -> None:
    """A server certificate for ``name``, written as certbot does (renamed into place)."""
    cert = ca.issue_cert(name)
    for pem, final in ((cert.cert_chain_pems[0], "cert.pem"), (cert.private_key_pem, "key.pem")):
        pem.write_to_path(str(directory / f"{final}.new"))
        os.replace(directory / f"{final}.new", directory / final)


def config_text(
    directory: Path, sink_port: int, *, client_ca: Path | None = None, limits: str = ""
) -> str:
    mutual = f'tls_required_client_ca = "{client_ca}"' if client_ca is not None else ""
    return f"""
[limits]
{limits}
[source.a]
source_address = "127.0.0.2"
[pool.main.a]

[access]
destination_ports = [{sink_port}]
deny_destinations = []

[[socks5.listener]]
address = "127.0.0.1:0"
pool = "main"
use_tls = true
tls_certificate = "{directory / "cert.pem"}"
tls_private_key = "{directory / "key.pem"}"
{mutual}
"""


@asynccontextmanager
async def egressd(text: str, directory: Path) -> AsyncIterator[RecordingDaemon]:
    async with recording_daemon(text, directory, "socks5") as daemon:
        yield daemon


def client_context(ca: trustme.CA, certificate: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if certificate is not None:
        certificate.configure_cert(context)
    return context


async def socks_over_tls(
    port: int, context: ssl.SSLContext, sink_port: int
) -> tuple[str, bytes, bytes]:
    """TLS to the listener (server name proxy.test), then greeting and CONNECT to the
    sink; the served certificate's name, the CONNECT reply and the sink's banner."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="proxy.test")
    async with stream:
        with trio.fail_after(10):
            await stream.do_handshake()
            name = served_name(stream)
            await stream.send_all(b"\x05\x01\x00")
            assert await receive_exactly(stream, 2) == b"\x05\x00"
            address = bytes([127, 0, 0, 1]) + struct.pack("!H", sink_port)
            await stream.send_all(b"\x05\x01\x00\x01" + address)
            reply = await receive_exactly(stream, 10)
            banner = await receive_exactly(stream, 21) if reply[1] == 0 else b""
    return name, reply, banner


def served_name(stream: trio.SSLStream[trio.SocketStream]) -> str:
    peer = stream.getpeercert()
    assert peer is not None
    alt_names: tuple[tuple[str, str], ...] = peer.get("subjectAltName", ())
    return next(value for kind, value in alt_names if kind == "DNS")


async def refused_at_handshake(port: int, context: ssl.SSLContext) -> bool:
    """True when the TLS session breaks before a SOCKS reply (TLS 1.3: the client's
    handshake may finish first; the server's alert then arrives at the first read)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="proxy.test")
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
            await stream.send_all(b"\x05\x01\x00")
            return await stream.receive_some(2) == b""
    except trio.BrokenResourceError:
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def test_socks5_over_tls_reaches_the_destination(sink: Sink, tmp_path: Path) -> None:
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    async with egressd(config_text(tmp_path, sink.port), tmp_path) as e:
        name, reply, banner = await socks_over_tls(e.port, client_context(ca), sink.port)
        record = await e.record()
    assert name == "proxy.test"
    assert reply[:2] == b"\x05\x00"
    assert banner == sink.banner
    assert sink.peers == ["127.0.0.2"]
    assert record.source == "a"
    assert record.bytes_down >= len(sink.banner)


async def test_a_tls_listener_at_capacity_refuses_inside_tls_with_01(
    sink: Sink, tmp_path: Path
) -> None:
    """Under overload the refusal is spoken inside TLS, the only thing a client of a TLS
    listener can read: the handshake, the greeting's answer, then reply 01."""
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    text = config_text(tmp_path, sink.port, limits="max_connections = 1")
    async with egressd(text, tmp_path) as e:
        tcp = await trio.open_tcp_stream("127.0.0.1", e.port)
        held = trio.SSLStream(tcp, client_context(ca), server_hostname="proxy.test")
        with trio.fail_after(10):
            await held.do_handshake()
            await held.send_all(b"\x05\x01\x00")
            assert await receive_exactly(held, 2) == b"\x05\x00"  # a session holds the slot
            name, reply, banner = await socks_over_tls(e.port, client_context(ca), sink.port)
        await trio.aclose_forcefully(held)
    assert name == "proxy.test"
    assert reply[:2] == b"\x05\x01"
    assert banner == b""
    assert sink.connections == []


async def test_a_plaintext_socks_client_gets_nothing_from_a_tls_listener(
    sink: Sink, tmp_path: Path
) -> None:
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    async with egressd(config_text(tmp_path, sink.port), tmp_path) as e:
        stream = await trio.open_tcp_stream("127.0.0.1", e.port)
        async with stream:
            address = bytes([127, 0, 0, 1]) + struct.pack("!H", sink.port)
            await stream.send_all(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + address)
            with trio.fail_after(10):
                answer = await stream.receive_some(100)
        record = await e.record()
    assert not answer.startswith(b"\x05")  # no SOCKS reply in the clear
    assert record.outcome == "tls_failed"
    assert sink.connections == []


async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    sink: Sink, tmp_path: Path
) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    install(ca, "proxy.test", tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    text = config_text(tmp_path, sink.port, client_ca=tmp_path / "clients.pem")
    async with egressd(text, tmp_path) as e:
        without = await refused_at_handshake(e.port, client_context(ca))
        foreign = client_context(ca, stranger.issue_cert("mta.test"))
        with_foreign = await refused_at_handshake(e.port, foreign)
        records = [await e.record(1), await e.record(2)]
        failures = sum(
            sample.value
            for metric in e.daemon.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "proxy_tls_handshake_failures_total"
        )
        trusted = client_context(ca, ca.issue_cert("mta.test"))
        _, reply, banner = await socks_over_tls(e.port, trusted, sink.port)
    assert without and with_foreign
    assert failures == 2
    assert [r.outcome for r in records] == ["tls_failed", "tls_failed"]
    assert all("TLS handshake failed" in (r.detail or "") for r in records)
    assert reply[:2] == b"\x05\x00" and banner == sink.banner
    assert sink.peers == ["127.0.0.2"]  # only the client with a trusted certificate


async def test_a_renewed_certificate_is_served_after_reload(sink: Sink, tmp_path: Path) -> None:
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    async with egressd(config_text(tmp_path, sink.port), tmp_path) as e:
        first, _, _ = await socks_over_tls(e.port, client_context(ca), sink.port)
        renewed_ca = trustme.CA()
        install(renewed_ca, "proxy.test", tmp_path)
        assert await e.daemon.reload("certificate renewed")
        second, reply, _ = await socks_over_tls(e.port, client_context(renewed_ca), sink.port)
    assert first == second == "proxy.test"
    assert reply[:2] == b"\x05\x00"  # verified against the new CA: the new certificate


def test_use_tls_needs_a_certificate_and_tls_keys_need_use_tls(tmp_path: Path) -> None:
    path = tmp_path / "egressd.toml"
    path.write_text(
        '[[socks5.listener]]\naddress = "127.0.0.1:1080"\nuse_tls = true\n'
        '[[socks5.listener]]\naddress = "127.0.0.1:1081"\ntls_certificate = "c.pem"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "use_tls: needs tls_certificate and tls_private_key" in text
    assert "tls_certificate: is set without use_tls = true" in text


def test_check_and_run_refuse_a_listener_certificate_that_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    path = tmp_path / "egressd.toml"
    path.write_text(config_text(tmp_path, 25))
    assert main(["check", "-q", "-c", str(path)]) == 1
    assert main(["run", "-c", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    expected = f"{path}: socks5.listener[0].tls_certificate: cannot load certificate {tmp_path}"
    assert err.count(expected) == 2


async def test_a_destination_that_closes_first_ends_the_tls_client_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The destination says its last line and closes: the TLS client reads that line, then
    EOF (TCP FIN, TlsConnection.send_eof), instead of waiting for the idle timeout."""

    async def say_bye(stream: trio.SocketStream) -> None:
        await stream.send_all(b"421 4.3.2 closing\r\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, say_bye, listeners)
    port = listeners[0].socket.getsockname()[1]
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    async with egressd(config_text(tmp_path, port), tmp_path) as e:
        tcp = await trio.open_tcp_stream("127.0.0.1", e.port)
        stream = trio.SSLStream(tcp, client_context(ca), server_hostname="proxy.test")
        with trio.fail_after(10):
            await stream.do_handshake()
            await stream.send_all(b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01")
            await stream.send_all(struct.pack("!H", port))
            assert await receive_exactly(stream, 2) == b"\x05\x00"
            assert (await receive_exactly(stream, 10))[:2] == b"\x05\x00"
            said = bytearray()
            while chunk := await stream.receive_some(100):
                said += chunk
        await trio.aclose_forcefully(stream)
        record = await e.record()
    assert bytes(said) == b"421 4.3.2 closing\r\n"
    assert record.bytes_down == len(said)


def test_check_names_the_tls_listeners(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = trustme.CA()
    install(ca, "proxy.test", tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    path = tmp_path / "egressd.toml"
    path.write_text(config_text(tmp_path, 25, client_ca=tmp_path / "clients.pem"))
    assert main(["check", "-c", str(path)]) == 0
    assert "  socks5 127.0.0.1:0 pool main mutual TLS\n" in capsys.readouterr().out
