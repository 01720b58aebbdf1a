"""The `files` source: whole files landing in a directory, each read once, with their field
types kept through the topic schema. Real files; through the real engine (`pipeline run
--once` on the embedded broker, jsonl sink) and, for offsets and resume, through the task
API directly."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.files import FilesSource
from connectors.http_log import HttpLogSource, avro_schema_for
from runner.batch import Batch
from runner.connector import ConfigError
from tests.conftest import read_jsonl_dir, run_cli
from tests.connectors.tasks import context, drain, write

pytestmark = pytest.mark.timeout(60)

UTC = dt.timezone.utc

ORDER = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "int"},
        {"name": "amount", "type": "double"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}


# -- helpers ---------------------------------------------------------------------------------


def source_task(tmp: Path, schema: dict | None = ORDER, **config: Any):
    ctx = context(tmp, topics=("t",), schemas={"t": schema} if schema else {})
    (task,) = FilesSource(FilesSource.Config.parse(config), ctx).tasks()
    return task


def rows_of(batches: list[Batch]) -> list[dict]:
    return [r for b in batches for r in b.rows]


def positions_of(batches: list[Batch]) -> list[str]:
    return [p for b in batches for p in (b.positions or [])]


def stat_id(path: Path) -> str:
    st = path.stat()
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def csv_rows(ids: range) -> str:
    return "".join(f"{i},{i}.5,n{i},2024-05-01T12:00:{i % 60:02d}\n" for i in ids)


def write_parquet(path: Path, ids: list[int], row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "amount": pa.array([i + 0.25 for i in ids], pa.float64()),
            "note": pa.array([None if i % 2 else f"p{i}" for i in ids], pa.string()),
            "at": pa.array([dt.datetime(2024, 5, 2, 8, 0, i % 60) for i in ids], pa.timestamp("ms")),  # naive: UTC
            "ignored": pa.array([b"x"] * len(ids), pa.binary()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


SPEC = """\
name: files-e2e
topics:
  orders: {{partitions: 2, schema: order.avsc, key: id}}
sources:
{sources}
sinks:
  - {{name: out, connector: jsonl, topics: [orders], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: orders-dlq}}
"""


def spec(tmp: Path, *sources: str) -> None:
    (tmp / "order.avsc").write_text(json.dumps(ORDER))
    (tmp / "spec.yaml").write_text(SPEC.format(sources="\n".join(f"  - {s}" for s in sources)))


def run_once(tmp: Path) -> None:
    result = run_cli("run", "spec.yaml", "--once", cwd=tmp, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def delivered(tmp: Path) -> list[dict]:
    """Everything in the sink's output, ordered by id."""
    out = tmp / "out"
    records = [r for rs in read_jsonl_dir(out).values() for r in rs] if out.exists() else []
    return sorted(records, key=lambda r: r["id"])


def dead_letters(tmp: Path) -> list[dict]:
    result = run_cli("consume", "orders-dlq", "--from-beginning", "--spec", "spec.yaml", cwd=tmp, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(x) for x in result.stdout.splitlines() if x.strip()]


# -- through the engine ----------------------------------------------------------------------


