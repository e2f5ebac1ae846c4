"""The relay's transaction logic: pool, source, next hop, and passing the remote's replies.

Theory of operation
-------------------
One :class:`Relay` serves one MTA session. It never queues and never says 250 for the
remote: every answer about a recipient or the message is the remote server's own reply,
or a 4xx from egressd naming what failed.

* MAIL: the transaction's pool is chosen (:func:`pool_for`: the AUTH username, then
  ``[smtp.sender_pools]`` by exact sender, then by ``@domain``, then the listener's pool).
  egressd answers MAIL itself (250 when there is a pool, ``451 4.3.5`` when there is none):
  where the message goes is not known before the first recipient.
* First RCPT: the source is picked from the pool, the recipient domain's next hop resolved
  for the source's IP version (:mod:`egressd.net.mx`), the remote session opened
  (:mod:`egressd.doors.smtp_remote`), then ``MAIL FROM`` with the parameters the remote
  supports, then the RCPT. If the remote refuses MAIL, this and every later RCPT of the
  transaction get that refusal. A source-side dial failure (unplumbed address, hop down)
  is retried once on the pool's next source.
* Later RCPTs ride the same transaction when their domain has the same next hop
  (:meth:`NextHop.same_destination <egressd.net.mx.NextHop.same_destination>`); others get
  ``452 4.5.3`` so the MTA sends them in another transaction.
* DATA: the remote's reply to DATA is the MTA's reply; after the remote's 354 the body
  streams chunk by chunk. The remote's reply to the final dot is the MTA's reply. A body
  that does not end cleanly (the MTA drops or stalls, or sends a bare CR/LF) makes the
  relay close the remote connection without the final dot, so the remote delivers nothing.
* Between transactions the remote connection is kept (after RSET when needed) and reused
  when the next transaction's pool contains its source and its destination is the same;
  otherwise it gets QUIT.

Each transaction ends in one log line (client, pool, source, local address, MX and
address, TLS version, each recipient's outcome, the final reply, size, duration).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from egressd.access import destination_refusal
from egressd.config import Config, IPAddress, Source
from egressd.doors.smtp_remote import RemoteError, RemoteSession, open_remote, temporary
from egressd.egress import Egress, EgressFailure, Failure
from egressd.log import get_logger
from egressd.net.egress import through_pool
from egressd.net.mx import NextHop, NextHopError, resolve_next_hop
from egressd.proto.smtp_client import mail_incompatibility
from egressd.proto.smtp_common import Data, DataChunk, Mail, Rcpt, Reply, Rset
from egressd.runtime import Runtime, SessionRecord

__all__ = ["Relay", "Transaction", "pool_for"]

log = get_logger("smtp")

_NO_SOURCE = frozenset({Failure.UNKNOWN_POOL, Failure.NO_SOURCES, Failure.SOURCE_LIMIT})


def pool_for(
    sender: str,
    auth_user: str | None,
    sender_pools: Mapping[str, str],
    listener_pool: str | None,
) -> tuple[str | None, str]:
    """The transaction's pool and why: ``auth``, ``sender``, ``sender domain``, ``listener``.

    ``sender_pools`` keys are lower-cased sender addresses or ``@domain``.
    """
    if auth_user:
        return auth_user, "auth"
    pools = sender_pools
    address = sender.lower()
    if address and address in pools:
        return pools[address], "sender"
    domain = address.rpartition("@")[2]
    if domain and f"@{domain}" in pools:
        return pools[f"@{domain}"], "sender domain"
    if listener_pool:
        return listener_pool, "listener"
    return None, "none"


class _Refusal(Exception):
    """A recipient cannot be taken; ``reply`` says why (any code)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass
class Transaction:
    """One MAIL ... final dot, as the relay sees it."""

    mail: Mail
    pool: str
    egress: Egress
    started: float = field(default_factory=time.monotonic)
    recipients: list[tuple[str, int]] = field(default_factory=list)
    hops: dict[tuple[str, int | None], NextHop | NextHopError] = field(default_factory=dict)
    mail_refusal: Reply | None = None
    broken: Reply | None = None
    body_failure: Reply | None = None
    remote_open: bool = False
    size: int = 0
    final_reply: Reply | None = None

    @property
    def config(self) -> Config:
        return self.egress.config


