"""The tasks of the `kafka` source and sink: what talks to Kafka (see the package docstring)."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runner.batch import Batch
from runner.broker.kafka import kafka_error, reason, retriable
from runner.broker.kafka_options import client_settings
from runner.connector import (
    FatalError,
    RecordError,
    RetryableError,
    SinkTask,
    SourceTask,
    TopicPartition,
    task_of,
)

from connectors.kafka import SOURCE_OFFSET_HEADER

log = logging.getLogger("pipeline.kafka")

_json_decode = json.JSONDecoder().decode


# -- shared: the cluster setting, errors, reading a partition's tail ---------------------------


def _unreachable(connector: str, what: str, servers: str, exc: BaseException) -> FatalError:
    return FatalError(
        f"{connector}: cannot reach the {what} Kafka cluster at {servers}: {reason(exc)}",
        hint="check config.cluster.bootstrap_servers (and security) and that the cluster is up",
    )


async def _scan(
    consumer: AIOKafkaConsumer, starts: dict[KafkaTP, int], timeout: float
) -> tuple[dict[KafkaTP, list[Any]], dict[KafkaTP, int]]:
    """Read each partition from its start offset up to the high watermark its fetches
    report: the records read and that end offset, per partition.

    This is how the end of a partition is found: some Kafka-protocol brokers (the Tansu
    build the tests run among them) answer ListOffsets with the last *batch's* base offset
    + 1, while a fetch's high watermark is right on all of them."""
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    records: dict[KafkaTP, list[Any]] = {tp: [] for tp in starts}
    ends: dict[KafkaTP, int] = {}
    waiting = set(starts)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while waiting:
        got = await consumer.getmany(*waiting, timeout_ms=100)
        for tp, batch in got.items():
            records[tp] += batch
        for tp in list(waiting):
            high = consumer.highwater(tp)
            if high is not None and await consumer.position(tp) >= high:
                ends[tp] = high
                waiting.discard(tp)
        if waiting and loop.time() > deadline:
            names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(waiting))
            raise RetryableError(f"reading {names} did not reach the end within {timeout:.0f} s")
    return records, ends


async def _end_offsets(consumer: AIOKafkaConsumer, tps: list[KafkaTP], timeout: float) -> dict[KafkaTP, int]:
    """The true end offset (next offset) of each partition; `consumer` is left assigned to
    whatever it read."""
    listed = await consumer.end_offsets(tps)
    ends = {tp: 0 for tp in tps if listed[tp] <= 0}
    if len(ends) < len(tps):
        _, found = await _scan(consumer, {tp: listed[tp] - 1 for tp in tps if listed[tp] > 0}, timeout)
        ends.update(found)
    return ends


# -- the sink -----------------------------------------------------------------------------


@dataclass
class _Partition:
    """What the sink knows of one assigned partition and its copy on the target."""

    target: KafkaTP
    #: Target end offset after the last acknowledged flush (or as found on open).
    end: int
    #: Source offset after the last record `put` (so a retried put sends nothing twice).
    next_offset: int | None
    #: Put since the last good flush, not yet acknowledged: (batch, index of its first such record).
    held: list[tuple[Batch, int]] = field(default_factory=list)
    #: Produce futures of what was sent of `held`, with their record counts, in order.
    sent: list[tuple[asyncio.Future, int]] = field(default_factory=list)
    #: "ok": `held` is sent in order; "unsure": a send failed, what landed must be read
    #: back before sending more; "resend": `held` is exactly what the target lacks.
    state: Literal["ok", "unsure", "resend"] = "ok"
    failure: BaseException | None = None