def test_csv_parquet_and_jsonl_keep_their_types_then_nothing_again_then_only_a_new_file(tmp_path: Path) -> None:
    land = tmp_path / "landing"
    write(land / "orders.csv", "id,amount,note,at,unused\n" + "1,1.5,first,2024-05-01T12:00:00,x\n" + "2,2.25,,2024-05-01 14:30:00+02:00,y\n")
    write_parquet(land / "orders.parquet", [10, 11])
    write(
        land / "orders.jsonl",
        json.dumps({"id": 20, "amount": 3, "note": None, "at": "2024-05-03T09:15:00Z"}) + "\n"
        + json.dumps({"id": 21, "amount": 4.5, "at": 1714727700000, "extra": True}) + "\n",
    )
    spec(
        tmp_path,
        '{name: csv-in, connector: files, topic: orders, config: {paths: ["landing/*.csv"], format: csv}}',
        '{name: parquet-in, connector: files, topic: orders, config: {paths: ["landing/*.parquet"], format: parquet}}',
        '{name: jsonl-in, connector: files, topic: orders, config: {paths: ["landing/*.jsonl"], format: jsonl}}',
    )
    run_once(tmp_path)
    assert delivered(tmp_path) == [
        {"id": 1, "amount": 1.5, "note": "first", "at": "2024-05-01T12:00:00+00:00"},
        {"id": 2, "amount": 2.25, "note": None, "at": "2024-05-01T12:30:00+00:00"},  # empty cell: null
        {"id": 10, "amount": 10.25, "note": "p10", "at": "2024-05-02T08:00:10+00:00"},
        {"id": 11, "amount": 11.25, "note": None, "at": "2024-05-02T08:00:11+00:00"},
        {"id": 20, "amount": 3.0, "note": None, "at": "2024-05-03T09:15:00+00:00"},
        {"id": 21, "amount": 4.5, "note": None, "at": "2024-05-03T09:15:00+00:00"},
    ]
    assert not dead_letters(tmp_path)

    run_once(tmp_path)  # nothing new: nothing read again
    assert len(delivered(tmp_path)) == 6

    write(land / "orders-2.csv", "id,amount,note,at\n3,7.75,late,2024-05-04T00:00:00Z\n")
    run_once(tmp_path)
    after = delivered(tmp_path)
    assert len(after) == 7 and [r["id"] for r in after].count(1) == 1
    assert {"id": 3, "amount": 7.75, "note": "late", "at": "2024-05-04T00:00:00+00:00"} in after


def test_an_empty_or_missing_landing_directory_is_a_normal_run(tmp_path: Path) -> None:
    spec(tmp_path, '{name: in, connector: files, topic: orders, config: {paths: ["landing/**/*.csv"], format: csv}}')
    run_once(tmp_path)  # landing/ does not even exist
    (tmp_path / "landing").mkdir()
    run_once(tmp_path)
    assert delivered(tmp_path) == []


