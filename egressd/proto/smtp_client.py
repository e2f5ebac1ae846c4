"""Sans-IO SMTP client machine: egressd's side of the conversation with the remote MX.

Theory of operation
-------------------
The relay opens a connection from the chosen source address to the recipient domain's mail
server and drives it with this machine, in h11's manner::

    wire = client.send(Ehlo("out1.example"))   # a command -> bytes to write
    client.receive_data(chunk)                 # bytes from the remote; b"" at EOF
    event = client.next_event()                # Reply, ConnectionClosed or NEED_DATA

Replies (RFC 5321 section 4.2)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A reply is one or more lines ``250-text`` ... ``250 text`` with the same code; it comes out
as one :class:`~egressd.proto.smtp_common.Reply` holding every line, so the relay can hand it
to the MTA unchanged (``reply.to_bytes()``, ``reply.enhanced`` for the RFC 2034 code). *Any*
code from 200 to 599 is a reply, never a violation: a 421 may arrive at any moment,
unsolicited, and is reported like any other reply (the machine is then CLOSED: RFC 5321
section 3.8 says the server is closing). Lines may end in CRLF or, leniently, a bare LF;
the text never holds a CR or LF, so re-serializing can never inject a line toward the MTA.

What breaks the protocol beyond repair is raised by ``next_event()`` as
:class:`~egressd.proto.smtp_common.RemoteProtocolError` (the same error on every later call;
the machine is in ERROR): a line that is not ``[2-5]dd[ -]text``, a line longer than
``max_line`` octets, more than ``max_lines`` lines in one reply, a continuation line whose
code differs, a bare CR, a reply when no command awaits one (other than 421: the relay could
no longer pair replies with commands), or bytes after the 220 to STARTTLS.

Commands and pipelining (RFC 2920)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
:meth:`SmtpClient.send` takes the same command events the server machine emits (so a
:class:`~egressd.proto.smtp_common.Mail` from the MTA can be passed on) and records which
reply each awaits; replies are matched in order. Without PIPELINING in the remote's EHLO
reply one command at a time may be outstanding; with it, commands may be queued, except
after EHLO, HELO, DATA, NOOP, QUIT and STARTTLS, which RFC 2920 section 3.1 makes the last of
a group. Misuse (MAIL before EHLO, a command after QUIT, ...) raises
:class:`~egressd.proto.smtp_common.LocalProtocolError`: it is a bug in egressd.

MAIL and RCPT carry only the ESMTP parameters the remote advertised (RFC 5321 section
4.1.1.11): SIZE needs SIZE (RFC 1870), BODY needs 8BITMIME (RFC 6152), SMTPUTF8 needs
SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT need DSN (RFC 3461), AUTH= needs AUTH
(RFC 4954), REQUIRETLS needs REQUIRETLS (RFC 8689); others are dropped
(:func:`filter_mail_params`, :func:`filter_rcpt_params`).
Dropping SMTPUTF8 or BODY=8BITMIME would change the message, which a cut-through relay cannot
convert, so :func:`mail_incompatibility` tells the driver which reply to give the MTA instead.

The body
~~~~~~~~
After the 354 the relay writes the body octets directly, as the server machine gave them
(dot-stuffed, CRLF lines), optionally through ``send(DataChunk(...))`` which returns them
unchanged, then ``send(EndOfData())``, which returns ``b".\\r\\n"`` and awaits the final reply.

STARTTLS (RFC 3207)
~~~~~~~~~~~~~~~~~~~
After the 220 the driver calls :meth:`SmtpClient.start_tls`: it raises
:class:`~egressd.proto.smtp_common.RemoteProtocolError` if the remote already sent more
plaintext (response injection, the CVE-2011-0411 class), else it forgets the advertised
extensions and requires a new EHLO; the driver then starts the handshake.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from egressd.proto.smtp_common import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    NEED_DATA,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    LocalProtocolError,
    Mail,
    Noop,
    Quit,
    Rcpt,
    ReceiveBuffer,
    RemoteProtocolError,
    Reply,
    Rset,
    Sentinel,
    StartTls,
    format_params,
    parse_ehlo_extensions,
)

__all__ = [
    "ClientCommand",
    "ClientEvent",
    "ClientState",
    "SmtpClient",
    "filter_mail_params",
    "filter_rcpt_params",
    "mail_incompatibility",
]

ClientCommand = (
    Helo | Ehlo | Mail | Rcpt | Data | Rset | Noop | Quit | StartTls | DataChunk | EndOfData
)
ClientEvent = Reply | ConnectionClosed

# Which EHLO keyword each parameter needs.
_MAIL_PARAM_NEEDS: Final = {
    "SIZE": "SIZE",
    "BODY": "8BITMIME",
    "SMTPUTF8": "SMTPUTF8",
    "RET": "DSN",
    "ENVID": "DSN",
    "AUTH": "AUTH",
    "REQUIRETLS": "REQUIRETLS",
}
_RCPT_PARAM_NEEDS: Final = {"NOTIFY": "DSN", "ORCPT": "DSN"}


def filter_mail_params(
    params: Mapping[str, str | None], extensions: Mapping[str, str]
) -> dict[str, str | None]:
    """The MAIL parameters the remote supports (by its EHLO ``extensions``), in order."""
    return {
        keyword: value
        for keyword, value in params.items()
        if _MAIL_PARAM_NEEDS.get(keyword.upper()) in extensions
    }


def filter_rcpt_params(
    params: Mapping[str, str | None], extensions: Mapping[str, str]
) -> dict[str, str | None]:
    """The RCPT parameters the remote supports: NOTIFY and ORCPT with DSN, nothing else."""
    return {
        keyword: value
        for keyword, value in params.items()
        if _RCPT_PARAM_NEEDS.get(keyword.upper()) in extensions
    }


def _max_size(extensions: Mapping[str, str]) -> int | None:
    value = extensions.get("SIZE", "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


def mail_incompatibility(mail: Mail, extensions: Mapping[str, str]) -> Reply | None:
    """A reply for the MTA if this remote cannot take the message as the MTA declared it.

    Cut-through cannot downgrade a message, so: SMTPUTF8 to a remote without it is refused
    (RFC 6531 section 3.2, ``553 5.6.7``); BODY=8BITMIME to a remote without 8BITMIME is
    refused (RFC 6152 section 3, ``554 5.6.3``); a declared SIZE above the remote's fixed
    maximum is refused (RFC 1870 section 6.1, ``552 5.3.4``); REQUIRETLS to a remote that
    does not offer it is refused (RFC 8689, ``550 5.7.30``; the caller shows
    REQUIRETLS only for a remote reached over verified TLS). None if all is well.
    """
    params = mail.params
    if not params and mail.address.isascii():
        return None  # the usual MAIL: it declares nothing a remote could lack
    if "REQUIRETLS" in params and "REQUIRETLS" not in extensions:
        return Reply.make(
            550,
            "REQUIRETLS: the remote is not reached over verified TLS with REQUIRETLS",
            enhanced="5.7.30",
        )
    if ("SMTPUTF8" in params or not mail.address.isascii()) and "SMTPUTF8" not in extensions:
        return Reply.make(553, "Remote server does not support SMTPUTF8", enhanced="5.6.7")
    body = params.get("BODY")
    if body is not None and body.upper() == "8BITMIME" and "8BITMIME" not in extensions:
        return Reply.make(554, "Remote server does not support 8BITMIME", enhanced="5.6.3")
    size = params.get("SIZE")
    limit = _max_size(extensions)
    if size is not None and size.isdigit() and limit is not None and int(size) > limit:
        return Reply.make(552, "Message size exceeds the remote server's maximum", enhanced="5.3.4")
    return None


class ClientState(enum.Enum):
    GREETING = "GREETING"  # waiting for the remote's greeting
    READY = "READY"  # sending commands
    BODY = "BODY"  # 354 received: the relay writes the body
    TLS = "TLS"  # 220 to STARTTLS received; waiting for start_tls()
    CLOSED = "CLOSED"  # QUIT answered or 421 received
    ERROR = "ERROR"  # the remote broke the protocol


class _Await(enum.Enum):
    """What an awaited reply answers."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DOT = "end of data"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"


