"""The parquet sink, driven through its task API (and once end to end through the CLI)."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import connectors.parquet as parquet_mod
from connectors.parquet import (
    NULL_PARTITION,
    ParquetSink,
    layout_granularity,
    null_directory,
    parse_interval,
)
from runner.batch import Batch
from runner.connector import ConfigError, FatalError, TopicPartition
from tests.connectors.tasks import context as shared_context
from runner.schema.arrow import avro_to_arrow
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)

SCHEMA = {
    "type": "record",
    "name": "Activity",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "timestamp", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": None},
        {"name": "path", "type": "string"},
        {"name": "status", "type": "int"},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {
            "name": "geo",
            "type": ["null", {"type": "record", "name": "Geo", "fields": [{"name": "country", "type": "string"}]}],
            "default": None,
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}
ARROW = avro_to_arrow(SCHEMA)
T0 = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc)
TP0 = TopicPartition("activity", 0)
TP1 = TopicPartition("activity", 1)
NAME = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")


# -- helpers ------------------------------------------------------------------------------------


def context(tmp: Path, schemas: dict | None = None):
    return shared_context(
        tmp, name="activity-out", topics=("activity",), schemas={"activity": SCHEMA} if schemas is None else schemas
    )


def make_task(tmp: Path, **config: Any):
    config.setdefault("path", "out")
    return ParquetSink(ParquetSink.Config.parse(config), context(tmp)).task()


def record(i: int, when: dt.datetime | None) -> dict:
    return {
        "id": i,
        "timestamp": when,
        "path": f"/p/{i % 13}",
        "status": 200 + i % 5,
        "amount": decimal.Decimal(i) / 100,
        "day": dt.date(2024, 5, 1),
        "geo": None if i % 3 == 0 else {"country": "FR"},
        "tags": ["a"] * (i % 3),
    }


def records(start: int, stop: int, step: dt.timedelta = dt.timedelta(seconds=10), null_every: int = 0) -> list[dict]:
    return [
        record(i, None if null_every and i % null_every == 0 else T0 + i * step)
        for i in range(start, stop)
    ]


def batch(rows: list[dict], partition: int = 0, first: int | None = None) -> Batch:
    first = rows[0]["id"] if first is None else first
    offsets = list(range(first, first + len(rows)))
    return Batch(
        rows,
        arrow_schema=ARROW,
        topic="activity",
        partition=partition,
        record_offsets=offsets,
        keys=[None] * len(rows),
        timestamps=[0] * len(rows),
    )


def batches(rows: list[dict], size: int, partition: int = 0) -> list[Batch]:
    return [batch(rows[i : i + size], partition) for i in range(0, len(rows), size)]


def run(coro):
    return asyncio.run(coro)


async def write_all(task, parts: list[TopicPartition], bs: list[Batch], *, close: bool = True) -> list[dict]:
    """open, put every batch, flush, (close); the flush results."""
    await task.open(parts)
    durable = []
    for b in bs:
        await task.put(b)
    durable.append(await task.flush())
    if close:
        await task.close()
    return durable


def parquet_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.parquet"))


def read(out: Path, where: str = "") -> list[dict]:
    """Every row under `out`, read with DuckDB's Hive partitioning, ordered by id."""
    if not parquet_files(out):
        return []
    rel = duckdb.sql(
        f"select * from read_parquet('{out}/**/*.parquet', hive_partitioning=true) {where} order by id"
    )
    return [dict(zip(rel.columns, row)) for row in rel.fetchall()]


def ids(out: Path) -> list[int]:
    return [r["id"] for r in read(out)]


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def hour_dir(when: dt.datetime | None) -> str:
    if when is None:
        return f"dt={NULL_PARTITION}/hour={NULL_PARTITION}"
    return when.strftime("dt=%Y-%m-%d/hour=%H")


# -- layout, naming, content ----------------------------------------------------------------------


