"""Exactly once from a source task to Kafka, without Kafka transactions.

Kafka Connect gets exactly-once sources from transactions (KIP-618): records and source
offsets commit together. Not every Kafka-protocol broker has transactions (the Tansu
build the tests run has not), so a source task's writer does it with what every broker
has:

- The first record of every Kafka record batch a task writes carries the headers
  `pipeline.task` = "<pipeline>/<source>/<n>" and `pipeline.count` = the batch's record
  count. A record batch is appended whole or not at all, so the pair marks every record of
  the batch (one header per batch, not per record: cheaper to write, store and read).
  Consumers of the pipeline do not see these marks: they are bookkeeping, not data.
- With its source offsets the task stores a checkpoint: for each partition of the topics
  it writes, the offset after its last record there. Offsets and checkpoint are one
  record of the offsets topic (key `[pipeline, source, "task", n]`), so they are stored
  together or not at all.
- A task's records reach a partition in the order sent (aiokafka keeps one request in
  flight per broker; the producer is idempotent where the cluster allows). So what a
  crash leaves in a partition after the checkpoint is a prefix of what the task sent
  there.
- On start, the task counts its own records after each partition's checkpoint. The source
  resumes from the stored offsets and reads the same records again; per partition the
  writer drops as many of them as were counted and sends the rest.

So each record is in its topic once, provided the source reads the same records in the
same order from the same offsets (files do). The same count puts right a produce that
failed halfway (the broker went away) before it is tried again.

A processor's writer does not count (`count_landed=False`): after a crash a processor
emits again what it emitted since its checkpoint, but how its input falls into batches
(and so the order of what it emits) may differ from the first time, and dropping the
first N records of another order would lose some. It is at-least-once: a window emitted
twice has the same value both times.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from runner.broker.base import ProduceBatch
from runner.broker.kafka import TASK_HEADER

if TYPE_CHECKING:
    from runner.broker.kafka import KafkaBroker

log = logging.getLogger("pipeline.kafka")

TP = tuple[str, int]  # (topic, partition)


class KafkaSourceWriter:
    """The `SourceWriter` of one source task on Kafka. See the module docstring."""

    def __init__(self, broker: KafkaBroker, connector: str, task: int, topics: list[str], *,
                 count_landed: bool = True) -> None:
        self.broker = broker
        self.count_landed = count_landed
        self.connector = connector
        self.task = task
        self.topics = list(dict.fromkeys(topics))
        self.tag = (TASK_HEADER, f"{broker.pipeline}/{connector}/{task}".encode())
        self.key: list[Any] = [broker.pipeline, connector, "task", task]
        # This task's offsets, all of them in every checkpoint: compaction keeps only the last.
        self.offsets: dict[str, Any] = {}
        self.base: dict[TP, int] = {}  # the checkpoint: where our uncovered records start
        self.landed: dict[TP, int] = {}  # our records found after `base` (sent before a crash)
        self.landed_end: dict[TP, int] = {}  # the offset after the last of them
        self.sent: dict[TP, int] = {}  # records of the source's stream routed to each TP since `base`
        self.acked_end: dict[TP, int] = {}  # the offset after our last acknowledged record
        self.recount = False

    async def open(self) -> dict[str, Any]:
        offsets, checkpoints = await self.broker.source_state(self.connector)
        now = {
            (topic, p): end
            for topic in self.topics
            for p, end in enumerate(await self.broker.end_offsets(topic))
        }
        checkpoint = checkpoints.get(self.task)
        if checkpoint is None:
            # This task's first run: mark where the topics end before writing anything, so
            # that a crash before its first commit is counted like any other.
            self.base = now
            await self._store(now)
            return offsets
        self.offsets = dict(checkpoint["offsets"])
        self.base = {(t, p): end for t, p, end in checkpoint["ends"]}
        for tp, end in now.items():
            self.base.setdefault(tp, end)  # a topic this task did not write before
        await self._count()
        if self.landed:
            log.info(
                "%s: %d record(s) written before the last run stopped are in the topics already; "
                "they are not written again",
                self.connector, sum(self.landed.values()),
            )
        return offsets

    async def stored(self) -> dict[str, Any]:
        return (await self.broker.source_state(self.connector))[0]

    async def produce(self, batches: list[ProduceBatch], offsets: dict[str, Any]) -> None:
        if self.recount:
            await self._count()
            self.recount = False
        sent = dict(self.sent)
        try:
            await self._produce(batches, offsets)
        except BaseException:
            # Some of it may be in the topics: count again before the next try.
            self.sent, self.recount = sent, True
            raise

    async def _produce(self, batches: list[ProduceBatch], offsets: dict[str, Any]) -> None:
        acks: list[tuple[TP, list[asyncio.Future]]] = []
        for b in batches:
            tp = (b.topic, b.partition)
            n = len(b.values)
            start = self.sent.get(tp, 0)
            skip = max(0, min(n, self.landed.get(tp, 0) - start))
            self.sent[tp] = start + n
            if skip:
                b = ProduceBatch(
                    b.topic, b.partition, b.keys[skip:], b.values[skip:], b.timestamps[skip:],
                    b.headers[skip:] if b.headers else None,
                )
            if len(b.values):
                try:
                    acks.append((tp, await self.broker.send_tagged(b, self.tag)))
                except BaseException:
                    await asyncio.gather(*(f for _, fs in acks for f in fs), return_exceptions=True)
                    raise
        # Every acknowledgement settles before a failure is raised: nothing may still be in
        # flight when the next try counts what landed.
        settled = await asyncio.gather(*(asyncio.gather(*fs, return_exceptions=True) for _, fs in acks))
        failures = [end for ends in settled for end in ends if isinstance(end, BaseException)]
        if failures:
            raise failures[0]
        for (tp, _), ends in zip(acks, settled):
            self.acked_end[tp] = max(ends)
        self.offsets.update(offsets)
        # While the source is still re-reading records a crash left in the topics, the
        # checkpoint waits: it must not move past records the stored offsets do not cover.
        if offsets and all(self.sent.get(tp, 0) >= n for tp, n in self.landed.items()):
            ends = dict(self.base)
            for done in (self.landed_end, self.acked_end):
                for tp, end in done.items():
                    ends[tp] = max(ends.get(tp, 0), end)
            await self._store(ends)
            self.base = ends
            self.sent, self.landed, self.landed_end, self.acked_end = {}, {}, {}, {}

    async def _count(self) -> None:
        if not self.count_landed:
            return  # at-least-once: nothing is taken as written already
        found = await self.broker.count_tagged(self.base, self.tag)
        self.landed = {tp: n for tp, (n, _) in found.items()}
        self.landed_end = {tp: end for tp, (_, end) in found.items()}

    async def _store(self, ends: dict[TP, int]) -> None:
        checkpoint = {"offsets": self.offsets, "ends": [[t, p, e] for (t, p), e in sorted(ends.items())]}
        await self.broker.store_offsets_record(self.key, checkpoint)
