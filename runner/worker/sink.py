"""The sink runner: fetch → decode → transforms → put → … → flush → commit consumer
offsets (or what the sink says is durable, for sinks that keep their own offsets).

Between fetch and put sits a small bounded queue, so reading overlaps writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from runner.batch import Batch
from runner.broker.base import Broker, TopicPartition
from runner.chain import Chain
from runner.connector import SinkTask
from runner.errors import FatalError, RecordError
from runner.schema.arrow import avro_to_arrow
from runner.schema.codec import BatchDecoder
from runner.worker.common import (
    QUEUE_BATCHES,
    Counters,
    DeadLetters,
    Topic,
    errors_named,
    log,
    retrying,
)

SINK_FETCH_RECORDS = 10_000
FLUSH_INTERVAL = 1.0  # seconds between sink flushes (the at-least-once redelivery window)
FLUSH_RECORDS = 200_000


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
            {} if self.raw else {t: BatchDecoder(lookup_schema, topic.schema) for t, topic in topics.items()}
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
        # A rebalance's change holds the flow (`_still`): the fetch loop parks at the gate.
        self._gate, self._parked, self._changing = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        self._gate.set()
        # What the put half has done since the last flush; shared with the rebalance
        # callbacks, which run between two puts (the lock).
        self._positions: dict[TopicPartition, int] = {}  # put since the last flush
        self._put_to: dict[TopicPartition, int] = {}  # everything put so far (or skipped)
        self._put_end: dict[TopicPartition, int] = {}  # after the last record given to the sink
        self._pending = 0
        self._lock = asyncio.Lock()
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
    # Rebalances are incremental: only the partitions that change hands move, and the
    # sink goes on with the rest after a short pause. Sinks reopen every partition they
    # are given in `open` (dropping what they held unflushed), so a change is applied on a
    # still pipeline: fetching parks, what was fetched is put, everything is flushed and
    # committed, `open` gets the new set, and every partition starts again where the sink
    # says its output ends (or, for a partition gained, where the group committed). A
    # partition given up is read again by its new owner from what is committed here.

    async def _revoked(self, partitions: list[TopicPartition]) -> None:
        async with self._still():
            self._assigned.difference_update(partitions)
            await self._flush(self._consumer)
            for tp in partitions:
                self._put_to.pop(tp, None)
                self._put_end.pop(tp, None)
            # The task lets go of them now: nothing of theirs may be written once their
            # new owner can have them.
            await self._resume(self._consumer, await self.task.open(sorted(self._assigned)) or {})
        log.info("%s: gave up %s in a rebalance", self.name, ", ".join(map(str, partitions)))

    async def _assigned_again(self, partitions: list[TopicPartition]) -> None:
        gained = set(partitions) - self._assigned
        if not gained:
            return
        async with self._still():
            await self._flush(self._consumer)
            self._assigned |= gained
            resume = await self.task.open(sorted(self._assigned)) or {}
            # A gained partition without the sink's own offset starts at the group's
            # commit (what was fetched of it before it was ours here is dropped).
            for topic in {tp.topic for tp in gained if tp not in resume}:
                committed = await self.broker.committed(self.group, topic)
                resume.update({tp: committed.get(tp.partition, 0) for tp in gained if tp.topic == topic})
            await self._resume(self._consumer, resume)
        log.info("%s: took %s in a rebalance (now %s)", self.name, ", ".join(map(str, sorted(gained))),
                 ", ".join(map(str, sorted(self._assigned))))

    @contextlib.asynccontextmanager
    async def _still(self) -> AsyncIterator[None]:
        """Hold the flow while a rebalance's change is applied: fetching parks, what was
        fetched is put, and nothing else runs the task meanwhile."""
        async with self._changing:
            self._gate.clear()
            held = time.monotonic()
            try:
                await self._parked.wait()
                await self._queue.join()
                async with self._lock:
                    yield
            finally:
                self._gate.set()
                log.info("%s: held the flow %.0f ms for a rebalance", self.name, (time.monotonic() - held) * 1000)

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
        # (--once) Where each partition ended when everything upstream had ended; a
        # partition taken over later (Kafka: from a process that finished) gets its own.
        targets: dict[TopicPartition, int] = {}
        try:
            await self._fetch_until_done(consumer, queue, targets)
        finally:
            self._parked.set()  # (a change waiting for the loop to park goes on)

    async def _fetch_until_done(self, consumer: Any, queue: asyncio.Queue[_Fetched | None],
                                targets: dict[TopicPartition, int]) -> None:
        while not self.stop.is_set():
            if not self._gate.is_set():
                self._parked.set()
                await self._gate.wait()
                self._parked.clear()
            if self.sources_done is not None and self.sources_done.is_set():
                assigned = sorted(self._assigned)
                targets.update(await self._end_offsets([tp for tp in assigned if tp not in targets]))
                if await _caught_up(consumer, {tp: targets[tp] for tp in assigned}):
                    break
            fetched = await consumer.fetch(SINK_FETCH_RECORDS, 0.2)
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
        columns, rows, failures = self.decoders[fb.topic].decode(
            fb.value_array if fb.value_array is not None else fb.values
        )
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
        if columns is None and not rows:
            return fetched
        batch = Batch(rows, columns=columns, topic=fb.topic, partition=fb.partition, record_offsets=offsets,
                      keys=keys, timestamps=stamps, arrow_schema=self.arrow_in.get(fb.topic))
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
