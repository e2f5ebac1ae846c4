"""Why an outbound connection failed, and which party that failure blames.

Every failure on the way out is one :class:`EgressFailure`: a :class:`Failure` kind plus a
detail text that names the source, the address and the error. The kinds are facts about
the network, never replies: the door that answers turns a kind into its own protocol's
reply (the SOCKS5 door into an RFC 1928 reply code, the SMTP door into a 4xx), so no SOCKS
or SMTP code appears below the doors.

:func:`blame` says whose fault a kind is, which decides both what to try next (see
:mod:`egressd.egress.plan`) and what health is told:

``SOURCE``
    The source cannot work right now: its address is not plumbed here (EADDRNOTAVAIL at
    bind), or its proxy (HAProxy or SOCKS5 server) is unreachable, refuses or stays silent.
    Another source may do better; the source's health counts it (KumoMTA's
    ``suspend_when_unplumbed`` / ``suspend_when_proxy_unhealthy``).
``DESTINATION``
    The destination explains it: refused, unreachable, silent, a name without addresses,
    a server that answered but would not serve. Another address of the destination may
    do better, another source would not; the destination's circuit breaker counts it.
``NOBODY``
    Nothing to learn and nothing to retry: a local resource ran out, an access rule
    refused, the pool gave no source.

Pure: no trio, no sockets.
"""

from __future__ import annotations

import enum

from egressd.config import IPAddress

__all__ = ["EgressFailure", "Failure", "Party", "Stage", "blame"]


class Failure(str, enum.Enum):
    """What went wrong; compares equal to its value (``kind == "unplumbed"``)."""

    # --- the source's fault
    UNPLUMBED = "unplumbed"
    """The source address is not configured on this host (EADDRNOTAVAIL at bind)."""
    PROXY_UNREACHABLE = "proxy_unreachable"
    """The HAProxy/SOCKS5 server could not be resolved or connected to."""
    PROXY_REFUSED = "proxy_refused"
    """The SOCKS5 server refused (a reply other than 03-06 to CONNECT) or broke off."""
    PROXY_TIMEOUT = "proxy_timeout"
    """The deadline expired while connecting to or talking with the proxy."""
    # --- the destination's fault
    REFUSED = "refused"
    """The destination refused the connection (RST, or the proxy says so)."""
    HOST_UNREACHABLE = "host_unreachable"
    """No route to the destination's host."""
    NETWORK_UNREACHABLE = "network_unreachable"
    """No route to the destination's network."""
    TIMEOUT = "timeout"
    """The deadline expired connecting to the destination (or the kernel's connect timed
    out, or the proxy reports a TTL expiry)."""
    RESOLVE = "resolve"
    """The destination's name could not be resolved."""
    NO_ADDRESS = "no_address"
    """The destination has no address of the family the source's egress uses."""
    REJECTED = "rejected"
    """Connected, but the server would not serve (a step after the connect failed: an SMTP
    greeting that is not 220, a refused EHLO, a failed STARTTLS)."""
    DESTINATION_FAILING = "destination_failing"
    """The destination's circuit breaker is open: it failed repeatedly, so it is not
    dialed again for a while, from any source."""
    # --- nobody's fault
    LOCAL = "local"
    """A local resource ran out (file descriptors, memory, ports towards one peer)."""
    DENIED = "denied"
    """An ``[access]`` rule refuses the destination."""
    UNKNOWN_POOL = "unknown_pool"
    """The pool does not exist (or none was named)."""
    UNKNOWN_SOURCE = "unknown_source"
    """No source of that name is configured."""
    NO_SOURCES = "no_sources"
    """The pool has no source to give: empty, or every source is suspended."""
    SOURCE_LIMIT = "source_limit"
    """The source (every source of the pool) is at ``max_connections_per_source``."""
    BUDGET = "budget"
    """No source of the pool may connect to this destination now: a shaping budget
    (connection limit, connection rate) is used up, or each source is suspended there."""
    WARMUP_QUOTA = "warmup_quota"
    """Every source the pool could give is warming up and has used today's quota."""

    def __str__(self) -> str:
        return self.value


class Party(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"
    NOBODY = "nobody"


class Stage(str, enum.Enum):
    """How far an attempt got; a timeout blames the party of the stage it expired in."""

    SELECT = "select"
    RESOLVE = "resolve"
    PROXY_CONNECT = "proxy_connect"
    PROXY_HANDSHAKE = "proxy_handshake"
    CONNECT = "connect"
    SESSION = "session"
    """Connected; a step on top of the connection (an SMTP greeting) is running."""

    def __str__(self) -> str:
        return self.value


_SOURCE_KINDS = frozenset(
    {Failure.UNPLUMBED, Failure.PROXY_UNREACHABLE, Failure.PROXY_REFUSED, Failure.PROXY_TIMEOUT}
)
_DESTINATION_KINDS = frozenset(
    {
        Failure.REFUSED,
        Failure.HOST_UNREACHABLE,
        Failure.NETWORK_UNREACHABLE,
        Failure.TIMEOUT,
        Failure.RESOLVE,
        Failure.NO_ADDRESS,
        Failure.REJECTED,
        Failure.DESTINATION_FAILING,
    }
)


def blame(kind: Failure) -> Party:
    """Whose fault a failure of ``kind`` is; see the module docstring."""
    if kind in _SOURCE_KINDS:
        return Party.SOURCE
    if kind in _DESTINATION_KINDS:
        return Party.DESTINATION
    return Party.NOBODY


def timeout_kind(stage: Stage) -> Failure:
    """The kind of a deadline that expired at ``stage``."""
    if stage in (Stage.PROXY_CONNECT, Stage.PROXY_HANDSHAKE):
        return Failure.PROXY_TIMEOUT
    return Failure.TIMEOUT


class EgressFailure(Exception):
    """An outbound connection could not be had; ``str(failure)`` is the detail.

    ``kind`` (:class:`Failure`), ``source`` (the source's name, when one was chosen),
    ``stage``, ``address`` (the address being tried: the destination's, or the proxy's in
    the proxy stages), ``destination`` (the destination address, when known), ``errno``
    (the OS error number, when there was one) and ``cause`` (for ``DESTINATION_FAILING``:
    the kind of failure that opened the breaker). Nothing reached the destination when one
    is raised, so retrying elsewhere is safe.
    """

    def __init__(
        self,
        kind: Failure,
        detail: str,
        *,
        source: str | None = None,
        stage: Stage = Stage.SELECT,
        address: tuple[IPAddress, int] | None = None,
        destination: tuple[IPAddress, int] | None = None,
        errno: int | None = None,
        cause: Failure | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.source = source
        self.stage = stage
        self.address = address
        self.destination = destination if destination is not None else _destination(stage, address)
        self.errno = errno
        self.cause = cause

    @property
    def party(self) -> Party:
        return blame(self.kind)


def _destination(
    stage: Stage, address: tuple[IPAddress, int] | None
) -> tuple[IPAddress, int] | None:
    if stage in (Stage.CONNECT, Stage.SESSION):
        return address
    return None
