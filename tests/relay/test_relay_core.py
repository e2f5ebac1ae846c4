"""The relay core as transcripts: every row of the SMTP door's pass-through matrix, without
sockets (the integration tests in tests/integration/test_smtp_door.py prove the shell)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from relay_transcript import (
    ALIAS,
    BAD_SEQUENCE,
    BYE,
    GO_AHEAD,
    GOING_DOWN,
    GOOD,
    MAIL,
    MAIL_OK,
    OK,
    OTHER,
    QUEUED,
    RCPT,
    RCPT2,
    RESET,
    World,
    config,
    core,
    play,
    remote,
    temp,
)

from egressd.config import Source, User
from egressd.proto.smtp_common import (
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Mail,
    Quit,
    Rcpt,
    Reply,
    Rset,
)
from egressd.relay import replies
from egressd.relay.core import RelayCore, pool_for, recipient_domain
from egressd.relay.events import (
    CloseRemote,
    MtaAuthenticated,
    MtaBareLineEnding,
    MtaBody,
    MtaClosed,
    MtaCommand,
    MtaDataDiscarded,
    MtaEndOfData,
    MtaTimedOut,
    NextHopResolved,
    OpenFailed,
    OpenRemote,
    RemoteLost,
    RemoteOpened,
    RemoteReplied,
    RemoteTimedOut,
    ReplyMta,
    ResolveNextHop,
    SendRemote,
    SessionEnded,
    TransactionEnded,
    TransactionStarted,
)

CHUNK = DataChunk(b"Subject: x\r\n\r\nbody\r\n")
DESCRIBE = 'source "a" (127.0.0.3) to mx.good.test[127.0.0.1]:25'
TEMP_REFUSAL = Reply(451, ("4.7.1 greylisted, come back later", "4.7.1 second line"))
PERM_REFUSAL = Reply.make(550, "no thanks", enhanced="5.7.1")
REFUSALS = pytest.mark.parametrize("refusal", [TEMP_REFUSAL, PERM_REFUSAL], ids=["4xx", "5xx"])


def opened(relay: RelayCore, *, mail: Mail = MAIL, rcpt: Rcpt = RCPT) -> None:
    """MAIL and a first RCPT the remote accepts."""
    play(
        relay,
        MtaCommand(mail),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(rcpt),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((mail, rcpt), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
    )  # fmt: skip


def in_body(relay: RelayCore) -> None:
    """A transaction whose body is flowing."""
    opened(relay)
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((GO_AHEAD,)),
            ReplyMta(GO_AHEAD),
    )  # fmt: skip


def ended(outcome: str, final: Reply | None, size: int = 0, pool: str = "main") -> TransactionEnded:
    return TransactionEnded(pool, outcome, final, size)


# --------------------------------------------------------------------------- delivery


def test_a_message_is_delivered_and_every_reply_is_the_remotes() -> None:
    relay = core()
    in_body(relay)
    last = DataChunk(b"last line\r\n")
    play(
        relay,
        MtaBody((CHUNK,)),
            SendRemote((CHUNK,), "the message body"),
        RemoteReplied(()),
        MtaEndOfData((last,)),
            SendRemote((last, EndOfData()), "end of data"),
        RemoteReplied((QUEUED,)),
            ended("delivered", QUEUED, len(CHUNK.data) + len(last.data)),
            ReplyMta(QUEUED),
        MtaCommand(Quit()),
            ReplyMta(BYE),
        SessionEnded(clean=True),
            CloseRemote(polite=True),
    )  # fmt: skip


def test_the_transaction_log_line_names_pool_source_remote_and_outcome() -> None:
    relay = core()
    in_body(relay)
    relay.handle(MtaBody((CHUNK,)))
    relay.handle(RemoteReplied(()))
    relay.handle(MtaEndOfData())
    [end, _reply] = relay.handle(RemoteReplied((QUEUED,)))
    assert isinstance(end, TransactionEnded)
    assert end.fields == {
        "pool": "main",
        "source": "a",
        "local_address": "127.0.0.3:40000",
        "mx": "mx.good.test",
        "mx_address": "mx.good.test[127.0.0.1]:25",
        "tls_policy": "opportunistic",
        "sender": "a@sender.test",
        "recipients": "one@good.test=250",
        "reply": "250 2.0.0 queued as R1",
        "size": len(CHUNK.data),
        "duration": 0.25,
        "outcome": "delivered",
    }


def test_a_remote_without_pipelining_gets_mail_then_rcpt() -> None:
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote(extensions={"8BITMIME": ""})),
            SendRemote((MAIL,), "MAIL FROM"),
        RemoteReplied((OK,)),
            SendRemote((RCPT,), "RCPT TO"),
        RemoteReplied((OK,)),
            ReplyMta(OK),
    )  # fmt: skip


def test_no_pool_is_a_451_4_3_5_with_the_reason() -> None:
    relay = core(listener_pool=None)
    play(
        relay,
        MtaCommand(Mail("nobody@sender.test")),
            ReplyMta(temp("4.3.5", "no pool for sender <nobody@sender.test>: not authenticated,"
                          " no [smtp.sender_pools] entry, and the listener has no pool")),
    )  # fmt: skip
    assert not relay.in_transaction


def test_the_pool_comes_from_auth_then_sender_then_listener() -> None:
    pools = {"@special.test": "other", "x@plain.test": "main"}
    assert pool_for("Y@Special.Test", None, pools, "main") == ("other", "sender domain")
    assert pool_for("X@Plain.test", None, pools, None) == ("main", "sender")
    assert pool_for("z@special.test", "main", pools, None) == ("main", "auth")
    assert pool_for("", None, pools, "main") == ("main", "listener")
    assert pool_for("a@b.test", None, {}, None) == (None, "none")
    relay = core()
    play(
        relay,
        MtaAuthenticated("other"),
        MtaCommand(MAIL),
            TransactionStarted("other"),
            ReplyMta(Reply.make(250, "Sender OK (pool other by auth)", enhanced="2.1.0")),
    )  # fmt: skip


def test_with_users_sender_pools_count_only_within_the_users_pools() -> None:
    pools = {"@beta.test": "beta", "@alpha.test": "alpha"}
    alpha_only = ("alpha",)
    assert pool_for("x@beta.test", "tenant", pools, None, alpha_only) == ("alpha", "auth")
    assert pool_for("x@alpha.test", "tenant", pools, None, ("gamma", "alpha")) == (
        "alpha",
        "sender domain",
    )
    assert pool_for("x@beta.test", "tenant", pools, "alpha", ("beta", "alpha")) == (
        "beta",
        "sender domain",
    )
    assert pool_for("x@other.test", "tenant", pools, "alpha", ("beta", "alpha")) == (
        "alpha",
        "listener",
    )
    # a client that did not authenticate: the listener's pool, never one by its sender
    assert pool_for("x@beta.test", None, pools, "alpha", ()) == ("alpha", "listener")
    assert pool_for("x@beta.test", None, pools, None, ()) == (None, "none")
    assert pool_for("x@beta.test", "gone", pools, None, ()) == (None, "none")


def users_world() -> World:
    users = {
        "main": User(password="pw"),  # the username is the pool
        "tenant": User(password="pw", pools=("main",)),
    }
    base = config(sender_pools={"@beta.test": "other"})
    return World(config=replace(base, auth=users))


def test_with_users_mail_without_auth_is_deferred_451() -> None:
    relay = core(users_world())
    play(
        relay,
        MtaCommand(Mail("x@beta.test")),
            ReplyMta(Reply.make(451, "Authentication required", enhanced="4.7.0")),
    )  # fmt: skip
    assert not relay.in_transaction


def test_an_optional_listener_gives_the_unauthenticated_its_pool_and_names_none() -> None:
    world = users_world()
    relay = RelayCore("relay.test", "main", lambda: world, auth_required=False)
    play(
        relay,
        MtaCommand(Mail("x@beta.test")),  # sender_pools would say "other"
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
    )  # fmt: skip


def test_a_forged_sender_does_not_lead_an_authenticated_user_out_of_its_pools() -> None:
    relay = core(users_world(), listener_pool=None)
    play(
        relay,
        MtaAuthenticated("tenant"),
        MtaCommand(Mail("x@beta.test")),
            TransactionStarted("main"),
            ReplyMta(Reply.make(250, "Sender OK (pool main by auth)", enhanced="2.1.0")),
    )  # fmt: skip


@pytest.mark.parametrize("user", [None, "main"])
def test_a_pool_failure_names_the_pool_only_to_an_authenticated_client(
    user: str | None,
) -> None:
    failure = temp("4.4.5", "pool main: every source is suspended")
    relay = core()
    if user is not None:
        relay.handle(MtaAuthenticated(user))
    relay.handle(MtaCommand(MAIL))
    commands = relay.handle(MtaCommand(RCPT))
    assert commands == [OpenRemote("main", "good.test")]
    [reply] = relay.handle(OpenFailed(failure))
    expected = failure if user else temp("4.4.5", "every source is suspended")
    assert reply == ReplyMta(expected)


def test_recipient_domain_is_lower_case() -> None:
    assert recipient_domain("A@Good.TEST") == "good.test"


def test_a_bare_postmaster_has_no_domain() -> None:
    assert recipient_domain("Postmaster") == ""
    assert recipient_domain("postmaster@Good.TEST") == "good.test"


def test_a_bare_postmaster_is_refused_for_good_without_a_remote() -> None:
    """RFC 5321 4.5.1: <Postmaster> is this host's; egressd has no mailbox to deliver to."""
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(Rcpt("Postmaster")),
            ReplyMta(replies.no_recipient_domain("Postmaster")),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
    )  # fmt: skip
    assert replies.no_recipient_domain("Postmaster").code == 550


