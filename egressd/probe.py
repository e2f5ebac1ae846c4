"""``egressd probe``: the operator's plumbing test before going live.

Dial a destination through one source (or a pool's next source) exactly as a front door
would (the same plan, executor and deadline), read the server's first line, and report
which path and address were used. Each wait is bounded here, by the caller of the wait:
the dial by the plan's deadline, the greeting by ``[dial] timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from egressd.config import Config, IPAddress, format_hostport
from egressd.egress import Egress, EgressFailure, Failure, Plan
from egressd.health import SourceHealth
from egressd.net.egress import connect_within
from egressd.pools import PoolSet

MAX_GREETING = 1024

_CONFIG_KINDS = frozenset({Failure.UNKNOWN_POOL, Failure.UNKNOWN_SOURCE})


class ProbeFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProbeResult:
    source: str
    via: str
    local_address: tuple[IPAddress, int]
    remote_address: tuple[IPAddress, int]
    greeting: str

    def as_json(self) -> dict[str, str]:
        return {
            "source": self.source,
            "via": self.via,
            "local_address": format_hostport(*self.local_address),
            "remote_address": format_hostport(*self.remote_address),
            "greeting": self.greeting,
        }


def run_probe(
    config: Config, *, source: str | None, pool: str | None, host: str, port: int | None
) -> ProbeResult:
    return trio.run(probe, config, source, pool, host, port)


async def probe(
    config: Config, source: str | None, pool: str | None, host: str, port: int | None
) -> ProbeResult:
    egress = Egress(config, PoolSet.from_config(config), SourceHealth(config.sources))
    try:
        chosen = egress.source_named(source) if source is not None else None
        plan = Plan(egress, pool=pool, source=chosen, host=host, port=port)
        dialed = await connect_within(plan)
    except EgressFailure as exc:
        kind = "config" if exc.kind in _CONFIG_KINDS else str(exc.kind)
        raise ProbeFailed(kind, str(exc)) from None
    timeout = config.dial.timeout
    data = bytearray(dialed.initial_data)
    async with dialed.stream:
        with trio.move_on_after(timeout) as scope:
            await read_first_line(dialed.stream, data)
    if not data:
        reason = f"no greeting within {timeout:g}s" if scope.cancelled_caught else "closed"
        raise ProbeFailed("no_greeting", f"connected, but the server sent nothing ({reason})")
    return ProbeResult(
        source=dialed.source.name,
        via=dialed.via,
        local_address=dialed.local_address,
        remote_address=dialed.remote_address,
        greeting=data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace"),
    )


async def read_first_line(stream: trio.abc.ReceiveStream, data: bytearray) -> None:
    """Append what the server sends to ``data`` up to its first line end (or EOF, or
    MAX_GREETING bytes). No timeout: whatever arrived before the caller's deadline stays
    in ``data``."""
    while b"\n" not in data and len(data) < MAX_GREETING:
        chunk = await stream.receive_some(MAX_GREETING)
        if not chunk:
            return
        data += chunk
