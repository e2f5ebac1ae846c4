"""The relay core and the per-message shaping budgets, as transcripts.

The remote's budget is a real :class:`~egressd.shaping.Lease` of a real
:class:`~egressd.shaping.Shaper` on a fake clock: the core sees it only through
``Remote.budget`` (:class:`~egressd.relay.events.MessageBudget`).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from fake_clock import FakeClock
from relay_transcript import GOOD, MAIL, MAIL_OK, OK, QUEUED, RCPT, RCPT2, B, core, play, remote

from egressd.proto.smtp_common import Data, DataChunk, EndOfData, Reply
from egressd.relay import replies
from egressd.relay.core import RelayCore
from egressd.relay.events import (
    AskSelection,
    CloseRemote,
    MtaCommand,
    MtaEndOfData,
    NextHopResolved,
    OpenRemote,
    Remote,
    RemoteOpened,
    RemoteReplied,
    ReplyMta,
    ResolveNextHop,
    SelectionAnswered,
    SendRemote,
    TransactionEnded,
    TransactionStarted,
)
from egressd.shaping import Lease, Shaper
from egressd.shaping.files import load_shaping_data
from egressd.shaping.policy import ShapingPolicy
from egressd.shaping.sites import Destination

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

CHUNK = DataChunk(b"Subject: x\r\n\r\nbody\r\n")
GO_AHEAD = Reply.make(354, "End data with <CR><LF>.<CR><LF>")
SITE = Destination("mx.good.test", "good.test", ("mx.good.test",))


def shaper(text: str) -> tuple[Shaper, FakeClock]:
    clock = FakeClock()
    files = load_shaping_data("shaping.toml", tomllib.loads(text))
    return Shaper(ShapingPolicy.from_files(files, {}), clock), clock


def leased(the_shaper: Shaper, source: str = "a") -> tuple[Remote, Lease]:
    lease = the_shaper.open(source, SITE)
    assert isinstance(lease, Lease), lease
    return replace(remote(), budget=lease), lease


def message(relay: RelayCore, *opening: object) -> None:
    """MAIL, then RCPT with ``opening`` (the steps up to the MAIL FROM and RCPT TO that
    go out), then DATA and a delivered body."""
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            *opening,  # type: ignore[arg-type]
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((GO_AHEAD,)),
            ReplyMta(GO_AHEAD),
        MtaEndOfData((CHUNK,)),
            SendRemote((CHUNK, EndOfData()), "end of data"),
        RemoteReplied((QUEUED,)),
            TransactionEnded("main", "delivered", QUEUED, len(CHUNK.data)),
            ReplyMta(QUEUED),
    )  # fmt: skip


def test_a_connection_that_carried_max_deliveries_is_quit_and_a_fresh_one_opened() -> None:
    the_shaper, _ = shaper('["default"]\nmax_deliveries_per_connection = 2\n')
    relay = core()
    first, first_lease = leased(the_shaper)
    message(relay, OpenRemote("main", "good.test"), RemoteOpened(first))
    message(relay, ResolveNextHop("good.test", 4), NextHopResolved(GOOD))  # kept: 2nd message
    assert first_lease.messages == 2
    second, second_lease = leased(the_shaper)
    message(
        relay,
        ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
        CloseRemote(polite=True),  # QUIT: it has carried its 2 (a new one starts afresh)
        OpenRemote("main", "good.test"),
        RemoteOpened(second),
    )
    assert (first_lease.messages, second_lease.messages) == (2, 1)


def test_a_kept_connection_out_of_message_rate_moves_the_message_to_another_source() -> None:
    the_shaper, _ = shaper('["default"]\nmax_message_rate = "1/h"\n')
    relay = core()
    first, first_lease = leased(the_shaper, "a")
    message(relay, OpenRemote("main", "good.test"), RemoteOpened(first))
    second, second_lease = leased(the_shaper, "b")  # what selection gives: b has budget
    second = replace(second, source=B)
    message(
        relay,
        ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
        AskSelection("main", "good.test", "a"),
        SelectionAnswered(None),  # b has budget
        CloseRemote(polite=True),  # a's hour is used: QUIT, and nothing went out on it
        OpenRemote("main", "good.test"),
        RemoteOpened(second),
    )
    assert (first_lease.messages, second_lease.messages) == (1, 1)
    assert first_lease.released is False  # the shell releases it when the QUIT is done


def test_a_kept_connection_out_of_budget_with_no_other_source_gets_that_refusal_and_stays() -> None:
    the_shaper, _ = shaper('["default"]\nmax_message_rate = "1/h"\n')
    relay = core()
    opened, lease = leased(the_shaper)
    message(relay, OpenRemote("main", "good.test"), RemoteOpened(opened))
    summary = replies.egress_failure(
        "main",
        "budget",
        'no source of pool "main" may connect to site "mx.good.test" now (a: '
        'max_message_rate 1/h used up for source "a" to site "mx.good.test"; next in '
        '3.6e+03s (["default"] in shaping.toml))',
    )
    refusal = replies.pool_unnamed(summary, "main")
    assert refusal.code == 451 and refusal.lines[0].startswith("4.7.0 no source of pool")
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            AskSelection("main", "good.test", "a"),
        SelectionAnswered(summary),  # no source has budget: no QUIT, no open
            ReplyMta(refusal),  # no SendRemote: nothing went out
        MtaCommand(RCPT2),
            ReplyMta(refusal),  # the transaction's refusal
        MtaCommand(Data()),
            ReplyMta(replies.no_remote_transaction()),
    )  # fmt: skip
    assert lease.messages == 1
    assert relay.remote is opened  # kept for the next message, which asks its budget again


def test_a_fresh_connection_refused_by_the_message_rate_sends_nothing() -> None:
    the_shaper, _ = shaper('["default"]\nmax_message_rate = "1/h"\n')
    _, other = leased(the_shaper)
    assert other.send() is None  # another session's message used the hour's cell
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(leased(the_shaper)[0]),
            ReplyMta(
                replies.message_budget(
                    "max_message_rate 1/h used up for source \"a\" to site \"mx.good.test\"; "
                    'next in 3.6e+03s (["default"] in shaping.toml)'
                )
            ),
    )  # fmt: skip
