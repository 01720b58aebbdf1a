"""Scheduled sources: one source task run as a bounded job at each tick of its schedule."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable

from runner.runs import RunHistory
from runner.schedule import Clock, Schedule
from runner.worker.common import log
from runner.worker.source import SourceRunner


class ScheduledRunner:
    """Runs one source task as a bounded job at each tick of its schedule (see
    `runner.schedule`): a fresh task resumes from the stored offsets, reads what is new,
    and ends; each run is recorded in the run history. With `once`, one run now."""

    def __init__(
        self,
        source: str,
        index: int,
        make: Callable[[asyncio.Event], SourceRunner],
        schedule: Schedule,
        clock: Clock,
        history: RunHistory,
        stop: asyncio.Event,
        once: str | None,  # None: follow the schedule; else one run now, with this trigger
    ) -> None:
        self.source = source
        self.index = index
        self.make = make
        self.schedule = schedule
        self.clock = clock
        self.history = history
        self.stop = stop
        self.once = once

    async def run(self) -> None:
        now = self.clock.now()
        if self.history.mark_interrupted(self.source, self.index, now):
            log.warning("%s: the last run was interrupted; this run delivers what it missed", self.source)
        if self.once is not None:
            await self._run(self.once, now, None, raise_failure=True)
            return
        anchor = now  # interval ticks fall on the start + k * every
        tick, trigger = self._first_tick(now, anchor)
        current: asyncio.Task | None = None
        run_stop = asyncio.Event()
        try:
            while True:
                if not await _sleep_until(self.clock, tick, self.stop):
                    break
                following = self.schedule.next_after(tick, anchor)
                if current is not None and not current.done():
                    self.history.skipped(self.source, self.index, tick, self.clock.now(), following)
                    log.warning("%s: tick %s skipped: the previous run is still going", self.source, tick.isoformat())
                else:
                    current = asyncio.create_task(self._run(trigger, tick, following, run_stop=run_stop))
                tick, trigger = following, "schedule"
        finally:
            if current is not None:
                run_stop.set()
                await asyncio.wait([current])

    def _first_tick(self, now: datetime.datetime, anchor: datetime.datetime) -> tuple[datetime.datetime, str]:
        last = self.history.last_started(self.source, self.index)
        if self.schedule.every is not None:
            if last is None or self.schedule.catchup == "latest":
                return now, "schedule" if last is None else "catchup"
            return self.schedule.next_after(now, anchor), "schedule"
        missed = last is not None and self.schedule.catchup == "latest" and last < self.schedule.last_at_or_before(now)
        return (now, "catchup") if missed else (self.schedule.next_after(now), "schedule")

    async def _run(self, trigger: str, tick: datetime.datetime, following: datetime.datetime | None, *,
                   run_stop: asyncio.Event | None = None, raise_failure: bool = False) -> None:
        """One run, tried again with backoff up to max_retries times if it fails."""
        stop = run_stop or self.stop
        run_id = self.history.start(self.source, self.index, trigger, tick, self.clock.now())
        records = errors = attempts = 0
        partitions: set[str] = set()
        outcome, message = "ok", None
        delay = self.schedule.retry_backoff
        while True:
            attempts += 1
            runner = self.make(stop)  # the pipeline's stop sets it too (see run)
            try:
                await runner.run()
                failure = None
            except Exception as exc:  # a failed run does not stop the pipeline
                failure = exc
            records += runner.produced
            errors += runner.errored
            partitions |= runner.partitions
            if failure is None:
                outcome = "stopped" if stop.is_set() or self.stop.is_set() else "ok"
                break
            message = str(failure)
            if attempts > self.schedule.max_retries or stop.is_set() or self.stop.is_set():
                outcome = "failed"
                break
            log.warning("%s: run failed (%s); trying again in %.0f s", self.source, failure, delay)
            retry_at = self.clock.now() + datetime.timedelta(seconds=delay)
            if not await _sleep_until(self.clock, retry_at, self.stop):
                outcome = "failed"
                break
            delay *= 2
        self.history.finish(run_id, outcome=outcome, now=self.clock.now(), records=records, files=len(partitions),
                            errors=errors, attempts=attempts, message=message if outcome == "failed" else None,
                            next_run=following)
        log.info("%s: run %s: %s, %d record(s), %d error(s)", self.source, trigger, outcome, records, errors)
        if outcome == "failed" and raise_failure:
            raise failure  # type: ignore[misc]


async def _sleep_until(clock: Clock, when: datetime.datetime, stop: asyncio.Event) -> bool:
    """Sleep until `when`; False if stopped first."""
    sleep = asyncio.ensure_future(clock.sleep_until(when))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleep, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleep.cancel()
        stopped.cancel()
    return not stop.is_set()
