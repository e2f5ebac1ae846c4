"""Reply rules: KumoMTA's ``[[...automation]]`` entries, and when they fire.

A rule has regexes matched against the remote's reply as one line (``"421 4.7.0 [TSS04]
Messages from 192.0.2.1 temporarily deferred"``, as KumoMTA's ``Response::to_single_line``),
actions, a trigger and a duration:

- ``Suspend``: no new connection or message from that source to that site (or, for a rule
  of a provider section, to any site of that provider) until the duration ends;
- ``{ SetConfig = { name, value } }``: that limit is overridden for the duration, in the same
  scope; ``SetDomainConfig`` overrides it for the recipient domain only;
- ``trigger = "Immediate"`` (the default) fires on every match; ``{ Threshold = "N/period" }``
  fires when N matches happened within the last period, counted per (rule, source, scope).
  KumoMTA's documentation says "N events in the preceding period"; its TSA daemon counts over
  the rule's *duration* instead. egressd follows the documentation.

Rules match remote replies only: ``match_internal`` (for KumoMTA's own "KumoMTA internal: "
texts) is read and kept, and egressd's replies are never matched.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from egressd.shaping.params import Origin, Params
from egressd.shaping.throttle import ThrottleSpec


@dataclass(frozen=True)
class Suspend:
    """Stop new connections and messages in the rule's scope."""


@dataclass(frozen=True)
class SetConfig:
    """Override one enforced key (``params`` holds it, typed) in the rule's scope."""

    name: str
    params: Params
    domain_only: bool = False


Action = Suspend | SetConfig


@dataclass(frozen=True, eq=False)
class Rule:
    """One automation rule of one section."""

    patterns: tuple[re.Pattern[str], ...]
    actions: tuple[Action, ...]
    threshold: ThrottleSpec | None
    duration: float
    origin: Origin
    index: int
    match_internal: bool = False

    @property
    def label(self) -> str:
        """``[provider."yahoo"] automation[3] in shaping.toml``: names the rule for humans."""
        return str(self.origin)

    def matches(self, reply: str) -> bool:
        return any(pattern.search(reply) for pattern in self.patterns)

    @property
    def regex_text(self) -> str:
        return " | ".join(pattern.pattern for pattern in self.patterns)


def screen(rules: Sequence[Rule]) -> re.Pattern[str] | None:
    """One regex that matches a reply when any of ``rules`` may (every pattern, OR-ed): one
    search per reply instead of one per pattern, and most replies match no rule. None when
    the patterns cannot be joined (a global inline flag such as ``(?i)`` must come first)."""
    patterns = [f"(?:{pattern.pattern})" for rule in rules for pattern in rule.patterns]
    try:
        return re.compile("|".join(patterns))
    except re.error:
        return None


def reply_line(code: int, lines: Sequence[str]) -> str:
    """A (multi-line) SMTP reply as the one line rules are matched against."""
    if len(lines) == 1:  # most replies
        line = lines[0].strip()
        return f"{code} {line}" if line else str(code)
    return " ".join([str(code), *(line.strip() for line in lines if line.strip())])


@dataclass
class ThresholdWindow:
    """Match times of one (rule, source, scope) within the rule's threshold period."""

    spec: ThrottleSpec
    times: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> bool:
        """Count a match at ``now``; True when the threshold is reached."""
        self.times.append(now)
        self.forget_before(now)
        return len(self.times) >= self.spec.limit

    def forget_before(self, now: float) -> None:
        start = now - self.spec.period
        while self.times and self.times[0] < start:
            self.times.popleft()
