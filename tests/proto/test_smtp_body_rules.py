"""The body's smuggling rules against a definition written from the README, at every split.

The README and the server machine's docstring give the rules in words: only
``<CRLF>.<CRLF>`` (or ``.<CRLF>`` as the very first line) ends the data; a bare CR or a
bare LF never ends a line and refuses the message (``550 5.6.11``) after the bytes before
it went out, and the refused body is read up to the real ``<CRLF>.<CRLF>``. :func:`verdict`
states exactly that over the whole byte stream, with no knowledge of how the machine scans
(windows, held-back CR, line-initial dots), and the tests feed the same stream cut at every
position -- a CR at the end of one read and its LF in the next, a dot line split across
reads, a window that ends at ``max_chunk`` -- and compare the events with it.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from test_smtp_server import EXTENSIONS, GREETING, Seen, merge_chunks, run

from egressd.proto.smtp_common import ConnectionClosed, DataChunk, EndOfData, Noop, Reply
from egressd.proto.smtp_server import BareLineEnding, DataDiscarded, SmtpServer

REFUSAL = Reply.make(550, "Bare CR or LF in message data is not allowed", enhanced="5.6.11")
TERMINATOR = b"\r\n.\r\n"


def first_bare(content: bytes) -> int:
    """The index of the first CR not followed by LF or LF not preceded by CR, or -1."""
    for index, byte in enumerate(content):
        if byte == 0x0D and content[index + 1 : index + 2] != b"\n":
            return index
        if byte == 0x0A and (index == 0 or content[index - 1] != 0x0D):
            return index
    return -1


def verdict(body: bytes) -> list[Seen]:
    """What a driver must see for ``body`` (everything after the 354) followed by NOOP:
    the body as one chunk and the end of data, or the clean prefix, the refusal and the
    discard; then the NOOP when it directly follows the real end of data (bytes after an
    earlier end are commands, not checked here)."""
    end = (b"\r\n" + body).find(TERMINATOR)  # the first line may be the lone dot
    assert end >= 0, "the generated body always has an end"
    content = body[:end]
    after: list[Seen] = [Noop()] if end + 3 == len(body) else []
    bare = first_bare(content)
    if bare < 0:
        events: list[Seen] = [DataChunk(content)] if content else []
        return [*events, EndOfData(), *after]
    prefix: list[Seen] = [DataChunk(content[:bare])] if bare else []
    return [*prefix, BareLineEnding(REFUSAL), DataDiscarded(REFUSAL), *after]


def events_of(pieces: list[bytes], max_chunk: int) -> list[Seen]:
    server = SmtpServer(extensions=EXTENSIONS, max_chunk=max_chunk)
    server.send(GREETING)
    run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"])
    events, _ = run(server, pieces)
    for event in events:
        if isinstance(event, DataChunk):
            assert 0 < len(event.data) <= max_chunk
    return merge_chunks(events)


def cuts(wire: bytes) -> list[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every position."""
    ways = [[wire], [wire[i : i + 1] for i in range(len(wire))]]
    ways += [[wire[:at], wire[at:]] for at in range(1, len(wire))]
    return ways


# Bytes that matter to the rules, and some that must not: NUL, 8-bit, a space.
BODY_TOKENS = [
    b"a",
    b".",
    b"..",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n.",
    b".\r",
    b"\r\r\n",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\x00",
    b"\xff\xe9",
    b" ",
    b".\r\n",  # the lone dot: an end of data only at the start of a line
]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=70),
    st.lists(st.sampled_from(BODY_TOKENS), max_size=24),
    st.integers(min_value=64, max_value=80),
)
def test_every_cut_of_a_body_gives_the_verdict_of_the_rules(
    filler: int, tokens: list[bytes], max_chunk: int
) -> None:
    """``filler`` bytes of a first line move the tokens across the smallest window
    (``max_chunk`` is at least 64), so a window can end inside any of them."""
    body = (b"h" * filler + b"\r\n" if filler else b"") + b"".join(tokens) + TERMINATOR
    expected = verdict(body)
    for pieces in cuts(body + b"NOOP\r\n"):
        for chunk in (max_chunk, 65536):
            seen = events_of(pieces, chunk)[: len(expected)]  # then the commands sent after
            assert seen == expected, (pieces, chunk)


