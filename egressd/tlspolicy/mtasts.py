"""MTA-STS (RFC 8461): the TXT record, the policy file, MX patterns and the cache, pure.

Theory of operation
-------------------
A domain announces a policy with one TXT record at ``_mta-sts.<domain>``
(``v=STSv1; id=20160831085700Z;``, :func:`parse_txt`, section 3.1) and serves it at
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (:func:`parse_policy`, section 3.2):
``version: STSv1``, ``mode: enforce | testing | none``, ``max_age: <seconds>`` and one
``mx:`` line per allowed MX pattern. A pattern is a name, or ``*.`` and a name, which
stands for exactly one more label on the left (:func:`mx_matches`, section 4.1).

Parsing is strict: a file without a version, a mode, a max_age, or (unless the mode is
``none``) an ``mx`` line, or with a value outside the grammar, is no policy at all.
Unknown keys are ignored (section 3.2), and of a repeated key only the first counts,
``mx`` excepted.

The cache (section 5.1) keeps one :class:`CachedPolicy` per domain with the TXT ``id``
it was fetched under; it is fresh for ``max_age`` seconds after the fetch.
:func:`next_step` decides, from the cached entry, the ``id`` now in DNS and the time,
whether to use the cached policy, fetch again (no entry, an expired one, or a new ``id``:
a changed id refreshes before expiry), or go without a policy. When a fetch fails, a fresh
cached policy still applies (:func:`after_failed_fetch`); a missing or unreadable TXT
record does not end a fresh cached policy either (section 3.1: the TXT record only
signals a change). Time is passed in (``now``), never read here.

Policies in use are refreshed before they expire (sections 3.3 and 5.1: a sender should
fetch a policy again before its ``max_age`` runs out, so that a domain it mails keeps its
protection without a gap): :attr:`CachedPolicy.refresh_at` is :data:`REFRESH_LEAD` (one
day) before expiry, or half-way for a ``max_age`` under two days, and
:meth:`MemoryPolicyStore.due` lists the domains whose policy is past it and not yet
expired (an expired one is no longer in use: it is fetched again only when mail comes).

The cache lives behind :class:`PolicyStore`: :class:`MemoryPolicyStore` in memory,
bounded. Where the daemon has a state store (:mod:`egressd.state`), the memory store is
also what gets persisted, without a delivery ever waiting on the store: it remembers the
entries stored since the last :meth:`MemoryPolicyStore.take_changes`, which the state
flusher writes (:class:`~egressd.state.StsPolicy`, :func:`to_record`), and a starting
daemon gives back what the store kept (:meth:`MemoryPolicyStore.restore`,
:func:`from_record`; an entry that no longer parses is dropped).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from egressd.state.records import StsPolicy

__all__ = [
    "MAX_AGE_LIMIT",
    "REFRESH_LEAD",
    "CachedPolicy",
    "MemoryPolicyStore",
    "MtaStsError",
    "MtaStsPolicy",
    "PolicyStore",
    "after_failed_fetch",
    "from_record",
    "mx_matches",
    "next_step",
    "parse_policy",
    "parse_txt",
    "to_record",
]

Mode = Literal["enforce", "testing", "none"]
Step = Literal["cached", "fetch", "none"]

_MODES: tuple[Mode, ...] = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31557600  # section 3.2: at most one year
REFRESH_LEAD = 86400.0
"""How long before a cached policy expires it is fetched again (at most half its max_age)."""
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")
_KEY = re.compile(r"[A-Za-z0-9_]{1,32}")


class MtaStsError(ValueError):
    """A TXT record or a policy file that is not valid MTA-STS (the text says why)."""


@dataclass(frozen=True)
class MtaStsPolicy:
    """One domain's policy: its mode, the MX patterns and how long it may be cached."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int

    def matches(self, host: str) -> bool:
        """True when the MX ``host`` is allowed by one of the policy's patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def describe(self, domain: str) -> str:
        """``MTA-STS policy of example.com (enforce, mx: mx1.example.com *.example.net)``."""
        return f"MTA-STS policy of {domain} ({self.mode}, mx: {' '.join(self.mx) or '-'})"


def parse_txt(records: list[str]) -> str:
    """The policy ``id`` of the ``_mta-sts`` TXT records (section 3.1).

    Records that do not start with ``v=STSv1`` are ignored; there must be exactly one
    left, and it must be valid. Raises :class:`MtaStsError`.
    """
    ours = [record for record in records if _fields(record)[:1] == [("v", "STSv1")]]
    if len(ours) != 1:
        raise MtaStsError(f"expected one v=STSv1 TXT record, found {len(ours)}")
    fields = dict(reversed(_fields(ours[0])))
    policy_id = fields.get("id")
    if policy_id is None or not _ID.fullmatch(policy_id):
        raise MtaStsError(f"the TXT record has no valid id: {ours[0]!r}")
    return policy_id


def _fields(record: str) -> list[tuple[str, str]]:
    fields = []
    for part in record.split(";"):
        key, sep, value = part.strip().partition("=")
        if part.strip():
            fields.append((key.strip(), value.strip() if sep else ""))
    return fields


def parse_policy(text: str) -> MtaStsPolicy:
    """The policy file's content (section 3.2), strictly; raises :class:`MtaStsError`."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.fullmatch(key):
            raise MtaStsError(f"line {number} is not 'key: value': {line[:80]!r}")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise MtaStsError(f"version is {fields.get('version')!r}, not 'STSv1'")
    policy = MtaStsPolicy(_mode(fields.get("mode")), tuple(mx), _max_age(fields.get("max_age")))
    if policy.mode != "none" and not policy.mx:
        raise MtaStsError(f"mode {policy.mode} without any mx line")
    return policy