class KafkaSinkTask(SinkTask):
    def __init__(self, name: str, config: Any, partitions: dict[str, int], topics: tuple[str, ...]) -> None:
        self.name = name
        self.config = config
        self.options = config.options()
        self.settings = client_settings(self.options)
        self.servers = self.options.bootstrap_servers
        self.timeout = self.options.request_timeout_ms / 1000
        # The dead-letter topic is the one a sink may read without it being declared: 1 partition.
        self.source_partitions = {t: partitions.get(t, 1) for t in topics}
        self.producer: AIOKafkaProducer | None = None
        self.reader: AIOKafkaConsumer | None = None
        self.parts: dict[TopicPartition, _Partition] = {}

    def _target_topic(self, topic: str) -> str:
        return self.config.topic_prefix + topic

    # -- open: connect, create topics, find where each target partition ends ----------------

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.producer is None:
            await self._start()
        self.parts = {tp: p for tp, p in self.parts.items() if tp in partitions}
        if not partitions:
            return {}
        tails = await self._tails([KafkaTP(self._target_topic(tp.topic), tp.partition) for tp in partitions])
        resume = {}
        for tp in partitions:
            target = KafkaTP(self._target_topic(tp.topic), tp.partition)
            last, end = tails[target]
            self.parts[tp] = _Partition(target, end, None if last is None else last + 1)
            if last is not None:
                resume[tp] = last + 1
        log.info(
            "%s: resuming from the target: %s", self.name,
            ", ".join(f"{tp}@{off}" for tp, off in sorted(resume.items())) or "nothing copied yet",
        )
        return resume

    async def _start(self) -> None:
        producer_settings = {**dict(self.options.producer), **self.settings, "acks": "all"}
        reader_settings = {
            **dict(self.options.consumer), **self.settings,
            "group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": 100,
        }
        try:
            self.producer = AIOKafkaProducer(**producer_settings)
            await self.producer.start()
            self.reader = AIOKafkaConsumer(**reader_settings)
            await self.reader.start()
        except BaseException as exc:
            await self.close()
            if not isinstance(exc, Exception):
                raise
            raise _unreachable(self.name, "target", self.servers, exc) from exc
        await self._ensure_topics()

    async def _ensure_topics(self) -> None:
        wanted = {self._target_topic(t): (t, n) for t, n in self.source_partitions.items()}
        admin = AIOKafkaAdminClient(**self.settings)
        try:
            await admin.start()
            existing = await self._partition_counts(admin, list(wanted))
            for name, (source, count) in wanted.items():
                have = existing.get(name)
                if have is None:
                    try:
                        await admin.create_topics([NewTopic(name, count, self.options.replication_factor)])
                    except TopicAlreadyExistsError:
                        pass  # created meanwhile (another process of this pipeline)
                    have = await self._wait_for_topic(admin, name)
                    log.info("%s: created topic %r with %d partition(s) on %s", self.name, name, have, self.servers)
                if have < count:
                    raise FatalError(
                        f"{self.name}: target topic {name!r} on {self.servers} has {have} partition(s), "
                        f"fewer than the {count} of source topic {source!r}",
                        hint=f"add partitions to {name!r} on the target (kafka-topics --alter "
                        f"--partitions {count}), or choose another topic_prefix",
                    )
        except (FatalError, RetryableError):
            raise
        except Exception as exc:
            raise FatalError(f"{self.name}: target cluster {self.servers}: create topics: {reason(exc)}") from exc
        finally:
            await admin.close()

    @staticmethod
    async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
        # Listed first: describing a missing topic may auto-create it on some brokers.
        existing = set(await admin.list_topics())
        names = [n for n in names if n in existing]
        described = await admin.describe_topics(names) if names else []
        return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0 and t["partitions"]}

    async def _wait_for_topic(self, admin: AIOKafkaAdminClient, name: str) -> int:
        for _ in range(100):  # metadata may lag the creation briefly
            found = (await self._partition_counts(admin, [name])).get(name)
            if found:
                return found
            await asyncio.sleep(0.1)
        raise FatalError(f"{self.name}: topic {name!r} was created on {self.servers} but does not show in its metadata")

    async def _tails(self, targets: list[KafkaTP]) -> dict[KafkaTP, tuple[int | None, int]]:
        """Per target partition: the source offset named by its last record (None if empty
        or not written by this sink) and its end offset."""
        assert self.reader is not None
        try:
            listed = await self.reader.end_offsets(targets)
            starts = {tp: listed[tp] - 1 for tp in targets if listed[tp] > 0}
            records, ends = await _scan(self.reader, starts, self.timeout) if starts else ({}, {})
        except Exception as exc:
            raise kafka_error(exc, f"{self.name}: read the target partitions' last records on {self.servers}") from exc
        out: dict[KafkaTP, tuple[int | None, int]] = {}
        for tp in targets:
            if tp not in starts:
                out[tp] = (None, 0)
                continue
            last = _source_offset(records[tp][-1]) if records[tp] else None
            if records[tp] and last is None:
                log.warning(
                    "%s: the last record of %s[%d] on %s has no %s header: not written by this "
                    "sink, so it resumes from the consumer group's offset",
                    self.name, tp.topic, tp.partition, self.servers, SOURCE_OFFSET_HEADER,
                )
            out[tp] = (last, ends[tp])
        return out

    # -- put: send; flush: wait for the acknowledgements ----------------------------------------

    async def put(self, batch: Batch) -> None:
        part = self.parts.get(TopicPartition(batch.topic, batch.partition))
        if part is None or not len(batch):
            return None  # not ours (any more): its owner copies it
        start = 0
        if part.next_offset is not None and batch.record_offsets[0] < part.next_offset:
            start = bisect.bisect_left(batch.record_offsets, part.next_offset)  # put again after a retry
            if start >= len(batch):
                return None
        part.held.append((batch, start))
        part.next_offset = batch.record_offsets[-1] + 1
        if part.state == "ok" and any(_failed(f) for f, _ in part.sent):
            part.state = "unsure"  # sending more now could land after a gap
        if part.state == "ok":
            try:
                await self._send(part, batch, start)
            except Exception as exc:  # what was sent is read back before sending more
                part.state, part.failure = "unsure", exc
        return None

    async def _send(self, part: _Partition, batch: Batch, start: int) -> None:
        """Send `batch[start:]` to the target partition in as few Kafka batches as fit."""
        assert self.producer is not None
        producer, topic, partition = self.producer, part.target.topic, part.target.partition
        headers = batch.headers
        offsets, keys, values, stamps = batch.record_offsets, batch.keys, batch.values, batch.timestamps
        builder, count = producer.create_batch(), 0
        for i in range(start, len(offsets)):
            mark = (SOURCE_OFFSET_HEADER, str(offsets[i]).encode("ascii"))
            hs = headers[i] if headers is not None else None
            items = [(k, v) for k, v in hs.items() if k != SOURCE_OFFSET_HEADER] + [mark] if hs else [mark]
            if builder.append(key=keys[i], value=values[i], timestamp=stamps[i], headers=items) is None:
                builder.close()
                part.sent.append((await producer.send_batch(builder, topic, partition=partition), count))
                builder, count = producer.create_batch(), 0
                builder.append(key=keys[i], value=values[i], timestamp=stamps[i], headers=items)
            count += 1
        if count:
            builder.close()
            part.sent.append((await producer.send_batch(builder, topic, partition=partition), count))

    async def flush(self) -> None:
        for part in self.parts.values():
            if part.state != "ok":
                await self._recover(part)
        failed: list[_Partition] = []
        for part in self.parts.values():
            if not part.sent:
                continue
            results = await asyncio.gather(*(f for f, _ in part.sent), return_exceptions=True)
            error = next((r for r in results if isinstance(r, BaseException)), None)
            if error is None:
                part.end = results[-1].offset + part.sent[-1][1]
                part.held.clear()
                part.sent.clear()
            else:
                part.state, part.failure = "unsure", error
                failed.append(part)
        if not failed:
            return None
        part = failed[0]
        assert part.failure is not None
        doing = f"{self.name}: write to {part.target.topic}[{part.target.partition}] on {self.servers}"
        if all(retriable(p.failure) for p in failed if p.failure is not None):
            raise RetryableError(f"{doing}: {reason(part.failure)}")
        for p in failed:  # say so if a gap is why, before stopping
            await self._reconcile(p)
        raise FatalError(f"{doing}: {reason(part.failure)}")

    async def _recover(self, part: _Partition) -> None:
        """After a failed send: read back what landed, then send the rest, in order."""
        if part.state == "unsure":
            await self._reconcile(part)
        part.sent.clear()
        try:
            for batch, start in part.held:
                await self._send(part, batch, start)
        except Exception as exc:
            part.state, part.failure = "unsure", exc
            raise kafka_error(exc, f"{self.name}: write to {part.target.topic}[{part.target.partition}] on {self.servers}") from exc
        part.state, part.failure = "ok", None

    async def _reconcile(self, part: _Partition) -> None:
        """Drop from `held` what the target has since `part.end`; stop if what it has is
        not a prefix of `held` (a record failed while a later one landed)."""
        assert self.reader is not None
        if part.sent:  # let whatever is still in flight land (or fail) first
            await asyncio.gather(*(f for f, _ in part.sent), return_exceptions=True)
        where = f"{part.target.topic}[{part.target.partition}] on {self.servers}"
        try:
            records, ends = await _scan(self.reader, {part.target: part.end}, self.timeout)
        except Exception as exc:
            raise kafka_error(exc, f"{self.name}: read back {where}") from exc
        landed = [o for o in map(_source_offset, records[part.target]) if o is not None]
        expected = (o for batch, start in part.held for o in batch.record_offsets[start:])
        for i, (got, want) in enumerate(zip(landed, expected)):
            if got != want:
                raise FatalError(
                    f"{self.name}: {where} lacks the record of source offset {want} but has "
                    f"later ones: a write failed ({reason(part.failure) if part.failure else 'unknown'}) "
                    "while later records of the partition landed",
                    hint="copy this partition again into a fresh target topic; with "
                    "cluster.producer.enable_idempotence: true (on Kafka) this cannot happen",
                )
        held_count = sum(len(b) - s for b, s in part.held)
        if len(landed) > held_count:
            raise FatalError(f"{self.name}: {where} has records this sink did not send: another writer?")
        drop = len(landed)
        while drop and part.held:
            batch, start = part.held[0]
            if len(batch) - start <= drop:
                drop -= len(batch) - start
                part.held.pop(0)
            else:
                part.held[0] = (batch, start + drop)
                drop = 0
        part.end = ends[part.target]
        part.sent.clear()
        part.state = "resend"

    async def close(self) -> None:
        for client in (self.producer, self.reader):
            if client is not None:
                try:
                    await client.stop()
                except Exception:  # closing: nothing left to save
                    log.debug("%s: closing a Kafka client failed", self.name, exc_info=True)
        self.producer = self.reader = None
        self.parts = {}


