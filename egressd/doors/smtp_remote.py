"""The relay's outbound side: one SMTP connection to a recipient domain's mail server.

Theory of operation
-------------------
:func:`open_remote` turns a pool and a recipient domain into a :class:`RemoteSession` that
is ready for MAIL. It runs the egress plan (:class:`~egressd.egress.Plan`: which source,
the one retry on the pool's next source, health and the destination breaker) with its
executor (:func:`egressd.net.egress.execute`), supplying the two SMTP parts:

* the resolver: the domain's next hop (:mod:`egressd.net.mx`) for the picked source's IP
  version, its addresses in order (lowest MX preference first), minus those
  ``[access] deny_destinations`` forbids;
* the per-address step: connect from the source (within ``[dial] timeout``), read the
  banner, send ``EHLO <the source's ehlo_domain>`` (egressd's hostname when the source has
  none), STARTTLS as ``[smtp.tls]`` says, and EHLO again. A failure there is the
  destination's (kind ``rejected``), so the plan tries the next address. Every reply, from
  the banner on, goes to the shaping reply rules (:meth:`RemoteSession.hear`); one that
  suspends the source there makes the plan move to the pool's next source instead.

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

Per domain, :mod:`egressd.tlspolicy` picks the policy (``[smtp.tls.policy]``, MTA-STS,
the default); with DANE on (``[smtp.tls] dane``, or the override ``dane``), each MX host
with DNSSEC-validated TLSA records (:mod:`egressd.net.dane`) is delivered to under DANE
instead: TLS required, the certificate checked against the TLSA records after the
handshake (a mismatch fails that host, and the next MX is tried). A host whose TLSA
look-up failed is not used at all.

REQUIRETLS (RFC 8689): when the MAIL carries it, a host is used only when the
session is verified TLS under a policy that also secures the MX look-up (DANE, MTA-STS
``enforce``; ``verify`` only for a configured route, whose host is the operator's and not
from DNS) and the remote offers REQUIRETLS; otherwise the next MX is tried. When no host
qualifies and every failure was that, the MTA gets ``550 5.7.30`` (the destination cannot
honour it: the MTA returns the message, as RFC 8689 wants), else the usual 4xx. The
MAIL goes on to the remote with REQUIRETLS; :meth:`RemoteSession.view` shows REQUIRETLS
only on a session that qualifies, so a kept connection that does not is refused too.

Sharing a connection: the relay core lets another domain's mail ride an open connection
when the next hops match (same MX hosts, or the connected address is among the other
domain's best). That domain's TLS policy may be stricter than the one the connection was
opened under (a domain without MTA-STS and one with ``enforce`` hosted on the same MX),
so the next hop the core sees (:class:`_TlsBoundNextHop`) also asks that the other
domain's policy accept the connection as it is (:func:`session_fits`, judged by
:meth:`RemoteSession.judge_tls` when the shell resolves that domain's next hop): else the
core does what it does for another next hop (``452`` in the transaction, a fresh
connection for the next one).

The sans-IO :class:`~egressd.proto.smtp_client.SmtpClient` does the protocol; this module
only moves bytes. :class:`RemoteSession` has no deadlines of its own: :func:`converse`
puts the ``[smtp.timeouts]`` entry that fits (each below Postfix's own client timeouts, so
the MTA always hears from egressd first) around an exchange with a cancel scope and
returns the outcome as the relay core's event (:class:`~egressd.relay.events.RemoteReplied`,
:class:`~egressd.relay.events.RemoteTimedOut` or :class:`~egressd.relay.events.RemoteLost`).
A failure while opening is a :class:`RemoteError` carrying the 4xx reply the MTA should get
(built in :mod:`egressd.relay.replies`), which names the source, the address and the error.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import ssl
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio

from egressd.access import destination_refusal
from egressd.config import Config, IPAddress, SmtpTimeouts, Source, format_hostport
from egressd.egress import (
    Attempt,
    Destination,
    Egress,
    EgressFailure,
    Failure,
    Party,
    Plan,
    Progress,
    Resolve,
    Stage,
)
from egressd.egress.failures import timeout_kind
from egressd.egress.quotas import ConnectionQuota
from egressd.log import get_logger
from egressd.net.connection import Connection, TimedStream, timed
from egressd.net.dane import dane_hosts
from egressd.net.dialer import Dialed, connect
from egressd.net.egress import execute
from egressd.net.egress import selection_refusal as egress_selection_refusal
from egressd.net.mtasts import mta_sts_policy
from egressd.net.mx import NEXT_HOPS, MxHost, NextHop, NextHopError
from egressd.net.shaping import ShapedDestination, smtp_budget
from egressd.net.tls import client_context
from egressd.proto.smtp_client import ClientCommand, SmtpClient
from egressd.proto.smtp_common import (
    NEED_DATA,
    Ehlo,
    Helo,
    Quit,
    RemoteProtocolError,
    Reply,
    StartTls,
)
from egressd.relay import replies
from egressd.relay.events import NextHops, Remote, RemoteLost, RemoteReplied, RemoteTimedOut
from egressd.runtime import Runtime
from egressd.tlspolicy import TlsPolicy, TlsTry, configured_policy, tries, with_mta_sts
from egressd.tlspolicy.choice import Connected, accepts, policy_for_host, wants_dane
from egressd.tlspolicy.dane import DaneHost
from egressd.tlspolicy.tlsa import TlsaResult, match_tlsa

__all__ = [
    "RemoteError",
    "RemoteSession",
    "converse",
    "denied_addresses",
    "next_hop",
    "open_remote",
    "selection_refusal",
]

_log = get_logger("smtp")
_RECEIVE_SIZE = 65536
_QUIT_WAIT = 2.0


class RemoteError(Exception):
    """Opening the remote failed; ``reply`` is the 4xx for the MTA, naming the source, the
    address and the error; ``detail`` names the address and the error only."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.detail = detail or reply.text


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
    next_hop: NextHop
    timeouts: SmtpTimeouts
    stream: trio.abc.Stream
    client: SmtpClient = field(default_factory=SmtpClient)
    tls_version: str | None = None
    #: The TLS policy applied (its label) and how it went, for the log line.
    tls_policy: str = "opportunistic"
    tls_result: str = ""
    #: DANE: how the certificate fared against the TLSA records (None: no DANE).
    dane_result: TlsaResult | None = None
    #: Whether this session may carry a REQUIRETLS message (see the module doc).
    requiretls_ok: bool = False
    #: Other domains this session may carry by their TLS policy (:meth:`judge_tls`).
    tls_fits: dict[str, bool] = field(default_factory=dict)
    #: True while the last exchange was still writing (for the timeout's wording).
    sending: bool = False
    #: The shaper bound to this connection's destination, holding its lease (or None).
    shaping: ShapedDestination | None = None
    #: The destination's shaping provider (``other``: none), whose warm-up quota it uses.
    provider: str = "other"
    #: The warm-up quota per message (:mod:`egressd.egress.quotas`), before the shaping lease.
    quota: ConnectionQuota | None = None
    #: Who hears a fired reply rule (the warm-up); None: nobody but the log.
    runtime: Runtime | None = None
    _exit: AsyncExitStack = field(default_factory=AsyncExitStack)
    #: Where :func:`converse` sets each exchange's deadline: the connection under the
    #: stream (and under TLS once STARTTLS is done).
    timed: Connection | TimedStream = field(init=False)

    def __post_init__(self) -> None:
        self.timed = timed(self.stream)
        self.stream = self.timed

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
    def next_hop_address(self) -> tuple[IPAddress, int]:
        """The address and the next hop's port (before a source's ``remote_port``)."""
        return self.address[0], self.mx_port

    def view(self) -> Remote:
        """What the relay core knows of this connection."""
        return Remote(
            source=self.source,
            next_hop=_TlsBoundNextHop(self.next_hop, self.tls_fits),
            next_hop_address=self.next_hop_address,
            remote_text=self.remote_text,
            describe=self.describe(),
            mx_name=self.mx_name,
            local_address=self.local_address,
            tls_version=self.tls_version,
            tls_policy=self.tls_policy,
            tls_result=self.tls_result,
            extensions={
                keyword: value
                for keyword, value in self.client.extensions.items()
                if keyword != "REQUIRETLS" or self.requiretls_ok
            },
            budget=self.quota or (self.shaping.lease if self.shaping is not None else None),
        )

    def hear(self, got: Sequence[Reply]) -> None:
        """The shaping reply rules hear the remote's replies, from the banner on (a
        ``Suspend`` moves the pool's next connections to that destination to its other
        sources); each rule that fires is logged and told to the warm-up."""
        if self.shaping is None:
            return
        for reply in got:
            for effect in self.shaping.replied(reply.code, reply.lines):
                _log.warning(
                    "shaping rule applied",
                    extra=_fields(
                        source=self.source.name,
                        scope=f"{effect.scope[1]} {effect.scope[2]}",
                        effect=type(effect).__name__.lower(),
                        reason=effect.reason,
                        reply=_first_line(reply),
                    ),
                )
                if self.runtime is not None:
                    self.runtime.shaping_rule_fired(self.source.name, self.provider, effect.reason)

    async def judge_tls(self, domain: str, next_hop: NextHop, config: Config) -> None:
        """Whether this session may carry ``domain``'s mail as its TLS policy (MTA-STS,
        DANE, ``[smtp.tls.policy]``) wants (:func:`session_fits`), for the core's
        ``same_destination``; once per domain."""
        domain = domain.lower().rstrip(".")
        if domain == self.next_hop.domain or domain in self.tls_fits:
            return
        policy = await domain_policy(domain, next_hop, config)
        dane = await domain_dane(domain, next_hop, config)
        self.tls_fits[domain] = session_fits(self, next_hop, policy, dane)

    def failure(self, enhanced: str, what: str) -> RemoteError:
        reply = replies.remote_failure(self.describe(), what, enhanced)
        return RemoteError(reply, f"{self.remote_text}: {what}")

    # ----------------------------------------------------------------------- I/O

    async def quit(self) -> None:
        """QUIT politely (waiting briefly for the 221), then close."""
        if self.client.awaiting_replies == 0:
            with contextlib.suppress(Exception):
                await converse(self, self.client.send(Quit()), 1, _QUIT_WAIT)
        await self.abort()

    async def abort(self) -> None:
        """Close at once: in the middle of DATA the remote never sees the final dot."""
        await trio.aclose_forcefully(self.stream)
        await self._exit.aclose()


