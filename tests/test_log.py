"""The text log format: ``key=value`` pairs, quoted exactly when a value needs it."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from egressd.log import TextFormatter, _format_value


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