def _failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _source_offset(record: Any) -> int | None:
    """The source offset a record written by this sink names, or None."""
    for key, value in reversed(record.headers or ()):
        if key == SOURCE_OFFSET_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


# -- the source ---------------------------------------------------------------------------


def _owner(tp: KafkaTP, tasks: int) -> int:
    """The task of `tasks` that reads a partition: a topic's partitions in turn, from the
    task its name gives (`task_of`), so they spread evenly and keep their task."""
    return (task_of(tp.topic, tasks) + tp.partition) % tasks


class KafkaSourceTask(SourceTask):
    def __init__(self, name: str, config: Any, share: tuple[int, int] = (0, 1)) -> None:
        self.name = name
        self.config = config
        self.share = share  # (this task, of how many): it reads the partitions `_owner` gives it
        self.options = config.options()
        self.settings = client_settings(self.options)
        self.servers = self.options.bootstrap_servers
        self.timeout = self.options.request_timeout_ms / 1000
        self.consumer: AIOKafkaConsumer | None = None
        self.ends: dict[KafkaTP, int] = {}
        self.unfinished: set[KafkaTP] = set()  # stop_at_end: partitions not at their end yet

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**{
            **dict(self.options.consumer), **self.settings,
            "group_id": None, "enable_auto_commit": False, "auto_offset_reset": self.config.start,
        })

    async def open(self, offsets: dict[str, Any]) -> None:
        self.consumer = consumer = self._consumer()
        try:
            await consumer.start()
            available = await consumer.topics()
        except BaseException as exc:
            await self.close()
            if not isinstance(exc, Exception):
                raise
            raise _unreachable(self.name, "source", self.servers, exc) from exc
        missing = [t for t in self.config.topics if t not in available]
        if missing:
            raise FatalError(
                f"{self.name}: topic(s) {', '.join(map(repr, missing))} do not exist on {self.servers}",
                hint="check config.topics",
            )
        tps = [KafkaTP(t, p) for t in self.config.topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        tps = [tp for tp in tps if _owner(tp, self.share[1]) == self.share[0]]
        starts: dict[KafkaTP, int] = {}
        probe = self._consumer()
        try:
            await probe.start()
            if self.config.stop_at_end or self.config.start == "latest":
                self.ends = await _end_offsets(probe, tps, self.timeout)
            beginnings = await probe.beginning_offsets(tps)
        except Exception as exc:
            raise kafka_error(exc, f"{self.name}: find the partitions' offsets on {self.servers}") from exc
        finally:
            await probe.stop()
        for tp in tps:
            stored = offsets.get(f"{tp.topic}/{tp.partition}")
            if stored is not None:
                starts[tp] = int(stored)
            else:
                starts[tp] = beginnings[tp] if self.config.start == "earliest" else self.ends[tp]
        consumer.assign(tps)
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        if self.config.stop_at_end:
            self.unfinished = {tp for tp in tps if starts[tp] < self.ends[tp]}
            done = [tp for tp in tps if tp not in self.unfinished]
            if done:
                consumer.pause(*done)

    async def poll(self) -> Batch | None:
        assert self.consumer is not None
        if self.config.stop_at_end and not self.unfinished:
            return None
        try:
            got = await self.consumer.getmany(timeout_ms=1000, max_records=self.config.batch_size)
        except Exception as exc:
            raise kafka_error(exc, f"{self.name}: fetch from {self.servers}") from exc
        rows: list[dict[str, Any]] = []
        positions: list[str] = []
        errors: list[RecordError] = []
        source_offsets: dict[str, int] = {}
        for tp, records in got.items():
            end = self.ends.get(tp) if self.config.stop_at_end else None
            prefix = f"{tp.topic}[{tp.partition}]@"
            last = None
            for r in records:
                if end is not None and r.offset >= end:
                    break  # past the end seen at open: the next run's
                last = r.offset
                where = prefix + str(r.offset)
                value = r.value
                try:
                    row = _json_decode(value.decode("utf-8")) if value is not None else None
                except (ValueError, UnicodeDecodeError) as exc:
                    errors.append(_bad_record(value, where, f"invalid JSON: {exc}"))
                    continue
                if not isinstance(row, dict):
                    what = "no value (a tombstone)" if value is None else type(row).__name__
                    errors.append(_bad_record(value, where, f"expected a JSON object, got {what}"))
                    continue
                rows.append(row)
                positions.append(where)
            if last is not None:
                source_offsets[f"{tp.topic}/{tp.partition}"] = last + 1
        if self.config.stop_at_end:
            for tp in list(self.unfinished):
                if await self.consumer.position(tp) >= self.ends[tp]:
                    self.unfinished.discard(tp)
                    self.consumer.pause(tp)
        return Batch(rows, source_offsets=source_offsets, errors=errors, positions=positions)

    async def close(self) -> None:
        if self.consumer is not None:
            try:
                await self.consumer.stop()
            except Exception:  # closing: nothing left to save
                log.debug("%s: closing the Kafka consumer failed", self.name, exc_info=True)
            self.consumer = None


def _bad_record(value: bytes | None, where: str, error: str) -> RecordError:
    return RecordError(
        error=error,
        stage="source",
        record=value.decode("utf-8", "replace") if value is not None else None,
        position=where,
    )
