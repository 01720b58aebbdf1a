"""Scheduled sources: cron and interval schedules, no overlapping runs, catch-up, retries,
the run history, and `pipeline runs` / `schedule` / `run --source --now`.

The cron tests drive the pipeline through the public API with a `ManualClock`, so an hour
of schedule takes a fraction of a second."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest

from runner import engine
from runner.batch import Batch
from runner.connector import Config, Source, SourceTask, hookimpl, setting
from runner.errors import FatalError, SpecError
from runner.plugins import load_plugins
from runner.runs import RunHistory
from runner.schedule import ManualClock, Schedule, ScheduleError, parse_duration
from tests.conftest import pipeline_exe, read_jsonl_dir, run_cli

UTC = dt.timezone.utc


# -- schedules ---------------------------------------------------------------------------------


def test_durations_and_schedule_forms() -> None:
    assert parse_duration("15m") == 900 and parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    with pytest.raises(ScheduleError):
        parse_duration("soon")
    assert Schedule.parse("0 * * * *").cron == "0 * * * *"
    assert Schedule.parse({"every": "2s"}).every == 2
    for bad, why in [
        ({"cron": "61 * * * *"}, "not a valid cron expression"),
        ({"cron": "0 * * * *", "every": "1m"}, "either cron or every"),
        ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"every": "1m", "catchup": "all"}, "catchup"),
        ({"every": "1m", "max_retries": -1}, "max_retries"),
        ({"every": "1m", "when": 1}, "unknown key"),
    ]:
        with pytest.raises(ScheduleError, match=why):
            Schedule.parse(bad)


def test_cron_in_a_time_zone_follows_daylight_saving() -> None:
    daily = Schedule.parse({"cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    # 02:30 Berlin is 00:30 UTC in summer and 01:30 UTC in winter.
    assert daily.next_after(dt.datetime(2026, 7, 1, 12, tzinfo=UTC)) == dt.datetime(2026, 7, 2, 0, 30, tzinfo=UTC)
    assert daily.next_after(dt.datetime(2026, 12, 1, 12, tzinfo=UTC)) == dt.datetime(2026, 12, 2, 1, 30, tzinfo=UTC)
    hourly = Schedule.parse("0 * * * *")
    assert hourly.last_at_or_before(dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC)) == dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert hourly.last_at_or_before(dt.datetime(2026, 1, 1, 10, 59, tzinfo=UTC)) == dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    every = Schedule.parse({"every": "15m"})
    start = dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert every.upcoming(start + dt.timedelta(minutes=20), 2, anchor=start) == [
        start + dt.timedelta(minutes=30), start + dt.timedelta(minutes=45)]


def test_validate_names_the_line_of_a_bad_schedule(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("""\
name: s
topics:
  t: {partitions: 1, schema: {type: record, name: R, fields: [{name: a, type: long}]}}
sources:
  - name: src
    connector: jsonl
    topic: t
    config: {paths: ["*.jsonl"]}
    schedule: {cron: "0 25 * * *"}
""")
    checked = run_cli("validate", spec)
    assert checked.returncode == 2
    assert f"{spec}:9: sources[0].schedule: cron: '0 25 * * *' is not a valid cron expression" in checked.stderr


# -- the scheduler, on a manual clock ----------------------------------------------------------

GATES: dict[str, asyncio.Event] = {}  # run number -> released when set (absent: not held)
FAIL: list[int] = []  # attempts that fail (1-based, counted over the whole test)
ATTEMPTS: list[int] = []


class Counted(Source):
    """Each run produces `per_run` records numbered after the stored offset; a run can be
    held open (GATES) or made to fail (FAIL)."""

    name = "counted"

    class Config(Config):
        per_run: int = setting(3, help="Records per run.")

    def tasks(self) -> list[SourceTask]:
        return [CountedTask(self.config.per_run)]


class CountedTask(SourceTask):
    def __init__(self, per_run: int) -> None:
        self.per_run = per_run

    async def open(self, offsets):
        self.n = offsets.get("n", 0)
        self.done = False
        ATTEMPTS.append(len(ATTEMPTS) + 1)
        if len(ATTEMPTS) in FAIL:
            raise FatalError(f"attempt {len(ATTEMPTS)} fails")

    async def poll(self):
        if self.done:
            return None
        gate = GATES.get(str(self.n // self.per_run + 1))
        if gate is not None:
            await gate.wait()
        self.done = True
        rows = [{"a": self.n + i} for i in range(self.per_run)]
        self.n += self.per_run
        return Batch(rows, source_offsets={"n": self.n})


@pytest.fixture
def host():
    plugin = types.ModuleType("schedule_test_plugin")

    @hookimpl
    def register_connectors(register):
        register(Counted)

    plugin.register_connectors = register_connectors
    GATES.clear()
    FAIL.clear()
    ATTEMPTS.clear()
    return load_plugins(plugin)


def write_spec(tmp: Path, schedule: str) -> Path:
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: sched
topics:
  t: {{partitions: 1, schema: {{type: record, name: R, fields: [{{name: a, type: long}}]}}}}
sources:
  - {{name: src, connector: counted, topic: t, schedule: {schedule}}}
sinks:
  - {{name: out, connector: jsonl, topics: [t], config: {{path: out}}}}
""")
    return spec


