"""End to end through the installed `pipeline` command: a jsonl source, a keyed
4-partition schema-checked topic, a jsonl sink, the dead-letter topic, and a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import pipeline_exe, read_jsonl_dir, run_cli

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "amount", "type": "double"},
        {"name": "tag", "type": ["null", "string"], "default": None},
    ],
}


def write_spec(tmp: Path, *, tolerance: str = "all") -> Path:
    (tmp / "event.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp / "spec.yaml"
    spec.write_text(
        f"""\
name: e2e
topics:
  events: {{partitions: 4, schema: event.avsc, key: user}}
sources:
  - name: events-in
    connector: jsonl
    topic: events
    config: {{paths: ["input/*.jsonl"], batch_size: 5000}}
sinks:
  - name: events-out
    connector: jsonl
    topics: [events]
    config: {{path: out}}
errors: {{tolerance: {tolerance}, dead_letter_topic: events-dlq}}
"""
    )
    return spec


def write_input(tmp: Path, count: int, *, bad_every: int | None = None, files: int = 2) -> tuple[set[int], set[int]]:
    """`count` records over `files` files; every `bad_every`-th record breaks the schema
    in one of three ways. Returns (valid ids, invalid ids)."""
    (tmp / "input").mkdir()
    valid, invalid = set(), set()
    seqs: dict[str, int] = defaultdict(int)
    per_file = count // files
    i = 0
    for f in range(files):
        with open(tmp / "input" / f"part-{f}.jsonl", "w") as out:
            for _ in range(per_file if f < files - 1 else count - per_file * (files - 1)):
                i += 1
                user = f"user-{i % 97}"
                seqs[user] += 1
                rec = {"id": i, "user": user, "seq": seqs[user], "amount": i / 10}
                if bad_every and i % bad_every == 0:
                    kind = (i // bad_every) % 3
                    if kind == 0:
                        rec["amount"] = "not-a-number"
                    elif kind == 1:
                        del rec["user"]
                    else:
                        rec["tag"] = 42
                    invalid.add(i)
                else:
                    valid.add(i)
                out.write(json.dumps(rec) + "\n")
    return valid, invalid


def check_sink_output(out: Path, valid: set[int]) -> list[dict]:
    files = read_jsonl_dir(out)
    assert sorted(files) == [f"events-{p}.jsonl" for p in range(4)]
    records = [r for rs in files.values() for r in rs]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a record arrived twice"
    assert set(ids) == valid, f"missing: {sorted(valid - set(ids))[:10]}, extra: {sorted(set(ids) - valid)[:10]}"
    # One key lives in one partition, in its original order.
    partition_of: dict[str, str] = {}
    for name, rs in files.items():
        last: dict[str, int] = {}
        for r in rs:
            assert partition_of.setdefault(r["user"], name) == name, f"{r['user']} in two partitions"
            assert r["seq"] > last.get(r["user"], 0), f"{r['user']} out of order in {name}"
            last[r["user"]] = r["seq"]
    return records


def test_once_delivers_valid_records_exactly_once_and_dead_letters_the_rest(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    valid, invalid = write_input(tmp_path, 30_000, bad_every=997)  # 6 batches over 2 files, 30 bad records
    result = run_cli("run", spec, "--once", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "events-in" in result.stderr and "dead-lettered" in result.stderr  # the summary

    check_sink_output(tmp_path / "out", valid)

    # The dead-letter topic holds every invalid record with its error, via `pipeline consume`.
    dlq = run_cli("consume", "events-dlq", "--from-beginning", "--spec", spec)
    assert dlq.returncode == 0, dlq.stderr
    letters = [json.loads(line) for line in dlq.stdout.splitlines()]
    assert {json.loads(d["record"])["id"] for d in letters} == invalid
    for d in letters:
        assert d["connector"] == "events-in" and d["stage"] == "encode" and d["topic"] == "events"
        assert d["error"] and d["position"].split(":")[0].endswith(".jsonl")
        rec = json.loads(d["record"])
        expected_field = "amount" if rec["amount"] == "not-a-number" else ("user" if "user" not in rec else "tag")
        assert d["field"] == expected_field, d

    # Topics report what they hold, and the sink's group has no lag.
    described = run_cli("topics", "describe", "events", "--json", "--spec", spec)
    info = json.loads(described.stdout)
    assert info["records"] == len(valid)
    assert info["groups"]["pipeline-e2e-events-out"]["lag"] == 0

    # A second --once run has nothing new to do and duplicates nothing.
    again = run_cli("run", spec, "--once", timeout=120)
    assert again.returncode == 0, again.stderr
    check_sink_output(tmp_path / "out", valid)


def test_tolerance_none_stops_naming_the_record_and_field(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tolerance="none")
    write_input(tmp_path, 3000, bad_every=2500, files=1)
    result = run_cli("run", spec, "--once")
    assert result.returncode == 1
    err = result.stderr
    # Record 2500 lacks its "user" field.
    assert "input/part-0.jsonl:2500" in err and "'user'" in err and "'id': 2500" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    valid, _ = write_input(tmp_path, 500_000, files=4)
    proc = subprocess.Popen(
        [pipeline_exe(), "run", str(spec), "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out_dir = tmp_path / "out"
    deadline = time.monotonic() + 120
    # Kill once the sink has written part of the output, so the crash hits every stage.
    while time.monotonic() < deadline:
        written = sum(p.stat().st_size for p in out_dir.glob("*.jsonl")) if out_dir.exists() else 0
        if written > 2_000_000:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    written_before = sum(len(v) for v in read_jsonl_dir(out_dir).values())
    assert 0 < written_before < len(valid), "the kill should land mid-run"

    result = run_cli("run", spec, "--once", timeout=600)
    assert result.returncode == 0, result.stderr
    check_sink_output(out_dir, valid)

    # The embedded topic holds each record exactly once, read back with `pipeline consume`.
    consumed = run_cli("consume", "events", "--from-beginning", "--spec", spec, timeout=300)
    ids = [json.loads(line)["id"] for line in consumed.stdout.splitlines()]
    assert len(ids) == len(valid) and set(ids) == valid


def test_sigterm_flushes_commits_and_exits_zero(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    spec.write_text(spec.read_text().replace("batch_size: 5000}", "batch_size: 5000, follow: true}"))
    valid, _ = write_input(tmp_path, 20_000, files=1)
    proc = subprocess.Popen([pipeline_exe(), "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_dir = tmp_path / "out"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        files = read_jsonl_dir(out_dir) if out_dir.exists() else {}
        if sum(len(v) for v in files.values()) == len(valid):
            break
        time.sleep(0.2)
    # Lines appended while running are picked up (follow), then SIGTERM stops cleanly.
    with open(tmp_path / "input" / "part-0.jsonl", "a") as f:
        f.write(json.dumps({"id": 999_999, "user": "late", "seq": 1, "amount": 1.0}) + "\n")
    # SIGTERM once the line is in the topic (the sink may or may not have it yet).
    deadline = time.monotonic() + 30
    while '"id": 999999' not in run_cli("consume", "events", "--from-beginning", "--spec", spec).stdout:
        assert time.monotonic() < deadline and proc.poll() is None, "the appended line never reached the topic"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stderr and "stopped by signal" in stderr
    check_sink_output(out_dir, valid | {999_999})
    described = json.loads(run_cli("topics", "describe", "events", "--json", "--spec", spec).stdout)
    assert described["groups"]["pipeline-e2e-events-out"]["lag"] == 0
