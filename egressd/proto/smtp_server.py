"""Sans-IO SMTP server machine: egressd's side of the conversation with the MTA.

Theory of operation
-------------------
The MTA connects to egressd's relay listener and speaks SMTP (RFC 5321). This machine parses
what it sends and tracks the session; the driver decides every reply, because in cut-through
relaying most replies are the remote server's own, and egressd must never say 250 before the
remote did. The machine never writes on its own, in h11's manner::

    server.receive_data(chunk)        # b"" at EOF
    event = server.next_event()       # an event, NEED_DATA or PAUSED
    wire = server.send(reply)         # a Reply -> bytes to write to the MTA

Replies drive the state
~~~~~~~~~~~~~~~~~~~~~~~
The first reply sent is the greeting (220; 554 makes the machine answer everything but QUIT
with 503, RFC 5321 section 3.1; 421 closes). After that, every reply answers the oldest
command still owed one (RFC 2920 keeps replies in command order), and *the reply decides the
state*: a 2xx to MAIL opens the transaction, a 2xx to RCPT counts a recipient, a 354 to DATA
switches to the body, a 220 to STARTTLS waits for :meth:`SmtpServer.start_tls`, a 235 to
AUTH authenticates, any reply to QUIT closes. So "the remote said 354, go to data mode" is
simply ``server.send(remote_354)``, and a refusal is sending the refusal. A 421 may be sent
at any moment (no command needed) and closes the session.

Pipelining (RFC 2920)
~~~~~~~~~~~~~~~~~~~~~
Several commands in one chunk come out as events one by one, whether or not the earlier ones
were answered yet. Command-order checks (RFC 5321 section 4.1.4, "503 5.5.1 bad sequence")
are made when a command is parsed, against the state the replies sent so far produced, with
the still-unanswered commands assumed to succeed. A driver that answers each event before
asking for the next (the usual loop) therefore gets exact checks; a driver that batches gets
permissive checks and relies on the remote to refuse what follows a refused command. The
machine itself produces out-of-sequence, syntax and unknown-command errors as a
:class:`CommandError` event carrying the reply to send: it decides the reply, the driver
sends it, so all writes still go through :meth:`SmtpServer.send`.

Where the meaning of the following bytes depends on a reply not yet sent -- after DATA (body
or commands?) and STARTTLS (TLS or plaintext?) -- ``next_event()`` returns ``PAUSED`` until
the driver sends that reply. After QUIT nothing more is parsed.

AUTH (RFC 4954)
~~~~~~~~~~~~~~~
PLAIN (RFC 4616, with an initial response or after a ``334`` continuation) and LOGIN (two
``334`` prompts) end in one :class:`AuthCredentials` event for the driver to check (235 or
535). A prompt comes out as :class:`AuthChallenge` with the 334 reply to send. ``*`` cancels
(501); undecodable base64 gives 501 5.5.2.

The body (DATA) and SMTP smuggling
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
After the 354 the body streams out as :class:`DataChunk` events as soon as bytes arrive, each
at most ``max_chunk`` octets; it is never held whole. The chunks are the octets exactly as
the MTA sent them -- still dot-stuffed (RFC 5321 section 4.5.2), CRLF line ends -- up to but
excluding the final ``.<CRLF>``; they always end at a line end, so the relay writes them to
the remote and then writes ``.\\r\\n``. Text lines longer than 1000 octets are let through.

Only ``<CRLF>.<CRLF>`` (or ``.<CRLF>`` as the very first body line) ends the data. A bare LF
or a bare CR never ends a line, and since forwarding one (or turning it into CRLF) would let
a different end of data appear at the remote -- SMTP smuggling, as in ``\\n.\\r\\n`` or
``\\r\\n.\\r`` -- the machine refuses such a message: at the first bare CR or LF it emits
:class:`BareLineEnding` and no more chunks (bytes before it were already emitted), then keeps
reading up to the real ``<CRLF>.<CRLF>`` and emits :class:`DataDiscarded` with the reply to
send (``550 5.6.11``). The driver must abort the remote transaction on BareLineEnding by
closing that connection without writing the final dot; otherwise the chunks it already wrote
would be delivered. A clean body ends with :class:`EndOfData`.

STARTTLS (RFC 3207)
~~~~~~~~~~~~~~~~~~~
After the 220 the driver calls :meth:`SmtpServer.start_tls`; it raises
:class:`~egressd.proto.smtp_common.RemoteProtocolError` if plaintext bytes were pipelined
after STARTTLS (command injection, CVE-2011-0411), else it forgets the session (EHLO is
required again, AUTH is undone) and the driver wraps the stream in TLS.

Limits
~~~~~~
Command lines are capped at ``max_line`` octets (default 4096: RFC 5321's 512 plus headroom
for ESMTP parameters and AUTH initial responses); a longer line gives ``500 5.5.2 Line too
long`` once, and parsing resumes after the next CRLF. Command lines end at CRLF only; one
holding a bare CR, LF or other control character is answered with 500.

EOF comes out as :class:`ConnectionClosed` once no complete unit remains; a fatal violation
is raised as :class:`~egressd.proto.smtp_common.RemoteProtocolError`. Both repeat on every
later call. Other enhanced
status codes follow RFC 3463 / RFC 2034; parameters follow RFC 1870 (SIZE), RFC 6152
(8BITMIME), RFC 6531 (SMTPUTF8), RFC 3461 (DSN) and RFC 4954 (AUTH=).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from egressd.proto.smtp_common import (
    DATA_CHUNK_SIZE,
    MAX_COMMAND_LINE,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    Help,
    LocalProtocolError,
    Mail,
    Noop,
    PathSyntaxError,
    Quit,
    Rcpt,
    ReceiveBuffer,
    RemoteProtocolError,
    Reply,
    Rset,
    Sentinel,
    StartTls,
    Vrfy,
    _parse_extension_lines,
    ehlo_reply,
    parse_esmtp_params,
    parse_path,
)

__all__ = [
    "DEFAULT_SERVER_EXTENSIONS",
    "AuthChallenge",
    "AuthCredentials",
    "BareLineEnding",
    "CommandError",
    "DataDiscarded",
    "ServerEvent",
    "ServerState",
    "SmtpServer",
]

#: What the relay listener advertises unless told otherwise.
DEFAULT_SERVER_EXTENSIONS: Final = (
    "PIPELINING",
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "ENHANCEDSTATUSCODES",
)


@dataclass(frozen=True)
class CommandError:
    """A command the machine refuses: syntax, sequence, unknown, too long, bad parameter.

    Send ``reply``; it answers the command. ``command`` is the verb (or "" if none) for logs.
    """

    reply: Reply
    command: str = ""


@dataclass(frozen=True)
class AuthChallenge:
    """AUTH needs another client response: send ``reply`` (a 334), then keep reading."""

    mechanism: str
    reply: Reply


@dataclass(frozen=True)
class AuthCredentials:
    """The client's AUTH credentials; answer 235 (RFC 4954) or 535 5.7.8."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True)