# RFC 2920 section 3.1: these end a pipelined group (the greeting comes first anyway). A
# tuple: membership by identity, without Enum.__hash__ (a Python call) per command sent.
_GROUP_ENDERS: Final = (
    _Await.GREETING,
    _Await.EHLO,
    _Await.HELO,
    _Await.DATA,
    _Await.NOOP,
    _Await.QUIT,
    _Await.STARTTLS,
)
_CLOSED: Final = ConnectionClosed()  # no fields: one instance does for every session
_VIOLATION_REPLY: Final = Reply.make(451, "Remote server broke the SMTP protocol", enhanced="4.5.0")


#: How many one-line replies a client machine keeps by their line (:meth:`SmtpClient._remember`).
_SEEN_REPLIES: Final = 32
#: The start of a reply line: its code, then the end, a space or a hyphen.
_REPLY_CODE_RE: Final = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\Z)")


class SmtpClient:
    """The SMTP client machine (egressd facing the remote MX). See the module docstring."""

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        if max_line < 64 or max_lines < 1:
            raise LocalProtocolError("max_line must be at least 64 and max_lines at least 1")
        self._max_line = max_line
        self._max_lines = max_lines
        self._buf = ReceiveBuffer(b"\n")
        self._state = ClientState.GREETING
        self._awaiting: deque[_Await] = deque([_Await.GREETING])
        self._lines: list[str] = []  # lines of the reply being read
        self._code = 0  # its code
        self._extensions: dict[str, str] = {}
        self._hello = False
        self._mail = False  # a MAIL was sent and its transaction not ended (as far as we know)
        self._rcpts = 0  # RCPTs sent in this transaction
        self._quit_sent = False
        self._violation: RemoteProtocolError | None = None
        #: One-line replies by their line as received (:meth:`_remember`).
        self._seen: dict[bytes, Reply] = {}

    # ---------------------------------------------------------------- public properties

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def extensions(self) -> Mapping[str, str]:
        """What the remote's last successful EHLO advertised (keyword -> parameters)."""
        return MappingProxyType(self._extensions)

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self._extensions

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self._extensions

    @property
    def max_size(self) -> int | None:
        """The remote's SIZE limit (RFC 1870), or None if it declared none."""
        return _max_size(self._extensions)

    @property
    def awaiting_replies(self) -> int:
        """How many replies the remote still owes."""
        return len(self._awaiting)

    # ---------------------------------------------------------------- h11-style API

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the remote; ``b""`` means EOF (repeating it is harmless).

        Bytes after EOF are a caller bug (LocalProtocolError).
        """
        buf = self._buf
        if not data:
            buf.closed = True
        elif buf.closed:
            raise LocalProtocolError("receive_data() after EOF")
        elif self._state is not ClientState.CLOSED and self._state is not ClientState.ERROR:
            if buf.start:
                buf.feed(data)
            else:  # nothing consumed to drop: feed() without its call
                buf.data += data

    def next_event(self) -> ClientEvent | Sentinel:
        """The next Reply (or ConnectionClosed), or ``NEED_DATA``.

        Raises RemoteProtocolError when the remote broke the protocol beyond repair, then the
        same error on every later call.
        """
        if self._violation is not None:
            raise self._violation
        if self._state is ClientState.CLOSED:
            return _CLOSED
        buf = self._buf
        if not buf.data or (buf.start and len(buf.data) <= buf.start):
            # Nothing to parse (the usual call after a send): an empty buffer, or one
            # consumed to its end, told without len() while possible.
            return _CLOSED if buf.closed else NEED_DATA
        if self._state is ClientState.TLS:
            raise self._fail("plaintext after the 220 to STARTTLS (CVE-2011-0411 class)")
        event: ClientEvent | Sentinel
        if not self._lines:  # a reply's first line: maybe one seen before (_remember), here
            line = buf.take_line()
            if line is None:
                event = self._no_line()
            else:
                seen = self._seen  # a lookup by ``in``, not get(): no call for a miss or a hit
                event = self._on_reply(seen[line]) if line in seen else self._next_reply(line)
        else:
            event = self._next_reply(None)
        if event is NEED_DATA and buf.closed:
            return _CLOSED
        return event

    def send(self, command: ClientCommand) -> bytes:
        """The bytes for ``command``; the machine then awaits its reply."""
        state = self._state
        if state is ClientState.CLOSED or state is ClientState.ERROR or self._quit_sent:
            raise LocalProtocolError(f"cannot send {command!r}: the session is over")
        if type(command) is DataChunk:  # by exact type: the body's pieces first
            if state is not ClientState.BODY:
                raise LocalProtocolError("the body may only be sent after a 354 to DATA")
            return command.data
        kind = type(command)
        if kind is EndOfData or kind is DataChunk:
            if state is not ClientState.BODY:
                raise LocalProtocolError("the body may only be sent after a 354 to DATA")
            if isinstance(command, DataChunk):
                return command.data
            self._state = ClientState.READY
            self._mail = False
            self._rcpts = 0
            self._awaiting.append(_Await.DOT)
            return b".\r\n"
        if state is ClientState.BODY:
            raise LocalProtocolError(f"cannot send {command!r} inside the body")
        if state is ClientState.TLS:
            raise LocalProtocolError("call start_tls() after the 220 to STARTTLS")
        if self._awaiting:
            last = self._awaiting[-1]
            if last in _GROUP_ENDERS:
                raise LocalProtocolError(f"{command!r} cannot follow {last.value} unanswered")
            if "PIPELINING" not in self._extensions:
                raise LocalProtocolError("the remote did not advertise PIPELINING")
        # The transaction's commands (three per message) are told apart first, by exact
        # type (the events are final), each straight to its own line.
        if type(command) is Rcpt:
            line, awaits = self._rcpt_line(command)
        elif type(command) is Mail:
            line, awaits = self._mail_line(command)
        elif kind is Data:
            line, awaits = self._data_line()
        else:
            line, awaits = self._session_line(command)
        self._awaiting.append(awaits)
        return line.encode("utf-8") + b"\r\n"

    def start_tls(self) -> None:
        """Call after the 220 to STARTTLS, before the handshake (see the module docstring)."""
        if self._state is not ClientState.TLS:
            raise LocalProtocolError("start_tls() only after a 220 reply to STARTTLS")
        if len(self._buf):
            self._fail("plaintext after the 220 to STARTTLS (CVE-2011-0411 class)")
            raise RemoteProtocolError("plaintext after the 220 to STARTTLS", _VIOLATION_REPLY)
        self._buf.reset_scan()
        self._extensions = {}
        self._hello = False
        self._state = ClientState.READY

    # ---------------------------------------------------------------- commands

    def _need_utf8(self, text: str) -> None:
        if "SMTPUTF8" not in self._extensions:
            raise LocalProtocolError("non-ASCII command but the remote lacks SMTPUTF8")

    def _mail_line(self, command: Mail) -> tuple[str, _Await]:
        if not self._hello:
            raise LocalProtocolError(f"{command!r} needs a successful EHLO or HELO first")
        if self._mail:
            raise LocalProtocolError("MAIL inside a mail transaction")
        line = f"MAIL FROM:<{command.address}>"
        if command.params:
            line += format_params(filter_mail_params(command.params, self._extensions))
        if not line.isascii():
            self._need_utf8(line)
        self._mail = True
        self._rcpts = 0
        return line, _Await.MAIL

    def _rcpt_line(self, command: Rcpt) -> tuple[str, _Await]:
        if not self._mail:  # a MAIL needed a successful EHLO or HELO
            raise LocalProtocolError(f"{command!r} needs MAIL first")
        line = f"RCPT TO:<{command.address}>"
        if command.params:
            line += format_params(filter_rcpt_params(command.params, self._extensions))
        if not line.isascii():
            self._need_utf8(line)
        self._rcpts += 1
        return line, _Await.RCPT

    def _data_line(self) -> tuple[str, _Await]:
        if not self._mail:
            raise LocalProtocolError("DATA needs MAIL first")
        if not self._rcpts:
            raise LocalProtocolError("DATA needs RCPT first")
        return "DATA", _Await.DATA

    def _session_line(self, command: ClientCommand) -> tuple[str, _Await]:
        """The commands outside a transaction's MAIL, RCPT and DATA."""
        if isinstance(command, Ehlo):
            return f"EHLO {command.name}", _Await.EHLO
        if isinstance(command, Helo):
            return f"HELO {command.name}", _Await.HELO
        if isinstance(command, Rset):
            self._mail = False
            self._rcpts = 0
            return "RSET", _Await.RSET
        if isinstance(command, Noop):
            return (f"NOOP {command.argument}" if command.argument else "NOOP"), _Await.NOOP
        if isinstance(command, Quit):
            self._quit_sent = True
            return "QUIT", _Await.QUIT
        if isinstance(command, Mail):  # a subclass: send() tells the events by exact type
            return self._mail_line(command)
        if isinstance(command, Rcpt):
            return self._rcpt_line(command)
        if isinstance(command, Data):
            return self._data_line()
        if not self._hello:
            raise LocalProtocolError(f"{command!r} needs a successful EHLO or HELO first")
        if isinstance(command, StartTls):
            if "STARTTLS" not in self._extensions:
                raise LocalProtocolError("the remote did not advertise STARTTLS")
            if self._mail:
                raise LocalProtocolError("STARTTLS inside a mail transaction")
            return "STARTTLS", _Await.STARTTLS
        raise LocalProtocolError(f"the client machine does not send {command!r}")

    # ---------------------------------------------------------------- replies

    def _fail(self, description: str) -> RemoteProtocolError:
        self._violation = RemoteProtocolError(description, _VIOLATION_REPLY)
        self._state = ClientState.ERROR
        return self._violation

    def _no_line(self) -> Sentinel:
        """No whole reply line yet: wait for more, unless what came is already too long."""
        buf = self._buf
        if len(buf.data) - buf.start > self._max_line + 1:
            raise self._fail(f"reply line longer than {self._max_line} octets")
        return NEED_DATA

    def _next_reply(self, first: bytes | None) -> ClientEvent | Sentinel:
        """Read reply lines, from ``first`` (already taken from the buffer) if given, up to
        the end of a reply."""
        buf = self._buf
        line = first
        while True:
            if line is None:
                line = buf.take_line()
                if line is None:
                    return self._no_line()
                if not self._lines and line in self._seen:  # a whole reply before
                    return self._on_reply(self._seen[line])
            wire = line
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > self._max_line:
                raise self._fail(f"reply line longer than {self._max_line} octets")
            if b"\r" in line:
                raise self._fail("bare CR in a reply line")
            if _REPLY_CODE_RE.match(line) is None:
                raise self._fail(f"malformed reply line {line[:80]!r}")
            code = int(line[:3])
            text = line[4:].decode("utf-8", "surrogateescape")
            more = line[3:4] == b"-"
            if not more and not self._lines:  # a one-line reply: most of them
                return self._on_reply(self._remember(wire, Reply(code, (text,))))
            if self._lines and code != self._code:
                raise self._fail(f"reply code changed from {self._code} to {code} mid-reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > self._max_lines:
                raise self._fail(f"reply longer than {self._max_lines} lines")
            if not more:
                reply = Reply(code, tuple(self._lines))
                self._lines = []
                return self._on_reply(reply)
            line = None

    def _remember(self, wire: bytes, reply: Reply) -> Reply:
        """Keep a one-line reply by its line as it came (most remotes answer MAIL, RCPT and
        DATA with the same line every time): when that line comes again it is this same
        immutable reply, without parsing, checking and serializing it anew. A few dozen
        lines at most: the memory is cleared when full."""
        seen = self._seen
        if len(seen) >= _SEEN_REPLIES:
            seen.clear()
        seen[wire] = reply
        return reply

    def _on_reply(self, reply: Reply) -> ClientEvent:
        code = reply.code
        if code == 421:
            self._state = ClientState.CLOSED
            self._awaiting.clear()
            return reply
        if not self._awaiting:
            raise self._fail(f"unsolicited reply {reply.to_bytes()[:80]!r}")
        awaited = self._awaiting.popleft()
        success = code < 300
        if awaited is _Await.RCPT or awaited is _Await.DOT:
            pass  # the transaction's state moved when the command was sent
        elif awaited is _Await.GREETING:
            self._state = ClientState.READY
        elif awaited is _Await.EHLO and success:
            self._extensions = parse_ehlo_extensions(reply)
            self._hello = True
        elif awaited is _Await.HELO and success:
            self._extensions = {}
            self._hello = True
        elif awaited is _Await.MAIL and not success:
            self._mail = False
        elif awaited is _Await.DATA and code == 354:
            self._state = ClientState.BODY
        elif awaited is _Await.STARTTLS and success:
            self._state = ClientState.TLS
        elif awaited is _Await.QUIT:
            self._state = ClientState.CLOSED
        return reply