# --------------------------------------------------------------------------- refusals


@REFUSALS
def test_a_refused_mail_is_every_recipients_reply(refusal: Reply) -> None:
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((refusal, BAD_SEQUENCE)),
            ReplyMta(refusal),
        MtaCommand(RCPT2),
            ReplyMta(refusal),  # not asked again
        MtaCommand(Rset()),
            TransactionEnded("main", "reset", None, 0),
            ReplyMta(RESET),
    )  # fmt: skip


@REFUSALS
def test_a_refused_recipient_gets_the_remotes_reply(refusal: Reply) -> None:
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, refusal)),
            ReplyMta(refusal),
        MtaCommand(RCPT2),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            SendRemote((RCPT2,), "RCPT TO"),
        RemoteReplied((refusal,)),
            ReplyMta(refusal),
    )  # fmt: skip


@REFUSALS
def test_a_refused_data_is_the_mtas_reply_and_rset_clears_the_remote(refusal: Reply) -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((refusal,)),
            ReplyMta(refusal),
        MtaCommand(Rset()),
            SendRemote((Rset(),), "RSET"),
        RemoteReplied((OK,)),
            ended("reset", refusal),
            ReplyMta(RESET),
    )  # fmt: skip


@REFUSALS
def test_a_refused_final_dot_is_the_mtas_reply(refusal: Reply) -> None:
    relay = core()
    in_body(relay)
    play(
        relay,
        MtaEndOfData((CHUNK,)),
            SendRemote((CHUNK, EndOfData()), "end of data"),
        RemoteReplied((refusal,)),
            ended("refused", refusal, len(CHUNK.data)),
            ReplyMta(refusal),
    )  # fmt: skip


