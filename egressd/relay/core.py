"""The SMTP relay core: every decision of the cut-through relay, without I/O.

Theory of operation
-------------------
:class:`RelayCore` sits between the machine facing the MTA
(:class:`~egressd.proto.smtp_server.SmtpServer`) and the one facing the remote
(:class:`~egressd.proto.smtp_client.SmtpClient`), in mitmproxy's proxy-core manner: the shell
feeds it events (:mod:`egressd.relay.events`) with :meth:`RelayCore.handle`, which returns
the commands to execute, in order. A command that waits for a result (open a remote,
resolve a next hop, send to the remote) is always the last of a batch; its result is the
next event. Inside, each MTA command is handled by a generator that ``yield``\\ s commands
and receives results, so the logic reads top to bottom like the conversation it drives.

It never queues and never says 250 for the remote: every answer about a recipient or the
message is the remote server's own reply, or one of egressd's (:mod:`egressd.relay.replies`).

* MAIL: with ``[auth.users]``, a client that did not authenticate gets ``451 4.7.0``
  unless its listener says ``auth = "optional"``. The transaction's pool is chosen
  (:func:`pool_for`: without users the AUTH username, then ``[smtp.sender_pools]`` by
  exact sender, then by ``@domain``, then the listener's pool; with users the same, but
  only among the pools the authenticated user may use). egressd answers MAIL itself (250
  when there is a pool, naming it only to an authenticated client; ``451 4.3.5`` when there
  is none): where the message goes is not known before the first recipient.
* First RCPT: a remote is opened for the recipient's domain through the pool
  (:class:`~egressd.relay.events.OpenRemote`), or the kept one is reused (below); then
  ``MAIL FROM`` and the RCPT go out, in one write when the remote pipelines (RFC 2920). If
  the remote refuses MAIL, this and every later RCPT of the transaction get that refusal.
* Shaping: before MAIL goes to a remote, its per-message budgets are asked
  (:class:`~egressd.relay.events.MessageBudget`). A kept connection they refuse (it has
  carried ``max_deliveries_per_connection`` messages, its source's message rate is used
  up, a rule suspended it) first asks selection (:class:`~egressd.relay.events.
  AskSelection`) whether a new connection could take the message (not for
  ``max_deliveries_per_connection``, which a new connection starts afresh): if so, it gets QUIT
  and a fresh one is opened (selection skips the sources without budget, so the message
  moves to one that has some); if not, the message gets the ``451 4.7.0`` that names the
  budgets, which the open would have failed with, and the connection is kept for the
  next one (at a steady backlog at the rate limit a message costs no new connection). A
  fresh connection refused (a race with another session) is a ``451 4.7.0`` naming the
  budget, and the remote sees nothing.
* Later RCPTs ride the same transaction when their domain has the same next hop
  (``NextHop.same_destination``); others get ``452 4.5.3``, so the MTA sends them in
  another transaction.
* DATA: the remote's reply to DATA is the MTA's reply; after the remote's 354 the body
  goes on piece by piece, and the remote's reply to the final dot is the MTA's reply. A
  body that does not end cleanly (the MTA drops or stalls, a bare CR/LF, more than the
  advertised SIZE) makes the core close the remote without the final dot: nothing is
  delivered.
* A 421 from the remote ends that connection; it is passed on, and an MTA told 421 is
  closed by its own machine. Any later command of the transaction gets the same 421.
* Between transactions the remote connection is kept (after RSET when needed) and reused
  when the next transaction's pool holds its source (in rotation, not suspended, same
  configuration) and its destination is the same; otherwise it gets QUIT. A kept
  connection that turns out to be dead is replaced, once, by a fresh one.

Each transaction ends in one :class:`~egressd.relay.events.TransactionEnded` with the
fields of its log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from egressd.config import Source
from egressd.proto.smtp_client import mail_incompatibility
from egressd.proto.smtp_common import Data, DataChunk, Ehlo, Helo, Mail, Quit, Rcpt, Reply, Rset
from egressd.proto.smtp_common import EndOfData as EndOfDataCommand
from egressd.relay import replies
from egressd.relay.events import (
    AWAITING,
    AskSelection,
    CloseRemote,
    Command,
    EgressView,
    Event,
    MtaAuthenticated,
    MtaBareLineEnding,
    MtaBody,
    MtaClosed,
    MtaCommand,
    MtaDataDiscarded,
    MtaEndOfData,
    MtaTimedOut,
    MtaTooSlow,
    NextHopResolved,
    NextHops,
    NextHopView,
    OpenFailed,
    OpenRemote,
    Remote,
    RemoteLost,
    RemoteOpened,
    RemoteReplied,
    RemoteTimedOut,
    ReplyMta,
    ResolveNextHop,
    SelectionAnswered,
    SendRemote,
    SessionEnded,
    TransactionEnded,
    TransactionStarted,
)

__all__ = ["RelayCore", "Transaction", "pool_for", "recipient_domain"]

#: The commands whose result is the next event, by type: a set lookup, no isinstance chain.
_AWAITING: frozenset[type[Command]] = frozenset(AWAITING)
# The commands without fields, made once (equal to any other instance, and immutable).
_DATA = Data()
_END_OF_DATA = EndOfDataCommand()
_RSET = Rset()
# The sends that are the same every time, made once (a SendRemote counts its replies).
_SEND_DATA = SendRemote((_DATA,), "DATA")
_SEND_RSET = SendRemote((_RSET,), "RSET")

T = TypeVar("T")

PER_CONNECTION = frozenset({"max_deliveries_per_connection"})
"""Message budgets a new connection from the same source starts afresh: a kept connection
they refuse is replaced without asking selection (which would count the kept connection's
own slot of a ``connection_limit``)."""
#: A step of the core: yields commands, receives the result of each awaiting one.
Step = Generator[Command, "Event | None", T]


def pool_for(
    sender: str,
    auth_user: str | None,
    sender_pools: Mapping[str, str],
    listener_pool: str | None,
    user_pools: Sequence[str] | None = None,
) -> tuple[str | None, str]:
    """The transaction's pool and why: ``auth``, ``sender``, ``sender domain``, ``listener``.

    ``sender_pools`` keys are lower-cased sender addresses or ``@domain``. ``user_pools``
    is None without ``[auth.users]``: then the AUTH username is the pool, and
    ``sender_pools`` serve everyone. With users it holds the pools the authenticated user
    may use (empty for a client that did not authenticate): ``sender_pools`` and the
    listener's pool count only within them, then the user's first pool; a client that did
    not authenticate gets the listener's pool, never one by its sender.
    """
    if user_pools is not None:
        return _pool_with_users(sender, auth_user, sender_pools, listener_pool, user_pools)
    if auth_user:
        return auth_user, "auth"
    by_sender = _pool_by_sender(sender, sender_pools) if sender_pools else None
    if by_sender is not None:
        return by_sender
    if listener_pool:
        return listener_pool, "listener"
    return None, "none"


def _pool_with_users(
    sender: str,
    auth_user: str | None,
    sender_pools: Mapping[str, str],
    listener_pool: str | None,
    user_pools: Sequence[str],
) -> tuple[str | None, str]:
    if auth_user is None:
        return (listener_pool, "listener") if listener_pool else (None, "none")
    by_sender = _pool_by_sender(sender, sender_pools)
    if by_sender is not None and by_sender[0] in user_pools:
        return by_sender
    if listener_pool in user_pools:
        return listener_pool, "listener"
    return (user_pools[0], "auth") if user_pools else (None, "none")


def _pool_by_sender(sender: str, sender_pools: Mapping[str, str]) -> tuple[str, str] | None:
    address = sender.lower()
    if address and address in sender_pools:
        return sender_pools[address], "sender"
    domain = address.rpartition("@")[2]
    if domain and f"@{domain}" in sender_pools:
        return sender_pools[f"@{domain}"], "sender domain"
    return None


def recipient_domain(address: str) -> str:
    """The domain of a recipient, lower-cased; "" for ``Postmaster`` alone, which has none
    (RFC 5321 4.5.1: it names the receiving host's own postmaster)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


class _Refusal(Exception):
    """A recipient cannot be taken; ``reply`` says why (any code)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _RemoteFailed(Exception):
    """The remote conversation failed; ``reply`` is the 4xx for the MTA."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass
class Transaction:
    """One MAIL ... final dot, as the relay sees it."""

    mail: Mail
    pool: str
    egress: EgressView
    started: float
    recipients: list[tuple[str, int]] = field(default_factory=list)
    next_hops: NextHops = field(default_factory=dict)
    mail_refusal: Reply | None = None
    broken: Reply | None = None
    body_failure: Reply | None = None
    remote_open: bool = False
    in_body: bool = False
    size: int = 0
    final_reply: Reply | None = None


class RelayCore:
    """The relay decisions of one MTA session; see the module doc.

    ``egress`` returns the current configuration generation (read at each MAIL);
    ``clock`` gives the transactions' durations.
    """

    def __init__(
        self,
        hostname: str,
        listener_pool: str | None,
        egress: Callable[[], EgressView],
        clock: Callable[[], float] = time.monotonic,
        *,
        auth_required: bool = True,
    ) -> None:
        self.hostname = hostname
        self.listener_pool = listener_pool
        self.auth_required = auth_required
        self.egress = egress
        self.clock = clock
        self.auth_user: str | None = None
        self.tx: Transaction | None = None
        #: ``tx is not None``, kept beside it (set with it at MAIL, cleared with it at the
        #: end): the shell reads it three times a message, and a property is a call each.
        self.in_transaction = False
        self.remote: Remote | None = None
        #: The last remote opened in this session (the log line's fallback).
        self.last_remote: Remote | None = None
        self._step: Step[None] | None = None

    @property
    def waiting(self) -> bool:
        """A command's result is awaited: the next event must be that result."""
        return self._step is not None

    # ----------------------------------------------------------------------- driving

    def handle(self, event: Event) -> list[Command]:
        """Feed one event; return the commands to execute, in order.

        While a command's result is awaited, the event must be that result; only the
        session's end may interrupt (the shell was cancelled): what was awaited is dropped.
        """
        step = self._step
        commands: list[Command] = []
        if step is None:
            # By exact type, the most frequent first: an MTA's MAIL, RCPT or DATA goes
            # straight to its step (two calls fewer for each; MAIL is no step at all), the
            # end of the body too.
            if type(event) is MtaCommand:
                mta = event.command
                if type(mta) is Rcpt:
                    step = self._recipient(mta)
                elif type(mta) is Mail:
                    return self._mail(mta)
                elif type(mta) is Data:
                    step = self._data()
                else:
                    step = self._command(mta)
            elif type(event) is MtaEndOfData:
                step = self._end_of_data(event.chunks)
            else:
                step = self._start(event)
        else:
            self._step = None
            if type(event) is SessionEnded:
                step.close()
                step = self._start(event)
            else:  # the awaited result goes in; then the step runs on as below
                try:
                    command = step.send(event)
                except StopIteration:
                    return commands
                commands.append(command)
                if type(command) in _AWAITING:
                    self._step = step
                    return commands
        # Run the step until it awaits a result or ends, in here (one call less for each
        # of a message's eight events) and by iteration: a step that ends stops the loop
        # without the StopIteration that send() raises.
        for command in step:
            commands.append(command)
            if type(command) in _AWAITING:
                self._step = step
                return commands
        return commands

    def _start(self, event: Event) -> Step[None]:
        # By exact type (handle() takes MAIL, RCPT, DATA and the end of the body itself).
        if type(event) is MtaCommand:
            return self._command(event.command)
        if type(event) is MtaEndOfData:
            return self._end_of_data(event.chunks)
        if type(event) is MtaBody:
            return self._body(event.chunks)
        if type(event) is MtaAuthenticated:
            self.auth_user = event.user
            return _nothing()
        if type(event) is MtaBareLineEnding:
            return self._abort_body("bare CR or LF in the message body")
        if type(event) is MtaDataDiscarded:
            return self._discarded(event.reply)
        if type(event) is MtaClosed:
            return self._mta_gone(
                "the MTA disconnected in the middle of DATA", "mta disconnected mid-DATA"
            )
        if type(event) is MtaTimedOut:
            return self._mta_gone(
                f"the MTA sent no data for {event.seconds:g}s", "mta timeout mid-DATA"
            )
        if type(event) is MtaTooSlow:
            return self._mta_gone(
                f"the MTA sent the body below {event.rate} bytes/s", "mta too slow mid-DATA"
            )
        if type(event) is SessionEnded:
            return self._close(clean=event.clean)
        raise AssertionError(f"{event!r} arrived while no command awaited a result")

    def _command(self, command: Mail | Rcpt | Data | Rset | Quit | Ehlo | Helo) -> Step[None]:
        """The step for an MTA command (the step itself, not a generator around it: one
        frame less to resume at each of its results)."""
        if type(command) is Mail:
            return _each(self._mail(command))
        if type(command) is Rcpt:
            return self._recipient(command)
        if type(command) is Data:
            return self._data()
        if type(command) is Rset:
            return self._reset_then(replies.reset(), "reset")
        if type(command) is Quit:
            return self._reset_then(replies.closing(self.hostname), "quit")
        return self._reset("reset")  # EHLO and HELO end any transaction; the shell answers

    def _reset_then(self, reply: Reply, outcome: str) -> Step[None]:
        """RSET and QUIT: end the transaction, then give egressd's own ``reply``."""
        yield from self._reset(outcome)
        yield ReplyMta(reply)

    # ----------------------------------------------------------------------- MAIL

    def _mail(self, mail: Mail) -> list[Command]:
        """MAIL's commands, at once: it awaits no result, so it is a list, not a step (a
        step's creation and three resumptions a message fewer)."""
        egress = self.egress()
        users = egress.config.auth
        if users and self.auth_user is None and self.auth_required:
            return [ReplyMta(replies.auth_required())]
        pool, why = pool_for(
            mail.address,
            self.auth_user,
            egress.config.smtp.sender_pools,
            self.listener_pool,
            self._user_pools(egress) if users else None,
        )
        if pool is None:
            return [ReplyMta(replies.no_pool(mail.address))]
        self.tx = Transaction(mail=mail, pool=pool, egress=egress, started=self.clock())
        self.in_transaction = True
        named = self.auth_user is not None
        return [TransactionStarted(pool), ReplyMta(replies.sender_ok(pool, why, named))]

    def _user_pools(self, egress: EgressView) -> tuple[str, ...] | None:
        """The pools the authenticated user may use; None without ``[auth.users]``."""
        users = egress.config.auth
        if not users:
            return None
        user = users.get(self.auth_user) if self.auth_user is not None else None
        return user.pools_for(self.auth_user) if user and self.auth_user is not None else ()

    # ----------------------------------------------------------------------- RCPT

    def _recipient(self, rcpt: Rcpt) -> Step[None]:
        """The reply for one RCPT: the remote's, or egressd's refusal."""
        tx = self.tx
        assert tx is not None, "RCPT outside a transaction"
        domain = recipient_domain(rcpt.address)
        try:  # one step, not one around a second for the reply: three calls fewer a RCPT
            if tx.mail_refusal is not None:
                reply = tx.mail_refusal
            elif tx.broken is not None:
                reply = tx.broken
            elif not domain:
                reply = replies.no_recipient_domain(rcpt.address)
            elif tx.remote_open and self.remote is not None:
                reply = yield from self._later_recipient(tx, domain, rcpt)
            else:
                reply = yield from self._begin_remote(tx, domain, rcpt)
        except _Refusal as refusal:
            reply = refusal.reply
        tx.recipients.append((rcpt.address, reply.code))
        yield ReplyMta(reply)

    def _later_recipient(self, tx: Transaction, domain: str, rcpt: Rcpt) -> Step[Reply]:
        """A RCPT after the remote transaction began: it rides that transaction when its
        domain has the same next hop."""
        remote = self.remote
        assert remote is not None
        next_hop = yield from self._next_hop(tx, domain, remote.egress_version)
        if not remote.next_hop.same_destination(next_hop, remote.next_hop_address):
            return replies.another_next_hop(domain, remote.next_hop.domain, remote.remote_text)
        return (yield from self._remote_rcpt(tx, rcpt))

    def _begin_remote(self, tx: Transaction, domain: str, rcpt: Rcpt) -> Step[Reply]:
        """MAIL FROM then the first RCPT at the remote (in one write when it pipelines).

        A kept connection that turns out to be dead (the remote timed it out while the MTA
        was idle) is replaced by a fresh one, once: nothing was committed on it.

        Before MAIL goes out the connection's shaping budgets are asked for one message
        (``Remote.budget``): a kept connection they refuse (``max_deliveries_per_connection``
        carried, ``max_message_rate`` or ``source_selection_rate`` used up, a suspension,
        a warming source's quota full: :mod:`egressd.egress.quotas`)
        gets QUIT and a fresh one is opened, from a source that has budget (when none has,
        the connection is kept and the message gets selection's refusal); a fresh one
        they refuse is a ``451 4.7.0`` naming the budget for this and every later RCPT of
        the transaction, and nothing reaches the remote.
        """
        for _ in range(2):
            remote, fresh = yield from self._remote_for(tx, domain)
            refusal = mail_incompatibility(tx.mail, remote.extensions)
            if refusal is not None:
                tx.mail_refusal = refusal
                return refusal
            budget = remote.budget.send() if remote.budget is not None else None
            if budget is not None:
                if not fresh:  # another source may still have budget: selection knows
                    refusal = None
                    if budget.budget not in PER_CONNECTION:
                        refusal = yield from self._selection_refusal(tx, domain, remote)
                    if refusal is not None:  # none has: keep this one for the next message
                        tx.mail_refusal = refusal
                        return refusal
                    yield from self._drop_remote(polite=True)
                    continue
                tx.mail_refusal = replies.message_budget(budget.reason)
                return tx.mail_refusal
            together = "PIPELINING" in remote.extensions and (
                rcpt.address.isascii() or remote.supports("SMTPUTF8")
            )
            try:
                if together:
                    send = SendRemote((tx.mail, rcpt), "MAIL FROM and RCPT TO")
                    mail_reply, rcpt_reply = self._replies(send, (yield send))
                else:
                    send = SendRemote((tx.mail,), "MAIL FROM")
                    [mail_reply] = self._replies(send, (yield send))
            except _RemoteFailed as exc:
                yield from self._drop_remote()
                if fresh:
                    raise _Refusal(exc.reply) from exc
                continue
            if mail_reply.code == 421:
                yield from self._drop_remote()
                if not fresh:
                    continue
            if mail_reply.code >= 300:
                tx.mail_refusal = mail_reply
                return mail_reply
            tx.remote_open = True
            if not together:
                return (yield from self._remote_rcpt(tx, rcpt))
            if rcpt_reply.code == 421:
                yield from self._break(tx, rcpt_reply)
            return rcpt_reply
        raise AssertionError("unreachable: a fresh connection ends the loop")

    def _remote_rcpt(self, tx: Transaction, rcpt: Rcpt) -> Step[Reply]:
        remote = self.remote
        assert remote is not None
        if not rcpt.address.isascii() and not remote.supports("SMTPUTF8"):
            return replies.no_smtputf8()
        try:
            return (yield from self._ask(tx, SendRemote((rcpt,), "RCPT TO")))
        except _RemoteFailed as exc:
            return exc.reply

    def _ask(self, tx: Transaction, send: SendRemote) -> Step[Reply]:
        """One command inside the remote transaction. A failure (raised) or a 421 breaks
        the transaction: the connection is dropped, and every later command of the
        transaction gets the same reply."""
        try:
            [reply] = self._replies(send, (yield send))
        except _RemoteFailed as exc:
            yield from self._break(tx, exc.reply)
            raise
        if reply.code == 421:
            yield from self._break(tx, reply)
        return reply

    def _break(self, tx: Transaction, reply: Reply) -> Step[None]:
        tx.broken = reply
        yield from self._drop_remote()

    # ----------------------------------------------------------------------- choosing

    def _remote_for(self, tx: Transaction, domain: str) -> Step[tuple[Remote, bool]]:
        """The connection for a new remote transaction: the kept one if it fits, else a new
        one; and whether it is new."""
        kept = self.remote
        if kept is not None:
            if self._source_fits(tx, kept.source):
                next_hop = yield from self._next_hop(tx, domain, kept.egress_version)
                if kept.next_hop.same_destination(next_hop, kept.next_hop_address):
                    return kept, False
            yield from self._drop_remote(polite=True)
        requiretls = "REQUIRETLS" in tx.mail.params
        result = yield OpenRemote(tx.pool, domain, tx.egress, tx.next_hops, requiretls)
        if isinstance(result, OpenFailed):
            named = self.auth_user is not None
            raise _Refusal(result.reply if named else replies.pool_unnamed(result.reply, tx.pool))
        assert isinstance(result, RemoteOpened), result
        self.remote = self.last_remote = result.remote
        return result.remote, True

    def _selection_refusal(self, tx: Transaction, domain: str, kept: Remote) -> Step[Reply | None]:
        """The reply an open would fail with now for want of a source, or None when a new
        connection could take the message (as :meth:`_remote_for` words an open's failure)."""
        ask = AskSelection(tx.pool, domain, kept.source.name, tx.egress, tx.next_hops)
        result = yield ask
        assert isinstance(result, SelectionAnswered), result
        if result.refusal is None or self.auth_user is not None:
            return result.refusal
        return replies.pool_unnamed(result.refusal, tx.pool)

    @staticmethod
    def _source_fits(tx: Transaction, source: Source) -> bool:
        """The kept connection's source may serve this transaction's pool right now."""
        config = tx.egress.config
        pools, sources, name = config.pools, config.sources, source.name
        # ``in`` and a subscript, not get(): no call (every message asks).
        if tx.pool not in pools or name not in sources:
            return False
        current = sources[name]
        if current is not source and current != source:  # the same generation: no __eq__
            return False
        for entry in pools[tx.pool].entries:
            if entry.source == name and entry.weight > 0:
                return not tx.egress.health.is_suspended(name)
        return False

    def _next_hop(self, tx: Transaction, domain: str, version: int | None) -> Step[NextHopView]:
        key = (domain, version)
        next_hops = tx.next_hops
        if key in next_hops:  # ``in`` and a subscript, not get(): no call
            found = next_hops[key]
        else:
            result = yield ResolveNextHop(domain, version, tx.egress.config)
            assert type(result) is NextHopResolved, result
            found = next_hops[key] = result.result
        if isinstance(found, Reply):
            raise _Refusal(found)
        return found

    # ----------------------------------------------------------------------- the remote

    def _replies(self, send: SendRemote, result: Event | None) -> tuple[Reply, ...]:
        """The remote's reply to each of ``send``'s commands, in order, from ``result``:
        what the shell fed back for ``send`` (a step writes ``self._replies(send, (yield
        send))``: a function, not a step around the yield, is one call an exchange instead
        of three).

        A 421 ends the connection: it stands for the replies that will never come. A
        failure raises :class:`_RemoteFailed` with the 4xx for the MTA.
        """
        if type(result) is not RemoteReplied:
            if isinstance(result, (RemoteTimedOut, RemoteLost)):
                remote = self.remote
                assert remote is not None
                detail = replies.remote_failure_detail(send.what, result)
                raise _RemoteFailed(replies.remote_failure(remote.describe, detail))
            raise AssertionError(f"{result!r} is no result of {send!r}")
        got = result.replies
        owed = send.replies_owed
        if len(got) != owed:
            assert got and got[-1].code == 421 and len(got) < owed, (got, send)
            got += (got[-1],) * (owed - len(got))
        return got

    def _drop_remote(self, *, polite: bool = False) -> Step[None]:
        remote, self.remote = self.remote, None
        if remote is not None:
            yield CloseRemote(polite=polite)

    # ----------------------------------------------------------------------- DATA

    def _data(self) -> Step[None]:
        """The remote's reply to DATA is the MTA's (354 lets the body flow). One step, not
        a step around a second one for the reply: two calls fewer a message."""
        tx = self.tx
        assert tx is not None
        if tx.broken is not None:
            reply = tx.broken
        elif self.remote is None or not tx.remote_open:
            reply = replies.no_remote_transaction()
        else:
            try:
                reply = yield from self._ask(tx, _SEND_DATA)
            except _RemoteFailed as exc:
                reply = exc.reply  # egressd's own reply: no final reply from the remote
            else:
                if reply.code != 354:
                    tx.final_reply = reply
        tx.in_body = reply.code == 354
        yield ReplyMta(reply)

    def _body(self, chunks: tuple[DataChunk, ...]) -> Step[None]:
        """Forward pieces of the body; a remote failure is kept for the final reply."""
        tx = self.tx
        assert tx is not None
        tx.size += _size(chunks)
        if tx.body_failure is not None or self.remote is None:
            return
        if self._oversize(tx):
            yield from self._refuse_oversize(tx)
            return
        send = SendRemote(chunks, "the message body")
        try:
            self._replies(send, (yield send))
        except _RemoteFailed as exc:
            tx.body_failure = exc.reply
            yield from self._drop_remote()

    @staticmethod
    def _oversize(tx: Transaction) -> bool:
        """The body is past the SIZE egressd advertises, and the remote not yet cut off
        for it (or for another failure)."""
        limit = tx.egress.config.smtp.max_message_size
        return bool(limit) and tx.size > limit and tx.body_failure is None

    def _refuse_oversize(self, tx: Transaction) -> Step[None]:
        """Past the SIZE egressd advertises (:meth:`_oversize`): cut the remote off before
        the final dot."""
        tx.body_failure = replies.oversize(tx.egress.config.smtp.max_message_size)
        tx.remote_open = False
        yield from self._drop_remote()

    def _abort_body(self, why: str) -> Step[None]:
        """The body will not end cleanly: close the remote without the final dot."""
        tx = self.tx
        if tx is not None:
            tx.body_failure = tx.body_failure or replies.body_aborted(why)
            tx.remote_open = False
        yield from self._drop_remote()

    def _end_of_data(self, chunks: tuple[DataChunk, ...]) -> Step[None]:
        """Send the last pieces and the final dot; the remote's reply is the MTA's reply."""
        tx = self.tx
        assert tx is not None
        tx.size += _size(chunks)
        if self._oversize(tx):
            yield from self._refuse_oversize(tx)
        if tx.body_failure is not None or self.remote is None:
            reply = tx.body_failure or replies.remote_gone()
        else:
            send = SendRemote((*chunks, _END_OF_DATA), "end of data")
            try:
                [reply] = self._replies(send, (yield send))
                tx.remote_open = False
            except _RemoteFailed as exc:
                reply = exc.reply
                yield from self._drop_remote()
            if reply.code == 421:
                yield from self._drop_remote()
        tx.final_reply = reply
        yield self._ended(tx, "delivered" if reply.code < 300 else "refused")
        yield ReplyMta(reply)

    def _discarded(self, reply: Reply) -> Step[None]:
        if self.tx is not None:
            self.tx.final_reply = reply
        yield ReplyMta(reply)
        yield from self._finish("refused: bare CR or LF")

    def _mta_gone(self, why: str, outcome: str) -> Step[None]:
        """The MTA went away or silent; mid-DATA the remote gets no final dot."""
        tx = self.tx
        if tx is None or not tx.in_body:
            return
        yield from self._abort_body(why)
        yield from self._finish(outcome)

    # ----------------------------------------------------------------------- endings

    def _reset(self, outcome: str) -> Step[None]:
        """End the transaction (RSET, EHLO, QUIT): RSET the remote if needed."""
        tx = self.tx
        if tx is None:
            return
        remote = self.remote
        if remote is not None and (tx.remote_open or tx.final_reply is not None):
            try:
                [reply] = self._replies(_SEND_RSET, (yield _SEND_RSET))
            except _RemoteFailed:
                yield from self._drop_remote()
            else:
                if reply.code >= 300:
                    yield from self._drop_remote(polite=reply.code != 421)
        tx.remote_open = False
        yield from self._finish(outcome)

    def _finish(self, outcome: str) -> Step[None]:
        """The transaction's log line; then it is forgotten."""
        tx = self.tx
        if tx is not None:
            yield self._ended(tx, outcome)

    def _ended(self, tx: Transaction, outcome: str) -> TransactionEnded:
        """The current transaction ``tx`` is over: forgotten, and its log line made."""
        self.tx = None
        self.in_transaction = False
        fields = self._log_fields(tx, outcome)
        return TransactionEnded(tx.pool, outcome, tx.final_reply, tx.size, fields)

    def _log_fields(self, tx: Transaction, outcome: str) -> dict[str, object]:
        """The fields of the transaction's log line, in this order, those without a value
        left out. The connection's own (mx, tls...) only while it is open; the source and
        the address also from the last one. Built field by field, not as a dict of
        fourteen filtered by a second one: two calls fewer and no None to drop."""
        fields: dict[str, object] = {"pool": tx.pool}
        current = self.remote
        remote = current or self.last_remote
        if remote is not None:
            fields["source"] = remote.source.name
            fields["local_address"] = remote.local_address
        if current is not None:
            fields["mx"] = current.mx_name
        if remote is not None:
            fields["mx_address"] = remote.remote_text
        if current is not None:
            if current.tls_version is not None:
                fields["tls"] = current.tls_version
            fields["tls_policy"] = current.tls_policy
            if current.tls_result:
                fields["tls_result"] = current.tls_result
        fields["sender"] = tx.mail.address or "<>"
        recipients = tx.recipients
        if len(recipients) == 1:
            address, code = recipients[0]
            fields["recipients"] = f"{address}={code}"
        elif recipients:
            fields["recipients"] = ",".join([f"{a}={c}" for a, c in recipients])
        final = tx.final_reply
        if final is not None:
            fields["reply"] = f"{final.code} {final.lines[0]}".strip()
        fields["size"] = tx.size
        fields["duration"] = round(self.clock() - tx.started, 3)
        fields["outcome"] = outcome
        return fields

    def _close(self, *, clean: bool) -> Step[None]:
        """The MTA session is over: end any transaction, QUIT (or cut) the remote."""
        if self.tx is not None:
            if self.tx.remote_open:
                yield from self._drop_remote()  # mid-transaction: never let it complete
            yield from self._finish("abandoned")
        yield from self._drop_remote(polite=clean)


def _size(chunks: tuple[DataChunk, ...]) -> int:
    size = 0
    for chunk in chunks:
        size += len(chunk.data)
    return size


def _each(commands: list[Command]) -> Step[None]:
    """A step that gives ``commands`` and awaits nothing."""
    yield from commands


def _nothing() -> Step[None]:
    return
    yield  # a generator that yields nothing