@pytest.mark.parametrize("identity", ["stat", "hash"])
def test_a_file_rewritten_with_new_content_is_read_again(tmp_path: Path, identity: str) -> None:
    path = tmp_path / "landing" / "daily.csv"
    write(path, "id,amount,note,at\n1,1.0,,2024-05-01T00:00:00\n2,2.0,,2024-05-01T00:00:00\n")
    spec(
        tmp_path,
        f'{{name: in, connector: files, topic: orders, config: {{paths: ["landing/*.csv"], format: csv, identity: {identity}}}}}',
    )
    run_once(tmp_path)
    assert [r["id"] for r in delivered(tmp_path)] == [1, 2]

    if identity == "hash":
        # The same bytes written again (a new mtime): the same file, not read again.
        write(path, path.read_text())
        run_once(tmp_path)
        assert [r["id"] for r in delivered(tmp_path)] == [1, 2]
        # New content of the same size, with the old mtime put back: only the hash can tell.
        st = path.stat()
        write(path, "id,amount,note,at\n3,3.0,,2024-05-01T00:00:00\n4,4.0,,2024-05-01T00:00:00\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size
    else:
        write(path, "id,amount,note,at\n3,3.0,,2024-05-01T00:00:00\n4,4.0,,2024-05-01T00:00:00\n5,5.0,,2024-05-01T00:00:00\n")
    run_once(tmp_path)
    expected = [1, 2, 3, 4] if identity == "hash" else [1, 2, 3, 4, 5]
    assert [r["id"] for r in delivered(tmp_path)] == expected


def test_move_to_moves_finished_files_keeping_the_sub_path_and_never_overwriting(tmp_path: Path) -> None:
    write(tmp_path / "landing" / "2024" / "05" / "a.csv", "id,amount,note,at\n1,1.0,,2024-05-01T00:00:00\n")
    write(tmp_path / "landing" / "b.csv", "id,amount,note,at\n2,2.0,,2024-05-01T00:00:00\n")
    write(tmp_path / "landing" / "empty.csv", "")
    write(tmp_path / "done" / "b.csv", "an older b.csv, kept\n")
    # `**/*.csv` from the spec's directory also matches done/: files there are never taken.
    spec(
        tmp_path,
        '{name: in, connector: files, topic: orders, config: {paths: ["landing/**/*.csv", "**/*.csv"], format: csv, move_to: done/}}',
    )
    run_once(tmp_path)
    assert [r["id"] for r in delivered(tmp_path)] == [1, 2]
    assert sorted(p.relative_to(tmp_path / "done").as_posix() for p in (tmp_path / "done").rglob("*.csv")) == [
        "2024/05/a.csv",
        "b.1.csv",
        "b.csv",
        "empty.csv",
    ]
    assert (tmp_path / "done" / "b.csv").read_text() == "an older b.csv, kept\n"
    assert not list((tmp_path / "landing").rglob("*.csv"))

    run_once(tmp_path)  # moved files are not seen again
    assert [r["id"] for r in delivered(tmp_path)] == [1, 2]


def test_a_bad_csv_value_goes_to_the_dead_letter_topic_and_the_rest_of_the_file_is_delivered(tmp_path: Path) -> None:
    raw = "3,abc,oops,2024-05-01T00:00:00"
    write(
        tmp_path / "landing" / "orders.csv",
        "id,amount,note,at\n1,1.0,,2024-05-01T00:00:00\n2,2.0,,2024-05-01T00:00:00\n" + raw + "\n"
        "4,4.0,,2024-05-01T00:00:00\n5,5.0,,not a time\n6,6.0,,2024-05-01T00:00:00\n",
    )
    spec(tmp_path, '{name: in, connector: files, topic: orders, config: {paths: ["landing/*.csv"], format: csv}}')
    run_once(tmp_path)
    assert [r["id"] for r in delivered(tmp_path)] == [1, 2, 4, 6]
    path = tmp_path / "landing" / "orders.csv"
    dead = sorted(dead_letters(tmp_path), key=lambda d: d["position"])
    assert [(d["position"], d["field"], d["error"], d["record"], d["stage"], d["connector"]) for d in dead] == [
        (f"{path}:4", "amount", "column 'amount': 'abc' is not a double", raw, "source", "in"),
        (f"{path}:6", "at", "column 'at': 'not a time' is not a timestamp (ISO 8601)", "5,5.0,,not a time", "source", "in"),
    ]


# -- offsets and resume, through the task ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_resume_mid_file_from_a_stored_row(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        write(path, "id,amount,note,at\n" + csv_rows(range(1, 9)))
    elif fmt == "jsonl":
        write(path, "".join(json.dumps({"id": i, "amount": 1.0, "at": 0}) + "\n" for i in range(1, 9)))
    else:
        write_parquet(path, list(range(1, 9)), row_group_size=2)
    offsets = {str(path): {"id": stat_id(path), "row": 3, "done": False}}
    batches = drain(source_task(tmp_path, paths=[f"*.{fmt}"], format=fmt, batch_size=2), offsets)
    rows = rows_of(batches)
    assert [r["id"] for r in rows] == [4, 5, 6, 7, 8]  # the first record is row 4
    first = {"csv": f"{path}:5", "jsonl": f"{path}:4", "parquet": f"{path}#row4"}[fmt]  # csv: line 1 is the header
    assert positions_of(batches)[0] == first
    assert batches[-1].source_offsets[str(path)] == {"id": stat_id(path), "row": 8, "done": True}


def test_a_changed_file_at_a_stored_path_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    write(path, "id,amount,note,at\n" + csv_rows(range(1, 5)))
    offsets = {str(path): {"id": "stat:1:1", "row": 3, "done": True}}
    assert [r["id"] for r in rows_of(drain(source_task(tmp_path, paths=["*.csv"], format="csv"), offsets))] == [1, 2, 3, 4]
    # Stored with the other identity kind: checked in that kind, so not read again.
    offsets = {str(path): {"id": stat_id(path), "row": 4, "done": True}}
    assert drain(source_task(tmp_path, paths=["*.csv"], format="csv", identity="hash"), offsets) == []


def final_offsets(batches: list[Batch], start: dict | None = None) -> dict:
    offsets = dict(start or {})
    for b in batches:
        offsets.update(b.source_offsets)
    return offsets


def interrupted_runs(tmp_path: Path, stop_after: int, **config: Any) -> tuple[list[int], list[int], dict]:
    """Read `stop_after` batches, then start again from their offsets (as after a kill -9:
    what the engine stored is exactly the offsets of the batches delivered). The records
    of both parts, and the offsets at the end."""

    async def first_part() -> tuple[list[int], dict]:
        task = source_task(tmp_path, **config)
        await task.open({})
        seen, offsets = [], {}
        for _ in range(stop_after):
            batch = await task.poll()
            if batch is None:
                break
            seen += [r["id"] for r in batch.rows]
            offsets.update(batch.source_offsets)
        await task.close()  # no clean end: the rest was never polled
        return seen, json.loads(json.dumps(offsets))

    seen, offsets = asyncio.run(first_part())
    batches = drain(source_task(tmp_path, **config), offsets)
    return seen, [r["id"] for r in rows_of(batches)], final_offsets(batches, offsets)


def test_a_run_stopped_after_any_batch_resumes_without_losing_or_repeating(tmp_path: Path) -> None:
    land = tmp_path / "landing"
    # A quoted cell spanning lines, blank lines, a bad row, CRLF line ends, a .gz: the byte
    # position and row count stay right through all of them.
    write(
        land / "a.csv",
        'id,amount,note,at\r\n1,1.0,"two\r\nlines",2024-05-01T00:00:00\r\n\r\n2,x,,2024-05-01T00:00:00\r\n'
        + csv_rows(range(3, 12)).replace("\n", "\r\n"),
    )
    with gzip.open(land / "b.csv.gz", "wt", newline="") as f:
        f.write("id,amount,note,at\n" + csv_rows(range(12, 20)))
    write(land / "c.csv", "id,amount,note,at\n")  # header only
    write(land / "d.csv", "id,amount,note,at\n" + csv_rows(range(20, 23)))
    config = {"paths": ["landing/*.csv", "landing/*.csv.gz"], "format": "csv", "batch_size": 3}
    batches = drain(source_task(tmp_path, **config))
    everything, end = [r["id"] for r in rows_of(batches)], final_offsets(batches)
    assert everything == [1] + list(range(3, 23))
    assert [o["row"] for _, o in sorted(end.items())] == [11, 8, 0, 3]  # the bad row counts, blank lines do not
    for stop_after in range(1, 10):
        seen, rest, offsets = interrupted_runs(tmp_path, stop_after, **config)
        assert (seen + rest, offsets) == (everything, end), stop_after

    write_parquet(land / "e.parquet", list(range(100, 117)), row_group_size=5)
    write_parquet(land / "f.parquet", list(range(200, 203)))
    config = {"paths": ["landing/*.parquet"], "format": "parquet", "batch_size": 4}
    batches = drain(source_task(tmp_path, **config))
    everything, end = [r["id"] for r in rows_of(batches)], final_offsets(batches)
    assert everything == list(range(100, 117)) + [200, 201, 202]
    for stop_after in range(1, 6):
        seen, rest, offsets = interrupted_runs(tmp_path, stop_after, **config)
        assert (seen + rest, offsets) == (everything, end), stop_after


def test_offsets_name_each_file_a_batch_covers_and_small_files_share_batches(tmp_path: Path) -> None:
    for name, ids in (("a", range(1, 3)), ("b", range(3, 4)), ("c", range(4, 8))):
        write(tmp_path / f"{name}.csv", "id,amount,note,at\n" + csv_rows(ids))
    batches = drain(source_task(tmp_path, paths=["*.csv"], format="csv", batch_size=5))
    a, b, c = (str(tmp_path / f"{n}.csv") for n in "abc")
    assert [[r["id"] for r in x.rows] for x in batches] == [[1, 2, 3, 4, 5], [6, 7]]
    assert batches[0].source_offsets == {
        a: {"id": stat_id(tmp_path / "a.csv"), "row": 2, "done": True},
        b: {"id": stat_id(tmp_path / "b.csv"), "row": 1, "done": True},
        c: {"id": stat_id(tmp_path / "c.csv"), "row": 2, "done": False, "pos": len("id,amount,note,at\n" + csv_rows(range(4, 6))), "line": 3},
    }
    assert list(batches[0].positions) == [f"{a}:2", f"{a}:3", f"{b}:2", f"{c}:2", f"{c}:3"]


def test_a_file_read_but_not_moved_before_a_crash_is_moved_by_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "landing" / "x.csv"
    write(path, "id,amount,note,at\n" + csv_rows(range(1, 4)))
    config = {"paths": ["landing/*.csv"], "format": "csv", "move_to": "done"}
    batches = drain(source_task(tmp_path, **config))  # committed() never called: a crash after the commit
    assert path.exists()
    offsets = batches[-1].source_offsets

    async def again() -> list[Batch]:
        task = source_task(tmp_path, **config)
        await task.open(offsets)
        out = []
        while (batch := await task.poll()) is not None:
            out.append(batch)
        await task.close()
        return out

    assert asyncio.run(again()) == []  # not read again...
    assert not path.exists() and (tmp_path / "done" / "x.csv").exists()  # ...but moved

    # committed() moves a file only once the offsets saying it is done are durable, and
    # not if it was replaced in the meantime.
    write(tmp_path / "landing" / "y.csv", "id,amount,note,at\n" + csv_rows(range(1, 3)))
    write(tmp_path / "landing" / "z.csv", "id,amount,note,at\n" + csv_rows(range(1, 3)))

    async def with_commits() -> None:
        task = source_task(tmp_path, **{**config, "batch_size": 1})
        await task.open({})
        first = await task.poll()
        await task.committed(first.source_offsets)  # y not done yet: stays
        assert (tmp_path / "landing" / "y.csv").exists()
        while (batch := await task.poll()) is not None:
            if str(tmp_path / "landing" / "z.csv") in batch.source_offsets:
                write(tmp_path / "landing" / "z.csv", "id,amount,note,at\n")  # replaced before the commit
            await task.committed(batch.source_offsets)
        await task.close()

    asyncio.run(with_commits())
    assert not (tmp_path / "landing" / "y.csv").exists() and (tmp_path / "done" / "y.csv").exists()
    assert (tmp_path / "landing" / "z.csv").exists() and not (tmp_path / "done" / "z.csv").exists()


# -- conversions -----------------------------------------------------------------------------

TYPES = {
    "type": "record",
    "name": "Typed",
    "fields": [
        {"name": "flag", "type": "boolean"},
        {"name": "small", "type": ["null", "int"], "default": None},
        {"name": "big", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "blob", "type": "bytes"},
        {"name": "either", "type": ["null", "int", "string"], "default": None},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "with_default", "type": "int", "default": 7, "aliases": ["wd"]},
        {"name": "absent", "type": ["null", "string"]},
    ],
}