# --------------------------------------------------------------------------- drops


def test_a_remote_that_cannot_be_opened_is_the_recipients_reply() -> None:
    """Banner and EHLO failures, every MX unreachable, DNS: the open path's reply."""
    failure = temp("4.4.1", 'source "a" (127.0.0.3): no mail server of good.test could be used')
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        OpenFailed(failure),
            ReplyMta(failure),
        MtaCommand(Data()),  # only if the MTA insists: its machine says 503 first
            ReplyMta(temp("4.3.0", "no open transaction with the remote server")),
        SessionEnded(clean=False),
            ended("abandoned", None),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (RemoteLost("closed"), "connection closed by the remote in reply to MAIL FROM and RCPT TO"),
        (
            RemoteLost("violation", detail="malformed reply line"),
            "protocol violation in reply to MAIL FROM and RCPT TO: malformed reply line",
        ),
        (
            RemoteLost("error", sending=True, detail="Broken pipe"),
            "connection lost sending MAIL FROM and RCPT TO: Broken pipe",
        ),
        (
            RemoteLost("error", detail="Connection reset by peer"),
            "connection lost waiting for the reply to MAIL FROM and RCPT TO: Connection reset"
            " by peer",
        ),
        (RemoteTimedOut(0.3), "no reply to MAIL FROM and RCPT TO within 0.3s"),
        (RemoteTimedOut(240, sending=True), "timed out after 240s sending MAIL FROM and RCPT TO"),
    ],
)
def test_a_remote_dropping_at_mail_is_a_4xx_naming_source_and_address(
    failure: RemoteLost | RemoteTimedOut, text: str
) -> None:
    relay = core()
    reply = temp("4.4.2", f"{DESCRIBE}: {text}")
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        failure,
            CloseRemote(polite=False),
            ReplyMta(reply),
    )  # fmt: skip


