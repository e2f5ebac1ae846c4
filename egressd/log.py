"""Logging to stderr, human-readable or JSON lines, in the form journald expects.

Connection and transaction records are logged with ``extra={"fields": {...}}``: the text
formatter appends them as ``key=value`` pairs, the JSON formatter merges them into the object.

Theory of operation
-------------------
Under systemd, stderr is a stream to journald, which timestamps each line itself and reads
a leading ``<N>`` as the line's syslog priority (sd-daemon(3): ``<3>`` error, ``<4>``
warning, ``<6>`` info, ``<7>`` debug), so ``journalctl -p warning`` shows suspensions and
refused reloads. systemd says stderr is its stream by setting ``JOURNAL_STREAM`` to the
stream's ``device:inode`` (systemd.exec(5)); egressd compares it with stderr's own
(:func:`stderr_is_journal`), because a child whose stderr was redirected inherits the
variable too. Elsewhere (a terminal, a file, a container runtime) each text line starts
with its UTC time instead.

journald splits a stream at every newline, so a traceback written there would become one
entry per line, most of them without a priority. A record of several lines is therefore
sent whole through journald's native protocol (one datagram to
:data:`JOURNAL_SOCKET`, MESSAGE in the binary-safe form of systemd's
native protocol); only if that fails is it written to the stream with every line carrying
the priority prefix.

The transaction line (one per relayed message) goes through :func:`log_fields`: when the
route to stderr is the one :func:`setup_logging` built (the ``egressd`` logger's one handler
and formatter of this module, no filters, no other handler on the way), it formats and
writes the line itself, the same bytes as ``logger.log(level, message, extra=...)`` would,
without a ``LogRecord`` and the handler chain (measured: 49 us a line through logging, 9 us
here). Any other route (a handler or filter someone added, a level turned off) takes the
ordinary ``logging`` call, so operators and tests configure it as usual.

Held lines
----------
Writing each transaction line at once cost one ``write`` system call per relayed message
(3.3% of the SMTP door's CPU). While the daemon runs its line writer (``hold_lines`` given
a writer by :func:`egressd.daemon.write_log_lines`, with ``[log] flush_interval`` above
zero), :func:`log_fields` lines below WARNING wait in the handler and go out together in
one write: ``flush_interval`` after the first of them (the writer sleeps that long when
woken), or at once when the next one would take them past :data:`HELD_BYTES`. A warning or
an error, and every record through :meth:`logging.Handler.emit`, writes what is held first
and then itself, at once, so order is kept and nobody tailing the journal waits for an
error. Held lines are also written at a reload (:func:`setup_logging`), when the writer
stops (shutdown, a crash unwinding the run) and at exit (``logging.shutdown`` flushes
every handler, also after an uncaught exception); only SIGKILL loses them (at most
``flush_interval`` of info lines). :data:`HELD_BYTES` is ``PIPE_BUF``: workers share their
supervisor's stderr, and a write to a pipe of at most ``PIPE_BUF`` bytes is never
interleaved with another process's (pipe(7)), so a worker's batch never cuts another's
line in two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

LOGGER_NAME = "egressd"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "egressd"


PROCESS_FIELDS: dict[str, Any] = {}
"""Fields every record of this process carries, after its own (a worker's ``worker=N``)."""


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


# ``\s`` in a str pattern is exactly ``str.isspace()`` (both use Py_UNICODE_ISSPACE).
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _format_value(value: object) -> str:
    """``value`` as it appears after ``key=``: JSON-quoted when empty or holding a space,
    a double quote or an equals sign, else as is."""
    if type(value) is int or type(value) is float:  # byte counts, durations: never quoted
        return str(value)
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return _quoted(text)
    return text


def _quoted(text: str) -> str:
    """``json.dumps(text)``; printable ASCII without ``"`` or ``\\`` (a reply, a list of
    recipients) needs no escape, so its quotes are added without the encoder's calls."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def _format_fields(fields: Mapping[str, Any]) -> str:
    """``key=value ...`` (:func:`_format_value` each). A text value is looked up among the
    ones already rendered (:data:`_RENDERED`): most of a transaction line's values are those
    of the line before (pool, source, addresses, sender), and a look-up costs a fifth of
    the pattern search; one list built in one expression, without a call per field."""
    known = _RENDERED.get
    return " ".join(
        [
            f"{key}={known(value) or _render_text(value)}"
            if type(value) is str
            else f"{key}={_format_value(value)}"
            for key, value in fields.items()
        ]
    )


_RENDERED: dict[str, str] = {}
"""Text values as :func:`_format_value` renders them, kept for the next lines (at most
:data:`_RENDERED_LIMIT`; forgotten all at once when full, so a value seen once in a while
costs a look-up and a render)."""
_RENDERED_LIMIT = 4096


def _render_text(text: str) -> str:
    rendered = _format_value(text)
    if len(_RENDERED) >= _RENDERED_LIMIT:
        _RENDERED.clear()
    _RENDERED[text] = rendered
    return rendered


def utc_timestamp(created: float) -> str:
    """``2026-11-30T05:40:01.123Z``: the JSON lines' ``time`` and the text lines' prefix."""
    whole = int(created)
    second = _last_second
    if second[0] != whole:  # formatted once per second, not once per line
        second = _remember_second(whole)
    return second[1] + _MILLISECONDS[int((created - whole) * 1000)]


def _remember_second(whole: int) -> tuple[int, str]:
    global _last_second
    _last_second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return _last_second


_last_second: tuple[int, str] = (-1, "")
_MILLISECONDS = [f".{milliseconds:03d}Z" for milliseconds in range(1000)]
"""Each line's ``.mmmZ``, made once (a format with a width per line was a third of the
time of a line's timestamp)."""


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...``, after the UTC time when ``timestamps``
    (not under journald, which adds its own)."""

    def __init__(self, *, timestamps: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, "fields", {}) or {}
        line = self.line(record.levelname, record.name, record.getMessage(), record.created, fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def line(
        self, levelname: str, name: str, message: str, created: float, fields: Mapping[str, Any]
    ) -> str:
        """The line of a record without exception (:func:`log_fields` calls it directly)."""
        if PROCESS_FIELDS:
            fields = {**fields, **PROCESS_FIELDS}
        line = f"{levelname.lower()} {name}: {message}"
        if self.timestamps:
            line = f"{utc_timestamp(created)} {line}"
        if fields:
            line += " " + _format_fields(fields)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = self._object(
            record.levelname,
            record.name,
            record.getMessage(),
            record.created,
            getattr(record, "fields", {}) or {},
        )
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)

    def line(
        self, levelname: str, name: str, message: str, created: float, fields: Mapping[str, Any]
    ) -> str:
        """The line of a record without exception (:func:`log_fields` calls it directly)."""
        return json.dumps(self._object(levelname, name, message, created, fields), default=str)

    @staticmethod
    def _object(
        levelname: str, name: str, message: str, created: float, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "time": utc_timestamp(created),
            "level": levelname.lower(),
            "logger": name,
            "message": message,
        }
        obj.update(fields)
        obj.update(PROCESS_FIELDS)
        return obj


def syslog_priority(levelno: int) -> int:
    """The sd-daemon priority of a logging level: 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def stderr_is_journal(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` is the journald stream that ``JOURNAL_STREAM`` names."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(fd)
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def journal_datagram(priority: int, message: str) -> bytes:
    """One native-protocol entry: PRIORITY, SYSLOG_IDENTIFIER and a MESSAGE of any lines."""
    data = message.encode("utf-8", "replace")
    return (
        f"PRIORITY={priority}\nSYSLOG_IDENTIFIER={SYSLOG_IDENTIFIER}\nMESSAGE\n".encode()
        + struct.pack("<Q", len(data))
        + data
        + b"\n"
    )


HELD_BYTES = select.PIPE_BUF
"""Held lines are written before they would pass this many bytes (see the module doc)."""

_waker: Callable[[], None] | None = None
"""While set, :func:`log_fields` lines below WARNING are held; called when the first one
is: :data:`_writer` while :data:`_interval` is above zero, else None."""
_writer: Callable[[], None] | None = None
_interval = 0.0


def hold_lines(writer: Callable[[], None] | None) -> None:
    """Hold :func:`log_fields` lines below WARNING from now on (while ``[log]
    flush_interval``, given to :func:`setup_logging`, is above zero) and call ``writer``
    (in the event loop's thread) when one is held while none was; its owner writes them
    :func:`held_interval` later with :func:`write_held_lines`. ``None``: write what is
    held and hold no more."""
    global _writer, _waker
    _writer = writer
    _waker = writer if _interval > 0 else None
    if writer is None:
        write_held_lines()


def held_interval() -> float:
    """``[log] flush_interval``: how long the first held line waits at most."""
    return _interval


def write_held_lines() -> None:
    """Write the lines held by the handler of :func:`setup_logging`, if any."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, LineHandler):
            handler.flush()


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """:class:`logging.StreamHandler` that also writes a formatted line for
    :func:`log_fields` (no record), or holds it (see the module doc)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.held: list[str] = []
        self.held_bytes = 0

    def write_line(self, text: str, levelno: int) -> None:
        """Write ``text`` (no newline inside) as :meth:`emit` would, or hold it; the lock
        is held (so the stream is flushed directly, not through :meth:`flush`)."""
        self.put(text + self.terminator, levelno)

    def put(self, line: str, levelno: int) -> None:
        """Hold ``line`` (with its newline) while lines are held and it is below WARNING;
        else write it after what is held."""
        if _waker is not None and levelno < logging.WARNING:
            size = len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
            if self.held_bytes + size > HELD_BYTES and self.held:
                self._write_held()
            self.held.append(line)
            self.held_bytes += size
            if len(self.held) == 1:
                _waker()
            return
        stream = self.stream
        if self.held:
            line = self._take_held() + line
        stream.write(line)
        stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self.held:  # what was held goes first (handle() holds the lock)
            self._write_held()
        super().emit(record)

    def flush(self) -> None:
        """Write what is held, then flush the stream (at exit ``logging.shutdown`` calls
        this)."""
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ made it
            # a closed or broken stream (what logging.shutdown ignores): nowhere to write them
            if self.held:
                with contextlib.suppress(OSError, ValueError):
                    self._write_held()
        super().flush()

    def _take_held(self) -> str:
        text = "".join(self.held)
        self.held.clear()
        self.held_bytes = 0
        return text

    def _write_held(self) -> None:
        stream = self.stream
        stream.write(self._take_held())
        stream.flush()


class JournalStreamHandler(LineHandler):
    """Lines with the ``<N>`` priority prefix; a record of several lines as one entry."""

    def __init__(self, stream: TextIO, journal_socket: str = JOURNAL_SOCKET) -> None:
        super().__init__(stream)
        self.journal_socket = journal_socket

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.held:  # what was held goes first (handle() holds the lock)
                self._write_held()
            text = self.format(record)
            priority = syslog_priority(record.levelno)
            if "\n" in text and self._send_native(priority, text):
                return
            prefix = f"<{priority}>"
            self.stream.write("".join(f"{prefix}{line}\n" for line in text.split("\n")))
            self.flush()
        except Exception:
            self.handleError(record)

    def write_line(self, text: str, levelno: int) -> None:
        self.put(f"<{syslog_priority(levelno)}>{text}\n", levelno)

    def _send_native(self, priority: int, text: str) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(journal_datagram(priority, text), self.journal_socket)
        except OSError:
            return False
        return True


def make_handler(fmt: str, *, journal: bool, stream: TextIO) -> logging.Handler:
    """The handler for ``[log] format``: journald's form when ``journal``, else plain
    lines (text ones timestamped)."""
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = TextFormatter(timestamps=not journal)
    handler = JournalStreamHandler(stream) if journal else LineHandler(stream)
    handler.setFormatter(formatter)
    return handler


def log_fields(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """``logger.log(level, message, extra={"fields": fields})``, written directly when the
    route is :func:`setup_logging`'s own (see the module doc): the same line either way."""
    if not logger.isEnabledFor(level):
        return
    handler = _own_route(logger, level)
    if handler is None:
        logger.log(level, message, extra={"fields": fields}, stacklevel=2)
        return
    formatter = handler.formatter
    assert isinstance(formatter, (TextFormatter, JsonFormatter))
    name = logger.name
    levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
    lock = handler.lock  # taken as handle() takes it (acquire() is two calls more)
    assert lock is not None  # Handler.__init__ made it
    with lock:
        try:
            text = formatter.line(levelname, name, message, time.time(), fields)
            if "\n" not in text:  # always so (values are quoted); else emit() knows what to do
                handler.write_line(text, level)
                return
        except Exception:
            record = logger.makeRecord(name, level, "(unknown file)", 0, message, (), None)
            handler.handleError(record)
            return
    logger.log(level, message, extra={"fields": fields}, stacklevel=2)


_LEVEL_NAMES = {level: logging.getLevelName(level) for level in (10, 20, 30, 40, 50)}
_OWN_FORMATTERS = (TextFormatter, JsonFormatter)


def _own_route(logger: logging.Logger, level: int) -> LineHandler | None:
    """The one handler a record of ``logger`` at ``level`` would reach, when it is one of
    this module's with one of its formatters and nothing else could see or filter the
    record on the way; else None."""
    if logger.handlers or logger.filters or logger.disabled or not logger.propagate:
        return None
    parent = logger.parent
    if (
        parent is None
        or parent.name != LOGGER_NAME
        or parent.propagate
        or parent.filters
        or parent.disabled
        or len(parent.handlers) != 1
    ):
        return None
    handler = parent.handlers[0]
    if (
        type(handler) not in (LineHandler, JournalStreamHandler)
        or handler.filters
        or level < handler.level
        or type(handler.formatter) not in _OWN_FORMATTERS
    ):
        return None
    assert isinstance(handler, LineHandler)
    return handler


def setup_logging(fmt: str = "text", level: str = "info", flush_interval: float = 0.0) -> None:
    """Route egressd's loggers to stderr in the chosen format; safe to call again on reload.

    Under journald (:func:`stderr_is_journal`) every line carries its priority prefix.

    The daemon logs a line per connection, so the record attributes no formatter here uses
    are switched off, as the logging HOWTO's "Optimization" section describes: the caller's
    file and line (a stack walk per record), thread, process and multiprocessing names.

    ``flush_interval``: how long a line may be held (see the module doc); 0 writes each
    line at once.
    """
    global _interval
    _interval = flush_interval
    logging._srcfile = None  # the HOWTO's documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    handler = make_handler(fmt, journal=stderr_is_journal(), stream=sys.stderr)
    for old in list(logger.handlers):
        old.flush()  # the lines it held
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    hold_lines(_writer)
