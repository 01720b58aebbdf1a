"""Processors through the CLI: windowed aggregates land in a topic that sinks read, equal
to a DuckDB GROUP BY over the raw records; late and windowless records go to the
dead-letter topic, named; `pipeline validate` names a processor's mistakes by line."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from runner.broker.embedded import EmbeddedBroker
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


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
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


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_session_sliding_and_count_windows_through_the_cli(tmp_path: Path) -> None:
    s = 1000
    records = sorted([{"page": "a", "at": t * s, "size": t} for t in (0, 10, 20, 100, 105)] +
                     [{"page": "b", "at": t * s, "size": 1} for t in (5, 50)], key=lambda r: r["at"])
    windows = {
        "{session: 30s}": [("a", 0, 20 * s, 3, 30), ("b", 5 * s, 5 * s, 1, 1), ("b", 50 * s, 50 * s, 1, 1),
                           ("a", 100 * s, 105 * s, 2, 205)],
        "{count: 2}": [("a", 0, 10 * s, 2, 10), ("a", 20 * s, 100 * s, 2, 120), ("b", 5 * s, 50 * s, 2, 2),
                       ("a", 105 * s, 105 * s, 1, 105)],
        "{sliding: 15s}": [("a", -15 * s, 0, 1, 0), ("b", -10 * s, 5 * s, 1, 1), ("a", -5 * s, 10 * s, 2, 10),
                           ("a", 5 * s, 20 * s, 2, 30), ("b", 35 * s, 50 * s, 1, 1), ("a", 85 * s, 100 * s, 1, 100),
                           ("a", 90 * s, 105 * s, 2, 205)],
    }
    for window, expected in windows.items():
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        spec = _spec(tmp_path, records, f"""\
            - name: w
              from: events
              to: counts
              key: page
              time: at
              window: {window}
              aggregate: {{n: count(), total: sum(size)}}
            """)
        ran = run_cli("run", spec, "--once")
        assert ran.returncode == 0, ran.stderr
        out = [json.loads(line) for line in (tmp_path / "out" / "counts-0.jsonl").read_text().splitlines()]
        got = [(o["page"], _ms(o["window_start"]), _ms(o["window_end"]), o["n"], o["total"]) for o in out]
        assert sorted(got) == sorted(expected), window
    spec.write_text(spec.read_text().replace("window: {sliding: 15s}", "window: {count: 2}\n    grace: 5s"))
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "grace does not apply" in checked.stderr
    spec.write_text(spec.read_text().replace("window: {count: 2}", "window: {count: 2.5}"))
    checked = run_cli("validate", spec)
    assert checked.returncode == 2 and "expected a number of records" in checked.stderr


def _ms(text: str) -> int:
    return round(dt.datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_an_aggregation_by_the_input_key_runs_a_task_per_partition_and_equals_a_group_by(tmp_path: Path) -> None:
    """activity is keyed by remote_host: grouped by it, each of its 4 partitions is
    aggregated by a task of its own (the summary's `views` line adds them up)."""
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    spec = tmp_path / "views.yaml"
    text = (REPO / "pipelines" / "views-per-minute.yaml").read_text()
    text = text.replace("key: [method, status]", "key: remote_host").replace("first_path: first(path)", "")
    spec.write_text(text.replace("schemas/", f"{REPO}/pipelines/schemas/").replace('"logs/', f'"{REPO}/pipelines/logs/'))
    ran = run_cli("run", spec, "--once", "--json", env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    raw, views = f"{tmp_path}/out/activity/**/*.parquet", f"{tmp_path}/out/views-per-minute/**/*.parquet"
    db = duckdb.connect()
    expected = db.execute(f"""
        select remote_host, time_bucket(interval 1 minute, timestamp), count(*), sum(bytes),
               count(distinct remote_host), max(bytes)
        from read_parquet('{raw}') group by all order by all""").fetchall()
    got = db.execute(f"""select remote_host, window_start, views, bytes, visitors, largest
        from read_parquet('{views}') order by all""").fetchall()
    assert got == expected and len(got) > 100
    (views_line,) = [c for c in json.loads(ran.stdout)["connectors"] if c["name"] == "views"]
    assert views_line["read"] == db.execute(f"select count(*) from read_parquet('{raw}')").fetchone()[0]

    async def stored() -> dict:
        broker = EmbeddedBroker(tmp_path / "state", read_only=True)
        await broker.start()
        try:
            return await broker.source_offsets("views")
        finally:
            await broker.close()
    offsets = asyncio.run(stored())
    assert {k for k in offsets if k.startswith("#state/")} == {"#state/0", "#state/1", "#state/2", "#state/3"}
    assert {k for k in offsets if not k.startswith("#state/")} == {f"activity/{i}" for i in range(4)}
    # The topic no longer keyed by remote_host: one task would read what four wrote. Refused.
    spec.write_text(spec.read_text().replace(", key: remote_host}", "}"))
    again = run_cli("run", spec, "--once", env=env, timeout=300)
    assert again.returncode != 0 and "its state was written by 4 task(s), and it now runs as 1" in again.stderr


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_a_late_record_of_a_sliding_window_names_the_window_with_its_end_included(tmp_path: Path) -> None:
    records = [{"page": "a", "at": 100_000, "size": 1}, {"page": "a", "at": 1_000, "size": 2}]
    spec = _spec(tmp_path, records, """\
        - name: recent
          from: events
          to: counts
          key: page
          time: at
          window: {sliding: 10s}
          aggregate: {n: count()}
        """)
    assert run_cli("run", spec, "--once").returncode == 0
    (late,) = [json.loads(line) for line in run_cli("consume", "dlq", "--from-beginning", "--spec", spec).stdout.splitlines()]
    assert "late: window [1969-12-31T23:59:51Z, 1970-01-01T00:00:01Z] had closed 99000 ms before it came" in late["error"]


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_a_topic_a_processor_writes_is_not_taken_as_keyed_and_merged_aggregation_after_a_backlog(tmp_path: Path) -> None:
    """`pages` declares `key: page`, but a processor writes it (keeping the clicks' keys): one
    task reads all of it, so each page has one window (per-partition tasks gave partial
    counts). And an aggregation over two merged topics whose records wait in a backlog
    (the sources ran first) aggregates them (their columns differ)."""
    (tmp_path / "clicks.avsc").write_text(json.dumps({"type": "record", "name": "Click", "fields": [
        {"name": "user", "type": "string"}, {"name": "page", "type": "string"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}))
    (tmp_path / "views.avsc").write_text(json.dumps({"type": "record", "name": "View", "fields": [
        {"name": "page", "type": ["null", "string"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ms", "type": "long"}]}))
    clicks = [{"user": f"u{i}", "page": "/a", "at": i * 1000} for i in range(6)]
    (tmp_path / "clicks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clicks))
    (tmp_path / "views.jsonl").write_text("".join(json.dumps({"page": "/a", "at": i * 1000 + 500, "ms": i}) + "\n"
                                                  for i in range(4)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: keyed
        topics:
          clicks: {partitions: 2, schema: clicks.avsc, key: user}
          views: {partitions: 2, schema: views.avsc, key: page}
          pages: {partitions: 2, schema: clicks.avsc, key: page}
          counts: {partitions: 1}
          merged: {partitions: 1}
        sources:
          - {name: click-log, connector: jsonl, topic: clicks, config: {paths: [clicks.jsonl]}}
          - {name: view-log, connector: jsonl, topic: views, config: {paths: [views.jsonl]}}
        processors:
          - {name: copy, from: clicks, to: pages}
          - {name: per-page, from: pages, to: counts, key: page, time: at, window: {tumbling: 1h},
             aggregate: {n: count()}}
          - {name: both, from: [clicks, views], to: merged, key: page, time: at, window: {tumbling: 1h},
             aggregate: {n: count()}}
        sinks:
          - {name: out, connector: jsonl, topics: [counts, merged], config: {path: out}}
        """))
    assert run_cli("run", spec, "--once", "--source", "click-log").returncode == 0
    assert run_cli("run", spec, "--once", "--source", "view-log").returncode == 0
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    counts = [json.loads(line) for line in (tmp_path / "out" / "counts-0.jsonl").read_text().splitlines()]
    assert [(c["page"], c["n"]) for c in counts] == [("/a", 6)]
    merged = [json.loads(line) for line in (tmp_path / "out" / "merged-0.jsonl").read_text().splitlines()]
    assert [(c["page"], c["n"]) for c in merged] == [("/a", 10)]