def test_a_remote_dropping_at_rcpt_breaks_the_transaction() -> None:
    relay = core()
    opened(relay)
    reply = temp("4.4.2", f"{DESCRIBE}: connection closed by the remote in reply to RCPT TO")
    play(
        relay,
        MtaCommand(RCPT2),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            SendRemote((RCPT2,), "RCPT TO"),
        RemoteLost("closed"),
            CloseRemote(polite=False),
            ReplyMta(reply),
        MtaCommand(Rcpt("three@good.test")),
            ReplyMta(reply),
        MtaCommand(Data()),
            ReplyMta(reply),
    )  # fmt: skip


def test_a_remote_dropping_at_data_is_a_4xx() -> None:
    relay = core()
    opened(relay)
    reply = temp("4.4.2", f"{DESCRIBE}: no reply to DATA within 100s")
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteTimedOut(100),
            CloseRemote(polite=False),
            ReplyMta(reply),
        MtaCommand(Rset()),
            ended("reset", None),
            ReplyMta(RESET),
    )  # fmt: skip


def test_a_remote_dropping_at_the_final_dot_is_a_4xx() -> None:
    relay = core()
    in_body(relay)
    reply = temp("4.4.2", f"{DESCRIBE}: connection closed by the remote in reply to end of data")
    play(
        relay,
        MtaEndOfData((CHUNK,)),
            SendRemote((CHUNK, EndOfData()), "end of data"),
        RemoteLost("closed"),
            CloseRemote(polite=False),
            ended("refused", reply, len(CHUNK.data)),
            ReplyMta(reply),
        SessionEnded(clean=True),
    )  # fmt: skip


def test_a_remote_dropping_mid_body_is_the_final_reply_and_gets_no_dot() -> None:
    relay = core()
    in_body(relay)
    reply = temp("4.4.2", f"{DESCRIBE}: connection lost sending the message body: Broken pipe")
    play(
        relay,
        MtaBody((CHUNK,)),
            SendRemote((CHUNK,), "the message body"),
        RemoteLost("error", sending=True, detail="Broken pipe"),
            CloseRemote(polite=False),
        MtaBody((CHUNK,)),  # nothing more is sent
        MtaEndOfData((CHUNK,)),
            ended("refused", reply, 3 * len(CHUNK.data)),
            ReplyMta(reply),
    )  # fmt: skip


# --------------------------------------------------------------------------- 421


def test_a_remote_421_at_rcpt_is_passed_on_and_ends_the_connection() -> None:
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, GOING_DOWN)),
            CloseRemote(polite=False),
            ReplyMta(GOING_DOWN),
        MtaCommand(RCPT2),
            ReplyMta(GOING_DOWN),
    )  # fmt: skip


def test_a_remote_421_to_a_later_rcpt_breaks_the_transaction() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(RCPT2),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            SendRemote((RCPT2,), "RCPT TO"),
        RemoteReplied((GOING_DOWN,)),
            CloseRemote(polite=False),
            ReplyMta(GOING_DOWN),
        MtaCommand(Data()),
            ReplyMta(GOING_DOWN),
    )  # fmt: skip


def test_a_remote_421_to_mail_stands_for_every_pipelined_reply() -> None:
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((GOING_DOWN,)),  # the RCPT's reply will never come
            CloseRemote(polite=False),
            ReplyMta(GOING_DOWN),
    )  # fmt: skip