def _mode(value: str | None) -> Mode:
    for mode in _MODES:
        if value == mode:
            return mode
    raise MtaStsError(f"mode is {value!r}, not enforce, testing or none")


def _max_age(value: str | None) -> int:
    if value is None or not _MAX_AGE.fullmatch(value) or int(value) > MAX_AGE_LIMIT:
        raise MtaStsError(f"max_age is {value!r}, not a number of seconds up to {MAX_AGE_LIMIT}")
    return int(value)


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    if not _PATTERN.fullmatch(pattern):
        raise MtaStsError(f"mx {value!r} is not a host name or *.name pattern")
    return pattern


def mx_matches(pattern: str, host: str) -> bool:
    """True when ``host`` matches ``pattern`` (section 4.1): equal names, case-insensitive,
    or ``*.rest`` and ``host`` is one label followed by ``.rest``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if not pattern.startswith("*."):
        return host == pattern
    label, dot, rest = host.partition(".")
    return bool(label) and bool(dot) and rest == pattern[2:]


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CachedPolicy:
    """A fetched policy, the TXT ``id`` it was fetched under, and when."""

    policy: MtaStsPolicy
    policy_id: str
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    @property
    def refresh_at(self) -> float:
        """When to fetch it again ahead of expiry (see the module doc)."""
        return self.expires_at - min(REFRESH_LEAD, self.policy.max_age / 2)


def next_step(cached: CachedPolicy | None, txt_id: str | None, now: float) -> Step:
    """What to do for a domain: use the ``cached`` policy, ``fetch`` it, or go without
    (``none``). ``txt_id`` is the id in DNS now (None: no valid TXT record, or the lookup
    failed)."""
    fresh = cached is not None and cached.fresh(now)
    if txt_id is None:
        return "cached" if fresh else "none"
    if fresh and cached is not None and cached.policy_id == txt_id:
        return "cached"
    return "fetch"


def after_failed_fetch(cached: CachedPolicy | None, now: float) -> MtaStsPolicy | None:
    """The policy that applies when a fetch failed: a fresh cached one, else none."""
    if cached is not None and cached.fresh(now):
        return cached.policy
    return None


class PolicyStore(Protocol):
    """Where cached policies live (memory here; the state store can persist them)."""

    def get(self, domain: str) -> CachedPolicy | None: ...

    def put(self, domain: str, entry: CachedPolicy) -> None: ...


class MemoryPolicyStore:
    """A bounded in-memory :class:`PolicyStore`: the least recently stored domain goes
    first when ``capacity`` is reached. It remembers what was stored since the last
    :meth:`take_changes`, for a state store to persist (see the module doc)."""

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedPolicy] = OrderedDict()
        self._changed: dict[str, CachedPolicy] = {}

    def get(self, domain: str) -> CachedPolicy | None:
        return self._entries.get(domain)

    def put(self, domain: str, entry: CachedPolicy) -> None:
        self._keep(domain, entry)
        self._changed[domain] = entry
        while len(self._changed) > self.capacity:
            self._changed.pop(next(iter(self._changed)))

    def _keep(self, domain: str, entry: CachedPolicy) -> None:
        self._entries.pop(domain, None)
        self._entries[domain] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def restore(self, domain: str, entry: CachedPolicy) -> None:
        """An entry read back from the state store, unless a newer one is here already."""
        held = self._entries.get(domain)
        if held is None or held.fetched_at < entry.fetched_at:
            self._keep(domain, entry)

    def due(self, now: float) -> list[str]:
        """Domains whose policy is due for a refresh at ``now`` and not yet expired,
        the soonest to expire first."""
        due = [(e.expires_at, d) for d, e in self._entries.items() if e.refresh_at <= now]
        return [domain for expires_at, domain in sorted(due) if now < expires_at]

    def take_changes(self) -> dict[str, CachedPolicy]:
        """The entries stored since the last call (they are forgotten here)."""
        changed, self._changed = self._changed, {}
        return changed

    def give_back(self, changes: dict[str, CachedPolicy]) -> None:
        """Changes the state store did not take: they go with the next flush."""
        for domain, entry in changes.items():
            self._changed.setdefault(domain, entry)


def to_record(domain: str, entry: CachedPolicy) -> StsPolicy:
    """The state store's record of a cached policy."""
    policy = entry.policy
    return StsPolicy(
        domain, entry.policy_id, entry.fetched_at, policy.mode, policy.max_age, " ".join(policy.mx)
    )


def from_record(record: StsPolicy) -> CachedPolicy | None:
    """The cached policy of a stored record, checked as a fetched one is (None: invalid)."""
    lines = ["version: STSv1", f"mode: {record.mode}", f"max_age: {record.max_age}"]
    lines += [f"mx: {pattern}" for pattern in record.mx.split()]
    if not _ID.fullmatch(record.policy_id):
        return None
    try:
        return CachedPolicy(parse_policy("\n".join(lines)), record.policy_id, record.fetched_at)
    except MtaStsError:
        return None
