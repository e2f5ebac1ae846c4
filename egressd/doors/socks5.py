"""The SOCKS5 front door (RFC 1928, RFC 1929 and KumoMTA's BIND-then-CONNECT).

Theory of operation
-------------------
One accepted connection is driven through the sans-IO
:class:`~egressd.proto.socks5_server.Socks5Server`; this module only reads, writes, decides
and dials: it answers each message the machine parses, and a client that breaks the
protocol gets the reply the machine's error names (outcome ``protocol_error``).

A listener with ``use_tls`` first runs a TLS handshake (:func:`_accept_tls`, bounded by
``handshake_timeout`` too; mutual TLS with ``tls_required_client_ca``), and everything
below then happens inside TLS (:class:`~egressd.net.tls.TlsConnection`, relayed through
trio rather than spliced). A failed handshake ends the session as ``tls_failed``.

Handshake (bounded by ``[limits] handshake_timeout``; on expiry the connection is closed
with outcome ``timeout``):

* Method: with ``[auth.users]`` configured, a client must offer username/password
  (otherwise ``05 FF``). Without, "no authentication" is accepted and a username, when
  offered, only tags the pool.
* RFC 1929: the username names the pool (Exim's ``name=POOL``; KumoMTA's
  ``socks5_proxy_username``). With users configured the password must match
  (constant-time compare), otherwise ``01 01`` and close, outcome ``denied``; a user
  written ``name = { password = "...", pools = ["a", "b"] }`` may use those pools (KumoMTA
  sends one credential for all its sources), one written ``name = "password"`` the pool
  ``name``. Such a user's CONNECT without BIND goes through the listener's pool when the
  user may use it, else the user's first pool.
* ``BIND addr:0`` (KumoMTA's convention) selects the configured source whose address is
  ``addr`` (:meth:`Config.source_for_address`: its ``source_address`` or its proxy's
  address) with all it defines (proxy, ``remote_port``). An address of no configured source,
  a name, or (with users configured) a source in none of the user's pools gets reply 02.
  A suspended source gets 01, and so does a direct source whose address this host cannot
  bind (tried at once, with ``IP_BIND_ADDRESS_NO_PORT``, and released): that is how
  KumoProxy fails, and kumod then suspends the source on its side. The dial binds again at
  CONNECT time. BIND without a following CONNECT gets 07 (the machine does that).
* ``CONNECT``: IPv4, IPv6 or a name. Source: the BIND's, else the pool named by the
  username, else the listener's ``pool``. Access checks and dialing are the plan of
  :func:`egressd.doors.common.outbound_plan` (a name is resolved here, in the source's
  family, and the resolved address is checked before it is dialed), run under the
  handshake's cancel scope with its deadline moved to ``[dial] timeout``.

Replies: 02 for access denials (and a pool that does not exist), 01 when no source can be
had (all suspended, or at ``max_connections_per_source``), and for the typed failure
of the outbound plan (:func:`_reply_for`): 01 unplumbed source or proxy failure, 03/04
unreachable, 05 refused, 06 timeout; a destination whose circuit breaker is open gets
the reply of the failure that opened it. The success reply carries the outbound connection's
real local address (``Dialed.local_address``), in the request's address family, because
Exim reads a reply as long as its request. UDP ASSOCIATE gets 07, unknown address types
08, a name that is no valid DNS name 04 (the machine does all three), and so does a name
the resolver cannot handle: every resolver failure is reply 04, never a crash.

Then the client and the destination are spliced (:mod:`egressd.net.splice`); bytes the
client pipelined after its CONNECT are delivered first.

Overload (``max_connections``): :meth:`Socks5Door.refuse` speaks just enough SOCKS5 to
refuse properly: it answers the greeting, accepts any credentials (nothing is served, so
nothing is protected), and replies 01 to the first request, then closes. A client then
reports "general SOCKS server failure" instead of a mysterious EOF. The daemon bounds this
to a few seconds.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Coroutine, Mapping
from typing import Any

import trio

from egressd.config import Config, LimitSettings, Listener, Socks5Listener, Source, User
from egressd.doors.common import (
    client_host,
    connected,
    note_destination,
    note_dialed,
    note_refusal,
    outbound_plan,
    relay_session,
)
from egressd.egress import Egress, EgressFailure, Failure, Plan, Stage
from egressd.login import password_matches
from egressd.net.connection import Connection
from egressd.net.dialer import Dialed, connect
from egressd.net.egress import execute
from egressd.net.tls import TlsConnection, server_context
from egressd.proto import NEED_DATA, socks5
from egressd.runtime import Runtime, SessionRecord, printable

_RECEIVE_SIZE = 4096
_TLS_CLOSE_TIMEOUT = 1.0
# Linux's value; the socket module names it only on Linux builds (and typeshed not at all).
_IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Socks5Door:
    """The SOCKS5 front door; see the module docstring."""

    name = "socks5"

    def handle(
        self,
        stream: Connection,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> Coroutine[Any, Any, None]:
        """The session's coroutine: a plain function that returns the connection's own
        ``run()`` (a TLS listener's wraps it), so a session's task waits with one frame
        less on its stack, and every resumption of it costs one call less."""
        if isinstance(listener, Socks5Listener) and listener.use_tls:
            return _handle_tls(stream, runtime, listener, record)
        return _AcceptedConnection(stream, runtime, listener, record).run()

    async def refuse(
        self, stream: Connection, runtime: Runtime, listener: Listener, reason: str
    ) -> None:
        """Answer the greeting, then reply 01 (general failure) to the first request; on a
        ``use_tls`` listener inside TLS, since its clients read nothing else."""
        if not (isinstance(listener, Socks5Listener) and listener.use_tls):
            await _refuse(stream)
            return
        record = SessionRecord(self.name, "")  # the refusal's own: the daemon logged it
        tls = await _accept_tls(stream, listener, runtime.config.limits, record)
        if tls is None:
            return
        try:
            await _refuse(tls)
        finally:
            await _close_tls(tls)


async def _refuse(stream: trio.abc.Stream) -> None:
    """Just enough SOCKS5 to refuse: the greeting answered, then 01 to the first request."""
    server = socks5.Socks5Server()
    try:
        while not server.closed:
            try:
                event = server.next_event()
            except socks5.Socks5ProtocolError as exc:
                if exc.reply is not None:
                    await _send(stream, server.send(exc.reply))
                return
            if event is NEED_DATA:
                server.receive_data(await _receive(stream))
            elif isinstance(event, socks5.ConnectionClosed):
                return
            else:
                await _send(stream, server.send(_refusal_answer(event)))
    except trio.BrokenResourceError:
        return


async def _handle_tls(
    stream: Connection, runtime: Runtime, listener: Socks5Listener, record: SessionRecord
) -> None:
    """A ``use_tls`` listener's session: the TLS handshake, then SOCKS5 inside TLS."""
    tls = await _accept_tls(stream, listener, runtime.config.limits, record)
    if tls is None:
        return
    try:
        await _AcceptedConnection(tls, runtime, listener, record).run()
    finally:
        await _close_tls(tls)


def _refusal_answer(
    event: socks5.Greeting | socks5.AuthRequest | socks5.BindRequest | socks5.ConnectRequest,
) -> socks5.ServerAnswer:
    """Just enough SOCKS5 to refuse: any method, any credentials, then 01."""
    if isinstance(event, socks5.Greeting):
        return socks5.MethodChoice(socks5.choose_method(event.methods, require_auth=False))
    if isinstance(event, socks5.AuthRequest):
        return socks5.AuthResult(accepted=True)
    return socks5.Refused(socks5.ReplyCode.GENERAL_FAILURE)


async def _accept_tls(
    stream: Connection, listener: Socks5Listener, limits: LimitSettings, record: SessionRecord
) -> TlsConnection | None:
    """The TLS handshake of a ``use_tls`` listener, within ``handshake_timeout``; None (the
    record says why) when it failed: with ``tls_required_client_ca``, a client without a
    certificate from those CAs fails here, before a SOCKS byte is read."""
    assert listener.tls_certificate is not None and listener.tls_private_key is not None
    try:
        context = server_context(
            listener.tls_certificate, listener.tls_private_key, listener.tls_required_client_ca
        )
    except (OSError, ssl.SSLError) as exc:
        record.outcome = "tls_failed"
        record.detail = f"cannot load the listener's certificate: {exc}"
        return None
    tls = trio.SSLStream(stream, context, server_side=True)
    with trio.move_on_after(limits.handshake_timeout) as scope:
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            record.outcome = "tls_failed"
            record.detail = f"TLS handshake failed: {exc.__cause__ or exc}"
            return None
    if scope.cancelled_caught:
        record.outcome = "timeout"
        record.detail = f"TLS handshake not finished within {limits.handshake_timeout:g}s"
        return None
    return TlsConnection(tls)


async def _close_tls(client: trio.abc.HalfCloseableStream) -> None:
    """close_notify, briefly and best effort (the daemon closes the socket anyway)."""
    with (
        trio.move_on_after(_TLS_CLOSE_TIMEOUT),
        contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
        ),
    ):
        await client.aclose()


