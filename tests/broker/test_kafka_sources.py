"""Exactly once from a source task to Kafka (`runner.broker.kafka_sources`), against a real
Kafka-protocol broker (Tansu): a "crash" is a writer abandoned after only part of a batch
reached the topic; the next run of the task, in another broker client, resumes from the
stored offsets and must leave every record in the topic exactly once, in order."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from runner.broker.base import ProduceBatch
from tests.broker.test_kafka import drain, open_broker, run
from tests.kafka_broker import Tansu

PER_BATCH = 12  # records per source batch, spread over 3 partitions by record number


def source_batch(k: int) -> tuple[list[ProduceBatch], dict[str, int]]:
    """Batch `k` of a deterministic source: records k*12 .. k*12+11, record i to partition
    i % 3, plus one dead letter; and the source offset after it."""
    parts: dict[int, ProduceBatch] = {}
    for i in range(k * PER_BATCH, (k + 1) * PER_BATCH):
        b = parts.setdefault(i % 3, ProduceBatch("t", i % 3, [], [], []))
        b.keys.append(None)
        b.values.append(b"r%d" % i)
        b.timestamps.append(1_700_000_000_000 + i)
    dead = ProduceBatch("dlq", 0, [None], [b"bad%d" % k], [1_700_000_000_000])
    return [dead, *parts.values()], {"file": (k + 1) * PER_BATCH}


def expected(batches: int) -> dict[tuple[str, int], list[bytes]]:
    out: dict[tuple[str, int], list[bytes]] = {("t", p): [] for p in range(3)}
    out[("dlq", 0)] = [b"bad%d" % k for k in range(batches)]
    for i in range(batches * PER_BATCH):
        out[("t", i % 3)].append(b"r%d" % i)
    return out


async def topic_values(bootstrap: str) -> dict[tuple[str, int], list[bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition("t", p) for p in range(3)] + [TopicPartition("dlq", 0)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        out: dict[tuple[str, int], list[bytes]] = {(tp.topic, tp.partition): [] for tp in tps}
        for tp in tps:
            consumer.seek(tp, 0)
        idle = 0
        while idle < 4:
            got = await consumer.getmany(timeout_ms=250)
            idle = 0 if got else idle + 1
            for tp, records in got.items():
                out[(tp.topic, tp.partition)] += [r.value for r in records]
        assert all(len(out[(tp.topic, tp.partition)]) >= ends[tp] for tp in tps)
        return out
    finally:
        await consumer.stop()


async def crash_during(writer, k: int, landed: dict[tuple[str, int], int]) -> None:
    """What a kill -9 in the middle of producing batch `k` leaves: per partition, the first
    `landed[...]` records of the batch are in the topic (tagged, as the writer sends
    them), and no offsets are stored."""
    batches, _ = source_batch(k)
    for b in batches:
        n = landed.get((b.topic, b.partition), 0)
        if n:
            part = ProduceBatch(b.topic, b.partition, b.keys[:n], b.values[:n], b.timestamps[:n])
            await asyncio.gather(*await writer.broker.send_tagged(part, writer.tag))


@pytest.mark.timeout(90)
def test_a_crash_mid_batch_then_a_restart_leaves_every_record_once_in_order(kafka: Tansu) -> None:
    async def main() -> None:
        first = await open_broker(kafka, {"t": 3, "dlq": 1})
        try:
            writer = first.source_writer("src", 0, ["t", "dlq"])
            assert await writer.open() == {}
            for k in range(2):
                await writer.produce(*source_batch(k))
            # Batch 2: partition 0 all in, partition 1 half, partition 2 and the DLQ nothing.
            await crash_during(writer, 2, {("t", 0): 4, ("t", 1): 2})
        finally:
            await first.close()

        second = await open_broker(kafka, {"t": 3, "dlq": 1})
        try:
            writer = second.source_writer("src", 0, ["t", "dlq"])
            assert await writer.open() == {"file": 2 * PER_BATCH}  # batch 2 is read again
            assert writer.landed == {("t", 0): 4, ("t", 1): 2}
            for k in range(2, 4):
                await writer.produce(*source_batch(k))
            assert await second.source_offsets("src") == {"file": 4 * PER_BATCH}
        finally:
            await second.close()
        assert await topic_values(kafka.bootstrap) == expected(4)

    run(main, timeout=80)


@pytest.mark.timeout(90)
def test_a_crash_before_the_first_commit_and_twice_in_a_row(kafka: Tansu) -> None:
    async def main() -> None:
        # The task's first run dies in its first batch: only the checkpoint written at
        # open says where its records start.
        b = await open_broker(kafka, {"t": 3, "dlq": 1})
        try:
            writer = b.source_writer("src", 0, ["t", "dlq"])
            assert await writer.open() == {}
            await crash_during(writer, 0, {("t", 2): 4, ("dlq", 0): 1})
        finally:
            await b.close()
        # The second run re-reads batch 0 and dies again in batch 1, before a commit ...
        b = await open_broker(kafka, {"t": 3, "dlq": 1})
        try:
            writer = b.source_writer("src", 0, ["t", "dlq"])
            assert await writer.open() == {}
            assert writer.landed == {("t", 2): 4, ("dlq", 0): 1}
            await writer.produce(*source_batch(0))
            await crash_during(writer, 1, {("t", 0): 1})
        finally:
            await b.close()
        # ... and the third finishes.
        b = await open_broker(kafka, {"t": 3, "dlq": 1})
        try:
            writer = b.source_writer("src", 0, ["t", "dlq"])
            assert await writer.open() == {"file": PER_BATCH}
            for k in range(1, 3):
                await writer.produce(*source_batch(k))
        finally:
            await b.close()
        assert await topic_values(kafka.bootstrap) == expected(3)

    run(main, timeout=80)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("columns", [False, True], ids=["lists", "arrays"])
def test_the_tag_marks_each_kafka_batch_once_with_its_count_and_old_per_record_tags_still_count(
    kafka: Tansu, columns: bool
) -> None:
    async def main() -> None:
        # 1 KiB record batches: 60 records of ~20 bytes make several, a 3 KiB record one alone.
        b = await open_broker(kafka, {"t": 1}, producer={"max_batch_size": 1024})
        try:
            writer = b.source_writer("src", 0, ["t"])
            values = [b"r%02d" % i + b"." * 16 for i in range(30)] + [b"x" * 3000] + [b"s%02d" % i for i in range(29)]
            keys = [None] * 60
            if columns:  # as a columnar source hands them over
                keys, values = pa.array(keys, pa.binary()), pa.array(values, pa.binary())
            await asyncio.gather(*await b.send_tagged(ProduceBatch("t", 0, keys, values, [1] * 60), writer.tag))
            values = values.to_pylist() if columns else values
            # Records tagged one by one, as earlier versions wrote them, count one each.
            old = await b._send_records(ProduceBatch("t", 0, [], [], []), [None] * 3, [b"o1", b"o2", b"o3"],
                                        [1, 1, 1], [[writer.tag]] * 3)
            await asyncio.gather(*old)
            assert await b.count_tagged({("t", 0): 0}, writer.tag) == {("t", 0): (63, 63)}
            assert await b.count_tagged({("t", 0): 60}, writer.tag) == {("t", 0): (3, 63)}
        finally:
            await b.close()

        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition("t", 0)])
            consumer.seek(TopicPartition("t", 0), 0)
            records = []
            while len(records) < 63:
                for got in (await consumer.getmany(timeout_ms=1000)).values():
                    records += got
        finally:
            await consumer.stop()
        assert [r.value for r in records[:60]] == values
        counts = [(r.offset, dict(r.headers)) for r in records[:60] if r.headers]
        assert len(counts) > 3  # several batches, each marked on its first record only
        assert all(h == {"pipeline.task": writer.tag[1], "pipeline.count": h["pipeline.count"]} for _, h in counts)
        # The marks' counts tile the records: each batch starts where the one before ended.
        starts = [offset for offset, _ in counts]
        assert starts[0] == 0
        assert [s + int(h["pipeline.count"]) for s, h in counts] == starts[1:] + [60]
        assert (30, {"pipeline.task": writer.tag[1], "pipeline.count": b"1"}) in counts  # the large one, alone

    run(main, timeout=80)


@pytest.mark.timeout(90)
def test_sinks_see_the_records_own_headers_but_not_the_source_tasks_marks(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka, {"t": 1})
        try:
            writer = b.source_writer("src", 0, ["t"])
            await writer.open()
            consumer = await b.consumer(None, ["t"])  # no group: no join to wait for
            try:
                await writer.produce([ProduceBatch("t", 0, [None] * 3, [b"a", b"b", b"c"], [1] * 3)], {"file": 3})
                marked_only = await drain(consumer, 3)
                own = ProduceBatch("t", 0, [None] * 2, [b"d", b"e"], [1] * 2, [{}, {"trace": b"7"}])
                await writer.produce([own], {"file": 5})
                with_own = await drain(consumer, 2)
            finally:
                await consumer.close()
        finally:
            await b.close()
        assert [fb.headers for fb in marked_only] == [None]  # the marks only: no headers at all
        assert [(v, h) for fb in with_own for v, h in zip(fb.values, fb.headers)] == [(b"d", {}), (b"e", {"trace": b"7"})]

    run(main, timeout=80)


@pytest.mark.timeout(90)
def test_a_long_tag_still_leaves_every_batch_marked_with_its_count(kafka: Tansu) -> None:
    async def main() -> None:
        b = await open_broker(kafka, {"t": 1}, producer={"max_batch_size": 2048})
        try:
            writer = b.source_writer("s" * 900, 0, ["t"])  # the tag alone takes half a batch
            values = [b"v%02d" % i + b"." * 100 for i in range(20)]
            await asyncio.gather(*await b.send_tagged(ProduceBatch("t", 0, [None] * 20, values, [1] * 20), writer.tag))
            assert await b.count_tagged({("t", 0): 0}, writer.tag) == {("t", 0): (20, 20)}
        finally:
            await b.close()

    run(main, timeout=80)
