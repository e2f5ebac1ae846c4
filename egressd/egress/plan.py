"""The outbound plan: which sources, which addresses, in what order, under which deadline.

Theory of operation
-------------------
Every front door's outbound connection is one :class:`Plan`, a sans-IO machine in the
mitmproxy style: the executor (:func:`egressd.net.egress.execute`) asks it for the next
step, does the I/O, and reports the outcome back. Steps:

:class:`Resolve`
    Find the destination's addresses for this source (its IP version). A literal host
    needs no step; the plan parses it once and keeps the :mod:`ipaddress` object.
:class:`Attempt`
    Dial one address from one source and run the caller's per-address step on it (for
    SOCKS5 and PROXY the connection is the result; for SMTP the greeting, EHLO and
    STARTTLS follow). Report :meth:`Plan.succeeded` or :meth:`Plan.failed`.
:class:`GiveUp`
    Raise the failure it carries.

One retry policy, by whose fault a failure is (:func:`~egressd.egress.failures.blame`):

* the destination's (refused, unreachable, silent, rejected): the next address of the
  same source, in the resolver's (or the next hop's) order; when none is left, give up.
  Another source would meet the same destination, unless the failure made a shaping
  reply rule suspend this source there (a ``421 4.7.0 [TSS04]`` banner): then a pool
  moves on to its next source, once, and an exact source gives up.
* the source's (unplumbed address, proxy down, refusing or silent): nothing reached the
  destination, so a pool moves on to its next source, once (:data:`MAX_SOURCES`); an exact
  source (KumoMTA's BIND, a PROXY header) gives up.
* nobody's (a local resource, an access rule, no source): give up.

One deadline: :attr:`Plan.timeout` (``[dial] timeout``) covers resolving, every attempt
and every proxy handshake of the plan. The caller applies it once, around the executor
(``with trio.move_on_after(plan.timeout)``), and on expiry asks :meth:`Plan.timed_out`
for the failure; :attr:`Plan.progress` says which stage the dial was in, so a silent proxy
is the source's fault and a silent destination the destination's.

Health (:meth:`Plan.failed`, :meth:`Plan.succeeded`): a source failure counts against
the source's health (it may suspend it: KumoMTA's ``suspend_when_unplumbed`` and
``suspend_when_proxy_unhealthy``). A destination failure never does: it counts against
the destination's circuit breaker (:mod:`egressd.egress.breaker`), which after repeated
failures makes every source fail fast there with ``DESTINATION_FAILING``. The one
destination failure that speaks against a source is one at a destination that another
source reached a moment ago; several distinct such destinations suspend the source
(``[health] suspend_on_connect_failures``, counted in distinct destinations).

Pure: no trio, no sockets.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from egressd.access import destination_refusal
from egressd.config import AccessSettings, IPAddress, Source, format_hostport
from egressd.egress.budgets import DestinationBudget
from egressd.egress.failures import EgressFailure, Failure, Party, Stage, timeout_kind
from egressd.egress.quotas import QuotaHold
from egressd.egress.selection import Egress
from egressd.health import FailureKind, policy_for

__all__ = [
    "DEFAULT_PORT",
    "MAX_SOURCES",
    "Attempt",
    "Destination",
    "GiveUp",
    "Plan",
    "Progress",
    "Resolve",
    "Step",
    "destination_port",
]

# The stdlib logger by name, not egressd.log (which imports socket for journald): the
# plan stays pure, and egressd.log configures the "egressd" hierarchy it logs into.
log = logging.getLogger("egressd.egress")

DEFAULT_PORT = 25
MAX_SOURCES = 2
"""A pool's plan tries at most this many sources (the first, and one retry)."""


def destination_port(source: Source, port: int | None) -> int:
    """``remote_port`` if the source sets it, else the caller's port, else 25."""
    if source.remote_port is not None:
        return source.remote_port
    if port is not None:
        return port
    return DEFAULT_PORT


@dataclass(frozen=True)
class Destination:
    """One address to try, with the port asked for and the name it came from, if any."""

    address: IPAddress
    port: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class Resolve:
    """Find the addresses of ``host`` (None: the caller's resolver knows) for ``source``."""

    source: Source
    host: str | None
    port: int | None

    @property
    def version(self) -> int | None:
        return self.source.egress_version


@dataclass(frozen=True)
class Attempt:
    """Dial ``address:port`` from ``source`` (``port`` after ``remote_port``)."""

    source: Source
    destination: Destination
    port: int

    @property
    def address(self) -> tuple[IPAddress, int]:
        return self.destination.address, self.port


@dataclass(frozen=True)
class GiveUp:
    failure: EgressFailure


Step = Resolve | Attempt | GiveUp