async def _receive(stream: trio.abc.ReceiveStream) -> bytes:
    """The next bytes from the client; a reset counts as EOF."""
    try:
        return bytes(await stream.receive_some(_RECEIVE_SIZE))
    except trio.BrokenResourceError:
        return b""


async def _send(stream: trio.abc.SendStream, data: bytes) -> None:
    if data:
        await stream.send_all(data)


class _AcceptedConnection:
    """One accepted SOCKS5 client connection: handshake, dial, reply, relay."""

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> None:
        self.stream = stream
        self.runtime = runtime
        self.egress: Egress = runtime.egress  # this session's generation, taken once
        self.config = self.egress.config
        self.record = record
        self.users: Mapping[str, User] = self.config.auth
        self.allowed: tuple[str, ...] | None = None  # with users: the pools this one may use
        self.username = ""
        self.server = socks5.Socks5Server()
        self.pool: str | None = listener.pool
        self.source: Source | None = None
        self.client_eof = False
        self.stage_at_eof = ""  # the handshake's stage when the client closed

    async def run(self) -> None:
        limits = self.config.limits
        try:
            dialed = await self.handshake_and_dial(limits)
            if dialed is None:
                return
            try:
                await self.reply_success(dialed)
                await relay_session(
                    self.runtime,
                    self.record,
                    self.stream,
                    dialed,
                    idle_timeout=limits.idle_timeout,
                    client_data=self.server.trailing_data,
                )
            finally:  # the socket and the shaping lease (no checkpoint)
                dialed.close()
        except trio.BrokenResourceError as exc:
            if self.record.outcome in ("closed", "ok"):
                self.record.outcome = "closed"
                self.record.detail = f"client went away: {exc.__cause__ or exc}"

    # ------------------------------------------------------------------ handshake

    async def handshake_and_dial(self, limits: LimitSettings) -> Dialed | None:
        """The handshake within ``handshake_timeout``, then the CONNECT's dial within the
        plan's ``[dial] timeout``; None when either failed (the reply owed was sent).

        One cancel scope serves both, its deadline moved when the dial starts: entering
        and leaving a trio cancel scope costs about 50 Python calls, a thirtieth of a
        short session.
        """
        plan: Plan | None = None
        failure: EgressFailure | None = None
        with trio.CancelScope(deadline=trio.current_time() + limits.handshake_timeout) as scope:
            request = await self.negotiate()
            if request is None:
                return None
            plan = outbound_plan(
                self.egress, request.host, request.port, pool=self.pool, source=self.source
            )
            scope.deadline = trio.current_time() + plan.timeout
            dialed: Dialed | None = None
            try:
                dialed = connected(plan, await execute(plan, connect, hold_slot=True))
            except EgressFailure as exc:
                failure = exc
            else:
                note_dialed(self.record, dialed, request.host)  # the destination dialed
                return dialed
            finally:  # a dial that failed, timed out or was cancelled: the destination asked
                if dialed is None:
                    note_destination(self.record, request.host, request.port)
        if plan is None:
            self.record.outcome = "timeout"
            self.record.detail = (
                f"SOCKS5 handshake not finished within {limits.handshake_timeout:g}s"
            )
            return None
        if failure is None:  # the dial's deadline expired
            failure = plan.timed_out()
        note_refusal(self.record, failure)
        await _send(self.stream, self.server.send(socks5.Refused(_reply_for(failure))))
        return None

    async def negotiate(self) -> socks5.ConnectRequest | None:
        """Run the machine up to a CONNECT; None when it closed (reply already sent)."""
        server = self.server
        while True:
            try:
                event = server.next_event()
            except socks5.Socks5ProtocolError as exc:
                await self.broken(exc)
                return None
            if event is NEED_DATA:
                try:  # _receive(), inline: a frame less while the task waits for the client
                    data = bytes(await self.stream.receive_some(_RECEIVE_SIZE))
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.client_eof = True
                    self.stage_at_eof = server.state.value
                server.receive_data(data)
            elif isinstance(event, socks5.ConnectRequest):
                return event
            elif isinstance(event, socks5.ConnectionClosed):
                self.record.detail = f"client closed during the {self.stage_at_eof}"
                return None
            else:
                answer = self.answer(event)
                if isinstance(answer, socks5.AuthResult) and not answer.accepted:
                    assert isinstance(event, socks5.AuthRequest)
                    await self.login_failed(event.username)
                await self.stream.send_all(server.send(answer))
                if server.closed:  # a refusal: nothing more to read
                    return None

    def answer(
        self, event: socks5.Greeting | socks5.AuthRequest | socks5.BindRequest
    ) -> socks5.ServerAnswer:
        if isinstance(event, socks5.Greeting):
            return self.choose_method(event)
        if isinstance(event, socks5.AuthRequest):
            return socks5.AuthResult(self.authenticate(event))
        return self.bind(event)

    def choose_method(self, greeting: socks5.Greeting) -> socks5.MethodChoice:
        """02 whenever offered; without it, 00 unless ``[auth.users]`` is set, else FF."""
        method = socks5.choose_method(greeting.methods, require_auth=bool(self.users))
        if method == socks5.METHOD_NO_ACCEPTABLE:
            self.record.outcome = "denied"
            self.record.detail = "client offers no acceptable authentication method"
        return _METHOD_CHOICES[method]

    def authenticate(self, request: socks5.AuthRequest) -> bool:
        username = request.username
        user = self.users.get(username)
        if self.users and (user is None or not password_matches(user.password, request.password)):
            self.record.outcome = "denied"
            self.record.detail = f"RFC 1929 credentials refused for user {username!r}"
            self.record.pool = printable(username) or None  # the pool it asked for
            return False
        self.username = username
        if user is not None:
            self.allowed = user.pools_for(username)
            self.pool = self.pool if self.pool in self.allowed else self.allowed[0]
            self.record.pool = self.pool
        elif username:
            self.pool = username
            self.record.pool = username
        return True

    async def login_failed(self, username: str) -> None:
        """A refused RFC 1929 login: log and count it, then wait the client address's delay
        (:mod:`egressd.login`, shared with the SMTP door) before the refusal goes out. RFC 1929
        closes the connection after a refusal, so each guess costs a connection and a delay."""
        host = client_host(self.record.client)
        delay = self.runtime.login_failed("socks5", self.record.client, host, username)
        await trio.sleep(delay)

    def bind(self, request: socks5.BindRequest) -> socks5.Succeeded | socks5.Refused:
        """KumoMTA's ``BIND source:0``: pick the source with that address, if this user may
        use it, it is not suspended and its address can be bound here; connect nothing yet."""
        address = request.address
        source = None if isinstance(address, str) else self.config.source_for_address(address)
        if source is None or isinstance(address, str):
            return self.refuse_bind(
                "denied", f"BIND {address}: no configured source has this address"
            )
        if self.allowed is not None and not _in_pools(self.config, source, self.allowed):
            return self.refuse_bind(
                "denied",
                f"BIND {address}: source {source.name!r} is in none of the pools user"
                f" {self.username!r} may use ({', '.join(self.allowed)})",
            )
        self.record.source = source.name
        self.record.pool = None  # the exact source, not a pool, decides
        if self.egress.health.is_suspended(source.name):
            return self.refuse_bind(
                "refused", f"BIND {address}: source {source.name!r} is suspended", failure=True
            )
        used = self.egress.quotas.refusal(source.name, "other")
        if used is not None:  # kumod then picks another source for this connection
            return self.refuse_bind("refused", f"BIND {address}: {used}", failure=True)
        unbindable = _bind_problem(source)
        if unbindable is not None:
            return self.refuse_bind("dial_failed", f"BIND {address}: {unbindable}", failure=True)
        self.source = source
        return socks5.Succeeded(address, 0)

    def refuse_bind(self, outcome: str, detail: str, *, failure: bool = False) -> socks5.Refused:
        """02 (not allowed) for a source the client may not use; 01 (general failure) for
        one that cannot send now, as KumoProxy answers an unplumbed address."""
        self.record.outcome = outcome
        self.record.detail = detail
        code = socks5.ReplyCode.GENERAL_FAILURE if failure else socks5.ReplyCode.NOT_ALLOWED
        return socks5.Refused(code)

    async def broken(self, error: socks5.Socks5ProtocolError) -> None:
        """The client broke the protocol: send the reply owed, if any, and say why."""
        if error.reply is not None:
            await _send(self.stream, self.server.send(error.reply))
        if not self.client_eof:
            self.record.outcome = "protocol_error"
        self.record.detail = str(error)

    # ------------------------------------------------------------------ reply

    async def reply_success(self, dialed: Dialed) -> None:
        bound, port = dialed.local_address
        await self.stream.send_all(self.server.send(socks5.Succeeded(bound, port)))


