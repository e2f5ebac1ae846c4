"""The relay's outbound side: one SMTP connection to a recipient domain's mail server.

Theory of operation
-------------------
:func:`open_remote` turns a :class:`~egressd.net.mx.NextHop` and a chosen source into a
:class:`RemoteSession` that is ready for MAIL: it dials the hop's addresses in order
(lowest MX preference first) through :meth:`Egress.connect <egressd.net.egress.Egress.connect>`
with the IP literal, reads the banner, sends ``EHLO <the source's ehlo_domain>`` (egressd's
hostname when the source has none), does STARTTLS as ``[smtp.tls]`` says, and EHLOs again.

STARTTLS policy (RFC 3207, RFC 7435):

``opportunistic`` (default)
    Encrypt when the remote offers STARTTLS, without verifying its certificate. When the
    handshake fails, the connection is dropped and the same address is dialed again, and
    the session goes on in plaintext (the remote's state after a failed handshake is
    unknowable). A refused STARTTLS (454) goes on in plaintext on the same connection.
``required``
    No STARTTLS offered, refused, or a failed handshake: that host fails and the next one
    is tried.
``disabled``
    Never STARTTLS.

With ``verify = true`` the certificate must chain to the system trust store and match the
MX name (SNI is the MX name either way); a failure is never downgraded to plaintext.

The sans-IO :class:`~egressd.proto.smtp_client.SmtpClient` does the protocol; this module
only moves bytes. :class:`RemoteSession` has no deadlines of its own: :func:`converse`
puts the ``[smtp.timeouts]`` entry that fits (each below Postfix's own client timeouts, so
the MTA always hears from egressd first) around an exchange with ``trio.fail_after`` and
returns the outcome as the relay core's event (:class:`~egressd.relay.events.RemoteReplied`,
:class:`~egressd.relay.events.RemoteTimedOut` or :class:`~egressd.relay.events.RemoteLost`).
A failure while opening is a :class:`RemoteError` carrying the 4xx reply the MTA should get
(built in :mod:`egressd.relay.replies`), which names the source, the address and the error.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from egressd.config import Config, IPAddress, SmtpTimeouts, Source, format_hostport
from egressd.egress import Egress, EgressFailure, Party, destination_port
from egressd.net.dialer import Dialed
from egressd.net.egress import dial_one
from egressd.net.mx import MxHost, NextHop
from egressd.net.tls import client_context
from egressd.proto.smtp_client import ClientCommand, SmtpClient
from egressd.proto.smtp_common import (
    NEED_DATA,
    ConnectionClosed,
    Ehlo,
    Helo,
    ProtocolViolation,
    Quit,
    RemoteProtocolError,
    Reply,
    StartTls,
)
from egressd.relay import replies
from egressd.relay.events import Remote, RemoteLost, RemoteReplied, RemoteTimedOut
from egressd.runtime import Runtime

__all__ = ["RemoteBroken", "RemoteError", "RemoteSession", "converse", "open_remote"]

_RECEIVE_SIZE = 65536
_QUIT_WAIT = 2.0


class RemoteError(Exception):
    """Opening the remote failed; ``reply`` is the 4xx for the MTA, naming the source, the
    address and the error; ``detail`` names the address and the error only."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.detail = detail or reply.text


class RemoteBroken(Exception):
    """The connection broke (see :class:`~egressd.relay.events.RemoteLost`)."""

    def __init__(self, lost: RemoteLost) -> None:
        super().__init__(lost.detail or lost.how)
        self.lost = lost


class _TlsFailed(Exception):
    """The STARTTLS handshake failed (the connection is unusable)."""


