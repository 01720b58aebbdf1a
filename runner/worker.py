"""The worker: runs every source and sink task of a pipeline in one asyncio process.

Source task:  poll → encode (the schema check) → key/partition → produce (+ source offsets,
              one transaction on the embedded broker) → `committed`.
Sink task:    fetch → decode → put → … → flush → commit consumer offsets.

Between poll and produce, and between fetch and put, sits a small bounded queue, so
reading overlaps writing while memory stays flat however long the input. Everything
moves in batches: the engine makes no per-record hook call, queue hop or await.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from runner.batch import Batch
from runner.broker.base import Broker, ProduceBatch, SourceWriter, TopicPartition
from runner.broker.partitioner import Partitioner
from runner.chain import Chain
from runner.connector import Progress, SinkTask, SourceTask
from runner.errors import DataError, FatalError, PipelineError, RecordError, RetryableError, os_error
from runner.runs import RunHistory
from runner.schedule import Clock, Schedule
from runner.schema.arrow import avro_to_arrow
from runner.schema.serde import AvroDecoder, AvroEncoder, dead_letter_rows
from runner.spec import Spec

log = logging.getLogger("pipeline.worker")

QUEUE_BATCHES = 4  # batches in flight between the two halves of a runner
SINK_FETCH_RECORDS = 10_000
FLUSH_INTERVAL = 1.0  # seconds between sink flushes (the at-least-once redelivery window)
FLUSH_RECORDS = 200_000
MAX_BACKOFF = 30.0


@dataclass
class Counters:
    """What one connector did; shown live and in the run summary. They add up:
    records_in = records_out + filtered + dead_lettered + pending."""

    name: str
    kind: str
    records_in: int = 0  # source: records and unreadable input polled; sink: records read from topics
    records_out: int = 0  # source: records produced; sink: records flushed
    dead_lettered: int = 0
    errors: int = 0  # data errors (dead-lettered or not)
    filtered: int = 0  # records a transform chain left out on purpose (not errors)
    retries: int = 0
    target: str | None = None  # where the connector reads or writes, from its target()
    # Source: fields the topic's schema lacks, dropped before encoding -> how many records had them.
    dropped: dict[str, int] = field(default_factory=dict)
    # Source: each task's `progress()` after its last poll (None: it cannot know its size).
    progress: dict[int, Progress | None] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Read but not yet delivered, filtered or dead-lettered (in flight, or left
        behind by a failure)."""
        return self.records_in - self.records_out - self.filtered - self.dead_lettered

    def filter(self, chain: Chain, batch: Batch) -> Batch:
        """`batch` through a transform chain, counting the records it filtered out."""
        records, errors = len(batch), len(batch.errors)
        batch = chain.apply(batch)
        self.filtered += records - len(batch) - (len(batch.errors) - errors)
        return batch


@dataclass
class Topic:
    """A topic as the worker needs it: its schema id, encoder and partition count."""

    name: str
    partitions: int
    schema: dict | None  # None: a raw topic (bytes, read only by raw sinks)
    schema_id: int | None
    key: str | None = None
    encoder: AvroEncoder | None = field(init=False)
    fields: frozenset[str] = field(init=False)  # the schema's top-level field names

    def __post_init__(self) -> None:
        self.encoder = AvroEncoder(self.schema_id, self.schema) if self.schema is not None else None
        self.fields = frozenset(f["name"] for f in (self.schema or {}).get("fields", ()))