def _in_pools(config: Config, source: Source, pools: tuple[str, ...]) -> bool:
    """True when ``source`` is in one of ``pools`` with a weight above 0."""
    return any(
        entry.source == source.name and entry.weight > 0
        for name in pools
        if name in config.pools
        for entry in config.pools[name].entries
    )


def _bind_problem(source: Source) -> str | None:
    """Why this host cannot send from ``source``'s address, or None (a direct source's
    address is bound for a moment, without a port, as the dialer will bind it)."""
    address = source.source_address
    if source.hop != "direct" or address is None:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            return (
                f"source {source.name!r} address {address} cannot be bound on this host:"
                f" {exc.strerror or exc}"
            )
    return None


_METHOD_CHOICES = {
    method: socks5.MethodChoice(method)  # frozen: one of each serves every session
    for method in (
        socks5.METHOD_NO_AUTH,
        socks5.METHOD_USERNAME_PASSWORD,
        socks5.METHOD_NO_ACCEPTABLE,
    )
}

_REPLIES: dict[Failure, socks5.ReplyCode] = {
    Failure.DENIED: socks5.ReplyCode.NOT_ALLOWED,
    Failure.UNKNOWN_POOL: socks5.ReplyCode.NOT_ALLOWED,
    Failure.REFUSED: socks5.ReplyCode.CONNECTION_REFUSED,
    Failure.HOST_UNREACHABLE: socks5.ReplyCode.HOST_UNREACHABLE,
    Failure.NETWORK_UNREACHABLE: socks5.ReplyCode.NETWORK_UNREACHABLE,
    Failure.TIMEOUT: socks5.ReplyCode.TTL_EXPIRED,
    Failure.RESOLVE: socks5.ReplyCode.HOST_UNREACHABLE,
    Failure.NO_ADDRESS: socks5.ReplyCode.HOST_UNREACHABLE,
}


def _reply_for(exc: EgressFailure) -> int:
    """The RFC 1928 reply for a failure: 02 denied or no such pool, 05 refused, 04/03
    unreachable, 04 a name that does not resolve (or not in the source's family), 06
    timeout, 01 for the rest (no source, unplumbed, proxy failures). A
    destination whose breaker is open gets the reply of the failure that opened it (04
    when that was not a connect failure). The deadline expiring while the name was still
    being resolved is a resolver failure too (04), not a connect timeout."""
    if exc.kind is Failure.TIMEOUT and exc.stage is Stage.RESOLVE:
        return int(socks5.ReplyCode.HOST_UNREACHABLE)
    if exc.kind is Failure.DESTINATION_FAILING:
        opened_by = exc.cause if exc.cause is not None else exc.kind
        return int(_REPLIES.get(opened_by, socks5.ReplyCode.HOST_UNREACHABLE))
    return int(_REPLIES.get(exc.kind, socks5.ReplyCode.GENERAL_FAILURE))