@dataclass
class RemoteSession:
    """An open SMTP connection to one address of a next hop, from one source.

    It has no deadlines of its own: callers put ``trio.fail_after`` around each exchange.
    """

    dialed: Dialed
    mx_name: str
    mx_port: int
    hop: NextHop
    timeouts: SmtpTimeouts
    stream: trio.abc.Stream
    client: SmtpClient = field(default_factory=SmtpClient)
    tls_version: str | None = None
    #: True while the last exchange was still writing (for the timeout's wording).
    sending: bool = False
    _exit: AsyncExitStack = field(default_factory=AsyncExitStack)

    @property
    def source(self) -> Source:
        return self.dialed.source

    @property
    def address(self) -> tuple[IPAddress, int]:
        host, port = self.dialed.remote_address
        return ipaddress.ip_address(host), port

    @property
    def local_address(self) -> str:
        return format_hostport(*self.dialed.local_address)

    @property
    def remote_text(self) -> str:
        host, port = self.dialed.remote_address
        return f"{self.mx_name}[{host}]:{port}"

    def describe(self) -> str:
        """``source "a" (127.0.0.3) to mx.example[192.0.2.1]:25`` for replies and logs."""
        return f"{_source_text(self.source, self.dialed.local_address[0])} to {self.remote_text}"

    @property
    def hop_address(self) -> tuple[IPAddress, int]:
        """The address and the next hop's port (before a source's ``remote_port``)."""
        return self.address[0], self.mx_port

    def view(self) -> Remote:
        """What the relay core knows of this connection."""
        return Remote(
            source=self.source,
            next_hop=self.hop,
            hop_address=self.hop_address,
            remote_text=self.remote_text,
            describe=self.describe(),
            mx_name=self.mx_name,
            local_address=self.local_address,
            tls_version=self.tls_version,
            extensions=dict(self.client.extensions),
        )

    def failure(self, enhanced: str, what: str) -> RemoteError:
        reply = replies.remote_failure(self.describe(), what, enhanced)
        return RemoteError(reply, f"{self.remote_text}: {what}")

    # ----------------------------------------------------------------------- I/O

    async def exchange(self, data: bytes, count: int) -> list[Reply]:
        """Write ``data`` (if any), then read ``count`` replies, or fewer when one is a 421
        (the session is over). Raises :class:`RemoteBroken`."""
        self.sending = bool(data)
        try:
            if data:
                await self.stream.send_all(data)
            self.sending = False
            got: list[Reply] = []
            while len(got) < count:
                reply = await self._read_reply()
                got.append(reply)
                if reply.code == 421:
                    break
            return got
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise RemoteBroken(RemoteLost("error", self.sending, _error_text(exc))) from exc

    async def _read_reply(self) -> Reply:
        while True:
            event = self.client.next_event()
            if isinstance(event, Reply):
                return event
            if isinstance(event, ConnectionClosed):
                raise RemoteBroken(RemoteLost("closed"))
            if isinstance(event, ProtocolViolation):
                raise RemoteBroken(RemoteLost("violation", detail=event.description))
            assert event is NEED_DATA
            self.client.receive_data(bytes(await self.stream.receive_some(_RECEIVE_SIZE)))

    async def quit(self) -> None:
        """QUIT politely (waiting briefly for the 221), then close."""
        if self.client.awaiting_replies == 0:
            with contextlib.suppress(Exception), trio.move_on_after(_QUIT_WAIT):
                await self.exchange(self.client.send(Quit()), 1)
        await self.abort()

    async def abort(self) -> None:
        """Close at once: in the middle of DATA the remote never sees the final dot."""
        await trio.aclose_forcefully(self.stream)
        await self._exit.aclose()


async def converse(
    session: RemoteSession, data: bytes, count: int, seconds: float
) -> RemoteReplied | RemoteTimedOut | RemoteLost:
    """:meth:`RemoteSession.exchange` within ``seconds``, its outcome as the core's event."""
    try:
        with trio.fail_after(seconds):
            return RemoteReplied(tuple(await session.exchange(data, count)))
    except trio.TooSlowError:
        return RemoteTimedOut(seconds, session.sending)
    except RemoteBroken as exc:
        return exc.lost


async def _command(
    session: RemoteSession, command: ClientCommand | None, seconds: float, what: str
) -> Reply:
    """One command of the opening conversation (``b""``: the banner); failures raise
    :class:`RemoteError` with the 4xx naming the source, the address and the error."""
    data = b"" if command is None else session.client.send(command)
    outcome = await converse(session, data, 1, seconds)
    if isinstance(outcome, RemoteReplied):
        return outcome.replies[0]
    raise session.failure("4.4.2", replies.remote_failure_detail(what, outcome))


# --------------------------------------------------------------------------- opening


@dataclass
class _Attempt:
    """Shared facts for dialing one next hop from one source."""

    egress: Egress
    runtime: Runtime
    config: Config
    source: Source
    hop: NextHop
    ehlo_name: str
    failures: list[str] = field(default_factory=list)
    last_remote_reply: Reply | None = None


async def open_remote(
    egress: Egress,
    runtime: Runtime,
    source: Source,
    hop: NextHop,
    ehlo_name: str,
    denied: frozenset[IPAddress] = frozenset(),
) -> RemoteSession:
    """A session to the first host of ``hop`` that answers and greets, ready for MAIL.

    Raises :class:`RemoteError` (with a 4xx naming the source, each address tried and its
    error) when no host works; :class:`~egressd.egress.EgressFailure` is raised as is when
    it is the source's fault, so the caller can try another source.
    """
    attempt = _Attempt(egress, runtime, egress.config, source, hop, ehlo_name)
    for host in hop.hosts:
        for address in host.addresses:
            if address in denied:
                continue
            session = await _try_address(attempt, host, address)
            if session is not None:
                return session
    who = _source_text(source, source.egress_address)
    if not attempt.failures:
        raise RemoteError(replies.no_usable_address(hop.domain))
    raise RemoteError(replies.no_mail_server(who, hop.domain, attempt.failures))


