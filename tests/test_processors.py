"""Processors through the CLI: windowed aggregates land in a topic that sinks read, equal
to a DuckDB GROUP BY over the raw records; late and windowless records go to the
dead-letter topic, named; `pipeline validate` names a processor's mistakes by line."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import duckdb

from tests.conftest import pipeline_exe, run_cli

REPO = Path(__file__).resolve().parents[1]


def test_views_per_minute_equal_a_group_by_over_the_raw_parquet(tmp_path: Path) -> None:
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    spec = REPO / "pipelines" / "views-per-minute.yaml"
    ran = run_cli("run", spec, "--once", env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    raw, views = f"{tmp_path}/out/activity/**/*.parquet", f"{tmp_path}/out/views-per-minute/**/*.parquet"
    db = duckdb.connect()
    expected = db.execute(f"""
        select method, status, time_bucket(interval 1 minute, timestamp) as window_start, count(*),
               sum(bytes), count(distinct remote_host), max(bytes)
        from read_parquet('{raw}') where method is not null
        group by all order by all""").fetchall()
    got = db.execute(f"""
        select method, status, window_start, views, bytes, visitors, largest
        from read_parquet('{views}') order by all""").fetchall()
    assert got == expected and len(got) > 100
    ends = db.execute(f"select count(*) from read_parquet('{views}') "
                      "where window_end - window_start <> interval 1 minute").fetchone()[0]
    assert ends == 0
    # The records with no method (request "-") have no group: dead-lettered, named.
    letters = [json.loads(line) for line in run_cli("consume", "activity-dlq", "--from-beginning", "--spec", spec,
                                                    env=env).stdout.splitlines()]
    windowless = [d for d in letters if d["connector"] == "views"]
    nulls = db.execute(f"select count(*) from read_parquet('{raw}') where method is null").fetchone()[0]
    assert len(windowless) == nulls > 0
    assert all(d["field"] == "method" and "group-by field 'method' is null" in d["error"] for d in windowless)
    # A second run has nothing new to read: the processor resumes where its state and offsets are.
    checked = run_cli("validate", spec, env=env)
    assert "1 source(s), 2 sink(s), 1 processor(s), 2 topic(s)" in checked.stdout
    summary = json.loads(run_cli("run", spec, "--once", "--json", env=env).stdout)
    assert [c for c in summary["connectors"] if c["name"] == "views"][0]["read"] == 0  # nothing new: nothing read


def _spec(tmp_path: Path, records: list[dict], processor: str) -> Path:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "event.avsc").write_text(json.dumps({"type": "record", "name": "Event", "fields": [
        {"name": "page", "type": ["null", "string"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "size", "type": "long"},
    ]}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: proc
        topics:
          events: {partitions: 1, schema: event.avsc}
          counts: {partitions: 1}
        sources:
          - {name: in, connector: jsonl, topic: events, config: {paths: [in.jsonl]}}
        processors:
        """) + textwrap.indent(textwrap.dedent(processor), "  ") + textwrap.dedent("""\
        sinks:
          - {name: out, connector: jsonl, topics: [counts], config: {path: out}}
        errors: {tolerance: all, dead_letter_topic: dlq}
        """))
    return spec


def test_a_late_record_goes_to_the_dead_letter_topic_with_the_window_and_how_late(tmp_path: Path) -> None:
    minute = 60_000
    records = [{"page": "a", "at": 0, "size": 1}, {"page": "a", "at": 3 * minute, "size": 2},
               {"page": "a", "at": 10_000, "size": 4},  # its window [0, 1m) closed at 1m30s: 1m30s late
               {"page": "a", "at": 2 * minute + 50_000, "size": 8}]  # inside grace: counted
    spec = _spec(tmp_path, records, """\
        - name: per-minute
          from: events
          to: counts
          key: page
          time: at
          window: {tumbling: 1m}
          grace: 30s
          aggregate: {n: count(), total: sum(size)}
        """)
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    out = [json.loads(line) for line in (tmp_path / "out" / "counts-0.jsonl").read_text().splitlines()]
    windows = [(o["page"], o["window_start"], o["n"], o["total"]) for o in out]
    assert windows == [("a", "1970-01-01T00:00:00+00:00", 1, 1), ("a", "1970-01-01T00:02:00+00:00", 1, 8),
                       ("a", "1970-01-01T00:03:00+00:00", 1, 2)]
    dlq = [json.loads(line) for line in run_cli("consume", "dlq", "--from-beginning", "--spec", spec).stdout.splitlines()]
    (late,) = dlq
    assert late["connector"] == "per-minute" and late["field"] == "at"
    assert "late: window [1970-01-01T00:00:00Z, 1970-01-01T00:01:00Z) had closed 90000 ms before it came" in late["error"]


def test_validate_names_a_processors_mistakes_by_line(tmp_path: Path) -> None:
    spec = _spec(tmp_path, [], """\
        - name: bad
          from: events
          to: counts
          key: [pages]
          time: size2
          window: {tumbling: 1x}
          aggregate: {n: count(), total: sum(page), m: median(size)}
        """)
    checked = run_cli("validate", spec)
    assert checked.returncode == 2
    err = checked.stderr
    assert "spec.yaml:14" in err and "expected a duration" in err  # window
    assert "unknown aggregate 'median'" in err
    fixed = spec.read_text().replace("1x", "1m").replace(", m: median(size)", "")
    spec.write_text(fixed)
    checked = run_cli("validate", spec)
    assert checked.returncode == 2
    assert "no field 'pages'" in checked.stderr and "no field 'size2'" in checked.stderr
    assert "sum(page): 'page' is string, not a number" in checked.stderr


def test_a_processor_that_feeds_itself_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, [], """\
        - name: loop
          from: [events, counts]
          to: counts
          window: {tumbling: 1m}
          aggregate: {n: count()}
        """)
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "reads what it writes" in checked.stderr


def test_idle_close_emits_the_last_window_while_the_run_goes_on(tmp_path: Path) -> None:
    """With no new input for idle_close, wall-clock time closes the open window: it is
    emitted while `pipeline run` keeps running (not at its end), no sooner than idle_close
    after the input stopped (nothing else could close it: its end is far ahead of the
    stream time)."""
    records = [{"page": "a", "at": 1_000 + i, "size": i} for i in range(10)]
    spec = _spec(tmp_path, records, """\
        - name: per-hour
          from: events
          to: counts
          key: page
          time: at
          window: {tumbling: 1h}
          idle_close: 2s
          aggregate: {n: count(), total: sum(size)}
        """)
    run = subprocess.Popen([pipeline_exe(), "run", str(spec), "--no-progress"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (landed := run_cli("consume", "events", "--from-beginning", "--max", "10", "--spec", spec,
                                 timeout=60)).returncode != 0:  # (until the run has made its topics)
            assert "has no topics yet" in landed.stderr and time.monotonic() < deadline, landed.stderr
        input_seen = time.monotonic()  # the input has stopped by now (all 10 records are in)
        window = run_cli("consume", "counts", "--from-beginning", "--follow", "--max", "1", "--spec", spec, timeout=60)
        emitted = time.monotonic()
        assert window.returncode == 0, window.stderr
        assert run.poll() is None  # emitted by the running pipeline
        (record,) = [json.loads(line) for line in window.stdout.splitlines()]
        assert (record["page"], record["n"], record["total"]) == ("a", 10, 45)
        print(f"window emitted {emitted - input_seen:.2f} s after the input was seen complete (idle_close 2 s)")
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, run.stderr.read()
