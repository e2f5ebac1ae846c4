"""``egressd probe``: the operator's plumbing test before going live.

Dial a destination through one source (or a pool's next source) exactly as a front door
would (the same plan, executor and deadline, and the same ``[access]`` rules unless the
operator bypasses them), read the server's first line, and report which path and address
were used. Each wait is bounded here, by the caller of the wait: the dial by the plan's
deadline, the greeting by ``[dial] timeout``.

Given a mail domain (:func:`probe_domain`), it finds the domain's mail hosts as the SMTP
door does (MX through ``[dns]``, ``[smtp.routes]``; or the domain's own A/AAAA) and, for
each host in order, dials it, reads the greeting, says EHLO with the source's
``ehlo_domain`` and tries STARTTLS: the TLS version, the certificate's subject and whether
it verifies for the MX name.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, replace

import trio
from cryptography import x509

from egressd.config import AccessSettings, Config, IPAddress, Source, format_hostport
from egressd.egress import Destination, Egress, EgressFailure, Failure, Plan, Resolve
from egressd.health import SourceHealth
from egressd.net.dialer import Dialed, connect
from egressd.net.egress import connect_within, open_within
from egressd.net.mx import MxHost, NextHopError, lookup_host, resolve_next_hop
from egressd.net.tls import client_context
from egressd.pools import PoolSet
from egressd.proto import smtp

MAX_GREETING = 1024

_CONFIG_KINDS = frozenset({Failure.UNKNOWN_POOL, Failure.UNKNOWN_SOURCE})


class ProbeFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProbeResult:
    source: str
    via: str
    local_address: tuple[IPAddress, int]
    remote_address: tuple[IPAddress, int]
    greeting: str

    def as_json(self) -> dict[str, str]:
        return {
            "source": self.source,
            "via": self.via,
            "local_address": format_hostport(*self.local_address),
            "remote_address": format_hostport(*self.remote_address),
            "greeting": self.greeting,
        }


def run_probe(
    config: Config,
    *,
    source: str | None,
    pool: str | None,
    host: str,
    port: int | None,
    check_access: bool = True,
) -> ProbeResult:
    return trio.run(probe, config, source, pool, host, port, check_access)


async def probe(
    config: Config,
    source: str | None,
    pool: str | None,
    host: str,
    port: int | None,
    check_access: bool = True,
) -> ProbeResult:
    egress = Egress(config, PoolSet.from_config(config), SourceHealth(config.sources))
    access = config.access if check_access else None
    try:
        chosen = egress.source_named(source) if source is not None else None
        plan = Plan(egress, pool=pool, source=chosen, host=host, port=port, access=access)
        dialed = await connect_within(plan)
    except EgressFailure as exc:
        kind = "config" if exc.kind in _CONFIG_KINDS else str(exc.kind)
        raise ProbeFailed(kind, str(exc)) from None
    timeout = config.dial.timeout
    data = bytearray(dialed.initial_data)
    async with dialed.stream:
        with trio.move_on_after(timeout) as scope:
            await read_first_line(dialed.stream, data)
    if not data:
        reason = f"no greeting within {timeout:g}s" if scope.cancelled_caught else "closed"
        raise ProbeFailed("no_greeting", f"connected, but the server sent nothing ({reason})")
    return ProbeResult(
        source=dialed.source.name,
        via=dialed.via,
        local_address=dialed.local_address,
        remote_address=dialed.remote_address,
        greeting=data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace"),
    )


async def read_first_line(stream: trio.abc.ReceiveStream, data: bytearray) -> None:
    """Append what the server sends to ``data`` up to its first line end (or EOF, or
    MAX_GREETING bytes). No timeout: whatever arrived before the caller's deadline stays
    in ``data``."""
    while b"\n" not in data and len(data) < MAX_GREETING:
        chunk = await stream.receive_some(MAX_GREETING)
        if not chunk:
            return
        data += chunk


# --------------------------------------------------------------------------- a mail domain


@dataclass(frozen=True)
class TlsOutcome:
    """What STARTTLS gave: ``offered`` by EHLO, then the version, the certificate's subject
    and whether it verified (against ``[smtp.tls] ca_file`` or the system store, for the
    MX name), or the ``error``."""

    offered: bool
    version: str | None = None
    subject: str | None = None
    verified: bool = False
    verify_error: str | None = None
    error: str | None = None

    def describe(self) -> str:
        if not self.offered:
            return "not offered"
        if self.error is not None:
            return f"failed: {self.error}"
        check = "verified" if self.verified else f"not verified ({self.verify_error})"
        return f"{self.version}, certificate {self.subject}, {check}"

    def as_json(self) -> dict[str, object]:
        return {
            "offered": self.offered,
            "version": self.version,
            "subject": self.subject,
            "verified": self.verified,
            "verify_error": self.verify_error,
            "error": self.error,
        }


@dataclass(frozen=True)
class MxReport:
    """One MX host of a probed domain: reached (``result``, the EHLO reply and STARTTLS)
    or not (``kind`` and ``error``, as a failed probe names them)."""

    host: str
    preference: int
    result: ProbeResult | None = None
    ehlo: tuple[str, ...] = ()
    tls: TlsOutcome | None = None
    kind: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = {"mx": self.host, "preference": self.preference}
        if self.result is None:
            return {**found, "kind": self.kind, "error": self.error}
        tls = self.tls.as_json() if self.tls is not None else None
        return {**found, **self.result.as_json(), "ehlo": list(self.ehlo), "starttls": tls}


def run_domain_probe(
    config: Config,
    *,
    source: str | None,
    pool: str | None,
    domain: str,
    use_mx: bool,
    check_access: bool,
) -> list[MxReport]:
    return trio.run(probe_domain, config, source, pool, domain, use_mx, check_access)


async def probe_domain(
    config: Config,
    source: str | None,
    pool: str | None,
    domain: str,
    use_mx: bool,
    check_access: bool,
) -> list[MxReport]:
    """Each mail host of ``domain`` (its MX as the SMTP door finds them, ``[smtp.routes]``
    included, or with ``use_mx`` False the domain's own A/AAAA), dialed in order as a
    front door would (``[access]`` unless ``check_access`` is False), then greeting, EHLO
    and STARTTLS. Raises :class:`ProbeFailed` when the domain has no mail host."""
    egress = Egress(config, PoolSet.from_config(config), SourceHealth(config.sources))
    try:
        chosen = egress.source_named(source) if source is not None else None
    except EgressFailure as exc:
        raise ProbeFailed("config", str(exc)) from None
    hosts = await _mail_hosts(config, domain, use_mx, chosen)
    access = config.access if check_access else None
    return [await _probe_host(egress, pool, chosen, host, access) for host in hosts]


async def _mail_hosts(
    config: Config, domain: str, use_mx: bool, source: Source | None
) -> tuple[MxHost, ...]:
    version = source.egress_version if source is not None else None
    try:
        if use_mx:
            return (await resolve_next_hop(domain, config, version)).hosts
        lookup = await lookup_host(domain, config.dns, version)
    except NextHopError as exc:
        raise ProbeFailed(str(exc.kind), exc.text) from None
    if not lookup.addresses:
        why = lookup.temporary or lookup.why or "no address"
        raise ProbeFailed("no_address", f"{domain}: {why}")
    return (MxHost(domain, 0, lookup.addresses),)


async def _probe_host(
    egress: Egress,
    pool: str | None,
    source: Source | None,
    host: MxHost,
    access: AccessSettings | None,
) -> MxReport:
    async def addresses(step: Resolve) -> list[Destination]:
        return [Destination(address, host.port, host.name) for address in host.addresses]

    plan = Plan(egress, pool=pool, source=source, port=host.port, access=access)
    try:
        dialed = await open_within(plan, connect, addresses)
    except EgressFailure as exc:
        return MxReport(host.name, host.preference, kind=str(exc.kind), error=str(exc))
    config = egress.config
    try:
        with trio.move_on_after(config.dial.timeout) as scope:
            return await _converse(egress, dialed, host)
    except (ProbeFailed, smtp.RemoteProtocolError, trio.BrokenResourceError) as exc:
        kind = exc.kind if isinstance(exc, ProbeFailed) else "protocol_error"
        return MxReport(host.name, host.preference, kind=kind, error=str(exc))
    finally:
        dialed.close()
    assert scope.cancelled_caught
    error = f"no complete answer within {config.dial.timeout:g}s"
    return MxReport(host.name, host.preference, kind="timeout", error=error)


async def _converse(egress: Egress, dialed: Dialed, host: MxHost) -> MxReport:
    """Greeting, EHLO (the source's ``ehlo_domain``), STARTTLS when offered."""
    config = egress.config
    session = _Smtp(dialed.stream, dialed.initial_data)
    greeting = await session.reply()
    result = ProbeResult(
        source=dialed.source.name,
        via=dialed.via,
        local_address=dialed.local_address,
        remote_address=dialed.remote_address,
        greeting=f"{greeting.code} {greeting.lines[0] if greeting.lines else ''}".rstrip(),
    )
    report = MxReport(host.name, host.preference, result=result)
    if greeting.code != 220:
        return report
    ehlo_name = dialed.source.ehlo_domain or config.smtp.hostname or config.hostname
    ehlo = smtp.Ehlo(ehlo_name or socket.gethostname())
    answer = await session.command(ehlo)
    lines = tuple(f"{answer.code} {line}" for line in answer.lines)
    if answer.code != 250 or not session.client.supports("STARTTLS"):
        return replace(report, ehlo=lines, tls=TlsOutcome(offered=False))
    tls = await _starttls(session, egress, dialed, host, ehlo)
    return replace(report, ehlo=lines, tls=tls)


class _Smtp:
    """Just enough of an SMTP client session for the probe, over the sans-IO machine."""

    def __init__(self, stream: trio.abc.Stream, initial: bytes) -> None:
        self.stream: trio.abc.Stream = stream
        self.client = smtp.SmtpClient()
        if initial:
            self.client.receive_data(initial)

    async def reply(self) -> smtp.Reply:
        while True:
            event = self.client.next_event()
            if isinstance(event, smtp.Reply):
                return event
            if isinstance(event, smtp.ConnectionClosed):
                raise ProbeFailed("closed", "the server closed the connection")
            self.client.receive_data(bytes(await self.stream.receive_some(MAX_GREETING)))

    async def command(self, command: smtp.ClientCommand) -> smtp.Reply:
        await self.stream.send_all(self.client.send(command))
        return await self.reply()

    async def starttls(self, name: str, context: ssl.SSLContext) -> TlsOutcome:
        """STARTTLS, then the handshake with ``context`` (server name ``name``)."""
        answer = await self.command(smtp.StartTls())
        if answer.code != 220:
            return TlsOutcome(offered=True, error=f"STARTTLS answered {_text(answer)}")
        self.client.start_tls()
        tls = trio.SSLStream(self.stream, context, server_hostname=name)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                return TlsOutcome(offered=True, verify_error=cause.verify_message or str(cause))
            return TlsOutcome(offered=True, error=str(cause or exc))
        self.stream = tls
        der = tls.getpeercert(binary_form=True)
        return TlsOutcome(
            offered=True,
            version=tls.version(),
            subject=_subject(der) if der else None,
            verified=context.verify_mode == ssl.CERT_REQUIRED,
        )


async def _starttls(
    session: _Smtp, egress: Egress, dialed: Dialed, host: MxHost, ehlo: smtp.Ehlo
) -> TlsOutcome:
    """STARTTLS verified for the MX name (``[smtp.tls] ca_file`` or the system store).
    A certificate that does not verify ends that handshake, so its subject and the TLS
    version are read on a second connection (same source, same address) that accepts any
    certificate, as the SMTP door's opportunistic TLS would."""
    ca_file = egress.config.smtp.tls.ca_file
    verified = await session.starttls(host.name, client_context(True, ca_file))
    if verified.verify_error is None:
        return verified
    plan = Plan(
        egress, source=dialed.source, host=dialed.remote_address[0], port=dialed.remote_address[1]
    )
    try:
        again = await open_within(plan, connect)
    except EgressFailure as exc:
        return replace(verified, error=f"reconnecting to read the certificate: {exc}")
    try:
        second = _Smtp(again.stream, again.initial_data)
        await second.reply()
        await second.command(ehlo)
        unverified = await second.starttls(host.name, client_context(False))
    finally:
        again.close()
    return replace(unverified, verified=False, verify_error=verified.verify_error)


def _subject(der: bytes) -> str:
    """A certificate's subject as RFC 4514 text (``CN=mx.example.com,O=...``)."""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError as exc:
        return f"(unreadable certificate: {exc})"


def _text(reply: smtp.Reply) -> str:
    return f"{reply.code} {' '.join(reply.lines)}".strip()
