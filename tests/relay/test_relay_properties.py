"""Properties of the relay core under any remote behaviour (hypothesis).

A transaction (MAIL, some RCPTs, DATA, the body, the dot, then RSET or QUIT) is driven
through the core while the remote answers every command at random: accepted, refused with
a 4xx or a 5xx, 421, dropped or silent. Whatever happens:

* every 2xx the MTA gets to RCPT, and to the final dot, is the remote's own reply to it
  (egressd never says 250 before the remote did);
* nothing is sent to a remote connection after the core closed it, and the final dot goes
  only to a remote that said 354 to this transaction's DATA;
* the core never raises, and every transaction ends in exactly one log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from relay_transcript import GOOD, OTHER, core, remote

from egressd.proto.smtp_common import (
    Data,
    DataChunk,
    EndOfData,
    Mail,
    Quit,
    Rcpt,
    Reply,
    Rset,
)
from egressd.relay.core import RelayCore
from egressd.relay.events import (
    CloseRemote,
    Command,
    Event,
    MtaBody,
    MtaCommand,
    MtaEndOfData,
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
)

OUTCOMES = ["ok", "4xx", "5xx", "421", "lost", "silent"]


@dataclass
class Driver:
    """Plays the shell: answers the core's commands from ``draw``."""

    relay: RelayCore
    draw: st.DataObject
    open: bool = False
    said_354: bool = False
    remote_ok: dict[int, Reply] = field(default_factory=dict)  # id(command) -> its 2xx
    dot_reply: Reply | None = None
    transactions_ended: int = 0

    def feed(self, event: Event) -> list[Reply]:
        """The replies the MTA gets for ``event``."""
        to_mta: list[Reply] = []
        commands = list(self.relay.handle(event))
        while commands:
            result = self.execute(commands.pop(0), to_mta)
            if result is not None:
                commands += self.relay.handle(result)
        # The core keeps in_transaction beside tx (an attribute the shell reads, not a
        # property): the two never disagree between events.
        assert self.relay.in_transaction == (self.relay.tx is not None)
        return to_mta

    def execute(self, command: Command, to_mta: list[Reply]) -> Event | None:
        if isinstance(command, ReplyMta):
            to_mta.append(command.reply)
        elif isinstance(command, TransactionEnded):
            self.transactions_ended += 1
        elif isinstance(command, CloseRemote):
            assert self.open, "closing a remote that is not open"
            self.open = self.said_354 = False
        elif isinstance(command, OpenRemote):
            assert not self.open, "a second remote while one is open"
            if self.draw.draw(st.booleans(), label="open fails"):
                return OpenFailed(Reply.make(451, "no mail server", enhanced="4.4.1"))
            self.open = True
            return RemoteOpened(remote())
        elif isinstance(command, ResolveNextHop):
            return NextHopResolved(self.draw.draw(st.sampled_from([GOOD, OTHER])))
        elif isinstance(command, SendRemote):
            return self.send(command)
        return None

    def send(self, command: SendRemote) -> Event:
        assert self.open, f"{command!r} on a closed remote"
        if EndOfData() in command.commands:
            assert self.said_354, "the final dot without a 354 to DATA"
        outcome = self.draw.draw(st.sampled_from(OUTCOMES), label=repr(command.commands))
        if outcome == "lost":
            return RemoteLost("closed")
        if outcome == "silent":
            return RemoteTimedOut(240)
        replies: list[Reply] = []
        for sent in command.commands:
            if isinstance(sent, DataChunk):
                continue
            reply = _reply(outcome, sent)
            replies.append(reply)
            if reply.code == 421:
                break
            if reply.is_success:
                self.remote_ok[id(sent)] = reply
            if isinstance(sent, Data):
                self.said_354 = reply.code == 354
            if isinstance(sent, EndOfData):
                self.dot_reply = reply
                self.said_354 = False
        return RemoteReplied(tuple(replies))


def _reply(outcome: str, sent: object) -> Reply:
    if outcome == "ok":
        if isinstance(sent, Data):
            return Reply.make(354, "go ahead")
        return Reply.make(250, f"ok {type(sent).__name__}", enhanced="2.0.0")
    code = {"4xx": 451, "5xx": 550, "421": 421}[outcome]
    return Reply.make(code, f"{outcome} {type(sent).__name__}", enhanced=f"{code // 100}.0.0")


def transaction(driver: Driver, recipients: list[str]) -> bool:
    """One transaction up to the final reply; False when the MTA was told 421 (its machine
    then closes the session)."""
    [mail_reply] = driver.feed(MtaCommand(Mail("s@sender.test")))
    assert mail_reply.code == 250  # egressd's own: the listener's pool
    accepted = 0
    for address in recipients:
        rcpt = Rcpt(address)
        [reply] = driver.feed(MtaCommand(rcpt))
        if reply.code == 421:
            return False
        if reply.is_success:
            assert driver.remote_ok.get(id(rcpt)) == reply
            accepted += 1
    if not accepted:
        return True  # the MTA's machine answers DATA with 503 itself
    [data_reply] = driver.feed(MtaCommand(Data()))
    if data_reply.code == 421:
        return False
    if data_reply.code != 354:
        return True
    assert driver.said_354
    chunk = DataChunk(b"Subject: x\r\n\r\nbody\r\n")
    assert driver.feed(MtaBody((chunk,))) == []
    [final] = driver.feed(MtaEndOfData((chunk,)))
    if final.is_success:
        assert final == driver.dot_reply  # the remote's own reply to the final dot
    return final.code != 421


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    recipients=st.lists(st.sampled_from(["a@good.test", "b@other.test"]), min_size=1, max_size=3),
    transactions=st.integers(1, 3),
    quit=st.booleans(),
)
def test_the_mta_gets_2xx_only_when_the_remote_said_it(
    data: st.DataObject, recipients: list[str], transactions: int, quit: bool
) -> None:
    driver = Driver(core(), data)
    clean = False
    for _ in range(transactions):
        ended_before = driver.transactions_ended
        if not transaction(driver, recipients):
            break
        if driver.relay.in_transaction:
            driver.feed(MtaCommand(Rset()))
        assert driver.transactions_ended == ended_before + 1
    else:
        if quit:
            [bye] = driver.feed(MtaCommand(Quit()))
            assert bye.code == 221
            clean = True
    driver.feed(SessionEnded(clean=clean))
    assert not driver.relay.in_transaction
    assert not driver.open  # the remote connection is closed when the session ends