class BareLineEnding:
    """A bare CR or LF in the body: stop forwarding and abort the remote transaction.

    No more DataChunk events follow; the machine swallows the rest of the body and emits
    :class:`DataDiscarded` at the real end of data. ``reply`` is what that will carry.
    """

    reply: Reply


@dataclass(frozen=True)
class DataDiscarded:
    """End of a body refused for bare CR/LF: send ``reply`` (never the remote's reply)."""

    reply: Reply


ServerEvent = (
    Helo
    | Ehlo
    | Mail
    | Rcpt
    | Data
    | Rset
    | Noop
    | Quit
    | Vrfy
    | Help
    | StartTls
    | AuthChallenge
    | AuthCredentials
    | CommandError
    | DataChunk
    | EndOfData
    | BareLineEnding
    | DataDiscarded
    | ConnectionClosed
)


class ServerState(enum.Enum):
    GREETING = "GREETING"  # the greeting has not been sent
    COMMAND = "COMMAND"  # reading command lines
    AUTH = "AUTH"  # reading an AUTH client response line
    DATA = "DATA"  # reading the body, emitting chunks
    DISCARD = "DISCARD"  # reading a refused body up to its end
    TLS = "TLS"  # 220 sent to STARTTLS; waiting for start_tls()
    CLOSED = "CLOSED"  # QUIT answered or 421 sent
    ERROR = "ERROR"  # the peer broke the protocol


class _Kind(enum.Enum):
    """What an owed reply answers."""

    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    RSET = "RSET"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    END = "END"  # end of data
    OTHER = "OTHER"  # NOOP, VRFY, HELP, refused commands


# Tuples, not sets: membership by identity, without Enum.__hash__ (a Python call).
_PAUSING: Final = (_Kind.DATA, _Kind.STARTTLS, _Kind.QUIT)
# The replies whose effect on the session depends on the reply being positive (2xx); the
# projection assumes it is (and 235 to AUTH).
_SUCCESS_MATTERS: Final = (_Kind.MAIL, _Kind.RCPT, _Kind.HELO, _Kind.EHLO)


class _Session:
    """The session as replies made it. A machine has two, the real one and the projection
    (owed replies assumed positive), each changed in place by :meth:`after_reply`: a reply
    makes no new object (a tuple rebuilt per reply cost two calls more, each time)."""

    def __init__(self) -> None:
        self.hello = ""  # "", "HELO" or "EHLO"
        self.mail = False
        self.rcpts = 0
        self.authenticated = False

    def copy(self) -> _Session:
        other = _Session()
        other.hello = self.hello
        other.mail = self.mail
        other.rcpts = self.rcpts
        other.authenticated = self.authenticated
        return other

    def after_reply(self, kind: _Kind, code: int) -> None:
        """What reply ``code`` to a command of ``kind`` does to the session."""
        ok = 200 <= code < 300
        if kind is _Kind.MAIL:
            if ok:
                self.mail = True
                self.rcpts = 0
        elif kind is _Kind.RCPT:
            if ok:
                self.rcpts += 1
        elif kind is _Kind.RSET or kind is _Kind.END:
            self.mail = False
            self.rcpts = 0
        elif kind is _Kind.HELO or kind is _Kind.EHLO:
            if ok:
                self.hello = "EHLO" if kind is _Kind.EHLO else "HELO"
                self.mail = False
                self.rcpts = 0
        elif kind is _Kind.AUTH and code == 235:
            self.authenticated = True


def _reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply.make(code, text, enhanced=enhanced)