def history(tmp: Path) -> list[tuple[str, str, str, int, int]]:
    """(trigger, tick HH:MM, outcome, records, attempts) per run."""
    h = RunHistory(tmp / ".pipeline" / "sched" / "runs.db", read_only=True)
    try:
        return [(r.trigger, r.scheduled_for.strftime("%H:%M") if r.scheduled_for else "-", r.outcome, r.records, r.attempts)
                for r in h.list()]
    finally:
        h.close()


def drive(tmp: Path, host, schedule: str, script) -> list[int]:
    """Run the spec on a manual clock starting at 10:02 UTC while `script(clock, until)`
    moves the clock; return the record numbers the sink wrote."""
    spec = engine.check_spec(write_spec(tmp, schedule), host)
    clock = ManualClock(dt.datetime(2026, 3, 1, 10, 2, tzinfo=UTC))

    async def main() -> None:
        pipeline = engine.Pipeline(spec, host, clock=clock)
        running = asyncio.create_task(pipeline.run())

        async def until(condition, what: str, seconds: float = 10) -> None:
            deadline = time.monotonic() + seconds
            while not condition():
                assert not running.done(), running.exception() if running.done() else None
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {history(tmp)}"
                await asyncio.sleep(0.02)

        try:
            await asyncio.sleep(0.5)  # the pipeline starts (and its scheduler reads the clock)
            await script(clock, until)
            await asyncio.sleep(1.5)  # the sink flushes about once a second
        finally:
            pipeline.stop()
            await asyncio.wait_for(running, 20)

    asyncio.run(main())
    return [r["a"] for rs in read_jsonl_dir(tmp / "out").values() for r in rs]


def minute(m: int) -> dt.datetime:
    return dt.datetime(2026, 3, 1, 10, m, tzinfo=UTC)


def test_cron_runs_at_its_ticks_and_skips_a_tick_while_a_run_is_going(tmp_path: Path, host) -> None:
    async def script(clock: ManualClock, until) -> None:
        GATES["2"] = asyncio.Event()  # the second run is held open
        assert not (tmp_path / ".pipeline" / "sched" / "runs.db").exists() or history(tmp_path) == []  # nothing before 10:05
        await clock.set(minute(5))
        await until(lambda: [h[2] for h in history(tmp_path)] == ["ok"], "the 10:05 run")
        await clock.set(minute(10))
        await until(lambda: [h[2] for h in history(tmp_path)] == ["ok", "running"], "the 10:10 run to start")
        await clock.set(minute(15))  # 10:15 comes while the 10:10 run is still going
        await until(lambda: len(history(tmp_path)) == 3, "the skipped tick")
        GATES["2"].set()
        await until(lambda: history(tmp_path)[1][2] == "ok", "the 10:10 run to end")
        await clock.set(minute(20))
        await until(lambda: len(history(tmp_path)) == 4 and history(tmp_path)[3][2] == "ok", "the 10:20 run")

    written = drive(tmp_path, host, '"*/5 * * * *"', script)
    assert history(tmp_path) == [
        ("schedule", "10:05", "ok", 3, 1),
        ("schedule", "10:10", "ok", 3, 1),
        ("schedule", "10:15", "skipped", 0, 0),
        ("schedule", "10:20", "ok", 3, 1),
    ]
    assert sorted(written) == list(range(9))


