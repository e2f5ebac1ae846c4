"""Pieces shared by egressd's two sans-IO SMTP machines (server side and client side).

Theory of operation
-------------------
egressd relays SMTP *cut-through*: :class:`~egressd.proto.smtp_server.SmtpServer` speaks to the
MTA, :class:`~egressd.proto.smtp_client.SmtpClient` speaks to the remote MX, and the driver in
``egressd.doors`` moves events between them. Like h11, neither machine does I/O:
``receive_data(bytes)`` feeds one (``b""`` means EOF), ``next_event()`` returns an event or a
:class:`Sentinel` (``NEED_DATA``: feed more bytes; ``PAUSED``: a reply is owed first), and
``send(...)`` returns the bytes to write.

This module holds what both sides agree on:

* the command events (:class:`Helo`, :class:`Ehlo`, :class:`Mail`, :class:`Rcpt`, :class:`Data`,
  :class:`Rset`, :class:`Noop`, :class:`Quit`, :class:`Vrfy`, :class:`Help`, :class:`StartTls`).
  The server machine emits them; the client machine serializes them, so a :class:`Mail` parsed
  from the MTA can be handed to the client as is. They validate themselves (no CR, LF or other
  control character can reach the wire through them), so a malformed one cannot exist;
* the body events :class:`DataChunk` and :class:`EndOfData`;
* :class:`Reply`, one SMTP reply with every line of text (RFC 5321 section 4.2), which
  re-serializes to CRLF lines so a remote reply can be handed to the MTA unchanged, and knows
  its RFC 2034 / RFC 3463 enhanced status code;
* :func:`parse_ehlo_extensions` (RFC 5321 section 4.1.1.1) and :func:`ehlo_reply`;
* :func:`parse_path` (RFC 5321 section 4.1.2 ``Path``, with the ``A-d-l`` source route that a
  server MUST accept and SHOULD ignore) and the ``esmtp-param`` syntax (section 4.1.2);
* :class:`ReceiveBuffer`, a byte buffer that consumes from the front without copying and
  remembers how far a search for a line end already looked, so a trickle of single bytes costs
  linear, not quadratic, time;
* the error types, those of every machine (:mod:`egressd.proto.machine`, which also defines
  ``NEED_DATA`` and ``PAUSED``). :class:`LocalProtocolError` means *we* misused a machine (a
  programming error); :class:`RemoteProtocolError` means the peer broke the protocol:
  ``next_event()`` raises it (and ``start_tls()`` when plaintext followed STARTTLS), and the
  machine then sits in ERROR, raising the same error on every later ``next_event()``.

Limits (RFC 5321 section 4.5.3.1): command lines 512 octets, text lines 1000, reply lines 512.
Real MTAs exceed the first two (ESMTP parameters, long header lines), so the machines take
headroom: :data:`MAX_COMMAND_LINE` and :data:`MAX_REPLY_LINE` are hard caps, and body lines are
not limited at all because the body is streamed in bounded chunks, never held whole.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final

from egressd.proto import machine
from egressd.proto.machine import NEED_DATA as NEED_DATA
from egressd.proto.machine import PAUSED as PAUSED
from egressd.proto.machine import LocalProtocolError as LocalProtocolError
from egressd.proto.machine import ProtocolError
from egressd.proto.machine import Sentinel as Sentinel

# RFC 5321 section 4.5.3.1 limits, and the caps egressd actually enforces.
RFC5321_COMMAND_LINE: Final = 512
RFC5321_TEXT_LINE: Final = 1000
RFC5321_REPLY_LINE: Final = 512
#: Longest command line (without CRLF) the server machine accepts.
MAX_COMMAND_LINE: Final = 4096
#: Longest reply line (without its line end) the client machine accepts.
MAX_REPLY_LINE: Final = 2048
#: Most lines in one (multi-line) reply the client machine accepts.
MAX_REPLY_LINES: Final = 128
#: Largest DataChunk the server machine emits.
DATA_CHUNK_SIZE: Final = 64 * 1024


#: Base of the errors the SMTP machines raise: the one base of every machine in egressd.proto.
SmtpError = ProtocolError


class RemoteProtocolError(machine.RemoteProtocolError["Reply"]):
    """The peer broke the protocol beyond repair; the machine is now in its ERROR state.

    ``next_event()`` raises it, then raises the same error on every later call; ``start_tls()``
    raises it when plaintext bytes followed STARTTLS. ``description`` says what the peer did;
    ``reply`` is a hint for what to tell the *other* side (or the peer) before closing, or
    None if the connection should just be closed.
    """

    def __init__(self, description: str, reply: Reply | None = None) -> None:
        super().__init__(description, reply)
        self.description = description


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------

_ENHANCED_RE: Final = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


@functools.lru_cache(maxsize=512)
def _enhanced_fits(enhanced: str, code_class: int) -> bool:
    """``enhanced`` is an RFC 3463 code of class ``code_class`` (cached: egressd builds its
    replies from a few dozen codes, several per message)."""
    return bool(_ENHANCED_RE.fullmatch(enhanced)) and enhanced[0] == str(code_class)


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code and every line of its text (without code or separator).

    ``lines`` holds the text after ``"250-"`` / ``"250 "`` of each line, so
    ``Reply(250, ("mx.example", "PIPELINING", "SIZE 10240000"))`` is the three-line EHLO
    reply. Text that was not UTF-8 on the wire is kept with ``surrogateescape`` so that
    :meth:`to_bytes` gives back the exact octets. The code may be any value from 200 to 599:
    a machine never treats a code as a protocol violation.
    """

    code: int
    lines: tuple[str, ...] = ("",)

    #: The serialized reply, made with it: most replies are sent (the remote's to the MTA),
    #: many several times (egressd's own are built once and cached, see
    #: :mod:`egressd.relay.replies`), and the reply stays immutable.
    _wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # The usual reply (an int code, a tuple of ASCII lines) passes with type checks and
        # C-level string searches only; anything else gets the precise checks and errors.
        code, lines = self.code, self.lines
        if not (type(code) is int and 200 <= code <= 599 and type(lines) is tuple and lines):
            _check_reply(code, lines)
        for line in lines:
            if type(line) is not str or "\r" in line or "\n" in line or not line.isascii():
                _check_reply(code, lines)
                break
        object.__setattr__(self, "_wire", _serialize(code, lines))

    @classmethod
    def make(cls, code: int, *texts: str, enhanced: str | None = None) -> Reply:
        """Build a reply; with ``enhanced`` every line starts with that status code.

        ``Reply.make(250, "Ok", enhanced="2.1.0")`` is ``250 2.1.0 Ok`` (RFC 2034 section 4
        puts the enhanced code on every line of a multi-line reply).
        """
        lines = texts or ("",)
        if enhanced is not None:
            if not _enhanced_fits(enhanced, code // 100):
                raise LocalProtocolError(f"enhanced code {enhanced!r} does not fit {code}")
            lines = tuple(f"{enhanced} {text}" if text else enhanced for text in lines)
        return cls(code, tuple(lines))

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code ("5.1.1") the first line starts with, if any.

        Only a code whose class digit matches the reply code's first digit counts
        (RFC 2034 section 4).
        """
        match = _ENHANCED_RE.match(self.lines[0])
        if match is None or match.group(1) != str(self.code)[0]:
            return None
        return match.group(0)

    @property
    def text(self) -> str:
        """All lines joined with newlines (for logs and error messages)."""
        return "\n".join(self.lines)

    @property
    def is_success(self) -> bool:
        """2yz: positive completion."""
        return self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3yz: positive intermediate (334 for AUTH, 354 for DATA)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4yz: transient negative completion."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5yz: permanent negative completion."""
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """Serialize as CRLF lines: ``250-a`` ... ``250 z``.

        An empty last line is written as the bare code (``"250"``, RFC 5321 section 4.2).
        """
        return self._wire


def _check_reply(code: object, lines: object) -> None:
    """The checks :class:`Reply` makes of its fields, with the precise error."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise LocalProtocolError(f"reply code must be an int, not {code!r}")
    if not 200 <= code <= 599:
        raise LocalProtocolError(f"reply code {code} is outside 200..599")
    if not isinstance(lines, tuple) or not lines:
        raise LocalProtocolError("reply lines must be a non-empty tuple of str")
    for line in lines:
        if not isinstance(line, str) or "\r" in line or "\n" in line:
            raise LocalProtocolError(f"invalid reply line {line!r}")
        if line.isascii():
            continue
        try:
            line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"unencodable reply line {line!r}") from exc


def _serialize(code: int, lines: tuple[str, ...]) -> bytes:
    if len(lines) == 1:  # most replies
        line = lines[0]
        text = f"{code} {line}\r\n" if line else f"{code}\r\n"
        return text.encode("utf-8", "surrogateescape")
    out: list[str] = []
    last = len(lines) - 1
    for index, line in enumerate(lines):
        if index < last:
            out.append(f"{code}-{line}\r\n")
        elif line:
            out.append(f"{code} {line}\r\n")
        else:
            out.append(f"{code}\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")


_KEYWORD_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def parse_ehlo_extensions(reply: Reply) -> dict[str, str]:
    """The extensions an EHLO reply advertises: ``{"SIZE": "10240000", "PIPELINING": ""}``.

    RFC 5321 section 4.1.1.1: the first line is the server's domain (and greeting); every
    further line is an ``ehlo-keyword`` optionally followed by parameters. Keywords are
    upper-cased; the parameters are kept as one string. Lines that are not a keyword
    (including the legacy ``AUTH=PLAIN`` form) are skipped. A non-2xx reply advertises nothing.
    """
    if not reply.is_success:
        return {}
    return _parse_extension_lines(reply.lines[1:])


def _parse_extension_lines(lines: Sequence[str]) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if _KEYWORD_RE.fullmatch(keyword):
            extensions[keyword.upper()] = params.strip()
    return extensions


def ehlo_reply(domain: str, extensions: Sequence[str] = (), greeting: str = "") -> Reply:
    """The 250 reply to EHLO: ``250-domain greeting`` then one line per extension."""
    first = f"{domain} {greeting}" if greeting else domain
    return Reply(250, (first, *extensions))


# --------------------------------------------------------------------------------------------
# Paths and ESMTP parameters (RFC 5321 section 4.1.2)
# --------------------------------------------------------------------------------------------


class PathSyntaxError(ValueError):
    """A reverse-path or forward-path that does not parse."""


def _is_control(char: str) -> bool:
    return char < " " or char == "\x7f"


# A path of plain characters only: no control character, space, quote, backslash or angle
# bracket inside. The character loop below gives the same result for it; this settles the
# usual address in one C-level match (it runs for every MAIL and RCPT, twice: the parser,
# then the event's own check).
_SIMPLE_PATH_RE: Final = re.compile(r'<([^\x00-\x20\x7f"<>\\]*)>')


def parse_path(text: str, pos: int = 0) -> tuple[str, int]:
    """Parse ``<address>`` starting at ``text[pos]``; return the address and the end index.

    Quoted local parts (``"a b"@x``, with backslash escapes) may hold spaces and angle
    brackets. A source route (``<@relay:user@example>``) is dropped. ``<>`` gives ``""``.
    Control characters, unquoted spaces and a stray ``<`` are errors. Whether the address
    has an ``@`` is left to the caller.
    """
    simple = _SIMPLE_PATH_RE.match(text, pos)
    if simple is not None and not text.startswith("@", pos + 1):
        return simple.group(1), simple.end()
    return _parse_path_by_char(text, pos)


def _parse_path_by_char(text: str, pos: int) -> tuple[str, int]:
    """:func:`parse_path` for any path: quotes, source routes, and the precise error."""
    if pos >= len(text) or text[pos] != "<":
        raise PathSyntaxError("path must start with '<'")
    index = pos + 1
    quoted = False
    while True:
        if index >= len(text):
            raise PathSyntaxError("path is missing its closing '>'")
        char = text[index]
        if _is_control(char):
            raise PathSyntaxError("control character in path")
        if quoted:
            if char == "\\":
                index += 1
                if index >= len(text) or _is_control(text[index]):
                    raise PathSyntaxError("bad quoted-pair in path")
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            break
        elif char in " <":
            raise PathSyntaxError(f"unexpected {char!r} in path")
        index += 1
    address = text[pos + 1 : index]
    if address.startswith("@"):
        route_end = address.find(":")
        if route_end < 0:
            raise PathSyntaxError("source route without ':'")
        address = address[route_end + 1 :]
    return address, index + 1


# An address that is a path of plain characters (:data:`_SIMPLE_PATH_RE`) and does not start
# with a source route: :func:`_check_address` accepts it in one C-level match.
_PLAIN_ADDRESS_RE: Final = re.compile(r'[^\x00-\x20\x7f"<>\\@][^\x00-\x20\x7f"<>\\]*')


def _check_address(address: str, *, allow_empty: bool) -> None:
    if type(address) is str and _PLAIN_ADDRESS_RE.fullmatch(address):
        return
    if not isinstance(address, str):
        raise LocalProtocolError(f"address must be a str, not {address!r}")
    if not address and not allow_empty:
        raise LocalProtocolError("address must not be empty")
    try:
        parsed, end = parse_path(f"<{address}>")
    except PathSyntaxError as exc:
        raise LocalProtocolError(f"invalid address {address!r}: {exc}") from None
    if parsed != address or end != len(address) + 2:
        raise LocalProtocolError(f"invalid address {address!r}")


_PARAM_VALUE_RE: Final = re.compile(r"[^\x00-\x20\x7f=]+")


def parse_esmtp_params(text: str) -> dict[str, str | None]:
    """Parse ``SIZE=123 BODY=8BITMIME SMTPUTF8`` into ``{"SIZE": "123", ..., "SMTPUTF8": None}``.

    Keywords are upper-cased; values keep their case. Raises ValueError for a malformed
    parameter or a keyword given twice.
    """
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        keyword, equals, value = token.partition("=")
        if not _KEYWORD_RE.fullmatch(keyword):
            raise ValueError(f"bad parameter keyword {keyword!r}")
        if equals and not _PARAM_VALUE_RE.fullmatch(value):
            raise ValueError(f"bad value for parameter {keyword}")
        key = keyword.upper()
        if key in params:
            raise ValueError(f"parameter {key} given twice")
        params[key] = value if equals else None
    return params


_NO_PARAMS: Final[Mapping[str, str | None]] = MappingProxyType({})


def _freeze_params(params: Mapping[str, str | None]) -> Mapping[str, str | None]:
    if not params:
        return _NO_PARAMS  # read-only, so every command without parameters can share it
    frozen: dict[str, str | None] = {}
    for keyword, value in params.items():
        if not isinstance(keyword, str) or not _KEYWORD_RE.fullmatch(keyword):
            raise LocalProtocolError(f"bad ESMTP parameter keyword {keyword!r}")
        if value is not None and (
            not isinstance(value, str) or not _PARAM_VALUE_RE.fullmatch(value)
        ):
            raise LocalProtocolError(f"bad value for ESMTP parameter {keyword}: {value!r}")
        if keyword.upper() in frozen:
            raise LocalProtocolError(f"ESMTP parameter {keyword} given twice")
        frozen[keyword.upper()] = value
    return MappingProxyType(frozen)


def format_params(params: Mapping[str, str | None]) -> str:
    """``{"SIZE": "1", "SMTPUTF8": None}`` -> ``" SIZE=1 SMTPUTF8"`` (leading space)."""
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


# --------------------------------------------------------------------------------------------
# Records: the events made per message
# --------------------------------------------------------------------------------------------


class Record:
    """Base of the events made for every message (MAIL, RCPT, the body's pieces here, the
    relay core's events and commands): a slotted object with one plain ``__init__`` that
    validates its values, equal, hashed and printed by its fields as a frozen dataclass is.

    A frozen dataclass sets each field with ``object.__setattr__`` (a call per field) and
    validates in a second function, ``__post_init__``; a message makes about twenty such
    events between the two machines and the relay core. A record's attributes are
    ``Final``, so mypy refuses to assign them as it refuses a frozen dataclass's.
    ``_fields`` names, in order, what equality, hashing and ``repr`` use.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join([f"{name}={getattr(self, name)!r}" for name in self._fields])
        return f"{self.__class__.__name__}({fields})"


# --------------------------------------------------------------------------------------------
# Command events: emitted by the server machine, accepted by the client machine's send()
# --------------------------------------------------------------------------------------------

_DOMAIN_RE: Final = re.compile(r"[^\x00-\x20\x7f]+")
_ARGUMENT_BAD_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_domain(verb: str, name: str) -> None:
    if not isinstance(name, str) or not _DOMAIN_RE.fullmatch(name):
        raise LocalProtocolError(f"{verb} needs one domain or address literal, not {name!r}")


def _check_argument(verb: str, argument: str) -> None:
    if not isinstance(argument, str) or _ARGUMENT_BAD_RE.search(argument):
        raise LocalProtocolError(f"invalid {verb} argument {argument!r}")


@dataclass(frozen=True)
class Helo:
    """``HELO name`` (RFC 5321 section 4.1.1.1)."""

    name: str

    def __post_init__(self) -> None:
        _check_domain("HELO", self.name)


@dataclass(frozen=True)
class Ehlo:
    """``EHLO name`` (RFC 5321 section 4.1.1.1)."""

    name: str

    def __post_init__(self) -> None:
        _check_domain("EHLO", self.name)


class Mail(Record):
    """``MAIL FROM:<address> params``; ``address`` is ``""`` for the null reverse-path.

    ``params`` maps upper-cased ESMTP keywords to their value, or None for a keyword without
    one (``SMTPUTF8``): RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 RET/ENVID,
    RFC 4954 AUTH. It is read-only. A :class:`Record`: one is made per message.
    """

    __slots__ = ("address", "params")
    _fields = ("address", "params")

    def __init__(self, address: str, params: Mapping[str, str | None] = _NO_PARAMS) -> None:
        if type(address) is not str or not _PLAIN_ADDRESS_RE.fullmatch(address):
            _check_address(address, allow_empty=True)
        self.address: Final = address
        self.params: Final = _freeze_params(params) if params else _NO_PARAMS

    def __hash__(self) -> int:
        return hash((Mail, self.address))  # the parameters are a mapping: not hashed


class Rcpt(Record):
    """``RCPT TO:<address> params`` (RFC 3461 NOTIFY and ORCPT are the usual params).
    A :class:`Record`: one is made per recipient."""

    __slots__ = ("address", "params")
    _fields = ("address", "params")

    def __init__(self, address: str, params: Mapping[str, str | None] = _NO_PARAMS) -> None:
        if type(address) is not str or not _PLAIN_ADDRESS_RE.fullmatch(address):
            _check_address(address, allow_empty=False)
        self.address: Final = address
        self.params: Final = _freeze_params(params) if params else _NO_PARAMS

    def __hash__(self) -> int:
        return hash((Rcpt, self.address))  # the parameters are a mapping: not hashed


@dataclass(frozen=True)
class Data:
    """``DATA``."""


@dataclass(frozen=True)
class Rset:
    """``RSET``."""


@dataclass(frozen=True)
class Noop:
    """``NOOP [string]``."""

    argument: str = ""

    def __post_init__(self) -> None:
        _check_argument("NOOP", self.argument)


@dataclass(frozen=True)
class Quit:
    """``QUIT``."""


@dataclass(frozen=True)
class Vrfy:
    """``VRFY string``."""

    argument: str

    def __post_init__(self) -> None:
        _check_argument("VRFY", self.argument)
        if not self.argument:
            raise LocalProtocolError("VRFY needs an argument")


@dataclass(frozen=True)
class Help:
    """``HELP [string]``."""

    argument: str = ""

    def __post_init__(self) -> None:
        _check_argument("HELP", self.argument)


@dataclass(frozen=True)
class StartTls:
    """``STARTTLS`` (RFC 3207)."""


class DataChunk(Record):
    """A piece of the message body as it is on the wire: still dot-stuffed, CRLF lines.

    The server machine emits them in order; concatenated they are exactly the octets the MTA
    sent after the 354, up to but excluding the terminating ``.<CRLF>``. Written to the
    remote followed by ``.\\r\\n`` they reproduce the MTA's DATA stream octet for octet.
    A :class:`Record`: one or more are made per message.
    """

    __slots__ = ("data",)
    _fields = ("data",)

    def __init__(self, data: bytes) -> None:
        if type(data) is not bytes and not isinstance(data, bytes):
            raise LocalProtocolError("DataChunk.data must be bytes")
        self.data: Final = data

    def __repr__(self) -> str:
        return f"DataChunk(<{len(self.data)} bytes>)"


@dataclass(frozen=True)
class EndOfData:
    """The MTA sent the terminating ``<CRLF>.<CRLF>``; the body is complete and clean."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its sending side (EOF), or the session is over (QUIT, 421)."""


class ReceiveBuffer:
    """Incoming bytes, consumed from the front, with a remembered search position.

    ``data[start:]`` is the unconsumed part. Consuming only moves ``start``; the consumed
    prefix is dropped when it is at least half the buffer, so each byte is copied a bounded
    number of times. :meth:`find` resumes where the previous unsuccessful search stopped.
    While ``start`` is 0 there is nothing to drop, and a machine appends to ``data`` itself
    (:meth:`take_line` empties a buffer it consumed whole, so that is the usual case).
    ``line_end`` is what ends a line for :meth:`take_line` (CRLF for commands, LF for
    replies, which may end leniently in a bare LF).
    """

    __slots__ = ("_line_end", "_line_end_size", "_scan", "closed", "data", "start")

    def __init__(self, line_end: bytes = b"\r\n") -> None:
        if not line_end:
            raise LocalProtocolError("a line must end in something")
        self.data = bytearray()
        self.start = 0
        self._scan = 0
        self.closed = False
        self._line_end = line_end
        self._line_end_size = len(line_end)  # once, not at each line

    def __len__(self) -> int:
        return len(self.data) - self.start

    def feed(self, chunk: bytes) -> None:
        if self.start and self.start * 2 >= len(self.data):
            del self.data[: self.start]
            self._scan -= self.start
            self.start = 0
        self.data += chunk

    def find(self, separator: bytes) -> int:
        """Offset (from ``start``) of ``separator``, or -1. Use one separator per buffer
        between calls to :meth:`reset_scan`."""
        index = self.data.find(separator, max(self.start, self._scan))
        if index < 0:
            self._scan = max(self.start, len(self.data) - len(separator) + 1)
            return -1
        return index - self.start

    def take_line(self) -> bytes | None:
        """The bytes up to the next line end, consumed with it; None when there is none
        yet (the next search resumes where this one stopped). :meth:`find`, :meth:`take` and
        :meth:`skip` in one call: it runs for every command and reply line."""
        data = self.data
        start = self.start
        scan = self._scan
        index = data.find(self._line_end, scan if scan > start else start)
        size = len(data)
        if index < 0:
            scan = size - self._line_end_size + 1
            self._scan = scan if scan > start else start
            return None
        line = bytes(data[start:index])
        end = index + self._line_end_size
        if end == size:  # all consumed (lock-step, the usual case): start afresh, so
            del data[:]  # the next receive_data() appends without a call to feed()
            end = 0
        self.start = self._scan = end
        return line

    def reset_scan(self) -> None:
        self._scan = self.start

    def take(self, count: int) -> bytes:
        # One copy through a memoryview (a bytearray slice would be a second); the view is
        # released at once, so the buffer can still grow.
        start = self.start
        with memoryview(self.data) as view:
            chunk = bytes(view[start : start + count])
        self.skip(count)
        return chunk

    def skip(self, count: int) -> None:
        self.start += count
        if self._scan < self.start:
            self._scan = self.start