def test_csv_cells_are_converted_per_field_type_and_bad_cells_are_errors_naming_the_column(tmp_path: Path) -> None:
    header = "flag,small,big,f,day,us,price,kind,blob,either,tags,wd,extra\n"
    good = [
        'YES,,9000000000,1.5,2024-02-29,2024-05-01T12:00:00.123456+01:00,12.5,A,hi,42,"[""x""]",,ignored',
        'false,-5,0,-0.25,2024-01-01,1714564800000000,0.01,B,,word,[],3,',
    ]
    bad = [
        ("maybe,1,1,1,2024-01-01,0,1,A,,,[],1,", "flag", "'maybe' is not a boolean (true/false, 1/0, yes/no)"),
        ("true,2147483648,1,1,2024-01-01,0,1,A,,,[],1,", "small", "'2147483648' is out of range for an int (-2147483648..2147483647)"),
        ("true,1,1.0,1,2024-01-01,0,1,A,,,[],1,", "big", "'1.0' is not a long"),
        ("true,1,1,1e39,2024-01-01,0,1,A,,,[],1,", "f", "'1e39' is out of range for a float"),
        ("true,1,1,1,2024-02-30,0,1,A,,,[],1,", "day", "'2024-02-30' is not a date (ISO 8601, YYYY-MM-DD)"),
        ("true,1,1,1,2024-01-01,0,1.005,A,,,[],1,", "price", "'1.005' has more than 2 decimal places (decimal(6,2))"),
        ("true,1,1,1,2024-01-01,0,10000,A,,,[],1,", "price", "'10000' has more than 6 digits (decimal(6,2))"),
        ("true,1,1,1,2024-01-01,0,1,C,,,[],1,", "kind", "'C' is not one of A, B"),
        ("true,1,,1,2024-01-01,0,1,A,,,[],1,", "big", "empty, but the field is a long (not nullable, no default)"),
        ("true,1,1,1,2024-01-01,0,1,A,,,[oops,1,", "tags", "'[oops' is not a JSON array"),
        ("true,1,1,1,2024-01-01,0,1,A,,,[],x,", "wd", "'x' is not an int"),
    ]
    write(tmp_path / "t.csv", header + "\n".join(good + [b for b, _, _ in bad]) + "\ntrue,1\n")
    (batch,) = drain(source_task(tmp_path, TYPES, paths=["t.csv"], format="csv"))
    assert batch.rows == [
        {
            "flag": True, "small": None, "big": 9_000_000_000, "f": 1.5, "day": dt.date(2024, 2, 29),
            "us": dt.datetime(2024, 5, 1, 11, 0, 0, 123456, tzinfo=UTC), "price": decimal.Decimal("12.50"),
            "kind": "A", "blob": b"hi", "either": 42, "tags": ["x"], "absent": None,
        },  # an empty cell with a default: the field is left out and the encoder writes the default
        {
            "flag": False, "small": -5, "big": 0, "f": -0.25, "day": dt.date(2024, 1, 1),
            "us": dt.datetime(2024, 5, 1, 12, tzinfo=UTC), "price": decimal.Decimal("0.01"),
            "kind": "B", "blob": b"", "either": "word", "tags": [], "with_default": 3, "absent": None,
        },
    ]
    path = tmp_path / "t.csv"
    assert [(e.position, e.field, e.error) for e in batch.errors] == [
        (f"{path}:{4 + i}", column, f"column {column!r}: {message}") for i, (_, column, message) in enumerate(bad)
    ] + [(f"{path}:{4 + len(bad)}", None, "the row has 2 cells, the header has 13")]
    assert batch.errors[0].record == bad[0][0]