class DeadLetters:
    """Applies the error policy to bad records: stop, or produce them to the DLQ topic.
    Remembers the first error (a run that delivered nothing reports it) and warns once
    when many records in a row went to the dead-letter topic and none was delivered."""

    WARN_IN_A_ROW = 1000

    def __init__(self, spec: Spec, topic: Topic | None, *, warn: bool = True) -> None:
        self.tolerate = spec.errors.tolerance == "all"
        self.topic = topic
        self.spec = spec
        self.warn = warn  # a bounded run says it at its end instead (engine.Pipeline)
        self.first: RecordError | None = None
        self.in_a_row = 0
        self.warned = False

    def batches(self, errors: list[RecordError]) -> list[ProduceBatch]:
        """DLQ produce batches for these errors, or DataError if the policy is to stop."""
        if not errors:
            return []
        if self.first is None:
            self.first = min(errors, key=_input_order)
        if not self.tolerate or self.topic is None:
            raise DataError(errors)
        now = int(time.time() * 1000)
        values, failures = self.topic.encoder.encode(dead_letter_rows(errors, now))
        if failures:  # our own schema: a failure here is a bug, not a data error
            raise RuntimeError(f"dead-letter record did not encode: {failures[0]}")
        return [ProduceBatch(self.topic.name, 0, [None] * len(values), values, [now] * len(values))]

    def settled(self, delivered: int, dead_lettered: int) -> None:
        """After records were delivered and/or dead-lettered: count the run of dead
        letters with nothing delivered, and warn once when it reaches WARN_IN_A_ROW."""
        self.in_a_row = 0 if delivered else self.in_a_row + dead_lettered
        if self.warn and self.in_a_row >= self.WARN_IN_A_ROW and not self.warned:
            self.warned = True
            log.warning("%s records in a row went to the dead-letter topic and none was delivered; the first: %s. "
                        "See them: %s", f"{self.in_a_row:,}", self.first.describe() if self.first else "?",
                        self.consume_command())

    def consume_command(self) -> str:
        """The command that shows the dead-letter topic's records."""
        return f"pipeline consume {self.topic.name if self.topic else '<dead-letter topic>'} --from-beginning " \
               f"--spec {self.spec.file or self.spec.path}"


def _input_order(error: RecordError) -> tuple[str, int]:
    """A record error's place in the input ("path:line"), to tell which came first."""
    where, _, line = (error.position or "").rpartition(":")
    return (where, int(line)) if line.isdigit() else (error.position or "", 0)


async def retrying(call: Callable[[], Any], counters: Counters, what: str) -> Any:
    """Await `call()` until it does not raise RetryableError, backing off exponentially."""
    delay = 0.1
    while True:
        try:
            return await call()
        except RetryableError as exc:
            counters.retries += 1
            wait = exc.retry_after or delay
            log.warning("%s: %s; retrying in %.1fs", what, exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF)


