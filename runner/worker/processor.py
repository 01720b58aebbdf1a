"""The processor runner: input topics → (filter) → windowed aggregation, table join, or
as they are → output topic.

One task per processor reads every partition of its input topics (no consumer group: it
keeps its own offsets). Records that do not meet `where:` are dropped there (evaluated on
Arrow columns: `runner.expressions`); one it cannot be evaluated on is a data error.

A join or a pass (merge, filter) writes each record on at once, with its key and
timestamp, joined fields added (`runner.processing.tables`): the table topic is read from
its beginning into the latest value per key before the first record is joined (in a
`--once` run, after what feeds the table has ended), then kept up to date before each
batch, like Kafka Streams' GlobalKTable: every runner holds the whole table, so the input
need not be partitioned like it. A table record without a key is a data error.

An aggregation works a batch at a time (`runner.processing.windows`).
Fetched records wait per partition until every partition has got past them in event time
(`_release`), so partitions read at different paces do not make each other's records
late. After each batch it hands the broker, through the same writer a source task uses,
the output records, the dead letters and, as the task's offsets, where each input
partition resumes and the aggregation state. On the embedded broker these commit in one
transaction, so a crash anywhere resumes from the last commit exactly: no window is lost
or emitted twice.

Event time comes from the `time:` field, or from the records' topic timestamps. A record
with no time or a null group-by field, or that came after its window closed (late), goes
to the dead-letter topic, named with the processor and field (and, when late, the window
and by how much). With `idle_close`, a processor that has had no input for that long
closes every open window (the stream time moves just past them). A `--once` run ends its
input like a bounded stream: when what feeds it has ended and every input partition is
read to its end, every open window is emitted.

The state travels with the offsets (Arrow IPC, base64 in the offsets' JSON): on the
embedded broker in the transaction of each batch (exactly once); on Kafka as a checkpoint
in the offsets topic after the batch's records are acknowledged (at-least-once: a runner
that takes over after a crash emits again what was emitted since, with the same values).
That suits the state of open windows; a changelog topic for large state is yet to come.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.broker.base import Broker, ProduceBatch, TopicPartition
from runner.broker.partitioner import partition_key_column
from runner.errors import FatalError, RecordError
from runner.expressions import Condition
from runner.processing.tables import LatestByKey, positions
from runner.processing.windows import Aggregate, Count, Hopping, Session, Sliding, Tumbling, Window, WindowedAggregation
from runner.schema.arrow import avro_to_arrow
from runner.schema.codec import BatchDecoder
from runner.spec.model import ProcessorSpec
from runner.worker.common import Counters, DeadLetters, Topic, retrying

FETCH_RECORDS = 50_000  # per fetch: the aggregation runs at 3M records/s on 10k batches, 7.5M on 50k
QUEUE_LIMIT = 200_000  # records held back for slower partitions, at most


@dataclass(frozen=True)
class Task:
    """Which part of a processor a runner is: the whole processor (the default), or the
    aggregation of some partitions (see `Pipeline._processor_slots`)."""

    index: int = 0  # the task's number among the processor's tasks
    partitions: list[TopicPartition] | None = None  # the input partitions it reads; None: all
    count: int = 1  # how many tasks the processor has (its state is refused by another layout)


class ProcessorRunner:
    def __init__(self, spec: ProcessorSpec, inputs: dict[str, Topic], output: Topic, broker: Broker,
                 lookup: Any, dead_letters: DeadLetters, counters: Counters, stop: asyncio.Event,
                 upstream_done: asyncio.Event | None, time_is_timestamp: bool,
                 table: Topic | None = None, done: asyncio.Event | None = None,
                 task: Task | None = None) -> None:
        self.spec = spec
        self.task = task or Task()
        self.done = done  # set when the run ends by itself (a --once run's input ended)
        self.name = spec.name
        self.inputs = inputs
        self.output = output
        self.broker = broker
        self.dead_letters = dead_letters
        self.counters = counters
        self.stop = stop
        self.upstream_done = upstream_done  # set: the input will not grow (a --once run)
        self.decoders = {t: BatchDecoder(lookup, topic.schema) for t, topic in inputs.items()}
        self.arrow = {t: avro_to_arrow(topic.schema) for t, topic in inputs.items()}
        self.time_is_timestamp = time_is_timestamp
        self.where = Condition(spec.where, label=f"where {spec.where!r}") if spec.where is not None else None
        self.aggregation: WindowedAggregation | None = None
        if spec.window is not None:
            self.aggregation = WindowedAggregation(
                _window(spec.window), spec.keys, [Aggregate(n, f, fld) for n, f, fld in spec.aggregates], grace=spec.grace,
                emit=spec.emit)
        # Tumbling and hopping windows end before their end; sessions and sliding ones at it.
        self.end_bracket = "]" if spec.window and ("session" in spec.window or "sliding" in spec.window) else ")"
        self.needed = list(dict.fromkeys([*spec.keys, *(f for _, _, f in spec.aggregates if f)]))
        self.out_arrow = avro_to_arrow(output.schema)
        self.defaults = {f["name"]: f.get("default") for f in output.schema["fields"]}
        self.table_topic = table
        self.table: LatestByKey | None = None
        self.table_consumer: Any = None
        self.table_read: dict[TopicPartition, int] = {}  # offset after the last table record read
        if table is not None:
            wanted = spec.join.fields or [f["name"] for f in table.schema["fields"]]
            joined = [name for name in wanted if name in self.out_arrow.names]
            self.table_decoder = BatchDecoder(lookup, table.schema)
            self.table_arrow = avro_to_arrow(table.schema)
            self.table = LatestByKey(pa.schema([self.out_arrow.field(name) for name in joined]), spec.join.retention)
        self.writer = broker.source_writer(self.name, self.task.index, [output.name, *self._dlq()],
                                           replays_exactly=False)
        self.state_key = f"#state/{self.task.index}"  # (no topic name has a #: no clash with "topic/partition")
        self.positions: dict[TopicPartition, int] = {}
        self.aggregated = 0  # records counted into windows or written on, not yet committed
        self.fetched_to: dict[TopicPartition, int] = {}  # offset after the last record fetched
        # Fetched records not aggregated yet (see _release): (columns, event times, offsets).
        self.queued: dict[TopicPartition, tuple[pa.Table, pa.Array, pa.Array]] = {}

    def _dlq(self) -> list[str]:
        return [self.dead_letters.topic.name] if self.dead_letters.topic is not None else []

    async def run(self) -> None:
        stored = await self.writer.open()
        layouts = {v.get("tasks", 1) for k, v in stored.items() if k.startswith("#state/")}
        if layouts and layouts != {self.task.count}:
            raise FatalError(
                f"{self.name}: its state was written by {'/'.join(map(str, sorted(layouts)))} task(s), and it now "
                f"runs as {self.task.count} (the spec changed how it divides: its input's key, or its inputs)",
                hint="put the spec back, or start the processor afresh (a new name, or a new state directory)")
        if self.state_key in stored and self.aggregation is not None:
            snapshot = stored[self.state_key]
            self.aggregation.restore({"stream_time": snapshot["stream_time"],
                                      "tables": {k: base64.b64decode(v) for k, v in snapshot["tables"].items()}})
        # Every partition of the inputs (or the task's), no group: the offsets are ours.
        consumer = await self.broker.consumer(None, list(self.inputs), only=self.task.partitions)
        try:
            for tp in await consumer.assignment():
                position = stored.get(f"{tp.topic}/{tp.partition}", 0)
                await consumer.seek(tp, position)
                self.positions[tp] = self.fetched_to[tp] = position
            if self.aggregation is not None:
                await self._loop(consumer)
            else:
                await self._pass_loop(consumer)
        finally:
            await consumer.close()
            if self.table_consumer is not None:
                await self.table_consumer.close()
        if self.done is not None and not self.stop.is_set():
            self.done.set()

    async def _loop(self, consumer: Any) -> None:
        idle_since = time.monotonic()
        ends: dict[TopicPartition, int] | None = None
        while not self.stop.is_set():
            if ends is None and self.upstream_done is not None and self.upstream_done.is_set():
                ends = await self._ends()
            if ends is not None and all(self.fetched_to.get(tp, 0) >= end for tp, end in ends.items()):
                # A bounded run: the input ends here, and with it every window.
                emitted, errors = self._release(None)
                await self._commit(pa.concat_tables([emitted, self.aggregation.close_all()], promote_options="default")
                                   if emitted.num_rows else self.aggregation.close_all(), errors)
                return
            fetched = await consumer.fetch(FETCH_RECORDS, 0.2)
            if not fetched:
                idle = self.spec.idle_close
                if idle is not None and (self.queued or self.aggregation.open_windows) and \
                        (time.monotonic() - idle_since) * 1000 >= idle:
                    emitted, errors = self._release(None)  # no input for idle_close: close what is open
                    await self._commit(emitted, errors)
                    await self._commit(self.aggregation.close_all(), [])
                continue
            idle_since = time.monotonic()
            errors = []
            for fb in fetched:
                errors += self._queue(fb)
            emitted, late = self._release(await self._ends())
            await self._commit(emitted, errors + late)

    async def _ends(self) -> dict[TopicPartition, int]:
        """Where each partition this runner reads ends now."""
        ends = {}
        for topic in self.inputs:
            for p, end in enumerate(await self.broker.end_offsets(topic)):
                if self.task.partitions is None or TopicPartition(topic, p) in self.task.partitions:
                    ends[TopicPartition(topic, p)] = end
        return ends

    # -- fetched records, in event-time order across partitions -----------------------------

    def _queue(self, fb: Any) -> list[RecordError]:
        """A partition's fetched batch decoded and queued; errors for records without a window."""
        table, times, offsets, errors = self._decoded(fb)
        tp = TopicPartition(fb.topic, fb.partition)
        self.fetched_to[tp] = fb.next_offset
        if table.num_rows:
            if tp in self.queued:
                old_table, old_times, old_offsets = self.queued[tp]
                table = pa.concat_tables([old_table, table], promote_options="permissive")
                times = pa.concat_arrays([old_times, times])
                offsets = pa.concat_arrays([old_offsets, offsets])
            self.queued[tp] = (table, times, offsets)
        return errors

    def _release(self, ends: dict[TopicPartition, int] | None) -> tuple[pa.Table, list[RecordError]]:
        """Aggregate the queued records every partition has got past: a partition's records
        up to the event time the least advanced partition has reached (a partition still
        behind its end with nothing queued holds everything back; one caught up does not).
        Partitions read at different paces so do not make each other's records late.
        `ends` None (input ended, idle) or too much queued: everything."""
        if not self.queued:
            return self._empty(), []
        limit = None
        if ends is not None and sum(len(t) for _, t, _ in self.queued.values()) < QUEUE_LIMIT:
            behind = [tp for tp, end in ends.items() if tp not in self.queued and self.fetched_to.get(tp, 0) < end]
            if behind:
                return self._empty(), []
            limit = min(pc.max(times).as_py() for _, times, _ in self.queued.values())
        tables, times, offsets, parts = [], [], [], []
        # Partitions in a fixed order, so that records of equal event time fall the same way
        # however the fetches came (a replay after a crash gives the same windows).
        for tp in sorted(self.queued, key=lambda tp: (tp.topic, tp.partition)):
            table, stamps, offs = self.queued[tp]
            n = len(stamps)
            if limit is not None:  # the prefix up to the first record past the limit
                past = pc.indices_nonzero(pc.greater(stamps, limit))
                n = past[0].as_py() if len(past) else len(stamps)
            if n == 0:
                continue
            tables.append(table.slice(0, n))
            times.append(stamps.slice(0, n))
            offsets.append(offs.slice(0, n))
            parts.append((tp, n))
            if n == len(stamps):
                del self.queued[tp]
            else:
                self.queued[tp] = (table.slice(n), stamps.slice(n), offs.slice(n))
        if not tables:
            return self._empty(), []
        # Merged topics: columns of one topic only are null in the others' records.
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        stamps = pa.concat_arrays(times) if len(times) > 1 else times[0]
        needed = table.select(self.needed)  # (reordered below: the aggregated columns only)
        order = None
        if len(tables) > 1:  # stable: each partition's own order kept among equal times
            order = pc.sort_indices(stamps)
            needed, stamps = needed.take(order), stamps.take(order)
        result = self.aggregation.process(needed, stamps)
        self.aggregated += table.num_rows - len(result.late)
        if not result.late:
            return result.emitted, []
        offs = pa.concat_arrays(offsets) if len(offsets) > 1 else offsets[0]
        starts = [0]
        for _, n in parts:
            starts.append(starts[-1] + n)
        errors = []
        for late in result.late:
            i = order[late.index].as_py() if order is not None else late.index  # its row in `table`
            tp = parts[next(k for k in range(len(parts)) if starts[k] <= i < starts[k + 1])][0]
            errors.append(self._error(
                f"late: window [{_iso(late.window_start)}, {_iso(late.window_end)}{self.end_bracket} had closed "
                f"{late.late_by} ms before it came (grace {self.spec.grace} ms)", "process",
                table.slice(i, 1).to_pylist()[0], (tp.topic, tp.partition, offs[i].as_py()), field=self.spec.time))
        return result.emitted, errors

    def _empty(self) -> pa.Table:
        return self.aggregation.advance(self.aggregation.stream_time) if self.aggregation.stream_time is not None \
            else pa.table({})

    def _positions(self) -> dict[TopicPartition, int]:
        """Where each input partition resumes: its first queued record, else past what was fetched."""
        out = dict(self.positions)
        out.update(self.fetched_to)
        for tp, (_, _, offsets) in self.queued.items():
            out[tp] = offsets[0].as_py()
        return out

    def _decoded(self, fb: Any) -> tuple[pa.Table, pa.Array, pa.Array, list[RecordError]]:
        """One partition's batch decoded and filtered: for an aggregation, the records that
        have a window, their event times and their offsets; errors for the others."""
        table, kept, errors = self._decode(fb)
        if self.spec.time is not None:
            times = table.column(self.spec.time).combine_chunks()
            times = pc.cast(pc.cast(times, pa.timestamp("ms", tz="UTC")), pa.int64()) if self.time_is_timestamp \
                else pc.cast(times, pa.int64())
        else:
            times = pa.array(fb.timestamps, pa.int64()).take(kept)
        offsets = pa.array(fb.offsets, pa.int64()).take(kept)
        # A record with no time or a null group-by field has no window: a data error.
        usable = pc.is_valid(times)
        for name in self.spec.keys:
            usable = pc.and_(usable, pc.is_valid(table.column(name).combine_chunks()))
        if not pc.all(usable).as_py():
            for i in pc.indices_nonzero(pc.invert(usable)).to_pylist():
                row = table.slice(i, 1).to_pylist()[0]
                fields = [self.spec.time] if self.spec.time and row.get(self.spec.time) is None else []
                missing = (fields or [k for k in self.spec.keys if row.get(k) is None])[0]
                what = "event time" if missing == self.spec.time else "group-by field"
                errors.append(self._error(f"the {what} {missing!r} is null: the record has no window", "process",
                                          row, (fb.topic, fb.partition, offsets[i].as_py()), field=missing))
            table, times, offsets = table.filter(usable), times.filter(usable), offsets.filter(usable)
        return table, times, offsets, errors

    def _decode(self, fb: Any) -> tuple[pa.Table, pa.Array, list[RecordError]]:
        """One partition's batch decoded, and the records that meet `where:`: their columns,
        their indexes in the batch, and errors for the others (undecodable, or the
        condition fails on them)."""
        self.counters.records_in += len(fb.values)
        columns, rows, failures = self.decoders[fb.topic].decode(
            fb.value_array if fb.value_array is not None else fb.values
        )
        errors = [self._error(f.error, "decode", fb.values[f.index], (fb.topic, fb.partition, fb.offsets[f.index]))
                  for f in failures]
        if columns is None:
            bad = {f.index for f in failures}
            kept = pa.array([i for i in range(len(fb.values)) if i not in bad], pa.int64())
            columns = pa.RecordBatch.from_pylist([rows[i] for i in kept.to_pylist()], schema=self.arrow[fb.topic])
        else:
            kept = positions(len(fb.values))
        table = pa.Table.from_batches([columns])
        if self.where is not None and table.num_rows:
            mask, failed = self.where.mask(table)
            for i, (message, field) in sorted(failed.items()):
                errors.append(self._error(message, "process", table.slice(i, 1).to_pylist()[0],
                                          (fb.topic, fb.partition, fb.offsets[kept[i].as_py()]), field=field))
            if not pc.all(mask).as_py():
                self.counters.filtered += len(mask) - len(failed) - (pc.sum(mask).as_py() or 0)
                table, kept = table.filter(mask), kept.filter(mask)
        return table, kept, errors

    # -- a join or a pass: records written on as they come ---------------------------------------

    async def _pass_loop(self, consumer: Any) -> None:
        if self.table is not None:
            if self.upstream_done is not None:
                await _either(self.upstream_done, self.stop)  # a bounded run: the whole table before any record
                if self.stop.is_set():
                    return
            await self._load_table(to_end=True)
        ends: dict[TopicPartition, int] | None = None
        while not self.stop.is_set():
            if ends is None and self.upstream_done is not None and self.upstream_done.is_set():
                ends = await self._ends()
            if ends is not None and all(self.fetched_to.get(tp, 0) >= end for tp, end in ends.items()):
                return
            fetched = await consumer.fetch(FETCH_RECORDS, 0.2)
            if not fetched:
                continue
            if self.table is not None:
                await self._load_table(to_end=False)  # what the table has got meanwhile
            produce: list[ProduceBatch] = []
            errors: list[RecordError] = []
            for fb in fetched:
                batch, failed = self._passed(fb)
                produce += batch
                errors += failed
                self.fetched_to[TopicPartition(fb.topic, fb.partition)] = fb.next_offset
            await self._commit_records(produce, errors, windows=0)

    def _passed(self, fb: Any) -> tuple[list[ProduceBatch], list[RecordError]]:
        """One fetched batch as output records (joined), and the errors."""
        table, kept, errors = self._decode(fb)
        if not table.num_rows:
            return [], errors
        common = [f.name for f in self.out_arrow if f.name in table.column_names]
        out = table.select(common)
        if self.table is not None:
            on = table.column(self.spec.join.on).combine_chunks()
            if not (pa.types.is_string(on.type) or pa.types.is_binary(on.type)):
                on = pc.cast(on, pa.string())  # ints as their digits, as a source keys records
            joined, matched = self.table.lookup(on)
            if self.spec.join.how == "inner" and not pc.all(matched).as_py():
                self.counters.filtered += len(matched) - (pc.sum(matched).as_py() or 0)
                out, joined, kept = out.filter(matched), joined.filter(matched), kept.filter(matched)
            for name in joined.column_names:
                out = out.append_column(name, joined.column(name))
        self.aggregated += out.num_rows
        keys = pa.array(fb.keys, pa.binary()).take(kept)
        stamps = pa.array(fb.timestamps, pa.int64()).take(kept)
        return self._encoded(out, keys, stamps), errors

    async def _load_table(self, *, to_end: bool) -> None:
        """The table topic's new records into the table: everything up to its end
        (`to_end`), or what one fetch gives."""
        if self.table_consumer is None:  # the table is read from its beginning, every partition
            self.table_consumer = await self.broker.consumer(None, [self.table_topic.name])
            for tp in await self.table_consumer.assignment():
                await self.table_consumer.seek(tp, 0)
                self.table_read[tp] = 0
        while not self.stop.is_set():
            ends = {TopicPartition(self.table_topic.name, p): end
                    for p, end in enumerate(await self.broker.end_offsets(self.table_topic.name))}
            if all(self.table_read.get(tp, 0) >= end for tp, end in ends.items()):
                return
            fetched = await self.table_consumer.fetch(FETCH_RECORDS, 0.2 if to_end else 0)
            errors = []
            for fb in fetched:
                failed = self._table_batch(fb)
                self.counters.records_in += len(failed)  # (good table records are state, not read records)
                errors += failed
                self.table_read[TopicPartition(fb.topic, fb.partition)] = fb.next_offset
            if errors:
                await self._commit_records([], errors, windows=0)
            if not to_end:
                return

    def _table_batch(self, fb: Any) -> list[RecordError]:
        """A table topic's batch into the table: the latest value per key, tombstones
        (null values) delete; a record without a key is a data error."""
        errors = []
        keyed = [i for i, key in enumerate(fb.keys) if key is not None]
        for i in (i for i, key in enumerate(fb.keys) if key is None):
            errors.append(self._error(f"table {fb.topic!r}: a record without a key (the join matches records by "
                                      "the table's keys)", "process", fb.values[i], (fb.topic, fb.partition,
                                                                                    fb.offsets[i])))
        live = [i for i in keyed if fb.values[i] is not None]
        columns, rows, failures = self.table_decoder.decode([fb.values[i] for i in live])
        bad = {live[f.index] for f in failures}
        errors += [self._error(f.error, "decode", fb.values[live[f.index]],
                               (fb.topic, fb.partition, fb.offsets[live[f.index]])) for f in failures]
        good = [i for i in live if i not in bad]
        if columns is None:
            columns = pa.RecordBatch.from_pylist([rows[j] for j, i in enumerate(live) if i not in bad],
                                                 schema=self.table_arrow)
        dead = [i for i in keyed if fb.values[i] is None]  # tombstones: their key goes
        schema = self.table.schema
        values = pa.concat_tables([
            pa.Table.from_batches([columns]).select(schema.names).cast(schema),
            pa.table({f.name: pa.nulls(len(dead), f.type) for f in schema}, schema=schema),
        ])
        order = pc.sort_indices(pa.array(good + dead, pa.int64()))  # back into offset order
        self.table.update(pa.array([fb.keys[i] for i in good + dead], pa.binary()).take(order), values.take(order),
                          pa.array([False] * len(good) + [True] * len(dead), pa.bool_()).take(order),
                          pa.array([fb.timestamps[i] for i in good + dead], pa.int64()).take(order))
        return errors

    def _error(self, message: str, stage: str, record: Any, where: tuple[str, int, int],
               field: str | None = None) -> RecordError:
        topic, partition, offset = where
        return RecordError(error=message, stage=stage, record=record, field=field,
                           position=f"{topic}[{partition}]@{offset}", connector=self.name, topic=topic)

    # -- output, dead letters, offsets and state: one commit ------------------------------------

    async def _commit(self, emitted: pa.Table, errors: list[RecordError]) -> None:
        """An aggregation's emitted windows, keyed by their group, with the errors."""
        produce = self._encoded(emitted, pa.array(_keys(emitted, self.spec.keys), pa.binary()), None) \
            if emitted.num_rows else []
        await self._commit_records(produce, errors, windows=emitted.num_rows)

    async def _commit_records(self, produce: list[ProduceBatch], errors: list[RecordError], *, windows: int) -> None:
        self.counters.errors += len(errors)
        produce += self.dead_letters.batches(errors)  # raises DataError under tolerance none
        offsets: dict[str, Any] = {f"{tp.topic}/{tp.partition}": pos for tp, pos in self._positions().items()}
        if self.aggregation is not None:
            snapshot = self.aggregation.snapshot()
            offsets[self.state_key] = {"tasks": self.task.count, "stream_time": snapshot["stream_time"],
                                "tables": {k: base64.b64encode(v).decode() for k, v in snapshot["tables"].items()}}
        await retrying(lambda: self.writer.produce(produce, offsets), self.counters, f"{self.name}: produce")
        # An aggregation's records are delivered into windows; the windows it emits are counted apart.
        self.counters.records_out += self.aggregated
        self.counters.windows += windows
        self.counters.dead_lettered += len(errors)
        self.dead_letters.settled(self.aggregated, len(errors))
        self.aggregated = 0

    def _encoded(self, records: pa.Table, keys: pa.Array, stamps: pa.Array | None) -> list[ProduceBatch]:
        """Output records, encoded, one produce batch per partition of their key (a binary
        array; timestamps: `stamps`, or now)."""
        columns = {}
        for field in self.out_arrow:
            if field.name not in records.column_names:  # a given schema's field the processor does not write
                columns[field.name] = pa.repeat(pa.scalar(self.defaults.get(field.name), field.type), records.num_rows)
                continue
            column = records.column(field.name)
            if field.name in ("window_start", "window_end") and self.aggregation is not None:
                column = pc.cast(column, pa.timestamp("ms", tz="UTC"))
            columns[field.name] = column.cast(field.type)
        batch = pa.RecordBatch.from_pydict({k: v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v
                                            for k, v in columns.items()}, schema=self.out_arrow)
        values = self.output.encoder.encode_columns(batch)
        if values is None:  # our own derived schema: a record that does not fit it is a bug
            values, failures = self.output.encoder.rows.encode(batch.to_pylist())
            if failures:
                raise RuntimeError(f"{self.name}: an output record did not fit its derived schema: {failures[0]}")
            values = pa.array(values, pa.binary())
        parts = partition_key_column(keys, self.output.partitions)
        now = int(time.time() * 1000)
        out = []
        for p in range(self.output.partitions):
            picked = pc.indices_nonzero(pc.equal(parts, p))
            if len(picked):
                out.append(ProduceBatch(self.output.name, p, keys.take(picked), values.take(picked),
                                        stamps.take(picked).to_pylist() if stamps is not None else [now] * len(picked)))
        return out


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Wait until `a` or `b` is set."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _window(spec: dict[str, int]) -> Window:
    """The window of a processor's `window:` (as the spec checked it)."""
    if "hopping" in spec:
        return Hopping(spec["hopping"], spec["advance"])
    (kind, value), = spec.items()
    return {"tumbling": Tumbling, "sliding": Sliding, "session": Session, "count": Count}[kind](value)


def _keys(emitted: pa.Table, fields: list[str]) -> list[bytes | None]:
    """Each output record's key: its group-by value as text, or several as a JSON array."""
    if not fields:
        return [None] * emitted.num_rows
    columns = [emitted.column(f).to_pylist() for f in fields]
    if len(fields) == 1:
        return [None if v is None else (v if isinstance(v, bytes) else str(v).encode()) for v in columns[0]]
    return [json.dumps(list(values), default=str, ensure_ascii=False).encode() for values in zip(*columns)]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z")

