"""The executor: run an outbound plan (:mod:`egressd.egress.plan`) with real sockets.

Theory of operation
-------------------
:func:`execute` asks the plan for its next step and does the I/O: a :class:`Resolve`
goes to the caller's resolver (by default :func:`~egressd.net.dialer.resolve_name` for the
plan's host, through the configuration's ``[dns]``), an :class:`Attempt` to the caller's
per-address step (by default :func:`~egressd.net.dialer.connect`, which makes the
connection the result). The outcome
goes back to the plan, which holds the one retry policy and tells health. A step may do
more than connect: the SMTP door's step connects through the source, then reads the
greeting and says EHLO (and STARTTLS); raising an
:class:`~egressd.egress.failures.EgressFailure` (kind ``rejected`` for a 4xx greeting)
moves the plan on to the next address, and a step that succeeds ends the plan.

While an attempt is in flight it holds one of its source's connection slots, so
concurrent dials count against ``max_connections_per_source``; the caller takes a slot of
its own for the connection's life. A successful attempt's connect time (what
:func:`~egressd.net.dialer.connect` measured, without the step's greeting) goes to the
observer as the dial latency by source.

No timeout is applied here. The caller applies the plan's one deadline, once, around
:func:`execute` (:func:`open_within` does exactly that and turns expiry into the plan's
timeout failure).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeGuard, TypeVar

import trio

from egressd.config import Config, DnsSettings, IPAddress, Source
from egressd.egress.failures import EgressFailure
from egressd.egress.plan import (
    Attempt,
    Destination,
    GiveUp,
    Plan,
    Progress,
    Resolve,
)
from egressd.egress.quotas import Quotas, QuotasAskedAhead
from egressd.egress.selection import Egress
from egressd.health import SourceHealth
from egressd.net.dialer import Dialed, connect, resolve_name
from egressd.pools import PoolSet, SelectionError

__all__ = [
    "AttemptStep",
    "Resolver",
    "candidate_sources",
    "connect_within",
    "dial",
    "execute",
    "open_within",
    "selection_refusal",
]

T = TypeVar("T")

AttemptStep = Callable[[Attempt, Progress], Awaitable[T]]
"""One address from one source: the connection, or more (an SMTP session ready for MAIL)."""
Resolver = Callable[[Resolve], Awaitable[Sequence[Destination]]]


async def resolve_host(step: Resolve, dns: DnsSettings) -> Sequence[Destination]:
    """The default resolver: the plan's host name, in the source's IP version, through
    ``[dns]`` (the plan's configuration's)."""
    assert step.host is not None, "a plan without a host needs the caller's resolver"
    try:
        return await resolve_name(step.host, step.port, step.version, dns)
    except EgressFailure as exc:
        raise EgressFailure(
            exc.kind,
            f"source {step.source.name!r}: {exc}",
            source=step.source.name,
            stage=exc.stage,
        ) from exc


async def execute(
    plan: Plan,
    step: AttemptStep[T],
    resolve: Resolver | None = None,
    *,
    hold_slot: bool = False,
) -> T:
    """Run ``plan`` to its end: ``step``'s result, or the plan's final failure raised.
    ``resolve`` (None: :func:`resolve_host` through the plan's ``[dns]``) finds a name's
    addresses. ``hold_slot``: the successful attempt's source connection slot stays
    taken for the connection's life (:attr:`Plan.held_slot`), instead of being given back
    when the step returns for the caller to take again.

    On success the caller owns the plan's budget lease (:meth:`Plan.release_budget` when
    the connection ends; :meth:`Plan.release_connection` gives back the held slot too);
    on any failure or cancellation it is given back here. Shared
    budgets are asked for ahead, for every candidate source in one round trip, and what
    the plan did not use is settled back (:mod:`egressd.egress.budgets`)."""
    budget = plan.budget
    quotas = plan.egress.quotas
    try:
        if budget is not None:
            await budget.prepare(candidate_sources(plan))
        if _asks_ahead(quotas):
            await quotas.prepare(candidate_sources(plan), plan.provider)
        return await _run(plan, step, resolve, hold_slot)
    except BaseException:
        plan.release_budget()
        raise
    finally:
        if budget is not None:
            budget.settle()


async def selection_refusal(plan: Plan, leaving: str | None = None) -> EgressFailure | None:
    """What the plan would give up with for want of an eligible source, or None when it
    could pick one now; nothing is picked or held (:meth:`Egress.refusal`). Shared budgets
    and quotas are asked ahead as :func:`execute` asks them, and settled back."""
    budget = plan.budget
    try:
        if budget is not None:
            await budget.prepare(candidate_sources(plan))
        quotas = plan.egress.quotas
        if _asks_ahead(quotas):
            await quotas.prepare(candidate_sources(plan), plan.provider)
        if plan.pool is None:
            return None
        return plan.egress.refusal(plan.pool, plan.provider, budget, leaving)
    finally:
        if budget is not None:
            budget.settle()


_ASKS_AHEAD: dict[type, bool] = {}
"""Whether a quotas class is :class:`QuotasAskedAhead`, by class: isinstance() against a
runtime-checkable Protocol walks the protocol's members every time (about 40 Python calls,
a twentieth of a short SOCKS5 session's), and a class does not change what it is."""


