"""Scalar values of a configuration: endpoints, durations, host names, addresses.

Each ``parse_*`` function takes the text of one value and returns it parsed, or raises
ValueError with the rest of a sentence whose subject is the quoted value
(``"10.0.0.300" is not an IP address``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import egressd.kumo_grammar as kumo_grammar
from egressd.addresses import IPAddress, IPNetwork
from egressd.kumo_grammar import GrammarError, Throttle


@dataclass(frozen=True)
class Endpoint:
    """A host (IP literal or DNS name) and a port."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an IP address, or None when it is a name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str | IPAddress, port: int) -> str:
    """``ip:port``, with IPv6 literals in brackets: ``[::1]:25``."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def quote(text: str) -> str:
    """A value as TOML would write it: in double quotes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def type_name(value: object) -> str:
    """What a TOML value is, for "expected a string, got an integer"."""
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- durations


def parse_duration(value: object) -> float:
    """Seconds in a duration as KumoMTA reads it (:mod:`egressd.kumo_grammar`).

    A number is seconds (``ttl = 60``); a string is humantime's grammar: ``"60s"``,
    ``"5 mins"``, ``"1h 30m"``, ``"2weeks"``, ``"250ms"``, ``"0s"``. Units are
    case-sensitive as in humantime (``M`` is a month of 30.44 days, ``m`` a minute).
    egressd also takes a decimal count (``"0.5s"``), which humantime does not.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'is {type_name(value)}, not a duration (seconds, or a string like "5m")')
    if isinstance(value, str):
        return parse_duration_text(value)
    if value < 0:
        raise ValueError(f"{value} is negative; a duration is 0 or more seconds")
    return float(value)


def parse_duration_text(text: str) -> float:
    """Seconds in a humantime string; ValueError completes a sentence about ``text``."""
    try:
        return kumo_grammar.parse_duration_text(text, decimals=True)
    except GrammarError as exc:
        raise ValueError(_DURATION_PROBLEMS[exc.problem].format(quote(exc.word))) from None


_DURATION_PROBLEMS = {
    "empty": "is empty",
    "syntax": 'is not a duration (use e.g. "60s", "5 mins", "1h")',
    "unit": "has an unknown unit {}",
}


# --------------------------------------------------------------------------- throttles


def parse_throttle(text: str) -> Throttle:
    """``[local:]quantity/period[,max_burst=N]``: ``"3/hr"``, ``"10/day"``, ``"3/5m"``,
    ``"1,000/h"``, ``"local:1_000/d,max_burst=5"``, exactly as KumoMTA reads it."""
    try:
        return kumo_grammar.parse_throttle(text)
    except GrammarError as exc:
        raise ValueError(_THROTTLE_PROBLEMS[exc.problem].format(quote(exc.word))) from None


_THROTTLE_PROBLEMS = {
    "no_slash": 'is not quantity/period (such as "3/5m" or "10/day")',
    "number": "has {} where a number belongs",
    "zero_quantity": "has a quantity of 0; it must be at least 1",
    "period": 'has an unknown period {} (use s, m, h or d, as in "3/5m")',
    "zero_period": "has a period of 0",
}


# --------------------------------------------------------------------------- names and addresses

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def is_hostname(text: str) -> bool:
    return bool(_HOSTNAME.match(text))


_EHLO_NAME = re.compile(r"[^\x00-\x20\x7f]{1,255}")


def parse_ehlo_domain(text: str) -> str:
    """An EHLO name: anything KumoMTA would send (a host name, an address literal such as
    ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``), as long as it fits on one SMTP command line."""
    if not _EHLO_NAME.fullmatch(text):
        raise ValueError("is not an EHLO name (no spaces or control characters, 1-255 long)")
    if text.startswith("[") and not _is_address_literal(text):
        raise ValueError('is not an address literal such as "[192.0.2.1]" or "[IPv6:2001:db8::1]"')
    return text


def _is_address_literal(text: str) -> bool:
    """RFC 5321 section 4.1.3: ``[IPv4]``, ``[IPv6:address]`` or ``[tag:content]``."""
    if not text.endswith("]"):
        return False
    inner = text[1:-1]
    tag, colon, content = inner.partition(":")
    if not colon:
        return _is_ip(inner, 4)
    if tag.lower() == "ipv6":
        return _is_ip(content, 6)
    return bool(re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]", tag)) and bool(content)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IP address") from None


def parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("is not an IP network (CIDR)") from None


def parse_hostport(
    text: str,
    *,
    allow_names: bool = True,
    default_port: int | None = None,
    allow_zero: bool = False,
) -> Endpoint:
    """``ip:port``, ``[ipv6]:port`` or ``host:port`` -> :class:`Endpoint`.

    ``allow_zero``: port 0 is allowed (a listening address: any free port).
    """
    host, port_text = _split_hostport(text)
    if port_text is None:
        if default_port is None:
            raise ValueError("has no port (write host:port)")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"has a port {port_text!r} that is not a number")
        port = int(port_text)
        if not (0 if allow_zero else 1) <= port <= 65535:
            raise ValueError(f"has a port {port} outside {0 if allow_zero else 1}-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not allow_names:
            raise ValueError(f"has {host!r}, which is not an IP address") from None
        if not is_hostname(host):
            raise ValueError(
                f"has {host!r}, which is neither an IP address nor a host name"
            ) from None
    return Endpoint(host, port)


def _split_hostport(text: str) -> tuple[str, str | None]:
    """The host and the port text (None when there is no port) of ``host[:port]``."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("has an unclosed '['")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("has text after ']' that is not ':port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has {host!r} in brackets, which is not an IPv6 address") from None
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        raise ValueError("is an IPv6 address without brackets (write [addr]:port)")
    host, colon, port_text = text.partition(":")
    return host, port_text if colon else None