def test_hive_directories_file_names_and_content_read_back_with_duckdb(tmp_path: Path) -> None:
    rows = records(0, 1000, step=dt.timedelta(seconds=15), null_every=97)  # 12:30 .. 16:40
    task = make_task(tmp_path, max_open_seconds=0)
    durable = run(write_all(task, [TP0], batches(rows, 150)))
    assert durable == [{TP0: 1000}]

    out = tmp_path / "out" / "activity"
    files = parquet_files(out)
    expected_dirs = {hour_dir(r["timestamp"]) for r in rows}
    assert {str(f.parent.relative_to(out)) for f in files} == expected_dirs
    assert len(expected_dirs) == 6  # 12..16 and the null partition
    # One group (everything was written at the one flush): its range and size in each name.
    names = [NAME.match(f.name) for f in files]
    assert all(names)
    assert {(m[1], m[2], m[3], m[5]) for m in names} == {("0", "0" * 20, f"{999:020d}", "6")}
    assert sorted(int(m[4]) for m in names) == [1, 2, 3, 4, 5, 6]

    # Each file holds only records of its hour, in offset order.
    for f in files:
        t = pq.read_table(f)
        got = t.column("id").to_pylist()
        assert got == sorted(got)
        assert {hour_dir(r["timestamp"]) for r in rows if r["id"] in set(got)} == {str(f.parent.relative_to(out))}
        assert pq.read_metadata(f).metadata[b"pipeline.offsets"] == b"0-999"  # the footer's

    back = read(out)
    assert len(back) == len(rows)
    for want, got in zip(rows, back):
        assert got["id"] == want["id"]
        assert got["timestamp"] == want["timestamp"]
        assert got["path"] == want["path"] and got["status"] == want["status"]
        assert got["amount"] == want["amount"] and got["day"] == want["day"]
        assert got["geo"] == want["geo"] and got["tags"] == want["tags"]
        if want["timestamp"] is None:
            assert got["dt"] is None and got["hour"] is None
        else:
            assert got["dt"] == want["timestamp"].date() and got["hour"] == want["timestamp"].hour
    # The Arrow types come from the Avro schema.
    schema = pq.read_schema(files[0])
    assert schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("amount").type == pa.decimal128(10, 2)
    assert schema.field("day").type == pa.date32()
    assert pa.types.is_struct(schema.field("geo").type)


def test_file_names_sort_by_offset_and_a_single_directory_group_has_no_suffix(tmp_path: Path) -> None:
    rows = records(0, 2500, step=dt.timedelta(milliseconds=10))  # all in hour 12
    task = make_task(tmp_path, rotate_records=1000, max_open_seconds=0)
    run(write_all(task, [TP0], batches(rows, 300)))
    out = tmp_path / "out" / "activity" / "dt=2024-05-01" / "hour=12"
    assert [f.name for f in sorted(out.iterdir())] == [
        f"activity+0+{0:020d}+{999:020d}.parquet",
        f"activity+0+{1000:020d}+{1999:020d}.parquet",
        f"activity+0+{2000:020d}+{2499:020d}.parquet",
    ]
    assert ids(tmp_path / "out") == list(range(2500))


def test_null_times_go_to_the_hive_null_partition(tmp_path: Path) -> None:
    assert null_directory("dt=%Y-%m-%d/hour=%H") == f"dt={NULL_PARTITION}/hour={NULL_PARTITION}"
    assert null_directory("year=%Y/fixed/%m") == f"year={NULL_PARTITION}/fixed/{NULL_PARTITION}"
    rows = [record(i, None) for i in range(10)]
    task = make_task(tmp_path, max_open_seconds=0)
    run(write_all(task, [TP0], [batch(rows)]))
    (f,) = parquet_files(tmp_path / "out")
    assert f.parent == tmp_path / "out" / "activity" / f"dt={NULL_PARTITION}" / f"hour={NULL_PARTITION}"
    back = read(tmp_path / "out")
    assert [r["id"] for r in back] == list(range(10))
    assert all(r["dt"] is None and r["hour"] is None and r["timestamp"] is None for r in back)


def test_custom_field_and_layout_and_no_time_partitioning(tmp_path: Path) -> None:
    rows = records(0, 100, step=dt.timedelta(hours=11))
    task = make_task(tmp_path, partition_by="day", layout="year=%Y/month=%m", max_open_seconds=0, path="by-day")
    run(write_all(task, [TP0], [batch(rows)]))
    assert [str(f.parent.relative_to(tmp_path / "by-day")) for f in parquet_files(tmp_path / "by-day")] == [
        "activity/year=2024/month=05"
    ]

    task = make_task(tmp_path, partition_by=None, max_open_seconds=0, path="flat")
    run(write_all(task, [TP0], [batch(rows)]))
    assert [f.relative_to(tmp_path / "flat") for f in parquet_files(tmp_path / "flat")] == [
        Path("activity") / f"activity+0+{0:020d}+{99:020d}.parquet"
    ]
    assert ids(tmp_path / "flat") == list(range(100))


def test_layout_is_evaluated_per_distinct_bucket_not_per_record() -> None:
    assert layout_granularity("dt=%Y-%m-%d/hour=%H") == 3600
    assert layout_granularity("dt=%Y-%m-%d") == 86400
    assert layout_granularity("%Y/%m/%d/%H/%M") == 60
    assert layout_granularity("%Y/%S") == 1
    assert layout_granularity("%G-W%V") == 86400


def test_month_layout_merges_days_and_negative_times_floor_correctly(tmp_path: Path) -> None:
    before_epoch = dt.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=dt.timezone.utc)
    rows = [record(0, before_epoch), record(1, dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))]
    rows += records(2, 50, step=dt.timedelta(days=1))
    task = make_task(tmp_path, layout="ym=%Y-%m/h=%H", max_open_seconds=0)
    run(write_all(task, [TP0], [batch(rows)]))
    out = tmp_path / "out" / "activity"
    dirs = sorted(str(f.parent.relative_to(out)) for f in parquet_files(out))
    assert dirs == ["ym=1969-12/h=23", "ym=1970-01/h=00", "ym=2024-05/h=12", "ym=2024-06/h=12"]
    assert ids(tmp_path / "out") == list(range(50))


