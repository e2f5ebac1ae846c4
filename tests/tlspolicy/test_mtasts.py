"""MTA-STS's pure parts (RFC 8461): TXT record, policy file, MX patterns, cache decisions."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from egressd.tlspolicy import (
    CachedPolicy,
    MemoryPolicyStore,
    MtaStsError,
    MtaStsPolicy,
    configured_policy,
    mx_matches,
    parse_policy,
    parse_txt,
    tries,
    with_mta_sts,
)
from egressd.tlspolicy.mtasts import after_failed_fetch, next_step

POLICY = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\n"
    "max_age: 86400\r\n"
)


def test_the_rfc_example_policy_parses() -> None:
    policy = parse_policy(POLICY)
    assert policy == MtaStsPolicy("enforce", ("mx1.example.com", "*.example.net"), 86400)


def test_lf_line_ends_unknown_keys_and_repeated_keys() -> None:
    text = (
        "version: STSv1\nmode: testing\nmode: enforce\nfuture_key: x\n"
        "mx: MX.Example.COM.\nmax_age: 60\n"
    )
    assert parse_policy(text) == MtaStsPolicy("testing", ("mx.example.com",), 60)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmx: a.example\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1d\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "without any mx"),
        ("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: mx*.example\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n", "mx"),
        ("<html>not found</html>\n", "line 1"),
    ],
)
def test_an_invalid_policy_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(MtaStsError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mx1.example.com", "mx1.example.com", True),
        ("mx1.example.com", "MX1.Example.Com.", True),
        ("mx1.example.com", "mx2.example.com", False),
        ("*.example.net", "mx.example.net", True),
        ("*.example.net", "a.b.example.net", False),
        ("*.example.net", "example.net", False),
        ("*.example.net", "mx.example.network", False),
        ("*.example.net", "mxexample.net", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_the_txt_record_gives_the_id() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["something else", "v=STSv1;id=abc"]) == "abc"


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        ["v=STSv1; id=a;", "v=STSv1; id=b;"],
        ["v=STSv1;"],
        ["v=STSv1; id=not-alnum;"],
        ["v=STSv1; id=" + "a" * 33],
        ["id=abc; v=STSv1"],
    ],
)
def test_txt_records_that_announce_no_policy(records: list[str]) -> None:
    with pytest.raises(MtaStsError):
        parse_txt(records)


def test_the_cache_fetches_uses_and_refreshes_on_a_new_id() -> None:
    clock = FakeClock()
    store = MemoryPolicyStore()
    assert next_step(store.get("d.example"), "id1", clock()) == "fetch"
    store.put("d.example", CachedPolicy(parse_policy(POLICY), "id1", clock()))
    clock.advance(86399)
    assert next_step(store.get("d.example"), "id1", clock()) == "cached"
    assert next_step(store.get("d.example"), "id2", clock()) == "fetch"
    clock.advance(1)
    assert next_step(store.get("d.example"), "id1", clock()) == "fetch"  # max_age is over


def test_without_a_txt_record_only_a_fresh_cached_policy_applies() -> None:
    clock = FakeClock()
    entry = CachedPolicy(parse_policy(POLICY), "id1", clock())
    assert next_step(None, None, clock()) == "none"
    assert next_step(entry, None, clock()) == "cached"
    clock.advance(86400)
    assert next_step(entry, None, clock()) == "none"


def test_a_failed_fetch_keeps_a_fresh_cached_policy_only() -> None:
    clock = FakeClock()
    entry = CachedPolicy(parse_policy(POLICY), "id1", clock())
    assert after_failed_fetch(entry, clock()) == entry.policy
    assert after_failed_fetch(None, clock()) is None
    clock.advance(86400)
    assert after_failed_fetch(entry, clock()) is None


def test_the_memory_store_is_bounded() -> None:
    store = MemoryPolicyStore(capacity=2)
    entry = CachedPolicy(parse_policy(POLICY), "id1", 0.0)
    for domain in ("a.example", "b.example", "c.example"):
        store.put(domain, entry)
    assert store.get("a.example") is None
    assert store.get("c.example") == entry


# --------------------------------------------------------------------------- the choice


def test_enforce_requires_verified_tls_to_the_policy_mx_hosts() -> None:
    base = configured_policy("opportunistic", False)
    policy = with_mta_sts(base, parse_policy(POLICY), "example.com")
    assert (policy.label, policy.required, policy.verify, policy.testing) == (
        "mta-sts enforce",
        True,
        True,
        False,
    )
    assert policy.allows_mx("mx.example.net") and not policy.allows_mx("mx.evil.test")
    assert "MTA-STS policy of example.com (enforce" in policy.origin


def test_testing_checks_without_requiring_and_none_changes_nothing() -> None:
    base = configured_policy("opportunistic", False)
    testing = with_mta_sts(base, parse_policy(POLICY.replace("enforce", "testing")), "e.com")
    assert (testing.label, testing.required, testing.verify, testing.testing) == (
        "mta-sts testing",
        False,
        True,
        True,
    )
    none = parse_policy("version: STSv1\nmode: none\nmax_age: 5\n")
    assert with_mta_sts(base, none, "e.com") == base
    verify = configured_policy("opportunistic", True)
    assert with_mta_sts(verify, parse_policy(POLICY.replace("enforce", "testing")), "e") == verify


def test_an_override_wins_over_mta_sts() -> None:
    base = configured_policy("opportunistic", False, "none")
    assert with_mta_sts(base, parse_policy(POLICY), "e.com", overridden=True).label == "none"


@pytest.mark.parametrize(
    ("mode", "verify", "override", "label"),
    [
        ("opportunistic", False, None, "opportunistic"),
        ("required", False, None, "encrypt"),
        ("disabled", True, None, "none"),
        ("opportunistic", True, None, "verify"),
        ("disabled", False, "may", "opportunistic"),
        ("opportunistic", False, "encrypt", "encrypt"),
        ("opportunistic", False, "verify", "verify"),
        ("required", True, "none", "none"),
    ],
)
def test_configured_policies(mode: str, verify: bool, override: str | None, label: str) -> None:
    assert configured_policy(mode, verify, override).label == label


@pytest.mark.parametrize(
    ("mode", "verify", "expected"),
    [
        ("disabled", False, [(False, False, False)]),
        ("opportunistic", False, [(True, False, False), (False, False, False)]),
        ("required", False, [(True, False, True)]),
        ("opportunistic", True, [(True, True, True)]),
    ],
)
def test_the_tries_of_each_configured_policy(
    mode: str, verify: bool, expected: list[tuple[bool, bool, bool]]
) -> None:
    got = [(t.starttls, t.verify, t.required) for t in tries(configured_policy(mode, verify))]
    assert got == expected


def test_mta_sts_testing_verifies_then_encrypts_then_goes_plaintext() -> None:
    base = configured_policy("opportunistic", False)
    testing = with_mta_sts(base, parse_policy(POLICY.replace("enforce", "testing")), "e.com")
    got = [(t.starttls, t.verify, t.required) for t in tries(testing)]
    assert got == [(True, True, False), (True, False, False), (False, False, False)]
    enforce = with_mta_sts(base, parse_policy(POLICY), "e.com")
    assert [(t.starttls, t.verify, t.required) for t in tries(enforce)] == [(True, True, True)]