def test_a_remote_421_to_data_is_passed_on() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((GOING_DOWN,)),
            CloseRemote(polite=False),
            ReplyMta(GOING_DOWN),
    )  # fmt: skip


def test_a_remote_421_to_the_final_dot_is_passed_on_and_ends_the_connection() -> None:
    relay = core()
    in_body(relay)
    play(
        relay,
        MtaEndOfData(),
            SendRemote((EndOfData(),), "end of data"),
        RemoteReplied((GOING_DOWN,)),
            CloseRemote(polite=False),
            ended("refused", GOING_DOWN),
            ReplyMta(GOING_DOWN),
    )  # fmt: skip


# --------------------------------------------------------------------------- next hops


def test_a_recipient_with_another_next_hop_is_told_452_4_5_3() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Rcpt("two@alias.test")),  # another MX name, but the same address
            ResolveNextHop("alias.test", 4),
        NextHopResolved(ALIAS),
            SendRemote((Rcpt("two@alias.test"),), "RCPT TO"),
        RemoteReplied((OK,)),
            ReplyMta(OK),
        MtaCommand(Rcpt("three@other.test")),
            ResolveNextHop("other.test", 4),
        NextHopResolved(OTHER),
            ReplyMta(Reply.make(452, "other.test has another next hop than good.test"
                                " (mx.good.test[127.0.0.1]:25); send it in another transaction",
                                enhanced="4.5.3")),
        MtaCommand(Rcpt("four@other.test")),  # resolved once per transaction
            ReplyMta(Reply.make(452, "other.test has another next hop than good.test"
                                " (mx.good.test[127.0.0.1]:25); send it in another transaction",
                                enhanced="4.5.3")),
    )  # fmt: skip


def test_a_next_hop_that_cannot_be_found_is_the_recipients_reply() -> None:
    nxdomain = Reply.make(550, "domain nowhere.test does not exist (NXDOMAIN)", enhanced="5.1.2")
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Rcpt("x@nowhere.test")),
            ResolveNextHop("nowhere.test", 4),
        NextHopResolved(nxdomain),
            ReplyMta(nxdomain),
        MtaCommand(Rcpt("y@nowhere.test")),
            ReplyMta(nxdomain),
    )  # fmt: skip


# --------------------------------------------------------------------------- the body


def test_a_body_over_the_advertised_size_never_reaches_the_remote() -> None:
    relay = core(World(config(max_message_size=30)))
    in_body(relay)
    big = DataChunk(b"x" * 28 + b"\r\n")
    too_big = Reply.make(552, "Message exceeds the maximum size of 30 bytes", enhanced="5.3.4")
    play(
        relay,
        MtaBody((CHUNK,)),
            SendRemote((CHUNK,), "the message body"),
        RemoteReplied(()),
        MtaBody((big,)),
            CloseRemote(polite=False),
        MtaBody((big,)),
        MtaEndOfData((big,)),
            ended("refused", too_big, len(CHUNK.data) + 3 * len(big.data)),
            ReplyMta(too_big),
        MtaCommand(Rset()),
            ReplyMta(RESET),
    )  # fmt: skip


def test_a_body_over_the_size_in_its_last_piece_gets_no_final_dot() -> None:
    relay = core(World(config(max_message_size=10)))
    in_body(relay)
    too_big = Reply.make(552, "Message exceeds the maximum size of 10 bytes", enhanced="5.3.4")
    play(
        relay,
        MtaEndOfData((CHUNK,)),
            CloseRemote(polite=False),
            ended("refused", too_big, len(CHUNK.data)),
            ReplyMta(too_big),
    )  # fmt: skip


def test_the_mta_dropping_mid_data_closes_the_remote_without_the_dot() -> None:
    relay = core()
    in_body(relay)
    play(
        relay,
        MtaBody((CHUNK,)),
            SendRemote((CHUNK,), "the message body"),
        RemoteReplied(()),
        MtaClosed(),
            CloseRemote(polite=False),
            ended("mta disconnected mid-DATA", None, len(CHUNK.data)),
        SessionEnded(clean=False),
    )  # fmt: skip


