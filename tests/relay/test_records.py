"""The per-message events as Records behave as the frozen dataclasses they replaced.

What a driver, a log line or a test relies on: two events are equal exactly when their
compared fields are (a MAIL's parameters count, a log line's fields do not), every event a
driver may keep in a set or as a key hashes without error -- also a MAIL with parameters,
whose mapping is left out of the hash as the dataclass left it -- equal events hash alike, a
body chunk never prints its bytes, and a malformed event cannot be made.
"""

from __future__ import annotations

import pytest

from egressd.proto.smtp_common import DataChunk, LocalProtocolError, Mail, Rcpt, Reply
from egressd.relay.events import (
    MtaCommand,
    MtaEndOfData,
    RemoteLost,
    SendRemote,
    TransactionEnded,
)

OK = Reply.make(250, "Ok", enhanced="2.0.0")


def test_mail_and_rcpt_compare_with_their_parameters_and_hash_without_them() -> None:
    plain, sized = Mail("a@b.c"), Mail("a@b.c", {"SIZE": "42"})
    assert plain != sized
    assert Mail("a@b.c", {"SIZE": "42"}) == sized
    assert hash(Mail("a@b.c", {"SIZE": "42"})) == hash(sized)
    assert {plain, sized, Mail("a@b.c", {"SIZE": "42"})} == {plain, sized}
    assert Rcpt("d@e.f", {"NOTIFY": "NEVER"}) != Rcpt("d@e.f")
    assert len({Rcpt("d@e.f", {"NOTIFY": "NEVER"}), Rcpt("d@e.f")}) == 2
    assert Mail("a@b.c") != Rcpt("a@b.c")  # same fields, other kind of event


def test_events_holding_commands_and_chunks_are_equal_and_hash_alike() -> None:
    events = [
        MtaCommand(Mail("a@b.c", {"BODY": "8BITMIME"})),
        MtaEndOfData((DataChunk(b"x\r\n"), DataChunk(b"y\r\n"))),
        RemoteLost("error", sending=True, detail="peer"),
    ]
    again = [
        MtaCommand(Mail("a@b.c", {"BODY": "8BITMIME"})),
        MtaEndOfData((DataChunk(b"x\r\n"), DataChunk(b"y\r\n"))),
        RemoteLost("error", sending=True, detail="peer"),
    ]
    assert events == again
    assert [hash(e) for e in events] == [hash(e) for e in again]
    assert dict.fromkeys(events).keys() == dict.fromkeys(again).keys()
    assert MtaEndOfData((DataChunk(b"x\r\n"),)) != MtaEndOfData((DataChunk(b"y\r\n"),))


def test_a_log_lines_fields_are_neither_compared_nor_printed_nor_hashed() -> None:
    ended = TransactionEnded("bulk", "delivered", OK, 42, {"from": "a@b.c", "to": ["d@e.f"]})
    same = TransactionEnded("bulk", "delivered", OK, 42, {"other": {"a": 1}})
    assert ended == same and hash(ended) == hash(same)  # a dict of lists: still hashable
    assert "a@b.c" not in repr(ended)
    assert ended != TransactionEnded("bulk", "delivered", OK, 43)


def test_send_remote_compares_its_commands_not_what_it_counts() -> None:
    sent = SendRemote((Mail("a@b.c"), Rcpt("d@e.f")), "envelope")
    assert sent == SendRemote((Mail("a@b.c"), Rcpt("d@e.f")), "envelope")
    assert sent != SendRemote((Mail("a@b.c"),), "envelope")
    assert sent != SendRemote((Mail("a@b.c"), Rcpt("d@e.f")), "body")


def test_a_body_chunk_never_prints_the_message() -> None:
    chunk = DataChunk(b"Subject: private\r\n\r\nsecret\r\n")
    for text in (repr(chunk), repr(MtaEndOfData((chunk,))), str(chunk)):
        assert b"secret" not in text.encode() and "private" not in text
    assert "28 bytes" in repr(chunk)


def test_a_repr_names_the_event_and_its_compared_fields() -> None:
    assert repr(Mail("a@b.c")) == "Mail(address='a@b.c', params=mappingproxy({}))"
    assert repr(RemoteLost("error", sending=True, detail="peer")) == (
        "RemoteLost(how='error', sending=True, detail='peer')"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: Mail("a@b.c>\r\nRCPT TO:<x@y.z"),
        lambda: Rcpt(""),  # only MAIL may have the null path
        lambda: Mail("a@b.c", {"SIZE": "1\r\nRSET"}),
        lambda: DataChunk("text, not bytes"),  # type: ignore[arg-type]
    ],
    ids=["injected-mail", "null-rcpt", "injected-param", "str-chunk"],
)
def test_a_malformed_event_cannot_be_made(make: object) -> None:
    with pytest.raises((LocalProtocolError, ValueError, TypeError)):  # compiled: TypeError
        make()  # type: ignore[operator]


def test_the_parameters_of_a_command_cannot_be_changed_through_the_event() -> None:
    params = {"SIZE": "42"}
    mail = Mail("a@b.c", params)
    params["SIZE"] = "1"  # the caller's dict is not the event's
    assert mail.params["SIZE"] == "42"
    with pytest.raises(TypeError):
        mail.params["SIZE"] = "1"  # type: ignore[index]
