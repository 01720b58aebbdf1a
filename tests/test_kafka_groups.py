"""Several `pipeline run` processes of one spec share a topic's partitions through Kafka's
consumer groups, on a real Kafka-protocol broker (Tansu)."""

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

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import CONSUMER, Tansu

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))
FILE = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")


def broker(kafka: Tansu) -> str:
    return json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": CONSUMER}})


@pytest.mark.slow
def test_two_processes_share_partitions_and_one_takes_over_after_kill_9(tmp_path: Path, kafka: Tansu) -> None:
    count = 300_000  # enough that the first member is still writing when the second joins (~3 s on Tansu)
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(count),
         "--out", str(tmp_path / "logs"), "--rotate", "0", "--malformed-every", "0", "--seed", "4"],
        check=True,
    )
    # One spec fills the 6-partition topic; the other, run twice at once, lands it in Parquet.
    (tmp_path / "fill.yaml").write_text(f"""\
name: fill
broker: {broker(kafka)}
topics:
  activity: {{partitions: 6, schema: {SCHEMA}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log"]}}}}
""")
    filled = run_cli("run", tmp_path / "fill.yaml", "--once", timeout=120)
    assert filled.returncode == 0, filled.stderr
    (tmp_path / "lake.yaml").write_text(f"""\
name: lake
broker: {broker(kafka)}
topics:
  activity: {{partitions: 6, schema: {SCHEMA}, key: remote_host}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 2000, max_open_seconds: 0}}}}
""")

    def start(name: str) -> subprocess.Popen:
        err = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(
            [pipeline_exe(), "--debug", "run", str(tmp_path / "lake.yaml")],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ},
        )

    def landed() -> int:
        files = list((tmp_path / "lake").rglob("*.parquet"))
        if not files:
            return 0
        return duckdb.connect().execute(f"select count(*) from read_parquet('{tmp_path}/lake/activity/**/*.parquet')").fetchone()[0]

    def wait(until, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            time.sleep(0.3)

    first = start("first")
    second = None
    try:
        wait(lambda: landed() > 0, 30)
        second = start("second")
        # The second member joins: the first keeps half its partitions, writing on, and
        # gives up the others (flushed and committed) before the second takes them. Kill
        # the first as soon as it gave them up, while its own half is still being written.
        wait(lambda: "lake: gave up" in (tmp_path / "first.log").read_text(), 40)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        killed_at = landed()
        # The group notices the dead member after its session timeout and gives the second
        # process every partition; it resumes each one from the files.
        wait(lambda: landed() >= count, 90)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    assert 0 < killed_at < count, "the kill should land mid-run"
    assert landed() == count
    # Exactly once, per partition: the files' offset ranges tile 0..end with no gap or overlap.
    ranges: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for f in (tmp_path / "lake").rglob("*.parquet"):
        m = FILE.match(f.name)
        assert m, f.name
        ranges[int(m.group(1))].add((int(m.group(2)), int(m.group(3))))
    assert sorted(ranges) == list(range(6))
    total = 0
    for partition, spans in ranges.items():
        expected_first = 0
        for first_offset, last_offset in sorted(spans):
            assert first_offset == expected_first, (partition, sorted(spans))
            expected_first = last_offset + 1
        total += expected_first
    assert total == count
    assert not list((tmp_path / "lake").rglob("*.tmp"))
    second_log = (tmp_path / "second.log").read_text()
    held = {int(p) for line in re.findall(r"lake: (?:assigned|took) (.*)", second_log) for p in re.findall(r"activity\[(\d)\]", line)}
    assert held == set(range(6)), "the second process took over every partition after the kill"
