"""Source tasks shared by the processes of a pipeline on Kafka, exactly once from the log
file to Parquet when the process running the source is killed (kill -9) mid-run, on a
real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import QUICK_ROUNDS, Tansu

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))
FILE = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")
# The independent reading of the log: host, the request line and the status of each line.
LINE = re.compile(r'^(\S+) \S+ \S+ \[[^\]]+\] "([^"]*)" (\d{3}) ')


def topic_records(bootstrap: str, topic: str, partitions: int) -> list[tuple[int, int, bytes]]:
    """Every record of the topic as (partition, offset, value), read by a plain aiokafka
    consumer outside any group, up to the end of each partition (taken once the writers
    have stopped)."""

    async def main() -> list[tuple[int, int, bytes]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            # On Tansu the listed end is a lower bound (the last batch's base offset + 1):
            # past it, the last batch was fetched; what is left of it comes before the
            # first empty answer.
            ends = await consumer.end_offsets(tps)
            out: list[tuple[int, int, bytes]] = []
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, f"reading {topic} did not reach its end {ends}"
                got = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for tp, records in got.items():
                    out += [(tp.partition, r.offset, r.value) for r in records]
                if not got and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    return out
        finally:
            await consumer.stop()

    return asyncio.run(main())


def parquet_rows(lake: Path, seen: dict[Path, int]) -> int:
    """Rows in the Parquet files under `lake` so far, from each file's footer (files appear
    whole, by rename, and never change: `seen` keeps the counts of those already read)."""
    for path in lake.rglob("*.parquet"):
        if path not in seen:
            seen[path] = pq.read_metadata(path).num_rows
    return sum(seen.values())


@pytest.mark.slow
def test_the_source_task_moves_to_the_other_process_after_kill_9_and_every_line_lands_once(tmp_path: Path, kafka: Tansu) -> None:
    count, malformed_every = 300_000, 1000
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(count),
         "--out", str(tmp_path / "logs"), "--rotate", "0", "--malformed-every", str(malformed_every), "--seed", "7"],
        check=True,
    )
    log_lines = (tmp_path / "logs" / "access.log").read_text().splitlines()
    # (The generator writes a malformed line at every `malformed_every`-th place.)
    well_formed = [line for n, line in enumerate(log_lines) if n % malformed_every != malformed_every - 1]
    expected = Counter(LINE.match(line).groups() for line in well_formed)
    bad = count // malformed_every
    good = count - bad
    broker = json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": QUICK_ROUNDS}})
    # The activity-tracking job: one source task and one sink, run by two processes at once.
    (tmp_path / "spec.yaml").write_text(f"""\
name: shared
broker: {broker}
topics:
  activity: {{partitions: 6, schema: {SCHEMA}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log"], batch_size: 2000}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 5000, max_open_seconds: 0}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
""")

    def start(name: str) -> subprocess.Popen:
        err = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(
            [pipeline_exe(), "--debug", "run", str(tmp_path / "spec.yaml")],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ},
        )

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    def runs_source(name: str) -> bool:
        text = log(name)
        return text.rfind("logs: task 0 started here") > text.rfind("logs: task 0 stopped here")

    seen: dict[Path, int] = {}

    def landed() -> int:  # checked every 0.2 s: cheap (the end is checked with duckdb below)
        return parquet_rows(tmp_path / "lake", seen)

    def wait(until, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            time.sleep(0.2)
        return bool(until())

    procs = {"a": start("a"), "b": start("b")}
    try:
        # Both join the groups; one of them is given the source task. Once both have their
        # share of the sink's partitions and the source has written some of the log, kill
        # the process that runs the source.
        assert wait(lambda: all(re.search(r"lake: assigned \S", log(n)) for n in procs) and landed() > 0, 60), log("a")[-3000:] + log("b")[-3000:]
        owner = next((n for n in procs if runs_source(n)), None)
        assert owner is not None, log("a")[-3000:] + log("b")[-3000:]
        other = "b" if owner == "a" else "a"
        os.kill(procs[owner].pid, signal.SIGKILL)
        procs[owner].wait(10)
        killed_at = landed()
        # The group notices after the session timeout; the other process starts the source
        # task from its stored offsets, skipping what the killed one wrote after them.
        assert wait(lambda: runs_source(other), 60), log(other)[-3000:]
        assert wait(lambda: landed() >= good, 120), (landed(), log(other)[-3000:])
        procs[other].send_signal(signal.SIGTERM)
        assert procs[other].wait(30) == 0, log(other)[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert 0 < killed_at < good, "the kill should land mid-run"
    # The topics hold every record once: the good lines in `activity`, the malformed ones in
    # the dead-letter topic.
    records = topic_records(kafka.bootstrap, "activity", 6)
    assert len(records) == good
    assert len(topic_records(kafka.bootstrap, "activity-dlq", 1)) == bad
    # Parquet: every line once, as an independent reading of the log has it.
    rows = duckdb.connect().execute(
        f"select remote_host, request, status from read_parquet('{tmp_path}/lake/activity/**/*.parquet')"
    ).fetchall()
    assert Counter((h, r, str(s)) for h, r, s in rows) == expected
    # And per partition the files' offset ranges tile 0..end: no gap, no overlap.
    # (A range written in pieces, one per output directory, names each piece "+NofM".)
    ranges: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for f in (tmp_path / "lake").rglob("*.parquet"):
        m = FILE.match(f.name)
        assert m, f.name
        ranges[int(m.group(1))].add((int(m.group(2)), int(m.group(3))))
    ends = Counter(p for p, _, _ in records)
    for partition, spans in ranges.items():
        nxt = 0
        for first, last in sorted(spans):
            assert first == nxt, (partition, sorted(spans))
            nxt = last + 1
        assert nxt == ends[partition]
    # (Whether the kill left records after the last checkpoint depends on its moment; the
    # writer's own tests in tests/broker/test_kafka_sources.py make sure of both cases.)
