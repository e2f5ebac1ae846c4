"""KumoMTA's value grammars, read once for config/ and shaping/."""

from __future__ import annotations

import pytest

from egressd.config import parse_duration as config_duration
from egressd.kumo_grammar import GrammarError, Throttle, parse_duration_text, parse_throttle
from egressd.shaping.durations import parse_duration as shaping_duration


def test_a_decimal_count_only_where_the_caller_allows_it() -> None:
    """humantime (KumoMTA) has whole counts; egressd's own keys also take "0.5s"."""
    with pytest.raises(GrammarError) as caught:
        parse_duration_text("1.5h")
    assert caught.value.problem == "syntax"
    assert parse_duration_text("1.5h", decimals=True) == 5400.0
    assert config_duration("0.5s") == 0.5
    with pytest.raises(ValueError, match="is not a duration"):
        shaping_duration("0.5s")


def test_both_callers_read_the_same_durations() -> None:
    for text in ("90m", "1h 30m", "2 hours", "250ms", "1M", "3 days"):
        assert config_duration(text) == shaping_duration(text) == parse_duration_text(text)


def test_throttle_specs_as_kumomta_reads_them() -> None:
    assert parse_throttle("local:1_000/5m,max_burst=1,0") == Throttle(1000, 300, 10, True)
    for text, problem in (("3", "no_slash"), ("0/h", "zero_quantity"), ("3/0m", "zero_period")):
        with pytest.raises(GrammarError) as caught:
            parse_throttle(text)
        assert caught.value.problem == problem
