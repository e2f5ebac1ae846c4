"""The relay core's vocabulary: events in, commands out (mitmproxy's proxy-core shape).

Events tell :class:`~egressd.relay.core.RelayCore` what happened: the MTA sent a command or
a piece of the body, went away or went silent; a remote connection was opened (or could
not be); a next hop was resolved; the remote replied, went silent, or broke. Commands tell
the shell what to do: reply to the MTA, open a remote through the egress, resolve a next
next hop, send to the remote, close the remote, account for a transaction.

Four commands wait for a result, which the shell feeds back as the next event:

======================  =================================================================
:class:`OpenRemote`     :class:`RemoteOpened` or :class:`OpenFailed`
:class:`AskSelection`   :class:`SelectionAnswered`
:class:`ResolveNextHop` :class:`NextHopResolved`
:class:`SendRemote`     :class:`RemoteReplied`, :class:`RemoteTimedOut` or
                        :class:`RemoteLost`
======================  =================================================================

Every command and event is a small immutable record, equal by its fields, so a test reads
as a transcript::

    >> MtaCommand(Rcpt("r@good.test"))
    << OpenRemote(pool="main", domain="good.test")
    >> RemoteOpened(remote)
    << SendRemote((Mail(...), Rcpt(...)), "MAIL FROM and RCPT TO")
    >> RemoteReplied((Reply(250, ...), Reply(250, ...)))
    << ReplyMta(Reply(250, ...))

Nothing here does I/O or imports trio: the shell (:mod:`egressd.doors.smtp_relay`) executes
the commands. The events and commands are :class:`~egressd.proto.smtp_common.Record` objects,
not frozen dataclasses: a message makes about a dozen, and a record is one plain
``__init__`` (its attributes are ``Final`` to mypy, as a frozen dataclass's are).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from egressd.addresses import IPAddress
from egressd.config import Config, Source
from egressd.proto.smtp_client import ClientCommand
from egressd.proto.smtp_common import Data as DataCommand
from egressd.proto.smtp_common import (
    DataChunk,
    Ehlo,
    Helo,
    Mail,
    Quit,
    Rcpt,
    Record,
    Reply,
    Rset,
)

__all__ = [
    "AskSelection",
    "CloseRemote",
    "Command",
    "EgressView",
    "Event",
    "MessageBudget",
    "MessageRefusal",
    "MtaAuthenticated",
    "MtaBareLineEnding",
    "MtaBody",
    "MtaClosed",
    "MtaCommand",
    "MtaDataDiscarded",
    "MtaEndOfData",
    "MtaTimedOut",
    "MtaTooSlow",
    "NextHopResolved",
    "NextHopView",
    "NextHops",
    "OpenFailed",
    "OpenRemote",
    "Remote",
    "RemoteLost",
    "RemoteOpened",
    "RemoteReplied",
    "RemoteTimedOut",
    "ReplyMta",
    "ResolveNextHop",
    "SelectionAnswered",
    "SendRemote",
    "SessionEnded",
    "TransactionEnded",
    "TransactionStarted",
]


# --------------------------------------------------------------------------- what the core reads


class NextHopView(Protocol):
    """What the core needs of a next hop (:class:`egressd.net.mx.NextHop` is one)."""

    @property
    def domain(self) -> str: ...

    def same_destination(self, other: Any, connected: tuple[IPAddress, int]) -> bool: ...


class HealthView(Protocol):
    def is_suspended(self, name: str) -> bool: ...


class EgressView(Protocol):
    """One configuration generation and the sources' health (:class:`egressd.net.egress.Egress`
    is one); a transaction keeps the generation that was current at its MAIL."""

    @property
    def config(self) -> Config: ...

    @property
    def health(self) -> HealthView: ...


class MessageRefusal(Protocol):
    """Why a connection may not carry one more message now (:class:`egressd.shaping.
    Refusal` is one): the budget's name (``max_message_rate``...) and a sentence."""

    @property
    def budget(self) -> str: ...

    @property
    def reason(self) -> str: ...


class MessageBudget(Protocol):
    """A connection's per-message budgets (an :class:`egressd.shaping.Lease` is one):
    ``send()`` counts one message, or says why not (nothing is counted then)."""

    def send(self) -> MessageRefusal | None: ...


#: A transaction's next hops by (domain, IP version): each domain is resolved once.
NextHops = MutableMapping[tuple[str, "int | None"], "NextHopView | Reply"]


