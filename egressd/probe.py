"""``egressd probe``: the operator's plumbing test before going live.

Dial a destination through one source (or a pool's next source) exactly as a front door
would, read the server's first line, and report which path and address were used.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from egressd.config import Config, format_hostport
from egressd.health import SourceHealth
from egressd.net.dialer import Dialed, DialError
from egressd.net.egress import Egress, EgressRefused
from egressd.pools import PoolSet

MAX_GREETING = 1024


class ProbeFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProbeResult:
    source: str
    via: str
    local_address: tuple[str, int]
    remote_address: tuple[str, int]
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
        dialed = await egress.connect(host, port, pool=pool, source=chosen)
    except EgressRefused as exc:
        raise ProbeFailed(
            "config" if exc.kind.startswith("unknown") else exc.kind, str(exc)
        ) from None
    except DialError as exc:
        raise ProbeFailed(str(exc.kind), str(exc)) from None
    async with dialed.stream:
        greeting = await read_first_line(dialed, config.dial.timeout)
    return ProbeResult(
        source=dialed.source.name,
        via=dialed.via,
        local_address=dialed.local_address,
        remote_address=dialed.remote_address,
        greeting=greeting,
    )


async def read_first_line(dialed: Dialed, timeout: float) -> str:
    data = dialed.initial_data
    with trio.move_on_after(timeout) as scope:
        while b"\n" not in data and len(data) < MAX_GREETING:
            chunk = await dialed.stream.receive_some(MAX_GREETING)
            if not chunk:
                break
            data += chunk
    if not data:
        reason = f"no greeting within {timeout:g}s" if scope.cancelled_caught else "closed"
        raise ProbeFailed("no_greeting", f"connected, but the server sent nothing ({reason})")
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
