"""MTA-STS discovery and fetch (RFC 8461 section 3): the trio shell of :mod:`egressd.tlspolicy`.

Theory of operation
-------------------
:func:`mta_sts_policy` answers "which MTA-STS policy does this recipient domain have now?"
with a :class:`Lookup` (the policy, or None, and a note for the log):

1. the ``_mta-sts.<domain>`` TXT record, through ``[dns] nameservers`` (the resolver of
   :mod:`egressd.net.mx`); a missing, invalid or failed record gives no id;
2. the cache's decision (:func:`egressd.tlspolicy.mtasts.next_step`): use the cached
   policy, go without, or fetch;
3. the fetch: ``GET https://mta-sts.<domain>/.well-known/mta-sts.txt`` with httpx (on trio
   through anyio). ``mta-sts.<domain>`` is resolved through the same ``[dns]``
   nameservers, and each address is asked in turn with the name as SNI and Host, so the
   certificate must be valid for ``mta-sts.<domain>`` and chain to ``[smtp.tls] ca_file``
   (else the system store). No redirect is followed (section 3.3), only a 200 with
   ``text/plain`` counts, the body is capped at :data:`MAX_POLICY_SIZE` and the whole
   fetch at :data:`FETCH_SECONDS`. A failed fetch keeps a fresh cached policy.

:func:`run_refresher` runs for the daemon's life: every :data:`REFRESH_INTERVAL` it
fetches again the policies that are due (:meth:`~egressd.tlspolicy.MemoryPolicyStore.due`,
a day before they expire), one domain at a time (:func:`refresh_policy`: the TXT record
first; without one the policy is left to expire; a failed fetch keeps it and is tried
again at the next round).

The cache is a :class:`~egressd.tlspolicy.PolicyStore`; :data:`DEFAULT_STORE` keeps it in
memory for the process's life (across reloads), and where the daemon has a state store
(:mod:`egressd.warming`) its new entries are written with each flush and read back at
startup.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dns.exception
import dns.resolver
import httpx
import trio

from egressd.config import Config
from egressd.log import get_logger
from egressd.net.mx import resolver_for
from egressd.net.tls import client_context
from egressd.tlspolicy import (
    CachedPolicy,
    MemoryPolicyStore,
    MtaStsError,
    MtaStsPolicy,
    PolicyStore,
    parse_policy,
    parse_txt,
)
from egressd.tlspolicy.mtasts import after_failed_fetch, next_step

__all__ = [
    "DEFAULT_STORE",
    "FETCH_SECONDS",
    "MAX_POLICY_SIZE",
    "REFRESH_INTERVAL",
    "Lookup",
    "mta_sts_policy",
    "refresh_policy",
    "run_refresher",
]

MAX_POLICY_SIZE = 64 * 1024
FETCH_SECONDS = 10.0
POLICY_PORT = 443
REFRESH_INTERVAL = 3600.0
"""How often the refresher looks for policies due (well inside the one-day lead)."""
log = get_logger("smtp")
DEFAULT_STORE = MemoryPolicyStore()
"""The process's policy cache (persisted by the state flusher where a store exists)."""


@dataclass(frozen=True)
class Lookup:
    """A domain's MTA-STS policy now (None: none applies) and how it was found."""

    policy: MtaStsPolicy | None
    note: str


class FetchError(Exception):
    """The policy could not be fetched or parsed (the text says why)."""


async def mta_sts_policy(
    domain: str,
    config: Config,
    store: PolicyStore | None = None,
    now: Callable[[], float] = time.time,
) -> Lookup:
    """The MTA-STS policy of ``domain`` (cached in ``store``, by default
    :data:`DEFAULT_STORE`); see the module doc. Never raises for DNS or HTTPS trouble:
    that is a note, with the cached policy if it is still fresh."""
    store = DEFAULT_STORE if store is None else store
    domain = domain.lower().rstrip(".")
    policy_id = await _txt_id(domain, config)
    cached = store.get(domain)
    step = next_step(cached, policy_id, now())
    if step == "none":
        return Lookup(None, "no MTA-STS policy")
    if step == "cached" or policy_id is None:
        assert cached is not None
        return Lookup(cached.policy, f"MTA-STS policy id {cached.policy_id} (cached)")
    try:
        with trio.fail_after(FETCH_SECONDS):
            policy = await fetch_policy(domain, config)
    except (FetchError, trio.TooSlowError) as exc:
        why = str(exc) or f"no policy within {FETCH_SECONDS:g}s"
        kept = after_failed_fetch(cached, now())
        keeping = "keeping the cached policy" if kept else "no cached policy"
        return Lookup(kept, f"MTA-STS policy fetch for {domain} failed: {why}; {keeping}")
    store.put(domain, CachedPolicy(policy, policy_id, now()))
    return Lookup(policy, f"MTA-STS policy id {policy_id} (fetched)")


