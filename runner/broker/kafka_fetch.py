"""Fetched Kafka records as runs of parallel lists, not one object per record.

aiokafka hands a consumer one `ConsumerRecord` per record, built in Python by a generator
(`PartitionRecords`): about 3 µs a record on this path, more than decoding its Avro. The
record batches it reads from are compiled (aiokafka's `_crecords`), so reading a batch's
offsets, keys, values and timestamps into lists costs a fifth of that.

`RunRecords` is aiokafka's `PartitionRecords` with one change: for a consumer made with
`value_deserializer=RUNS` it yields one `Run` per record batch instead of a record per
record. Everything else — CRC checks, control batches, aborted transactions under
read_committed, skipping offsets before the fetch position, the position after each item —
is aiokafka's own code path, kept as it is. aiokafka builds its `PartitionRecords` by
module-level name, so `install()` puts the subclass there; consumers without the marker
(ours for other uses, anyone else's in the process) get exactly aiokafka's records.

`getmany(max_records=n)` then counts runs, not records: a run is one record batch as the
producer made it (bounded by its batch size), and a fetch is bounded by
`max_partition_fetch_bytes` per partition anyway.

Tested against aiokafka's own `PartitionRecords` in tests/broker/test_kafka_fetch.py; the
Kafka tests run every consumer through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiokafka.consumer import fetcher


@dataclass
class Run:
    """Consecutive records of one record batch: parallel lists."""

    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    headers: list[tuple[int, list]] | None = None  # (index in the run, headers): records that have some


def RUNS(value: Any) -> Any:  # a marker, named as a constant; never called on this path
    """`value_deserializer` marking a consumer whose fetches come as `Run`s."""
    return value


class RunRecords(fetcher.PartitionRecords):
    def _unpack_records(self):  # a generator, as aiokafka's
        if self._value_deserializer is not RUNS:
            yield from super()._unpack_records()
            return
        # aiokafka's loop (PartitionRecords._unpack_records) with records gathered per batch.
        records = self._records
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise fetcher.Errors.CorruptRecordException(f"Invalid CRC - {self._tp}")
            if self._isolation_level == fetcher.READ_COMMITTED and batch.producer_id is not None:
                self._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch and self._contains_abort_marker(batch):
                    self._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in self._aborted_producers:
                    self.next_fetch_offset = batch.next_offset
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            run = Run()
            offsets, keys, values, timestamps = run.offsets, run.keys, run.values, run.timestamps
            headers: list[tuple[int, list]] = []
            start = self.next_fetch_offset
            for record in batch:
                offset = record.offset
                if offset < start:  # a compressed batch read from before the position
                    continue
                if record.headers:
                    headers.append((len(offsets), record.headers))
                offsets.append(offset)
                keys.append(record.key)
                values.append(record.value)
                timestamps.append(record.timestamp)
            if headers:
                run.headers = headers
            if offsets:
                self.next_fetch_offset = offsets[-1] + 1
                yield run
            self.next_fetch_offset = batch.next_offset


def install() -> None:
    """Make aiokafka build `RunRecords` (the same as its own unless a consumer asks for runs)."""
    if fetcher.PartitionRecords is not RunRecords:
        fetcher.PartitionRecords = RunRecords
