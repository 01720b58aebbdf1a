"""Compaction of the parquet sink's output, driven in-process: a crash at every step of a
merge, the lock shared with the task's open, compaction while a task writes, and the
limits of a merge (size, windows, schema). The command-line door is tests/test_compact.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import connectors.parquet.compact as compact_mod
import connectors.parquet.task as task_mod
from connectors.parquet import ParquetSink
from connectors.parquet import files as pfiles
from runner.batch import Batch
from runner.connector import TopicPartition
from runner.schema.arrow import avro_to_arrow
from tests.connectors.tasks import context as shared_context
from tests.connectors.test_parquet import Crash, crash_on_call

pytestmark = pytest.mark.timeout(60)

SCHEMA = {
    "type": "record",
    "name": "Hit",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "path", "type": "string"},
    ],
}
ARROW = avro_to_arrow(SCHEMA)
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
TP0 = TopicPartition("hits", 0)
TP1 = TopicPartition("hits", 1)


def sink(tmp: Path, **config: Any) -> ParquetSink:
    config.setdefault("path", "out")
    ctx = shared_context(tmp, name="lake", topics=("hits",), schemas={"hits": SCHEMA})
    return ParquetSink(ParquetSink.Config.parse(config), ctx)


def rows(start: int, stop: int, seconds: float = 6.0) -> list[dict]:
    """In time order, `seconds` apart (600 an hour by default)."""
    return [{"id": i, "timestamp": T0 + dt.timedelta(seconds=i * seconds), "path": f"/p/{i % 7}"} for i in range(start, stop)]


def batch(part: list[dict], partition: int = 0, schema: pa.Schema = ARROW) -> Batch:
    offsets = [r["id"] for r in part]
    return Batch(part, arrow_schema=schema, topic="hits", partition=partition, record_offsets=offsets)


async def write(task, tps: list[TopicPartition], data: dict[int, list[dict]], size: int = 40) -> None:
    """Put each partition's rows in batches of `size`, flush, close."""
    await task.open(tps)
    for p, part in data.items():
        for i in range(0, len(part), size):
            await task.put(batch(part[i : i + size], p))
    await task.flush()
    await task.close()


def small_files(tmp: Path, data: dict[int, list[dict]], rotate_records: int = 50) -> None:
    """The output of a stream that landed small files."""
    tps = [TopicPartition("hits", p) for p in data]
    asyncio.run(write(sink(tmp, rotate_records=rotate_records, max_open_seconds=3600).task(), tps, data))


def out(tmp: Path) -> Path:
    return tmp / "out" / "hits"


def parquet_files(tmp: Path) -> list[Path]:
    return sorted(out(tmp).rglob("*.parquet"))


def temps(tmp: Path) -> list[Path]:
    return [p for p in out(tmp).rglob("*") if p.name.endswith(".tmp")]