def test_an_mta_stalling_mid_data_is_cut_and_the_remote_gets_no_dot() -> None:
    relay = core()
    in_body(relay)
    play(
        relay,
        MtaTimedOut(180),
            CloseRemote(polite=False),
            ended("mta timeout mid-DATA", None),
        SessionEnded(clean=False),
    )  # fmt: skip


def test_the_mta_going_away_outside_data_abandons_the_transaction() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaClosed(),  # outside DATA: the session's end says what to do
        MtaTimedOut(300),
        SessionEnded(clean=False),
            CloseRemote(polite=False),  # mid-transaction: never let it complete
            ended("abandoned", None),
    )  # fmt: skip


def test_a_bare_line_feed_aborts_the_remote_transaction() -> None:
    refused = Reply.make(550, "Bare CR or LF in message data is not allowed", enhanced="5.6.11")
    relay = core()
    in_body(relay)
    play(
        relay,
        MtaBody((CHUNK,)),
            SendRemote((CHUNK,), "the message body"),
        RemoteReplied(()),
        MtaBareLineEnding(),
            CloseRemote(polite=False),
        MtaDataDiscarded(refused),
            ReplyMta(refused),
            ended("refused: bare CR or LF", refused, len(CHUNK.data)),
    )  # fmt: skip


# --------------------------------------------------------------------------- sessions


def delivered(relay: RelayCore) -> None:
    """DATA, body and final dot of an open transaction, delivered."""
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((GO_AHEAD,)),
            ReplyMta(GO_AHEAD),
        MtaEndOfData((CHUNK,)),
            SendRemote((CHUNK, EndOfData()), "end of data"),
        RemoteReplied((QUEUED,)),
            ended("delivered", QUEUED, len(CHUNK.data)),
            ReplyMta(QUEUED),
        MtaCommand(Rset()),
            ReplyMta(RESET),
    )  # fmt: skip


def test_transactions_of_a_session_reuse_the_connection_while_the_source_fits() -> None:
    world = World(config(sender_pools={"b@sender.test": "other"}))
    relay = core(world)
    opened(relay)
    delivered(relay)
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            ResolveNextHop("good.test", 4),  # the kept connection fits pool and next hop
        NextHopResolved(GOOD),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
    )  # fmt: skip
    delivered(relay)
    other_mail = Mail("b@sender.test")
    play(
        relay,
        MtaCommand(other_mail),
            TransactionStarted("other"),
            ReplyMta(MAIL_OK),  # unauthenticated: the pool is not named
        MtaCommand(RCPT),  # source a is not in pool other
            CloseRemote(polite=True),
            OpenRemote("other", "good.test"),
        RemoteOpened(remote(source=world.config.sources["b"])),
            SendRemote((other_mail, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
    )  # fmt: skip


@pytest.mark.parametrize("change", ["suspended", "reconfigured", "other next hop"])
def test_a_kept_connection_that_no_longer_fits_gets_quit(change: str) -> None:
    world = World()
    relay = core(world)
    opened(relay)
    delivered(relay)
    if change == "suspended":
        world.health.suspended.add("a")
    elif change == "reconfigured":
        world.config = config(sources={"a": Source("a"), "b": world.config.sources["b"]})
    rcpt = Rcpt("x@other.test") if change == "other next hop" else RCPT
    domain = recipient_domain(rcpt.address)
    steps: list[object] = [MtaCommand(MAIL), TransactionStarted("main"), ReplyMta(MAIL_OK)]
    steps.append(MtaCommand(rcpt))
    if change == "other next hop":
        steps += [ResolveNextHop("other.test", 4), NextHopResolved(OTHER)]
    steps += [CloseRemote(polite=True), OpenRemote("main", domain)]
    play(relay, *steps)  # type: ignore[arg-type]


def test_a_kept_connection_the_remote_closed_is_replaced_transparently() -> None:
    relay = core()
    opened(relay)
    delivered(relay)
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteLost("closed"),  # it timed the idle connection out
            CloseRemote(polite=False),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
    )  # fmt: skip


def test_a_kept_connection_answering_421_is_replaced_transparently() -> None:
    relay = core()
    opened(relay)
    delivered(relay)
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            ResolveNextHop("good.test", 4),
        NextHopResolved(GOOD),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((GOING_DOWN,)),
            CloseRemote(polite=False),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        RemoteReplied((OK, OK)),
            ReplyMta(OK),
    )  # fmt: skip