async def refresh_policy(
    domain: str,
    config: Config,
    store: PolicyStore | None = None,
    now: Callable[[], float] = time.time,
) -> str:
    """Fetch ``domain``'s policy again ahead of its expiry (the TXT record first: without
    one the policy is left to expire); a note on what happened, for the log."""
    store = DEFAULT_STORE if store is None else store
    policy_id = await _txt_id(domain, config)
    if policy_id is None:
        return "no valid _mta-sts TXT record: the cached policy is left to expire"
    try:
        with trio.fail_after(FETCH_SECONDS):
            policy = await fetch_policy(domain, config)
    except (FetchError, trio.TooSlowError) as exc:
        return f"fetch failed, tried again later: {str(exc) or 'timed out'}"
    store.put(domain, CachedPolicy(policy, policy_id, now()))
    return f"refreshed, id {policy_id}"


async def run_refresher(
    config: Callable[[], Config],
    store: MemoryPolicyStore | None = None,
    now: Callable[[], float] = time.time,
    refresh: Callable[[str, Config], Awaitable[str]] | None = None,
) -> None:
    """Every :data:`REFRESH_INTERVAL`, refresh the policies due (see the module doc), while
    ``config()`` has MTA-STS on; runs until cancelled. ``refresh`` defaults to
    :func:`refresh_policy` on ``store``."""
    cache = DEFAULT_STORE if store is None else store

    async def default(domain: str, current: Config) -> str:
        return await refresh_policy(domain, current, cache, now)

    refresh = refresh or default
    while True:
        await trio.sleep(REFRESH_INTERVAL)
        current = config()
        if not current.smtp.tls.mta_sts:
            continue
        for domain in cache.due(now()):
            note = await refresh(domain, current)
            log.info("mta-sts refresh", extra={"fields": {"domain": domain, "note": note}})


async def _txt_id(domain: str, config: Config) -> str | None:
    """The id of the domain's ``_mta-sts`` TXT record, or None (none, invalid, failed)."""
    try:
        answer = await resolver_for(config.dns).resolve(f"_mta-sts.{domain}", "TXT", search=False)
    except dns.exception.DNSException:
        return None
    records = [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]
    try:
        return parse_txt(records)
    except MtaStsError:
        return None


async def fetch_policy(domain: str, config: Config) -> MtaStsPolicy:
    """Fetch and parse ``https://mta-sts.<domain>/.well-known/mta-sts.txt``; raises
    :class:`FetchError`. The caller bounds the time."""
    host = f"mta-sts.{domain}"
    errors: list[str] = []
    for address in await _addresses(host, config):
        try:
            return parse_policy(await _get(host, address, config))
        except MtaStsError as exc:
            raise FetchError(f"invalid policy at {host}: {exc}") from exc
        except FetchError as exc:
            errors.append(str(exc))
    raise FetchError("; ".join(errors) or f"{host} has no address")


async def _addresses(host: str, config: Config) -> list[str]:
    resolver = resolver_for(config.dns)
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
        except dns.exception.DNSException:
            continue
        found.extend(str(rdata.address) for rdata in answer)
    return found


async def _get(host: str, address: str, config: Config) -> str:
    """One GET of the policy from ``address``, with ``host`` as SNI and Host."""
    literal = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    url = f"https://{literal}:{POLICY_PORT}/.well-known/mta-sts.txt"
    context = client_context(True, config.smtp.tls.ca_file)
    where = f"{host}[{address}]"
    try:
        async with (
            httpx.AsyncClient(verify=context, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "GET", url, headers={"Host": host}, extensions={"sni_hostname": host}
            ) as response,
        ):
            _check_response(where, response)
            return await _body(where, response)
    except httpx.HTTPError as exc:
        raise FetchError(f"{where}: {_http_error_text(exc)}") from exc


def _check_response(where: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        raise FetchError(
            f"{where} answered HTTP {response.status_code} (redirects are not followed)"
        )
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "text/plain":
        raise FetchError(f"{where} served {media_type or 'no media type'}, not text/plain")


async def _body(where: str, response: httpx.Response) -> str:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_POLICY_SIZE:
            raise FetchError(f"{where}: the policy is larger than {MAX_POLICY_SIZE} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{where}: the policy is not UTF-8") from exc


def _http_error_text(exc: httpx.HTTPError) -> str:
    cause = exc.__context__ or exc.__cause__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text
