"""What ``egressd check`` adds to validation: file errors, warnings, ``--effective``.

Theory of operation
-------------------
A configuration can be valid and still not work on this host. :func:`config_warnings`
looks for what a mail operator finds out the hard way, without failing the check:

* a ``source_address`` that is not on this host: binding it fails with EADDRNOTAVAIL, so
  every connection through that source fails as ``unplumbed`` (found by binding a socket
  to it, port 0, as the dialer would);
* two sources with the same address: SOCKS5 BIND (KumoMTA's way of naming a source) and
  the PROXY door map an address back to one source, and only one can win
  (:meth:`~egressd.config.Config.source_for_address` says which);
* an EHLO name whose A/AAAA records do not include the address the destination sees.
  Gmail and Microsoft reject mail from an address without forward-confirmed reverse DNS
  (the PTR's name must resolve back to the address; the EHLO name should be that name).
  Only when DNS answers: a timeout or an unreachable resolver skips the remaining names
  (one note says so) rather than hold up ``check``; each lookup waits at most
  :data:`DNS_LIFETIME` seconds;
* DANE on (``[smtp.tls] dane``, or an override ``dane``) with a resolver that does not
  validate DNSSEC: DANE trusts the resolver's AD bit and would never apply. The resolver is
  asked for the DNSKEY of ``[smtp.tls] dane_probe`` (the root by default: a name that is
  signed) with the AD and DO bits, once, within :data:`DNS_LIFETIME` seconds.

:func:`effective_settings` walks the loaded :class:`~egressd.config.Config` (frozen
dataclasses) next to a default-built one, and prints each setting as ``key = value``, with
``# default: ...`` where the value differs, as ``postconf -n`` / ``postconf -d`` would
together. Secrets (passwords, ``[auth.users]``) are printed as ``"***"``.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.nameserver
import dns.resolver

from egressd.config import Config, DnsSettings, Endpoint, IPAddress, Source
from egressd.net.mx import blocking_resolver
from egressd.net.tls import load_server_context as server_context

DNS_LIFETIME = 3.0
LOCAL_NAMES = ("localhost", ".localhost", ".invalid")
SECRET_WORDS = ("password", "auth")
TABLE_NAMES = {"sources": "source", "pools": "pool"}


def config_errors(config: Config) -> list[str]:
    """What makes ``check`` fail beyond validation: files the daemon would fail to use.

    Every TLS certificate and key is loaded as its door loads it (a reload re-reads them),
    so ``systemctl reload`` (which runs ``check -q`` first) and the daemon's own reload
    refuse a renewal that left a certificate and a key that do not match, and ``run``
    refuses to start with one (exit 78) rather than answer 454 to every STARTTLS.
    """
    errors: list[str] = []
    tls = config.smtp.tls
    if tls.certificate is not None and tls.private_key is not None:
        problem = _tls_problem(tls.certificate, tls.private_key, None)
        if problem is not None:
            errors.append(f"{config.path}: smtp.tls.certificate: {problem}")
    for index, listener in enumerate(config.socks5_listeners):
        certificate, key = listener.tls_certificate, listener.tls_private_key
        if not listener.use_tls or certificate is None or key is None:
            continue
        problem = _tls_problem(certificate, key, listener.tls_required_client_ca)
        if problem is not None:
            errors.append(f"{config.path}: socks5.listener[{index}].tls_certificate: {problem}")
    return errors


def _tls_problem(certificate: str, private_key: str, client_ca: str | None) -> str | None:
    try:
        server_context(certificate, private_key, client_ca)
    except (OSError, ssl.SSLError) as exc:
        ca = f" and tls_required_client_ca {client_ca}" if client_ca is not None else ""
        return (
            f"cannot load certificate {certificate} with private_key {private_key}{ca}:"
            f" {_load_error(exc)}"
        )
    return None


def _load_error(exc: OSError | ssl.SSLError) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def config_warnings(config: Config) -> list[str]:
    """Every warning about ``config`` on this host, one line each."""
    return [
        *unplumbed_addresses(config),
        *shared_addresses(config),
        *socks5_going_direct(config),
        *ehlo_mismatches(config, ehlo_resolver(config.dns)),
        *dane_resolver_warnings(config),
    ]


# --------------------------------------------------------------------------- addresses


def is_local_address(address: IPAddress) -> bool:
    """False only when the kernel says the address is not on this host (EADDRNOTAVAIL)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def unplumbed_addresses(config: Config) -> Iterator[str]:
    for source in config.sources.values():
        address = source.source_address
        if address is not None and not is_local_address(address):
            yield (
                f'source "{source.name}": source_address {address} is not an address of this '
                "host; connections through it fail (unplumbed) until it is added"
            )