def test_a_fresh_connection_failing_is_not_retried() -> None:
    relay = core()
    reply = temp("4.4.2", f"{DESCRIBE}: connection closed by the remote in reply to MAIL FROM")
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote(extensions={})),
            SendRemote((MAIL,), "MAIL FROM"),
        RemoteLost("closed"),
            CloseRemote(polite=False),
            ReplyMta(reply),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("rset_outcome", "close"),
    [
        (RemoteReplied((OK,)), []),
        (RemoteReplied((Reply.make(500, "what?", enhanced="5.5.2"),)), [CloseRemote(polite=True)]),
        (RemoteReplied((GOING_DOWN,)), [CloseRemote(polite=False)]),
        (RemoteLost("closed"), [CloseRemote(polite=False)]),
    ],
)
def test_rset_clears_the_remote_transaction_or_drops_the_connection(
    rset_outcome: RemoteReplied | RemoteLost, close: list[CloseRemote]
) -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Ehlo("mta.test")),
            SendRemote((Rset(),), "RSET"),
        rset_outcome,
            *close,
            ended("reset", None),
    )  # fmt: skip


def test_quit_mid_transaction_resets_the_remote_and_closes_politely() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Quit()),
            SendRemote((Rset(),), "RSET"),
        RemoteReplied((OK,)),
            ended("quit", None),
            ReplyMta(BYE),
        SessionEnded(clean=True),
            CloseRemote(polite=True),
    )  # fmt: skip


def test_a_session_ending_after_a_remote_421_logs_the_421() -> None:
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        RemoteReplied((GOING_DOWN,)),
            CloseRemote(polite=False),
            ReplyMta(GOING_DOWN),
        SessionEnded(clean=False),
            ended("abandoned", GOING_DOWN),
    )  # fmt: skip


# --------------------------------------------------------------------------- what cannot pass


def test_remote_without_8bitmime_is_refused_before_mail() -> None:
    mail = Mail("a@example.org", {"BODY": "8BITMIME"})
    refusal = Reply.make(554, "Remote server does not support 8BITMIME", enhanced="5.6.3")
    relay = core()
    play(
        relay,
        MtaCommand(mail),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(RCPT),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote(extensions={"PIPELINING": ""})),
            ReplyMta(refusal),
        MtaCommand(RCPT2),
            ReplyMta(refusal),
    )  # fmt: skip


def test_a_non_ascii_recipient_needs_smtputf8_at_the_remote() -> None:
    rcpt = Rcpt("josé@good.test")
    relay = core()
    play(
        relay,
        MtaCommand(MAIL),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
        MtaCommand(rcpt),
            OpenRemote("main", "good.test"),
        RemoteOpened(remote()),
            SendRemote((MAIL,), "MAIL FROM"),  # not pipelined: the RCPT may not go out
        RemoteReplied((OK,)),
            ReplyMta(Reply.make(553, "Remote server does not support SMTPUTF8",
                                enhanced="5.6.7")),
    )  # fmt: skip


def test_a_session_ending_while_the_remote_owes_a_reply_cuts_it_off() -> None:
    """The shell was cancelled mid-exchange (shutdown after the grace period)."""
    relay = core()
    opened(relay)
    play(
        relay,
        MtaCommand(Data()),
            SendRemote((Data(),), "DATA"),
        SessionEnded(clean=False),
            CloseRemote(polite=False),
            ended("abandoned", None),
        MtaCommand(Mail("b@sender.test")),
            TransactionStarted("main"),
            ReplyMta(MAIL_OK),
    )  # fmt: skip


def test_an_event_that_is_not_a_result_while_one_is_awaited_is_a_bug() -> None:
    relay = core()
    relay.handle(MtaCommand(MAIL))
    relay.handle(MtaCommand(RCPT))
    assert relay.waiting
    with pytest.raises(AssertionError):
        relay.handle(MtaCommand(Data()))


def test_a_result_nobody_awaits_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        core().handle(RemoteReplied((OK,)))