# The events without fields, made once: they are equal to any other instance, and immutable.
_DATA: Final = Data()
_RSET: Final = Rset()
_QUIT: Final = Quit()
_STARTTLS: Final = StartTls()
_END_OF_DATA: Final = EndOfData()
_CLOSED: Final = ConnectionClosed()
_BARE_REPLY: Final = _reply(550, "5.6.11", "Bare CR or LF in message data is not allowed")
_LOGIN_USERNAME: Final = Reply(334, ("VXNlcm5hbWU6",))  # "Username:"
_LOGIN_PASSWORD: Final = Reply(334, ("UGFzc3dvcmQ6",))  # "Password:"
_EMPTY_CHALLENGE: Final = Reply(334, ("",))
_BAD_COMMAND_CHARS: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CR_OR_LF: Final = re.compile(rb"[\r\n]")
_FROM_RE: Final = re.compile(r"FROM: *", re.IGNORECASE)
_TO_RE: Final = re.compile(r"TO: *", re.IGNORECASE)
# FROM:/TO: and a path of plain characters without a source route, as _FROM_RE or _TO_RE
# then parse_path's first match take it (one match instead of two and a call).
_PLAIN_PATH: Final = r'<(?!@)([^\x00-\x20\x7f"<>\\]*)>'
_PLAIN_FROM_RE: Final = re.compile(r"FROM: *" + _PLAIN_PATH, re.IGNORECASE)
_PLAIN_TO_RE: Final = re.compile(r"TO: *" + _PLAIN_PATH, re.IGNORECASE)
_XTEXT_RE: Final = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NOT_IMPLEMENTED: Final = frozenset(
    {"EXPN", "TURN", "ETRN", "BDAT", "ATRN", "SEND", "SOML", "SAML"}
)
_DOT, _CR, _LF = 0x2E, 0x0D, 0x0A


def _no_bare_line_ending(window: bytes) -> bool:
    """Every CR in ``window`` is followed by an LF and every LF follows a CR (a window
    that starts or ends between the two counts as bare).

    With every CR deleted and every LF then written as CRLF, a window comes back unchanged
    exactly when it is clean: what that makes has no bare CR or LF, so an equal window has
    none; a clean window is lines joined by CRLF, which the two steps give back. Both are
    single-byte ``replace`` calls, which find each CR or LF with ``memchr`` and copy the
    rest whole: no Python and no object per line (``scripts/bench machines``: 3.5 us per
    10 KiB of 80-column lines, against 9 us for ``splitlines`` rejoined with CRLF, 12 us
    for two ``translate`` passes compared one byte apart and 15 us for counting CR, LF and
    CRLF)."""
    return window.replace(b"\r", b"").replace(b"\n", b"\r\n") == window


#: How many dots :func:`_crlf_dot` looks at one by one before it searches for CRLF-dot.
_DOTS_ONE_BY_ONE: Final = 8


def _crlf_dot(data: bytearray, start: int, limit: int) -> int:
    """The index of the first ``\\r\\n.`` in ``data[start:limit]``, or -1.

    A CRLF-dot's dot is one of the window's dots, and ``memchr`` (``find`` of one byte)
    skips to the next dot far faster than the three-byte search moves: the first few
    dots (a message's headers have some) are looked at one by one, so text without
    dots -- base64 attachments, smtp-source's bodies -- costs no three-byte search at all;
    text with many dots gets it from the last of those on (``scripts/bench machines``:
    6 us of the server's 44 us per 10 KiB message was that search)."""
    dot = data.find(b".", start, limit)
    for _ in range(_DOTS_ONE_BY_ONE):
        if dot < 0:
            return -1
        if dot - 2 >= start and data[dot - 1] == _LF and data[dot - 2] == _CR:
            return dot - 2
        dot = data.find(b".", dot + 1, limit)
    return -1 if dot < 0 else data.find(b"\r\n.", max(start, dot - 2), limit)