@dataclass(frozen=True)
class _TlsBoundNextHop:
    """The next hop the relay core sees for a session: another domain's mail may share
    the connection only when the next hops allow it and that domain's TLS policy accepts
    the connection (:meth:`RemoteSession.judge_tls`; not judged: no)."""

    inner: NextHop
    fits: dict[str, bool]

    @property
    def domain(self) -> str:
        return self.inner.domain

    def same_destination(self, other: Any, connected: tuple[IPAddress, int]) -> bool:
        if not self.inner.same_destination(other, connected):
            return False
        domain = str(other.domain).lower().rstrip(".")
        return domain == self.inner.domain or self.fits.get(domain, False)


async def converse(
    session: RemoteSession, data: bytes, count: int, seconds: float
) -> RemoteReplied | RemoteTimedOut | RemoteLost:
    """Write ``data`` (if any), then read ``count`` replies, or fewer when one is a 421 (the
    session is over), within ``seconds``; the outcome as the core's event.

    The limit is the connection's (:meth:`egressd.net.connection.Connection.time_limit`),
    not a cancel scope per exchange (three or four a message). One coroutine, one loop over
    the client machine's events, reading whenever it needs data: an exchange and a wrapper
    turning its errors into events were a coroutine more to make and to resume after each
    wait, three times a message."""
    timed, client, stream = session.timed, session.client, session.stream
    timed.time_limit(seconds)
    session.sending = bool(data)
    got: list[Reply] = []
    try:
        if data:
            await stream.send_all(data)
        session.sending = False
        while count:
            event = client.next_event()
            if event is NEED_DATA:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                client.receive_data(chunk if type(chunk) is bytes else bytes(chunk))
                continue
            if not isinstance(event, Reply):  # the remote closed before every reply came
                return RemoteLost("closed")
            got.append(event)
            if event.code == 421:  # the session is over: no more replies
                break
            count -= 1
        return RemoteReplied(tuple(got))
    except RemoteProtocolError as exc:
        return RemoteLost("violation", detail=exc.description)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        return RemoteLost("error", session.sending, _error_text(exc))
    except trio.TooSlowError:
        return RemoteTimedOut(seconds, session.sending)
    finally:
        timed.time_limit(math.inf)


