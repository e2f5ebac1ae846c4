"""The daemon's live state: the current configuration generation, limits and sessions.

Theory of operation
-------------------
A *generation* (:class:`~egressd.egress.Egress`) bundles one validated configuration
with the process's pool selectors and source health. A reload builds a new generation and
swaps it in with one assignment: new sessions read ``runtime.egress`` once, at their start,
and keep that generation to the end, so connections in flight finish on what they started
with. Selectors of unchanged pools and all source health carry over.

Every front-door connection runs inside :meth:`Runtime.session`, which enforces
``[limits] max_connections``, counts active sessions for the drain, and logs one line when
the connection ends (client, door, pool, source, local address, destination, bytes each way,
duration, outcome).

Observers (the metrics) attach through plain hook lists rather than through the doors:
``session_opened_hooks`` get the new :class:`SessionRecord` when a session starts,
``session_hooks`` the finished one, ``transaction_hooks`` get ``(pool, final reply code,
source, shaping provider)``
for each SMTP transaction a door relayed (:meth:`Runtime.smtp_transaction`), ``tls_hooks``
``(policy, outcome)`` for each remote the SMTP door opened or failed to (:meth:`Runtime.smtp_tls`),
``connection_hooks`` ``(source, provider, +1 | -1)`` when a connection with a shaping
budget is made or ends (:meth:`Runtime.shaped_connection`), ``login_failure_hooks`` the
door of each wrong password (:meth:`Runtime.login_failed`,
which also keeps the per-address brake of :mod:`egressd.login`), and the
:class:`~egressd.egress.EgressObserver` hears about dials and suspensions. A hook must
be quick and must not raise; the doors never see who listens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from logging import INFO
from types import TracebackType
from typing import Any, Protocol

import trio

from egressd.admission import Admission
from egressd.config import Config, IPAddress
from egressd.egress import DestinationBreaker, Egress, EgressObserver, NoQuotas, Quotas
from egressd.egress.quotas import SwitchedQuotas
from egressd.health import SourceHealth
from egressd.log import get_logger, log_fields
from egressd.login import LoginThrottle
from egressd.net.shaping import BudgetAsker, ConnectionHook, ShapedDestination, proxy_budget
from egressd.pools import PoolSet
from egressd.shaping import Shaper, ShapingPolicy
from egressd.shaping.ledger import Ledger
from egressd.warmup import Warmup

log = get_logger("session")
auth_log = get_logger("auth")


@dataclass
class SessionRecord:
    """What one front-door connection did; doors fill it in as they go."""

    door: str
    client: str
    listener: str | None = None
    """The address of the listener that accepted the connection (not logged)."""
    pool: str | None = None
    source: str | None = None
    local_address: str | None = None
    destination: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "closed"
    detail: str | None = None
    started: float = field(default_factory=time.monotonic)

    def fields(self) -> dict[str, Any]:
        """The log line's fields: every set field in declaration order, then ``duration``.

        Built by hand rather than with ``dataclasses.asdict`` (a recursive deep copy): it
        runs once per connection and every value is a str, an int or None.
        """
        values: dict[str, Any] = {}
        for key, value in (
            ("door", self.door),
            ("client", self.client),
            ("pool", self.pool),
            ("source", self.source),
            ("local_address", self.local_address),
            ("destination", self.destination),
            ("bytes_up", self.bytes_up),
            ("bytes_down", self.bytes_down),
            ("outcome", self.outcome),
            ("detail", self.detail),
        ):
            if value is not None:
                values[key] = value
        values["duration"] = round(time.monotonic() - self.started, 3)
        return values


def doors_with_listeners(config: Config) -> frozenset[str]:
    """The front doors that have at least one listener (each keeps a reserve)."""
    listeners = {
        "socks5": config.socks5_listeners,
        "proxy": config.proxy_listeners,
        "smtp": config.smtp.listeners,
    }
    return frozenset(door for door, items in listeners.items() if items)


class Overloaded(Exception):
    """A limit (:mod:`egressd.admission`) refuses the connection: the door refuses it at once."""


SessionHook = Callable[[SessionRecord], None]
TransactionHook = Callable[[str, int, str, str], None]
TlsHook = Callable[[str, str], None]
LoginFailureHook = Callable[[str], None]


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters, control characters escaped, for a log line."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])


class _CurrentQuotas(SwitchedQuotas):
    """:class:`~egressd.egress.quotas.Quotas` of the runtime's warm-up engine, if any.

    Asked at each question, not when a connection opens: a reload that turns warm-up on
    governs the next message of every connection already open."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def warming(self) -> bool:
        return self._runtime.warmup is not None

    @property
    def _quotas(self) -> Quotas:
        engine = self._runtime.warmup
        if engine is None:
            return NO_QUOTAS
        shared = self._runtime.shared_quotas
        return engine if shared is None else shared

    async def prepare(self, sources: Sequence[str], provider: str) -> None:
        """Before a plan picks: ask the shared store for the quota tickets it may need."""
        shared = self._runtime.shared_budgets
        if self._runtime.shared_quotas is not None and shared is not None:
            await shared.prepare_quotas(sources, provider)

    # Without a warm-up engine (the usual case) each answers at once, without the property
    # and NoQuotas' method: three times a relayed message.

    def refusal(self, source: str, provider: str) -> str | None:
        if self._runtime.warmup is None:
            return None
        return self._quotas.refusal(source, provider)

    def reserve(self, source: str, provider: str) -> bool:
        if self._runtime.warmup is None:
            return False
        return self._quotas.reserve(source, provider)

    def release(self, source: str, provider: str) -> None:
        self._quotas.release(source, provider)

    def record(self, source: str, provider: str, outcome: str, *, reserved: bool = False) -> None:
        if self._runtime.warmup is not None:
            self._quotas.record(source, provider, outcome, reserved=reserved)


