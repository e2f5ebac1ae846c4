"""The SMTP front door: a transparent cut-through relay host for MTAs.

Theory of operation
-------------------
Most MTAs cannot speak SOCKS5 or PROXY, but every one can send to a relay host. This door
is that relay host, and it stays transparent: it never queues a message and never takes
responsibility for one. It holds each transaction open while it delivers it to the
recipient domain's mail server through the chosen source, and hands the MTA the remote
server's own replies. The MTA keeps its queue, retries and bounces; egressd decides the
source address and the EHLO name that goes with it.

Three layers, each small:

* :class:`~egressd.proto.smtp_server.SmtpServer` (sans-IO) parses what the MTA sends and
  keeps the session state; every reply is decided here.
* :class:`MtaSession` (this module) is the trio shell facing the MTA: it reads and writes
  the socket (replies are collected and written before each read, so a pipelining MTA gets
  them in one segment, RFC 2920), applies the timeouts towards the MTA (per command, the
  mid-DATA stall, ``[smtp.timeouts] first_mail`` from the greeting to the first
  transaction, and ``min_data_rate`` over a body), does inbound STARTTLS and AUTH
  PLAIN/LOGIN, answers what needs no remote (EHLO, NOOP, RSET, QUIT, HELP, VRFY), and
  turns the drain into ``421 4.3.2`` at a command boundary outside any transaction.
* :class:`~egressd.relay.core.RelayCore` (sans-IO) makes every relay decision: pool, open
  or reuse a remote, 452 for another next hop, 421, oversize, abort without the dot; and
  :class:`~egressd.doors.smtp_relay.Relay` executes its commands (the remote session is
  :mod:`egressd.doors.smtp_remote`). Every reply egressd makes up is in
  :mod:`egressd.relay.replies`.

Towards the MTA egressd greets with its own hostname (``[smtp] hostname``, else the top
level ``hostname``, else the machine's FQDN) and advertises PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, ENHANCEDSTATUSCODES, DSN, AUTH PLAIN LOGIN, and STARTTLS when ``[smtp.tls]``
has a certificate (then, to non-loopback clients, AUTH only after STARTTLS). With
``[auth.users]`` configured, AUTH checks the password (wrong ones are throttled, see
:mod:`egressd.login`) and the relay refuses MAIL without AUTH unless the listener says
``auth = "optional"``; without users, any password is taken and only the username (a
pool name) matters.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import socket
import ssl
from dataclasses import dataclass
from typing import Literal, NoReturn

import trio

from egressd.config import Config, Listener, SmtpListener
from egressd.doors.common import client_host
from egressd.doors.smtp_relay import Relay
from egressd.log import get_logger
from egressd.login import FAILURES_PER_CONNECTION, password_matches
from egressd.net.connection import Connection, clock, timed
from egressd.net.tls import server_context
from egressd.proto.smtp_common import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    RemoteProtocolError,
    Reply,
    Rset,
    StartTls,
    Vrfy,
)
from egressd.proto.smtp_server import (
    AuthChallenge,
    AuthCredentials,
    BareLineEnding,
    CommandError,
    DataDiscarded,
    ServerEvent,
    ServerState,
    SmtpServer,
)
from egressd.relay import replies
from egressd.relay.events import (
    MtaAuthenticated,
    MtaBareLineEnding,
    MtaBody,
    MtaClosed,
    MtaCommand,
    MtaDataDiscarded,
    MtaEndOfData,
    MtaTimedOut,
    MtaTooSlow,
)
from egressd.runtime import Runtime, SessionRecord

__all__ = ["SmtpDoor", "client_host", "door_hostname", "is_loopback", "mta_extensions"]

log = get_logger("smtp")

_RECEIVE_SIZE = 65536
_TLS_HANDSHAKE_TIMEOUT = 30.0
#: Seconds of credit an MTA starts a body with before ``min_data_rate`` bites.
DATA_RATE_GRACE = 10.0


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()


async def door_hostname(config: Config) -> str:
    """egressd's name towards MTAs: ``[smtp] hostname``, ``hostname``, else the host's FQDN
    (looked up once, in a thread: it may wait on DNS)."""
    configured = config.smtp.hostname or config.hostname
    if configured:
        return configured
    fqdn: str = await trio.to_thread.run_sync(_fqdn)
    return fqdn


def mta_extensions(config: Config) -> tuple[str, ...]:
    """The EHLO extensions offered to MTAs."""
    size = config.smtp.max_message_size
    extensions = [
        "PIPELINING",
        f"SIZE {size}" if size else "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "AUTH PLAIN LOGIN",
    ]
    if config.smtp.tls.certificate and config.smtp.tls.private_key:
        extensions += ["STARTTLS", "REQUIRETLS"]  # REQUIRETLS: only once TLS is on (RFC 8689)
    return tuple(extensions)


def is_loopback(host: str) -> bool:
    """A client on this very host: 127.0.0.0/8, ::1, or ::ffff:127.0.0.0/104."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def auth_requires_tls(config: Config, host: str) -> bool:
    """AUTH only after STARTTLS: when there is a certificate, for every non-loopback client.

    A loopback connection never crosses a wire: whoever could read it there can already
    read egressd's configuration, and an MTA on the same host (Postfix with ``relayhost =
    [127.0.0.1]:2525``) need not wrap it in TLS.
    """
    tls = config.smtp.tls
    return bool(tls.certificate and tls.private_key) and not is_loopback(host)