async def _command(
    session: RemoteSession, command: ClientCommand | None, seconds: float, what: str
) -> Reply:
    """One command of the opening conversation (``b""``: the banner); failures raise
    :class:`RemoteError` with the 4xx naming the source, the address and the error."""
    data = b"" if command is None else session.client.send(command)
    outcome = await converse(session, data, 1, seconds)
    if isinstance(outcome, RemoteReplied):
        session.hear(outcome.replies)  # a [TSS04] banner or EHLO reply fires rules too
        return outcome.replies[0]
    raise session.failure("4.4.2", replies.remote_failure_detail(what, outcome))


# --------------------------------------------------------------------------- opening


@dataclass
class _Greeting:
    """What a remote is greeted with: the source's EHLO name and this try's TLS."""

    ehlo_name: str
    tls: TlsTry
    ca_file: str | None


@dataclass
class _Opening:
    """One :func:`open_remote`: the resolver and the per-address step of the egress plan."""

    egress: Egress
    runtime: Runtime
    pool: str
    domain: str
    next_hops: NextHops
    hostname: str
    failures: list[str] = field(default_factory=list)
    source: Source | None = None
    #: The shaping budgets of the plan (its lease is the attempt's source's) and provider.
    shaped: ShapedDestination | None = None
    provider: str = "other"
    policy: TlsPolicy | None = None
    #: MTA-STS testing: what would have failed under enforce (logged, delivered anyway).
    policy_failures: list[str] = field(default_factory=list)
    #: DANE: what DNSSEC says of each MX host (None: DANE is off or does not apply).
    dane: dict[str, DaneHost] | None = None
    #: The label of the policy of the last host tried (DANE is per host), for the metric.
    tried_label: str | None = None
    #: The MAIL carries REQUIRETLS; how many hosts failed only for that.
    requiretls: bool = False
    requiretls_refusals: int = 0

    @property
    def config(self) -> Config:
        return self.egress.config

    async def next_hop(self, version: int | None) -> NextHop:
        """The next hop for a source of IP ``version`` (resolved once per transaction);
        raises :class:`RemoteError` with the reply when it cannot be found."""
        key = (self.domain, version)
        found = self.next_hops.get(key)
        if found is None:
            found = self.next_hops[key] = await next_hop(self.domain, version, self.config)
        if isinstance(found, Reply):
            raise RemoteError(found)
        assert isinstance(found, NextHop)
        return found

    async def budget(self) -> ShapedDestination | None:
        """The shaping budgets towards the domain's site and provider (its MX hosts)."""
        if self.runtime.shaper is None:
            return None
        next_hop = await self.next_hop(None)
        mx = [(host.preference, host.name) for host in next_hop.hosts]
        self.shaped = smtp_budget(self.runtime.shaper, self.domain, mx, self.runtime.shared_budgets)
        self.provider = "other" if self.shaped is None else self.shaped.provider()
        if self.shaped is not None:
            self.shaped.on_connection = self.runtime.shaped_connection
        return self.shaped

    async def resolve(self, step: Resolve) -> list[Destination]:
        """The plan's Resolve: the next hop's addresses, in order, without denied ones."""
        self.source = step.source
        self.failures = []
        next_hop = await self.next_hop(step.version)
        policy = await self.tls_policy(next_hop)
        await self.dane_states(next_hop)
        denied = denied_addresses(next_hop, self.config)
        destinations = [
            Destination(address, host.port, host.name)
            for host in self._allowed_hosts(next_hop, policy)
            for address in host.addresses
            if address not in denied
        ]
        if not destinations:
            raise RemoteError(replies.denied_next_hop(self.domain))
        return destinations

    async def tls_policy(self, next_hop: NextHop) -> TlsPolicy:
        """The domain's TLS policy (once per opening), :func:`domain_policy`."""
        if self.policy is None:
            self.policy = await domain_policy(self.domain, next_hop, self.config)
        return self.policy

    async def dane_states(self, next_hop: NextHop) -> None:
        """What DNSSEC says of each MX host (once per opening), :func:`domain_dane`."""
        if self.dane is None:
            self.dane = await domain_dane(self.domain, next_hop, self.config)

    def host_policy(self, host: str) -> TlsPolicy:
        """The policy of one MX host: DANE's for a DANE host, else the domain's."""
        assert self.policy is not None
        return policy_for_host(self.policy, self.dane, host)

    def _allowed_hosts(self, next_hop: NextHop, policy: TlsPolicy) -> list[MxHost]:
        """The hosts MTA-STS allows (and DANE hosts: DANE wins); under testing, every
        host (the others noted). Hosts whose DANE look-up failed are left out, noted."""
        hosts = self._dane_usable_hosts(next_hop)
        allowed = [h for h in hosts if policy.allows_mx(h.name) or self._is_dane_host(h.name)]
        if len(allowed) == len(hosts):
            return hosts
        names = [host.name for host in hosts if host not in allowed]
        if policy.testing:
            self.policy_failures.append(f"MX {', '.join(names)} not in the policy")
            return hosts
        if not allowed:
            raise RemoteError(replies.mta_sts_no_mx(self.domain, policy.origin, names))
        return allowed

    def _is_dane_host(self, host: str) -> bool:
        state = (self.dane or {}).get(host)
        return state is not None and state.state == "dane"

    def _dane_usable_hosts(self, next_hop: NextHop) -> list[MxHost]:
        """The hosts whose DANE look-ups did not fail (RFC 7672 section 2.2: such a host
        is skipped, never used without DANE); the others are noted for the 4xx."""
        failed = [s for s in (self.dane or {}).values() if s.state == "failed"]
        if not failed:
            return list(next_hop.hosts)
        self.tried_label = "dane"
        self.failures.extend(f"{s.host}: DANE: {s.why}" for s in failed)
        names = {s.host for s in failed}
        hosts = [host for host in next_hop.hosts if host.name not in names]
        if not hosts:
            raise RemoteError(replies.temporary("4.4.3", "; ".join(self.failures)))
        return hosts

    async def attempt(self, attempt: Attempt, progress: Progress) -> RemoteSession:
        """The plan's per-address step: connect, greet, EHLO, STARTTLS per policy.

        Raises :class:`EgressFailure` (the destination's fault unless the dial blames the
        source) so the plan moves on; each failure is noted for the MTA's reply.
        """
        source = attempt.source
        next_hop = await self.next_hop(source.egress_version)
        await self.tls_policy(next_hop)
        policy = self.host_policy(attempt.destination.name or "")
        self.tried_label = policy.label
        ehlo_name = source.ehlo_domain or self.hostname
        tls_failures: list[str] = []
        for tried in tries(policy):
            session = await self._dial(attempt, progress, next_hop)
            greeting = _Greeting(ehlo_name, tried, self.config.smtp.tls.ca_file)
            try:
                await _greet(greeting, session)
            except _TlsFailed as exc:
                await session.abort()
                if tried.required:
                    detail = replies.under_policy(f"{session.remote_text}: {exc}", policy.origin)
                    raise self._rejected(attempt, detail) from exc
                tls_failures.append(str(exc))  # reconnect: the next try, or plaintext
                continue
            except RemoteError as exc:
                await session.abort()
                raise self._rejected(
                    attempt, replies.under_policy(exc.detail, policy.origin)
                ) from exc
            session.tls_policy = policy.label
            session.tls_result = self._tls_result(session, policy, tried, tls_failures)
            session.requiretls_ok = _honours_requiretls(session, policy, next_hop)
            if self.requiretls and not session.requiretls_ok:
                await session.abort()
                self.requiretls_refusals += 1
                why = _requiretls_problem(session, policy)
                raise self._rejected(attempt, f"{session.remote_text}: {why}")
            self.runtime.smtp_tls(policy.label, _outcome(session.tls_result))
            return session
        raise AssertionError("unreachable: the last try returns or raises")

    def _tls_result(
        self, session: RemoteSession, policy: TlsPolicy, tried: TlsTry, tls_failures: list[str]
    ) -> str:
        """How the policy fared: ``verified``, ``encrypted``, ``plaintext``; under MTA-STS
        testing, what would have failed (logged as a warning, counted)."""
        result = "plaintext"
        if session.dane_result == "unusable":
            result = "encrypted; no usable TLSA record"
        elif session.tls_version is not None:
            result = "verified" if tried.verify or session.dane_result == "match" else "encrypted"
        if not policy.testing:
            return result
        problems = list(self.policy_failures) + tls_failures
        if session.tls_version is None and not tls_failures:
            problems.append("no STARTTLS")
        if not problems:
            return result
        failed = f"{result}; testing failure: {'; '.join(problems)}"
        _log.warning(
            "mta-sts testing failure",
            extra=_fields(domain=self.domain, mx=session.remote_text, result=failed),
        )
        return failed

    async def _dial(self, attempt: Attempt, progress: Progress, next_hop: NextHop) -> RemoteSession:
        """Connect within ``[dial] timeout``. The attempt's source slot becomes the session's
        (``hold_slot``): one slot from the dial to the close, never two."""
        destination = attempt.destination
        name = destination.name or str(destination.address)
        try:
            with trio.fail_after(self.config.dial.timeout):
                dialed = await connect(attempt, progress)
        except trio.TooSlowError:
            failure = self._timed_out(attempt, progress)
            self._note(failure, f"{name}[{destination.address}]:{attempt.port}: {failure}")
            raise failure from None
        except EgressFailure as exc:
            self._note(exc, f"{name}[{destination.address}]:{attempt.port}: {_dial_reason(exc)}")
            raise
        session = RemoteSession(
            dialed=dialed,
            mx_name=name,
            mx_port=destination.port if destination.port is not None else attempt.port,
            next_hop=next_hop,
            timeouts=self.config.smtp.timeouts,
            stream=dialed.stream,
            shaping=self.shaped,
            provider=self.provider,
            runtime=self.runtime,
        )
        if dialed.initial_data:
            session.client.receive_data(dialed.initial_data)
        return session

    def _note(self, failure: EgressFailure, text: str) -> None:
        if failure.party is Party.DESTINATION:
            self.failures.append(text)

    def _rejected(self, attempt: Attempt, detail: str) -> EgressFailure:
        self.failures.append(detail)
        return EgressFailure(
            Failure.REJECTED,
            detail,
            source=attempt.source.name,
            stage=Stage.CONNECT,
            address=attempt.address,
        )

    def _timed_out(self, attempt: Attempt, progress: Progress) -> EgressFailure:
        timeout = self.config.dial.timeout
        return EgressFailure(
            timeout_kind(progress.stage),
            f"no connection within {timeout:g}s",
            source=attempt.source.name,
            stage=progress.stage,
            address=progress.address,
        )

    def count_failure(self) -> None:
        """A remote that could not be opened under a TLS policy (once one was chosen)."""
        label = self.tried_label or (self.policy.label if self.policy is not None else None)
        if label is not None:
            self.runtime.smtp_tls(label, "failed")

    def failed(self, failure: EgressFailure) -> Reply:
        """The MTA's reply when the plan gave up with ``failure``."""
        source = self.source
        if failure.party is not Party.DESTINATION or source is None:
            return replies.egress_failure(self.pool, failure.kind.value, str(failure))
        who = _source_text(source, source.egress_address)
        if self.requiretls and self.requiretls_refusals == len(self.failures):
            return Reply.make(
                550,
                f"{who}: REQUIRETLS cannot be honoured for {self.domain}: "
                + "; ".join(self.failures),
                enhanced="5.7.30",
            )
        return replies.no_mail_server(who, self.domain, self.failures or [failure.detail])


