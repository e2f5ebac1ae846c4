"""Circuit breakers per destination address and per (source, site), and what destinations
say about sources.

Theory of operation
-------------------
A destination (an IP address and port) that keeps failing is the destination's problem,
not the source's: dead MX hosts and closed ports are everyday traffic. So destination
failures never suspend a source (KumoMTA does the same). Instead each destination has a
breaker, shared by every source and every tenant:

``closed``
    Dials go through. ``failures`` destination failures within ``window`` seconds (with no
    success in between) open it.
``open``
    For ``open_for`` seconds every dial to the destination fails at once, from any source,
    with ``DESTINATION_FAILING`` and a reply that names the destination; no socket is
    opened. This spares the destination and frees the MTA at once.
``half-open``
    When the time is up, one dial (the trial) goes through while others still fail fast.
    A success closes the breaker; a failure opens it again for twice as long, up to
    ``max_open_for``. A trial that never reports (its session was cancelled) is replaced by
    another after ``open_for``.

The defaults (:class:`BreakerSettings`): 3 failures within 60 s open the breaker for 30 s,
doubling up to 5 minutes. Three, because one or two failures are noise (a SYN lost, a
server restarting) while a third in a minute is a pattern; 30 s, because it is short next
to an MTA's retry interval (minutes), so a destination that comes back loses little.

A *rejection* is different: the remote answered (a 4xx/5xx greeting, a refused EHLO), so
it is alive, and its answer may concern one source only (``421 4.7.0 [TSS04]``, a
blocklisted address). Rejections count against the (source, site) path instead, as
KumoMTA's ``consecutive_connection_failures_before_delay`` counts per egress path: the same
three states, but open for that source towards that site only (every address of the site;
the site is the shaping site of the MX hosts, else the address). Other sources keep the
site, and the source keeps every other site.

The breaker also keeps the one piece of evidence against a *source* that destinations can
give (:meth:`DestinationBreaker.source_evidence`): a site (else a destination) that failed
from this source although another source reached it within ``window`` seconds. Spread over
several distinct sites, that points at the source (a blocked address, a broken route), and
the caller counts it against the source's health; the many MX addresses of one provider
are one site, so one provider blocking a source never suspends it everywhere.

Memory is bounded: at most ``capacity`` destinations are remembered, the least recently
used forgotten first. Pure: no trio, no sockets; time comes from an injected clock.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from egressd.config import IPAddress, format_hostport
from egressd.egress.failures import Failure

__all__ = ["BreakerSettings", "DestinationBreaker", "Open"]

Destination = tuple[IPAddress, int]
Clock = Callable[[], float]
_Key = tuple[int, int, int]
_Path = tuple[str, str]
"""(source, site): the site is the shaping site, else the destination's ``address:port``."""


def _key(destination: Destination) -> _Key:
    """A dict key for a destination: ``IPv4Address.__hash__`` formats a hex string, and
    :meth:`DestinationBreaker.success` runs for every connection."""
    address, port = destination
    return address.version, int(address), port


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 3
    window: float = 60.0
    open_for: float = 30.0
    max_open_for: float = 300.0
    capacity: int = 10000


@dataclass(frozen=True)
class Open:
    """Why a destination is not dialed now: for the reply that names it."""

    destination: Destination
    failures: int
    seconds_left: float
    last_kind: Failure
    last_reason: str
    source: str | None = None
    """Set when it is the (source, site) path's breaker, open for that source only."""

    def describe(self) -> str:
        who = f' from source "{self.source}"' if self.source is not None else ""
        return (
            f"destination {format_hostport(*self.destination)} is failing{who}"
            f" ({self.failures} failures, the last: {self.last_reason});"
            f" not dialed again for {self.seconds_left:.0f}s"
        )


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    open_until: float | None = None
    open_for: float = 0.0
    trial_started: float | None = None
    opened_after: int = 0
    last_kind: Failure = Failure.TIMEOUT
    last_reason: str = ""
    last_destination: Destination | None = None
    """The address of the last failure (a path's breaker covers every address of a site)."""


