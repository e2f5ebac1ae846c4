"""Days in the warm-up's time zone: which day a moment falls on, and when the next begins."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

__all__ = ["Calendar"]


@dataclass(frozen=True)
class Calendar:
    """Days as ISO dates in the IANA zone ``timezone`` (``"Europe/Paris"``)."""

    timezone: str = "UTC"

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def day(self, now: float) -> str:
        """The date of ``now`` (seconds since the epoch) in the zone."""
        return dt.datetime.fromtimestamp(now, self.zone).date().isoformat()

    def next_midnight(self, now: float) -> float:
        """When the day after ``now``'s begins, in seconds since the epoch (DST-proof)."""
        tomorrow = dt.date.fromisoformat(self.day(now)) + dt.timedelta(days=1)
        return dt.datetime.combine(tomorrow, dt.time(0), tzinfo=self.zone).timestamp()

    def stamp(self, when: float) -> str:
        """``when`` as local time, offset and zone: ``2026-12-01 00:00+01:00 (Europe/Paris)``."""
        local = dt.datetime.fromtimestamp(when, self.zone)
        return f"{local.isoformat(sep=' ', timespec='minutes')} ({self.timezone})"

    @staticmethod
    def add_days(day: str, count: int) -> str:
        return (dt.date.fromisoformat(day) + dt.timedelta(days=count)).isoformat()