class Relay:
    """The remote side of one MTA session; see the module doc."""

    def __init__(self, runtime: Runtime, record: SessionRecord, hostname: str) -> None:
        self.runtime = runtime
        self.record = record
        self.hostname = hostname
        self.remote: RemoteSession | None = None
        self.tx: Transaction | None = None

    # ----------------------------------------------------------------------- MAIL

    def begin(self, mail: Mail, pool: str) -> None:
        self.tx = Transaction(mail=mail, pool=pool, egress=self.runtime.egress)
        self.record.pool = pool

    # ----------------------------------------------------------------------- RCPT

    async def recipient(self, rcpt: Rcpt) -> Reply:
        """The reply for one RCPT: the remote's, or egressd's refusal."""
        tx = self.tx
        assert tx is not None, "RCPT outside a transaction"
        try:
            reply = await self._recipient(tx, rcpt)
        except _Refusal as refusal:
            reply = refusal.reply
        tx.recipients.append((rcpt.address, reply.code))
        return reply

    async def _recipient(self, tx: Transaction, rcpt: Rcpt) -> Reply:
        if tx.mail_refusal is not None:
            return tx.mail_refusal
        if tx.broken is not None:
            return tx.broken
        domain = recipient_domain(rcpt.address)
        if tx.remote_open and self.remote is not None:
            remote = self.remote
            hop = await self._next_hop(tx, domain, remote.source.egress_version)
            if not remote.hop.same_destination(hop, remote.hop_address):
                return Reply.make(
                    452,
                    f"{domain} has another next hop than {remote.hop.domain}"
                    f" ({remote.remote_text}); send it in another transaction",
                    enhanced="4.5.3",
                )
            return await self._remote_rcpt(tx, rcpt)
        return await self._begin_remote(tx, domain, rcpt)

    async def _begin_remote(self, tx: Transaction, domain: str, rcpt: Rcpt) -> Reply:
        """MAIL FROM then the first RCPT at the remote (in one write when it pipelines).

        A kept connection that turns out to be dead (the remote timed it out while the MTA
        was idle) is replaced by a fresh one, once: nothing was committed on it.
        """
        timeout = tx.config.smtp.timeouts.command
        for _ in range(2):
            remote, fresh = await self._remote_for(tx, domain)
            refusal = mail_incompatibility(tx.mail, remote.client.extensions)
            if refusal is not None:
                tx.mail_refusal = refusal
                return refusal
            together = remote.client.pipelining and (
                rcpt.address.isascii() or remote.client.supports("SMTPUTF8")
            )
            try:
                if together:
                    mail_reply, rcpt_reply = await remote.pipeline(
                        [tx.mail, rcpt], timeout, "MAIL FROM and RCPT TO"
                    )
                else:
                    mail_reply = await remote.command(tx.mail, timeout, "MAIL FROM")
            except RemoteError as exc:
                await self.drop_remote()
                if fresh:
                    raise _Refusal(exc.reply) from exc
                continue
            if mail_reply.code == 421:
                await self.drop_remote()
                if not fresh:
                    continue
            if not mail_reply.is_success:
                tx.mail_refusal = mail_reply
                return mail_reply
            tx.remote_open = True
            if not together:
                return await self._remote_rcpt(tx, rcpt)
            if rcpt_reply.code == 421:
                tx.broken = rcpt_reply
                await self.drop_remote()
            return rcpt_reply
        raise AssertionError("unreachable: a fresh connection ends the loop")

    async def _remote_rcpt(self, tx: Transaction, rcpt: Rcpt) -> Reply:
        remote = self.remote
        assert remote is not None
        if not rcpt.address.isascii() and not remote.client.supports("SMTPUTF8"):
            return Reply.make(553, "Remote server does not support SMTPUTF8", enhanced="5.6.7")
        try:
            reply = await remote.command(rcpt, tx.config.smtp.timeouts.command, "RCPT TO")
        except RemoteError as exc:
            tx.broken = exc.reply
            await self.drop_remote()
            return exc.reply
        if reply.code == 421:
            tx.broken = reply
            await self.drop_remote()
        return reply

    # ----------------------------------------------------------------------- choosing

    async def _remote_for(self, tx: Transaction, domain: str) -> tuple[RemoteSession, bool]:
        """The connection for a new remote transaction: the kept one if it fits, else a new
        one; and whether it is new."""
        kept = self.remote
        if kept is not None:
            if kept.alive and self._source_fits(tx, kept.source):
                hop = await self._next_hop(tx, domain, kept.source.egress_version)
                if kept.hop.same_destination(hop, kept.hop_address):
                    return kept, False
            await self.drop_remote(polite=True)
        remote = await self._open(tx, domain)
        self.remote = remote
        self.record.source = remote.source.name
        self.record.local_address = remote.local_address
        self.record.destination = remote.remote_text
        return remote, True

    @staticmethod
    def _source_fits(tx: Transaction, source: Source) -> bool:
        """The kept connection's source may serve this transaction's pool right now."""
        pool = tx.config.pools.get(tx.pool)
        if pool is None or tx.config.sources.get(source.name) != source:
            return False
        in_pool = any(e.source == source.name and e.weight > 0 for e in pool.entries)
        return in_pool and not tx.egress.health.is_suspended(source.name)

    async def _open(self, tx: Transaction, domain: str) -> RemoteSession:
        """A remote session through the pool's next source (retried once on a source fault)."""

        async def attempt(source: Source) -> RemoteSession:
            hop = await self._next_hop(tx, domain, source.egress_version)
            denied = denied_addresses(hop, tx.config)
            if all(a in denied for h in hop.hosts for a in h.addresses):
                raise _Refusal(
                    temporary(
                        "4.4.4",
                        f"every address of the next hop of {domain} is in access.deny_destinations",
                    )
                )
            try:
                return await open_remote(
                    tx.egress,
                    self.runtime,
                    source,
                    hop,
                    source.ehlo_domain or self.hostname,
                    denied,
                )
            except RemoteError as exc:
                raise _Refusal(exc.reply) from exc

        try:
            return await through_pool(tx.egress, tx.pool, attempt)
        except EgressFailure as exc:
            if exc.kind in _NO_SOURCE:
                enhanced = "4.3.5" if exc.kind is Failure.UNKNOWN_POOL else "4.4.5"
                raise _Refusal(temporary(enhanced, f"pool {tx.pool}: {exc}")) from exc
            # the source's own fault, on every source tried
            raise _Refusal(temporary("4.3.0", str(exc))) from exc

    async def _next_hop(self, tx: Transaction, domain: str, version: int | None) -> NextHop:
        key = (domain, version)
        found = tx.hops.get(key)
        if found is None:
            try:
                found = await resolve_next_hop(domain, tx.config, version)
            except NextHopError as exc:
                found = exc
            tx.hops[key] = found
        if isinstance(found, NextHopError):
            raise _Refusal(Reply.make(found.code, found.text, enhanced=found.enhanced))
        return found

    # ----------------------------------------------------------------------- DATA

    async def data(self) -> Reply:
        """The remote's reply to DATA (354 lets the body flow)."""
        tx = self.tx
        assert tx is not None
        if tx.broken is not None:
            return tx.broken
        remote = self.remote
        if remote is None or not tx.remote_open:
            return temporary("4.3.0", "no open transaction with the remote server")
        try:
            reply = await remote.command(Data(), tx.config.smtp.timeouts.data_init, "DATA")
        except RemoteError as exc:
            tx.broken = exc.reply
            await self.drop_remote()
            return exc.reply
        if reply.code == 421:
            tx.broken = reply
            await self.drop_remote()
        if reply.code != 354:
            tx.final_reply = reply
        return reply

    async def body(self, chunks: list[DataChunk]) -> None:
        """Forward pieces of the body; a remote failure is kept for the final reply."""
        tx = self.tx
        assert tx is not None
        tx.size += sum(len(chunk.data) for chunk in chunks)
        if tx.body_failure is not None or self.remote is None:
            return
        if await self._refuse_oversize(tx):
            return
        try:
            await self.remote.send_body(chunks)
        except RemoteError as exc:
            tx.body_failure = exc.reply
            await self.drop_remote()

    async def _refuse_oversize(self, tx: Transaction) -> bool:
        """Past the SIZE egressd advertises: cut the remote off before the final dot."""
        limit = tx.config.smtp.max_message_size
        if not limit or tx.size <= limit or tx.body_failure is not None:
            return False
        tx.body_failure = Reply.make(
            552, f"Message exceeds the maximum size of {limit} bytes", enhanced="5.3.4"
        )
        tx.remote_open = False
        await self.drop_remote()
        return True

    async def abort_body(self, why: str) -> None:
        """The body will not end cleanly: close the remote without the final dot."""
        tx = self.tx
        if tx is not None:
            tx.body_failure = tx.body_failure or temporary("4.3.0", why)
            tx.remote_open = False
        await self.drop_remote()

    async def end_of_data(self, chunks: list[DataChunk]) -> Reply:
        """Send the last pieces and the final dot; the remote's reply is the MTA's reply."""
        tx = self.tx
        assert tx is not None
        tx.size += sum(len(chunk.data) for chunk in chunks)
        await self._refuse_oversize(tx)
        remote = self.remote
        if tx.body_failure is not None or remote is None:
            reply = tx.body_failure or temporary("4.3.0", "the remote connection is gone")
        else:
            try:
                reply = await remote.end_body(chunks)
                tx.remote_open = False
            except RemoteError as exc:
                reply = exc.reply
                await self.drop_remote()
            if reply.code == 421:
                await self.drop_remote()
        tx.final_reply = reply
        self.finish("delivered" if reply.is_success else "refused")
        return reply

    # ----------------------------------------------------------------------- endings

    async def reset(self, outcome: str) -> None:
        """End the transaction (RSET, EHLO, QUIT, refused body): RSET the remote if needed."""
        tx = self.tx
        if tx is None:
            return
        remote = self.remote
        if remote is not None and (tx.remote_open or tx.final_reply is not None):
            if remote.alive:
                try:
                    reply = await remote.command(Rset(), tx.config.smtp.timeouts.command, "RSET")
                except RemoteError:
                    await self.drop_remote()
                else:
                    if not reply.is_success:
                        await self.drop_remote(polite=reply.code != 421)
            else:
                await self.drop_remote()
        tx.remote_open = False
        self.finish(outcome)

    def finish(self, outcome: str) -> None:
        """Log the transaction's line and forget it."""
        tx = self.tx
        if tx is None:
            return
        self.tx = None
        remote = self.remote
        final = tx.final_reply
        fields: dict[str, object] = {
            "client": self.record.client,
            "pool": tx.pool,
            "source": remote.source.name if remote else self.record.source,
            "local_address": remote.local_address if remote else self.record.local_address,
            "mx": remote.mx_name if remote else None,
            "mx_address": remote.remote_text if remote else self.record.destination,
            "tls": remote.tls_version if remote else None,
            "sender": tx.mail.address or "<>",
            "recipients": ",".join(f"{a}={c}" for a, c in tx.recipients) or None,
            "reply": f"{final.code} {final.lines[0]}".strip() if final else None,
            "size": tx.size,
            "duration": round(time.monotonic() - tx.started, 3),
            "outcome": outcome,
        }
        self.record.bytes_up += tx.size
        self.record.outcome = outcome
        if final is not None:
            self.runtime.smtp_transaction(tx.pool, final.code)
        log.info(
            "transaction", extra={"fields": {k: v for k, v in fields.items() if v is not None}}
        )

    async def drop_remote(self, *, polite: bool = False) -> None:
        remote, self.remote = self.remote, None
        if remote is None:
            return
        if polite:
            await remote.quit()
        else:
            await remote.abort()

    async def close(self, *, clean: bool) -> None:
        """The MTA session is over: end any transaction, QUIT (or cut) the remote."""
        if self.tx is not None:
            if self.tx.remote_open:
                await self.drop_remote()  # mid-transaction: never let it complete
            self.finish("abandoned")
        await self.drop_remote(polite=clean)


def recipient_domain(address: str) -> str:
    """The domain of a recipient (``Postmaster`` alone has none: RFC 5321 4.5.1)."""
    return address.rpartition("@")[2].lower()


def denied_addresses(hop: NextHop, config: Config) -> frozenset[IPAddress]:
    """Addresses of a DNS-derived next hop that ``[access] deny_destinations`` forbids.

    Routes are the operator's own choice and are not filtered; an MX or a domain literal
    pointing into loopback or a private network is (an open door into the LAN otherwise).
    """
    if hop.kind == "route":
        return frozenset()
    denied: set[IPAddress] = set()
    for host in hop.hosts:
        for address in host.addresses:
            refusal = destination_refusal(config.access, address, host.port)
            if refusal is not None and "deny_destinations" in refusal:
                denied.add(address)
    return frozenset(denied)
