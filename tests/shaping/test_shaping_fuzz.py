"""Any document gives either shaping files or a ShapingError listing findings: never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.shaping.files import ShapingError, load_shaping_data
from egressd.shaping.params import ENFORCED, MTA_KEYS, TABLES

KEYS = [
    *ENFORCED,
    *TABLES,
    "provider_connection_limit",
    "provider_max_message_rate",
    "provider_source_selection_rate",
    "match",
    "sources",
    "automation",
    "replace_base",
    "mx_rollup",
    "regex",
    "action",
    "trigger",
    "duration",
    "Threshold",
    "SetConfig",
    "MXSuffix",
    "Network",
    "name",
    "value",
    sorted(MTA_KEYS)[0],
    "x",
]
scalars = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["10/s", "3/5m", "local:5", "1_000", "Suspend", "(", "2 hours", "", ".a."]),
    st.text(max_size=8),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    ),
    max_leaves=20,
)
documents = st.dictionaries(
    st.sampled_from(["default", "provider", "a.example", "b"]),
    st.one_of(values, st.dictionaries(st.sampled_from(["p", "q"]), values, max_size=2)),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(documents)
def test_any_document_loads_or_fails_cleanly(document: dict[str, Any]) -> None:
    try:
        files = load_shaping_data("fuzz.toml", document)
    except ShapingError as exc:
        assert exc.findings
        assert all(f.level == "error" and f.file == "fuzz.toml" for f in exc.findings)
    else:
        assert all(f.level != "error" for f in files.findings)