class _Refuse(Exception):
    """Internal: a command is refused with this reply."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.reply = _reply(code, enhanced, text)


class SmtpServer:
    """The SMTP server machine (egressd facing the MTA). See the module docstring.

    ``extensions`` are the EHLO lines egressd advertises (without the domain line); they
    also decide what the machine accepts: MAIL/RCPT parameters (SIZE [n], 8BITMIME, SMTPUTF8,
    DSN, AUTH), STARTTLS, and AUTH mechanisms (``"AUTH PLAIN LOGIN"``; only PLAIN and LOGIN
    are implemented). With ``auth_requires_tls`` AUTH is refused (530 5.7.0) and not
    advertised before STARTTLS.
    """

    def __init__(
        self,
        *,
        extensions: Sequence[str] = DEFAULT_SERVER_EXTENSIONS,
        auth_requires_tls: bool = False,
        max_line: int = MAX_COMMAND_LINE,
        max_chunk: int = DATA_CHUNK_SIZE,
    ) -> None:
        if max_line < 64 or max_chunk < 64:
            raise LocalProtocolError("max_line and max_chunk must be at least 64")
        self._extensions = tuple(extensions)
        offered = _parse_extension_lines(self._extensions)
        self._offered = offered
        self._auth_mechanisms = frozenset(offered.get("AUTH", "").upper().split()) & {
            "PLAIN",
            "LOGIN",
        }
        size = offered.get("SIZE", "")
        self._max_size = int(size) if size.isdigit() and int(size) > 0 else None
        self._auth_requires_tls = auth_requires_tls
        self._max_line = max_line
        self._max_chunk = max_chunk
        self._rcpt_allowed = frozenset({"NOTIFY", "ORCPT"} if "DSN" in offered else ())

        self._buf = ReceiveBuffer()
        #: Where the session is. Read it, never set it: a plain attribute, not a property,
        #: as the shell reads it several times per message (a property is a Python call).
        self.state = ServerState.GREETING
        self._refused = False  # greeted with 554
        self._tls_active = False
        self._session = _Session()  # as the replies sent so far made it
        self._projected = _Session()  # ... with owed replies assumed positive
        self._owed: deque[_Kind] = deque()
        self._discarding_line = False
        self._line_start = True  # in DATA: the next byte starts a line
        self._window = b""  # the body bytes _clean_end found clean, for the next chunk
        self._auth_mechanism = ""
        self._auth_username: str | None = None
        self._challenges = 0  # AuthChallenge events not yet answered with a 334
        self._violation: RemoteProtocolError | None = None
        self._mail_allowed = self._mail_params()  # again when TLS starts

    # ---------------------------------------------------------------- public properties

    @property
    def tls_active(self) -> bool:
        """True once :meth:`start_tls` succeeded."""
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        return self._session.authenticated

    @property
    def esmtp(self) -> bool:
        """True when the session was opened with EHLO (not HELO)."""
        return self._session.hello == "EHLO"

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of that transaction."""
        return self._session.mail

    @property
    def owed_replies(self) -> int:
        """How many replies the driver still owes the MTA."""
        return len(self._owed)

    def ehlo_reply(self, domain: str, greeting: str = "") -> Reply:
        """The EHLO reply for this session: the configured extensions, minus STARTTLS once
        TLS is active, minus AUTH before TLS when ``auth_requires_tls``, minus REQUIRETLS
        before TLS (RFC 8689: offered only over TLS)."""
        lines = []
        for line in self._extensions:
            keyword = line.split(" ", 1)[0].upper()
            if keyword == "STARTTLS" and self._tls_active:
                continue
            if keyword == "REQUIRETLS" and not self._tls_active:
                continue
            if keyword == "AUTH" and self._auth_requires_tls and not self._tls_active:
                continue
            lines.append(line)
        return ehlo_reply(domain, lines, greeting)

    # ---------------------------------------------------------------- h11-style API

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the MTA; ``b""`` means EOF (repeating it is harmless).

        Bytes after EOF are a caller bug (LocalProtocolError).
        """
        buf = self._buf
        if not data:
            buf.closed = True
        elif buf.closed:
            raise LocalProtocolError("receive_data() after EOF")
        elif self.state is not ServerState.CLOSED and self.state is not ServerState.ERROR:
            if buf.start:
                buf.feed(data)
            else:  # nothing consumed to drop: feed() without its call
                buf.data += data

    def next_event(self) -> ServerEvent | Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED``.

        Raises RemoteProtocolError when the MTA broke the protocol beyond repair, then the
        same error on every later call.
        """
        if self._violation is not None:
            raise self._violation
        state = self.state
        event: ServerEvent | Sentinel
        if state is ServerState.COMMAND:  # the usual state first
            owed = self._owed
            buf = self._buf
            if owed and owed[-1] in _PAUSING:
                event = PAUSED
            elif not buf.data or (buf.start and len(buf.data) <= buf.start):
                event = NEED_DATA  # nothing to parse (the usual call after a reply): an empty
                # buffer, or one consumed to its end, told without len() while possible
            elif self._discarding_line:
                event = self._next_command_event()
            else:  # a whole command line, the usual case, goes to _dispatch from here
                line = buf.take_line()
                if line is not None and len(line) <= self._max_line:
                    return self._dispatch(line)
                event = self._after_line(line)
        elif state is ServerState.CLOSED:
            return _CLOSED
        elif state is ServerState.TLS:
            if len(self._buf):
                raise self._fail("plaintext pipelined after STARTTLS (CVE-2011-0411 class)")
            event = NEED_DATA
        elif state is ServerState.DATA:
            buf = self._buf
            event = self._next_data_event() if len(buf.data) > buf.start else NEED_DATA
        elif state is ServerState.DISCARD:
            event = self._discard_data()
        elif state is ServerState.GREETING or (self._owed and self._owed[-1] in _PAUSING):
            event = PAUSED
        else:
            event = self._next_command_event()
        if (event is NEED_DATA or event is PAUSED) and self._buf.closed:
            return _CLOSED
        return event

    def send(self, reply: Reply) -> bytes:
        """Account for ``reply`` and return its bytes. The first reply is the greeting;
        each later one answers the oldest command still owed a reply; 421 may come any time.
        """
        if type(reply) is not Reply and not isinstance(reply, Reply):
            raise LocalProtocolError(f"send() takes a Reply, not {reply!r}")
        if self.state is ServerState.CLOSED or self.state is ServerState.ERROR:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        code = reply.code
        if code == 421:
            self.state = ServerState.CLOSED
            self._owed.clear()
            return reply._wire
        if self.state is ServerState.GREETING:
            if code != 220 and code != 554:
                raise LocalProtocolError(f"the greeting must be 220, 554 or 421, not {code}")
            self._refused = code == 554
            self.state = ServerState.COMMAND
            return reply._wire
        owed = self._owed
        if not owed:
            raise LocalProtocolError(f"no command is owed a reply (sending {code})")
        kind = owed[0]
        if code == 334:
            if kind is not _Kind.AUTH or self._challenges == 0:
                raise LocalProtocolError("334 is only a reply to an AuthChallenge")
            self._challenges -= 1
            return reply._wire
        if code == 354:
            if kind is not _Kind.DATA:
                raise LocalProtocolError("354 is only a reply to DATA")
            owed.popleft()
            self.state = ServerState.DATA
            self._line_start = True
            self._buf.reset_scan()
            return reply._wire
        owed.popleft()
        if code < 300:  # a message's usual replies, as after_reply takes them, inline
            if kind is _Kind.RCPT:
                self._session.rcpts += 1
                return reply._wire
            if kind is _Kind.MAIL:
                session = self._session
                session.mail = True
                session.rcpts = 0
                return reply._wire
            if kind is _Kind.END:
                session = self._session
                session.mail = False
                session.rcpts = 0
                return reply._wire
        self._session.after_reply(kind, code)
        if (kind in _SUCCESS_MATTERS and not 200 <= code < 300) or (
            kind is _Kind.AUTH and code != 235
        ):
            # The projection assumed success; recompute it from what really happened.
            projected = self._session.copy()
            for later in owed:
                projected.after_reply(later, 235 if later is _Kind.AUTH else 250)
            self._projected = projected
        if kind is _Kind.AUTH:
            self._challenges = 0
            if self.state is ServerState.AUTH:
                self.state = ServerState.COMMAND
        elif kind is _Kind.STARTTLS and code < 300:
            self.state = ServerState.TLS
        elif kind is _Kind.QUIT:
            self.state = ServerState.CLOSED
        return reply._wire

    def start_tls(self) -> None:
        """Call after sending the 220 to STARTTLS, before the TLS handshake.

        Raises RemoteProtocolError if plaintext bytes already followed STARTTLS.
        Otherwise resets the session as RFC 3207 section 4.2 requires.
        """
        if self.state is not ServerState.TLS:
            raise LocalProtocolError("start_tls() only after a 220 reply to STARTTLS")
        if len(self._buf):
            self._fail("plaintext pipelined after STARTTLS (CVE-2011-0411 class)")
            raise RemoteProtocolError("plaintext pipelined after STARTTLS")
        self._buf.reset_scan()
        self._tls_active = True
        self._mail_allowed = self._mail_params()
        self._session = _Session()
        self._projected = _Session()
        self.state = ServerState.COMMAND

    # ---------------------------------------------------------------- commands

    def _fail(self, description: str) -> RemoteProtocolError:
        self._violation = RemoteProtocolError(description)
        self.state = ServerState.ERROR
        return self._violation

    def _owe(self, kind: _Kind) -> None:
        # Until it is answered, a command is assumed to succeed (235 to AUTH, else 250).
        self._owed.append(kind)
        self._projected.after_reply(kind, 235 if kind is _Kind.AUTH else 250)

    def _refuse(self, refusal: _Refuse, command: str, *, in_auth: bool = False) -> CommandError:
        if in_auth:  # the reply answers the AUTH command, already owed
            self.state = ServerState.COMMAND
            return CommandError(refusal.reply, "AUTH")
        self._owed.append(_Kind.OTHER)
        return CommandError(refusal.reply, command)

    def _next_command_event(self) -> ServerEvent | Sentinel:
        buf = self._buf
        while self._discarding_line:
            end = buf.find(b"\r\n")
            if end >= 0:
                buf.skip(end + 2)
                self._discarding_line = False
                break
            keep = 1 if len(buf) and buf.data[-1] == _CR else 0
            buf.skip(len(buf) - keep)
            return NEED_DATA
        line = buf.take_line()
        if line is not None and len(line) <= self._max_line:
            return self._dispatch(line)
        return self._after_line(line)

    def _after_line(self, line: bytes | None) -> ServerEvent | Sentinel:
        """What a :meth:`ReceiveBuffer.take_line` that gave no command to dispatch means:
        no whole line yet (or one too long to wait for), or a line too long."""
        in_auth = self.state is ServerState.AUTH
        if line is None:
            buf = self._buf
            if len(buf.data) - buf.start >= self._max_line + 2:
                self._discarding_line = True
                return self._refuse(_Refuse(500, "5.5.2", "Line too long"), "", in_auth=in_auth)
            return NEED_DATA
        return self._refuse(_Refuse(500, "5.5.2", "Line too long"), "", in_auth=in_auth)

    def _dispatch(self, line: bytes) -> ServerEvent:
        in_auth = self.state is ServerState.AUTH
        verb = ""
        try:
            if _BAD_COMMAND_CHARS.search(line):
                raise _Refuse(500, "5.5.2", "Bare CR, LF or control character in command")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise _Refuse(500, "5.5.2", "Command is not valid UTF-8") from None
            if in_auth:
                return self._auth_response(text)
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            if verb not in _HANDLERS:  # ``in`` and a subscript: no call, unlike get()
                if verb in _NOT_IMPLEMENTED:
                    raise _Refuse(502, "5.5.1", "Command not implemented")
                raise _Refuse(500, "5.5.2", "Command unrecognized")
            if self._refused and verb != "QUIT":
                raise _Refuse(503, "5.5.1", "No service here; send QUIT")
            return _HANDLERS[verb](self, argument)
        except _Refuse as refusal:
            return self._refuse(refusal, verb, in_auth=in_auth)
        except LocalProtocolError:
            # An event refused a value the parser let through; answer, don't crash.
            return self._refuse(_Refuse(501, "5.5.4", "Invalid command arguments"), verb)

    @staticmethod
    def _no_argument(verb: str, argument: str) -> None:
        if argument.strip():
            raise _Refuse(501, "5.5.4", f"Syntax: {verb}")

    def _helo(self, argument: str, *, extended: bool) -> ServerEvent:
        name = argument.strip()
        if not name or " " in name:
            raise _Refuse(501, "5.5.4", f"Syntax: {'EHLO' if extended else 'HELO'} hostname")
        self._owe(_Kind.EHLO if extended else _Kind.HELO)
        return Ehlo(name) if extended else Helo(name)

    def _do_helo(self, argument: str) -> ServerEvent:
        return self._helo(argument, extended=False)

    def _do_ehlo(self, argument: str) -> ServerEvent:
        return self._helo(argument, extended=True)

    def _parse_params(
        self, text: str, allowed: frozenset[str], check: Callable[[str, str | None], None]
    ) -> dict[str, str | None]:
        if not text:
            return {}
        if text[0] != " ":
            raise _Refuse(501, "5.5.4", "Syntax error after the address")
        try:
            params = parse_esmtp_params(text)
        except ValueError as exc:
            raise _Refuse(501, "5.5.4", f"Invalid parameter: {exc}") from None
        if params and self._projected.hello != "EHLO":
            raise _Refuse(555, "5.5.4", "Parameters need EHLO")
        for keyword, value in params.items():
            if keyword not in allowed:
                raise _Refuse(555, "5.5.4", f"Unsupported parameter {keyword}")
            check(keyword, value)
        return params

    def _mail_params(self) -> frozenset[str]:
        """The MAIL parameters accepted now (REQUIRETLS depends on TLS)."""
        offered = self._offered
        allowed = set()
        if "SIZE" in offered:
            allowed.add("SIZE")
        if "8BITMIME" in offered:
            allowed.add("BODY")
        if "SMTPUTF8" in offered:
            allowed.add("SMTPUTF8")
        if "REQUIRETLS" in offered and self._tls_active:
            allowed.add("REQUIRETLS")
        if "DSN" in offered:
            allowed |= {"RET", "ENVID"}
        if self._auth_mechanisms:
            allowed.add("AUTH")
        return frozenset(allowed)

    def _check_mail_param(self, keyword: str, value: str | None) -> None:
        if keyword in ("SMTPUTF8", "REQUIRETLS"):
            if value is not None:
                raise _Refuse(501, "5.5.4", f"{keyword} takes no value")
            return
        if value is None:
            raise _Refuse(501, "5.5.4", f"{keyword} needs a value")
        if keyword == "SIZE":
            if not value.isascii() or not value.isdigit() or len(value) > 20:
                raise _Refuse(501, "5.5.4", "SIZE needs a number")
            if self._max_size is not None and int(value) > self._max_size:
                raise _Refuse(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif keyword == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise _Refuse(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
        elif keyword == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                raise _Refuse(501, "5.5.4", "RET must be FULL or HDRS")
        elif keyword == "ENVID":
            if len(value) > 100 or not _XTEXT_RE.fullmatch(value):
                raise _Refuse(501, "5.5.4", "ENVID must be xtext of at most 100 characters")
        elif keyword == "AUTH" and value != "<>" and not _XTEXT_RE.fullmatch(value):
            raise _Refuse(501, "5.5.4", "AUTH= must be xtext or <>")

    @staticmethod
    def _check_rcpt_param(keyword: str, value: str | None) -> None:
        if value is None:
            raise _Refuse(501, "5.5.4", f"{keyword} needs a value")
        if keyword == "NOTIFY":
            words = value.upper().split(",")
            if words != ["NEVER"] and (
                len(set(words)) != len(words) or not set(words) <= {"SUCCESS", "FAILURE", "DELAY"}
            ):
                raise _Refuse(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
        elif keyword == "ORCPT":
            addr_type, semicolon, address = value.partition(";")
            if not semicolon or not _ADDR_TYPE_RE.fullmatch(addr_type):
                raise _Refuse(501, "5.5.4", "ORCPT must be addr-type;xtext")
            if not address or len(value) > 500 or not _XTEXT_RE.fullmatch(address):
                raise _Refuse(501, "5.5.4", "ORCPT must be addr-type;xtext")

    def _do_mail(self, argument: str) -> ServerEvent:
        projected = self._projected
        if not projected.hello:
            raise _Refuse(503, "5.5.1", "Send EHLO or HELO first")
        if projected.mail:
            raise _Refuse(503, "5.5.1", "Nested MAIL command")
        plain = _PLAIN_FROM_RE.match(argument)
        if plain is not None:  # the usual sender: settled by one match
            address, end = plain.group(1), plain.end()
        else:
            address, end = self._path(
                argument, _FROM_RE, "MAIL FROM:<address>", "5.1.7", "Bad sender address syntax"
            )
        if address and "@" not in address:
            raise _Refuse(501, "5.1.7", "Bad sender address syntax")
        rest = argument[end:]
        params = (
            self._parse_params(rest, self._mail_allowed, self._check_mail_param) if rest else {}
        )
        if not address.isascii() and "SMTPUTF8" not in params:
            raise _Refuse(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
        event = Mail(address, params)
        # _owe(MAIL) inline (two calls for each of a message's commands): assumed accepted,
        # MAIL opens the projected transaction.
        self._owed.append(_Kind.MAIL)
        projected.mail = True
        projected.rcpts = 0
        return event

    def _do_rcpt(self, argument: str) -> ServerEvent:
        projected = self._projected
        if not projected.hello:
            raise _Refuse(503, "5.5.1", "Send EHLO or HELO first")
        if not projected.mail:
            raise _Refuse(503, "5.5.1", "Need MAIL command")
        plain = _PLAIN_TO_RE.match(argument)
        if plain is not None:  # the usual recipient: settled by one match
            address, end = plain.group(1), plain.end()
        else:
            address, end = self._path(
                argument, _TO_RE, "RCPT TO:<address>", "5.1.3", "Bad recipient address syntax"
            )
        if "@" not in address and address.lower() != "postmaster":
            raise _Refuse(501, "5.1.3", "Bad recipient address syntax")
        rest = argument[end:]
        params = (
            self._parse_params(rest, self._rcpt_allowed, self._check_rcpt_param) if rest else {}
        )
        event = Rcpt(address, params)
        self._owed.append(_Kind.RCPT)  # _owe(RCPT) inline: one more projected recipient
        projected.rcpts += 1
        return event

    @staticmethod
    def _path(
        argument: str, prefix_re: re.Pattern[str], syntax: str, enhanced: str, bad: str
    ) -> tuple[str, int]:
        """The address after ``FROM:`` / ``TO:`` by :func:`parse_path`, and where it ends;
        refused with ``Syntax: {syntax}`` without the prefix, or ``bad`` (``enhanced``)."""
        prefix = prefix_re.match(argument)
        if prefix is None:
            raise _Refuse(501, "5.5.4", f"Syntax: {syntax}")
        try:
            return parse_path(argument, prefix.end())
        except PathSyntaxError:
            raise _Refuse(501, enhanced, bad) from None

    def _do_data(self, argument: str) -> ServerEvent:
        projected = self._projected
        if not projected.hello:
            raise _Refuse(503, "5.5.1", "Send EHLO or HELO first")
        if not projected.mail:
            raise _Refuse(503, "5.5.1", "Need MAIL command")
        if not projected.rcpts:
            raise _Refuse(503, "5.5.1", "Need RCPT command")
        if argument:
            self._no_argument("DATA", argument)
        self._owed.append(_Kind.DATA)  # _owe(DATA) inline: DATA changes no session state
        return _DATA

    def _do_rset(self, argument: str) -> ServerEvent:
        self._no_argument("RSET", argument)
        self._owe(_Kind.RSET)
        return _RSET

    def _do_noop(self, argument: str) -> ServerEvent:
        self._owe(_Kind.OTHER)
        return Noop(argument)

    def _do_quit(self, argument: str) -> ServerEvent:
        self._no_argument("QUIT", argument)
        self._owe(_Kind.QUIT)
        return _QUIT

    def _do_vrfy(self, argument: str) -> ServerEvent:
        if not argument.strip():
            raise _Refuse(501, "5.5.4", "Syntax: VRFY string")
        self._owe(_Kind.OTHER)
        return Vrfy(argument)

    def _do_help(self, argument: str) -> ServerEvent:
        self._owe(_Kind.OTHER)
        return Help(argument)

    def _do_starttls(self, argument: str) -> ServerEvent:
        if "STARTTLS" not in self._offered:
            raise _Refuse(502, "5.5.1", "Command not implemented")
        if self._tls_active:
            raise _Refuse(503, "5.5.1", "TLS already active")
        if self._projected.hello != "EHLO":
            raise _Refuse(503, "5.5.1", "Send EHLO first")
        if self._projected.mail:
            raise _Refuse(503, "5.5.1", "STARTTLS not permitted during a mail transaction")
        self._no_argument("STARTTLS", argument)
        self._owe(_Kind.STARTTLS)
        return _STARTTLS

    # ---------------------------------------------------------------- AUTH (RFC 4954)

    def _do_auth(self, argument: str) -> ServerEvent:
        if not self._auth_mechanisms:
            raise _Refuse(502, "5.5.1", "Command not implemented")
        if self._auth_requires_tls and not self._tls_active:
            raise _Refuse(530, "5.7.0", "Must issue a STARTTLS command first")
        if self._projected.hello != "EHLO":
            raise _Refuse(503, "5.5.1", "Send EHLO first")
        if self._projected.authenticated:
            raise _Refuse(503, "5.5.1", "Already authenticated")
        if self._projected.mail:
            raise _Refuse(503, "5.5.1", "AUTH not permitted during a mail transaction")
        words = argument.split()
        if not 1 <= len(words) <= 2:
            raise _Refuse(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mechanism = words[0].upper()
        if mechanism not in self._auth_mechanisms:
            raise _Refuse(504, "5.5.4", "Unrecognized authentication type")
        self._auth_mechanism = mechanism
        self._auth_username = None
        if len(words) == 2:
            # RFC 4954 section 4: "=" is an empty initial response.
            event = self._auth_step(words[1])
            self._owe(_Kind.AUTH)
            return event
        self._owe(_Kind.AUTH)
        return self._challenge(_EMPTY_CHALLENGE if mechanism == "PLAIN" else _LOGIN_USERNAME)

    def _challenge(self, reply: Reply) -> AuthChallenge:
        self.state = ServerState.AUTH
        self._challenges += 1
        return AuthChallenge(self._auth_mechanism, reply)

    def _auth_response(self, text: str) -> ServerEvent:
        if text == "*":
            raise _Refuse(501, "5.0.0", "Authentication cancelled")
        return self._auth_step(text)

    def _auth_step(self, response: str) -> ServerEvent:
        try:
            decoded = b"" if response == "=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            raise _Refuse(501, "5.5.2", "Cannot Base64-decode client response") from None
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refuse(501, "5.5.2", "Client response is not UTF-8") from None
        self.state = ServerState.COMMAND
        if self._auth_mechanism == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3 or not parts[1]:
                raise _Refuse(501, "5.5.2", "Malformed PLAIN response")
            authzid, username, password = parts
            return AuthCredentials("PLAIN", username, password, authzid)
        if self._auth_username is None:
            self._auth_username = text
            return self._challenge(_LOGIN_PASSWORD)
        return AuthCredentials("LOGIN", self._auth_username, text)

    # ---------------------------------------------------------------- the body

    def _next_data_event(self) -> ServerEvent | Sentinel:
        """Emit the clean body bytes available, stopping at the end of data or a bare CR/LF.

        ``self._line_start`` says whether ``data[start]`` begins a line. A lone CR at the
        end of what arrived, or a line-initial ``.`` / ``.\\r`` that may still become the
        terminator, is held back until the next bytes show what it is.

        The common case -- a read's worth of CRLF lines -- is settled by a few C-level
        passes over the whole window, no Python per line: :meth:`_clean_end` finds where
        it ends (:func:`_crlf_dot` for a line-initial dot) and :func:`_no_bare_line_ending`
        checks it. Only a window that holds a bare CR or LF
        goes through the line-by-line walk (:meth:`_next_data_event_by_line`), which finds
        where it is. Measured with smtp-source, 10 KiB messages: the per-line walk was a
        fifth of egressd's CPU; ``scripts/bench machines``: the three ``count`` passes
        that replaced it took 15 us of the server's 45 us per 10 KiB message.
        """
        buf = self._buf
        start = buf.start
        end = self._clean_end(buf.data, start)
        if end is None:
            return self._next_data_event_by_line()
        if end < 0:
            buf.skip(3)
            return self._end_of_data(_END_OF_DATA)
        if end == start:
            return NEED_DATA
        self._line_start = buf.data[end - 1] == _LF  # a clean window never ends in CR|LF
        window, self._window = self._window, b""  # data[start:end], as _clean_end checked
        buf.skip(end - start)
        return DataChunk(window)  # the copy _clean_end checked: the bytes are not copied again

    def _clean_end(self, data: bytearray, start: int) -> int | None:
        """Where the next clean chunk ends: an index (``start`` if nothing can go yet), -1
        for the terminator at ``start``, or None when the window holds a bare CR or LF.

        The window stops before a line-initial dot (the terminator, or what may become it,
        starts a chunk) and before a CR that ends what arrived (is it CRLF? the next byte
        will tell). A clean window, ``data[start:end]``, is kept for
        :meth:`_next_data_event`, which emits it without copying it again."""
        limit = start + self._max_chunk
        size = len(data)
        if limit > size:
            limit = size
        if start >= limit:
            return start
        if self._line_start and data[start] == _DOT:
            tail = bytes(data[start : start + 3])
            if tail == b".\r\n":
                return -1
            if len(tail) < 3 and b".\r\n".startswith(tail):
                return start
        end = limit
        dot = _crlf_dot(data, start, limit)
        while dot >= 0:
            after = bytes(data[dot + 3 : dot + 5])
            if after == b"\r\n" or (len(after) < 2 and b"\r\n".startswith(after)):
                end = dot + 2
                break
            dot = _crlf_dot(data, dot + 3, limit)
        else:
            if data[end - 1] == _CR:
                end -= 1
        if end <= start:
            return start
        with memoryview(data) as view:
            window = bytes(view[start:end])
        if not _no_bare_line_ending(window):
            return None
        self._window = window
        return end

    def _next_data_event_by_line(self) -> ServerEvent | Sentinel:
        """:meth:`_next_data_event` line by line: for a window with a bare CR or LF."""
        buf = self._buf
        data = buf.data
        start = buf.start
        size = len(data)
        limit = min(size, start + self._max_chunk)
        pos = start
        while pos < limit:
            if self._line_start:
                if data[pos] == _DOT:
                    tail = bytes(data[pos : pos + 3])
                    if tail == b".\r\n":
                        if pos > start:
                            return self._chunk(pos)
                        buf.skip(3)
                        return self._end_of_data(_END_OF_DATA)
                    if len(tail) < 3 and b".\r\n".startswith(tail):
                        break
                self._line_start = False
            match = _CR_OR_LF.search(data, pos, limit)
            if match is None:
                pos = limit
                break
            found = match.start()
            if data[found] == _CR:
                if found + 1 >= limit:  # need the next byte (or it is past this chunk)
                    pos = found
                    break
                if data[found + 1] == _LF:
                    pos = found + 2
                    self._line_start = True
                    continue
            # A bare CR or a bare LF: emit what came before it, then refuse the message.
            if found > start:
                return self._chunk(found)
            self.state = ServerState.DISCARD
            return BareLineEnding(_BARE_REPLY)
        if pos > start:
            return self._chunk(pos)
        return NEED_DATA

    def _chunk(self, end: int) -> DataChunk:
        return DataChunk(self._buf.take(end - self._buf.start))

    def _end_of_data(self, event: EndOfData | DataDiscarded) -> EndOfData | DataDiscarded:
        self.state = ServerState.COMMAND
        self._buf.reset_scan()
        # _owe(END) inline (two calls a message): the end of data ends the projected
        # transaction, whatever its reply.
        self._owed.append(_Kind.END)
        projected = self._projected
        projected.mail = False
        projected.rcpts = 0
        return event

    def _discard_data(self) -> ServerEvent | Sentinel:
        """Swallow a refused body up to the real ``<CRLF>.<CRLF>``; bare CR/LF are text."""
        buf = self._buf
        data = buf.data
        size = len(data)
        pos = buf.start
        while pos < size:
            if self._line_start:
                if data[pos] == _DOT:
                    tail = bytes(data[pos : pos + 3])
                    if tail == b".\r\n":
                        buf.skip(pos + 3 - buf.start)
                        return self._end_of_data(DataDiscarded(_BARE_REPLY))
                    if len(tail) < 3 and b".\r\n".startswith(tail):
                        break
                self._line_start = False
            found = data.find(b"\r\n", pos)
            if found < 0:
                pos = size - 1 if data[size - 1] == _CR else size
                break
            pos = found + 2
            self._line_start = True
        buf.skip(pos - buf.start)
        return NEED_DATA


_HANDLERS: Final[Mapping[str, Callable[[SmtpServer, str], ServerEvent]]] = {
    "HELO": SmtpServer._do_helo,
    "EHLO": SmtpServer._do_ehlo,
    "MAIL": SmtpServer._do_mail,
    "RCPT": SmtpServer._do_rcpt,
    "DATA": SmtpServer._do_data,
    "RSET": SmtpServer._do_rset,
    "NOOP": SmtpServer._do_noop,
    "QUIT": SmtpServer._do_quit,
    "VRFY": SmtpServer._do_vrfy,
    "HELP": SmtpServer._do_help,
    "STARTTLS": SmtpServer._do_starttls,
    "AUTH": SmtpServer._do_auth,
}
