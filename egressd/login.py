"""Password checks and the brake on guessing them, shared by the SMTP and SOCKS5 doors.

Theory of operation
-------------------
A password is compared in constant time (:func:`hmac.compare_digest`), and an unknown
username is compared against a dummy, so the time of a refusal tells nothing about which
part was wrong.

A wrong password costs its sender time: the door waits :meth:`LoginThrottle.failed`
seconds before it answers (as Postfix's ``smtpd_error_sleep_time``, 1 s, does for every
error). The wait grows with the failures of the same client address: 1 s for the first,
one second more for each further one, at most :data:`MAX_DELAY`, and an address is
forgotten :data:`FORGET_AFTER` seconds after its last failure. A correct password answers
at once and does not clear the address's count: guessing on one connection and logging in
on another must not reset the brake. One connection gets :data:`FAILURES_PER_CONNECTION`
failures, then it is closed (the doors say how). The table holds at most
:data:`MAX_ADDRESSES` addresses; beyond, the stalest is forgotten.

Pure: the clock is injected (the doors pass ``trio.current_time``, tests a fake clock).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "FAILURES_PER_CONNECTION",
    "FORGET_AFTER",
    "MAX_DELAY",
    "LoginThrottle",
    "password_matches",
]

FAILURES_PER_CONNECTION = 3
BASE_DELAY = 1.0
MAX_DELAY = 10.0
FORGET_AFTER = 600.0
MAX_ADDRESSES = 65536

_DUMMY = b"\x00" * 32


def password_matches(expected: str | None, given: str) -> bool:
    """True when ``given`` is the ``expected`` password (None: no such user); constant time."""
    reference = _octets(expected) if expected is not None else _DUMMY
    same = hmac.compare_digest(reference, _octets(given))
    return same and expected is not None


def _octets(text: str) -> bytes:
    """The octets a client sent (a SOCKS5 username/password may hold non-UTF-8 octets,
    decoded with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed logins per client address; see the module doc."""

    def __init__(self, clock: Callable[[], float], base_delay: float = BASE_DELAY) -> None:
        self._clock = clock
        self._base_delay = base_delay
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()

    def failed(self, address: str) -> float:
        """Count a failed login from ``address``; the seconds to wait before answering."""
        now = self._clock()
        failures = self._by_address.pop(address, None)
        if failures is None or now - failures.last > FORGET_AFTER:
            failures = _Failures(0, now)
        failures.count += 1
        failures.last = now
        self._by_address[address] = failures  # most recent last
        while len(self._by_address) > MAX_ADDRESSES:
            self._by_address.popitem(last=False)
        return min(self._base_delay * failures.count, MAX_DELAY)

    def recent_failures(self, address: str) -> int:
        """Failures from ``address`` not yet forgotten."""
        failures = self._by_address.get(address)
        if failures is None or self._clock() - failures.last > FORGET_AFTER:
            return 0
        return failures.count
