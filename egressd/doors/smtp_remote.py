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
only moves bytes and applies the ``[smtp.timeouts]`` (each below Postfix's own client
timeouts, so the MTA always hears from egressd first). Every failure is a
:class:`RemoteError` carrying the 4xx reply the MTA should get, which names the source,
the address and the error. A reply from the remote, whatever its code (a 421 included),
is returned as a :class:`~egressd.proto.smtp_common.Reply` for the relay to pass on.
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
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    ProtocolViolation,
    Quit,
    RemoteProtocolError,
    Reply,
    StartTls,
)
from egressd.runtime import Runtime

__all__ = ["RemoteError", "RemoteSession", "open_remote", "temporary"]

_RECEIVE_SIZE = 65536
_QUIT_WAIT = 2.0


def temporary(enhanced: str, text: str, code: int = 451) -> Reply:
    """A reply egressd itself gives the MTA (``451 4.x.y text``)."""
    return Reply.make(code, text.replace("\r", " ").replace("\n", " "), enhanced=enhanced)


class RemoteError(Exception):
    """The remote conversation failed; ``reply`` is the 4xx for the MTA, naming the source,
    the address and the error; ``detail`` names the address and the error only."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.detail = detail or reply.text


class _TlsFailed(Exception):
    """The STARTTLS handshake failed (the connection is unusable)."""


@dataclass
class RemoteSession:
    """An open SMTP connection to one address of a next hop, from one source."""

    dialed: Dialed
    mx_name: str
    mx_port: int
    hop: NextHop
    timeouts: SmtpTimeouts
    stream: trio.abc.Stream
    client: SmtpClient = field(default_factory=SmtpClient)
    tls_version: str | None = None
    alive: bool = True
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

    def failure(self, enhanced: str, what: str) -> RemoteError:
        return RemoteError(
            temporary(enhanced, f"{self.describe()}: {what}"), f"{self.remote_text}: {what}"
        )

    # ----------------------------------------------------------------------- I/O

    async def command(self, command: ClientCommand, seconds: float, what: str = "") -> Reply:
        """Send ``command`` and return the remote's reply (any code), all within ``seconds``."""
        label = what or type(command).__name__.upper()
        return await self.exchange(self.client.send(command), seconds, label)

    async def reply(self, seconds: float, what: str) -> Reply:
        """The next reply (the banner, say), within ``seconds``."""
        return await self.exchange(b"", seconds, what)

    async def pipeline(
        self, commands: list[ClientCommand], seconds: float, what: str
    ) -> list[Reply]:
        """Send ``commands`` in one write (RFC 2920) and return their replies, in order.

        A 421 ends the session: it stands for the replies that will never come.
        """
        data = b"".join([self.client.send(command) for command in commands])
        return await self.exchange_many(data, len(commands), seconds, what)

    async def exchange(self, data: bytes, seconds: float, what: str) -> Reply:
        """Write ``data`` (if any), then read one reply; one deadline covers both."""
        [reply] = await self.exchange_many(data, 1, seconds, what)
        return reply

    async def exchange_many(
        self, data: bytes, count: int, seconds: float, what: str
    ) -> list[Reply]:
        """Write ``data`` (if any), then read ``count`` replies; one deadline covers all."""
        sending = bool(data)
        try:
            with trio.fail_after(seconds):
                if data:
                    await self.stream.send_all(data)
                sending = False
                replies: list[Reply] = []
                while len(replies) < count:
                    reply = await self._read_reply(what)
                    if reply.code == 421:
                        return replies + [reply] * (count - len(replies))
                    replies.append(reply)
                return replies
        except trio.TooSlowError:
            if sending:
                raise self._lost(f"timed out after {seconds:g}s sending {what}") from None
            raise self._lost(f"no reply to {what} within {seconds:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            doing = "sending" if sending else "waiting for the reply to"
            raise self._lost(f"connection lost {doing} {what}: {_error_text(exc)}") from exc

    async def _read_reply(self, what: str) -> Reply:
        while True:
            event = self.client.next_event()
            if isinstance(event, Reply):
                if event.code == 421:
                    self.alive = False
                return event
            if isinstance(event, ConnectionClosed):
                raise self._lost(f"connection closed by the remote in reply to {what}")
            if isinstance(event, ProtocolViolation):
                raise self._lost(f"protocol violation in reply to {what}: {event.description}")
            assert event is NEED_DATA
            self.client.receive_data(bytes(await self.stream.receive_some(_RECEIVE_SIZE)))

    def _lost(self, what: str) -> RemoteError:
        self.alive = False
        return self.failure("4.4.2", what)

    async def send_body(self, chunks: list[DataChunk]) -> None:
        """Write pieces of the body in one write, within ``data_block``."""
        data = b"".join([self.client.send(chunk) for chunk in chunks])
        seconds = self.timeouts.data_block
        try:
            with trio.fail_after(seconds):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise self._lost(f"timed out after {seconds:g}s sending the message body") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._lost(
                f"connection lost sending the message body: {_error_text(exc)}"
            ) from exc

    async def end_body(self, chunks: list[DataChunk]) -> Reply:
        """Write the last pieces of the body and the final dot in one write; wait for the
        reply to it (``final_dot`` covers both: the pieces are at most one read's worth)."""
        data = b"".join([self.client.send(chunk) for chunk in chunks])
        data += self.client.send(EndOfData())
        return await self.exchange(data, self.timeouts.final_dot, "end of data")

    async def quit(self) -> None:
        """QUIT politely (waiting briefly for the 221), then close."""
        if self.alive and self.client.awaiting_replies == 0:
            with contextlib.suppress(RemoteError, Exception), trio.move_on_after(_QUIT_WAIT):
                await self.command(Quit(), _QUIT_WAIT)
        await self.abort()

    async def abort(self) -> None:
        """Close at once: in the middle of DATA the remote never sees the final dot."""
        self.alive = False
        await trio.aclose_forcefully(self.stream)
        await self._exit.aclose()


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
        raise RemoteError(temporary("4.4.4", f"no usable address for {hop.domain}"))
    raise RemoteError(
        temporary(
            "4.4.1",
            f"{who}: no mail server of {hop.domain} could be used: " + "; ".join(attempt.failures),
        )
    )


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
    banner = await session.reply(timeouts.banner, "the connection (banner)")
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
    reply = await session.command(StartTls(), timeouts.command)
    if reply.code != 220:
        if tls.mode == "required" or tls.verify:
            raise session.failure("4.7.10", f"refused STARTTLS: {_first_line(reply)}")
        return
    await _handshake(session, verify=tls.verify)
    await _hello(attempt, session)


async def _hello(attempt: _Attempt, session: RemoteSession) -> None:
    reply = await session.command(Ehlo(attempt.ehlo_name), session.timeouts.command, "EHLO")
    if reply.is_success:
        return
    if reply.is_permanent and reply.code != 421:
        reply = await session.command(Helo(attempt.ehlo_name), session.timeouts.command, "HELO")
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
