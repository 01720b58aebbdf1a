"""`pipeline offsets` on processors, through the CLI: each input partition's stored
position, its end and the lag; per task the stream time and the size of the window state;
a processor that has not run shows a row of dashes."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import pipeline_exe, run_cli

MINUTE = 60_000


def _spec(tmp_path: Path, records: list[dict], partitions: int) -> Path:
    """Events keyed by page, counted per page and minute by `per-minute` (one task per
    partition: it groups by the input's key), and passed on where size > 1 by `big` (one
    task, no state)."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "event.avsc").write_text(json.dumps({"type": "record", "name": "Event", "fields": [
        {"name": "page", "type": "string"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "size", "type": "long"},
    ]}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: offsets-proc
        topics:
          events: {partitions: PARTITIONS, schema: event.avsc, key: page}
          counts: {partitions: 1}
          big: {partitions: 1}
        sources:
          - {name: in, connector: jsonl, topic: events, config: {paths: [in.jsonl]}}
        processors:
          - name: per-minute
            from: events
            to: counts
            key: page
            time: at
            window: {tumbling: 1m}
            grace: 30s
            aggregate: {n: count(), total: sum(size)}
          - name: big
            from: events
            to: big
            where: "size > 1"
        sinks:
          - {name: out, connector: jsonl, topics: [counts], config: {path: out}}
        errors: {tolerance: all, dead_letter_topic: dlq}
        """).replace("PARTITIONS", str(partitions)))
    return spec


RECORDS = [{"page": p, "at": t, "size": s} for p, t, s in [  # sizes tell them apart
    ("a", 0, 1), ("b", 1_000, 2), ("c", 2_000, 3), ("a", MINUTE + 5_000, 4), ("d", 2 * MINUTE + 500, 5)]]


def _ends(spec: Path) -> dict[int, int]:
    described = run_cli("topics", "describe", "events", "--json", spec)
    assert described.returncode == 0, described.stderr
    return dict(enumerate(json.loads(described.stdout)["end_offsets"]))


def _latest(spec: Path) -> dict[int, int]:
    """Each partition of events: the largest event time in it."""
    landed = run_cli("consume", "events", "--from-beginning", "--meta", "--json", spec)
    assert landed.returncode == 0, landed.stderr
    at = {r["size"]: r["at"] for r in RECORDS}
    latest: dict[int, int] = {}
    for r in json.loads(landed.stdout):
        latest[r["partition"]] = max(latest.get(r["partition"], 0), at[r["value"]["size"]])
    return latest


def _offsets(spec: Path) -> dict:
    shown = run_cli("offsets", "--json", spec)
    assert shown.returncode == 0, shown.stderr
    return {p["name"]: p for p in json.loads(shown.stdout)["processors"]}


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(
        timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def _rows(text: str, header: str) -> list[list[str]]:
    """The rows of the table whose header's first two columns are `header`, split in cells."""
    lines = text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.split()[:2] == header.split()]
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [line.split() for line in lines[start + 1:end]]


def test_after_a_once_run_each_input_partition_is_at_its_end_and_every_window_emitted(tmp_path: Path) -> None:
    spec = _spec(tmp_path, RECORDS, partitions=2)
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 0, ran.stderr
    ends, latest = _ends(spec), _latest(spec)
    assert sum(ends.values()) == len(RECORDS) and all(ends.values())  # both partitions hold records
    found = _offsets(spec)
    for name in ("per-minute", "big"):
        assert {p["partition"]: p["position"] for p in found[name]["partitions"]} == ends
        assert {(p["topic"], p["partition"], p["end"], p["lag"]) for p in found[name]["partitions"]} == \
            {("events", p, e, 0) for p, e in ends.items()}
    tasks = found["per-minute"]["tasks"]
    assert [t["task"] for t in tasks] == [0, 1]  # task i aggregates partition i
    for t in tasks:
        # At the end of a --once run every window is emitted: the stream time has passed them.
        assert t["stream_time"] >= latest[t["task"]] and t["stream_time_utc"] == _iso(t["stream_time"])
        assert t["open_windows"] == 0
        assert t["state_bytes"] == sum(table["bytes"] for table in t["tables"].values()) > 0
    assert found["big"]["tasks"] == []  # a filter keeps no state

    shown = run_cli("offsets", spec)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.index("\nprocessor ") > shown.stdout.index("source ")  # sources, processors, sinks
    assert shown.stdout.index("\nsink ") > shown.stdout.index("\nprocessor ")
    assert _rows(shown.stdout, "processor topic") == [
        [name, "events", str(p), str(e), str(e), "0"] for name in ("per-minute", "big") for p, e in ends.items()]
    assert _rows(shown.stdout, "processor task") == [
        ["per-minute", str(t["task"]), _iso(t["stream_time"]), f"{t['state_bytes']:,}", "0"] for t in tasks]


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_a_processor_that_has_not_run_shows_dashes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, RECORDS, partitions=2)
    ran = run_cli("run", spec, "--source", "in")  # the source alone: no processor runs
    assert ran.returncode == 0, ran.stderr
    found = _offsets(spec)
    assert found["per-minute"] == {"name": "per-minute", "partitions": [], "tasks": []}
    assert found["big"] == {"name": "big", "partitions": [], "tasks": []}
    shown = run_cli("offsets", spec)
    assert shown.returncode == 0, shown.stderr
    assert _rows(shown.stdout, "processor topic") == [["per-minute", *"-----"], ["big", *"-----"]]
    assert "stream time" not in shown.stdout  # no state stored


@pytest.mark.slow  # (an end-to-end run the dev loop can spare; CI runs it)
def test_while_a_run_goes_on_its_open_windows_are_counted(tmp_path: Path) -> None:
    spec = _spec(tmp_path, RECORDS, partitions=1)
    run = subprocess.Popen([pipeline_exe(), "run", str(spec), "--no-progress"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # read-only, beside the run
            assert run.poll() is None, run.stderr.read()
            shown = run_cli("offsets", "--json", spec)
            if shown.returncode == 0:  # (once the run has made its topics)
                found = {p["name"]: p for p in json.loads(shown.stdout)["processors"]}["per-minute"]
                if [(p["position"], p["lag"]) for p in found["partitions"]] == [(len(RECORDS), 0)]:
                    break
            assert time.monotonic() < deadline, shown.stdout + shown.stderr
            time.sleep(0.2)
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, run.stderr.read()
    (task,) = found["tasks"]
    # Stream time 2m0.5s: [0, 1m) closed at 1m30s (a, b and c emitted); a's [1m, 2m) and
    # d's [2m, 3m) are open.
    assert task["stream_time"] == 2 * MINUTE + 500 and task["stream_time_utc"] == "1970-01-01T00:02:00.500Z"
    assert task["open_windows"] == task["tables"][""]["rows"] == 2
