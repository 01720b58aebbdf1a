"""Processors on a real Kafka-protocol broker (Tansu), through `pipeline run`: one runner per
processor among the pipeline's processes; after the one running it is killed (-9), the other
takes it over from its last checkpoint (input offsets and state in the offsets topic), and
every window's final value is emitted, each time with the same value (at-least-once)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.conftest import pipeline_exe, run_cli
from tests.kafka_broker import QUICK_ROUNDS, Tansu

MINUTE = 60_000
PAGES = ["/", "/a", "/b", "/c", "/d", "/e"]
ROUNDS, MINUTES_PER_ROUND, PER_MINUTE = 6, 30, 150  # records per page and minute


def _spec(tmp_path: Path, kafka: Tansu, name: str, body: str) -> Path:
    (tmp_path / "event.avsc").write_text(json.dumps({"type": "record", "name": "Event", "fields": [
        {"name": "page", "type": "string"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "size", "type": "long"},
    ]}))
    broker = json.dumps({"kafka": {"bootstrap_servers": kafka.bootstrap, "consumer": QUICK_ROUNDS}})
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\nbroker: {broker}\n" + body)
    return spec


def _round(k: int, rng: random.Random) -> list[dict]:
    """Minutes [k * M, (k + 1) * M): each minute's records shuffled within the minute (out
    of order, never past a window that closed)."""
    records = []
    for minute in range(k * MINUTES_PER_ROUND, (k + 1) * MINUTES_PER_ROUND):
        batch = [{"page": rng.choice(PAGES), "at": minute * MINUTE + rng.randrange(MINUTE), "size": rng.randrange(1000)}
                 for _ in range(PER_MINUTE * len(PAGES))]
        records += batch
    return records


@pytest.mark.slow
def test_two_workers_one_killed_every_window_emitted_with_one_value(tmp_path: Path, kafka: Tansu) -> None:
    topics = """\
topics:
  events: {partitions: 4, schema: event.avsc, key: page}
  counts: {partitions: 2}
"""
    feed = _spec(tmp_path, kafka, "feed", topics + """\
sources:
  - {name: in, connector: jsonl, topic: events, config: {paths: [events.jsonl]}}
""")
    aggregate = _spec(tmp_path, kafka, "agg", topics + """\
processors:
  - name: per-minute
    from: events
    to: counts
    key: page
    time: at
    window: {tumbling: 1m}
    grace: 5s
    idle_close: 3s
    aggregate: {n: count(), total: sum(size)}
""")
    rng = random.Random(15)
    expected: dict[tuple[str, int], tuple[int, int]] = defaultdict(lambda: (0, 0))

    def feed_round(k: int) -> None:
        records = _round(k, rng)
        with (tmp_path / "events.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        for r in records:
            key = (r["page"], r["at"] // MINUTE * MINUTE)
            n, total = expected[key]
            expected[key] = (n + 1, total + r["size"])
        fed = run_cli("run", feed, "--once", timeout=120)
        assert fed.returncode == 0, fed.stderr

    def start(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen([pipeline_exe(), "--debug", "run", str(aggregate)], stdout=subprocess.DEVNULL,
                                stderr=log, env={**os.environ})

    def emitted() -> list[dict]:
        out = run_cli("consume", "counts", "--from-beginning", "--no-follow", "--spec", aggregate, timeout=60)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    def running(name: str) -> set[int]:
        """The processor's tasks (one per partition: the input is keyed by the group-by
        field) the worker runs now, by its log."""
        log = (tmp_path / f"{name}.log").read_text() if (tmp_path / f"{name}.log").exists() else ""
        tasks: set[int] = set()
        for task, verb in re.findall(r"per-minute: task (\d+) (started|stopped) here", log):
            (tasks.add if verb == "started" else tasks.discard)(int(task))
        return tasks

    def owner() -> str | None:
        """A worker running some of the processor's tasks now (the second, if both do)."""
        return "second" if running("second") else "first" if running("first") else None

    def wait(until, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.5)

    workers = {"first": start("first")}
    try:
        feed_round(0)
        workers["second"] = start("second")
        feed_round(1)
        wait(lambda: owner() is not None and emitted(), 60)
        feed_round(2)
        victim = owner()
        victim_tasks = running(victim)
        os.kill(workers[victim].pid, signal.SIGKILL)  # mid-run: rounds 3 on are not even written yet
        workers[victim].wait(10)
        before_kill = len(emitted())
        survivor = "second" if victim == "first" else "first"
        for k in range(3, ROUNDS):
            feed_round(k)
        # The survivor takes the processor over after the victim's session times out, and
        # its idle close emits the last windows once the input stops.
        wait(lambda: len({(o["page"], o["window_start"]) for o in emitted()}) >= len(expected), 120)
        assert running(survivor) == {0, 1, 2, 3}  # it took over the victim's tasks
        workers[survivor].send_signal(signal.SIGTERM)
        assert workers[survivor].wait(30) == 0
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert 0 < before_kill < len(expected), "the kill should land mid-run"
    print(f"tasks of the victim when killed: {sorted(victim_tasks)}")
    out = emitted()
    values: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
    for o in out:
        start_ms = int(_epoch_ms(o["window_start"]))
        values[(o["page"], start_ms)].add((o["n"], o["total"]))
    assert set(values) == set(expected)  # every window emitted
    wrong = {k: v for k, v in values.items() if v != {expected[k]}}
    assert not wrong, list(wrong.items())[:5]  # each time with its one final value
    doubled = sum(c - 1 for c in Counter((o["page"], o["window_start"]) for o in out).values())
    print(f"windows {len(expected)}, emitted {len(out)}, emitted again after the takeover {doubled}")


def _epoch_ms(text: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(text).timestamp() * 1000
