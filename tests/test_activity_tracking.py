"""The flagship job as the README runs it: the bundled access logs through
pipelines/activity-tracking.yaml, read back with DuckDB."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_cli
from tests.kafka_broker import CONSUMER

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "pipelines" / "logs"

# An independent reading of the combined format, for the line counts.
COMBINED = re.compile(r'^(\S+) (\S+) (\S+) \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "([^"\\]*(?:\\.[^"\\]*)*)" (\d{3}) (\d+|-) "([^"\\]*(?:\\.[^"\\]*)*)" "([^"\\]*(?:\\.[^"\\]*)*)"$')


def bundled_lines() -> list[str]:
    lines = []
    for path in sorted(LOGS.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    return lines


@pytest.mark.parametrize("broker", ["embedded", pytest.param("kafka", marks=pytest.mark.slow)])
def test_bundled_logs_land_in_parquet_once_and_malformed_lines_in_the_dlq(tmp_path: Path, broker: str, request) -> None:
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    if broker == "kafka":  # the same spec on a real Kafka-protocol broker
        bootstrap = request.getfixturevalue("kafka").bootstrap
        env["PIPELINE_BROKER"] = json.dumps({"kafka": {"bootstrap_servers": bootstrap, "consumer": CONSUMER}})
    spec = REPO / "pipelines" / "activity-tracking.yaml"
    result = run_cli("run", spec, "--once", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/out/activity" in result.stderr, "the summary says where the Parquet files are"

    lines = bundled_lines()
    good = [l for l in lines if COMBINED.match(l)]
    bad = [l for l in lines if not COMBINED.match(l)]
    assert bad, "the sample should hold malformed lines"

    glob = f"{tmp_path}/out/activity/**/*.parquet"
    total, hosts = duckdb.connect().execute(f"select count(*), count(distinct remote_host) from read_parquet('{glob}')").fetchone()
    assert total == len(good) and hosts > 100
    per_hour = duckdb.connect().execute(
        f"select dt, hour, count(*) from read_parquet('{glob}', hive_partitioning=true) group by all"
    ).fetchall()
    assert len(per_hour) >= 3 and sum(n for *_, n in per_hour) == len(good)
    sample = duckdb.connect().execute(f"select status, bytes, timestamp, method from read_parquet('{glob}') where method = 'GET' limit 1").fetchone()
    assert isinstance(sample[0], int) and sample[3] == "GET"

    dlq = run_cli("consume", "activity-dlq", "--from-beginning", "--spec", spec, env=env)
    letters = [json.loads(l) for l in dlq.stdout.splitlines()]
    assert sorted(d["record"] for d in letters) == sorted(bad)
    assert all(re.search(r"access\.log[.\w]*:\d+$", d["position"]) for d in letters)

    # The sink's consumer group has committed everything it wrote: no lag after a clean stop.
    described = run_cli("topics", "describe", "activity", "--json", "--spec", spec, env=env)
    assert [g["lag"] for g in json.loads(described.stdout)["groups"].values()] == [0], described.stdout

    # Exactly once: a second run adds nothing.
    again = run_cli("run", spec, "--once", env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == len(good)
    assert not list((tmp_path / "out").rglob("*.tmp"))


@pytest.mark.slow
def test_kill_9_five_times_during_a_300k_line_run_leaves_each_line_once(tmp_path: Path) -> None:
    import collections
    import datetime as dt
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import pipeline_exe

    count = 300_000
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(count),
         "--out", str(tmp_path / "logs"), "--rotate", "1", "--malformed-every", "0", "--seed", "9"],
        check=True,
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: kill-activity
topics:
  activity: {{partitions: 4, schema: {json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log*"], batch_size: 5000}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 8000, max_open_seconds: 0}}}}
"""
    )
    glob = f"{tmp_path}/lake/activity/**/*.parquet"

    def visible() -> int:
        files = list((tmp_path / "lake").rglob("*.parquet")) if (tmp_path / "lake").exists() else []
        return duckdb.connect().execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] if files else 0

    rng = random.Random(7)
    for kill in range(5):
        proc = subprocess.Popen([pipeline_exe(), "run", str(spec), "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.8, 3.0))  # random moments: startup, mid-source, mid-file, rename
        if proc.poll() is not None:
            break  # finished before this kill: nothing left to interrupt
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    final = run_cli("run", spec, "--once", timeout=300)
    assert final.returncode == 0, final.stderr

    # Every line exactly once: the multiset of lines read independently from the logs
    # equals the multiset of rows in Parquet.
    expected: collections.Counter = collections.Counter()
    millis: dict[str, int] = {}  # each distinct time stamp parsed once
    for path in sorted((tmp_path / "logs").iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                m = COMBINED.match(line.rstrip("\n"))
                assert m, line
                if (text := m.group(4)) not in millis:
                    millis[text] = int(dt.datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").timestamp() * 1000)
                expected[(m.group(1), millis[text], m.group(5), int(m.group(6)))] += 1
    rows = duckdb.connect().execute(
        f"select remote_host, epoch_ms(timestamp), request, status, count(*) from read_parquet('{glob}') group by all"
    ).fetchall()
    got = collections.Counter({(h, ts, req, st): n for h, ts, req, st, n in rows})
    assert sum(got.values()) == count == visible()
    assert got == expected
    assert not list((tmp_path / "lake").rglob("*.tmp"))


def test_follow_mode_survives_rename_and_copytruncate_rotation(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    from tests.conftest import pipeline_exe

    logs = tmp_path / "logs"
    logs.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: follow-activity
topics:
  activity: {{partitions: 2, schema: {json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log*"], follow: true, poll_interval: 0.1}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, max_open_seconds: 0}}}}
"""
    )
    glob = f"{tmp_path}/lake/activity/**/*.parquet"
    counter = iter(range(1_000_000))

    def append(path: Path, n: int) -> None:
        with open(path, "a") as f:
            for _ in range(n):
                i = next(counter)
                f.write(f'10.0.{i % 250}.{i % 7} - - [20/Nov/2026:10:00:00 +0000] "GET /item/{i} HTTP/1.1" 200 {i} "-" "test"\n')

    def landed() -> list[int]:
        if not list((tmp_path / "lake").rglob("*.parquet")):
            return []
        return [r[0] for r in duckdb.connect().execute(f"select bytes from read_parquet('{glob}')").fetchall()]

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 20
        while len(landed()) < n and time.monotonic() < deadline:
            time.sleep(0.2)

    log = logs / "access.log"
    append(log, 300)
    proc = subprocess.Popen([pipeline_exe(), "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(300)
        append(log, 200)
        log.rename(logs / "access.log.1")  # rotation by rename; the old file gets a last line
        append(logs / "access.log.1", 1)
        append(log, 250)  # a new access.log
        wait_for(751)
        append(log, 100)
        wait_for(851)
        with open(log, "r+") as f:  # copytruncate: copy elsewhere (outside the globs), truncate
            (tmp_path / "copied.log").write_text(f.read())
            f.truncate(0)
        append(log, 150)
        wait_for(1001)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    got = landed()
    assert sorted(got) == list(range(1001)), f"missing {sorted(set(range(1001)) - set(got))[:10]}, twice: {len(got) - len(set(got))}"


def test_quiet_input_still_lands_when_the_open_file_ages_out(tmp_path: Path) -> None:
    """The parquet sink holds records until a file is rotated; with no further input the
    engine keeps flushing, so `max_open_seconds` lands them."""
    import signal
    import subprocess
    import time

    from tests.conftest import pipeline_exe

    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "access.log", "w") as f:
        for i in range(100):
            f.write(f'10.0.0.{i % 9} - - [20/Nov/2026:10:00:00 +0000] "GET /q/{i} HTTP/1.1" 200 {i} "-" "test"\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""\
name: quiet
topics:
  activity: {{partitions: 2, schema: {json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/access.log"], follow: true}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, max_open_seconds: 2}}}}
"""
    )
    proc = subprocess.Popen([pipeline_exe(), "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not list((tmp_path / "lake").rglob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.2)
        files = list((tmp_path / "lake").rglob("*.parquet"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert files, "buffered records never landed while the input was quiet"
    glob = f"{tmp_path}/lake/activity/**/*.parquet"
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == 100
