"""Logging to stderr (journald takes it from there), human-readable or JSON lines.

Connection and transaction records are logged with ``extra={"fields": {...}}``: the text
formatter appends them as ``key=value`` pairs, the JSON formatter merges them into the object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "egressd"


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
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...`` (journald adds the timestamp)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, "fields", {}) or {}
        line = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
        if fields:
            line += " " + " ".join(
                [f"{key}={_format_value(value)}" for key, value in fields.items()]
            )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Route egressd's loggers to stderr in the chosen format; safe to call again on reload.

    The daemon logs a line per connection, so the record attributes no formatter here uses
    are switched off, as the logging HOWTO's "Optimization" section describes: the caller's
    file and line (a stack walk per record), thread, process and multiprocessing names.
    """
    logging._srcfile = None  # the HOWTO's documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