async def domain_policy(domain: str, next_hop: NextHop, config: Config) -> TlsPolicy:
    """The domain's TLS policy: ``[smtp.tls.policy]``, else MTA-STS for an MX-derived
    next hop, over ``[smtp.tls]``'s default."""
    tls = config.smtp.tls
    override = tls.policy.get(domain.lower().rstrip("."))
    policy = configured_policy(tls.mode, tls.verify, override)
    if tls.mta_sts and override is None and _from_dns(next_hop):
        lookup = await mta_sts_policy(domain, config)
        if lookup.policy is None and "failed" in lookup.note:
            _log.warning("mta-sts", extra=_fields(domain=domain, note=lookup.note))
        policy = with_mta_sts(policy, lookup.policy, domain)
    return policy


async def domain_dane(domain: str, next_hop: NextHop, config: Config) -> dict[str, DaneHost]:
    """What DNSSEC says of each MX host of ``domain``, when DANE is wanted (else none)."""
    tls = config.smtp.tls
    override = tls.policy.get(domain.lower().rstrip("."))
    if wants_dane(tls.dane, override) and _from_dns(next_hop):
        return await dane_hosts(next_hop, config)
    return {}


def session_fits(
    session: RemoteSession, next_hop: NextHop, policy: TlsPolicy, dane: dict[str, DaneHost]
) -> bool:
    """True when ``session`` (opened for another domain) may carry the mail of the domain
    whose ``next_hop``, ``policy`` and DANE states these are
    (:func:`egressd.tlspolicy.choice.accepts`)."""
    connected = Connected(
        session.mx_name, session.tls_policy, session.tls_result, session.tls_version is not None
    )
    return accepts(connected, {host.name for host in next_hop.hosts}, policy, dane)