@dataclass
class Progress:
    """How far the current step got; the dialer moves it along, a timeout reads it."""

    source: Source | None = None
    stage: Stage = Stage.SELECT
    address: tuple[IPAddress, int] | None = None
    """What is being connected to: the destination, or the proxy in the proxy stages."""
    connected_in: float | None = None
    """How long the last connect took (the dialer says), in seconds: the dial latency,
    without what the caller's step does with the connection afterwards (a greeting)."""

    def at(self, stage: Stage, address: tuple[IPAddress, int] | None = None) -> None:
        self.stage = stage
        if address is not None:
            self.address = address


@dataclass
class Plan:
    """One outbound connection's plan; see the module docstring.

    ``pool`` or ``source`` says where from (a source wins); ``host`` is the destination
    (an IP address, or a name to resolve), or None when the caller's resolver supplies
    the addresses (the SMTP next hop). ``access``: the ``[access]`` rules to enforce on
    the port and on every address (None: the caller checked).
    """

    egress: Egress
    pool: str | None = None
    source: Source | None = None
    host: str | IPAddress | None = None
    port: int | None = None
    access: AccessSettings | None = None
    provider: str = "other"
    """The destination's mailbox provider, for warm-up quotas (``other``: none known)."""
    budget: DestinationBudget | None = None
    """The destination's shaping budgets (:mod:`egressd.egress.budgets`): the picked
    source's lease is held by the plan, given back when it moves on or gives up, and
    left to the caller (:meth:`release_budget`) once a connection is made."""
    quota: QuotaHold | None = None
    """The picked source's held message of its warm-up quota to ``provider``
    (:mod:`egressd.egress.quotas`): given back when the plan moves on or gives up; once
    connected, the caller settles it or takes it (:meth:`take_quota`)."""
    progress: Progress = field(default_factory=Progress)
    held_slot: str | None = None
    """The source whose connection slot the plan's connection holds (the executor's
    ``hold_slot``), given back by :meth:`release_connection`."""
    tried: list[str] = field(default_factory=list)
    failures: list[EgressFailure] = field(default_factory=list)
    _queue: list[Destination] | None = None
    _current: Source | None = None
    _final: EgressFailure | None = None
    _literal: IPAddress | None = None
    _source_refused_there: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.host, str):
            self._literal = _parse_address(self.host)
        elif self.host is not None:
            self._literal = self.host
        self._final = self._refusal()

    @property
    def timeout(self) -> float:
        """The one deadline of the whole plan, in seconds (``[dial] timeout``)."""
        return self.egress.config.dial.timeout

    # ------------------------------------------------------------------ the next step

    def next_step(self) -> Step:
        """What to do next; call again after reporting the outcome of the last step."""
        while self._final is None:
            if self._current is None:
                self._choose_source()
                continue
            source = self._current
            if self._queue is None:
                if self._literal is not None:  # the access rules saw it already
                    self._take_literal(source, Destination(self._literal, self.port))
                    continue
                self.progress.at(Stage.RESOLVE)
                host = None if self.host is None else str(self.host)
                return Resolve(source, host, self.port)
            if not self._queue:
                if self._source_refused_there and self._may_retry():
                    self._current = None  # the site refuses this source: the next one
                    continue
                self._final = self._exhausted()
                break
            destination = self._queue.pop(0)
            port = destination_port(source, destination.port)
            step = Attempt(source, destination, port)
            address = (destination.address, port)  # step.address
            if self._destination_failing(step, address):
                continue
            self.progress.at(Stage.CONNECT, address)
            return step
        self.release_budget()
        return GiveUp(self._final)

    def release_budget(self) -> None:
        """Give the destination budget's lease back: the connection ended (or never was);
        a held warm-up message not taken by the caller goes back too."""
        if self.budget is not None:
            self.budget.release()
        if self.quota is not None:
            self.quota.release()

    def release_connection(self) -> None:
        """The plan's connection ended: the source's connection slot it held (if any) and
        the destination budget's lease (:meth:`release_budget`) are given back."""
        held, self.held_slot = self.held_slot, None
        if held is not None:
            self.egress.health.connection_closed(held)
        self.release_budget()

    def take_quota(self) -> QuotaHold | None:
        """The held warm-up message, for the caller to settle; the plan forgets it."""
        quota, self.quota = self.quota, None
        return quota

    def resolved(self, destinations: Sequence[Destination]) -> None:
        """The outcome of :class:`Resolve`: the addresses to try, in order."""
        assert self._current is not None, "resolved() without a Resolve step"
        self._take_destinations(self._current, destinations)

    def succeeded(self) -> None:
        """The last :class:`Attempt` worked: health hears of it."""
        source, address = self.progress.source, self.progress.address
        if source is None:
            return
        self.egress.health.record_success(source.name)
        if address is not None:
            self.egress.breaker.success(address, source.name, self._site())
        if self.budget is not None:
            self.budget.connected(source.name)

    def failed(self, failure: EgressFailure) -> None:
        """The last step failed: account for it and decide what comes next."""
        self.failures.append(failure)
        party = failure.party
        self._account(failure, party)
        if party is Party.DESTINATION and self._queue is not None:
            if self._suspended_there() is None:
                return  # the next address, if any
            if self._may_retry():  # a reply rule suspended the source there
                self._current = None
                return
        if party is Party.SOURCE and self._may_retry():
            self._current = None  # the pool's next source
            return
        self._final = failure

    def timed_out(self) -> EgressFailure:
        """The caller's deadline expired: the failure to report (health is told)."""
        progress = self.progress
        kind = timeout_kind(progress.stage)
        where = _STAGE_TEXT[progress.stage]
        target = format_hostport(*progress.address) if progress.address else str(self.host)
        failure = EgressFailure(
            kind,
            f"{_who(progress.source)}: no result within {self.timeout:g}s while {where} {target}",
            source=progress.source.name if progress.source is not None else None,
            stage=progress.stage,
            address=progress.address,
        )
        self.failures.append(failure)
        self._account(failure, failure.party)
        self._final = failure
        self.release_budget()
        return failure

    # ------------------------------------------------------------------ sources

    def _choose_source(self) -> None:
        try:
            source = self._pick()
            self._take_budget(source)
            self._hold_quota(source)
        except EgressFailure as refusal:
            # A retry that finds no second source reports the first source's failure.
            self._final = self.failures[-1] if self.failures else refusal
            return
        if self.tried:
            log.info(
                "retrying on the pool's next source",
                extra={
                    "fields": {"pool": self.pool, "failed": self.tried[-1], "next": source.name}
                },
            )
        self.tried.append(source.name)
        self._current = source
        self._queue = None
        self._source_refused_there = False
        self.progress = Progress(source=source)

    def _pick(self) -> Source:
        if self.source is not None:
            self.egress.check_cap(self.source)
            self.egress.check_quota(self.source, self.provider)
            self.egress.check_budget(self.source, self.budget)
            return self.source
        if self.pool is None:
            raise EgressFailure(
                Failure.UNKNOWN_POOL, "the client named no pool and the listener has none"
            )
        avoid = frozenset(self.tried) if self.tried else _NOTHING_TRIED
        return self.egress.pick(self.pool, avoid=avoid, provider=self.provider, budget=self.budget)

    def _take_budget(self, source: Source) -> None:
        """Hold ``source``'s lease in the destination's budgets (the previous one goes back)."""
        if self.budget is None:
            return
        refusal = self.budget.take(source.name)
        if refusal is not None:  # pragma: no cover - pick() has just checked it
            raise EgressFailure(Failure.BUDGET, refusal, source=source.name)

    def _hold_quota(self, source: Source) -> None:
        """Hold one message of ``source``'s warm-up quota (the previous hold goes back)."""
        if self.quota is not None:
            self.quota.release()
        self.quota = QuotaHold.take(self.egress.quotas, source.name, self.provider)

    def _site(self) -> str | None:
        """The destination's shaping site (None: no shaping; the address stands for it)."""
        return self.budget.site if self.budget is not None else None

    def _suspended_there(self) -> str | None:
        """Why the current source is now suspended towards the destination (a reply rule
        fired on this attempt's greeting), or None."""
        if self.budget is None or self._current is None:
            return None
        return self.budget.suspended(self._current.name)

    def _may_retry(self) -> bool:
        return self.source is None and len(self.tried) < MAX_SOURCES

    # ------------------------------------------------------------------ destinations

    def _take_literal(self, source: Source, destination: Destination) -> None:
        version = source.egress_version
        if version is not None and destination.address.version != version:
            self._final = self._no_address(source, [destination])
        else:
            self._queue = [destination]

    def _take_destinations(self, source: Source, destinations: Sequence[Destination]) -> None:
        version = source.egress_version
        usable = [d for d in destinations if version is None or d.address.version == version]
        if not usable:
            self._final = self._no_address(source, destinations)
            return
        allowed = [d for d in usable if self._address_refusal(d) is None]
        if not allowed:
            refusal = self._address_refusal(usable[0])
            self._final = EgressFailure(
                Failure.DENIED, f"{self.host} resolves to a denied address: {refusal}"
            )
            return
        self._queue = list(allowed)

    def _destination_failing(self, step: Attempt, address: tuple[IPAddress, int]) -> bool:
        """True (and noted as a failure) when the destination's breaker is open for
        ``step`` (to ``address``, its :attr:`~Attempt.address`)."""
        refusal = self.egress.breaker.check(address, step.source.name, self._site())
        if refusal is None:
            return False
        self._source_refused_there = refusal.source is not None
        self.failures.append(
            EgressFailure(
                Failure.DESTINATION_FAILING,
                refusal.describe(),
                source=step.source.name,
                stage=Stage.CONNECT,
                address=address,
                cause=refusal.last_kind,
            )
        )
        return True

    def _exhausted(self) -> EgressFailure:
        """Every address failed: one failure that names them all."""
        name = self._current.name if self._current is not None else None
        failures = [f for f in self.failures if f.source == name]
        last = failures[-1]
        if len(failures) == 1:
            return last
        return EgressFailure(
            last.kind,
            f"all {len(failures)} addresses of {self.host or 'the destination'} failed: "
            + "; ".join(f.detail for f in failures),
            source=last.source,
            stage=last.stage,
            address=last.address,
            errno=last.errno,
            cause=last.cause,
        )

    def _no_address(self, source: Source, found: Sequence[Destination]) -> EgressFailure:
        version = source.egress_version
        text = ", ".join(str(d.address) for d in found) or "nothing"
        return EgressFailure(
            Failure.NO_ADDRESS,
            f"source {source.name!r} egresses over IPv{version} but {self.host} has no"
            f" IPv{version} address (found {text})",
            source=source.name,
            stage=Stage.RESOLVE,
        )

    # ------------------------------------------------------------------ access

    def _refusal(self) -> EgressFailure | None:
        """The access rules' verdict on the port and a literal host, before anything."""
        if self.access is None:
            return None
        host = self._literal if self._literal is not None else str(self.host)
        port = self.port if self.port is not None else DEFAULT_PORT
        refusal = destination_refusal(self.access, host, port)
        return EgressFailure(Failure.DENIED, refusal) if refusal is not None else None

    def _address_refusal(self, destination: Destination) -> str | None:
        if self.access is None:
            return None
        port = destination.port if destination.port is not None else DEFAULT_PORT
        return destination_refusal(self.access, destination.address, port)

    # ------------------------------------------------------------------ health

    def _account(self, failure: EgressFailure, party: Party) -> None:
        source = self.progress.source
        if source is None:
            return
        if party is Party.SOURCE:
            kind: FailureKind = (
                "unplumbed" if failure.kind is Failure.UNPLUMBED else "proxy_unhealthy"
            )
            self._count_against(source, kind, failure)
        elif party is Party.DESTINATION and failure.destination is not None:
            self._count_against_destination(source, failure.destination, failure)
            if self.budget is not None:  # and against the (source, site) shaping path
                self.budget.failed(source.name)

    def _count_against_destination(
        self, source: Source, destination: tuple[IPAddress, int], failure: EgressFailure
    ) -> None:
        breaker = self.egress.breaker
        site = self._site()
        kind, detail = failure.kind, failure.detail
        if breaker.failure(destination, kind, detail, source=source.name, site=site):
            log.warning(
                "destination failing: dials to it fail fast for a while",
                extra={
                    "fields": {
                        "destination": format_hostport(*destination),
                        "for_seconds": breaker.settings.open_for,
                        "reason": failure.detail,
                    }
                },
            )
        if breaker.source_evidence(destination, source.name, site):
            self._count_against(source, "connect", failure)

    def _count_against(self, source: Source, kind: FailureKind, failure: EgressFailure) -> None:
        egress = self.egress
        policy = policy_for(source, kind, egress.config.health)
        egress.observer.failed(source, kind)
        if not egress.health.record_failure(source.name, kind, failure.detail, policy):
            return
        log.warning(
            "source suspended",
            extra={
                "fields": {
                    "source": source.name,
                    "kind": kind,
                    "for_seconds": policy.duration,
                    "reason": failure.detail,
                }
            },
        )
        egress.observer.suspended(source, kind)


_NOTHING_TRIED: frozenset[str] = frozenset()

_STAGE_TEXT: dict[Stage, str] = {
    Stage.SELECT: "choosing a source for",
    Stage.RESOLVE: "resolving",
    Stage.PROXY_CONNECT: "connecting to the proxy at",
    Stage.PROXY_HANDSHAKE: "in the handshake with the proxy at",
    Stage.CONNECT: "connecting to",
    Stage.SESSION: "talking to",
}


def _who(source: Source | None) -> str:
    if source is None:
        return "egressd"
    bound = f" from {source.source_address}" if source.source_address is not None else ""
    return f"source {source.name!r}{bound}"


def _parse_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
