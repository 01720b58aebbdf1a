"""The embedded broker stores records in batches (one row per produce call to a partition)
and still serves any offset; a state directory of the older one-row-per-record layout is
migrated by the writer and refused, with what to do, by read-only inspection."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from runner.broker.base import TopicPartition
from runner.broker.embedded import EmbeddedBroker
from runner.errors import FatalError
from tests.broker.test_embedded import batch, drain, open_broker, run


def test_fetch_from_any_offset_inside_and_across_stored_batches(tmp_path: Path) -> None:
    async def go() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        for start in range(0, 100, 10):  # ten stored batches of ten records
            await b.produce([batch("t", 0, [f"v{i}".encode() for i in range(start, start + 10)])])
        consumer = await b.consumer("g", ["t"])
        for offset, max_records in [(0, 100), (7, 5), (9, 2), (35, 30), (99, 10), (100, 10)]:
            await consumer.seek(TopicPartition("t", 0), offset)
            fetched = await consumer.fetch(max_records, 0)
            got = [(o, v) for fb in fetched for o, v in zip(fb.offsets, fb.values)]
            want = [(i, f"v{i}".encode()) for i in range(offset, min(100, offset + max_records))]
            assert got == want, (offset, max_records)
            assert await consumer.position(TopicPartition("t", 0)) == min(100, offset + max_records)
        await consumer.close()
        await b.close()

    run(go)


def test_state_is_stored_one_row_per_produce_call_and_compressed(tmp_path: Path) -> None:
    value = json.dumps({"path": "/index.html", "agent": "Mozilla/5.0 (X11; Linux x86_64)"}).encode()

    async def go() -> None:
        b = await open_broker(tmp_path, {"t": 1})
        for _ in range(5):
            await b.produce([batch("t", 0, [value] * 1000)])
        await b.close()

    run(go)
    with sqlite3.connect(tmp_path / "broker.db") as db:
        rows = db.execute("SELECT end_offset, count, length(payload) FROM batches_1_0").fetchall()
    assert [(end, count) for end, count, _ in rows] == [(1000 * i, 1000) for i in range(1, 6)]
    assert sum(size for _, _, size in rows) < 5000 * len(value) / 4  # repeated text compresses


def make_layout_1(path: Path) -> None:
    """A state directory as the one-row-per-record version wrote it (broker.db layout 1)."""
    path.mkdir()
    with sqlite3.connect(path / "broker.db") as db:
        db.executescript(
            """
            CREATE TABLE topics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, partitions INTEGER NOT NULL,
                                 created INTEGER NOT NULL);
            CREATE TABLE source_offsets (connector TEXT NOT NULL, partition TEXT NOT NULL, offset TEXT NOT NULL,
                                         PRIMARY KEY (connector, partition)) WITHOUT ROWID;
            CREATE TABLE group_offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                                        next_offset INTEGER NOT NULL, PRIMARY KEY (group_id, topic, partition))
                                        WITHOUT ROWID;
            INSERT INTO topics VALUES (1, 'activity', 2, 0);
            CREATE TABLE records_1_0 (offset INTEGER PRIMARY KEY, key BLOB, value BLOB NOT NULL,
                                      timestamp INTEGER NOT NULL, headers TEXT);
            CREATE TABLE records_1_1 (offset INTEGER PRIMARY KEY, key BLOB, value BLOB NOT NULL,
                                      timestamp INTEGER NOT NULL, headers TEXT);
            INSERT INTO source_offsets VALUES ('logs', 'access.log', '{"line":25002}');
            INSERT INTO group_offsets VALUES ('sink', 'activity', 0, 12000);
            PRAGMA user_version = 1;
            """
        )
        db.executemany(
            "INSERT INTO records_1_0 VALUES (?, ?, ?, ?, ?)",
            [(i, b"k", f"v{i}".encode(), 1000 + i, '{"trace": "\\u00e4b"}' if i == 3 else None) for i in range(25000)],
        )
        db.execute("INSERT INTO records_1_1 VALUES (0, NULL, X'00ff', 5, NULL)")


def test_a_layout_1_state_directory_is_migrated_by_the_writer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    make_layout_1(state)

    async def go() -> None:
        b = await open_broker(state)
        assert await b.end_offsets("activity") == [25000, 1]
        assert await b.source_offsets("logs") == {"access.log": {"line": 25002}}
        assert await b.committed("sink", "activity") == {0: 12000}
        consumer = await b.consumer(None, ["activity"])
        fetched = await drain(consumer, 10_000)
        records = {(fb.partition, o): (k, v, t, (fb.headers or [{}] * len(fb.values))[i])
                   for fb in fetched for i, (o, k, v, t) in enumerate(zip(fb.offsets, fb.keys, fb.values, fb.timestamps))}
        assert len(records) == 25001
        assert records[(0, 3)] == (b"k", b"v3", 1003, {"trace": b"\xe4b"})
        assert records[(0, 24999)] == (b"k", b"v24999", 1000 + 24999, {})
        assert records[(1, 0)] == (None, b"\x00\xff", 5, {})
        await consumer.close()
        await b.produce([batch("activity", 1, [b"new"])])  # offsets go on where layout 1 ended
        assert await b.end_offsets("activity") == [25000, 2]
        await b.close()

    run(go)
    assert "moved 25,001 record(s) of 1 topic(s) to the stored-batch layout" in caplog.text
    with sqlite3.connect(state / "broker.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'records_%'").fetchall()


def test_read_only_inspection_of_a_layout_1_state_directory_says_what_to_do(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_layout_1(state)

    async def go() -> None:
        b = EmbeddedBroker(state, read_only=True)
        with pytest.raises(FatalError) as caught:
            await b.start()
        assert "older version of pipeline (layout 1" in str(caught.value)
        assert "`pipeline run`" in caught.value.hint

    run(go)
