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

The TLS part (:func:`tls_text`) says which TLS policy the SMTP door applies to the
domain's mail and where it comes from: the ``[smtp.tls.policy]`` entry or ``[smtp.tls]``'s
default, the domain's MTA-STS policy (looked up and fetched now, into a cache of its own:
the daemon may still hold an older copy until the TXT id changes or its copy expires), and
with DANE on, what DNSSEC says of each MX host; then, per MX host, the policy that wins
(:mod:`egressd.tlspolicy.choice`: DANE over MTA-STS over the default).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import trio

from egressd.config import Config
from egressd.net.dane import dane_hosts
from egressd.net.mtasts import mta_sts_policy
from egressd.net.mx import NextHop, NextHopError, resolve_next_hop
from egressd.net.shaping import load_policy, lookup_mx
from egressd.pools import NoSourcesAvailable, PoolSelector
from egressd.shaping import ShapingPolicy
from egressd.shaping.sites import Destination, smtp_destination
from egressd.status import ControlError, ask
from egressd.tlspolicy import MemoryPolicyStore, TlsPolicy, configured_policy, with_mta_sts
from egressd.tlspolicy.choice import dane_policy, wants_dane
from egressd.tlspolicy.dane import DaneHost

__all__ = ["command_explain", "format_live", "format_static", "tls_text"]


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
    print(tls_text(config, domain), file=out, end="")
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


# --------------------------------------------------------------------------- TLS


def tls_text(config: Config, domain: str) -> str:
    """The TLS policy of ``domain``'s mail, from where, and per MX host (see the module
    doc). Runs its own trio loop for the look-ups (``explain`` is synchronous)."""
    lines = trio.run(_tls_lines, config, domain.lower().rstrip("."))
    return "\n" + "\n".join(lines) + "\n"


async def _tls_lines(config: Config, domain: str) -> list[str]:
    tls = config.smtp.tls
    override = tls.policy.get(domain)
    policy = configured_policy(tls.mode, tls.verify, override)
    lines = ["TLS (SMTP door):", f"  {_configured_text(config, domain, policy)}"]
    try:
        next_hop = await resolve_next_hop(domain, config, None)
    except NextHopError as exc:
        return [*lines, f"  next hop: {exc.text}"]
    from_dns = next_hop.kind in ("mx", "implicit")
    if not tls.mta_sts:
        lines.append("  MTA-STS: off ([smtp.tls] mta_sts = false)")
    elif override is not None:
        lines.append("  MTA-STS: not looked up (the [smtp.tls.policy] entry wins)")
    elif not from_dns:
        lines.append(f"  MTA-STS: not for a {next_hop.kind} next hop (only for MX records)")
    else:
        lookup = await mta_sts_policy(domain, config, MemoryPolicyStore())
        described = lookup.policy.describe(domain) if lookup.policy else "none"
        lines.append(f"  MTA-STS: {described} [{lookup.note}]")
        policy = with_mta_sts(policy, lookup.policy, domain)
    dane: dict[str, DaneHost] = {}
    if not wants_dane(tls.dane, override):
        lines.append("  DANE: off ([smtp.tls] dane, or the override dane, turns it on)")
    elif not from_dns:
        lines.append(f"  DANE: not for a {next_hop.kind} next hop (only for MX records)")
    else:
        dane = await dane_hosts(next_hop, config)
        lines += [f"  DANE: {_dane_text(state)}" for state in dane.values()]
    return lines + _host_lines(next_hop, policy, dane)


def _configured_text(config: Config, domain: str, policy: TlsPolicy) -> str:
    override = config.smtp.tls.policy.get(domain)
    if override is not None:
        return f"[smtp.tls.policy] {domain} = {override}: {policy.label}"
    tls = config.smtp.tls
    verify = "true" if tls.verify else "false"
    return f"[smtp.tls] mode = {tls.mode}, verify = {verify}: {policy.label}"


def _dane_text(state: DaneHost) -> str:
    if state.state == "dane" and not state.usable:
        return f"{state.describe()}: none usable, TLS required without authentication"
    if state.state == "failed":
        return f"{state.host}: look-up failed, the host is not used ({state.why})"
    return state.describe()


def _host_lines(next_hop: NextHop, policy: TlsPolicy, dane: dict[str, DaneHost]) -> list[str]:
    lines = []
    for host in next_hop.hosts:
        state = dane.get(host.name)
        if state is not None and state.state == "failed":
            applied = "not used (its DANE look-up failed)"
        elif state is not None and state.state == "dane":
            applied = dane_policy(state).label
        elif policy.allows_mx(host.name) or policy.testing:
            applied = policy.label
        else:
            applied = f"not used (not allowed by the {policy.origin})"
        lines.append(f"  MX {host.name}: {applied}")
    return lines


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
