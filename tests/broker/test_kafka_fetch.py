"""`runner.broker.kafka_fetch`: runs of records read from Kafka record batches give exactly
what aiokafka's own per-record path gives, batch by batch, from any fetch position."""

from __future__ import annotations

from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from runner.broker.kafka_fetch import RUNS, RunRecords

TP = TopicPartition("t", 0)


def record_batch(base: int, count: int, *, headers_every: int = 0, control: bool = False) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=int(control), producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(count):
        headers = [("h", b"%d" % (base + i)), ("empty", b"")] if headers_every and i % headers_every == 0 else []
        key = None if i % 4 == 0 else b"k%d" % (base + i)
        builder.append(i, 1_700_000_000_000 + base + i, key, b"v%d" % (base + i), headers)
    data = bytearray(builder.build())
    data[0:8] = base.to_bytes(8, "big")  # the batch's base offset, as a broker assigns it
    if control:
        data[21:23] = (int.from_bytes(data[21:23], "big") | 0x20).to_bytes(2, "big")  # attributes: control
    return bytes(data)


def per_record(data: bytes, position: int) -> list[tuple]:
    records = PartitionRecords(TP, MemoryRecords(data), [], position, None, None, False, "read_uncommitted")
    return [(r.offset, r.key, r.value, r.timestamp, tuple(r.headers)) for r in records], records.next_fetch_offset


def by_runs(data: bytes, position: int) -> tuple[list[list[tuple]], int]:
    records = RunRecords(TP, MemoryRecords(data), [], position, None, RUNS, False, "read_uncommitted")
    runs = []
    for run in records:
        headers = [()] * len(run.offsets)
        for i, items in run.headers or ():  # sparse: the records that have headers
            assert items
            headers[i] = tuple(items)
        runs.append(list(zip(run.offsets, run.keys, run.values, run.timestamps, headers)))
    return runs, records.next_fetch_offset


def test_runs_are_the_records_of_each_batch_with_their_headers_from_any_position() -> None:
    batches = [((0, 5), record_batch(0, 5)), ((5, 12), record_batch(5, 7, headers_every=3)), ((12, 13), record_batch(12, 1))]
    for position in (0, 3, 5, 6, 11, 12):
        # A broker answers from the batch holding the position: it may start before it.
        data = b"".join(batch for (_, end), batch in batches if end > position)
        runs, after = by_runs(data, position)
        expected, expected_after = per_record(data, position)
        assert [r for run in runs for r in run] == expected
        assert expected[0][0] == position
        assert after == expected_after == 13
        assert len(runs) == sum(1 for (_, end), _ in batches if end > position)  # one run a record batch


def test_a_control_batch_gives_no_run_but_moves_the_position() -> None:
    data = record_batch(0, 3) + record_batch(3, 1, control=True)
    runs, after = by_runs(data, 0)
    assert [[r[0] for r in run] for run in runs] == [[0, 1, 2]]
    assert after == 4 == per_record(data, 0)[1]


def test_other_consumers_get_aiokafkas_records_unchanged() -> None:
    data = record_batch(0, 4, headers_every=2)
    records = list(RunRecords(TP, MemoryRecords(data), [], 0, None, None, False, "read_uncommitted"))
    assert [(r.topic, r.partition, r.offset, r.value, r.headers) for r in records] == [
        ("t", 0, 0, b"v0", (("h", b"0"), ("empty", b""))), ("t", 0, 1, b"v1", ()),
        ("t", 0, 2, b"v2", (("h", b"2"), ("empty", b""))), ("t", 0, 3, b"v3", ()),
    ]