async def next_hop(domain: str, version: int | None, config: Config) -> NextHop | Reply:
    """The next hop of ``domain`` for a source of IP ``version``, or the reply for the MTA
    when it cannot be found (kept between transactions: :class:`~egressd.net.mx.NextHopCache`)."""
    try:
        return await NEXT_HOPS.resolve(domain, config, version)
    except NextHopError as exc:
        return replies.next_hop_failure(str(exc.kind), exc.text)


async def open_remote(
    egress: Egress,
    runtime: Runtime,
    pool: str,
    domain: str,
    next_hops: NextHops,
    hostname: str,
    *,
    requiretls: bool = False,
) -> RemoteSession:
    """A session to the first address of ``domain``'s next hop that answers and greets,
    from ``pool``'s next source, ready for MAIL: the egress plan, run by its executor with
    the SMTP greeting as its per-address step (retried once on the pool's next source when
    the first fails through its own fault).

    ``next_hops`` caches the transaction's next hops. Raises :class:`RemoteError` with
    the reply for the MTA (a 4xx naming the source, each address tried and its error).
    """
    opening = _Opening(egress, runtime, pool, domain, next_hops, hostname, requiretls=requiretls)
    budget = await opening.budget()
    provider = opening.provider
    plan = Plan(egress, pool=pool, budget=budget, provider=provider)
    try:
        session = await execute(plan, opening.attempt, opening.resolve, hold_slot=True)
    except EgressFailure as exc:
        opening.count_failure()
        raise RemoteError(opening.failed(exc)) from exc
    except RemoteError:
        opening.count_failure()
        raise
    session._exit.callback(plan.release_connection)  # the slot and the shaping lease
    lease = session.shaping.lease if session.shaping is not None else None
    session.quota = ConnectionQuota(
        egress.quotas, session.source.name, provider, plan.take_quota(), lease
    )
    session._exit.callback(session.quota.close)
    return session


