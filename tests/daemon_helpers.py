"""Run an in-process egressd daemon for end-to-end tests of the front doors.

``port_of`` tells a listener's port; ``recording_daemon`` also collects the session
record of every connection that ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from egressd.config import load_config
from egressd.daemon import Daemon, Door, serve
from egressd.runtime import SessionRecord


@asynccontextmanager
async def running_daemon(
    config_text: str, directory: Path, doors: dict[str, Door] | None = None
) -> AsyncIterator[Daemon]:
    """Write ``config_text`` as egressd.toml in ``directory``, serve it, stop at exit.

    ``doors`` replaces the daemon's front doors (e.g. ``{"smtp": SmtpDoor()}``), so a door's
    tests need no other door's module.
    """
    path = directory / "egressd.toml"
    path.write_text(config_text)
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(partial(serve, config, doors=doors))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


def port_of(daemon: Daemon, door: str, index: int = 0) -> int:
    """The real port of the door's ``index``-th listener, in configuration order."""
    ports = [port for (name, _), port in daemon.bound_ports().items() if name == door]
    return ports[index]


@dataclass
class RecordingDaemon:
    """A running daemon, its door under test, and the records of sessions that ended."""

    daemon: Daemon
    door: str
    records: list[SessionRecord] = field(default_factory=list)

    @property
    def port(self) -> int:
        return port_of(self.daemon, self.door)

    async def record(self, count: int = 1) -> SessionRecord:
        """The ``count``-th session record (sessions log when they end)."""
        with trio.fail_after(5):
            while len(self.records) < count:
                await trio.sleep(0.01)
        return self.records[count - 1]


@asynccontextmanager
async def recording_daemon(
    config_text: str, directory: Path, door: str
) -> AsyncIterator[RecordingDaemon]:
    """:func:`running_daemon`, collecting every session record for ``door``'s tests."""
    async with running_daemon(config_text, directory) as daemon:
        recording = RecordingDaemon(daemon, door)
        daemon.runtime.session_hooks.append(recording.records.append)
        yield recording


def cold_and_warm_sources(
    remote_port: int | None = None,
    *,
    warming: bool = True,
    cold: str = "127.0.0.3",
    warm: str = "127.0.0.4",
) -> str:
    """Config lines: pool "main" of source "cold" (warming on plan "test" unless
    ``warming`` is false) weighted 1000 against source "warm" weighted 1, both sending to
    ``remote_port`` when given: the cold source takes every message its warm-up allows."""
    port = "" if remote_port is None else f"remote_port = {remote_port}\n"
    plan = 'warmup = "test"\n' if warming else ""
    return f"""
[source."cold"]
source_address = "{cold}"
{port}{plan}[source."warm"]
source_address = "{warm}"
{port}[pool."main"."cold"]
weight = 1000
[pool."main"."warm"]
weight = 1
"""


def cold_and_warm_pool(quota: int, mx_port: int) -> str:
    """Config lines: :func:`cold_and_warm_sources` on plan "test" of ``quota`` a day, every
    domain routed to the sink on ``mx_port``: the cold source takes every message until its
    quota is used."""
    return f"""
[smtp.routes]
"*" = "127.0.0.1:{mx_port}"
[warmup.plan.test]
days = [{quota}]
{cold_and_warm_sources()}"""


def smtp_door_lines(
    nameserver: object,
    *,
    shaping: bool = False,
    control: object | None = None,
    state: object | None = None,
    home: Path | None = None,
    port: int = 0,
) -> str:
    """Config lines: the SMTP door on 127.0.0.1:``port`` for pool "main", resolving through
    the test's dnsmasq at ``nameserver`` with no destination denied (everything is on
    loopback); ``shaping_files = ["shaping.toml"]`` first when ``shaping``, and a control
    socket and a state directory when given (``home``: both, as ``home/control.sock`` and
    ``home/state``). Top-level keys come first, so put it at the head of a configuration."""
    if home is not None:
        control, state = home / "control.sock", home / "state"
    lines = ['shaping_files = ["shaping.toml"]'] if shaping else []
    lines += ["[dns]", f'nameservers = ["{nameserver}"]', "[access]", "deny_destinations = []"]
    if control is not None:
        lines += ["[control]", f'socket = "{control}"']
    lines += ["[[smtp.listener]]", f'address = "127.0.0.1:{port}"', 'pool = "main"']
    if state is not None:
        lines += ["[state]", f'directory = "{state}"']
    return "\n".join(lines)
