"""The flagship job as the README runs it: the bundled access logs through
pipelines/activity-tracking.yaml, read back with DuckDB."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import duckdb

from tests.conftest import run_cli

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


def test_bundled_logs_land_in_parquet_once_and_malformed_lines_in_the_dlq(tmp_path: Path) -> None:
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    spec = REPO / "pipelines" / "activity-tracking.yaml"
    result = run_cli("run", spec, "--once", env=env, timeout=300)
    assert result.returncode == 0, result.stderr

    lines = bundled_lines()
    good = [l for l in lines if COMBINED.match(l)]
    bad = [l for l in lines if not COMBINED.match(l)]
    assert bad, "the sample should hold malformed lines"

    glob = f"{tmp_path}/out/activity/**/*.parquet"
    total, hosts = duckdb.execute(f"select count(*), count(distinct remote_host) from read_parquet('{glob}')").fetchone()
    assert total == len(good) and hosts > 100
    per_hour = duckdb.execute(
        f"select dt, hour, count(*) from read_parquet('{glob}', hive_partitioning=true) group by all"
    ).fetchall()
    assert len(per_hour) >= 3 and sum(n for *_, n in per_hour) == len(good)
    sample = duckdb.execute(f"select status, bytes, timestamp, method from read_parquet('{glob}') where method = 'GET' limit 1").fetchone()
    assert isinstance(sample[0], int) and sample[3] == "GET"

    dlq = run_cli("consume", "activity-dlq", "--from-beginning", "--spec", spec, env=env)
    letters = [json.loads(l) for l in dlq.stdout.splitlines()]
    assert sorted(d["record"] for d in letters) == sorted(bad)
    assert all(re.search(r"access\.log[.\w]*:\d+$", d["position"]) for d in letters)

    # Exactly once: a second run adds nothing.
    again = run_cli("run", spec, "--once", env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert duckdb.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == len(good)
    assert not list((tmp_path / "out").rglob("*.tmp"))
