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

Every command and event is a small frozen dataclass, so a test reads as a transcript::

    >> MtaCommand(Rcpt("r@good.test"))
    << OpenRemote(pool="main", domain="good.test")
    >> RemoteOpened(remote)
    << SendRemote((Mail(...), Rcpt(...)), "MAIL FROM and RCPT TO")
    >> RemoteReplied((Reply(250, ...), Reply(250, ...)))
    << ReplyMta(Reply(250, ...))

Nothing here does I/O or imports trio: the shell (:mod:`egressd.doors.smtp_relay`) executes
the commands.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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


@dataclass(frozen=True)
class MtaCommand:
    """A transaction command from the MTA (EHLO/HELO/RSET/QUIT end a transaction)."""

    command: Mail | Rcpt | DataCommand | Rset | Quit | Ehlo | Helo


@dataclass(frozen=True)
class MtaAuthenticated:
    """AUTH succeeded (``user`` names a pool), or was undone by STARTTLS (None)."""

    user: str | None


@dataclass(frozen=True)
class MtaBody:
    """Pieces of the body, as the MTA sent them (dot-stuffed), one read's worth."""

    chunks: tuple[DataChunk, ...]


@dataclass(frozen=True)
class MtaEndOfData:
    """The last pieces of the body and the final dot."""

    chunks: tuple[DataChunk, ...] = ()


@dataclass(frozen=True)
class MtaBareLineEnding:
    """A bare CR or LF in the body: it must not end at the remote (SMTP smuggling)."""


@dataclass(frozen=True)
class MtaDataDiscarded:
    """The refused body ended; ``reply`` (550 5.6.11) is the MTA's answer."""

    reply: Reply


@dataclass(frozen=True)
class MtaClosed:
    """The MTA disconnected (or broke the protocol)."""


@dataclass(frozen=True)
class MtaTimedOut:
    """The MTA sent nothing for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class MtaTooSlow:
    """The MTA sent the body slower than ``rate`` bytes per second on average."""

    rate: int


@dataclass(frozen=True)
class SessionEnded:
    """The MTA session is over; ``clean`` when it ended with QUIT."""

    clean: bool


@dataclass(frozen=True)
class RemoteOpened:
    remote: Remote


@dataclass(frozen=True)
class OpenFailed:
    """No remote could be opened; ``reply`` says why (see :mod:`egressd.relay.replies`)."""

    reply: Reply


@dataclass(frozen=True)
class SelectionAnswered:
    """The answer to :class:`AskSelection`: None when a source may take the message on a
    new connection, else the reply an :class:`OpenRemote` would fail with now."""

    refusal: Reply | None


@dataclass(frozen=True)
class NextHopResolved:
    """The next hop, or the reply for a next hop that cannot be found."""

    result: NextHopView | Reply


@dataclass(frozen=True)
class RemoteReplied:
    """The remote's replies to a :class:`SendRemote`, in order; fewer when one is a 421
    (it stands for the replies that will never come)."""

    replies: tuple[Reply, ...] = ()


@dataclass(frozen=True)
class RemoteTimedOut:
    """No progress within the deadline, while ``sending`` or waiting for a reply."""

    seconds: float
    sending: bool = False


@dataclass(frozen=True)
class RemoteLost:
    """The remote connection broke: an OS ``error``, ``closed`` by the remote, or a
    protocol ``violation``; ``detail`` is the error's text."""

    how: Literal["error", "closed", "violation"]
    sending: bool = False
    detail: str = ""


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


@dataclass(frozen=True)
class ReplyMta:
    reply: Reply


@dataclass(frozen=True)
class OpenRemote:
    """Open a remote for ``domain`` through ``pool``'s next source (retried once on another
    source when the first fails through its own fault), ready for MAIL. The shell resolves
    the next hop for the picked source's IP version through ``next_hops`` (and fills it)."""

    pool: str
    domain: str
    egress: EgressView | None = field(default=None, compare=False, repr=False)
    next_hops: NextHops = field(default_factory=dict, compare=False, repr=False)
    requiretls: bool = False
    """The MAIL carries REQUIRETLS (RFC 8689): only a remote that can honour it will do."""


@dataclass(frozen=True)
class AskSelection:
    """Could :class:`OpenRemote` open a connection for ``domain`` through ``pool`` now?
    Asked, without picking or holding anything, before a kept connection whose budgets
    refused a message is given up; ``leaving`` is that connection's source."""

    pool: str
    domain: str
    leaving: str
    egress: EgressView | None = field(default=None, compare=False, repr=False)
    next_hops: NextHops = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ResolveNextHop:
    domain: str
    version: int | None
    config: Config | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, init=False)
class SendRemote:
    """Write ``commands`` in one write and read a reply to each (none to body pieces);
    ``what`` names them for a failure reply."""

    commands: tuple[ClientCommand, ...]
    what: str
    #: How many replies the remote owes for ``commands``: one per command but body pieces.
    replies_owed: int = field(repr=False, compare=False)

    def __init__(self, commands: tuple[ClientCommand, ...], what: str) -> None:
        # One call, not the generated __init__ and a __post_init__ (two sends a message).
        # Counted once here: the core and the shell both read it, several times a message.
        owed = len(commands)
        for command in commands:
            if type(command) is DataChunk:
                owed -= 1
        object.__setattr__(self, "commands", commands)
        object.__setattr__(self, "what", what)
        object.__setattr__(self, "replies_owed", owed)


@dataclass(frozen=True)
class CloseRemote:
    """Close the remote connection: after QUIT when ``polite``, else at once (in the middle
    of DATA the remote then never sees the final dot)."""

    polite: bool = False


@dataclass(frozen=True)
class TransactionStarted:
    pool: str


@dataclass(frozen=True)
class TransactionEnded:
    """A transaction is over: its log line's ``fields``, and its final reply, if any."""

    pool: str
    outcome: str
    final: Reply | None
    size: int
    fields: Mapping[str, object] = field(compare=False, repr=False, default_factory=dict)


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
