"""Which ``[smtp.timeouts]`` entry bounds each write to the remote and the replies it owes."""

from __future__ import annotations

import pytest

from egressd.config import SmtpTimeouts
from egressd.doors.smtp_relay import _deadline
from egressd.proto.smtp_client import ClientCommand
from egressd.proto.smtp_common import Data, DataChunk, EndOfData, Mail, Quit, Rcpt, Rset

TIMEOUTS = SmtpTimeouts(command=1.0, data_init=2.0, data_block=3.0, final_dot=4.0)
MAIL, RCPT = Mail("a@example.com"), Rcpt("b@example.net")
PIECE = DataChunk(b"Subject: x\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    ("commands", "seconds"),
    [
        ((MAIL,), 1.0),
        ((MAIL, RCPT), 1.0),
        ((MAIL, RCPT, RCPT), 1.0),
        ((Rset(),), 1.0),
        ((Quit(),), 1.0),
        ((), 1.0),
        ((Data(),), 2.0),
        ((MAIL, RCPT, Data()), 2.0),  # a pipelined group ending in DATA waits as DATA does
        ((PIECE,), 3.0),
        ((PIECE, PIECE), 3.0),
        ((EndOfData(),), 4.0),
        ((PIECE, PIECE, EndOfData()), 4.0),
    ],
)
def test_each_write_waits_as_long_as_its_kind_of_command_may(
    commands: tuple[ClientCommand, ...], seconds: float
) -> None:
    assert _deadline(TIMEOUTS, commands) == seconds