def test_a_failed_run_is_retried_with_backoff_then_recorded_failed_and_the_next_tick_tries_again(tmp_path: Path, host) -> None:
    FAIL.extend([1, 3, 4, 5])  # the 10:05 run fails once; the 10:10 run fails every try

    async def script(clock: ManualClock, until) -> None:
        await clock.set(minute(5))
        await until(lambda: len(ATTEMPTS) == 1, "the first attempt")
        await asyncio.sleep(0.2)
        await clock.advance(10)  # the backoff (10 s)
        await until(lambda: history(tmp_path) and history(tmp_path)[0][2] == "ok", "the retried run")
        await clock.set(minute(10))
        await until(lambda: len(ATTEMPTS) == 3, "the 10:10 run")
        for wait in (10, 20):  # doubling backoff: two retries, then it is recorded failed
            await asyncio.sleep(0.2)
            await clock.advance(wait)
        await until(lambda: history(tmp_path)[1][2] == "failed", "the failed run")
        await clock.set(minute(15))
        await until(lambda: len(history(tmp_path)) == 3 and history(tmp_path)[2][2] == "ok", "the 10:15 run")

    written = drive(tmp_path, host, '{cron: "*/5 * * * *", max_retries: 2, retry_backoff: 10s}', script)
    assert history(tmp_path) == [
        ("schedule", "10:05", "ok", 3, 2),
        ("schedule", "10:10", "failed", 0, 3),
        ("schedule", "10:15", "ok", 3, 1),
    ]
    runs = RunHistory(tmp_path / ".pipeline" / "sched" / "runs.db", read_only=True).list()
    assert "attempt 5 fails" in runs[1].message
    assert sorted(written) == list(range(6))


def test_catchup_after_downtime(tmp_path: Path, host) -> None:
    async def first(clock: ManualClock, until) -> None:
        await clock.set(minute(5))
        await until(lambda: len(history(tmp_path)) == 1, "the 10:05 run")

    drive(tmp_path, host, '"*/5 * * * *"', first)
    # Down from 10:05 to 10:17 (the clock of the next run starts at 10:02 again, so move it).
    spec = engine.check_spec(write_spec(tmp_path, '"*/5 * * * *"'), host)
    for catchup, expected in (("latest", ["schedule", "catchup"]), ("none", ["schedule", "catchup"])):
        clock = ManualClock(minute(17))

        async def main() -> None:
            s = engine.check_spec(write_spec(tmp_path, f'{{cron: "*/5 * * * *", catchup: {catchup}}}'), host)
            pipeline = engine.Pipeline(s, host, clock=clock)
            running = asyncio.create_task(pipeline.run())
            await asyncio.sleep(1.0)
            pipeline.stop()
            await asyncio.wait_for(running, 20)

        asyncio.run(main())
        assert [h[0] for h in history(tmp_path)] == expected  # `none` adds no run: it waits for 10:20
    assert spec.sources[0].schedule.catchup == "latest"


# -- through the command line ------------------------------------------------------------------