# -- rotation -------------------------------------------------------------------------------------


def test_rotation_by_records_happens_in_put_and_flush_reports_durable_offsets(tmp_path: Path) -> None:
    rows = records(0, 350, step=dt.timedelta(milliseconds=1))
    task = make_task(tmp_path, rotate_records=100)  # max_open_seconds 60: nothing old yet

    async def main() -> None:
        assert await task.open([TP0, TP1]) == {TP0: 0, TP1: 0}
        for b in batches(rows, 40):
            await task.put(b)
        assert await task.flush() == {TP0: 300, TP1: 0}  # 3 files of 100; 50 still buffered
        assert len(parquet_files(tmp_path / "out")) == 3
        await task.close()  # clean stop (flush came last): the rest is written

    run(main())
    sizes = {f.name: pq.ParquetFile(f).metadata.num_rows for f in parquet_files(tmp_path / "out")}
    assert sorted(sizes.values()) == [50, 100, 100, 100]
    assert ids(tmp_path / "out") == list(range(350))


def test_rotation_by_bytes_bounds_each_file_on_disk(tmp_path: Path) -> None:
    # rotate_bytes is the size of the Parquet files, not of the Arrow memory behind them
    # (here about 6 times larger).
    rows = records(0, 30_000, step=dt.timedelta(milliseconds=1))
    limit = 64 * 1024
    task = make_task(tmp_path, rotate_bytes=limit, max_open_seconds=0)
    run(write_all(task, [TP0], batches(rows, 500)))
    files = parquet_files(tmp_path / "out")
    sizes = [f.stat().st_size for f in files]
    assert batch(rows).columns.nbytes > 4 * sum(sizes)
    assert len(files) == -(-sum(sizes) // limit)  # as few as the limit allows
    for f, size in zip(files, sizes):
        footer = pq.read_metadata(f).serialized_size
        assert size - footer <= limit * 1.1, f"{f.name}: {size} bytes"
    assert all(size >= limit * 0.9 for size in sizes[:-1])
    assert ids(tmp_path / "out") == list(range(30_000))


def test_buffer_bytes_bounds_memory_with_row_groups_not_files(tmp_path: Path) -> None:
    rows = records(0, 4000, step=dt.timedelta(milliseconds=1))
    per_row = batch(rows).columns.nbytes / len(rows)
    limit = 64 * 1024  # about 1,000 rows over four partitions; each alone stays under rotate_*
    task = make_task(tmp_path, buffer_bytes=limit, max_open_seconds=3600)
    tps = [TopicPartition("activity", p) for p in range(4)]
    # Round robin: partition p gets rows p, p+4, p+8, ... at offsets 0, 1, 2, ...
    by_part = {p: rows[p::4] for p in range(4)}

    async def main() -> None:
        await task.open(tps)
        for start in range(0, 1000, 50):
            for p, part_rows in by_part.items():
                await task.put(batch(part_rows[start : start + 50], p, first=start))
                assert task.pending_bytes <= limit, "Arrow memory held back stays under buffer_bytes"
        assert await task.flush() == {tp: 0 for tp in tps}, "nothing was cut short"
        await task.close()

    run(main())
    files = parquet_files(tmp_path / "out")
    # One file per partition (one hour, rotation not reached), in several row groups.
    assert sorted(int(NAME.match(f.name).group(1)) for f in files) == [0, 1, 2, 3]
    for f in files:
        meta = pq.read_metadata(f)
        assert meta.num_rows == 1000 and meta.num_row_groups > 1
        assert all(meta.row_group(i).num_rows * per_row <= limit * 1.05 for i in range(meta.num_row_groups))
    assert ids(tmp_path / "out") == list(range(4000))


def test_rotation_by_record_time_interval(tmp_path: Path) -> None:
    assert [parse_interval(x) for x in ("30s", "15m", "1h", "2d", " 5 m ")] == [30, 900, 3600, 172800, 300]
    with pytest.raises(ValueError):
        parse_interval("1w")
    # 12:30:00 .. 13:29:50: two hour directories, four 15-minute windows.
    rows = records(0, 360, step=dt.timedelta(seconds=10))
    task = make_task(tmp_path, rotate_interval="15m", max_open_seconds=0)
    run(write_all(task, [TP0], batches(rows, 100)))
    out = tmp_path / "out" / "activity"
    files = parquet_files(out)
    assert len(files) == 4
    windows = set()
    for f in files:
        stamps = pq.read_table(f).column("timestamp").to_pylist()
        window = {(s.hour, s.minute // 15) for s in stamps}
        assert len(window) == 1, f"{f.name} spans {window}"
        windows |= window
        assert f.parent.name == f"hour={stamps[0].hour}"
    assert windows == {(12, 2), (12, 3), (13, 0), (13, 1)}
    assert ids(tmp_path / "out") == list(range(360))


def test_max_open_seconds_lands_buffered_records_at_a_later_flush(tmp_path: Path) -> None:
    task = make_task(tmp_path, max_open_seconds=0.3)

    async def main() -> None:
        await task.open([TP0])
        await task.put(batch(records(0, 10)))
        assert await task.flush() == {TP0: 0}
        assert not parquet_files(tmp_path / "out")
        await asyncio.sleep(0.35)
        await task.put(batch(records(10, 20)))
        assert await task.flush() == {TP0: 20}  # the oldest record was over 0.3 s old
        await task.close()

    run(main())
    assert ids(tmp_path / "out") == list(range(20))


@pytest.mark.parametrize("codec", ["zstd", "snappy", "gzip", "lz4", "none"])
def test_compression_is_visible_in_parquet_metadata(tmp_path: Path, codec: str) -> None:
    task = make_task(tmp_path, compression=codec, max_open_seconds=0, row_group_size=10)
    run(write_all(task, [TP0], [batch(records(0, 25))]))
    (f,) = parquet_files(tmp_path / "out")
    meta = pq.ParquetFile(f).metadata
    assert meta.num_row_groups == 3
    expected = {"zstd": "ZSTD", "snappy": "SNAPPY", "gzip": "GZIP", "lz4": "LZ4", "none": "UNCOMPRESSED"}[codec]
    assert {meta.row_group(0).column(c).compression for c in range(meta.num_columns)} == {expected}


# -- resume and close -----------------------------------------------------------------------------


def test_open_resumes_from_the_files_per_partition(tmp_path: Path) -> None:
    task = make_task(tmp_path, max_open_seconds=0)
    run(write_all(task, [TP0, TP1], batches(records(0, 700), 100, partition=0) + batches(records(0, 40), 40, partition=1)))
    task = make_task(tmp_path)
    assert run(task.open([TP0, TP1, TopicPartition("activity", 2)])) == {
        TP0: 700,
        TP1: 40,
        TopicPartition("activity", 2): 0,
    }
    run(task.close())


def test_close_after_put_discards_and_close_after_flush_writes(tmp_path: Path) -> None:
    task = make_task(tmp_path)

    async def aborted() -> None:
        await task.open([TP0])
        await task.put(batch(records(0, 10)))
        await task.flush()  # nothing old enough: still buffered
        await task.put(batch(records(10, 20)))
        await task.close()  # abort: a put came after the last flush

    run(aborted())
    assert ids(tmp_path / "out") == []
    task = make_task(tmp_path)
    assert run(task.open([TP0])) == {TP0: 0}

    async def clean() -> None:
        await task.put(batch(records(0, 20)))
        await task.flush()
        await task.close()

    run(clean())
    assert ids(tmp_path / "out") == list(range(20))
    assert run(make_task(tmp_path).open([TP0])) == {TP0: 20}


def test_redelivered_records_are_not_written_twice(tmp_path: Path) -> None:
    task = make_task(tmp_path, max_open_seconds=0)

    async def main() -> None:
        await task.open([TP0])
        await task.put(batch(records(0, 30)))
        await task.put(batch(records(20, 50)))  # 20..29 again
        await task.flush()
        await task.put(batch(records(40, 60)))  # 40..49 already written
        await task.flush()
        await task.close()

    run(main())
    assert ids(tmp_path / "out") == list(range(60))


# -- crashes ----------------------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (no close)."""


def crash_on_call(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, call: int, *, after: bool = False) -> None:
    """Make the `call`-th call of target.name raise Crash (after doing its work if `after`)."""
    real = getattr(target, name)
    calls = {"n": 0}

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call and not after:
            if name == "_write_rows":  # cut half-way through writing a file
                args[2].tmp.parent.mkdir(parents=True, exist_ok=True)
                args[2].tmp.write_bytes(b"PAR1 and half a row group")
            raise Crash(name)
        result = real(*args, **kwargs)
        if calls["n"] == call:
            raise Crash(name)
        return result

    monkeypatch.setattr(target, name, fake)


# (what fails, which call, before or after doing its work). Committing the three-file group
# below: each file's rows written (_write_rows) and fsynced (fsync_file); the three renamed
# to their temp names (replace 1-3); their directories fsynced (fsync_dir, after the two
# calls for the new directories hour=13 and hour=14); the three renamed to their final
# names (replace 4-6); the directories fsynced again.
CRASH_POINTS = [
    ("write_rows", 1, False),  # first file half-written
    ("write_rows", 2, True),  # two files written, the third not
    ("fsync_file", 3, False),  # all written, the last not fsynced
    ("replace", 1, False),  # no rename yet
    ("replace", 2, True),  # two of three have their temp names
    ("replace", 3, True),  # all temp names, directories not fsynced
    ("fsync_dir", 3, True),  # temp names, directories partly fsynced
    ("replace", 4, False),  # temps durable, nothing visible yet
    ("replace", 4, True),  # first file visible, others still temps
    ("replace", 5, True),  # two of three visible
    ("replace", 6, True),  # all renamed, directories not fsynced
]


@pytest.mark.parametrize("what,call,after", CRASH_POINTS)
def test_crash_inside_a_multi_directory_group_then_reopen_is_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, call: int, after: bool
) -> None:
    # Group 1: offsets 0..99 in hour 12 only, written cleanly.
    # Group 2: offsets 100..399 spread over hours 12, 13 and 14, with late records interleaved:
    # the crash hits while committing its three files.
    first = records(0, 100, step=dt.timedelta(seconds=1))
    second = [record(i, T0 + dt.timedelta(minutes=(i * 7) % 150)) for i in range(100, 400)]
    out = tmp_path / "out"

    task = make_task(tmp_path, max_open_seconds=0)

    async def first_group() -> None:
        await task.open([TP0])
        await task.put(batch(first))
        assert await task.flush() == {TP0: 100}

    async def second_group() -> None:
        for b in batches(second, 70):
            await task.put(b)
        await task.flush()

    run(first_group())
    with monkeypatch.context() as m:
        if what == "write_rows":
            crash_on_call(m, task, "_write_rows", call, after=after)
        elif what == "fsync_file":
            crash_on_call(m, parquet_mod.files, "fsync_file", call, after=after)
        elif what == "fsync_dir":
            crash_on_call(m, parquet_mod.files, "fsync_dir", 2 + call, after=after)
        else:
            crash_on_call(m, parquet_mod.os, "replace", call, after=after)
        with pytest.raises(Crash):
            run(second_group())
    assert len(parquet_files(out)) + len(temp_files(out)) >= 2  # group 1 + something

    # Whatever a reader sees now: whole files only, no record twice, temps never matched.
    seen = ids(out)
    assert len(seen) == len(set(seen))
    assert set(range(100)) <= set(seen)
    for f in parquet_files(out):
        pq.read_metadata(f)  # a complete Parquet file

    # Restart: repair, resume, deliver again from the resume offset.
    task = make_task(tmp_path, max_open_seconds=0)
    resume = run(task.open([TP0]))[TP0]
    assert not temp_files(out)
    present = ids(out)
    assert len(present) == len(set(present))
    assert present == list(range(resume)), "the files hold exactly the offsets before resume"
    renamed_any = what == "replace" and (call > 4 or (call == 4 and after))
    assert resume == (400 if renamed_any else 100)

    async def redeliver() -> None:
        rest = [r for r in first + second if r["id"] >= resume]
        for b in batches(rest, 70):
            await task.put(b)
        await task.flush()
        await task.close()

    run(redeliver())
    back = read(out)
    assert [r["id"] for r in back] == list(range(400))
    for r in back:
        assert (r["dt"], r["hour"]) == (r["timestamp"].date(), r["timestamp"].hour)
    assert run(make_task(tmp_path).open([TP0])) == {TP0: 400}


def test_a_write_error_stops_writing_and_the_next_open_repairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [record(i, T0 + dt.timedelta(minutes=40 * (i % 2))) for i in range(50)]  # hours 12, 13
    task = make_task(tmp_path, max_open_seconds=0)

    async def main() -> None:
        await task.open([TP0])
        await task.put(batch(rows))
        with pytest.raises(OSError):
            await task.flush()
        with pytest.raises(FatalError):
            await task.put(batch(records(50, 60)))
        await task.close()  # writes nothing more

    real = parquet_mod.os.replace
    calls = {"n": 0}

    def replace(*a: Any, **k: Any) -> Any:  # both files get their temp names, one its final name
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(parquet_mod.os, "replace", replace)
        run(main())
    assert len(parquet_files(tmp_path / "out")) == 1 and len(temp_files(tmp_path / "out")) == 1
    assert run(make_task(tmp_path).open([TP0])) == {TP0: 50}  # rolled forward
    assert ids(tmp_path / "out") == list(range(50))
    assert not temp_files(tmp_path / "out")


def test_leftover_temp_files_are_removed_and_never_globbed(tmp_path: Path) -> None:
    hour = tmp_path / "out" / "activity" / "dt=2024-05-01" / "hour=12"
    hour.mkdir(parents=True)
    stray = hour / f".activity+0+{0:020d}+{9:020d}.parquet.tmp"
    stray.write_bytes(b"PAR1 half a file")
    other = hour / f".activity+1+{0:020d}+{9:020d}+1of2.parquet.tmp"
    other.write_bytes(b"")
    assert ids(tmp_path / "out") == []  # the glob **/*.parquet does not see them
    assert duckdb.sql(f"select count(*) from glob('{tmp_path}/out/**/*.parquet')").fetchall() == [(0,)]
    task = make_task(tmp_path)
    assert run(task.open([TP0, TP1])) == {TP0: 0, TP1: 0}
    assert not stray.exists() and not other.exists()


def test_an_incomplete_group_below_complete_ones_stops_the_sink(tmp_path: Path) -> None:
    rows = [record(i, T0 + dt.timedelta(minutes=40 * (i % 2))) for i in range(50)]
    run(write_all(make_task(tmp_path, max_open_seconds=0), [TP0], [batch(rows)]))
    run(write_all(make_task(tmp_path, max_open_seconds=0), [TP0], [batch(records(50, 60))]))
    victim = next(f for f in parquet_files(tmp_path / "out") if f.name.endswith("+1of2.parquet"))
    victim.unlink()  # someone deleted a file by hand
    with pytest.raises(FatalError, match="incomplete"):
        run(make_task(tmp_path).open([TP0]))


def test_an_incomplete_last_group_without_temps_is_removed(tmp_path: Path) -> None:
    run(write_all(make_task(tmp_path, max_open_seconds=0), [TP0], [batch(records(0, 10))]))
    rows = [record(i, T0 + dt.timedelta(minutes=40 * (i % 2))) for i in range(10, 50)]
    run(write_all(make_task(tmp_path, max_open_seconds=0), [TP0], [batch(rows)]))
    next(f for f in parquet_files(tmp_path / "out") if f.name.endswith("+1of2.parquet")).unlink()
    assert run(make_task(tmp_path).open([TP0])) == {TP0: 10}
    assert ids(tmp_path / "out") == list(range(10))


def test_overlapping_groups_stop_the_sink(tmp_path: Path) -> None:
    run(write_all(make_task(tmp_path, max_open_seconds=0), [TP0], [batch(records(0, 10))]))
    (f,) = parquet_files(tmp_path / "out")
    f.with_name(f"activity+0+{5:020d}+{14:020d}.parquet").write_bytes(f.read_bytes())
    with pytest.raises(FatalError, match="overlap"):
        run(make_task(tmp_path).open([TP0]))


# -- config and schema checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,key",
    [
        ({"rotate_interval": "1 week"}, "rotate_interval"),
        ({"rotate_interval": "0m"}, "rotate_interval"),
        ({"layout": "/abs/%Y"}, "layout"),
        ({"layout": "dt=%Y/../x"}, "layout"),
        ({"layout": "_hidden=%Y"}, "layout"),
        ({"layout": "hour=%-H"}, "layout"),
        ({"layout": "%Q"}, "layout"),
        ({"compression": "brotli"}, "compression"),
        ({"rotate_records": 0}, "rotate_records"),
    ],
)
def test_config_problems_are_reported_by_key(config: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        ParquetSink.Config.parse({"path": "out", **config})
    assert [k for k, _ in info.value.problems] == [key]


@pytest.mark.parametrize("field,says", [("when", "no field 'when'"), ("path", "partition_by needs a timestamp")])
def test_a_missing_or_non_time_partition_field_is_refused_when_the_sink_is_built(
    tmp_path: Path, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ParquetSink(ParquetSink.Config.parse({"path": "out", "partition_by": field}), context(tmp_path))
    assert [k for k, _ in info.value.problems] == ["partition_by"]
    assert says in str(info.value)


@pytest.mark.parametrize("field,says", [("when", "no field 'when'"), ("path", "needs a timestamp")])
def test_a_missing_or_non_time_partition_field_in_the_records_is_fatal(tmp_path: Path, field: str, says: str) -> None:
    # Schemas unknown when the sink was built (as when a registry's schema changed since):
    # the task checks what arrives.
    task = ParquetSink(ParquetSink.Config.parse({"path": "out", "partition_by": field}), context(tmp_path, {})).task()

    async def main() -> None:
        await task.open([TP0])
        await task.put(batch(records(0, 3)))

    with pytest.raises(FatalError, match=says):
        run(main())


def test_integer_epoch_millis_field_partitions_too(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "E", "fields": [{"name": "id", "type": "long"}, {"name": "ts", "type": "long"}]}
    ctx = context(tmp_path, {"activity": schema})
    task = ParquetSink(ParquetSink.Config.parse({"path": "out", "partition_by": "ts", "max_open_seconds": 0}), ctx).task()
    ms = int(T0.timestamp() * 1000)
    rows = [{"id": i, "ts": ms + i * 3_600_000} for i in range(3)]
    b = Batch(rows, arrow_schema=avro_to_arrow(schema), topic="activity", partition=0, record_offsets=[0, 1, 2])
    run(write_all(task, [TP0], [b]))
    dirs = sorted(str(f.parent.relative_to(tmp_path / "out" / "activity")) for f in parquet_files(tmp_path / "out"))
    assert dirs == ["dt=2024-05-01/hour=12", "dt=2024-05-01/hour=13", "dt=2024-05-01/hour=14"]


# -- end to end ---------------------------------------------------------------------------------------


E2E_SCHEMA = {
    "type": "record",
    "name": "Hit",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "visitor", "type": "string"},
        {"name": "path", "type": "string"},
        {"name": "bytes", "type": ["null", "long"], "default": None},
    ],
}


def write_hits_pipeline(tmp_path: Path, hits: Iterable[dict], *, batch_size: int, sink_config: str) -> Path:
    """input/hits.jsonl with `hits`, and a spec reading it (jsonl) into a 3-partition topic
    keyed by visitor, landed by the parquet sink under lake/ with `sink_config`."""
    (tmp_path / "hit.avsc").write_text(json.dumps(E2E_SCHEMA))
    (tmp_path / "input").mkdir()
    with open(tmp_path / "input" / "hits.jsonl", "w") as f:
        for h in hits:
            f.write(json.dumps(h) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: hits
topics:
  hits: {{partitions: 3, schema: hit.avsc, key: visitor}}
sources:
  - name: hits-in
    connector: jsonl
    topic: hits
    config: {{paths: ["input/*.jsonl"], batch_size: {batch_size}}}
sinks:
  - name: hits-out
    connector: parquet
    topics: [hits]
    config: {{path: lake, {sink_config}}}
"""
    )
    return spec


AT_SCHEMA = {
    "type": "record",
    "name": "Hit",
    "fields": [{"name": "id", "type": "long"}, {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}],
}


def write_at_pipeline(tmp_path: Path, sink_config: str = "", *, processor: bool = False) -> Path:
    """Two hits an hour apart (fields id and at, no `timestamp`) read by the jsonl source
    into `hits`, landed by a parquet sink whose config lines are `sink_config`; with
    `processor`, the sink lands the per-minute counts a processor derives from `hits`."""
    (tmp_path / "hit.avsc").write_text(json.dumps(AT_SCHEMA))
    (tmp_path / "input").mkdir()
    at = int(T0.timestamp() * 1000)
    (tmp_path / "input" / "hits.jsonl").write_text(f'{{"id": 1, "at": {at}}}\n{{"id": 2, "at": {at + 3_600_000}}}\n')
    topic = "hits"
    processors = ""
    if processor:
        topic = "per-minute"
        processors = """\
processors:
  - name: count
    from: hits
    to: per-minute
    key: id
    time: at
    window: {tumbling: 1m}
    aggregate: {hits: count()}
"""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: hits
topics:
  hits: {{partitions: 1, schema: hit.avsc, key: id}}
  per-minute: {{partitions: 1}}
sources:
  - name: hits-in
    connector: jsonl
    topic: hits
    config: {{paths: ["input/*.jsonl"]}}
{processors}sinks:
  - name: hits-out
    connector: parquet
    topics: [{topic}]
    config:
      path: lake
{sink_config}"""
    )
    return spec


def line_of(spec: Path, text: str) -> int:
    return next(n for n, line in enumerate(spec.read_text().splitlines(), 1) if text in line)


def test_validate_refuses_a_topic_without_the_partition_by_field_as_the_run_would(tmp_path: Path) -> None:
    spec = write_at_pipeline(tmp_path)
    # What the task says when such records reach it (the run-time check, kept for schemas
    # that change after validation).
    task = ParquetSink(ParquetSink.Config.parse({"path": "out"}), context(tmp_path, {})).task()
    b = Batch([{"id": 1, "at": T0}], arrow_schema=avro_to_arrow(AT_SCHEMA), topic="hits", partition=0,
              record_offsets=[0])
    with pytest.raises(FatalError) as info:
        run(write_all(task, [TopicPartition("hits", 0)], [b]))
    run_says = str(info.value)
    assert run_says == "parquet sink: topic 'hits' has no field 'timestamp' to partition by"
    assert info.value.hint == "set partition_by to one of id, at, or to null for no time partitioning"

    located = f"{spec}:{line_of(spec, '- name: hits-out')}: sinks[0]: {run_says} ({info.value.hint})"
    check = run_cli("validate", spec, cwd=tmp_path)
    assert check.returncode == 2, check.stderr
    assert located in check.stderr.splitlines()
    result = run_cli("run", spec, "--once", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert located in result.stderr.splitlines()
    assert not (tmp_path / "lake").exists()


def test_validate_locates_a_partition_by_the_topic_lacks_at_its_key(tmp_path: Path) -> None:
    spec = write_at_pipeline(tmp_path, "      partition_by: when\n")
    check = run_cli("validate", spec, cwd=tmp_path)
    assert check.returncode == 2, check.stderr
    assert (f"{spec}:{line_of(spec, 'partition_by: when')}: sinks[0].config.partition_by: parquet sink: topic "
            "'hits' has no field 'when' to partition by") in check.stderr


def test_validate_refuses_partitioning_a_processors_output_by_a_field_it_lacks(tmp_path: Path) -> None:
    spec = write_at_pipeline(tmp_path, processor=True)
    check = run_cli("validate", spec, cwd=tmp_path)
    assert check.returncode == 2, check.stderr
    assert "topic 'per-minute' has no field 'timestamp' to partition by" in check.stderr
    assert "set partition_by to one of id, window_start, window_end, hits, or to null" in check.stderr
    spec.write_text(spec.read_text() + "      partition_by: window_start\n")
    check = run_cli("validate", spec, cwd=tmp_path)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("sink_config,dirs", [
    ("      partition_by: at\n", ["dt=2024-05-01/hour=12", "dt=2024-05-01/hour=13"]),
    ("      partition_by: null\n", ["."]),
])
def test_validate_and_run_pass_with_a_partition_by_the_topic_has_or_none(
    tmp_path: Path, sink_config: str, dirs: list[str]
) -> None:
    spec = write_at_pipeline(tmp_path, sink_config)
    check = run_cli("validate", spec, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    result = run_cli("run", spec, "--once", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = parquet_files(tmp_path / "lake" / "hits")
    assert sorted({str(f.parent.relative_to(tmp_path / "lake" / "hits")) for f in found}) == dirs
    assert sorted(r["id"] for r in read(tmp_path / "lake")) == [1, 2]


def test_end_to_end_jsonl_to_parquet_once_then_nothing_more(tmp_path: Path) -> None:
    start = int(T0.timestamp() * 1000)
    hits = [
        {
            "id": i,
            "timestamp": start + i * 1_700 + (-3_600_000 if i % 101 == 0 else 0),  # some late
            "visitor": f"v{i % 37}",
            "path": f"/p/{i % 11}",
            "bytes": None if i % 9 == 0 else i * 3,
        }
        for i in range(30_000)
    ]
    spec = write_hits_pipeline(tmp_path, hits, batch_size=4000, sink_config="rotate_records: 5000")
    check = run_cli("validate", spec)
    assert check.returncode == 0, check.stderr
    result = run_cli("run", spec, "--once", timeout=300)
    assert result.returncode == 0, result.stderr

    lake = tmp_path / "lake"
    assert not temp_files(lake)
    names = [NAME.match(f.name.replace("hits+", "activity+", 1)) for f in parquet_files(lake / "hits")]
    assert names and all(names)

    def read_back() -> list[tuple]:
        return duckdb.sql(
            f"select id, epoch_ms(timestamp), visitor, path, bytes, dt, hour "
            f"from read_parquet('{lake}/hits/**/*.parquet', hive_partitioning=true, "
            "hive_types={'hour': int}) order by id"
        ).fetchall()

    rows = read_back()
    assert len(rows) == len(hits)
    for h, (i, ts, visitor, path, nbytes, day, hour) in zip(hits, rows):
        assert (i, ts, visitor, path, nbytes) == (h["id"], h["timestamp"], h["visitor"], h["path"], h["bytes"])
        when = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc)
        assert (day, hour) == (when.date(), when.hour)

    files_before = sorted(p.name for p in parquet_files(lake))
    again = run_cli("run", spec, "--once", timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in parquet_files(lake)) == files_before
    assert len(read_back()) == len(hits)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the suite's own: the module's 60 s is too little on two busy cores
def test_kill_9_at_random_moments_then_restart_holds_each_record_exactly_once(tmp_path: Path) -> None:
    import random
    import signal
    import subprocess

    from tests.conftest import pipeline_exe

    start = int(T0.timestamp() * 1000)
    count = 300_000
    # Three hours apart for every 7th record: groups spanning several directories.
    hits = (
        {"id": i, "timestamp": start + i * 170 - (3 * 3_600_000 if i % 7 == 0 else 0), "visitor": f"v{i % 37}", "path": "/"}
        for i in range(count)
    )
    spec = write_hits_pipeline(tmp_path, hits, batch_size=2000, sink_config="rotate_records: 7000, max_open_seconds: 0")
    lake = tmp_path / "lake"

    def visible_ids() -> list[int]:
        if not parquet_files(lake):
            return []
        return [r[0] for r in duckdb.sql(f"select id from read_parquet('{lake}/**/*.parquet')").fetchall()]

    rows_in: dict[Path, int] = {}

    def rows_written() -> int:
        files = parquet_files(lake) if lake.exists() else []
        for f in files:
            if f not in rows_in:
                rows_in[f] = pq.read_metadata(f).num_rows
        return sum(rows_in[f] for f in files)

    # Kill when the output reaches a random point (plus a random delay), so each kill lands
    # at a different stage: mid-group, mid-rename, during recovery, in the source...
    rng = random.Random(20240501)
    targets = sorted(rng.uniform(0.05, 0.8) * count for _ in range(5))
    for kill, target in enumerate(targets, 1):
        proc = subprocess.Popen([pipeline_exe(), "run", str(spec), "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while rows_written() < target and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        seen = visible_ids()  # whole files only (a torn one would fail to read), no duplicates
        assert len(seen) == len(set(seen)), f"a record is visible twice after kill {kill}"
        print(f"kill {kill}: {len(seen)} rows visible, {len(temp_files(lake))} temp files")

    final = run_cli("run", spec, "--once", timeout=300)
    assert final.returncode == 0, final.stderr
    seen = visible_ids()
    assert len(seen) == count and set(seen) == set(range(count))
    assert not temp_files(lake)