async def selection_refusal(
    egress: Egress,
    runtime: Runtime,
    pool: str,
    domain: str,
    next_hops: NextHops,
    hostname: str,
    *,
    leaving: str,
) -> Reply | None:
    """The reply :func:`open_remote` would fail with now for want of a source (the same
    words), or None when it could pick one; nothing is picked, held or dialled. ``leaving``:
    the source of the kept connection that would close first."""
    opening = _Opening(egress, runtime, pool, domain, next_hops, hostname)
    try:
        budget = await opening.budget()
    except RemoteError as exc:
        return exc.reply
    plan = Plan(egress, pool=pool, budget=budget, provider=opening.provider)
    failure = await egress_selection_refusal(plan, leaving)
    return None if failure is None else opening.failed(failure)


def denied_addresses(next_hop: NextHop, config: Config) -> frozenset[IPAddress]:
    """Addresses of a DNS-derived next hop that ``[access] deny_destinations`` forbids.

    Routes are the operator's own choice and are not filtered; an MX or a domain literal
    pointing into loopback or a private network is (an open door into the LAN otherwise).
    """
    if next_hop.kind == "route":
        return frozenset()
    denied: set[IPAddress] = set()
    for host in next_hop.hosts:
        for address in host.addresses:
            refusal = destination_refusal(config.access, address, host.port)
            if refusal is not None and "deny_destinations" in refusal:
                denied.add(address)
    return frozenset(denied)