def test_run_source_now_runs_list_and_schedule(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "a.jsonl").write_text("".join(json.dumps({"a": i}) + "\n" for i in range(5)))
    spec = tmp_path / "spec.yaml"
    spec.write_text("""\
name: cli
topics:
  t: {partitions: 1, schema: {type: record, name: R, fields: [{name: a, type: long}]}}
sources:
  - {name: hourly, connector: jsonl, topic: t, config: {paths: ["input/*.jsonl"]}, schedule: {cron: "0 * * * *", timezone: Europe/Berlin}}
  - {name: plain, connector: jsonl, topic: t, config: {paths: ["input/*.jsonl"]}}
""")
    shown = run_cli("schedule", spec)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["source", "schedule", "catchup", "last", "run", "next", "runs", "(UTC)"]
    assert lines[1].startswith("hourly") and "cron '0 * * * *' (Europe/Berlin)" in lines[1] and lines[1].count(":00:00") == 3
    assert len(lines) == 2  # the unscheduled source is not listed

    ran = run_cli("run", spec, "--source", "hourly", "--now")
    assert ran.returncode == 0, ran.stderr
    assert "hourly" in ran.stderr and "plain" not in ran.stderr  # only that source ran
    again = run_cli("run", spec, "--source", "hourly", "--now")
    assert again.returncode == 0, again.stderr
    listed = run_cli("runs", spec, "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert [(r["source"], r["trigger"], r["outcome"], r["records"], r["files"]) for r in runs] == [
        ("hourly", "now", "ok", 5, 1), ("hourly", "now", "ok", 0, 0)]
    table = run_cli("runs", spec, "--source", "hourly")
    assert table.returncode == 0 and "now" in table.stdout and " ok " in table.stdout
    assert "ok at" in run_cli("schedule", spec).stdout
    assert run_cli("run", spec, "--now").returncode == 2  # --now needs --source
    unknown = run_cli("run", spec, "--source", "nope", "--now")
    assert unknown.returncode == 2 and "hourly, plain" in unknown.stderr


@pytest.mark.slow
def test_kill_9_during_a_scheduled_run_is_recorded_interrupted_and_the_next_run_delivers_the_rest(tmp_path: Path) -> None:
    count = 400_000
    (tmp_path / "input").mkdir()
    with open(tmp_path / "input" / "big.jsonl", "w") as out:
        for i in range(count):
            out.write('{"a": %d}\n' % i)
    spec = tmp_path / "spec.yaml"
    spec.write_text("""\
name: kill
topics:
  t: {partitions: 2, schema: {type: record, name: R, fields: [{name: a, type: long}]}}
sources:
  - {name: src, connector: jsonl, topic: t, config: {paths: ["input/*.jsonl"], batch_size: 2000}, schedule: {every: 1h}}
""")
    proc = subprocess.Popen([pipeline_exe(), "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = tmp_path / ".pipeline" / "kill" / "runs.db"
    try:
        deadline = time.monotonic() + 30
        produced = 0
        while time.monotonic() < deadline:  # the first run (at start) is under way
            time.sleep(0.1)
            if db.exists():
                topics = run_cli("topics", "list", "--spec", spec, "--json")
                if topics.returncode == 0 and topics.stdout.strip():
                    produced = sum(sum(t["end_offsets"]) for t in json.loads(topics.stdout) if t["name"] == "t")
                    if produced > 20_000:
                        break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 0 < produced < count
    # The restart finds the run cut short, records it, and catches up at once.
    again = run_cli("run", spec, "--once", timeout=120)
    assert again.returncode == 0, again.stderr
    h = RunHistory(db, read_only=True).list()
    assert [(r.trigger, r.outcome) for r in h] == [("schedule", "interrupted"), ("once", "ok")]
    assert 0 < h[1].records < count
    consumed = run_cli("consume", "t", "--from-beginning", "--spec", spec, timeout=120)
    values = [json.loads(line)["a"] for line in consumed.stdout.splitlines()]
    assert sorted(values) == list(range(count))  # every record once


def test_http_log_under_a_schedule_reads_only_what_was_appended(tmp_path: Path) -> None:
    line = '203.0.113.{n} - - [24/Nov/2026:10:00:{s:02d} +0000] "GET /p{n} HTTP/1.1" 200 {n} "-" "curl/8"\n'
    log = tmp_path / "access.log"
    log.write_text("".join(line.format(n=n, s=n % 60) for n in range(10)))
    schema = json.dumps(str(Path(__file__).resolve().parents[1] / "pipelines" / "schemas" / "activity.avsc"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
name: logs
topics:
  activity: {{partitions: 1, schema: {schema}}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["access.log"]}}, schedule: "*/10 * * * *"}}
""")
    assert run_cli("run", spec, "--source", "logs", "--now").returncode == 0
    with open(log, "a") as out:
        out.write("".join(line.format(n=n, s=n % 60) for n in range(10, 13)))
    assert run_cli("run", spec, "--source", "logs", "--now").returncode == 0
    runs = json.loads(run_cli("runs", spec, "--json").stdout)
    assert [r["records"] for r in runs] == [10, 3]
