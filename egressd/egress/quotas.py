"""Warm-up quotas as the egress plan and the relay see them: held at pick time. Pure.

Theory of operation
-------------------
A warming source may send a number of messages a day to each provider
(:mod:`egressd.warmup`). Counting a message only when its final reply comes lets sessions
running at once pass the quota together (each picked the source while it had room). So a
message is *held* from the moment its source is picked until it is counted or given back:

* :meth:`Plan <egressd.egress.plan.Plan>` holds one message of the picked source's quota
  to the destination's provider (:meth:`Quotas.reserve`) right after the pick, in the same
  step as the check (nothing runs in between), and gives it back when it moves to another
  source or gives up;
* the SOCKS5 and PROXY doors see no message: a connection made is one message of the
  quota, counted as ``connected`` (:meth:`QuotaHold.settle`) as soon as it is made;
* the SMTP door's first transaction on the new connection uses the plan's hold; each later
  one on the kept connection holds one more before its MAIL (:class:`ConnectionQuota`,
  the relay core's per-message budget). When the quota has no room, the budget refuses with
  :data:`WARMUP_QUOTA` and the relay core closes the connection and opens another: the
  pick moves to a source with room left (overflow). Each transaction's end counts its
  message by the final reply (sent, deferred, rejected), or gives it back when no final
  reply came (nothing was sent).

The engine that keeps the counts implements :class:`Quotas`; :class:`NoQuotas` stands in
when nothing warms up. Quotas shared by several processes (``[daemon] workers``, Redis)
are asked of their store ahead (:class:`QuotasAskedAhead`): the executor awaits
:meth:`~QuotasAskedAhead.prepare` with the plan's candidate sources before the pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "WARMUP_QUOTA",
    "ConnectionQuota",
    "NoQuotas",
    "QuotaHold",
    "QuotaRefusal",
    "Quotas",
    "QuotasAskedAhead",
    "SwitchedQuotas",
    "outcome_of",
]

WARMUP_QUOTA = "warmup_quota"
"""The per-message refusal that says: this source has no quota left here, open another."""


class Quotas(Protocol):
    """Daily warm-up quotas per (source, provider) (:class:`egressd.warmup.Warmup` is one)."""

    def refusal(self, source: str, provider: str) -> str | None:
        """Why ``source`` may not send to ``provider`` now (its quota is used), or None."""
        ...

    def reserve(self, source: str, provider: str) -> bool:
        """Hold one message; True when held (False: the source has no quota to hold)."""
        ...

    def release(self, source: str, provider: str) -> None:
        """Give back one held message that was not sent."""
        ...

    def record(self, source: str, provider: str, outcome: str, *, reserved: bool = False) -> None:
        """Count one message (``sent``, ``deferred``, ``rejected``) or connection
        (``connected``); ``reserved``: it was held, and this ends the hold."""
        ...


@runtime_checkable
class QuotasAskedAhead(Quotas, Protocol):
    """Quotas counted in a shared store (:mod:`egressd.fleet.quotas`): the executor awaits
    :meth:`prepare` before a plan picks, so that the questions above need no I/O."""

    async def prepare(self, sources: Sequence[str], provider: str) -> None: ...


class SwitchedQuotas:
    """Quotas that may have no warm-up behind them for a while (the runtime's, before a
    reload turns warm-up on): :meth:`warming` False means that every question answers
    as :class:`NoQuotas` does, so a connection need not ask them message by message."""

    def warming(self) -> bool:
        """Some source warms up now (the questions may refuse, hold or count)."""
        return True


class NoQuotas(SwitchedQuotas):
    """No source warms up: nothing is refused, held or counted."""

    def warming(self) -> bool:
        return False

    def refusal(self, source: str, provider: str) -> str | None:
        return None

    def reserve(self, source: str, provider: str) -> bool:
        return False

    def release(self, source: str, provider: str) -> None:
        pass

    def record(self, source: str, provider: str, outcome: str, *, reserved: bool = False) -> None:
        pass


def outcome_of(code: int) -> str:
    """A final reply's code as a warm-up outcome: 2xx sent, 4xx deferred, 5xx rejected."""
    return "sent" if code < 400 else "deferred" if code < 500 else "rejected"