NO_QUOTAS = NoQuotas()


class SharedBudgets(BudgetAsker, Protocol):
    """Budgets shared by a fleet (:class:`egressd.fleet.budgets.FleetBudgets`)."""

    @property
    def ledger(self) -> Ledger: ...

    def status(self) -> dict[str, Any]: ...

    async def prepare_quotas(self, sources: Sequence[str], provider: str) -> None: ...


class Runtime:
    """Shared by all front doors of one daemon process."""

    def __init__(
        self,
        config: Config,
        observer: EgressObserver | None = None,
        shaping: ShapingPolicy | None = None,
    ) -> None:
        self.shaper: Shaper | None = None
        """Per-destination budgets (:mod:`egressd.shaping`); None without shaping files."""
        self.shared_budgets: SharedBudgets | None = None
        """The shell of budgets shared by a fleet (``[state] backend = "redis"``)."""
        self._adopt_shaping(shaping)
        self.health = SourceHealth(config.sources)
        self.observer = observer or EgressObserver()
        self.breaker = DestinationBreaker()
        self.warmup: Warmup | None = None
        """The warm-up engine, when a source warms up (the daemon sets it at startup)."""
        self.shared_quotas: Quotas | None = None
        """:attr:`warmup`'s quotas counted in the shared budgets' store (workers, Redis)."""
        self.quotas = _CurrentQuotas(self)
        """The egress plans' view of :attr:`warmup`, whichever engine is set (or none)."""
        self.egress = Egress(
            config,
            PoolSet.from_config(config),
            self.health,
            self.observer,
            self.breaker,
            quotas=self.quotas,
            budget_for=self._budget_for,
        )
        self.admission = Admission()
        self.doors = doors_with_listeners(config)
        self.active_sessions = 0
        self.draining = False
        self.drain_started = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.session_hooks: list[SessionHook] = []
        self.session_opened_hooks: list[SessionHook] = []
        self.transaction_hooks: list[TransactionHook] = []
        self.tls_hooks: list[TlsHook] = []
        self.logins = LoginThrottle(trio.current_time)
        self.login_failure_hooks: list[LoginFailureHook] = []
        self.connection_hooks: list[ConnectionHook] = []

    @property
    def config(self) -> Config:
        return self.egress.config

    def swap_config(self, config: Config, shaping: ShapingPolicy | None = None) -> None:
        """Adopt a new, validated configuration for every session that starts from now on.

        ``shaping``: the policy of its shaping files; the shaper keeps its leases, buckets,
        suspensions and overrides across the swap (:meth:`Shaper.replace_policy`)."""
        self._adopt_shaping(shaping)
        pools = PoolSet.from_config(config, previous=self.egress.pools)
        self.health.update_sources(config.sources)
        self.doors = doors_with_listeners(config)
        if self.warmup is not None:
            self.warmup.reconfigure(config.warmup, config.warming_sources)
        self.egress = Egress(
            config,
            pools,
            self.health,
            self.observer,
            self.breaker,
            quotas=self.quotas,
            budget_for=self._budget_for,
        )

    def shaping_rule_fired(self, source: str, provider: str, reason: str) -> None:
        """A shaping reply rule fired for ``source`` on a connection to ``provider``: the
        warm-up holds that source's step for that provider today (:meth:`Warmup.signal`)."""
        if self.warmup is not None:
            self.warmup.signal(source, provider, f"shaping rule: {reason}")

    def shaped_connection(self, source: str, provider: str, delta: int) -> None:
        """A connection of ``source`` to ``provider`` (``other``: none) was made (+1) or
        has ended (-1); the doors' shaping budgets say so (:class:`ShapedDestination`)."""
        for hook in self.connection_hooks:
            hook(source, provider, delta)

    def _budget_for(self, host: str | IPAddress) -> ShapedDestination | None:
        """The shaping budgets towards a SOCKS5/PROXY destination (None: no shaping)."""
        budget = proxy_budget(self.shaper, host, self.shared_budgets)
        if budget is not None:
            budget.on_connection = self.shaped_connection
        return budget

    def share_budgets(self, shared: SharedBudgets) -> None:
        """Count the shaping budgets in a store shared by a fleet from now on (at startup,
        before the first session): the shaper is rebuilt over ``shared.ledger``."""
        self.shared_budgets = shared
        if self.shaper is not None:
            policy, self.shaper = self.shaper.policy, None
            self._adopt_shaping(policy)

    def _adopt_shaping(self, policy: ShapingPolicy | None) -> None:
        if policy is None:
            self.shaper = None
        elif self.shaper is None:
            shared = self.shared_budgets
            ledger = shared.ledger if shared is not None else None
            self.shaper = Shaper(policy, trio.current_time, ledger=ledger)
        else:
            self.shaper.replace_policy(policy)

    def smtp_transaction(
        self, pool: str, code: int, source: str = "", provider: str = "other"
    ) -> None:
        """An SMTP door relayed one transaction from ``source`` to a destination of shaping
        ``provider`` whose final reply (to the dot) was ``code``."""
        for hook in self.transaction_hooks:
            hook(pool, code, source, provider)

    def smtp_tls(self, policy: str, outcome: str) -> None:
        """The SMTP door opened a remote under TLS ``policy`` (a label of
        :mod:`egressd.tlspolicy.choice`) with ``outcome`` (verified, encrypted, plaintext,
        testing_failure, failed)."""
        for hook in self.tls_hooks:
            hook(policy, outcome)

    def login_failed(self, door: str, client: str, host: str, username: str) -> float:
        """A wrong password from ``host``: log it, count it; the seconds to wait before the
        refusal (:class:`~egressd.login.LoginThrottle`, shared by every door)."""
        delay = self.logins.failed(host)
        fields = {"door": door, "client": client, "username": printable(username), "delay": delay}
        auth_log.warning("login failed", extra={"fields": fields})
        for hook in self.login_failure_hooks:
            hook(door)
        return delay

    def begin_drain(self) -> None:
        self.draining = True
        self.drain_started.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def session(
        self, door: str, client: str, listener: str | None = None, *, host: str | None = None
    ) -> AbstractAsyncContextManager[SessionRecord]:
        """Account for one connection; raise :class:`Overloaded` when the limits refuse it.

        ``async with runtime.session(door, client, host=address) as record:``; entering
        raises :class:`Overloaded` (:mod:`egressd.admission`: max_connections, the client
        address's cap, the other doors' reserves), leaving logs the connection line and runs
        the session hooks. ``host`` is the client's address (default: ``client``).
        """
        return _SessionScope(self, door, client, listener, client if host is None else host)

    def _open(self, door: str, client: str, listener: str | None, host: str) -> SessionRecord:
        refusal = self.admission.refusal(self.egress.config.limits, self.doors, door, host)
        if refusal is not None:
            raise Overloaded(refusal)
        record = SessionRecord(door=door, client=client, listener=listener)
        self.admission.opened(door, host)
        self.active_sessions += 1
        if self.active_sessions == 1:
            self._idle = trio.Event()
        for opened in self.session_opened_hooks:
            opened(record)
        return record

    def _close(self, record: SessionRecord, host: str, exc: BaseException | None) -> None:
        self.admission.closed(record.door, host)
        if exc is not None and record.outcome == "closed":
            record.outcome = "cancelled" if isinstance(exc, trio.Cancelled) else "error"
            record.detail = record.detail or f"{type(exc).__name__}: {exc}"
        self.active_sessions -= 1
        if self.active_sessions == 0:
            self._idle.set()
        log_fields(log, INFO, "connection", record.fields())  # the same line, a fifth the cost
        for hook in self.session_hooks:
            hook(record)


# The two context managers below are classes rather than @asynccontextmanager generators:
# each connection enters both, and a generator-based manager costs several times more.


class _SessionScope:
    """:meth:`Runtime.session`: one connection's record, its accounting and its log line."""

    __slots__ = ("_client", "_door", "_host", "_listener", "_record", "_runtime")

    def __init__(
        self, runtime: Runtime, door: str, client: str, listener: str | None, host: str
    ) -> None:
        self._runtime = runtime
        self._door = door
        self._client = client
        self._listener = listener
        self._host = host
        self._record: SessionRecord | None = None

    async def __aenter__(self) -> SessionRecord:
        self._record = self._runtime._open(self._door, self._client, self._listener, self._host)
        return self._record

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._record is not None
        self._runtime._close(self._record, self._host, exc)
