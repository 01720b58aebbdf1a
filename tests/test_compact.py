"""`pipeline compact` on the parquet sink's output, through the command line, read back
with DuckDB: merges keep every row and each partition's order, a later run resumes exactly
once from merged files, an interrupted compaction is finished by the next open, and a
`--once` run of the activity job writes one file per partition and hour."""

from __future__ import annotations

import collections
import datetime as dt
import json
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^hits\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")
T0 = int(dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc).timestamp() * 1000)
SCHEMA = {
    "type": "record",
    "name": "Hit",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "visitor", "type": "string"},
        {"name": "path", "type": "string"},
    ],
}


def hits(start: int, stop: int) -> list[dict]:
    """In time order, 3 s apart: 1,200 an hour."""
    return [{"id": i, "timestamp": T0 + i * 3000, "visitor": f"v{i % 17}", "path": f"/p/{i % 7}"} for i in range(start, stop)]


def pipeline(tmp_path: Path, rows: list[dict], *, rotate_records: str = "${ROTATE_RECORDS:-100000}", more: str = "") -> Path:
    """input/hits.jsonl → 2-partition topic → parquet under lake/. `pipeline run` below
    passes ROTATE_RECORDS=150, a stream that landed small files; `pipeline compact` runs
    with the spec's default, 100,000."""
    (tmp_path / "hit.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "input").mkdir(exist_ok=True)
    append(tmp_path, rows)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: hits
topics:
  hits: {{partitions: 2, schema: hit.avsc, key: visitor}}
sources:
  - {{name: in, connector: jsonl, topic: hits, config: {{paths: ["input/*.jsonl"], batch_size: 400}}}}
sinks:
  - name: lake
    connector: parquet
    topics: [hits]
    config:
      path: lake
      rotate_records: {rotate_records}
{more}"""
    )
    return spec


def append(tmp_path: Path, rows: list[dict]) -> None:
    with open(tmp_path / "input" / "hits.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def run_small_files(spec: Path) -> None:
    result = run_cli("run", spec, "--once", env={"ROTATE_RECORDS": "150"})
    assert result.returncode == 0, result.stderr


def compact(spec: Path, *args: str) -> list[str]:
    result = run_cli("compact", spec, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines() + result.stderr.splitlines()


def files(lake: Path) -> list[Path]:
    return sorted(lake.rglob("*.parquet"))


def rows(lake: Path) -> list[tuple]:
    """Every row (with its hour directory), sorted: a multiset to compare."""
    return sorted(
        duckdb.sql(
            f"select id, epoch_ms(timestamp), visitor, path, dt, hour from read_parquet('{lake}/**/*.parquet', "
            "hive_partitioning=true, hive_types={'hour': int})"
        ).fetchall()
    )


def per_partition(lake: Path) -> dict[int, list[int]]:
    """Each partition's ids, file by file in offset order (groups by first offset, the
    files of a group by k), rows in file order: the partition's record order."""
    order = []
    for f in files(lake):
        m = NAME.match(f.name)
        assert m, f.name
        order.append((int(m[1]), int(m[2]), int(m[4] or 1), f))
    out: dict[int, list[int]] = collections.defaultdict(list)
    for p, _, _, f in sorted(order, key=lambda t: t[:3]):
        out[p] += pq.read_table(f, columns=["id"]).column("id").to_pylist()
    return dict(out)


def groups(lake: Path) -> dict[tuple[int, int, int], list[Path]]:
    out: dict[tuple[int, int, int], list[Path]] = collections.defaultdict(list)
    for f in files(lake):
        m = NAME.match(f.name)
        out[(int(m[1]), int(m[2]), int(m[3]))].append(f)
    return out


def test_compact_merges_consecutive_files_and_keeps_every_row_in_order(tmp_path: Path) -> None:
    spec = pipeline(tmp_path, hits(0, 6000))  # 12:00 .. 16:59, 5 hours
    run_small_files(spec)
    lake = tmp_path / "lake" / "hits"
    before, order, count = rows(lake), per_partition(lake), len(files(lake))
    assert all(ids == sorted(ids) for ids in order.values()), "time order is offset order here"
    assert count >= 40

    planned = compact(spec, "--dry-run")
    assert planned and all(line.startswith("lake: would merge ") for line in planned), planned
    assert len(files(lake)) == count, "a dry run changes nothing"

    done = compact(spec, "--sink", "lake")
    assert [line.replace("would merge", "merged") for line in planned] == done
    pattern = re.compile(
        r"^lake: merged (\d+) files of hits\[(\d)\] in (\d) directories dt=2024-05-01/hour=12 \.\. dt=2024-05-01/hour=16 "
        r"into (\d) files hits\+\d\+(\d{20})\+(\d{20})\+<k>of\d\.parquet \(([\d,]+) rows\)$"
    )
    # Time order: each partition's groups form one run over the five hours, merged into
    # one group of a file per hour.
    assert len(done) == 2
    for line in done:
        m = pattern.match(line)
        assert m, line
        assert m[3] == m[4] == "5"
        merged = sorted(lake.rglob(f"hits+{m[2]}+{m[5]}+{m[6]}+*of5.parquet"))
        assert [f.parent.name for f in merged] == [f"hour={h}" for h in range(12, 17)]
        assert sum(pq.read_metadata(f).num_rows for f in merged) == int(m[7].replace(",", ""))
    assert len(files(lake)) == count - sum(int(pattern.match(l)[1]) - 5 for l in done) == 10
    assert not [p for p in lake.rglob("*") if p.name.endswith(".tmp")]

    assert rows(lake) == before, "the same rows"
    assert per_partition(lake) == order, "in the same order within each partition"
    # The groups are still disjoint and cover each partition's offsets without a gap.
    for p in (0, 1):
        ranges = sorted((f, l) for (q, f, l) in groups(lake) if q == p)
        assert ranges[0][0] == 0 and all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
    assert compact(spec) == ["lake: nothing to compact"]