EXAMPLES = [
    # (body after the 354, what the MTA must get) -- the cases a speed change put at risk
    (b"a\r\nb\r\n.\r\n", "clean"),
    (b"a\r\r\n.\r\n", "bare"),  # CR CR LF: the first CR is bare
    (b"a\n.\r\nb\r\n.\r\n", "bare"),  # LF-dot-CRLF must not end the data
    (b"a\r\n.\rb\r\n.\r\n", "bare"),
    (b"a\r\n.\r\n", "clean"),
    (b".\r\n", "clean"),  # the lone dot as the first line
    (b"\n.\r\n\r\n.\r\n", "bare"),  # a bare LF as the first byte
    (b"a\x00b\xff\r\n.\r\n", "clean"),  # NUL and 8-bit are text here
    (b"x" * 70 + b"\r", "bare-later"),  # CR at a window's end, then not LF
]


def test_named_cases_split_at_every_position_and_window_size() -> None:
    for body, kind in EXAMPLES:
        if kind == "bare-later":
            body += b"y\r\n.\r\n"
        expected = verdict(body)
        assert (BareLineEnding(REFUSAL) in expected) == (kind != "clean"), body
        for pieces, max_chunk in itertools.product(cuts(body + b"NOOP\r\n"), range(64, 80)):
            seen = events_of(pieces, max_chunk)
            assert seen == expected, (pieces, max_chunk)


def test_cr_at_the_end_of_a_read_then_lf_is_a_clean_line_end() -> None:
    """The CR that ends a read is held back until the next read shows its LF: neither
    refused as bare nor let out without it."""
    body = b"x" * 70 + b"\r\n" + b"y" * 70 + b"\r\n"
    for at in range(1, len(body)):
        pieces = [body[:at], body[at:] + b".\r\nNOOP\r\n"]
        for max_chunk in (64, 70, 71, 72, 73, 65536):
            assert events_of(pieces, max_chunk) == [DataChunk(body), EndOfData(), Noop()]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=70),
    st.lists(st.sampled_from(BODY_TOKENS), max_size=24),
)
def test_a_body_cut_short_by_eof_never_ends_and_lets_out_nothing_bare(
    filler: int, tokens: list[bytes]
) -> None:
    """The MTA closes in the middle of a body, read in any two pieces: no end of data
    (the remote must not get the final dot), only a clean prefix of the body let out, and
    the refusal exactly when the bytes that came already hold a bare CR or LF."""
    body = (b"h" * filler + b"\r\n" if filler else b"") + b"".join(tokens)
    end = (b"\r\n" + body).find(TERMINATOR)
    if end >= 0:
        body = body[:end]  # cut before the first end of data
    decided = body[:-1] if body.endswith(b"\r") else body  # a last CR may yet be CRLF
    bare = first_bare(decided)
    for pieces in cuts(body) if body else [[]]:
        events = run_to_eof(pieces)
        assert events[-1] == ConnectionClosed()
        assert not any(isinstance(e, EndOfData) for e in events)
        let_out = b"".join(e.data for e in events if isinstance(e, DataChunk))
        assert body.startswith(let_out) and first_bare(let_out) < 0
        assert (BareLineEnding(REFUSAL) in events) == (bare >= 0), pieces
        if bare >= 0:
            assert let_out == body[:bare]


def run_to_eof(pieces: list[bytes]) -> list[Seen]:
    server = SmtpServer(extensions=EXTENSIONS, max_chunk=64)
    server.send(GREETING)
    run(server, [b"EHLO mta\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"])
    events, _ = run(server, pieces, eof=True)
    return events