@dataclass
class QuotaHold:
    """One held message of ``source`` to ``provider``, ended once (release or settle)."""

    quotas: Quotas
    source: str
    provider: str
    held: bool

    @classmethod
    def take(cls, quotas: Quotas, source: str, provider: str) -> QuotaHold:
        return cls(quotas, source, provider, quotas.reserve(source, provider))

    def release(self) -> None:
        """Not sent: give the message back (idempotent)."""
        if self.held:
            self.held = False
            self.quotas.release(self.source, self.provider)

    def settle(self, outcome: str) -> None:
        """Count it with ``outcome`` (the hold, if still held, ends with it)."""
        reserved, self.held = self.held, False
        self.quotas.record(self.source, self.provider, outcome, reserved=reserved)


@dataclass(frozen=True)
class QuotaRefusal:
    """A per-message refusal: the budget's name and a sentence (the relay's MessageRefusal)."""

    budget: str
    reason: str


class MessageRefusal(Protocol):
    @property
    def budget(self) -> str: ...

    @property
    def reason(self) -> str: ...


class MessageBudget(Protocol):
    def send(self) -> MessageRefusal | None: ...


class ConnectionQuota:
    """One SMTP connection's warm-up quota, message by message; see the module docstring.

    ``first``: the plan's hold, used by the connection's first message; ``inner``: the
    connection's other per-message budgets (the shaping lease), asked after the quota.
    """

    def __init__(
        self,
        quotas: Quotas,
        source: str,
        provider: str,
        first: QuotaHold | None = None,
        inner: MessageBudget | None = None,
    ) -> None:
        self.quotas = quotas
        self.source = source
        self.provider = provider
        self.inner = inner
        self._spare = first
        self._current: QuotaHold | None = None
        self._ahead = quotas if isinstance(quotas, QuotasAskedAhead) else None
        self._switched = quotas if isinstance(quotas, SwitchedQuotas) else None

    async def prepare(self) -> None:
        """Before a MAIL on the kept connection: quotas counted in a shared store ask it
        ahead for this message (:class:`QuotasAskedAhead`), so that :meth:`send` finds a
        ticket instead of refusing (which would cost a new connection)."""
        if self._spare is None and self._ahead is not None:
            await self._ahead.prepare([self.source], self.provider)

    def send(self) -> MessageRefusal | None:
        """Before MAIL: hold this message, or say why not (nothing is held then)."""
        if self._current is None:
            if self._spare is not None:
                self._current, self._spare = self._spare, None
            elif self._switched is None or self._switched.warming():
                refusal = self.quotas.refusal(self.source, self.provider)
                if refusal is not None:
                    return QuotaRefusal(WARMUP_QUOTA, refusal)
                self._current = QuotaHold.take(self.quotas, self.source, self.provider)
            # Else no warm-up now: nothing to refuse or hold (about ten Python calls a
            # message less). The message goes unheld, as it would be held with held=False;
            # settle() counts it all the same when a reload turned warm-up on meanwhile.
        refused = self.inner.send() if self.inner is not None else None
        if refused is not None:
            if self._current is not None:
                self._current.release()
            self._current = None
        return refused

    def settle(self, code: int | None) -> None:
        """The transaction ended: count its message by the final reply's ``code``, or
        give it back (None: no final reply, nothing was sent)."""
        current, self._current = self._current, None
        if code is None:
            if current is not None:
                current.release()
        elif current is not None:
            current.settle(outcome_of(code))
        else:  # the connection was closed first (and gave the hold back)
            self.quotas.record(self.source, self.provider, outcome_of(code))

    def close(self) -> None:
        """The connection is closed: give back whatever is still held."""
        for hold in (self._spare, self._current):
            if hold is not None:
                hold.release()
        self._spare = self._current = None
