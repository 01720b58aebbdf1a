"""Schedules for batch-to-stream sources, and the clock they run on.

A source with `schedule:` in the spec runs as a bounded job at each tick: its task opens
with the stored offsets, reads what is new, streams it into the topic, commits, and ends.
Sinks and unscheduled sources keep running between ticks.

    schedule: "0 * * * *"                                   # cron, in UTC
    schedule: {cron: "30 2 * * *", timezone: Europe/Berlin}  # cron in a time zone
    schedule: {every: 15m}                                   # an interval: 30s, 15m, 2h, 1d, 1h30m
    schedule: {every: 2s, catchup: none, max_retries: 3}

- Cron expressions are read by `cronsim` (standard 5 fields; also L, W, # and @hourly-style
  aliases). A time zone follows its daylight-saving changes.
- A run never overlaps the previous run of the same source: a tick that comes while a run
  is still going is skipped, counted and recorded.
- `catchup: latest` (the default): if a tick passed while the pipeline was not running,
  one run starts at once; `none`: wait for the next tick.
- A failed run is tried again with backoff (`retry_backoff` seconds, doubling) up to
  `max_retries` times, then recorded as failed; the next tick tries again.

The clock is injectable (`Clock`): the system clock in production, a `ManualClock` that a
test moves forward, so a cron schedule is tested without waiting for real minutes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

UTC = dt.timezone.utc
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ScheduleError(ValueError):
    """A schedule in the spec that cannot be used; the message says why."""


def parse_duration(text: str) -> float:
    """'15m', '2s', '1h30m', '500ms' -> seconds."""
    compact = str(text).replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ScheduleError(f"expected a duration like 30s, 15m, 2h, 1d or 1h30m, got {text!r}")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ScheduleError(f"a duration must be more than 0, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Schedule:
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None  # seconds
    catchup: str = "latest"  # or "none"
    max_retries: int = 3
    retry_backoff: float = 5.0  # seconds before the first retry; doubles

    @classmethod
    def parse(cls, value: object) -> Schedule:
        """From the spec: a cron string, or a mapping with `cron` (+ `timezone`) or
        `every`, and optionally `catchup`, `max_retries`, `retry_backoff`."""
        if isinstance(value, str):
            value = {"cron": value}
        if not isinstance(value, dict):
            raise ScheduleError('expected a cron expression ("0 * * * *") or a mapping with cron or every')
        unknown = set(value) - {"cron", "timezone", "every", "catchup", "max_retries", "retry_backoff"}
        if unknown:
            raise ScheduleError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: cron, timezone, "
                                "every, catchup, max_retries, retry_backoff)")
        if ("cron" in value) == ("every" in value):
            raise ScheduleError("give either cron or every")
        catchup = value.get("catchup", "latest")
        if catchup not in ("latest", "none"):
            raise ScheduleError(f"catchup: expected latest or none, got {catchup!r}")
        retries = value.get("max_retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ScheduleError(f"max_retries: expected an integer >= 0, got {retries!r}")
        backoff = value.get("retry_backoff", "5s")
        backoff = float(backoff) if isinstance(backoff, (int, float)) and not isinstance(backoff, bool) else parse_duration(str(backoff))
        if "every" in value:
            every = value["every"]
            seconds = float(every) if isinstance(every, (int, float)) and not isinstance(every, bool) else parse_duration(str(every))
            if "timezone" in value:
                raise ScheduleError("timezone applies to cron schedules, not to every")
            return cls(every=seconds, catchup=catchup, max_retries=retries, retry_backoff=backoff)
        cron, zone = value["cron"], value.get("timezone", "UTC")
        if not isinstance(cron, str):
            raise ScheduleError(f"cron: expected a cron expression, got {cron!r}")
        try:
            tz = ZoneInfo(str(zone))
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"timezone: unknown time zone {zone!r} (an IANA name like Europe/Berlin)") from None
        try:
            CronSim(cron, dt.datetime.now(tz))
        except CronSimError as exc:
            raise ScheduleError(f"cron: {cron!r} is not a valid cron expression: {exc}") from None
        return cls(cron=cron, timezone=str(zone), catchup=catchup, max_retries=retries, retry_backoff=backoff)

    def describe(self) -> str:
        if self.every is not None:
            return f"every {_seconds(self.every)}"
        return f"cron {self.cron!r}" + (f" ({self.timezone})" if self.timezone != "UTC" else "")

    def next_after(self, t: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        """The first tick strictly after `t`. Interval ticks fall on `anchor` + k*every."""
        if self.every is not None:
            anchor = anchor or t
            k = int((t - anchor).total_seconds() // self.every) + 1
            return anchor + dt.timedelta(seconds=k * self.every)
        tz = ZoneInfo(self.timezone)
        return next(iter(CronSim(self.cron, t.astimezone(tz)))).astimezone(UTC)

    def last_at_or_before(self, t: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime | None:
        """The latest tick at or before `t` (None for an interval without an anchor)."""
        if self.every is not None:
            if anchor is None or t < anchor:
                return None
            k = int((t - anchor).total_seconds() // self.every)
            return anchor + dt.timedelta(seconds=k * self.every)
        tz = ZoneInfo(self.timezone)
        return next(iter(CronSim(self.cron, (t + dt.timedelta(microseconds=1)).astimezone(tz), reverse=True))).astimezone(UTC)

    def upcoming(self, t: dt.datetime, count: int, anchor: dt.datetime | None = None) -> list[dt.datetime]:
        out = []
        for _ in range(count):
            t = self.next_after(t, anchor)
            out.append(t)
        return out


def _seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The time now, timezone-aware."""
        ...

    async def sleep_until(self, when: dt.datetime) -> None: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC)

    async def sleep_until(self, when: dt.datetime) -> None:
        # In steps of at most a minute: a long sleep would not notice the wall clock
        # jumping (NTP, a suspended laptop).
        while (left := (when - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, 60.0))


class ManualClock:
    """A clock that moves only when told (`advance`, `set`): for tests of schedules, and
    for anyone driving a pipeline through simulated time."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start.astimezone(UTC)
        self._moved = asyncio.Condition()

    def now(self) -> dt.datetime:
        return self._now

    async def sleep_until(self, when: dt.datetime) -> None:
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= when)

    async def set(self, t: dt.datetime) -> None:
        async with self._moved:
            self._now = max(self._now, t.astimezone(UTC))
            self._moved.notify_all()
        await asyncio.sleep(0)  # let the woken sleepers run

    async def advance(self, seconds: float) -> None:
        await self.set(self._now + dt.timedelta(seconds=seconds))
