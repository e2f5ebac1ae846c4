"""The trio shell of the relay core: it executes :class:`~egressd.relay.core.RelayCore`'s
commands and feeds their results back as events.

Theory of operation
-------------------
Every relay decision (which pool, reuse or open, 452 for another next hop, 421, oversize,
abort without the dot) is the core's; this module only does what the core asks, one
command at a time, in order:

==========================  ===============================================================
:class:`ReplyMta`           queue the reply for the MTA (the door writes it before reading)
:class:`OpenRemote`         :meth:`Relay.open`: the pool's next source, the next hop for its
                            IP version, the remote greeted and ready (:mod:`.smtp_remote`)
:class:`AskSelection`       :func:`~.smtp_remote.selection_refusal`: could a source be picked
:class:`ResolveNextHop`     :func:`egressd.net.mx.resolve_next_hop`
:class:`SendRemote`         write through the client machine and read the replies, under
                            the ``[smtp.timeouts]`` deadline that fits (``trio.fail_after``)
:class:`CloseRemote`        QUIT (waiting briefly for the 221) or cut the connection
:class:`TransactionEnded`   the transaction's log line and metrics
==========================  ===============================================================

A timeout or a broken connection is not an exception here: it becomes the event
(:class:`RemoteTimedOut`, :class:`RemoteLost`) the core turns into the MTA's reply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from logging import INFO

from egressd.config import SmtpTimeouts
from egressd.doors.smtp_remote import (
    RemoteError,
    RemoteSession,
    converse,
    next_hop,
    open_remote,
    selection_refusal,
)
from egressd.egress import ConnectionQuota, Egress
from egressd.log import get_logger, log_fields
from egressd.net.mx import NextHop
from egressd.proto.smtp_client import ClientCommand
from egressd.proto.smtp_common import Data, DataChunk, EndOfData, Mail, Reply
from egressd.relay.core import RelayCore
from egressd.relay.events import (
    AskSelection,
    CloseRemote,
    Command,
    Event,
    MtaCommand,
    NextHopResolved,
    OpenFailed,
    OpenRemote,
    RemoteOpened,
    RemoteReplied,
    ReplyMta,
    ResolveNextHop,
    SelectionAnswered,
    SendRemote,
    SessionEnded,
    TransactionEnded,
    TransactionStarted,
)
from egressd.runtime import Runtime, SessionRecord

__all__ = ["Relay"]

log = get_logger("smtp")


class Relay:
    """The remote side of one MTA session: :class:`RelayCore` and the commands' executor.

    ``reply`` queues a reply for the MTA.
    """

    def __init__(
        self,
        runtime: Runtime,
        record: SessionRecord,
        hostname: str,
        listener_pool: str | None,
        reply: Callable[[Reply], None],
        *,
        auth_required: bool = True,
    ) -> None:
        self.runtime = runtime
        self.record = record
        self.hostname = hostname
        self.reply = reply
        self.core = RelayCore(
            hostname, listener_pool, lambda: runtime.egress, auth_required=auth_required
        )
        self.remote: RemoteSession | None = None
        self.provider = "other"
        """The shaping provider of the last remote opened (its transactions count there)."""
        self.quota: ConnectionQuota | None = None
        """The warm-up quota of the last remote opened: each transaction's end settles
        the message it held (:mod:`egressd.egress.quotas`)."""

    @property
    def in_transaction(self) -> bool:
        return self.core.in_transaction

    async def feed(self, event: Event) -> None:
        """Hand ``event`` to the core and execute what it says, results fed back, until it
        has nothing left to do.

        Replies, a transaction's start and end (its log line) are done inline, remote
        exchanges go straight to :meth:`send`, the rest through :meth:`execute` (the same
        effect: two coroutines a message fewer); a command with a result is the last of
        its batch (the core's rule), but any left after one would still run first."""
        if (
            self.remote is not None
            and isinstance(event, MtaCommand)
            and isinstance(event.command, Mail)
        ):
            await self.prepare_send(event)
        core = self.core
        commands = core.handle(event)
        while commands:
            for index, command in enumerate(commands):
                if type(command) is ReplyMta:
                    self.reply(command.reply)
                    continue
                if type(command) is SendRemote:
                    result: Event | None = await self.send(command)
                elif type(command) is TransactionEnded:
                    self.account(command)
                    continue
                elif type(command) is TransactionStarted:
                    self.record.pool = command.pool
                    continue
                else:
                    result = await self.execute(command)
                if result is not None:
                    commands = commands[index + 1 :] + core.handle(result)
                    break
            else:
                return

    async def execute(self, command: Command) -> Event | None:
        """Execute one command; its result, if it has one (the next hop first: every
        message asks for it; :meth:`feed` does the other per-message ones itself)."""
        if type(command) is ResolveNextHop:
            assert command.config is not None
            found = await next_hop(command.domain, command.version, command.config)
            if self.remote is not None and isinstance(found, NextHop):
                await self.remote.judge_tls(command.domain, found, command.config)
            return NextHopResolved(found)
        if isinstance(command, SendRemote):
            return await self.send(command)
        if isinstance(command, ReplyMta):
            self.reply(command.reply)
        elif isinstance(command, OpenRemote):
            return await self.open(command)
        elif isinstance(command, AskSelection):
            egress = command.egress
            assert isinstance(egress, Egress)
            args = (command.pool, command.domain, command.next_hops, self.hostname)
            return SelectionAnswered(
                await selection_refusal(egress, self.runtime, *args, leaving=command.leaving)
            )
        elif isinstance(command, CloseRemote):
            await self.close_remote(polite=command.polite)
        elif isinstance(command, TransactionStarted):
            self.record.pool = command.pool
        elif isinstance(command, TransactionEnded):
            self.account(command)
        return None

    async def prepare_send(self, event: Event) -> None:
        """A MAIL on a kept remote: its shared message budgets and warm-up quota are asked
        for ahead (the core asks them synchronously before MAIL goes out)."""
        remote = self.remote
        if remote is None or not (
            isinstance(event, MtaCommand) and isinstance(event.command, Mail)
        ):
            return
        if remote.quota is not None:  # the warm-up quota's ticket, when it is shared
            await remote.quota.prepare()
        if remote.shaping is not None:
            await remote.shaping.prepare_send()

    # ----------------------------------------------------------------------- the remote

    async def send(self, command: SendRemote) -> Event:
        remote = self.remote
        assert remote is not None
        commands = command.commands
        client = remote.client
        if len(commands) == 1:
            data = client.send(commands[0])
        else:
            data = b"".join([client.send(c) for c in commands])
        seconds = _deadline(remote.timeouts, commands)
        event = await converse(remote, data, command.replies_owed, seconds)
        if remote.shaping is not None and isinstance(event, RemoteReplied):
            remote.hear(event.replies)  # the shaping reply rules
        return event

    async def close_remote(self, *, polite: bool) -> None:
        remote, self.remote = self.remote, None
        if remote is None:
            return
        if polite:
            await remote.quit()
        else:
            await remote.abort()

    async def open(self, command: OpenRemote) -> Event:
        """A remote session for the command's domain through its pool (the egress plan and
        its executor, with the SMTP greeting as the per-address step)."""
        egress = command.egress
        assert isinstance(egress, Egress)
        try:
            remote = await open_remote(
                egress,
                self.runtime,
                command.pool,
                command.domain,
                command.next_hops,
                self.hostname,
                requiretls=command.requiretls,
            )
        except RemoteError as exc:
            return OpenFailed(exc.reply)
        self.remote = remote
        if remote.shaping is not None:  # shared budgets: the first message's cells
            await remote.shaping.prepare_send()
        self.record.source = remote.source.name
        self.provider = remote.provider
        self.quota = remote.quota
        self.record.local_address = remote.local_address
        self.record.destination = remote.remote_text
        return RemoteOpened(remote.view())

    # ----------------------------------------------------------------------- endings

    def account(self, ended: TransactionEnded) -> None:
        """The transaction's log line and metric."""
        self.record.outcome = ended.outcome
        if self.quota is not None:
            self.quota.settle(ended.final.code if ended.final is not None else None)
        if ended.final is not None:
            source = str(ended.fields.get("source") or "")
            self.runtime.smtp_transaction(ended.pool, ended.final.code, source, self.provider)
        log_fields(log, INFO, "transaction", {"client": self.record.client, **ended.fields})

    async def close(self, *, clean: bool) -> None:
        """The MTA session is over: end any transaction, QUIT (or cut) the remote."""
        await self.feed(SessionEnded(clean=clean))


def _deadline(timeouts: SmtpTimeouts, commands: Sequence[ClientCommand]) -> float:
    """The ``[smtp.timeouts]`` entry for what ``commands`` send: the final dot's when it is
    among them, else DATA's, else a body piece's when there are only those, else a
    command's (one pass, no set of types)."""
    data = False
    chunks_only = bool(commands)
    for command in commands:
        kind = type(command)
        if kind is EndOfData:
            return timeouts.final_dot
        if kind is Data:
            data = True
        elif kind is not DataChunk:
            chunks_only = False
    if data:
        return timeouts.data_init
    return timeouts.data_block if chunks_only else timeouts.command
