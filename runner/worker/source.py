"""The source runner: poll → transforms → encode (the schema check) → key/partition →
produce (+ source offsets, one transaction on the embedded broker) → `committed`.

Between poll and produce sits a small bounded queue, so reading overlaps writing while
memory stays flat however long the input.

On Kafka a task may read ahead (`read_ahead`) while its process waits for the group's
first round to tell it which tasks it runs: polled batches are kept in memory, nothing is
written, and `run` keeps them only if the task's stored offsets are still the ones they
were read from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.batch import Batch
from runner.broker.base import ProduceBatch, SourceWriter
from runner.broker.partitioner import Partitioner
from runner.chain import Chain
from runner.connector import SourceTask
from runner.errors import FatalError, RecordError
from runner.worker.common import (
    QUEUE_BATCHES,
    Counters,
    DeadLetters,
    Topic,
    errors_named,
    log,
    retrying,
)


# How much a task reads ahead, at most (Arrow bytes of the batches it keeps; a batch of
# rows counts ROW_BYTES a record): a few seconds of parsing, the length of a group round.
READ_AHEAD_BYTES = 96 * 2**20
ROW_BYTES = 1024


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
        fresh_task: Callable[[], SourceTask] | None = None,
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
        # Reading ahead: a new task of the same source and number, for when what was read
        # ahead is thrown away (a task is opened once); the reading; where it started.
        self.fresh_task = fresh_task
        self._ahead: asyncio.Task | None = None
        self._ahead_from: dict[str, Any] | None = None
        self._ahead_batches: list[Batch | None] = []
        self._ahead_stop = asyncio.Event()

    @property
    def can_read_ahead(self) -> bool:
        return self.fresh_task is not None and self.task.read_ahead

    def read_ahead(self) -> None:
        """Start reading the task's input before this process knows whether it runs the
        task: open it at the stored offsets and poll into memory (up to READ_AHEAD_BYTES),
        writing nothing. Then either `run` (which keeps what was read if the offsets are
        unchanged) or `discard`."""
        assert self.can_read_ahead and self._ahead is None
        self._ahead = asyncio.create_task(self._read_ahead())

    async def _read_ahead(self) -> None:
        self._ahead_from = await self.writer.stored()
        await self.task.open(self._ahead_from)
        size = 0
        while size < READ_AHEAD_BYTES and not self._ahead_stop.is_set():
            # A poll is never cancelled here: the task polls on after this.
            batch = await self.task.poll()
            if batch is None or len(batch) or batch.errors or batch.source_offsets:
                self._ahead_batches.append(batch)
            if batch is None:
                return
            size += batch.columns.nbytes if batch.columnar else len(batch) * ROW_BYTES

    async def _end_read_ahead(self) -> bool:
        """Stop reading ahead; True if it went well (the task is open, its batches kept)."""
        assert self._ahead is not None
        self._ahead_stop.set()
        await asyncio.wait([self._ahead])
        return not self._ahead.cancelled() and self._ahead.exception() is None

    async def discard(self) -> None:
        """Throw away what was read ahead: the task runs elsewhere."""
        if self._ahead is not None:
            await self._end_read_ahead()
        await self.task.close()

    async def _kept_ahead(self, offsets: dict[str, Any]) -> list[Batch | None]:
        """What was read ahead from `offsets` (the task is open there), or nothing (the
        task opened afresh at `offsets`): the stored offsets moved meanwhile (another
        process ran the task), or the reading failed (the fresh task meets it again)."""
        if self._ahead is not None:
            ok = await self._end_read_ahead()
            self._ahead = None
            if ok and offsets == self._ahead_from:
                batches, self._ahead_batches = self._ahead_batches, []
                log.info("%s: task %d read %s record(s) ahead while its process joined the group", self.name,
                         self.index, f"{sum(len(b) + len(b.errors) for b in batches if b is not None):,}")
                return batches
            await self.task.close()
            assert self.fresh_task is not None
            self.task, self._ahead_batches = self.fresh_task(), []
        await self.task.open(offsets)
        return []

    async def run(self) -> None:
        async with errors_named(self.name, self.counters.target):
            await self._run()

    async def _run(self) -> None:
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(QUEUE_BATCHES)
        try:
            offsets = await retrying(self.writer.open, self.counters, f"{self.name}: read offsets")
            ahead = await self._kept_ahead(offsets)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._poll(queue, ahead))
                group.create_task(self._produce(queue))
        finally:
            await self.task.close()

    async def _poll(self, queue: asyncio.Queue[Batch | None], ahead: list[Batch | None]) -> None:
        for batch in ahead:
            if self.stop.is_set():  # (what is left is read again by the task's next run)
                break
            if batch is None:  # the input ended while reading ahead
                await queue.put(None)
                return
            self.counters.records_in += len(batch) + len(batch.errors)
            await queue.put(batch)
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
            if batch.columnar:  # a columnar source: the records stay columns to the topic
                columns = batch.columns if indexes is None else batch.columns.take(indexes)
                columns = self._project_columns(topic, columns)
                keys = _key_column(columns, topic.key)
                framed = topic.encoder.encode_columns(columns)
                if framed is not None:  # all fit: no bytes object per record on the way
                    produce += self._partitioned(topic, keys, framed)
                    produced += len(framed)
                    continue
                # Some record may not fit: the per-record path finds and names it.
                rows = columns.to_pylist()
                values, failures = topic.encoder.rows.encode(rows)
                record = rows.__getitem__
            else:
                rows = batch.rows if indexes is None else [batch.rows[i] for i in indexes]
                self._project(topic, rows)
                values, failures = topic.encoder.encode(rows)
                keys = None if topic.key is None else [row.get(topic.key) for row in rows]
                record = rows.__getitem__
            if failures:
                for f in failures:
                    error = self._context(RecordError(
                        error=f.error,
                        stage="encode",
                        record=record(f.index),
                        field=f.field,
                        position=batch.position(f.index if indexes is None else indexes[f.index]),
                    ))
                    error.topic = topic.name
                    errors.append(error)
                bad = {f.index for f in failures}
                good = [i for i in range(len(values)) if i not in bad]
                values = [values[i] for i in good]
                if isinstance(keys, pa.Array):
                    keys = keys.take(pa.array(good, pa.int64()))
                elif keys is not None:
                    keys = [keys[i] for i in good]
            produce += self._partitioned(topic, keys, values)
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

    def _project_columns(self, topic: Topic, columns: pa.RecordBatch) -> pa.RecordBatch:
        """`_project` for columns: the topic's fields only (a column selection)."""
        extra = [name for name in columns.schema.names if name not in topic.fields]
        if not extra:
            return columns
        for name in extra:
            dropped = self.counters.dropped
            if name not in dropped:
                log.warning("%s: field %r is not in the schema of topic %r; dropping it from the records "
                            "(add it to the schema to keep it)", self.name, name, topic.name)
            dropped[name] = dropped.get(name, 0) + columns.num_rows
        return columns.select([name for name in columns.schema.names if name in topic.fields])

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

    def _partitioned(
        self, topic: Topic, keys: list[Any] | pa.Array | None, values: list[bytes] | pa.Array
    ) -> list[ProduceBatch]:
        """The records in one produce batch per partition, by their key: a list of the key
        field's values, or the key column (string or binary: partitioned vectorised).
        Values (and keys) given as arrays stay arrays, taken per partition."""
        if isinstance(keys, pa.Array):
            parts = self.partitioner.partition_column(keys, topic.partitions)
            keys = keys.cast(pa.binary())
        else:
            keys = [None] * len(values) if keys is None else [_key_bytes(k) for k in keys]
            parts = pa.array(self.partitioner.partition(keys, topic.partitions), pa.int64())
        now = int(time.time() * 1000)
        out = []
        for p in range(topic.partitions):
            picked = pc.indices_nonzero(pc.equal(parts, pa.scalar(p, pa.int64())))  # ascending: in order
            if len(picked):
                out.append(ProduceBatch(topic.name, p, _pick(keys, picked), _pick(values, picked), [now] * len(picked)))
        return out


def _pick(items: list[Any] | pa.Array, indexes: pa.Array) -> list[Any] | pa.Array:
    if isinstance(items, pa.Array):
        return items.take(indexes)
    return [items[i] for i in indexes.to_pylist()]


def _key_column(columns: pa.RecordBatch, name: str | None) -> pa.Array | list[Any] | None:
    """The key field of columnar records: the column itself when it is text or bytes (to be
    partitioned vectorised), else its values; None without a key field."""
    if name is None:
        return None
    index = columns.schema.get_field_index(name)
    if index < 0:
        return [None] * columns.num_rows
    column = columns.column(index)
    if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
        return column
    return column.to_pylist()


def _key_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode("utf-8")
