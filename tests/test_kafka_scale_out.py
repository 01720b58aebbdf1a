"""Several `pipeline run` processes of one spec share its work on Kafka (issue 18), on a
real Kafka-protocol broker (Tansu): source tasks and sink partitions spread over the
processes, `--once` runs end together with the output complete, and a process on
another spec is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import duckdb
import pytest

from tests.conftest import pipeline_exe
from tests.kafka_broker import QUICK_ROUNDS, Tansu

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))
FILE = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")


# (follows the spec's sinks: one more sink, then the processors)
CHAINED = """\
  - {name: hosts-lake, connector: parquet, topics: [per-host], config: {path: hosts, partition_by: window_start}}
processors:
  - {name: gets, from: activity, to: gets, where: "method == 'GET'"}
  - {name: hosts, from: gets, to: per-host, key: [remote_host], time: timestamp, window: {tumbling: 1h},
     grace: 30d, aggregate: {views: count()}}
"""


def write_logs(root: Path, files: int, lines: int) -> None:
    for i in range(files):
        subprocess.run(
            [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(lines),
             "--out", str(root / "logs" / f"host{i}"), "--rotate", "0", "--malformed-every", "0", "--seed", str(i)],
            check=True,
        )


def spec(kafka: Tansu, *, tasks: int = 4, batch_size: int = 5000, extra: str = "") -> str:
    broker = json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": QUICK_ROUNDS}})
    return f"""\
name: scale
broker: {broker}
topics:
  activity: {{partitions: 4, schema: {SCHEMA}, key: remote_host}}
sources:
  - {{name: logs, connector: files, topic: activity, tasks: {tasks},
     config: {{paths: ["logs/*/access.log"], format: http_log, batch_size: {batch_size}}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake}}}}
{extra}"""


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [pipeline_exe(), "--debug", "run", str(tmp_path / "scale.yaml"), *args],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "w"), env={**os.environ},
    )


def check_exactly_once(lake: Path, count: int) -> list[int]:
    """Every record once: the Parquet files' offset ranges tile each partition from 0,
    and DuckDB reads `count` rows. Returns the partitions found."""
    ranges: dict[int, set[tuple[int, int]]] = defaultdict(set)  # (a flush over two hours: two parts, one range)
    for f in lake.rglob("*.parquet"):
        m = FILE.match(f.name)
        assert m, f.name
        ranges[int(m.group(1))].add((int(m.group(2)), int(m.group(3))))
    total = 0
    for partition, spans in ranges.items():
        expected = 0
        for first, last in sorted(spans):
            assert first == expected, (partition, sorted(spans))
            expected = last + 1
        total += expected
    assert total == count
    rows = duckdb.connect().execute(f"select count(*) from read_parquet('{lake}/**/*.parquet')").fetchone()[0]
    assert rows == count
    return sorted(ranges)


@pytest.mark.slow
def test_two_workers_with_once_split_the_files_and_end_together_with_everything_written(
        tmp_path: Path, kafka: Tansu) -> None:
    lines = 20_000
    write_logs(tmp_path, 4, lines)
    # Two processors, one feeding the other (their tasks shared too): each ends when the
    # group knows what feeds it ended, wherever that ran.
    (tmp_path / "scale.yaml").write_text(spec(kafka, extra=CHAINED).replace(
        "topics:\n", "topics:\n  gets: {partitions: 2}\n  per-host: {partitions: 4}\n", 1))
    workers = [start(tmp_path, f"w{i}", "--once") for i in range(2)]
    try:
        codes = [w.wait(120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    check_exactly_once(tmp_path / "lake", 4 * lines)
    db = duckdb.connect()
    gets = db.execute(f"select count(*) from read_parquet('{tmp_path}/lake/activity/**/*.parquet') "
                      "where method = 'GET'").fetchone()[0]
    views = db.execute(f"select sum(views) from read_parquet('{tmp_path}/hosts/**/*.parquet')").fetchone()[0]
    assert 0 < gets == views
    # Both took part: each ran some of the four file tasks, or some sink partitions.
    for log in logs:
        assert re.search(r"logs: task \d started here", log) or re.search(r"lake: (assigned|took) activity", log)
    started = [int(i) for log in logs for i in re.findall(r"logs: task (\d) started here", log)]
    assert set(started) == {0, 1, 2, 3}
    # The first to find the group empty read its tasks ahead while the group formed, and
    # kept what it read for the tasks it was given (the rest thrown away: nothing doubled).
    assert re.search(r"logs: task \d read [\d,]+ record\(s\) ahead", logs[0] + logs[1])
    # Who runs what is logged at each assignment, naming every process.
    assert re.search(r"source-tasks: \S+ runs logs/\d.*; \S+ runs", logs[0] + logs[1])


@pytest.mark.slow
def test_a_process_on_another_spec_is_refused_naming_the_difference(tmp_path: Path, kafka: Tansu) -> None:
    write_logs(tmp_path, 1, 10)
    (tmp_path / "scale.yaml").write_text(spec(kafka, tasks=2))
    first = start(tmp_path, "first")
    try:
        deadline = time.monotonic() + 60
        while "logs: task 0 started here" not in (tmp_path / "first.log").read_text():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        other = tmp_path / "other"
        other.mkdir()
        (other / "scale.yaml").write_text(spec(kafka, tasks=2, batch_size=100))
        refused = subprocess.run([pipeline_exe(), "run", str(other / "scale.yaml")], capture_output=True, text=True,
                                 timeout=90)
        assert refused.returncode != 0
        assert re.search(r"another process in group '\S+' runs a different spec of this pipeline", refused.stderr)
        assert "differs in source 'logs'" in refused.stderr
        assert first.poll() is None, "the first process runs on"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
