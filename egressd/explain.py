"""``egressd explain DOMAIN [--pool P]``: why mail to a domain leaves the way it does.

Theory of operation
-------------------
Everything that does not need the running daemon is computed here, from the files on disk:
the domain's MX records (through ``[dns]``) and the site they make, the provider that
matched and why, and each source's effective limits with the file and section of each
value (:meth:`egressd.shaping.Limits.explain`). Then the daemon is asked over
``[control] socket`` (``{"command": "explain", ...}`` with the MX records resolved here, so
the daemon does no DNS for it) for what only it knows: each budget's use, the active
suspensions and overrides on this destination, and the source the pool would pick next
(on a copy of the selector: asking consumes no turn). Without a reachable daemon this is
said, and the next pick is that of a fresh selector.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from egressd.config import Config
from egressd.net.shaping import load_policy, lookup_mx
from egressd.pools import NoSourcesAvailable, PoolSelector
from egressd.shaping import ShapingPolicy
from egressd.shaping.sites import Destination, smtp_destination
from egressd.status import ControlError, ask

__all__ = ["command_explain", "format_live", "format_static"]


def command_explain(config: Config, domain: str, pool: str | None, out: TextIO) -> int:
    """Print the explanation; 1 when the pool is unknown or the MX lookup fails."""
    pools = [pool] if pool is not None else list(config.pools)
    unknown = [name for name in pools if name not in config.pools]
    if unknown:
        print(f"egressd: unknown pool {unknown[0]!r} (pools: {', '.join(config.pools)})", file=out)
        return 1
    records = lookup_mx(domain, config.dns)
    if records is None:
        print(f"egressd: the MX lookup of {domain} failed (see [dns])", file=out)
        return 1
    policy = load_policy(config)
    destination = smtp_destination(domain, records)
    print(format_static(config, policy, destination, records, pools), file=out, end="")
    for name in pools:
        print(f"\npool {name}, now:", file=out)
        print(_live_text(config, domain, records, name), file=out, end="")
    return 0


def format_static(
    config: Config,
    policy: ShapingPolicy | None,
    destination: Destination,
    records: Sequence[tuple[int, str]],
    pools: Sequence[str],
) -> str:
    """MX hosts, site, provider and why, and each pool's sources' effective limits."""
    lines = [f"domain {destination.domain}"]
    lines += [f"  MX {pref} {host.lower().removesuffix('.')}" for pref, host in sorted(records)]
    lines.append(f"  site {destination.site}")
    if policy is None:
        lines.append("no shaping_files in the configuration: no provider, no shaping limits")
        return "\n".join(lines) + "\n"
    provider = policy.provider_of(destination)
    if provider is None:
        lines.append('provider: none matched (metrics count it as provider="other")')
    else:
        lines.append(f"provider {provider[0]}: {provider[1]}")
    for name in pools:
        for entry in config.pools[name].entries:
            limits = policy.limits(entry.source, destination)
            lines.append(f"\npool {name}, source {entry.source} (weight {entry.weight}):")
            lines += [f"  {line}" for line in limits.explain()]
    return "\n".join(lines) + "\n"


def _live_text(config: Config, domain: str, records: Sequence[tuple[int, str]], pool: str) -> str:
    socket = config.control.socket
    reason = "[control] socket is not set"
    if socket is not None:
        request = {"command": "explain", "domain": domain, "mx": list(records), "pool": pool}
        try:
            reply = ask(socket, request)
        except ControlError as exc:
            reason = str(exc)
        else:
            if reply.get("ok"):
                return format_live(reply["explain"])
            reason = f"the daemon refused: {reply.get('error')}"
    return (
        f"  the daemon was not asked ({reason}): usage and suspensions unknown\n"
        f"  next pick of a fresh selector: {_fresh_pick(config, pool)}\n"
    )


def _fresh_pick(config: Config, pool: str) -> str:
    try:
        return PoolSelector(config.pools[pool]).next()
    except NoSourcesAvailable:
        return "none (the pool has no source with a weight)"


def format_live(reply: Mapping[str, Any]) -> str:
    """The daemon's part: usage per source, active suspensions and overrides, next pick."""
    lines = []
    for source, used in reply["usage"].items():
        lines.append(f"  source {source}:")
        lines += [f"    {line}" for line in used] or ["    no budget"]
    for effect in reply["active"]:
        lines.append(
            f"  {effect['rule']} on ({effect['source']}, {effect['kind']} {effect['name']}) "
            f"until {_clock(effect['until'])}: {effect['reason']}"
        )
    if not reply["active"]:
        lines.append("  no active suspension or override for this destination")
    if reply["next"] is not None:
        lines.append(f"  next pick: {reply['next']}")
    else:
        lines.append(f"  next pick: none ({reply['next_refused']})")
    return "\n".join(lines) + "\n"


def _clock(until: object) -> str:
    if isinstance(until, bool) or not isinstance(until, (int, float)):
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
    except (OverflowError, OSError, ValueError):
        return repr(until)