class DestinationBreaker:
    """Breakers for every destination; see the module docstring."""

    def __init__(
        self, settings: BreakerSettings | None = None, *, now: Clock = time.monotonic
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._now = now
        self._states: OrderedDict[_Key, _State] = OrderedDict()
        self._paths: OrderedDict[_Path, _State] = OrderedDict()
        """(source, site) -> the breaker of that path, for rejections (see the module doc)."""
        self._reached: dict[_Key | str, tuple[str, float]] = {}
        """Site (else destination) -> the source that last reached it, and when (oldest
        first)."""
        self._evidence: OrderedDict[tuple[_Key | str, str], float] = OrderedDict()
        """(site, source) -> when it last failed there although another source had
        reached it."""

    def check(
        self, destination: Destination, source: str | None = None, site: str | None = None
    ) -> Open | None:
        """None when ``destination`` may be dialed now (maybe as the half-open trial), from
        ``source`` (when given) towards ``site`` (default: the destination itself)."""
        state = self._states.get(_key(destination))
        if state is not None and state.open_until is not None:
            refusal = self._check(destination, state)
            if refusal is not None or source is None:
                return refusal
        if source is None or not self._paths:
            return None
        path = self._paths.get((source, _site(destination, site)))
        if path is None or path.open_until is None:
            return None
        refusal = self._check(destination, path)
        return None if refusal is None else replace(refusal, source=source)

    def failure(
        self,
        destination: Destination,
        kind: Failure,
        reason: str,
        *,
        source: str | None = None,
        site: str | None = None,
    ) -> bool:
        """Count a destination failure; True when it opens a breaker.

        A rejection (the remote answered, with a 4xx/5xx greeting) from ``source`` counts
        against the (source, site) path only: the destination is alive, and its answer
        may be about this source alone (``421 4.7.0 [TSS04]``). Every other failure
        counts against the destination, for every source."""
        if kind is Failure.REJECTED and source is not None:
            path = self._path((source, _site(destination, site)))
            path.last_destination = destination
            return self._count(path, kind, reason)
        return self._count(self._state(destination), kind, reason)

    def success(self, destination: Destination, source: str, site: str | None = None) -> None:
        """A dial from ``source`` reached ``destination`` (of ``site``): close its breakers.

        Runs for every connection, so it is one clock read and a few dict operations unless
        the destination has a breaker state.
        """
        key = _key(destination)
        where = key if site is None else site
        reached = self._reached
        reached.pop(where, None)
        reached[where] = (source, self._now())
        if len(reached) > self.settings.capacity:
            del reached[next(iter(reached))]
        state = self._states.get(key)
        if state is not None:
            _close(state)
        if self._paths:
            path = self._paths.get((source, _site(destination, site)))
            if path is not None:
                _close(path)
        self._evidence.pop((where, source), None)

    def source_evidence(
        self, destination: Destination, source: str, site: str | None = None
    ) -> bool:
        """True when ``destination`` (of ``site``) just failed from ``source`` although
        another source was the last to reach that site, within ``window`` seconds, and this
        is the first such failure of ``source`` there within the window (each site counts
        once: the many MX addresses of one provider are one piece of evidence)."""
        where = _key(destination) if site is None else site
        last = self._reached.get(where)
        now = self._now()
        horizon = now - self.settings.window
        if last is None or last[0] == source or last[1] < horizon:
            return False
        previous = self._evidence.pop((where, source), None)
        self._evidence[where, source] = now
        if len(self._evidence) > self.settings.capacity:
            self._evidence.popitem(last=False)
        return previous is None or previous < horizon

    # ------------------------------------------------------------------ helpers

    def open_breakers(self) -> list[Open]:
        """Every destination address whose breaker is open now, or half-open
        (``seconds_left`` 0: the next dial is its trial), most recently failing last: for
        status and metrics; then the open (source, site) paths' breakers, each as its last
        failing address with the source it is open for."""
        now = self._now()
        found = []
        for (version, number, port), state in self._states.items():
            if state.open_until is None:
                continue
            address: IPAddress = (
                ipaddress.IPv4Address(number) if version == 4 else ipaddress.IPv6Address(number)
            )
            left = max(0.0, state.open_until - now)
            found.append(self._open((address, port), state, left))
        for (source, _), state in self._paths.items():
            if state.open_until is None or state.last_destination is None:
                continue
            left = max(0.0, state.open_until - now)
            found.append(replace(self._open(state.last_destination, state, left), source=source))
        return found

    def _check(self, destination: Destination, state: _State) -> Open | None:
        assert state.open_until is not None
        now = self._now()
        if now < state.open_until:
            return self._open(destination, state, state.open_until - now)
        trial = state.trial_started
        if trial is not None and now - trial < self.settings.open_for:
            return self._open(destination, state, trial + self.settings.open_for - now)
        state.trial_started = now
        return None

    def _count(self, state: _State, kind: Failure, reason: str) -> bool:
        now = self._now()
        state.last_kind, state.last_reason = kind, reason
        if state.trial_started is not None:
            state.open_for = min(state.open_for * 2, self.settings.max_open_for)
            return self._trip(state, now, len(state.failures) + 1)
        if state.open_until is not None and now < state.open_until:
            return False
        state.failures.append(now)
        while state.failures and now - state.failures[0] > self.settings.window:
            state.failures.popleft()
        if len(state.failures) < self.settings.failures:
            return False
        state.open_for = self.settings.open_for
        return self._trip(state, now, len(state.failures))

    def _path(self, path: _Path) -> _State:
        state = self._paths.get(path)
        if state is None:
            state = self._paths[path] = _State()
            if len(self._paths) > self.settings.capacity:
                self._paths.popitem(last=False)
        else:
            self._paths.move_to_end(path)
        return state

    def _trip(self, state: _State, now: float, failures: int) -> bool:
        state.open_until = now + state.open_for
        state.trial_started = None
        state.opened_after = failures
        state.failures.clear()
        return True

    def _open(self, destination: Destination, state: _State, left: float) -> Open:
        return Open(destination, state.opened_after, left, state.last_kind, state.last_reason)

    def _state(self, destination: Destination) -> _State:
        key = _key(destination)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
            if len(self._states) > self.settings.capacity:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state


def _site(destination: Destination, site: str | None) -> str:
    """The path's site: the shaping site when known, else the destination's address."""
    return site if site is not None else format_hostport(*destination)


def _close(state: _State) -> None:
    state.failures.clear()
    state.open_until = state.trial_started = None