class SourceRunner:
    def __init__(
        self,
        name: str,
        task: SourceTask,
        topic: Topic,
        writer: SourceWriter,
        dead_letters: DeadLetters,
        counters: Counters,
        stop: asyncio.Event,
        *,
        chain: Chain | None = None,
        routes: dict[str, Topic] | None = None,
        index: int = 0,
    ) -> None:
        self.name = name
        self.index = index  # the task's number among its source's tasks
        self.task = task
        self.topic = topic
        self.chain = chain
        self.routes = routes or {}  # topics the chain may send records to, besides `topic`
        self.writer = writer
        self.dead_letters = dead_letters
        self.counters = counters
        self.stop = stop
        self.partitioner = Partitioner()
        # What this runner did (a scheduled run's record in the run history).
        self.produced = 0
        self.errored = 0
        self.partitions: set[str] = set()  # source partitions (files) it committed offsets for

    async def run(self) -> None:
        async with errors_named(self.name, self.counters.target):
            await self._run()

    async def _run(self) -> None:
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(QUEUE_BATCHES)
        try:
            offsets = await retrying(self.writer.open, self.counters, f"{self.name}: read offsets")
            await self.task.open(offsets)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._poll(queue))
                group.create_task(self._produce(queue))
        finally:
            await self.task.close()

    async def _poll(self, queue: asyncio.Queue[Batch | None]) -> None:
        while not self.stop.is_set():
            batch = await self._poll_once()
            self.counters.progress[self.index] = self.task.progress()
            if batch is None:
                break
            if len(batch) or batch.errors or batch.source_offsets:
                self.counters.records_in += len(batch) + len(batch.errors)  # unreadable input was read too
                await queue.put(batch)
        # The end marker only on a normal end: on an error the task group cancels the
        # producer, and waiting here for room in a queue nobody reads would hang the run.
        await queue.put(None)

    async def _poll_once(self) -> Batch | None:
        """One poll, abandoned (cancelled) if a stop is requested while it waits."""
        poll = asyncio.ensure_future(retrying(self.task.poll, self.counters, f"{self.name}: poll"))
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not poll.done():
                poll.cancel()
        return poll.result() if poll in done else None

    async def _produce(self, queue: asyncio.Queue[Batch | None]) -> None:
        while (batch := await queue.get()) is not None:
            await self._deliver(batch)

    async def _deliver(self, batch: Batch) -> None:
        if self.chain:
            batch = self.counters.filter(self.chain, batch)
        errors = [self._context(e) for e in batch.errors]
        produce: list[ProduceBatch] = []
        produced = 0
        for topic, indexes in self._destinations(batch):
            rows = batch.rows if indexes is None else [batch.rows[i] for i in indexes]
            self._project(topic, rows)
            values, failures = topic.encoder.encode(rows)
            if failures:
                for f in failures:
                    error = self._context(RecordError(
                        error=f.error,
                        stage="encode",
                        record=rows[f.index],
                        field=f.field,
                        position=batch.position(f.index if indexes is None else indexes[f.index]),
                    ))
                    error.topic = topic.name
                    errors.append(error)
                bad = {f.index for f in failures}
                rows = [r for i, r in enumerate(rows) if i not in bad]
                values = [v for i, v in enumerate(values) if i not in bad]
            produce += self._partitioned(topic, rows, values)
            produced += len(values)
        self.counters.errors += len(errors)  # counted before the policy may stop the run
        produce += self.dead_letters.batches(errors)  # raises DataError under tolerance none
        await retrying(
            lambda: self.writer.produce(produce, batch.source_offsets), self.counters, f"{self.name}: produce"
        )
        self.counters.records_out += produced
        self.counters.dead_lettered += len(errors)
        self.dead_letters.settled(produced, len(errors))
        self.produced += produced
        self.errored += len(errors)
        self.partitions.update(batch.source_offsets)
        if batch.source_offsets:
            await self.task.committed(batch.source_offsets)

    def _project(self, topic: Topic, rows: list[dict]) -> None:
        """Drop the top-level fields `topic`'s schema lacks from `rows` (in place), counting
        them and warning once per field: a source may produce more than a topic keeps."""
        try:
            extra = set().union(*rows) - topic.fields
        except TypeError:  # rows that are not dicts: the encoder refuses them itself
            return
        for name in sorted(extra, key=str):
            count = 0
            for row in rows:
                if name in row:
                    del row[name]
                    count += 1
            dropped = self.counters.dropped
            if name not in dropped:
                log.warning("%s: field %r is not in the schema of topic %r; dropping it from the records "
                            "(add it to the schema to keep it)", self.name, name, topic.name)
            dropped[name] = dropped.get(name, 0) + count

    def _destinations(self, batch: Batch) -> list[tuple[Topic, list[int] | None]]:
        """The topics a batch's records go to, with the indexes of each topic's records
        (None: all of them, to the source's topic — no routing transform)."""
        if batch.destinations is None:
            return [(self.topic, None)]
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(batch.destinations):
            groups.setdefault(name or self.topic.name, []).append(i)
        out = []
        for name, indexes in groups.items():
            topic = self.topic if name == self.topic.name else self.routes.get(name)
            if topic is None:
                raise FatalError(
                    f"{self.name}: a transform sent records to topic {name!r}, which none of its transforms "
                    "names in topics()",
                    hint="a routing transform must list every topic it may route to in topics()",
                )
            out.append((topic, indexes))
        return out

    def _context(self, error: RecordError) -> RecordError:
        error.connector = self.name
        error.topic = self.topic.name
        return error

    def _partitioned(self, topic: Topic, rows: list[dict], values: list[bytes]) -> list[ProduceBatch]:
        if topic.key is None:
            keys: list[bytes | None] = [None] * len(values)
        else:
            field_name = topic.key
            keys = [_key_bytes(row.get(field_name)) for row in rows]
        parts = self.partitioner.partition(keys, topic.partitions)
        now = int(time.time() * 1000)
        buckets: dict[int, ProduceBatch] = {}
        for p, k, v in zip(parts, keys, values):
            b = buckets.get(p)
            if b is None:
                b = buckets[p] = ProduceBatch(topic.name, p, [], [], [])
            b.keys.append(k)
            b.values.append(v)
        for b in buckets.values():
            b.timestamps = [now] * len(b.values)
        return list(buckets.values())


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