def listener_requires_auth(listener: Listener) -> bool:
    """With ``[auth.users]``, MAIL needs AUTH first unless the listener says ``optional``."""
    return not (isinstance(listener, SmtpListener) and listener.auth == "optional")


class SmtpDoor:
    """The ``smtp`` front door (see the module doc).

    ``command_timeout`` bounds the wait for each command from the MTA (RFC 5321 4.5.3.2.7
    suggests 5 minutes), ``data_timeout`` the wait for each piece of the body.
    """

    name = "smtp"

    def __init__(self, *, command_timeout: float = 300.0, data_timeout: float = 180.0) -> None:
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout

    async def handle(
        self,
        stream: Connection,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> None:
        await MtaSession(self, stream, runtime, listener, record).run()

    async def refuse(
        self, stream: Connection, runtime: Runtime, listener: Listener, reason: str
    ) -> None:
        reply = replies.refused_at_capacity(await door_hostname(runtime.config), reason)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(reply.to_bytes())


@dataclass(slots=True)
class _Pace:
    """How fast the MTA sends a body: only the time spent waiting for it counts, not the
    time spent writing to the remote (one per session, reset at each body)."""

    rate: int
    waited: float = 0.0
    received: int = 0

    def allowance(self) -> float:
        """Seconds the MTA may still take before its average falls below ``rate``."""
        return DATA_RATE_GRACE + self.received / self.rate - self.waited


class _SessionOver(Exception):
    """The MTA connection is finished (closed, timed out, broken, or told 421)."""


class _ReadCut(Exception):
    """A read from the MTA missed its deadline, or a drain cut it short."""


@dataclass(slots=True)
class _Wait:
    """The write and read to the MTA in progress (:meth:`MtaSession._feed`): what its
    deadline is, for the reply when it passes, and whether a drain may cut it short. One
    per session, filled in by each write and read."""

    in_data: bool = False
    seconds: float = 0.0
    limit: Literal["timeout", "first mail", "rate"] = "timeout"
    idle: bool = False
    reading: bool = False


class MtaSession:
    """One MTA connection: the trio shell around :class:`SmtpServer` and a :class:`Relay`."""

    def __init__(
        self,
        door: SmtpDoor,
        stream: trio.abc.Stream,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
        relay_type: type[Relay] = Relay,
    ) -> None:
        self.door = door
        self.relay_type = relay_type
        #: Where the deadline of each write and read towards the MTA is set: the connection
        #: under the stream (and under TLS once STARTTLS is done).
        self.timed = timed(stream)
        self.stream: trio.abc.Stream = self.timed
        self.runtime = runtime
        self.listener = listener
        self.record = record
        self.config = runtime.config
        self.host = client_host(record.client)
        self.hostname = ""
        self.server = SmtpServer(
            extensions=mta_extensions(self.config),
            auth_requires_tls=auth_requires_tls(self.config, self.host),
        )
        self.failed_logins = 0
        self.timeouts = self.config.smtp.timeouts
        self.first_mail_by = 0.0  # set at the greeting
        self.mail_started = False
        self.pace: _Pace | None = None
        self.relay: Relay | None = None
        self.outbox = bytearray()
        #: The session's one cancel scope for reads from the MTA: a drain cancels it (see
        #: :meth:`_feed`).
        self.read_scope = trio.CancelScope()
        #: The drain cancelled :attr:`read_scope` (its ``cancel_called`` reads the clock).
        self.read_cut = False
        self.waiting = _Wait()
        #: The run's clock (trio's, read without its three-call path: twice a body).
        self.now = clock()

    # ----------------------------------------------------------------------- the loop

    async def run(self) -> None:
        self.hostname = await door_hostname(self.config)
        self.relay = self.relay_type(
            self.runtime,
            self.record,
            self.hostname,
            self.listener.pool,
            self.reply,
            auth_required=listener_requires_auth(self.listener),
        )
        clean = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_drain)
                try:
                    self.first_mail_by = self.now() + self.timeouts.first_mail
                    self.reply(replies.greeting(self.hostname))
                    await self._converse_in_time()
                    clean = True
                except _SessionOver:
                    clean = self.server.state is ServerState.CLOSED
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.relay.close(clean=clean)

    async def _converse_in_time(self) -> None:
        """:meth:`_converse` under the read deadlines (:meth:`_feed`); a read that misses
        its deadline ends the session with the reply that fits."""
        try:
            with self.read_scope:
                await self._converse()
                return
        except _ReadCut:
            pass
        await self._out_of_time(self.waiting)

    async def _converse(self) -> None:
        server = self.server
        while server.state is not ServerState.CLOSED:
            try:  # the next event, reading (and flushing replies) as needed, in here: a
                # coroutine less per command, and a frame less to resume after each wait
                event = server.next_event()
                while event is NEED_DATA:
                    await self._feed(in_data=False)
                    event = server.next_event()
            except RemoteProtocolError as exc:
                await self._peer_gone(exc)
            if event is PAUSED:  # every event is answered before the next is asked for
                raise AssertionError("the SMTP server machine is waiting for a reply")
            if self.runtime.draining and self._drain_now(event):
                self.reply(replies.draining(self.hostname))
                self.record.outcome = "drained"
                break
            await self.dispatch(event)
        await self.flush()

    def _drain_now(self, event: ServerEvent) -> bool:
        relay = self.relay
        return (
            self.runtime.draining
            and (relay is None or not relay.in_transaction)
            and not isinstance(event, (Quit, ConnectionClosed))
        )

    async def _watch_drain(self) -> None:
        await self.runtime.drain_started.wait()
        waiting = self.waiting
        if waiting.idle and waiting.reading:
            self._cut_read()

    def _cut_read(self) -> None:
        """A drain ends the wait for the MTA's next command (see :meth:`_feed`)."""
        self.read_cut = True
        self.read_scope.cancel()

    async def dispatch(self, event: ServerEvent) -> None:
        relay = self.relay
        assert relay is not None
        if isinstance(event, (Mail, Rcpt, Rset, Quit)):  # the usual ones first
            await relay.feed(MtaCommand(event))
            if not self.mail_started:
                self.mail_started = relay.in_transaction
        elif type(event) is Data:
            await relay.feed(MtaCommand(event))
            if self.server.state is ServerState.DATA:  # the remote's 354 was passed on
                await self._relay_body(relay)
        elif isinstance(event, ConnectionClosed):
            await self._peer_gone(event)
        elif isinstance(event, (Ehlo, Helo)):
            await self._hello(event)
        elif isinstance(event, Noop):
            self.reply(replies.noop())
        elif isinstance(event, Vrfy):
            self.reply(replies.vrfy())
        elif isinstance(event, Help):
            self.reply(replies.help_text())
        elif isinstance(event, StartTls):
            await self._starttls()
        elif isinstance(event, AuthChallenge):
            self.reply(event.reply)
        elif isinstance(event, AuthCredentials):
            await self._auth(event)
        elif isinstance(event, CommandError):
            self.reply(event.reply)
        else:  # body events outside DATA cannot happen: the machine emits them only there
            raise AssertionError(f"unexpected event {event!r}")

    # ----------------------------------------------------------------------- I/O

    def reply(self, reply: Reply) -> None:
        """Queue a reply; it goes out before the next read (or at the end)."""
        self.outbox += self.server.send(reply)

    async def flush(self) -> None:
        if not self.outbox:
            return
        data = bytes(self.outbox)
        self.outbox.clear()
        try:
            with trio.fail_after(self.door.command_timeout):
                await self.stream.send_all(data)
            self.record.bytes_down += len(data)
        except trio.TooSlowError:
            self._over("timeout", "the MTA does not read its replies")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._over("disconnected", "the MTA closed the connection")

    async def _feed(self, *, in_data: bool) -> None:
        """Write the queued replies, then read from the MTA; one deadline covers both.
        ``in_data``: the read is for a body (only :meth:`_relay_body` reads in DATA or
        DISCARD, so the caller says so without asking the machine's state).

        The deadline is the command or data timeout, or sooner: the first MAIL's deadline
        before the first transaction, the minimum data rate during a body. Outside a
        transaction a drain may cut the wait short, but never a write: a reply to a final
        dot is always delivered whole.

        The deadline is the stream's (:meth:`egressd.net.connection.Connection.time_limit`,
        set here for this write and read and back to none after them), not a cancel scope
        per read: a clock reading is then made only when the read has to wait (see
        :mod:`egressd.net.connection`). When it passes, or a drain cancels the session's
        :attr:`read_scope` while it waits, :class:`_ReadCut` unwinds the whole conversation
        to :meth:`_converse_in_time`, which answers as :attr:`waiting` says; every limit ends
        the session anyway.
        """
        allowed = self._wait_for(in_data)
        waiting = self.waiting
        pace = self.pace if in_data else None
        started = self.now() if pace is not None else 0.0
        timed = self.timed
        timed.time_limit(allowed)
        try:
            out = self.outbox
            if out:  # handed over whole, a new one for the next replies (no copy)
                self.outbox = bytearray()
                await self.stream.send_all(out)
                self.record.bytes_down += len(out)
            if waiting.idle and self.runtime.draining:
                self._cut_read()
            waiting.reading = True
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        except trio.TooSlowError:
            raise _ReadCut from None
        finally:
            timed.time_limit(math.inf)
        if self.read_cut:  # a drain, too late for this read
            raise _ReadCut
        waiting.reading = False
        self.record.bytes_up += len(data)
        if pace is not None:
            pace.waited += self.now() - started
            pace.received += len(data)
        self.server.receive_data(data if type(data) is bytes else bytes(data))

    def _wait_for(self, in_data: bool) -> float:
        """Fill in :attr:`waiting` for the next write and read; the seconds they may take
        (raises :class:`_ReadCut` when its limit passed already: none can be in time)."""
        waiting = self.waiting
        waiting.in_data = in_data
        waiting.reading = False
        waiting.limit = "timeout"
        if in_data:
            waiting.seconds = seconds = self.door.data_timeout
            waiting.idle = False
            if self.pace is None:
                return seconds
        else:
            waiting.seconds = seconds = self.door.command_timeout
            relay = self.relay
            waiting.idle = relay is None or not relay.in_transaction
            if self.mail_started:
                return seconds
        allowed, waiting.limit = self._deadline(in_data, seconds)
        if allowed <= 0:
            raise _ReadCut
        return allowed

    def _deadline(
        self, in_data: bool, seconds: float
    ) -> tuple[float, Literal["timeout", "first mail", "rate"]]:
        """How long the next read may take, and which limit that is."""
        if not in_data and not self.mail_started:
            left = self.first_mail_by - self.now()
            if left < seconds:
                return max(left, 0.0), "first mail"
        if in_data and self.pace is not None:
            left = self.pace.allowance()
            if left < seconds:
                return max(left, 0.0), "rate"
        return seconds, "timeout"

    async def _out_of_time(self, waiting: _Wait) -> NoReturn:
        in_data, seconds, limit = waiting.in_data, waiting.seconds, waiting.limit
        if waiting.idle and self.runtime.draining:
            await self._drained()
        if limit == "first mail":
            await self._say_421_and_close(
                replies.no_first_mail(self.hostname, self.timeouts.first_mail),
                f"no mail transaction within {self.timeouts.first_mail:g}s of the greeting",
            )
        if limit == "rate" and self.pace is not None:
            assert self.relay is not None
            await self.relay.feed(MtaTooSlow(self.pace.rate))
            await self._say_421_and_close(
                replies.mta_too_slow(self.hostname, self.pace.rate),
                f"the MTA sent the body below {self.pace.rate} bytes/s",
            )
        await self._timed_out(in_data, seconds)

    async def _say_421_and_close(self, reply: Reply, detail: str) -> NoReturn:
        if self.server.state not in (ServerState.CLOSED, ServerState.ERROR):
            self.reply(reply)
            with trio.move_on_after(5):
                await self.flush()
        self._over("timeout", detail)

    async def _drained(self) -> NoReturn:
        self.reply(replies.draining(self.hostname))
        self.record.outcome = "drained"
        await self.flush()
        raise _SessionOver("drained")

    async def _timed_out(self, in_data: bool, seconds: float) -> NoReturn:
        what = "the message body" if in_data else "a command"
        if in_data and self.relay is not None:
            await self.relay.feed(MtaTimedOut(seconds))
        if self.server.state not in (ServerState.CLOSED, ServerState.ERROR):
            self.reply(replies.mta_timeout(self.hostname, in_data))
            with trio.move_on_after(5):
                await self.flush()
        self._over("timeout", f"no {what} from the MTA within {seconds:g}s")

    def _over(self, outcome: str, detail: str) -> NoReturn:
        if self.record.outcome == "closed":
            self.record.outcome = outcome
        self.record.detail = self.record.detail or detail
        raise _SessionOver(detail)

    async def _peer_gone(self, event: ConnectionClosed | RemoteProtocolError) -> NoReturn:
        if isinstance(event, RemoteProtocolError):
            if event.reply is not None and self.server.state is not ServerState.ERROR:
                self.reply(event.reply)
            self.record.detail = event.description
        await self.flush()
        self._over("closed" if isinstance(event, ConnectionClosed) else "protocol error", "")

    # ----------------------------------------------------------------------- commands

    async def _hello(self, event: Ehlo | Helo) -> None:
        assert self.relay is not None
        await self.relay.feed(MtaCommand(event))  # ends any transaction
        if isinstance(event, Ehlo):
            self.reply(self.server.ehlo_reply(self.hostname, "egressd"))
        else:
            self.reply(replies.helo(self.hostname))

    async def _relay_body(self, relay: Relay) -> None:
        """Stream the body to the remote: each read's worth of chunks in one write, and the
        last ones together with the final dot."""
        pace = self.pace
        if pace is not None:  # the session's, from the first body on
            pace.waited = 0.0
            pace.received = 0
        elif self.timeouts.min_data_rate:
            self.pace = _Pace(self.timeouts.min_data_rate)
        chunks: list[DataChunk] = []
        while True:
            try:
                event = self.server.next_event()
            except RemoteProtocolError as exc:
                await relay.feed(MtaClosed())
                await self._peer_gone(exc)
            if event is NEED_DATA:
                if chunks:
                    await relay.feed(MtaBody(tuple(chunks)))
                    chunks = []
                await self._feed(in_data=True)
                continue
            if type(event) is DataChunk:
                chunks.append(event)
            elif type(event) is EndOfData:
                await relay.feed(MtaEndOfData(tuple(chunks)))
                return
            elif isinstance(event, BareLineEnding):
                chunks = []
                await relay.feed(MtaBareLineEnding())
            elif isinstance(event, DataDiscarded):
                await relay.feed(MtaDataDiscarded(event.reply))
                return
            elif isinstance(event, ConnectionClosed):
                await relay.feed(MtaClosed())
                await self._peer_gone(event)
            else:
                raise AssertionError(f"unexpected event in DATA: {event!r}")

    async def _starttls(self) -> None:
        tls = self.config.smtp.tls
        try:
            assert tls.certificate is not None and tls.private_key is not None
            context = server_context(tls.certificate, tls.private_key)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load the STARTTLS certificate: %s", exc)
            self.reply(replies.tls_unavailable())
            return
        self.reply(replies.tls_ready())
        await self.flush()
        try:
            self.server.start_tls()
        except RemoteProtocolError as exc:
            self._over("protocol error", str(exc))
        ssl_stream = trio.SSLStream(self.stream, context, server_side=True)
        try:
            with trio.fail_after(_TLS_HANDSHAKE_TIMEOUT):
                await ssl_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            self._over("tls failed", f"STARTTLS handshake with the MTA failed: {exc}")
        self.stream = ssl_stream
        self._authenticated(None)

    async def _auth(self, credentials: AuthCredentials) -> None:
        if not self._credentials_valid(credentials):
            await self._auth_failed(credentials.username)
            return
        self._authenticated(credentials.username)
        self.reply(replies.auth_succeeded())

    def _credentials_valid(self, credentials: AuthCredentials) -> bool:
        users = self.config.auth
        if not users:  # no passwords configured: the username only names a pool
            return credentials.username in self.config.pools
        user = users.get(credentials.username)
        return password_matches(user.password if user else None, credentials.password)

    async def _auth_failed(self, username: str) -> None:
        """535 after the client address's delay; after the connection's last allowed
        failure, 421 and close (see :mod:`egressd.login`)."""
        delay = self.runtime.login_failed(self.door.name, self.record.client, self.host, username)
        self.failed_logins += 1
        await trio.sleep(delay)
        self.reply(replies.auth_failed())
        if self.failed_logins >= FAILURES_PER_CONNECTION:
            self.reply(replies.too_many_auth_failures(self.hostname))
            await self.flush()
            self._over("auth failures", f"{self.failed_logins} failed authentications")

    def _authenticated(self, user: str | None) -> None:
        assert self.relay is not None
        commands = self.relay.core.handle(MtaAuthenticated(user))
        assert not commands, commands