def source_addresses(source: Source) -> set[IPAddress]:
    """The addresses a BIND request or a PROXY header can name ``source`` by."""
    candidates = (
        source.source_address,
        source.ha_proxy_source_address,
        source.socks5_proxy_source_address,
    )
    return {address for address in candidates if address is not None}


def shared_addresses(config: Config) -> Iterator[str]:
    users: dict[IPAddress, list[str]] = {}
    for source in config.sources.values():
        for address in source_addresses(source):
            users.setdefault(address, []).append(source.name)
    for address, names in users.items():
        if len(names) < 2:
            continue
        winner = config.source_for_address(address)
        listed = ", ".join(f'"{name}"' for name in names)
        yield (
            f"sources {listed} share the address {address}: a SOCKS5 BIND to it and a PROXY "
            f'header from it always mean "{winner.name if winner else names[0]}"'
        )


def socks5_going_direct(config: Config) -> Iterator[str]:
    """Sources whose socks5_proxy_server KumoMTA (and so egressd) ignores: they go direct."""
    for source in config.sources.values():
        if source.socks5_ignored:
            yield (
                f'source "{source.name}": socks5_proxy_server {source.socks5_proxy_server} is '
                "not used: without socks5_proxy_source_address KumoMTA (and egressd) connect "
                "directly; set socks5_proxy_source_address for KumoMTA's BIND, or "
                "egressd_socks5_plain_connect = true for a plain CONNECT (Dante, 3proxy)"
            )


# --------------------------------------------------------------------------- EHLO names


class DnsUnavailable(Exception):
    """DNS did not answer (timeout, no reachable resolver): checking further is pointless."""


def ehlo_resolver(settings: DnsSettings) -> dns.resolver.Resolver | None:
    """A resolver for ``[dns]`` (or the system's), each query bounded; None without one."""
    return blocking_resolver(settings, DNS_LIFETIME)


def needs_ehlo_check(source: Source) -> bool:
    name = source.ehlo_domain
    if not name or source.egress_address is None or name.startswith("["):
        return False
    lowered = name.lower().rstrip(".")
    return not any(lowered == s or lowered.endswith(s) for s in LOCAL_NAMES if s)


def ehlo_mismatches(config: Config, resolver: dns.resolver.Resolver | None) -> Iterator[str]:
    if resolver is None:
        return
    for source in config.sources.values():
        if not needs_ehlo_check(source):
            continue
        assert source.ehlo_domain is not None and source.egress_address is not None
        try:
            problem = ehlo_problem(resolver, source.ehlo_domain, source.egress_address)
        except DnsUnavailable as exc:
            yield f"EHLO names not checked: DNS did not answer ({exc})"
            return
        if problem is not None:
            yield f'source "{source.name}": ehlo_domain {source.ehlo_domain} {problem}'