async def _greet(attempt: _Greeting, session: RemoteSession) -> None:
    """Banner, EHLO, STARTTLS (per this try), EHLO again. Raises RemoteError or _TlsFailed."""
    timeouts = session.timeouts
    banner = await _command(session, None, timeouts.banner, "the connection (banner)")
    if banner.code != 220:
        raise session.failure("4.4.0", f"greeting was {_first_line(banner)}")
    await _hello(attempt, session)
    tls = attempt.tls
    if not tls.starttls:
        return
    if not session.client.supports("STARTTLS"):
        if tls.required:
            raise session.failure("4.7.10", "does not offer STARTTLS, which is required")
        return
    reply = await _command(session, StartTls(), timeouts.command, "STARTTLS")
    if reply.code != 220:
        if tls.required:
            raise session.failure("4.7.10", f"refused STARTTLS: {_first_line(reply)}")
        return
    await _handshake(session, client_context(tls.verify, attempt.ca_file if tls.verify else None))
    if tls.dane:
        _check_dane(session, tls)
    await _hello(attempt, session)


def _check_dane(session: RemoteSession, tls: TlsTry) -> None:
    """DANE: the peer's certificate against the TLSA records (RFC 7672 section 3.1: no
    name check for DANE-EE). Python's ``ssl`` gives the leaf only, so DANE-TA records
    count as unusable. Raises :class:`_TlsFailed` on a mismatch."""
    assert isinstance(session.stream, trio.SSLStream)
    leaf = session.stream.getpeercert(binary_form=True) or b""
    session.dane_result = match_tlsa(tls.tlsa, leaf)
    if session.dane_result == "mismatch":
        raise _TlsFailed("the certificate matches none of the DANE TLSA records")