def test_a_required_column_missing_from_a_csv_header_is_an_error_on_each_row(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", "id,note\n1,x\n2,y\n")
    (batch,) = drain(source_task(tmp_path, paths=["a.csv"], format="csv"))
    assert batch.rows == []
    assert [(e.position.rsplit(":", 1)[1], e.field) for e in batch.errors] == [("2", "amount"), ("3", "amount")]
    assert "column 'amount' is missing from the header" in batch.errors[0].error


def test_jsonl_and_parquet_values_are_fitted_where_json_or_parquet_cannot_say_the_type(tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "id", "type": "int"},
            {"name": "at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
            {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        ],
    }
    write(
        tmp_path / "a.jsonl",
        '{"id": 1, "at": "2024-05-01T00:00:00+02:00", "price": 1.5}\n\n'
        '{"id": 2, "at": null, "price": "3"}\nnot json\n[1]\n{"id": 3, "at": "yesterday", "price": 1}\n',
    )
    (batch,) = drain(source_task(tmp_path, schema, paths=["a.jsonl"], format="jsonl"))
    assert batch.rows == [
        {"id": 1, "at": dt.datetime(2024, 4, 30, 22, tzinfo=UTC), "price": decimal.Decimal("1.50")},
        {"id": 2, "at": None, "price": decimal.Decimal("3.00")},
    ]
    path = tmp_path / "a.jsonl"
    assert [(e.position, e.field) for e in batch.errors] == [(f"{path}:4", None), (f"{path}:5", None), (f"{path}:6", "at")]
    assert batch.errors[2].error == "field 'at': 'yesterday' is not a timestamp (ISO 8601)"
    assert list(batch.positions) == [f"{path}:1", f"{path}:3"]

    write(tmp_path / "bad.parquet", "not parquet at all")
    write_parquet(tmp_path / "good.parquet", [1, 2])
    batches = drain(source_task(tmp_path, paths=["*.parquet"], format="parquet"))
    errors = [e for b in batches for e in b.errors]
    assert [e.position for e in errors] == [str(tmp_path / "bad.parquet")]
    assert "not a readable Parquet file" in errors[0].error
    assert rows_of(batches)[0] == {"id": 1, "amount": 1.25, "note": None, "at": dt.datetime(2024, 5, 2, 8, 0, 1, tzinfo=UTC)}
    assert batches[-1].source_offsets[str(tmp_path / "bad.parquet")]["done"] is True


def test_http_log_files_are_parsed_by_the_http_log_parser(tmp_path: Path) -> None:
    write(
        tmp_path / "logs" / "access.log",
        '192.0.2.1 - alice [10/Oct/2023:13:55:36 -0700] "GET /a?b=1 HTTP/1.1" 200 2326 1500\n'
        "garbage\n"
        '192.0.2.2 - - [10/Oct/2023:13:55:37 -0700] "POST /b HTTP/2.0" 404 - 20\n',
    )
    fmt = '%h %l %u %t "%r" %>s %b %D'
    (batch,) = drain(source_task(tmp_path, avro_schema_for(fmt), paths=["logs/*.log"], format="http_log", log_format=fmt))
    assert [(r["remote_host"], r["user"], r["path"], r["status"], r["bytes"], r["duration_us"], r["timestamp"]) for r in batch.rows] == [
        ("192.0.2.1", "alice", "/a?b=1", 200, 2326, 1500, dt.datetime(2023, 10, 10, 20, 55, 36, tzinfo=UTC)),
        ("192.0.2.2", None, "/b", 404, None, 20, dt.datetime(2023, 10, 10, 20, 55, 37, tzinfo=UTC)),
    ]
    path = tmp_path / "logs" / "access.log"
    assert [(e.position, e.record) for e in batch.errors] == [(f"{path}:2", "garbage")]
    assert list(batch.positions) == [f"{path}:1", f"{path}:3"]


def test_the_files_source_declares_the_http_log_schema_and_nothing_for_other_formats(tmp_path: Path) -> None:
    def produces(**config: Any) -> dict | None:
        return FilesSource(FilesSource.Config.parse({"paths": ["x"], **config}), context(tmp_path)).produces()

    http_log = HttpLogSource(HttpLogSource.Config.parse({"paths": ["x"]}), context(tmp_path))
    assert produces(format="http_log") == avro_schema_for("combined") == http_log.produces()
    custom = '%h %l %u %t "%r" %>s %b %D "%{X-Forwarded-For}i"'
    assert produces(format="http_log", log_format=custom) == avro_schema_for(custom)
    assert "duration_us" in [f["name"] for f in produces(format="http_log", log_format=custom)["fields"]]
    assert produces(format="http_log", log_format="common") == avro_schema_for("common")
    for fmt in ("csv", "jsonl", "parquet"):
        assert produces(format=fmt) is None, fmt


def test_config_is_checked_with_every_problem_named() -> None:
    with pytest.raises(ConfigError) as err:
        FilesSource.Config.parse(
            {"paths": [], "format": "jsonl", "delimiter": ";;", "log_format": "%Q", "encoding": "utf-16", "identity": "inode"}
        )
    keys = sorted(k for k, _ in err.value.problems)
    assert keys == ["delimiter", "delimiter", "encoding", "identity", "log_format", "log_format", "paths"]
    with pytest.raises(ConfigError, match="format"):
        FilesSource.Config.parse({"paths": ["*.csv"]})
    config = FilesSource.Config.parse({"paths": ["*.tsv"], "format": "csv", "delimiter": "\t"})
    assert (config.identity, config.batch_size, config.move_to, config.encoding) == ("stat", 5000, None, "utf-8")


def test_a_damaged_gz_delivers_what_precedes_the_damage_and_one_error(tmp_path: Path) -> None:
    packed = gzip.compress(("id,amount,note,at\n" + csv_rows(range(1, 2001))).encode())
    write(tmp_path / "in.csv.gz", "")
    (tmp_path / "in.csv.gz").write_bytes(packed[: len(packed) // 2])
    batches = drain(source_task(tmp_path, paths=["*.gz"], format="csv", batch_size=500))
    ids = [r["id"] for r in rows_of(batches)]
    assert 0 < len(ids) < 2000 and ids == list(range(1, len(ids) + 1))
    (error,) = [e for b in batches for e in b.errors]
    assert error.position == str(tmp_path / "in.csv.gz") and "cannot read past line" in error.error
    assert batches[-1].source_offsets[str(tmp_path / "in.csv.gz")]["done"] is True


def test_wildcard_characters_in_the_spec_directory_name_are_not_a_pattern(tmp_path: Path) -> None:
    home = tmp_path / "exports [eu]*"
    write(home / "in" / "a.jsonl", json.dumps({"id": 1, "amount": 1.0, "at": 0}) + "\n")
    batches = drain(source_task(home, paths=["in/*.jsonl"], format="jsonl"))
    assert [r["id"] for r in rows_of(batches)] == [1]
    assert list(batches[0].source_offsets) == [str(home / "in" / "a.jsonl")]
