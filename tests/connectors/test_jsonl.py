"""The jsonl source and sink, driven directly through their task API (no engine)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.jsonl import JsonlSink, JsonlSource
from runner.batch import Batch
from runner.connector import FatalError, TopicPartition
from tests.connectors.tasks import context, drain, write

pytestmark = pytest.mark.timeout(30)


# -- helpers ---------------------------------------------------------------------------------


def source_task(tmp: Path, **config: Any):
    source = JsonlSource(JsonlSource.Config.parse(config), context(tmp))
    tasks = source.tasks()
    assert len(tasks) == 1
    return tasks[0]


def sink_task(tmp: Path, path: str = "out"):
    return JsonlSink(JsonlSink.Config.parse({"path": path}), context(tmp)).task()


def lines_of(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def sink_batch(topic: str, partition: int, offsets: list[int], rows: list[dict] | None = None) -> Batch:
    rows = rows if rows is not None else [{"topic": topic, "p": partition, "o": o} for o in offsets]
    return Batch(
        rows,
        topic=topic,
        partition=partition,
        record_offsets=offsets,
        keys=[None] * len(offsets),
        timestamps=[0] * len(offsets),
    )


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- source ------------------------------------------------------------------------------------


def test_source_reads_files_in_path_order_in_batches_with_offsets(tmp_path: Path) -> None:
    # Written out of order: the source reads b before c regardless of creation order.
    write(tmp_path / "in" / "c.jsonl", lines_of(*({"f": "c", "i": i} for i in range(3))))
    write(tmp_path / "in" / "b.jsonl", lines_of(*({"f": "b", "i": i} for i in range(5))))
    task = source_task(tmp_path, paths=["in/*.jsonl"], batch_size=2)
    batches = drain(task)

    rows = [(r["f"], r["i"]) for b in batches for r in b.rows]
    assert rows == [("b", i) for i in range(5)] + [("c", i) for i in range(3)]
    assert all(len(b) <= 2 for b in batches)
    b_path, c_path = str(tmp_path / "in" / "b.jsonl"), str(tmp_path / "in" / "c.jsonl")
    b_sizes = [len(json.dumps({"f": "b", "i": i})) + 1 for i in range(5)]
    c_sizes = [len(json.dumps({"f": "c", "i": i})) + 1 for i in range(3)]

    # After each batch, the offset of its file stands right after its last line.
    expected = [
        {b_path: {"pos": sum(b_sizes[:2]), "line": 2}},
        {b_path: {"pos": sum(b_sizes[:4]), "line": 4}},
        {b_path: {"pos": sum(b_sizes), "line": 5}},
        {c_path: {"pos": sum(c_sizes[:2]), "line": 2}},
        {c_path: {"pos": sum(c_sizes), "line": 3}},
    ]
    assert [b.source_offsets for b in batches if len(b)] == expected
    # Positions name file:line for each record.
    assert batches[0].positions == [f"{b_path}:1", f"{b_path}:2"]
    assert all(not b.errors for b in batches)


def test_source_resumes_after_stored_offsets_without_repeat_or_skip(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write(tmp_path / f"{name}.jsonl", lines_of(*({"f": name, "i": i} for i in range(5))))
    everything = [(r["f"], r["i"]) for b in drain(source_task(tmp_path, paths=["*.jsonl"], batch_size=3)) for r in b.rows]
    assert len(everything) == 10

    # Stop after each possible batch boundary and resume with the offsets reached so far.
    for stop_after in range(1, 5):

        async def first_part() -> tuple[list, dict]:
            task = source_task(tmp_path, paths=["*.jsonl"], batch_size=3)
            await task.open({})
            seen, offsets = [], {}
            for _ in range(stop_after):
                batch = await task.poll()
                assert batch is not None
                seen += [(r["f"], r["i"]) for r in batch.rows]
                offsets.update(batch.source_offsets)
            await task.close()
            return seen, offsets

        seen, offsets = asyncio.run(first_part())
        rest = drain(source_task(tmp_path, paths=["*.jsonl"], batch_size=3), json.loads(json.dumps(offsets)))
        assert seen + [(r["f"], r["i"]) for b in rest for r in b.rows] == everything, stop_after
        # Line numbers continue from the stored ones.
        positions = [p for b in rest for p in (b.positions or [])]
        if positions:
            path, line = positions[0].rsplit(":", 1)
            assert int(line) == offsets[path]["line"] + 1 if path in offsets else int(line) == 1


def test_source_bad_lines_become_errors_and_the_rest_is_delivered(tmp_path: Path) -> None:
    raw_bad_json = '{"id": 2, "oops"'
    raw_not_object = "[1, 2, 3]"
    write(
        tmp_path / "in.jsonl",
        '{"id": 1}\n' + raw_bad_json + "\n" + raw_not_object + '\n\n   \n{"id": 3}\n"str"\n{"id": 4}\n',
    )
    batches = drain(source_task(tmp_path, paths=["in.jsonl"], batch_size=100))
    assert len(batches) == 1
    (batch,) = batches
    path = str(tmp_path / "in.jsonl")
    assert batch.rows == [{"id": 1}, {"id": 3}, {"id": 4}]
    assert batch.positions == [f"{path}:1", f"{path}:6", f"{path}:8"]
    assert [(e.stage, e.position, e.record) for e in batch.errors] == [
        ("source", f"{path}:2", raw_bad_json),
        ("source", f"{path}:3", raw_not_object),
        ("source", f"{path}:7", '"str"'),
    ]
    assert "invalid JSON" in batch.errors[0].error
    assert "JSON object" in batch.errors[1].error and "list" in batch.errors[1].error
    # Blank lines count as lines (positions stay true to the file) but yield nothing.
    assert batch.source_offsets == {path: {"pos": (tmp_path / "in.jsonl").stat().st_size, "line": 8}}


def test_source_without_follow_reads_a_last_line_without_newline(tmp_path: Path) -> None:
    write(tmp_path / "in.jsonl", '{"id": 1}\n{"id": 2}')
    batches = drain(source_task(tmp_path, paths=["in.jsonl"]))
    assert [r for b in batches for r in b.rows] == [{"id": 1}, {"id": 2}]
    path = str(tmp_path / "in.jsonl")
    assert batches[-1].source_offsets == {path: {"pos": len('{"id": 1}\n{"id": 2}'), "line": 2}}


async def poll_until(task, want: int, deadline: float = 5.0) -> list[dict]:
    """Poll a following source until `want` rows arrived (or the deadline)."""
    rows: list[dict] = []
    end = time.monotonic() + deadline
    while len(rows) < want and time.monotonic() < end:
        batch = await task.poll()
        assert batch is not None, "a following source never ends"
        rows += batch.rows
    return rows


def test_source_following_waits_for_a_partial_line_to_be_completed(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write(path, '{"id": 1}\n{"id": ')

    async def main() -> None:
        task = source_task(tmp_path, paths=["in.jsonl"], follow=True, batch_size=10)
        await task.open({})
        try:
            assert await poll_until(task, 1) == [{"id": 1}]
            # The partial line is not read, however often we poll.
            for _ in range(3):
                batch = await task.poll()
                assert batch is not None and batch.rows == [] and not batch.errors
            write(path, '2}\n{"id": 3}\n', mode="a")
            assert await poll_until(task, 2) == [{"id": 2}, {"id": 3}]
            # Nothing more, nothing twice.
            batch = await task.poll()
            assert batch is not None and batch.rows == []
        finally:
            await task.close()

    asyncio.run(main())


def test_source_following_offsets_stop_before_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write(path, '{"id": 1}\n{"id": ')

    async def main() -> dict:
        task = source_task(tmp_path, paths=["in.jsonl"], follow=True)
        await task.open({})
        offsets: dict = {}
        try:
            for _ in range(3):
                batch = await task.poll()
                offsets.update(batch.source_offsets)
        finally:
            await task.close()
        return offsets

    offsets = asyncio.run(main())
    assert offsets == {str(path): {"pos": len('{"id": 1}\n'), "line": 1}}
    # A restart (follow or not) after the line is completed reads it exactly once.
    write(path, '2}\n', mode="a")
    rows = [r for b in drain(source_task(tmp_path, paths=["in.jsonl"]), offsets) for r in b.rows]
    assert rows == [{"id": 2}]


def test_source_following_does_not_spin_on_a_partial_line(tmp_path: Path) -> None:
    # The SourceTask contract: "an empty Batch when nothing is available right now (wait a
    # little inside poll first ...)". With only a partial line pending, every poll reopens
    # the file, re-reads the fragment and returns at once, each with source_offsets set (so
    # the engine commits an empty transaction per poll).
    path = tmp_path / "in.jsonl"
    write(path, '{"id": 1}\n{"id": ')

    async def main() -> int:
        task = source_task(tmp_path, paths=["in.jsonl"], follow=True)
        await task.open({})
        try:
            await poll_until(task, 1)
            polls, end = 0, time.monotonic() + 1.0
            while time.monotonic() < end:
                await task.poll()
                polls += 1
            return polls
        finally:
            await task.close()

    polls = asyncio.run(main())
    assert polls <= 10, f"{polls} polls in one second with nothing to read"


def test_source_following_picks_up_new_files(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.jsonl", lines_of({"f": "a"}))

    async def main() -> None:
        task = source_task(tmp_path, paths=["in/*.jsonl"], follow=True)
        await task.open({})
        try:
            assert await poll_until(task, 1) == [{"f": "a"}]
            write(tmp_path / "in" / "b.jsonl", lines_of({"f": "b"}))
            write(tmp_path / "in" / "other.txt", "not matched\n")
            assert await poll_until(task, 1) == [{"f": "b"}]
            write(tmp_path / "in" / "a.jsonl", lines_of({"f": "a2"}), mode="a")
            assert await poll_until(task, 1) == [{"f": "a2"}]
            batch = await task.poll()
            assert batch is not None and batch.rows == []
        finally:
            await task.close()

    asyncio.run(main())


def test_source_following_starts_with_no_file_and_waits(tmp_path: Path) -> None:
    async def main() -> None:
        task = source_task(tmp_path, paths=["in/*.jsonl"], follow=True)
        await task.open({})  # no file yet: fine when following
        try:
            batch = await task.poll()
            assert batch is not None and len(batch) == 0
            write(tmp_path / "in" / "late.jsonl", lines_of({"late": True}))
            assert await poll_until(task, 1) == [{"late": True}]
        finally:
            await task.close()

    asyncio.run(main())


def test_source_without_follow_and_no_matching_file_is_fatal_at_open(tmp_path: Path) -> None:
    write(tmp_path / "in" / "x.txt", "{}\n")
    task = source_task(tmp_path, paths=["in/*.jsonl"])
    with pytest.raises(FatalError, match=r"in/\*\.jsonl"):
        asyncio.run(task.open({}))


def test_source_without_follow_returns_none_at_the_end_and_keeps_doing_so(tmp_path: Path) -> None:
    write(tmp_path / "in.jsonl", lines_of({"id": 1}))

    async def main() -> None:
        task = source_task(tmp_path, paths=["in.jsonl"])
        await task.open({})
        try:
            batch = await task.poll()
            assert batch is not None and batch.rows == [{"id": 1}]
            assert await task.poll() is None
            assert await task.poll() is None
        finally:
            await task.close()

    asyncio.run(main())


def test_source_fully_read_offsets_yield_nothing(tmp_path: Path) -> None:
    write(tmp_path / "in.jsonl", lines_of({"id": 1}, {"id": 2}))
    first = drain(source_task(tmp_path, paths=["in.jsonl"]))
    offsets: dict = {}
    for b in first:
        offsets.update(b.source_offsets)
    assert drain(source_task(tmp_path, paths=["in.jsonl"]), offsets) == []


# -- sink --------------------------------------------------------------------------------------


TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_sink_writes_one_file_per_partition_and_resumes_after_flush(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def first() -> dict:
        task = sink_task(tmp_path)
        resume = await task.open([TP0, TP1])
        assert await task.put(sink_batch("t", 0, [0, 1, 2])) is None
        await task.put(sink_batch("t", 1, [0, 1]))
        await task.put(sink_batch("t", 0, [3, 4]))
        await task.flush()
        await task.close()
        return resume

    assert asyncio.run(first()) == {TP0: 0, TP1: 0}
    assert [r["o"] for r in read_records(out / "t-0.jsonl")] == [0, 1, 2, 3, 4]
    assert [r["o"] for r in read_records(out / "t-1.jsonl")] == [0, 1]

    async def second() -> dict:
        task = sink_task(tmp_path)
        resume = await task.open([TP0, TP1])
        await task.put(sink_batch("t", 1, [2]))
        await task.flush()
        await task.close()
        return resume

    assert asyncio.run(second()) == {TP0: 5, TP1: 2}
    assert [r["o"] for r in read_records(out / "t-0.jsonl")] == [0, 1, 2, 3, 4]
    assert [r["o"] for r in read_records(out / "t-1.jsonl")] == [0, 1, 2]
    # Reopening a third time resumes after the last flush of each partition.
    assert asyncio.run(sink_task(tmp_path).open([TP0, TP1])) == {TP0: 5, TP1: 3}


def test_sink_close_without_flush_discards_and_reopen_resumes_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def crashed_run() -> None:
        task = sink_task(tmp_path)
        await task.open([TP0, TP1])
        await task.put(sink_batch("t", 0, [0, 1]))
        await task.put(sink_batch("t", 1, [0]))
        await task.flush()
        # More, never flushed: written to the files, then an abort.
        await task.put(sink_batch("t", 0, [2, 3]))
        await task.put(sink_batch("t", 1, [1, 2, 3]))
        await task.close()

    asyncio.run(crashed_run())
    size0 = (out / "t-0.jsonl").stat().st_size
    assert len(read_records(out / "t-0.jsonl")) == 4, "close flushed Python's buffer to the file"

    async def redelivery() -> dict:
        task = sink_task(tmp_path)
        resume = await task.open([TP0, TP1])
        # The engine seeks to the returned offsets and delivers from there again.
        await task.put(sink_batch("t", 0, [2, 3]))
        await task.put(sink_batch("t", 1, [1, 2, 3]))
        await task.flush()
        await task.close()
        return resume

    assert asyncio.run(redelivery()) == {TP0: 2, TP1: 1}
    assert [r["o"] for r in read_records(out / "t-0.jsonl")] == [0, 1, 2, 3]
    assert [r["o"] for r in read_records(out / "t-1.jsonl")] == [0, 1, 2, 3]
    assert (out / "t-0.jsonl").stat().st_size == size0


def test_sink_open_truncates_to_the_last_flushed_size(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def flushed_then_more() -> int:
        task = sink_task(tmp_path)
        await task.open([TP0])
        await task.put(sink_batch("t", 0, [0, 1, 2]))
        await task.flush()
        size = (out / "t-0.jsonl").stat().st_size
        await task.put(sink_batch("t", 0, [3]))
        await task.close()
        return size

    flushed_size = asyncio.run(flushed_then_more())
    assert (out / "t-0.jsonl").stat().st_size > flushed_size
    # Garbage left by a crash mid-write (a partial line) is cut too.
    write(out / "t-0.jsonl", '{"half": ', mode="a")
    assert asyncio.run(sink_task(tmp_path).open([TP0])) == {TP0: 3}
    assert (out / "t-0.jsonl").stat().st_size == flushed_size
    assert [r["o"] for r in read_records(out / "t-0.jsonl")] == [0, 1, 2]


def test_sink_task_dropped_after_put_without_flush(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def first() -> None:
        task = sink_task(tmp_path)
        await task.open([TP0, TP1])
        await task.put(sink_batch("t", 0, [0]))
        await task.flush()
        await task.put(sink_batch("t", 0, [1, 2]))
        await task.put(sink_batch("t", 1, [0, 1]))
        # No flush, no close: the task object is simply dropped (as if the process died
        # after Python's buffers reached the file).
        del task
        gc.collect()

    asyncio.run(first())

    async def again() -> dict:
        task = sink_task(tmp_path)
        resume = await task.open([TP0, TP1])
        for tp, start in resume.items():
            offsets = list(range(start, 3 if tp == TP0 else 2))
            if offsets:
                await task.put(sink_batch(tp.topic, tp.partition, offsets))
        await task.flush()
        await task.close()
        return resume

    assert asyncio.run(again()) == {TP0: 1, TP1: 0}
    assert [r["o"] for r in read_records(out / "t-0.jsonl")] == [0, 1, 2]
    assert [r["o"] for r in read_records(out / "t-1.jsonl")] == [0, 1]


def test_sink_writes_json_for_avro_values(tmp_path: Path) -> None:
    import datetime
    import decimal

    out = tmp_path / "out"
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    rows = [{"ts": when, "amount": decimal.Decimal("1.50"), "blob": b"\x00\x01", "text": "é"}]

    async def main() -> None:
        task = sink_task(tmp_path)
        await task.open([TP0])
        await task.put(sink_batch("t", 0, [0], rows))
        await task.flush()
        await task.close()

    asyncio.run(main())
    assert read_records(out / "t-0.jsonl") == [
        {"ts": "2024-05-01T12:00:00+00:00", "amount": "1.50", "blob": "AAE=", "text": "é"}
    ]


def test_sink_relative_path_is_resolved_against_the_spec_dir(tmp_path: Path) -> None:
    async def main() -> None:
        task = sink_task(tmp_path, "nested/out")
        await task.open([TP0])
        await task.put(sink_batch("t", 0, [0]))
        await task.flush()
        await task.close()

    asyncio.run(main())
    assert (tmp_path / "nested" / "out" / "t-0.jsonl").exists()
    marker = json.loads((tmp_path / "nested" / "out" / "t-0.jsonl.offset").read_text())
    assert marker["next_offset"] == 1 and marker["size"] == (tmp_path / "nested" / "out" / "t-0.jsonl").stat().st_size


def test_source_reads_a_truncated_file_again_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "t.jsonl"
    log.write_text('{"n": 1}\n{"n": 2}\n')
    task = source_task(tmp_path, paths=["t.jsonl"], follow=True)

    async def scenario() -> list[int]:
        await task.open({})
        seen = [r["n"] for r in (await task.poll()).rows]
        log.write_text('{"n": 3}\n')  # truncated and rewritten, shorter than before
        for _ in range(4):
            batch = await task.poll()
            seen += [r["n"] for r in batch.rows]
        await task.close()
        return seen

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_sink_refuses_output_shorter_than_its_marker(tmp_path: Path) -> None:
    task = sink_task(tmp_path)
    tp = TopicPartition("t", 0)

    async def write_some() -> None:
        await task.open([tp])
        await task.put(sink_batch("t", 0, [0, 1], [{"n": 1}, {"n": 2}]))
        await task.flush()
        await task.close()

    asyncio.run(write_some())
    data = next(tmp_path.rglob("t-0.jsonl"))
    data.write_text("")  # someone emptied the output but kept the marker
    with pytest.raises(FatalError, match="changed outside the pipeline"):
        asyncio.run(sink_task(tmp_path).open([tp]))
