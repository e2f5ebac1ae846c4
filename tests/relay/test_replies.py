"""egressd's own replies to an MTA: a failure that may pass is a 4xx saying what and where."""

from __future__ import annotations

import pytest

from egressd.egress import EgressFailure, Failure
from egressd.relay import replies


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (Failure.UNKNOWN_POOL, "451 4.3.5 pool bulk: no such pool"),
        (Failure.NO_SOURCES, "451 4.4.5 pool bulk: no such pool"),
        (Failure.SOURCE_LIMIT, "451 4.4.5 pool bulk: no such pool"),
        (Failure.UNPLUMBED, "451 4.3.0 no such pool"),
        (Failure.PROXY_TIMEOUT, "451 4.3.0 no such pool"),
    ],
)
def test_an_egress_failure_is_a_4xx_that_says_whether_the_pool_or_the_source_failed(
    kind: Failure, expected: str
) -> None:
    failure = EgressFailure(kind, "no such pool")
    reply = replies.egress_failure("bulk", failure.kind.value, str(failure))
    assert reply.to_bytes() == expected.encode() + b"\r\n"


def test_a_made_up_reply_never_holds_a_line_break() -> None:
    reply = replies.no_mail_server('source "a" (192.0.2.1)', "x.test", ["one\r\nRCPT", "two\n"])
    assert reply.to_bytes().count(b"\r\n") == 1
    assert reply.code == 451
    assert reply.enhanced == "4.4.1"


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("no_such_domain", b"550 5.1.2"),
        ("null_mx", b"556 5.1.10"),
        ("no_mail_host", b"550 5.4.4"),
        ("bad_literal", b"501 5.1.3"),
        ("dns_failure", b"451 4.4.3"),
        ("no_address", b"451 4.4.4"),
    ],
)
def test_next_hop_failures_by_kind(kind: str, code: bytes) -> None:
    reply = replies.next_hop_failure(kind, "x.test: why")
    assert reply.to_bytes() == code + b" x.test: why\r\n"


@pytest.mark.parametrize(("in_data", "text"), [(True, "the message body"), (False, "a command")])
def test_an_mta_timeout_is_a_421_naming_what_was_awaited(in_data: bool, text: str) -> None:
    reply = replies.mta_timeout("relay.test", in_data)
    assert reply.to_bytes() == f"421 4.4.2 relay.test timeout waiting for {text}\r\n".encode()


def test_an_egress_failure_told_to_an_unauthenticated_client_names_no_pool() -> None:
    reply = replies.egress_failure("bulk", "no_sources", "every source is suspended")
    assert replies.pool_unnamed(reply, "bulk").to_bytes() == (
        b"451 4.4.5 every source is suspended\r\n"
    )
    other = replies.egress_failure("bulk", "unplumbed", "127.0.0.9 is not plumbed")
    assert replies.pool_unnamed(other, "bulk") == other


def test_the_greeting_carries_no_enhanced_status_code() -> None:
    # RFC 2034 section 4: enhanced codes only after the client's EHLO asked for them.
    assert replies.greeting("relay.test").to_bytes() == b"220 relay.test ESMTP egressd\r\n"