def ehlo_problem(resolver: dns.resolver.Resolver, name: str, address: IPAddress) -> str | None:
    """Why ``name`` does not resolve to ``address``, or None when it does."""
    rdtype = "AAAA" if address.version == 6 else "A"
    try:
        answer = resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return f"has no {rdtype} record; it should resolve to {address} (FCrDNS)"
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise DnsUnavailable(str(exc) or type(exc).__name__) from exc
    found = sorted({ipaddress.ip_address(record.address) for record in answer}, key=str)
    if address in found:
        return None
    shown = ", ".join(str(item) for item in found)
    return f"resolves to {shown}, not to {address}; the source's address needs FCrDNS"


# --------------------------------------------------------------------------- DANE


def dane_resolver_warnings(config: Config) -> Iterator[str]:
    """A warning when DANE is on and ``[dns]``'s resolver does not validate DNSSEC."""
    tls = config.smtp.tls
    if not tls.dane and "dane" not in tls.policy.values():
        return
    resolver = blocking_resolver(config.dns, DNS_LIFETIME)
    if resolver is None:
        yield "smtp.tls.dane: no resolver configured ([dns] nameservers): DANE cannot apply"
        return
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.use_edns(0, dns.flags.DO, 1232)
    probe = tls.dane_probe
    try:
        answer = resolver.resolve(probe, "DNSKEY", search=False)
    except dns.exception.DNSException as exc:
        yield (
            f"smtp.tls.dane: cannot tell whether the resolver validates DNSSEC: the DNSKEY "
            f"look-up of {probe} failed ({str(exc) or type(exc).__name__}); DANE applies "
            "only to answers with the AD bit (set [smtp.tls] dane_probe to a signed name)"
        )
        return
    if not answer.response.flags & dns.flags.AD:
        yield (
            f"smtp.tls.dane: the resolver does not validate DNSSEC (no AD bit on the DNSKEY "
            f"of {probe}): DANE will never apply; use a validating resolver (unbound) on "
            "this host in [dns] nameservers"
        )


# --------------------------------------------------------------------------- --effective


def effective_settings(config: Config) -> list[str]:
    """``key = value`` for every setting, ``# default: ...`` where it differs."""
    default = Config(path=config.path, sources={}, pools={})
    return [
        _line(key, value, default_value)
        for key, value, default_value in _walk(config, default, "")
        if key != "path"
    ]


def _line(key: str, value: Any, default: Any) -> str:
    shown = _secret(key, value)
    text = f"{key} = {shown}"
    if default is not _NO_DEFAULT and _secret(key, default) != shown:
        text += f"  # default: {_secret(key, default)}"
    return text


_NO_DEFAULT = object()


def _secret(key: str, value: Any) -> str:
    if value is None or value == {} or not any(word in key for word in SECRET_WORDS):
        return _format(value)
    if isinstance(value, Mapping):
        return _format({name: "***" for name in value})
    return '"***"'


def _walk(value: Any, default: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, default value) for each leaf of a settings dataclass."""
    for field in dataclasses.fields(value):
        if field.name.startswith("_") or (field.name == "name" and prefix):
            continue
        key = prefix + TABLE_NAMES.get(field.name, field.name)
        item = getattr(value, field.name)
        base = getattr(default, field.name, _NO_DEFAULT)
        if _is_table(item):
            yield from _walk(item, base, key + ".")
        elif isinstance(item, Mapping) and field.name in TABLE_NAMES:
            for name, entry in item.items():
                yield from _walk(entry, type(entry)(name=name), f"{key}.{_quote_key(name)}.")
        else:
            yield key, item, base


def _is_table(value: Any) -> bool:
    """A settings table: a dataclass all of whose fields have defaults (an Endpoint, a
    suspend policy or a listener is a value)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return False
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(value)
    )


def _quote_key(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else json.dumps(name)


def _format(value: Any) -> str:
    """``value`` in TOML's notation, as far as TOML has one (unset: ``(unset)``)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_quote_key(str(k))} = {_format(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (tuple, list, frozenset, set)):
        return "[" + ", ".join(_format(item) for item in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, (type, Endpoint)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _format(fields)
    return json.dumps(str(value))