@dataclass(frozen=True)
class Remote:
    """An open SMTP connection to a remote, ready for MAIL, as the core sees it."""

    source: Source
    next_hop: NextHopView
    #: The connected address and the next hop's port (before a source's ``remote_port``).
    next_hop_address: tuple[IPAddress, int]
    #: ``mx.example[192.0.2.1]:25``
    remote_text: str
    #: ``source "a" (127.0.0.3) to mx.example[192.0.2.1]:25``, for replies
    describe: str
    mx_name: str = ""
    local_address: str = ""
    tls_version: str | None = None
    tls_policy: str = "opportunistic"
    tls_result: str = ""
    #: What the remote's last EHLO advertised (keyword -> parameters).
    extensions: Mapping[str, str] = field(default_factory=dict)
    #: The connection's shaping budgets per message (None without shaping files).
    budget: MessageBudget | None = field(default=None, compare=False, repr=False)
    #: ``source.egress_version``, read once: the core asks it at every message (a property
    #: of a property, six calls each time).
    egress_version: int | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "egress_version", self.source.egress_version)

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions


# --------------------------------------------------------------------------- events


class MtaCommand(Record):
    """A transaction command from the MTA (EHLO/HELO/RSET/QUIT end a transaction)."""

    __slots__ = ("command",)
    _fields = ("command",)

    def __init__(self, command: Mail | Rcpt | DataCommand | Rset | Quit | Ehlo | Helo) -> None:
        self.command: Final = command


class MtaAuthenticated(Record):
    """AUTH succeeded (``user`` names a pool), or was undone by STARTTLS (None)."""

    __slots__ = ("user",)
    _fields = ("user",)

    def __init__(self, user: str | None) -> None:
        self.user: Final = user


class MtaBody(Record):
    """Pieces of the body, as the MTA sent them (dot-stuffed), one read's worth."""

    __slots__ = ("chunks",)
    _fields = ("chunks",)

    def __init__(self, chunks: tuple[DataChunk, ...]) -> None:
        self.chunks: Final = chunks


class MtaEndOfData(Record):
    """The last pieces of the body and the final dot."""

    __slots__ = ("chunks",)
    _fields = ("chunks",)

    def __init__(self, chunks: tuple[DataChunk, ...] = ()) -> None:
        self.chunks: Final = chunks


class MtaBareLineEnding(Record):
    """A bare CR or LF in the body: it must not end at the remote (SMTP smuggling)."""

    __slots__ = ()


class MtaDataDiscarded(Record):
    """The refused body ended; ``reply`` (550 5.6.11) is the MTA's answer."""

    __slots__ = ("reply",)
    _fields = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply: Final = reply


class MtaClosed(Record):
    """The MTA disconnected (or broke the protocol)."""

    __slots__ = ()


class MtaTimedOut(Record):
    """The MTA sent nothing for ``seconds``."""

    __slots__ = ("seconds",)
    _fields = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds: Final = seconds


class MtaTooSlow(Record):
    """The MTA sent the body slower than ``rate`` bytes per second on average."""

    __slots__ = ("rate",)
    _fields = ("rate",)

    def __init__(self, rate: int) -> None:
        self.rate: Final = rate


class SessionEnded(Record):
    """The MTA session is over; ``clean`` when it ended with QUIT."""

    __slots__ = ("clean",)
    _fields = ("clean",)

    def __init__(self, clean: bool) -> None:
        self.clean: Final = clean


class RemoteOpened(Record):
    __slots__ = ("remote",)
    _fields = ("remote",)

    def __init__(self, remote: Remote) -> None:
        self.remote: Final = remote


class OpenFailed(Record):
    """No remote could be opened; ``reply`` says why (see :mod:`egressd.relay.replies`)."""

    __slots__ = ("reply",)
    _fields = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply: Final = reply


class SelectionAnswered(Record):
    """The answer to :class:`AskSelection`: None when a source may take the message on a
    new connection, else the reply an :class:`OpenRemote` would fail with now."""

    __slots__ = ("refusal",)
    _fields = ("refusal",)

    def __init__(self, refusal: Reply | None) -> None:
        self.refusal: Final = refusal


class NextHopResolved(Record):
    """The next hop, or the reply for a next hop that cannot be found."""

    __slots__ = ("result",)
    _fields = ("result",)

    def __init__(self, result: NextHopView | Reply) -> None:
        self.result: Final = result


class RemoteReplied(Record):
    """The remote's replies to a :class:`SendRemote`, in order; fewer when one is a 421
    (it stands for the replies that will never come)."""

    __slots__ = ("replies",)
    _fields = ("replies",)

    def __init__(self, replies: tuple[Reply, ...] = ()) -> None:
        self.replies: Final = replies


class RemoteTimedOut(Record):
    """No progress within the deadline, while ``sending`` or waiting for a reply."""

    __slots__ = ("seconds", "sending")
    _fields = ("seconds", "sending")

    def __init__(self, seconds: float, sending: bool = False) -> None:
        self.seconds: Final = seconds
        self.sending: Final = sending


class RemoteLost(Record):
    """The remote connection broke: an OS ``error``, ``closed`` by the remote, or a
    protocol ``violation``; ``detail`` is the error's text."""

    __slots__ = ("detail", "how", "sending")
    _fields = ("how", "sending", "detail")

    def __init__(
        self, how: Literal["error", "closed", "violation"], sending: bool = False, detail: str = ""
    ) -> None:
        self.how: Final = how
        self.sending: Final = sending
        self.detail: Final = detail


