"""The text log format: ``key=value`` pairs, quoted exactly when a value needs it."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from egressd import log
from egressd.daemon import write_log_lines
from egressd.log import (
    _RENDERED,
    _RENDERED_LIMIT,
    HELD_BYTES,
    LOGGER_NAME,
    PROCESS_FIELDS,
    JournalStreamHandler,
    TextFormatter,
    _format_fields,
    _format_value,
    get_logger,
    log_fields,
    make_handler,
    setup_logging,
    stderr_is_journal,
)


def reference_format_value(value: object) -> str:
    """The rule as first written: quote an empty value or one with a space, '"' or '='."""
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def test_every_character_is_quoted_exactly_when_the_rule_says() -> None:
    for code in range(sys.maxunicode + 1):
        text = f"a{chr(code)}b"
        assert _format_value(text) == reference_format_value(text), hex(code)


@pytest.mark.parametrize(
    "value",
    ["", "ok", "127.0.0.1:25", "a b", 'say "hi"', "k=v", "tab\there", "nbsp\u00a0", 0, 5, -3,
     "250 2.0.0 Ok: queued as 4Zx", "a@b=250,c@d=550", "back\\slash x", "caf\u00e9 ok",
     True, None, 0.25, float("inf"), 1e-05, b"bytes"],
)  # fmt: skip
def test_values(value: object) -> None:
    assert _format_value(value) == reference_format_value(value)


def test_text_line() -> None:
    record = logging.LogRecord("egressd.session", logging.INFO, __file__, 1, "connection", (), None)
    record.fields = {"door": "socks5", "bytes_up": 5, "detail": "client went away", "empty": ""}
    assert TextFormatter().format(record) == (
        'info egressd.session: connection door=socks5 bytes_up=5 detail="client went away" empty=""'
    )


def test_text_values_rendered_before_are_rendered_alike_and_the_cache_stays_bounded() -> None:
    values = ["a b", "plain", "", 'q"', "k=v", "tab\there", "caf\u00e9 ok", "x" * 300]
    fields = {f"k{index}": value for index, value in enumerate(values)}
    expected = " ".join(f"{key}={reference_format_value(value)}" for key, value in fields.items())
    assert _format_fields(fields) == expected
    assert _format_fields(fields) == expected  # from the cache this time
    for number in range(_RENDERED_LIMIT + 10):  # more distinct values than it keeps
        assert _format_fields({"n": f"v {number}"}) == f'n="v {number}"'
    assert len(_RENDERED) <= _RENDERED_LIMIT
    assert _format_fields(fields) == expected


# --------------------------------------------------------------------------- journald


def record_at(level: int, message: str, created: float = 1_764_480_001.25) -> logging.LogRecord:
    record = logging.LogRecord("egressd.daemon", level, __file__, 1, message, (), None)
    record.created = created
    return record


def test_text_lines_carry_the_utc_time_when_not_under_journald() -> None:
    line = TextFormatter(timestamps=True).format(record_at(logging.INFO, "ready"))
    assert line == "2025-11-30T05:20:01.250Z info egressd.daemon: ready"


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        own = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{own.st_dev}:{own.st_ino}"}
        assert stderr_is_journal(env, stream.fileno())
        assert not stderr_is_journal(env, other.fileno())  # redirected: inherited variable
        assert not stderr_is_journal({}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream.fileno())


def journal_logger(stream: io.StringIO, socket_path: str) -> logging.Logger:
    handler = make_handler("text", journal=True, stream=stream)
    assert isinstance(handler, JournalStreamHandler)
    handler.journal_socket = socket_path
    logger = logging.getLogger(f"egressd.test-journal-{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def raise_and_log(logger: logging.Logger) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("handler crashed")


def test_under_journald_lines_carry_priorities_and_a_traceback_is_one_entry(
    tmp_path: Path,
) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    stream = io.StringIO()
    logger = journal_logger(stream, str(tmp_path / "journal"))
    logger.info("ready", extra={"fields": {"listeners": 2}})
    logger.warning("source suspended")
    logger.error("reload refused")
    logger.debug("detail")
    raise_and_log(logger)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<6>info egressd.test-journal-")
    assert lines[0].endswith(": ready listeners=2")  # no timestamp: journald adds it
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<7>"]
    entry = journal.recv(65536)
    journal.close()
    head, _, rest = entry.partition(b"MESSAGE\n")
    assert head == b"PRIORITY=3\nSYSLOG_IDENTIFIER=egressd\n"
    (length,) = struct.unpack("<Q", rest[:8])
    message = rest[8 : 8 + length].decode()
    assert rest[8 + length :] == b"\n"
    assert message.startswith("error egressd.test-journal-")
    assert "handler crashed\nTraceback (most recent call last):\n" in message
    assert message.endswith("RuntimeError: boom")


def test_without_the_native_socket_every_traceback_line_keeps_the_priority(
    tmp_path: Path,
) -> None:
    stream = io.StringIO()
    raise_and_log(journal_logger(stream, str(tmp_path / "absent")))
    lines = stream.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


# --------------------------------------------------------------------------- log_fields

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FIELDS = {"client": "127.0.0.1:2", "reply": "250 2.0.0 Ok", "size": 5, "duration": 0.25}


@pytest.fixture
def egressd_logger() -> Iterator[logging.Logger]:
    """The real ``egressd`` logger (log_fields' own route starts there), restored after."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    PROCESS_FIELDS.clear()


def routed(logger: logging.Logger, fmt: str, journal: bool) -> io.StringIO:
    stream = io.StringIO()
    logger.handlers = [make_handler(fmt, journal=journal, stream=stream)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return stream


@pytest.mark.parametrize(("fmt", "journal"), [("text", False), ("text", True), ("json", False)])
@pytest.mark.parametrize("worker", [None, 2])
def test_log_fields_writes_the_line_logging_writes(
    egressd_logger: logging.Logger, fmt: str, journal: bool, worker: int | None
) -> None:
    if worker is not None:
        PROCESS_FIELDS["worker"] = worker
    stream = routed(egressd_logger, fmt, journal)
    child = get_logger("smtp")
    child.info("transaction", extra={"fields": FIELDS})
    log_fields(child, logging.INFO, "transaction", dict(FIELDS))
    log_fields(child, logging.DEBUG, "transaction", dict(FIELDS))  # below the level: nothing
    through_logging, direct = TIME.sub("T", stream.getvalue()).splitlines()
    assert direct == through_logging
    assert ("worker" in direct) is (worker is not None)


class Collecting(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_log_fields_goes_through_logging_to_anyone_else_listening(
    egressd_logger: logging.Logger,
) -> None:
    stream = routed(egressd_logger, "text", False)
    listener = Collecting()
    child = get_logger("smtp")
    child.addHandler(listener)
    try:
        log_fields(child, logging.INFO, "transaction", dict(FIELDS))
    finally:
        child.removeHandler(listener)
    egressd_logger.handlers[0].addFilter(lambda record: record.getMessage() != "transaction")
    log_fields(child, logging.INFO, "transaction", dict(FIELDS))
    [record] = listener.records
    assert (record.getMessage(), getattr(record, "fields", None)) == ("transaction", FIELDS)
    assert stream.getvalue().count("transaction") == 1  # the filter dropped the second line


# --------------------------------------------------------------------------- held lines


class Writes(io.StringIO):
    """A stream that remembers each write (one write is one system call on stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stderr(egressd_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> Writes:
    """What :func:`setup` routes to (the flush interval restored after the test)."""
    monkeypatch.setattr(log, "_interval", 0.0)
    return Writes()


def setup(stream: Writes, fmt: str, flush_interval: float) -> None:
    """setup_logging to ``stream`` as stderr (pytest sets its own sys.stderr for the call
    itself, so a fixture's would not be seen)."""
    saved, sys.stderr = sys.stderr, stream
    try:
        setup_logging(fmt, "info", flush_interval)
    finally:
        sys.stderr = saved


def n_of(text: str) -> list[int]:
    return [int(n) for n in re.findall(r" n=(\d+)", text)]


def transaction(n: int, level: int = logging.INFO) -> None:
    log_fields(get_logger("smtp"), level, "transaction", {**FIELDS, "n": n})


async def test_lines_are_held_until_the_flush_interval_then_written_in_one_write(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_log_lines)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        transaction(1)
        await trio.sleep(0.3)
        transaction(2)
        assert stderr.writes == []
        while not stderr.writes:
            await trio.sleep(0.001)
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.002)
        [written] = stderr.writes
        assert n_of(written) == [1, 2]
        await trio.sleep(5)  # nothing held: the writer sleeps, nothing more is written
        assert len(stderr.writes) == 1
        transaction(3)  # held again, and written half a second later
        await trio.sleep(0.499)
        assert len(stderr.writes) == 1
        await trio.sleep(0.002)
        assert n_of(stderr.writes[1]) == [3]
        nursery.cancel_scope.cancel()


async def test_warnings_and_other_records_are_written_at_once_after_what_is_held(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_log_lines)
        await trio.testing.wait_all_tasks_blocked()
        transaction(1)
        transaction(2, logging.WARNING)
        assert n_of(stderr.getvalue()) == [1, 2]
        assert " warning egressd.smtp: transaction" in stderr.getvalue().splitlines()[1]
        transaction(3)
        get_logger("smtp").info("reload")  # through logging.Handler.emit
        assert re.findall(r"(?:n=\d+|reload)$", stderr.getvalue(), re.M)[2:] == ["n=3", "reload"]
        transaction(4)
        get_logger("smtp").error("broken")
        assert stderr.getvalue().rstrip().endswith("broken")
        assert n_of(stderr.getvalue()) == [1, 2, 3, 4]
        nursery.cancel_scope.cancel()


async def test_held_lines_are_written_when_the_writer_stops(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.5)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_log_lines)
            await trio.testing.wait_all_tasks_blocked()
            transaction(1)
            assert stderr.writes == []
            scope.cancel()  # shutdown, or a crash unwinding the run
    assert n_of(stderr.getvalue()) == [1]
    transaction(2)  # no writer: at once
    assert n_of(stderr.getvalue()) == [1, 2]


async def test_held_lines_are_written_at_a_reload_and_at_exit(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_log_lines)
        await trio.testing.wait_all_tasks_blocked()
        transaction(1)
        setup(stderr, "json", 0.5)  # a reload
        assert n_of(stderr.getvalue()) == [1]
        transaction(2)
        assert n_of(stderr.getvalue()) == [1]
        logging.shutdown()  # at exit (atexit), also after an uncaught exception
        assert stderr.getvalue().splitlines()[-1].endswith('"n": 2}')
        nursery.cancel_scope.cancel()


async def test_held_lines_go_out_before_they_pass_pipe_buf_each_write_whole_lines(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_log_lines)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(100):
            transaction(n)
        line = len(stderr.writes[0].splitlines(keepends=True)[0])
        assert len(stderr.writes) >= 2  # each write as full as whole lines make it:
        assert all(HELD_BYTES - line < len(write.encode()) <= HELD_BYTES for write in stderr.writes)
        assert all(write.endswith("\n") for write in stderr.writes)
        await trio.sleep(0.501)
        assert n_of(stderr.getvalue()) == list(range(100))
        nursery.cancel_scope.cancel()


async def test_a_flush_interval_of_0_writes_each_line_at_once(
    stderr: Writes, autojump_clock: trio.testing.MockClock
) -> None:
    setup(stderr, "text", 0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_log_lines)
        await trio.testing.wait_all_tasks_blocked()
        transaction(1)
        transaction(2)
        assert [n_of(write) for write in stderr.writes] == [[1], [2]]
        setup(stderr, "text", 0.5)  # a reload turns holding on
        transaction(3)
        assert n_of(stderr.getvalue()) == [1, 2]
        nursery.cancel_scope.cancel()
    assert n_of(stderr.getvalue()) == [1, 2, 3]
