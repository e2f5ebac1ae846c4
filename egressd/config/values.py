"""Scalar values of a configuration: endpoints, durations, host names, addresses.

Each ``parse_*`` function takes the text of one value and returns it parsed, or raises
ValueError with the rest of a sentence whose subject is the quoted value
(``"10.0.0.300" is not an IP address``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from egressd.addresses import IPAddress, IPNetwork


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

_DURATION_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    (("s", "sec", "secs", "second", "seconds"), 1.0),
    (("m", "min", "mins", "minute", "minutes"), 60.0),
    (("h", "hr", "hrs", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
):
    for _name in _names:
        _DURATION_UNITS[_name] = _seconds

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def parse_duration(text: str) -> float:
    """Seconds in a humantime duration: "60s", "5 mins", "5 minutes", "1h 30m", "250ms"."""
    lowered = text.strip().lower()
    if not lowered:
        raise ValueError("is empty")
    total = 0.0
    position = 0
    while position < len(lowered):
        match = _DURATION_PART.match(lowered, position)
        if match is None or match.end() == position:
            raise ValueError('is not a duration (use e.g. "60s", "5 mins", "1h")')
        unit = _DURATION_UNITS.get(match.group(2))
        if unit is None:
            raise ValueError(f'has an unknown unit "{match.group(2)}"')
        total += float(match.group(1)) * unit
        position = match.end()
    return total


# --------------------------------------------------------------------------- names and addresses

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def is_hostname(text: str) -> bool:
    return bool(_HOSTNAME.match(text))


def parse_ehlo_domain(text: str) -> str:
    if not is_hostname(text):
        raise ValueError("is not a host name")
    return text


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
    text: str, *, allow_names: bool = True, default_port: int | None = None
) -> Endpoint:
    """``ip:port``, ``[ipv6]:port`` or ``host:port`` -> :class:`Endpoint`."""
    host, port_text = _split_hostport(text)
    if port_text is None:
        if default_port is None:
            raise ValueError("has no port (write host:port)")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"has a port {port_text!r} that is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"has a port {port} outside 1-65535")
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
