"""Transcripts for the relay core: events in, the exact commands out, in order.

A transcript alternates an event (``>>``, what happened) with the commands the core must
answer it with (``<<``), exactly and in order::

    play(core,
        MtaCommand(Rcpt("r@good.test")),           # >> the MTA's RCPT
            OpenRemote("main", "good.test"),       # << open a remote through pool main
        RemoteOpened(remote()),                    # >> it is open
            SendRemote((MAIL, RCPT), "MAIL FROM and RCPT TO"),
        ...
    )

Events and commands are told apart by type. The world the core reads (configuration,
sources' health) is a frozen :class:`~egressd.config.Config` and a set of suspended names.
"""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from egressd.config import Config, Pool, PoolEntry, SmtpSettings, Source
from egressd.net.mx import MxHost, NextHop
from egressd.proto.smtp_common import Mail, Rcpt, Reply
from egressd.relay.core import RelayCore
from egressd.relay.events import Command, Event, Remote

EVENTS = typing.get_args(Event)

A = Source("a", source_address=ipaddress.ip_address("127.0.0.3"), ehlo_domain="out-a.test")
B = Source("b", source_address=ipaddress.ip_address("127.0.0.4"), ehlo_domain="out-b.test")

GOOD = NextHop(
    "good.test", "mx", (MxHost("mx.good.test", 10, (ipaddress.ip_address("127.0.0.1"),)),)
)
ALIAS = NextHop(
    "alias.test", "mx", (MxHost("mx.alias.test", 10, (ipaddress.ip_address("127.0.0.1"),)),)
)
OTHER = NextHop(
    "other.test", "mx", (MxHost("mx.other.test", 10, (ipaddress.ip_address("127.0.0.2"),)),)
)

EXTENSIONS = {"PIPELINING": "", "8BITMIME": "", "SIZE": "100000", "ENHANCEDSTATUSCODES": ""}

MAIL = Mail("a@sender.test")
RCPT = Rcpt("one@good.test")
RCPT2 = Rcpt("two@good.test")

OK = Reply.make(250, "Ok", enhanced="2.0.0")
QUEUED = Reply.make(250, "queued as R1", enhanced="2.0.0")
GO_AHEAD = Reply.make(354, "End data with <CR><LF>.<CR><LF>")
MAIL_OK = Reply.make(250, "Sender OK", enhanced="2.1.0")
RESET = Reply.make(250, "Reset state", enhanced="2.0.0")
BYE = Reply.make(221, "relay.test closing connection", enhanced="2.0.0")
BAD_SEQUENCE = Reply.make(503, "Bad sequence of commands", enhanced="5.5.1")
GOING_DOWN = Reply.make(421, "remote going down", enhanced="4.3.2")


def config(
    *,
    max_message_size: int = 0,
    sender_pools: Mapping[str, str] | None = None,
    sources: Mapping[str, Source] | None = None,
) -> Config:
    """Sources a (pool main) and b (pool other)."""
    return Config(
        path=Path("egressd.toml"),
        sources=dict(sources or {"a": A, "b": B}),
        pools={
            "main": Pool("main", (PoolEntry("a"),)),
            "other": Pool("other", (PoolEntry("b"),)),
        },
        smtp=SmtpSettings(max_message_size=max_message_size, sender_pools=sender_pools or {}),
    )


@dataclass
class Health:
    suspended: set[str] = field(default_factory=set)

    def is_suspended(self, name: str) -> bool:
        return name in self.suspended


@dataclass
class World:
    """What the core reads at each MAIL: the configuration and the sources' health."""

    config: Config = field(default_factory=config)
    health: Health = field(default_factory=Health)


def core(world: World | None = None, listener_pool: str | None = "main") -> RelayCore:
    """A core on a fake clock that advances 0.25 s each time it is read."""
    the_world = world or World()
    ticks = iter(range(1_000_000))
    return RelayCore(
        "relay.test", listener_pool, lambda: the_world, clock=lambda: next(ticks) * 0.25
    )


def remote(
    source: Source = A,
    next_hop: NextHop = GOOD,
    address: str = "127.0.0.1",
    extensions: Mapping[str, str] = EXTENSIONS,
) -> Remote:
    host = next_hop.hosts[0].name
    text = f"{host}[{address}]:25"
    return Remote(
        source=source,
        next_hop=next_hop,
        next_hop_address=(ipaddress.ip_address(address), 25),
        remote_text=text,
        describe=f'source "{source.name}" ({source.source_address}) to {text}',
        mx_name=host,
        local_address=f"{source.source_address}:40000",
        extensions=dict(extensions),
    )


def play(relay: RelayCore, *steps: Event | Command) -> None:
    """Feed each event in ``steps``; the commands that follow it must be exactly what the
    core returns for it."""
    at = 0
    while at < len(steps):
        event = steps[at]
        assert isinstance(event, EVENTS), f"step {at} is not an event: {event!r}"
        end = at + 1
        while end < len(steps) and not isinstance(steps[end], EVENTS):
            end += 1
        expected = list(steps[at + 1 : end])
        got = relay.handle(event)
        assert got == expected, (
            f"\n>> {event!r}\n<< expected {_lines(expected)}\n<< got      {_lines(got)}"
        )
        at = end


def _lines(commands: Sequence[object]) -> str:
    return "\n             ".join(repr(c) for c in commands) or "(nothing)"


def temp(enhanced: str, text: str, code: int = 451) -> Reply:
    return Reply.make(code, text, enhanced=enhanced)
