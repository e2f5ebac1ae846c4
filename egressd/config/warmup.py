"""``[warmup]``: warm-up plans and their signals (``[state]``, where they are kept, is
read by :mod:`egressd.config.state`).

```toml
[warmup]
timezone = "UTC"                        # a day is a day here (IANA name)
sending_day_share = 0.8                 # a day counts when >= 80% of the quota was used

[warmup.plan.standard]
days = [50, 100, 200, 400]              # messages per day and provider, step by step
[warmup.plan.standard.provider.google]
days = [20, 50, 100, 200]

[warmup.sources]
"ip-9" = "standard"                     # or warmup = "standard" in the source's table
```

The plan named ``default`` exists without being written (:data:`DEFAULT_PLAN_DAYS`); a file
that defines ``[warmup.plan.default]`` replaces it.
"""

from __future__ import annotations

import math
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from egressd.config.problems import Where
from egressd.config.reader import Integer, ListOf, MapOf, Table, Text, setting
from egressd.config.values import parse_duration, quote, type_name

__all__ = [
    "DEFAULT_PLAN",
    "DEFAULT_PLAN_DAYS",
    "WarmupPlan",
    "WarmupSettings",
]

DEFAULT_PLAN = "default"

DEFAULT_PLAN_DAYS: tuple[int, ...] = (
    50, 100, 200, 400, 800, 1500, 3000, 6000, 12000, 25000, 50000, 100000,
)  # fmt: skip
"""The shipped plan: messages per day and per provider, one step per sending day.

Where the numbers come from: none of the large mailbox providers publishes daily volumes.
Gmail's, Microsoft's and Yahoo's sender guidelines only ask to raise volume gradually on a
new address and to slow down when they defer. This is the conventional schedule the
industry's warm-up guides use: start at 50, roughly double each sending day, and reach
100,000 a day per provider after twelve sending days. It is a starting point, not a
promise: define ``[warmup.plan.default]`` (or plans of your own) to replace it.
"""


@dataclass(frozen=True)
class Fraction:
    """A number from 0 to 1 (``0.8``), or a percentage string (``"80%"``)."""

    positive: bool = False

    def read(self, value: object, where: Where) -> float:
        if isinstance(value, str) and value.endswith("%"):
            try:
                number = float(value[:-1]) / 100
            except ValueError:
                raise ValueError(f"{quote(value)} is not a percentage") from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        else:
            raise ValueError(f'expected a number from 0 to 1 or a "N%", got {type_name(value)}')
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise ValueError(f"{value} is outside 0-1")
        if self.positive and number == 0.0:
            raise ValueError("must be above 0")
        return number


class TimeZone:
    """An IANA time zone name (``"Europe/Paris"``), checked against the system's zoneinfo."""

    def read(self, value: object, where: Where) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a time zone name, got {type_name(value)}")
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{quote(value)} is not a known time zone") from None
        return value


class Seconds:
    def read(self, value: object, where: Where) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a duration, got {type_name(value)}")
        seconds = parse_duration(value)
        if not 0.1 <= seconds <= 3600:
            raise ValueError("must be from 0.1 s to 1 hour")
        return seconds


Days = ListOf(Integer(1, 10**9))


def _nonempty(days: tuple[int, ...], at: Where) -> None:
    if not days:
        at.error("needs at least one day")


@dataclass(frozen=True)
class _ProviderDays:
    days: tuple[int, ...] = setting(Days)

    def check_keys(self, at: Any) -> None:
        _nonempty(self.days, at("days"))


class ProviderSchedules:
    """``[warmup.plan.NAME.provider.P] days = [...]`` -> ``{P: days}``."""

    def read(self, value: object, where: Where) -> Mapping[str, tuple[int, ...]]:
        tables = MapOf(Table(_ProviderDays)).read(value, where)
        return MappingProxyType({name: table.days for name, table in tables.items()})


@dataclass(frozen=True)
class WarmupPlan:
    """A schedule: ``days[i]`` messages a day per provider on step ``i`` (counted from 0).

    ``providers`` gives a provider (a shaping file's provider name, or ``other``) a
    schedule of its own. A source is warm once every schedule is behind it.
    """

    days: tuple[int, ...] = setting(Days)
    providers: Mapping[str, tuple[int, ...]] = setting(
        ProviderSchedules(), factory=lambda: MappingProxyType({}), key="provider"
    )

    def check_keys(self, at: Any) -> None:
        _nonempty(self.days, at("days"))

    def schedule(self, provider: str) -> tuple[int, ...]:
        return self.providers.get(provider, self.days)


DEFAULT_WARMUP_PLAN = WarmupPlan(days=DEFAULT_PLAN_DAYS)


def _plans() -> Mapping[str, WarmupPlan]:
    return MappingProxyType({DEFAULT_PLAN: DEFAULT_WARMUP_PLAN})


@dataclass(frozen=True)
class WarmupSettings:
    """``[warmup]``: the day, what a sending day is, the signals' thresholds, the plans."""

    timezone: str = setting(TimeZone(), "UTC")
    sending_day_share: float = setting(Fraction(positive=True), 0.8)
    min_messages: int = setting(Integer(1, 10**9), 50)
    """Rates are judged only once this many messages of the day had an outcome."""
    hold_deferral_rate: float = setting(Fraction(positive=True), 0.2)
    hold_rejection_rate: float = setting(Fraction(positive=True), 0.05)
    step_back_deferral_rate: float = setting(Fraction(positive=True), 0.5)
    step_back_rejection_rate: float = setting(Fraction(positive=True), 0.2)
    flush_interval: float = setting(Seconds(), 5.0)
    plans: Mapping[str, WarmupPlan] = setting(MapOf(Table(WarmupPlan)), factory=_plans, key="plan")
    source_plans: Mapping[str, str] = setting(
        MapOf(Text()), factory=lambda: MappingProxyType({}), key="sources"
    )

    def __post_init__(self) -> None:
        if DEFAULT_PLAN not in self.plans:
            merged = {DEFAULT_PLAN: DEFAULT_WARMUP_PLAN, **self.plans}
            object.__setattr__(self, "plans", MappingProxyType(merged))

    def check_keys(self, at: Any) -> None:
        for low, high in (
            ("hold_deferral_rate", "step_back_deferral_rate"),
            ("hold_rejection_rate", "step_back_rejection_rate"),
        ):
            if getattr(self, low) > getattr(self, high):
                at(low).error(f"is above {high}; holding must come before stepping back")
        for source, plan in self.source_plans.items():
            if plan not in self.plans:
                at("sources").at(quote(source)).error(f"{quote(plan)} is not a defined plan")
