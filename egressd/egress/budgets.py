"""Per-destination budgets, as the egress plan sees them: may this source connect there now?

The plan does not know shaping (:mod:`egressd.shaping` sits beside it, not below): it is
handed one :class:`DestinationBudget` per plan, already bound to the plan's destination
(the SMTP door's site and provider from the MX next hop; the SOCKS5 and PROXY doors' name
or address). :meth:`Egress.pick <egressd.egress.selection.Egress.pick>` skips a source
whose :meth:`~DestinationBudget.refusal` says no (its connection limit or connection rate
for that destination is used up, or it is suspended there), so smooth weighted
round-robin shares stay exact among the eligible sources; the plan then
:meth:`~DestinationBudget.take` s the picked source's connection lease, gives it back
when it moves to another source or gives up, and otherwise leaves it to the caller, who
:meth:`~DestinationBudget.release` s it when the connection ends, however it ends.

A reply rule that suspends the source while the plan's per-address step runs (the
banner or EHLO reply of the SMTP door's remote matched it) makes the plan move to the
pool's next source instead of the next address (:meth:`~DestinationBudget.suspended`).

When no source of the pool is eligible for this reason, the failure is ``BUDGET`` and its
detail, from :meth:`~DestinationBudget.exhausted`, names the budget.

Budgets shared by a fleet (:mod:`egressd.shaping.ledger`) are asked of their store ahead,
because the plan's questions are synchronous: the executor awaits
:meth:`~DestinationBudget.prepare` with the plan's candidate sources before the plan
runs, and calls :meth:`~DestinationBudget.settle` once it has picked or given up (what
was asked for and not used goes back). Both do nothing for in-process budgets. Pure: no
trio (the protocol only names the coroutine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["DestinationBudget"]


class DestinationBudget(Protocol):
    """One plan's destination budgets (implemented over the shaper by :mod:`egressd.net`)."""

    @property
    def site(self) -> str:
        """The destination's site (KumoMTA's: the MX hosts; else the name or address),
        which keys destination health per (source, site)."""

    def refusal(self, source: str) -> str | None:
        """Why ``source`` may not open a connection to the destination now, or None."""

    def suspended(self, source: str) -> str | None:
        """Why ``source`` is suspended there now (a reply rule fired, maybe on the reply
        to this very connection's banner or EHLO), or None."""

    def take(self, source: str) -> str | None:
        """Take ``source``'s connection lease (and rate cells); the refusal when it cannot.

        At most one lease is held: taking another gives the previous one back."""

    def connected(self, source: str) -> None:
        """The connection from ``source`` (the lease's) was made."""

    def failed(self, source: str) -> None:
        """A connection attempt from ``source`` (the lease's) failed at the destination;
        the lease is kept for the next address."""

    def release(self) -> None:
        """Give the lease back (idempotent); the connection has ended or never began."""

    def exhausted(self, pool: str) -> str:
        """The failure's detail when no source of ``pool`` may connect (after refusals)."""

    async def prepare(self, sources: Sequence[str]) -> None:
        """Before the plan runs: ask a shared store for what a connection from any of
        ``sources`` would spend, so that the checks above need no I/O."""

    def settle(self) -> None:
        """The plan has picked or given up: what was asked for and not used goes back."""