async def _hello(attempt: _Greeting, session: RemoteSession) -> None:
    reply = await _command(session, Ehlo(attempt.ehlo_name), session.timeouts.command, "EHLO")
    if reply.is_success:
        return
    if reply.is_permanent and reply.code != 421:
        reply = await _command(session, Helo(attempt.ehlo_name), session.timeouts.command, "HELO")
        if reply.is_success:
            return
    raise session.failure("4.4.0", f"refused EHLO {attempt.ehlo_name}: {_first_line(reply)}")


async def _handshake(session: RemoteSession, context: ssl.SSLContext) -> None:
    try:
        session.client.start_tls()
    except RemoteProtocolError as exc:
        raise _TlsFailed(f"plaintext after the 220 to STARTTLS: {exc}") from exc
    ssl_stream = trio.SSLStream(session.stream, context, server_hostname=session.mx_name)
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


def _honours_requiretls(session: RemoteSession, policy: TlsPolicy, next_hop: NextHop) -> bool:
    """True when this session may carry a REQUIRETLS message (see the module doc)."""
    if not session.client.supports("REQUIRETLS") or session.tls_result != "verified":
        return False
    return policy.label in ("dane", "mta-sts enforce") or (
        policy.label == "verify" and not _from_dns(next_hop)
    )


def _requiretls_problem(session: RemoteSession, policy: TlsPolicy) -> str:
    if session.tls_result != "verified" or policy.label not in (
        "dane",
        "mta-sts enforce",
        "verify",
    ):
        return (
            f"REQUIRETLS needs TLS verified under DANE or MTA-STS enforce; this host has "
            f"{policy.label} TLS ({session.tls_result or 'plaintext'})"
        )
    if not session.client.supports("REQUIRETLS"):
        return "REQUIRETLS is not offered by the server"
    return "REQUIRETLS needs an MX found through DNSSEC or MTA-STS, not verify alone"


def _from_dns(next_hop: NextHop) -> bool:
    """MTA-STS and DANE apply to next hops from the domain's MX records, not to routes."""
    return next_hop.kind in ("mx", "implicit")


def _outcome(tls_result: str) -> str:
    """The metric's bounded outcome for a session's ``tls_result``."""
    return "testing_failure" if "testing failure" in tls_result else tls_result.split(";")[0]


def _fields(**fields: object) -> dict[str, object]:
    """A log record's ``extra`` (see :mod:`egressd.log`)."""
    return {"fields": fields}


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
