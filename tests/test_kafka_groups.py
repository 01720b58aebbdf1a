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
from pathlib import Path

import duckdb
import pytest

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import QUICK_ROUNDS, Tansu
from tests.test_kafka_scale_out import check_exactly_once

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))


def broker(kafka: Tansu, **consumer) -> str:
    return json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": {**QUICK_ROUNDS, **consumer}}})


def fill(tmp_path: Path, kafka: Tansu, count: int, partitions: int, seed: int) -> None:
    """An access log of `count` lines in the topic `activity` (a spec of its own, run once)."""
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(count),
         "--out", str(tmp_path / "logs"), "--rotate", "0", "--malformed-every", "0", "--seed", str(seed)],
        check=True,
    )
    (tmp_path / "fill.yaml").write_text(f"""\
name: fill
broker: {broker(kafka)}
topics:
  activity: {{partitions: {partitions}, schema: {SCHEMA}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log"]}}}}
""")
    filled = run_cli("run", tmp_path / "fill.yaml", "--once", timeout=120)
    assert filled.returncode == 0, filled.stderr


@pytest.mark.slow
def test_two_processes_share_partitions_and_one_takes_over_after_kill_9(tmp_path: Path, kafka: Tansu) -> None:
    count = 300_000  # enough that the first member is still writing when the second joins (~3 s on Tansu)
    # One spec fills the 6-partition topic; the other, run twice at once, lands it in Parquet.
    fill(tmp_path, kafka, count, partitions=6, seed=4)
    # Small fetches and files of 500 rows slow the sinks down, so that the kill below
    # lands while they still write.
    (tmp_path / "lake.yaml").write_text(f"""\
name: lake
broker: {broker(kafka, max_partition_fetch_bytes=16384)}
topics:
  activity: {{partitions: 6, schema: {SCHEMA}, key: remote_host}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 500, max_open_seconds: 0}}}}
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
    assert check_exactly_once(tmp_path / "lake", count) == list(range(6))
    assert not list((tmp_path / "lake").rglob("*.tmp"))
    second_log = (tmp_path / "second.log").read_text()
    held = {int(p) for line in re.findall(r"lake: (?:assigned|took) (.*)", second_log) for p in re.findall(r"activity\[(\d)\]", line)}
    assert held == set(range(6)), "the second process took over every partition after the kill"


@pytest.mark.slow
def test_a_process_giving_partitions_up_writes_the_ones_it_keeps_without_a_gap(tmp_path: Path, kafka: Tansu) -> None:
    """The parquet sink reopens every partition it is given (dropping rows held in open
    files): after giving half up, the process must read its kept partitions again from
    where their files end. (It used to go on from where it was: the held rows were lost.)"""
    count = 200_000
    fill(tmp_path, kafka, count, partitions=4, seed=5)
    # Files of 8,000 rows, slow fetches: when the second process joins, the first holds
    # rows of every partition in open files.
    (tmp_path / "lake.yaml").write_text(f"""\
name: lake
broker: {broker(kafka, max_partition_fetch_bytes=4096)}
topics:
  activity: {{partitions: 4, schema: {SCHEMA}, key: remote_host}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 8000, max_open_seconds: 5}}}}
""")

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([pipeline_exe(), "--debug", "run", str(tmp_path / "lake.yaml")],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "w"))

    def lag() -> int:
        shown = run_cli("offsets", tmp_path / "lake.yaml", "--json")
        return sum(p["lag"] for sink in json.loads(shown.stdout)["sinks"] for p in sink["partitions"])

    def wait(until, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, what
            time.sleep(0.3)

    first = start("first")
    second = None
    try:
        wait(lambda: "lake: assigned activity" in (tmp_path / "first.log").read_text(), 60, "first assigned")
        second = start("second")
        wait(lambda: "lake: gave up" in (tmp_path / "first.log").read_text(), 60, "first gave up")
        wait(lambda: "lake: took" in (tmp_path / "second.log").read_text(), 60, "second took")
        wait(lambda: lag() == 0, 120, "everything committed")
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
        assert [first.wait(30), second.wait(30)] == [0, 0]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    check_exactly_once(tmp_path / "lake", count)