@dataclass
class SourceSlot:
    """Task number `index` of a source in the spec; `runner(stop)` builds a fresh runner
    of it (a task stopped in a rebalance is not reused: a new one resumes from offsets)."""

    source: str
    index: int
    runner: Callable[[asyncio.Event], SourceRunner | ScheduledRunner]


class SourceGroup:
    """Runs the pipeline's source tasks.

    On one machine (embedded broker) this process runs all of them. On Kafka, the
    processes of a pipeline share them as Kafka Connect's workers do, through Kafka
    itself: a control topic with one partition per task, and a consumer group on it
    (`_pipeline-<pipeline>-source-tasks`). Each process runs the tasks whose partitions
    it is assigned. When a process joins or leaves, the group rebalances: a task to be
    given up stops polling, writes and commits what it polled, and closes before the
    partition goes to another process, which starts the task again from its offsets. A
    process killed outright loses its tasks when its session times out.
    """

    def __init__(self, pipeline: str, slots: list[SourceSlot], broker: Broker, stop: asyncio.Event, once: bool) -> None:
        self.pipeline = pipeline
        self.slots = slots
        self.broker = broker
        self.stop = stop
        self.once = once  # return when the tasks running here have ended
        self.running: dict[int, tuple[asyncio.Event, asyncio.Task]] = {}
        self.changed = asyncio.Event()

    @property
    def control_topic(self) -> str:
        return f"_pipeline-{self.pipeline}-source-tasks"

    async def run(self) -> None:
        if not self.slots:
            return
        if not self.broker.distributed:
            async with asyncio.TaskGroup() as group:
                for slot in self.slots:
                    group.create_task(slot.runner(self.stop).run())
            return
        topic = self.control_topic
        try:
            await self.broker.ensure_topic(topic, len(self.slots))
        except FatalError as exc:
            raise FatalError(
                f"the sources of pipeline {self.pipeline!r} have {len(self.slots)} task(s), but its "
                f"control topic {topic!r} was made for another number ({exc})",
                hint=f"stop every process of the pipeline, delete the topic {topic!r}, and start again",
            ) from None
        consumer = await self.broker.consumer(topic, [topic])
        try:
            consumer.on_rebalance(self._revoked, self._assigned)
            await self._assigned(await consumer.assignment())
            while not self.stop.is_set():
                tasks = [task for _, task in self.running.values()]
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                if self.once and all(task.done() for task in tasks):
                    break
                self.changed.clear()
                waits = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.changed.wait())}
                pending = [task for task in tasks if not task.done()]
                done, rest = await asyncio.wait(waits | set(pending), return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            consumer.on_rebalance(None, None)
            await self._stop(list(self.running))
            await consumer.close()

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.partition not in self.running:
                slot = self.slots[tp.partition]
                stop = asyncio.Event()
                self.running[tp.partition] = (stop, asyncio.create_task(slot.runner(stop).run()))
                log.info("%s: task %d started here", slot.source, slot.index)
        self.changed.set()

    async def _revoked(self, partitions: list[TopicPartition]) -> None:
        await self._stop([tp.partition for tp in partitions])
        self.changed.set()

    async def _stop(self, indexes: list[int]) -> None:
        """Stop these tasks and wait for them: their last batches are written first. A
        task that failed keeps its place, so `run` reports the failure."""
        stopping = [(i, self.running[i]) for i in indexes if i in self.running]
        for _, (stop, _) in stopping:
            stop.set()
        for i, (_, task) in stopping:
            await asyncio.wait([task])
            if task.cancelled() or task.exception() is None:
                del self.running[i]
                log.info("%s: task %d stopped here", self.slots[i].source, self.slots[i].index)


@contextlib.asynccontextmanager
async def errors_named(connector: str, target: str | None = None) -> AsyncIterator[None]:
    """Report a connector's failure as one error naming it: a file-system error names the
    path (the connector's `target` where the error has none), the cause and what to do;
    any other unexpected exception becomes '<connector>: <Type>: <message>' (traceback
    with --debug)."""
    try:
        yield
    except (BaseExceptionGroup, Exception) as caught:
        exc = first_error(caught) if isinstance(caught, BaseExceptionGroup) else caught
        if isinstance(exc, PipelineError) or not isinstance(exc, Exception):
            raise exc from exc.__cause__
        if isinstance(exc, OSError):
            raise os_error(exc, connector, target) from exc
        raise FatalError(f"{connector}: {type(exc).__name__}: {exc}") from exc


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a task group's failures: the first of ours, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    ours = [e for e in leaves if isinstance(e, PipelineError)]
    return (ours or leaves)[0]


def _key_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode("utf-8")


class SinkRunner:
    def __init__(
        self,
        name: str,
        group: str,
        task: SinkTask,
        wants: str,
        topics: dict[str, Topic],
        broker: Broker,
        lookup_schema: Callable[[int], str],
        dead_letters: DeadLetters,
        counters: Counters,
        stop: asyncio.Event,
        sources_done: asyncio.Event | None,
        *,
        chain: Chain | None = None,
        schemas: dict[str, dict] | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.task = task
        self.chain = chain
        self.topics = topics
        self.broker = broker
        self.dead_letters = dead_letters
        self.counters = counters
        self.stop = stop
        self.sources_done = sources_done  # set in --once mode when every source has ended
        self.raw = wants == "raw"
        self.decoders = (
            {} if self.raw else {t: AvroDecoder(lookup_schema, topic.schema) for t, topic in topics.items()}
        )
        # The Arrow schemas of the records the sink gets: the topics' schemas as the
        # transform chain leaves them (`schemas`).
        schemas = schemas or {}
        self.arrow = {t: avro_to_arrow(schemas.get(t, topic.schema)) for t, topic in topics.items()} \
            if wants == "columns" else {}
        # A transform that reads batch.columns gets the topic's own types.
        self.arrow_in = {t: avro_to_arrow(topic.schema) for t, topic in topics.items()} \
            if chain and not self.raw else {}

    async def run(self) -> None:
        async with errors_named(self.name, self.counters.target):
            await self._run()

    async def _run(self) -> None:
        consumer = await self.broker.consumer(self.group, list(self.topics))
        queue: asyncio.Queue[_Fetched | None] = asyncio.Queue(QUEUE_BATCHES)
        self._consumer, self._queue = consumer, queue
        # What the put half has done since the last flush; shared with the rebalance
        # callbacks, which run between two puts (the lock).
        self._positions: dict[TopicPartition, int] = {}  # put since the last flush
        self._put_to: dict[TopicPartition, int] = {}  # everything put so far (or skipped)
        self._put_end: dict[TopicPartition, int] = {}  # after the last record given to the sink
        self._pending = 0
        self._lock = asyncio.Lock()
        self._failure: BaseException | None = None  # raised in a rebalance callback
        clean = False
        try:
            self._assigned = set(await consumer.assignment())
            resume = await self.task.open(sorted(self._assigned))
            await self._resume(consumer, resume or {})
            log.info("%s: assigned %s", self.name, ", ".join(map(str, sorted(self._assigned))) or "nothing")
            consumer.on_rebalance(self._revoked, self._assigned_again)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fetch(consumer, queue))
                group.create_task(self._put(consumer, queue))
            clean = True
        finally:
            if not clean:
                log.debug("%s: closing without flush (abort)", self.name)
            try:
                durable = await self.task.close()
                if clean and durable:  # written out while closing after the final flush
                    await self._commit_durable(consumer, durable)
            finally:
                consumer.on_rebalance(None, None)
                await consumer.close()

    # A consumer-group rebalance (Kafka: another process of the pipeline joined or left).
    # Before partitions are given up, everything fetched is put, flushed and committed; the
    # task is then opened again with the new assignment and resumes where its output (or
    # the group's commits) end. Batches of partitions no longer assigned are dropped: their
    # new owner reads them again from the committed offset.

    async def _revoked(self, partitions: list[TopicPartition]) -> None:
        try:
            await self._queue.join()
            async with self._lock:
                self._assigned.difference_update(partitions)
                await self._flush(self._consumer)
                # The task lets go of the revoked partitions now: nothing of theirs may be
                # written once their new owner can have them.
                await self.task.open(sorted(self._assigned))
        except BaseException as exc:
            self._failure = exc  # the broker's client only logs what its callbacks raise
            raise
        log.info("%s: gave up %s in a rebalance", self.name, ", ".join(map(str, partitions)))

    async def _assigned_again(self, partitions: list[TopicPartition]) -> None:
        try:
            async with self._lock:
                self._assigned = set(partitions)
                self._put_to = {tp: off for tp, off in self._put_to.items() if tp in self._assigned}
                self._put_end = {tp: off for tp, off in self._put_end.items() if tp in self._assigned}
                resume = await self.task.open(sorted(self._assigned))
                await self._resume(self._consumer, resume or {})
        except BaseException as exc:
            self._failure = exc
            raise
        log.info("%s: assigned %s in a rebalance", self.name, ", ".join(map(str, partitions)) or "nothing")

    async def _resume(self, consumer: Any, resume: dict[TopicPartition, int]) -> None:
        """Start where the sink says its output ends, if it keeps its own offsets."""
        ends: dict[str, list[int]] = {}
        for tp, offset in resume.items():
            if tp.topic not in ends:
                ends[tp.topic] = await self.broker.end_offsets(tp.topic)
            end = ends[tp.topic][tp.partition]
            if offset > end:
                raise FatalError(
                    f"{self.name}: its output says {tp} was written up to offset {offset}, "
                    f"but the topic ends at {end}",
                    hint="the output belongs to an older state directory: move the output "
                    "away, or restore the state directory it was written from",
                )
            await consumer.seek(tp, offset)

    async def _fetch(self, consumer: Any, queue: asyncio.Queue[_Fetched | None]) -> None:
        targets: dict[TopicPartition, int] | None = None
        while not self.stop.is_set():
            if targets is None and self.sources_done is not None and self.sources_done.is_set():
                targets = await self._end_offsets(sorted(self._assigned))
            if targets is not None and await _caught_up(consumer, targets):
                break
            fetched = await consumer.fetch(SINK_FETCH_RECORDS, 0.2)
            if self._failure is not None:
                raise self._failure
            for fb in fetched:
                if TopicPartition(fb.topic, fb.partition) not in self._assigned:
                    continue  # revoked while in flight
                self.counters.records_in += len(fb.values)
                await queue.put(await self._decode(fb))
        await queue.put(None)  # only on a normal end, as in SourceRunner._poll

    async def _end_offsets(self, assignment: list[TopicPartition]) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = {}
        for topic in {tp.topic for tp in assignment}:
            for p, end in enumerate(await self.broker.end_offsets(topic)):
                ends[TopicPartition(topic, p)] = end
        return {tp: ends.get(tp, 0) for tp in assignment}

    async def _decode(self, fb: Any) -> _Fetched:
        fetched = _Fetched(fb.topic, fb.partition, fb.next_offset)
        if self.raw:
            fetched.batch = Batch(
                topic=fb.topic,
                partition=fb.partition,
                record_offsets=fb.offsets,
                keys=fb.keys,
                timestamps=fb.timestamps,
                headers=fb.headers,
                values=fb.values,
            )
            return fetched
        rows, failures = self.decoders[fb.topic].decode(fb.values)
        offsets, keys, stamps = fb.offsets, fb.keys, fb.timestamps
        if failures:
            errors = [
                RecordError(
                    error=f.error,
                    stage="decode",
                    record=fb.values[f.index],
                    position=f"{fb.topic}[{fb.partition}]@{fb.offsets[f.index]}",
                    connector=self.name,
                    topic=fb.topic,
                )
                for f in failures
            ]
            await self._dead_letter(errors)
            bad = {f.index for f in failures}
            keep = [i for i in range(len(rows)) if i not in bad]
            rows = [rows[i] for i in keep]
            offsets = [offsets[i] for i in keep]
            keys = [keys[i] for i in keep]
            stamps = [stamps[i] for i in keep]
        if not rows:
            return fetched
        batch = Batch(rows, topic=fb.topic, partition=fb.partition, record_offsets=offsets, keys=keys, timestamps=stamps,
                      arrow_schema=self.arrow_in.get(fb.topic))
        if self.chain:
            batch = self.counters.filter(self.chain, batch)
            if batch.errors:
                for e in batch.errors:
                    e.connector, e.topic = self.name, fb.topic
                await self._dead_letter(batch.errors)
                batch.errors = []
            if not len(batch):
                return fetched
        if fb.topic in self.arrow:
            batch.conform(self.arrow[fb.topic])
        fetched.batch = batch
        return fetched

    async def _dead_letter(self, errors: list[RecordError]) -> None:
        self.counters.errors += len(errors)
        batches = self.dead_letters.batches(errors)
        await retrying(lambda: self.broker.produce(batches), self.counters, f"{self.name}: dead letter")
        self.counters.dead_lettered += len(errors)
        self.dead_letters.settled(0, len(errors))

    async def _put(self, consumer: Any, queue: asyncio.Queue[_Fetched | None]) -> None:
        holding = False  # the sink keeps records it has not made durable yet
        last_flush = time.monotonic()
        while True:
            timeout = max(0.0, FLUSH_INTERVAL - (time.monotonic() - last_flush))
            try:
                async with asyncio.timeout(timeout):  # not wait_for: see EmbeddedConsumer.fetch
                    batch = await queue.get()
            except TimeoutError:
                batch = _TICK
            try:
                if batch is None:
                    break
                async with self._lock:
                    if batch is not _TICK:
                        await self._put_one(batch)
                    # Flush about once a second while records flow, and go on flushing while
                    # the sink holds records back, so an age-based rotation lands them on
                    # quiet input too.
                    if (self._positions or holding) and (
                        self._pending >= FLUSH_RECORDS or time.monotonic() - last_flush >= FLUSH_INTERVAL
                    ):
                        holding = await self._flush(consumer)
                        last_flush = time.monotonic()
                    elif not self._positions and not holding:
                        last_flush = time.monotonic()
            finally:
                if batch is not _TICK:
                    queue.task_done()
        async with self._lock:
            await self._flush(consumer)

    async def _put_one(self, fetched: _Fetched) -> None:
        tp = TopicPartition(fetched.topic, fetched.partition)
        if tp not in self._assigned:
            return  # revoked while queued: its new owner reads it again
        batch = fetched.batch
        if batch is not None:
            rejected = await retrying(lambda: self.task.put(batch), self.counters, f"{self.name}: put")
            if rejected:
                for e in rejected:
                    e.connector, e.topic, e.stage = self.name, batch.topic, e.stage or "sink"
                await self._dead_letter(list(rejected))
            self._pending += len(batch) - len(rejected or ())
            self.dead_letters.settled(len(batch) - len(rejected or ()), 0)
            self._put_end[tp] = batch.last_offset + 1
        # Past the whole fetched range, records dead-lettered or filtered out included.
        self._positions[tp] = self._put_to[tp] = fetched.next_offset

    async def _flush(self, consumer: Any) -> bool:
        """Flush and commit; True if the sink still holds records it has not made durable."""
        positions, pending = self._positions, self._pending
        self._positions, self._pending = {}, 0
        durable = await retrying(self.task.flush, self.counters, f"{self.name}: flush")
        self.counters.records_out += pending
        if durable is None:
            if positions:
                await consumer.commit(dict(positions))
            return False
        # A sink that lands data on its own schedule (files rotated by size or time) says
        # how far it is durable; the rest stays uncommitted and is read again after a crash.
        await self._commit_durable(consumer, durable)
        return any(durable.get(tp, 0) < end for tp, end in self._put_end.items())

    async def _commit_durable(self, consumer: Any, durable: dict[TopicPartition, int]) -> None:
        """Commit how far a sink says its output is durable. Where that reaches the last
        record it was given, what the engine skipped after it (dead-lettered or filtered
        out) is done too."""
        commit = dict(durable)
        for tp, end in self._put_to.items():
            if durable.get(tp, 0) >= self._put_end.get(tp, 0):
                commit[tp] = max(end, durable.get(tp, 0))
        if commit:
            await consumer.commit(commit)


@dataclass
class _Fetched:
    """A fetched range of one topic-partition: the batch to put (None when nothing is
    left of it: all dead-lettered or filtered out), and the offset after the range, where
    the position goes once it is put."""

    topic: str
    partition: int
    next_offset: int
    batch: Batch | None = None


_TICK = object()


async def _caught_up(consumer: Any, targets: dict[TopicPartition, int]) -> bool:
    for tp, end in targets.items():
        if await consumer.position(tp) < end:
            return False
    return True