async def _try_address(attempt: _Attempt, host: MxHost, address: IPAddress) -> RemoteSession | None:
    """A ready session to ``address``, or None (the failure is noted in ``attempt``)."""
    mode = attempt.config.smtp.tls.mode
    verify = attempt.config.smtp.tls.verify
    use_tls = mode != "disabled"
    for _ in range(2):
        try:
            session = await _dial(attempt, host, address)
        except EgressFailure as exc:
            if exc.party is Party.SOURCE:
                raise
            port = destination_port(attempt.source, host.port)
            attempt.failures.append(f"{host.name}[{address}]:{port}: {_dial_reason(exc)}")
            return None
        try:
            await _greet(attempt, session, use_tls=use_tls)
            return session
        except _TlsFailed as exc:
            await session.abort()
            if mode == "required" or verify:
                attempt.failures.append(f"{session.remote_text}: {exc}")
                return None
            use_tls = False  # opportunistic: reconnect and go on in plaintext
        except RemoteError as exc:
            await session.abort()
            attempt.failures.append(exc.detail)
            return None
    return None


async def _dial(attempt: _Attempt, host: MxHost, address: IPAddress) -> RemoteSession:
    dialed = await dial_one(attempt.egress, attempt.source, address, host.port)
    stack = AsyncExitStack()
    try:
        await stack.enter_async_context(attempt.runtime.source_in_use(attempt.source.name))
    except BaseException:
        await trio.aclose_forcefully(dialed.stream)
        raise
    session = RemoteSession(
        dialed=dialed,
        mx_name=host.name,
        mx_port=host.port,
        hop=attempt.hop,
        timeouts=attempt.config.smtp.timeouts,
        stream=dialed.stream,
        _exit=stack,
    )
    if dialed.initial_data:
        session.client.receive_data(dialed.initial_data)
    return session


async def _greet(attempt: _Attempt, session: RemoteSession, *, use_tls: bool) -> None:
    """Banner, EHLO, STARTTLS (per policy), EHLO again. Raises RemoteError or _TlsFailed."""
    timeouts = session.timeouts
    banner = await _command(session, None, timeouts.banner, "the connection (banner)")
    if banner.code != 220:
        raise session.failure("4.4.0", f"greeting was {_first_line(banner)}")
    await _hello(attempt, session)
    tls = attempt.config.smtp.tls
    if not use_tls:
        return
    if not session.client.supports("STARTTLS"):
        if tls.mode == "required" or tls.verify:
            raise session.failure("4.7.10", "does not offer STARTTLS, which is required")
        return
    reply = await _command(session, StartTls(), timeouts.command, "STARTTLS")
    if reply.code != 220:
        if tls.mode == "required" or tls.verify:
            raise session.failure("4.7.10", f"refused STARTTLS: {_first_line(reply)}")
        return
    await _handshake(session, verify=tls.verify)
    await _hello(attempt, session)


async def _hello(attempt: _Attempt, session: RemoteSession) -> None:
    reply = await _command(session, Ehlo(attempt.ehlo_name), session.timeouts.command, "EHLO")
    if reply.is_success:
        return
    if reply.is_permanent and reply.code != 421:
        reply = await _command(session, Helo(attempt.ehlo_name), session.timeouts.command, "HELO")
        if reply.is_success:
            return
    raise session.failure("4.4.0", f"refused EHLO {attempt.ehlo_name}: {_first_line(reply)}")


async def _handshake(session: RemoteSession, *, verify: bool) -> None:
    try:
        session.client.start_tls()
    except RemoteProtocolError as exc:
        raise _TlsFailed(f"plaintext after the 220 to STARTTLS: {exc}") from exc
    ssl_stream = trio.SSLStream(
        session.stream, client_context(verify), server_hostname=session.mx_name
    )
    try:
        with trio.fail_after(session.timeouts.command):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        raise _TlsFailed(f"TLS handshake timed out after {session.timeouts.command:g}s") from None
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        raise _TlsFailed(f"TLS handshake failed: {_error_text(exc)}") from exc
    session.stream = ssl_stream
    session.tls_version = ssl_stream.version()


# --------------------------------------------------------------------------- helpers


def _source_text(source: Source, address: object) -> str:
    return f'source "{source.name}" ({address})' if address else f'source "{source.name}"'


def _first_line(reply: Reply) -> str:
    return f"{reply.code} {reply.lines[0]}".strip()


def _dial_reason(exc: EgressFailure) -> str:
    """The OS error of a failed dial (the source is named elsewhere in the reply)."""
    if exc.errno is not None:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return exc.detail


def _error_text(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__