def per_partition(tmp: Path) -> dict[int, list[int]]:
    """Each partition's ids: files in offset order (group, then k), rows in file order."""
    found = []
    for f in parquet_files(tmp):
        m = pfiles.FINAL.match(f.name)
        found.append((int(m["partition"]), int(m["first"]), int(m["k"] or 1), f))
    result: dict[int, list[int]] = {}
    for p, _, _, f in sorted(found, key=lambda t: t[:3]):
        result.setdefault(p, []).extend(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return result


def resume(tmp: Path, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    task = sink(tmp).task()

    async def main() -> dict[TopicPartition, int]:
        try:
            return await task.open(tps)
        finally:
            await task.close()

    return asyncio.run(main())


# One partition, 1,500 rows over hours 12, 13 and 14 in groups of 50, merged into one group
# of three files. (what, which call, after doing its work): writing the merged temps, the
# directories fsynced (3), the three renamed, the 30 files merged deleted, fsynced again.
MERGE_CRASHES = [
    ("write", 1, False),
    ("write", 2, True),
    ("write", 3, True),
    ("fsync_dir", 2, True),
    ("replace", 1, False),
    ("replace", 1, True),
    ("replace", 2, True),
    ("replace", 3, True),
    ("unlink", 1, False),
    ("unlink", 1, True),
    ("unlink", 17, True),
    ("unlink", 30, False),
    ("fsync_dir", 5, False),
]


@pytest.mark.parametrize(
    "what,call,after,then",
    [(*point, "open") for point in MERGE_CRASHES]
    + [(*point, "compact") for point in MERGE_CRASHES if point[0] in ("write", "replace", "unlink") and point[2]],
)
def test_a_crash_anywhere_in_a_merge_then_open_holds_every_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, call: int, after: bool, then: str
) -> None:
    small_files(tmp_path, {0: rows(0, 1500)})
    assert len(parquet_files(tmp_path)) == 30
    with monkeypatch.context() as m:
        if what == "write":
            crash_on_call(m, compact_mod, "_write_merged", call, after=after)
        elif what == "fsync_dir":
            crash_on_call(m, pfiles, "fsync_dir", call, after=after)
        elif what == "replace":
            crash_on_call(m, os, "replace", call, after=after)
        else:
            crash_on_call(m, Path, "unlink", call, after=after)
        with pytest.raises(Crash):
            sink(tmp_path, rotate_records=100_000).compact()

    # Readers now: whole files, every record at least once (twice only for a moment
    # between the renames and the deletions).
    seen = per_partition(tmp_path).get(0, [])
    assert set(seen) == set(range(1500))
    for f in parquet_files(tmp_path):
        pq.read_metadata(f)

    if then == "compact":  # compaction again, before any open: it finishes the merge
        again = sink(tmp_path, rotate_records=100_000).compact()
        assert per_partition(tmp_path) == {0: list(range(1500))}
        assert len(parquet_files(tmp_path)) == 3 and not temps(tmp_path), again
    # The next open repairs: every record once, in order, and resumes after all of them.
    assert resume(tmp_path, [TP0]) == {TP0: 1500}
    assert per_partition(tmp_path) == {0: list(range(1500))}
    assert not temps(tmp_path)
    # Compaction then finishes the job (or finds it done).
    sink(tmp_path, rotate_records=100_000).compact()
    assert per_partition(tmp_path) == {0: list(range(1500))}
    assert len(parquet_files(tmp_path)) == 3
    assert sink(tmp_path, rotate_records=100_000).compact() == []


def test_open_and_compaction_hold_the_topics_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_files(tmp_path, {0: rows(0, 300)})
    lock = out(tmp_path) / pfiles.LOCK
    probes: list[str] = []

    def probe(where: str) -> None:
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            probes.append(where)
        finally:
            os.close(fd)

    real_scan, real_write = pfiles.scan, compact_mod._write_merged
    monkeypatch.setattr(pfiles, "scan", lambda *a, **k: (probe("scan"), real_scan(*a, **k))[1])
    monkeypatch.setattr(compact_mod, "_write_merged", lambda *a, **k: (probe("merge"), real_write(*a, **k))[1])
    assert resume(tmp_path, [TP0]) == {TP0: 300}
    assert sink(tmp_path, rotate_records=100_000).compact()
    assert probes[0] == "scan" and "merge" in probes
    # And free afterwards.
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_compaction_while_a_task_writes(tmp_path: Path) -> None:
    """The task never reads its committed files again and compaction never touches its
    open group: they interleave freely."""
    data = {0: rows(0, 2400), 1: rows(0, 2400, seconds=4)}
    task = sink(tmp_path, rotate_records=60, max_open_seconds=3600).task()
    compactor = sink(tmp_path, rotate_records=100_000)
    lines: list[str] = []

    async def main() -> None:
        await task.open([TP0, TP1])
        for i in range(0, 2400, 30):
            for p in (0, 1):
                await task.put(batch(data[p][i : i + 30], p))
            if i % 600 == 570:  # a group open, others committed
                await task.flush()
                lines.extend(await asyncio.to_thread(compactor.compact))
        await task.flush()
        await task.close()

    asyncio.run(main())
    assert len(lines) >= 4 and all(line.startswith("merged ") for line in lines)
    assert resume(tmp_path, [TP0, TP1]) == {TP0: 2400, TP1: 2400}
    assert per_partition(tmp_path) == {0: list(range(2400)), 1: list(range(2400))}
    compactor.compact()
    assert per_partition(tmp_path) == {0: list(range(2400)), 1: list(range(2400))}
    # 4 hours of partition 0, 3 of partition 1 (2,400 rows 4 s apart); each hour's file of
    # one merged group, plus one more where a compaction ended a merged group mid-hour.
    per_dir: dict[tuple[str, str], int] = {}
    for f in parquet_files(tmp_path):
        key = (f.name.split("+")[1], f.parent.name)
        per_dir[key] = per_dir.get(key, 0) + 1
    assert len(per_dir) == 4 + 3 and max(per_dir.values()) <= 2


def test_merged_files_stay_within_rotate_records_and_rotate_bytes(tmp_path: Path) -> None:
    small_files(tmp_path, {0: rows(0, 1200, seconds=1)})  # one hour, 24 files of 50
    lines = sink(tmp_path, rotate_records=220).compact()
    counts = [pq.read_metadata(f).num_rows for f in parquet_files(tmp_path)]
    assert max(counts) <= 220 and sum(counts) == 1200
    assert len(counts) == 6 and len(lines) == 6  # 200 + 200 + ... (four files of 50 each)
    size = max(f.stat().st_size for f in parquet_files(tmp_path))
    before = len(parquet_files(tmp_path))
    assert sink(tmp_path, rotate_records=100_000, rotate_bytes=size + 1024).compact() == []  # two would pass
    assert len(parquet_files(tmp_path)) == before
    assert per_partition(tmp_path) == {0: list(range(1200))}


def test_files_of_different_rotate_interval_windows_are_not_merged(tmp_path: Path) -> None:
    data = {0: rows(0, 1200, seconds=3)}  # one hour; 15-minute windows of 300 rows
    tps = [TP0]
    asyncio.run(write(sink(tmp_path, rotate_records=50, rotate_interval="15m", max_open_seconds=3600).task(), tps, data))
    assert sink(tmp_path, rotate_records=100_000, rotate_interval="15m").compact()
    for f in parquet_files(tmp_path):
        stamps = pq.read_table(f, columns=["timestamp"]).column("timestamp").to_pylist()
        assert len({s.minute // 15 for s in stamps}) == 1, f.name
    assert len(parquet_files(tmp_path)) == 4
    assert per_partition(tmp_path) == {0: list(range(1200))}


def test_a_schema_change_ends_a_run(tmp_path: Path) -> None:
    wider = {**SCHEMA, "fields": [*SCHEMA["fields"], {"name": "ref", "type": ["null", "string"], "default": None}]}
    wide = avro_to_arrow(wider)
    task = sink(tmp_path, rotate_records=50, max_open_seconds=3600).task()

    async def main() -> None:
        await task.open([TP0])
        for i in range(0, 200, 40):
            await task.put(batch(rows(i, i + 40), 0))
        for i in range(200, 400, 40):
            await task.put(batch([{**r, "ref": "x"} for r in rows(i, i + 40)], 0, wide))
        await task.flush()
        await task.close()

    asyncio.run(main())
    lines = sink(tmp_path, rotate_records=100_000).compact()
    assert len(lines) == 2, lines
    schemas = [pq.read_schema(f).names for f in parquet_files(tmp_path)]
    assert sorted(schemas) == [["id", "timestamp", "path"], ["id", "timestamp", "path", "ref"]]
    assert per_partition(tmp_path) == {0: list(range(400))}


def test_files_of_an_earlier_version_merge_too(tmp_path: Path) -> None:
    """Before, the pipeline's keys were in the Arrow schema's metadata."""
    d = out(tmp_path) / "dt=2024-05-01" / "hour=12"
    d.mkdir(parents=True)
    for first in (0, 10):
        table = pa.Table.from_pylist(rows(first, first + 10), schema=ARROW)
        table = table.replace_schema_metadata({"pipeline.offsets": f"{first}-{first + 9}", "pipeline.file": "1/1"})
        pq.write_table(table, d / pfiles.file_name(TP0, first, first + 9, 1, 1))
    assert sink(tmp_path).compact() == [
        f"merged 2 files of hits[0] in dt=2024-05-01/hour=12 into {pfiles.file_name(TP0, 0, 19, 1, 1)} (20 rows)"
    ]
    (merged,) = parquet_files(tmp_path)
    assert pq.read_metadata(merged).metadata[b"pipeline.offsets"] == b"0-19"
    assert b"pipeline.offsets" not in (pq.read_schema(merged).metadata or {})
    assert resume(tmp_path, [TP0]) == {TP0: 20}


def test_input_scattered_over_many_directories_keeps_few_files_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_mod, "MAX_OPEN_FILES", 4)
    rng = random.Random(5)
    data = [{"id": i, "timestamp": T0 + dt.timedelta(hours=rng.randrange(8)), "path": "/"} for i in range(200)]
    task = sink(tmp_path, max_open_seconds=3600).task()

    async def main() -> None:
        await task.open([TP0, TP1])
        for i in range(0, 200, 20):
            await task.put(batch(data[i : i + 20], 0))
            await task.put(batch(data[i : i + 20], 1))
            assert task.open_pieces <= 4 + 8  # one batch may pass the limit
        await task.flush()
        await task.close()

    asyncio.run(main())
    assert resume(tmp_path, [TP0, TP1]) == {TP0: 200, TP1: 200}
    got = per_partition(tmp_path)
    assert sorted(got[0]) == sorted(got[1]) == list(range(200))


def test_writes_that_each_span_an_hour_boundary_merge_into_a_file_per_hour(tmp_path: Path) -> None:
    # 360 rows an hour, groups of 450: every group spans two hours, each hour is shared by
    # two groups (a stream whose files were cut mid-hour by max_open_seconds).
    small_files(tmp_path, {0: rows(0, 1800, seconds=10)}, rotate_records=450)
    assert len(parquet_files(tmp_path)) == 8
    lines = sink(tmp_path, rotate_records=100_000).compact()
    assert lines == [
        "merged 8 files of hits[0] in 5 directories dt=2024-05-01/hour=12 .. dt=2024-05-01/hour=16 "
        f"into 5 files {pfiles.file_name(TP0, 0, 1799, 1, 5).replace('+1of', '+<k>of')} (1,800 rows)"
    ]
    assert sorted(f.parent.name for f in parquet_files(tmp_path)) == [f"hour={h}" for h in range(12, 17)]
    assert per_partition(tmp_path) == {0: list(range(1800))}

    # More of the stream: merged again, without rewriting the files merged before.
    merged = {f: f.stat().st_ino for f in parquet_files(tmp_path)}
    task = sink(tmp_path, rotate_records=450, max_open_seconds=3600).task()

    async def more() -> None:
        assert await task.open([TP0]) == {TP0: 1800}
        for i in range(1800, 2520, 40):
            await task.put(batch(rows(i, min(i + 40, 2520), seconds=10), 0))
        await task.flush()
        await task.close()

    asyncio.run(more())
    assert len(sink(tmp_path, rotate_records=100_000).compact()) == 1
    assert all(f.exists() and f.stat().st_ino == ino for f, ino in merged.items())
    assert sorted(f.parent.name for f in parquet_files(tmp_path)) == [f"hour={h}" for h in range(12, 19)]
    assert per_partition(tmp_path) == {0: list(range(2520))}