def _asks_ahead(quotas: Quotas) -> TypeGuard[QuotasAskedAhead]:
    kind = type(quotas)
    asks = _ASKS_AHEAD.get(kind)
    if asks is None:
        asks = _ASKS_AHEAD[kind] = isinstance(quotas, QuotasAskedAhead)
    return asks


def candidate_sources(plan: Plan) -> list[str]:
    """The sources the plan may pick: its exact source, else its pool's (weight > 0)."""
    if plan.source is not None:
        return [plan.source.name]
    if plan.pool is None:
        return []
    try:
        entries = plan.egress.pools.selector(plan.pool).pool.entries
    except SelectionError:
        return []
    return [entry.source for entry in entries if entry.weight > 0]


async def _run(plan: Plan, step: AttemptStep[T], resolve: Resolver | None, hold_slot: bool) -> T:
    while True:
        command = plan.next_step()
        if isinstance(command, GiveUp):
            raise command.failure
        if isinstance(command, Resolve):
            try:
                if resolve is None:
                    destinations = await resolve_host(command, plan.egress.config.dns)
                else:
                    destinations = await resolve(command)
            except EgressFailure as failure:
                plan.failed(failure)
                continue
            plan.resolved(destinations)
            continue
        try:
            result = await _attempt(plan, command, step, hold_slot)
        except EgressFailure as failure:
            plan.failed(failure)
            continue
        plan.succeeded()
        return result


async def _attempt(plan: Plan, attempt: Attempt, step: AttemptStep[T], hold_slot: bool) -> T:
    """Run ``step`` holding one of the source's connection slots; with ``hold_slot`` a
    step that succeeds keeps it (:attr:`Plan.held_slot`)."""
    health = plan.egress.health
    name = attempt.source.name
    progress = plan.progress
    progress.connected_in = None
    started = time.perf_counter()  # a duration: see connect()
    health.connection_opened(name)
    try:
        result = await step(attempt, progress)
    except BaseException:
        health.connection_closed(name)
        raise
    if hold_slot:
        plan.held_slot = name
    else:
        health.connection_closed(name)
    seconds = progress.connected_in
    if seconds is None:  # a step that connects by other means: its whole time
        seconds = time.perf_counter() - started
    plan.egress.observer.dialed(attempt.source, seconds)
    return result


async def open_within(
    plan: Plan,
    step: AttemptStep[T],
    resolve: Resolver | None = None,
    *,
    hold_slot: bool = False,
) -> T:
    """:func:`execute` under the plan's one deadline; expiry raises the plan's failure."""
    # A bare CancelScope: fail_after's generator costs a few microseconds per connection.
    with trio.CancelScope(deadline=trio.current_time() + plan.timeout) as scope:
        return await execute(plan, step, resolve, hold_slot=hold_slot)
    assert scope.cancelled_caught
    raise plan.timed_out()


async def connect_within(plan: Plan, *, hold_slot: bool = False) -> Dialed:
    """The connection a plan leads to (the SOCKS5 and PROXY doors' step), under its deadline;
    ``hold_slot`` as for :func:`execute`."""
    return await open_within(plan, connect, hold_slot=hold_slot)


async def dial(
    source: Source,
    host: str | IPAddress,
    port: int | None = None,
    dns: DnsSettings | None = None,
) -> Dialed:
    """Connect to ``host`` (a name or an IP address) from ``source`` alone, with no access
    rules, limits, health or deadline: for tools and tests that hold a source and nothing
    else (a name is resolved through ``dns``, default ``[dns]``'s defaults). The plan and
    this executor do the work, so the retry policy is the doors' own."""
    config = Config(
        path=None,  # type: ignore[arg-type]
        sources={source.name: source},
        pools={},
        dns=dns if dns is not None else DnsSettings(),
    )
    egress = Egress(config, PoolSet.from_config(config), SourceHealth([source.name]))
    return await execute(Plan(egress, source=source, host=host, port=port), connect)