def test_after_compaction_a_run_resumes_exactly_once_from_the_merged_files(tmp_path: Path) -> None:
    spec = pipeline(tmp_path, hits(0, 3000))
    run_small_files(spec)
    assert compact(spec)[0].startswith("lake: merged ")
    lake = tmp_path / "lake" / "hits"

    append(tmp_path, hits(3000, 4500))
    run_small_files(spec)
    assert [r[0] for r in rows(lake)] == list(range(4500)), "no record lost or repeated"
    order = per_partition(lake)
    assert sorted(i for ids in order.values() for i in ids) == list(range(4500))
    assert all(ids == sorted(ids) for ids in order.values())

    # Merged again, new files with the merged ones where they meet in one directory.
    assert compact(spec)
    assert [r[0] for r in rows(lake)] == list(range(4500)) and per_partition(lake) == order
    again = run_cli("run", spec, "--once")  # nothing new: nothing written
    assert again.returncode == 0, again.stderr
    assert [r[0] for r in rows(lake)] == list(range(4500))


def test_a_compaction_cut_between_rename_and_deletions_is_finished_by_the_next_open(tmp_path: Path) -> None:
    spec = pipeline(tmp_path, hits(0, 2400))
    run_small_files(spec)
    lake = tmp_path / "lake" / "hits"
    expected = rows(lake)
    shutil.copytree(lake, tmp_path / "before")
    done = compact(spec)
    assert done

    # The state a crash after the rename leaves: the merged files and (some of) the files
    # they hold. Put back every merged-away file but the first few.
    merged_away = [p for p in (tmp_path / "before").rglob("*.parquet") if not (lake / p.relative_to(tmp_path / "before")).exists()]
    assert len(merged_away) > 4
    for p in sorted(merged_away)[3:]:
        shutil.copy2(p, lake / p.relative_to(tmp_path / "before"))
    # And a temp of a merge cut before its rename.
    some = files(lake)[0]
    shutil.copy2(some, some.with_name(f".hits+0+{0:020d}+{99999:020d}.parquet.tmp"))
    assert len(rows(lake)) > len(expected), "a reader in that moment sees records twice"

    # The next run's open deletes what the compaction had merged, and the temp; then it
    # resumes after the merged files: nothing twice, nothing lost.
    append(tmp_path, hits(2400, 3000))
    run_small_files(spec)
    got = rows(lake)
    assert [r[0] for r in got] == list(range(3000))
    assert got[:2400] == expected
    assert not [p for p in lake.rglob("*") if p.name.endswith(".tmp")]


def test_compact_finishes_an_interrupted_compaction_itself(tmp_path: Path) -> None:
    spec = pipeline(tmp_path, hits(0, 1200))
    run_small_files(spec)
    lake = tmp_path / "lake" / "hits"
    expected = rows(lake)
    shutil.copytree(lake, tmp_path / "before")
    compact(spec)
    for p in (tmp_path / "before").rglob("*.parquet"):
        if not (lake / p.relative_to(tmp_path / "before")).exists():
            shutil.copy2(p, lake / p.relative_to(tmp_path / "before"))
    assert len(rows(lake)) > len(expected)
    planned = compact(spec, "--dry-run")
    assert planned and all(re.match(r"lake: would remove \d+ files of hits\[\d\] in \S+ already merged into ", l) for l in planned)
    done = compact(spec)
    assert done == [l.replace("would remove", "removed") for l in planned]
    assert rows(lake) == expected


def test_nothing_to_compact_and_choosing_sinks(tmp_path: Path) -> None:
    more = "  - {name: copy, connector: jsonl, topics: [hits], config: {path: copy}}\n"
    spec = pipeline(tmp_path, hits(0, 1000), more=more)
    assert compact(spec) == ["lake: nothing to compact", "copy: nothing to compact (its connector does not compact)"]
    result = run_cli("run", spec, "--once")  # default rotation: one file per partition and hour
    assert result.returncode == 0, result.stderr
    lake = tmp_path / "lake" / "hits"
    names = [f.name for f in files(lake)]
    assert compact(spec, "--sink", "lake") == ["lake: nothing to compact"]
    assert compact(spec, "--sink", "lake", "--dry-run") == ["lake: nothing to compact"]
    assert [f.name for f in files(lake)] == names
    unknown = run_cli("compact", spec, "--sink", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr


def test_a_once_run_of_the_activity_job_writes_one_file_per_partition_and_hour(tmp_path: Path) -> None:
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    result = run_cli("run", REPO / "pipelines" / "activity-tracking.yaml", "--once", env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "activity"
    found = collections.Counter()
    for f in out.rglob("*.parquet"):
        m = re.match(r"^activity\+(\d+)\+\d{20}\+\d{20}(?:\+\d+of\d+)?\.parquet$", f.name)
        assert m, f.name
        found[(int(m[1]), f.parent.relative_to(out).as_posix())] += 1
    # The floor with an hourly layout: a file per partition and hour that has records.
    expected = duckdb.connect().execute(
        f"select count(*) from (select distinct regexp_extract(filename, 'activity\\+(\\d+)\\+', 1), dt, hour "
        f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true, filename=true))"
    ).fetchone()[0]
    assert len(found) == expected >= 8
    assert set(found.values()) == {1}, found