Event = (
    MtaCommand
    | MtaAuthenticated
    | MtaBody
    | MtaEndOfData
    | MtaBareLineEnding
    | MtaDataDiscarded
    | MtaClosed
    | MtaTimedOut
    | MtaTooSlow
    | SessionEnded
    | RemoteOpened
    | OpenFailed
    | SelectionAnswered
    | NextHopResolved
    | RemoteReplied
    | RemoteTimedOut
    | RemoteLost
)


# --------------------------------------------------------------------------- commands


class ReplyMta(Record):
    __slots__ = ("reply",)
    _fields = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply: Final = reply


class OpenRemote(Record):
    """Open a remote for ``domain`` through ``pool``'s next source (retried once on another
    source when the first fails through its own fault), ready for MAIL. The shell resolves
    the next hop for the picked source's IP version through ``next_hops`` (and fills it).
    ``requiretls``: the MAIL carries REQUIRETLS (RFC 8689), so only a remote that can
    honour it will do. ``egress`` and ``next_hops`` are neither compared nor printed."""

    __slots__ = ("domain", "egress", "next_hops", "pool", "requiretls")
    _fields = ("pool", "domain", "requiretls")

    def __init__(
        self,
        pool: str,
        domain: str,
        egress: EgressView | None = None,
        next_hops: NextHops | None = None,
        requiretls: bool = False,
    ) -> None:
        self.pool: Final = pool
        self.domain: Final = domain
        self.egress: Final = egress
        self.next_hops: Final[NextHops] = {} if next_hops is None else next_hops
        self.requiretls: Final = requiretls


class AskSelection(Record):
    """Could :class:`OpenRemote` open a connection for ``domain`` through ``pool`` now?
    Asked, without picking or holding anything, before a kept connection whose budgets
    refused a message is given up; ``leaving`` is that connection's source. ``egress`` and
    ``next_hops`` are neither compared nor printed."""

    __slots__ = ("domain", "egress", "leaving", "next_hops", "pool")
    _fields = ("pool", "domain", "leaving")

    def __init__(
        self,
        pool: str,
        domain: str,
        leaving: str,
        egress: EgressView | None = None,
        next_hops: NextHops | None = None,
    ) -> None:
        self.pool: Final = pool
        self.domain: Final = domain
        self.leaving: Final = leaving
        self.egress: Final = egress
        self.next_hops: Final[NextHops] = {} if next_hops is None else next_hops


class ResolveNextHop(Record):
    """``config`` is neither compared nor printed."""

    __slots__ = ("config", "domain", "version")
    _fields = ("domain", "version")

    def __init__(self, domain: str, version: int | None, config: Config | None = None) -> None:
        self.domain: Final = domain
        self.version: Final = version
        self.config: Final = config


class SendRemote(Record):
    """Write ``commands`` in one write and read a reply to each (none to body pieces);
    ``what`` names them for a failure reply. ``replies_owed`` (neither compared nor
    printed) is how many replies the remote owes: one per command but body pieces."""

    __slots__ = ("commands", "replies_owed", "what")
    _fields = ("commands", "what")

    def __init__(self, commands: tuple[ClientCommand, ...], what: str) -> None:
        # Counted once here: the core and the shell both read it, several times a message.
        owed = 0
        for command in commands:
            if type(command) is not DataChunk:
                owed += 1
        self.commands: Final = commands
        self.what: Final = what
        self.replies_owed: Final = owed


class CloseRemote(Record):
    """Close the remote connection: after QUIT when ``polite``, else at once (in the middle
    of DATA the remote then never sees the final dot)."""

    __slots__ = ("polite",)
    _fields = ("polite",)

    def __init__(self, polite: bool = False) -> None:
        self.polite: Final = polite


class TransactionStarted(Record):
    __slots__ = ("pool",)
    _fields = ("pool",)

    def __init__(self, pool: str) -> None:
        self.pool: Final = pool


class TransactionEnded(Record):
    """A transaction is over: its log line's ``fields`` (neither compared nor printed), and
    its final reply, if any."""

    __slots__ = ("fields", "final", "outcome", "pool", "size")
    _fields = ("pool", "outcome", "final", "size")

    def __init__(
        self,
        pool: str,
        outcome: str,
        final: Reply | None,
        size: int,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        self.pool: Final = pool
        self.outcome: Final = outcome
        self.final: Final = final
        self.size: Final = size
        self.fields: Final[Mapping[str, object]] = {} if fields is None else fields


Command = (
    ReplyMta
    | OpenRemote
    | AskSelection
    | ResolveNextHop
    | SendRemote
    | CloseRemote
    | TransactionStarted
    | TransactionEnded
)

#: Commands whose result comes back as the next event.
AWAITING = (OpenRemote, AskSelection, ResolveNextHop, SendRemote)
