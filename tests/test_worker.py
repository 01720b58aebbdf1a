"""The worker, through the engine: in-test source and sink plugins on the embedded broker.

The scripted source emits batches written to a JSON file (so each test states its input
plainly), with its own source offsets; the collecting sink appends what it receives to a
module-level list. Both can be told to misbehave (retryable failures, rejections, crashes).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from runner import admin, engine
from runner.batch import Batch
from runner.broker.partitioner import partition_for
from runner.connector import (
    Config,
    RecordError,
    RetryableError,
    Sink,
    SinkTask,
    Source,
    SourceTask,
    TopicPartition,
    setting,
)
from runner.errors import DataError, FatalError
from runner.hookspecs import hookimpl
from runner.plugins import load_plugins
from runner.spec import Spec

pytestmark = pytest.mark.timeout(30)

# -- in-test plugins ---------------------------------------------------------------------------

EMITTED: list[dict] = []  # every row the scripted source returned from poll
COLLECTED: list[Batch] = []  # every batch a collecting sink accepted
EVENTS: list[tuple[str, Any]] = []  # sink lifecycle: ("open", ...), ("put", ...), ...


@pytest.fixture(autouse=True)
def _reset() -> None:
    EMITTED.clear()
    COLLECTED.clear()
    EVENTS.clear()


class ScriptSource(Source):
    """Emits the batches of a JSON script: a list of batches, each a list of rows; an item
    {"__error__": "raw"} becomes a source RecordError instead of a row."""

    name = "script"

    class Config(Config):
        script: str = setting(help="JSON file: a list of batches, each a list of rows.")
        fail_polls: int = setting(0, help="RetryableError from this many polls first.")

    def tasks(self) -> list[SourceTask]:
        return [ScriptTask(self.context.resolve(self.config.script), self.config.fail_polls)]


class ScriptTask(SourceTask):
    def __init__(self, script: Path, fail_polls: int) -> None:
        self.script = script
        self.fail_polls = fail_polls
        self.next = 0
        self.batches: list[list[dict]] = []

    async def open(self, offsets: dict[str, Any]) -> None:
        self.batches = json.loads(self.script.read_text())
        self.next = offsets.get("script", 0)

    async def poll(self) -> Batch | None:
        if self.fail_polls:
            self.fail_polls -= 1
            raise RetryableError("upstream is away", retry_after=0.01)
        if self.next >= len(self.batches):
            return None
        items = self.batches[self.next]
        self.next += 1
        rows, positions, errors = [], [], []
        for i, item in enumerate(items):
            where = f"script:{self.next}:{i}"
            if "__error__" in item:
                errors.append(RecordError(error="unreadable", stage="source", record=item["__error__"], position=where))
            else:
                rows.append(item)
                positions.append(where)
        EMITTED.extend(rows)
        return Batch(rows, source_offsets={"script": self.next}, errors=errors, positions=positions)


class CollectSink(Sink):
    name = "collect"

    class Config(Config):
        retry_puts: int = setting(0, help="RetryableError from this many puts first.")
        reject: list[int] = setting([], help="Return a RecordError for rows with these ids.")
        crash_on: int = setting(-1, help="Raise RuntimeError when a row with this id is put.")
        crash_on_put: int = setting(0, help="Raise RuntimeError from the Nth put (1-based).")
        put_delay: float = setting(0.0, help="Seconds each put takes.")
        durable_behind: int = setting(-1, help="flush() reports output durable only up to N records before the last put (-1: report nothing).")
        close_writes: bool = setting(False, help="close() reports everything put as durable.")

    def task(self) -> SinkTask:
        return CollectTask(self.config)


class ColumnsSink(CollectSink):
    name = "columns"
    wants = "columns"


class CollectTask(SinkTask):
    def __init__(self, config: Any) -> None:
        self.config = config
        self.retries_left = config.retry_puts
        self.puts = 0

    async def open(self, partitions):
        EVENTS.append(("open", sorted(partitions)))
        return None

    async def put(self, batch: Batch) -> list[RecordError] | None:
        EVENTS.append(("put", len(batch)))
        self.puts += 1
        if self.config.put_delay:
            await asyncio.sleep(self.config.put_delay)
        if self.puts == self.config.crash_on_put:
            raise RuntimeError(f"sink exploded on put {self.puts}")
        if self.retries_left:
            self.retries_left -= 1
            raise RetryableError("disk briefly away", retry_after=0.01)
        ids = [row.get("id") for row in batch.rows]
        if self.config.crash_on in ids:
            EVENTS.append(("crash", self.config.crash_on))
            raise RuntimeError(f"sink exploded on id {self.config.crash_on}")
        COLLECTED.append(batch)
        rejected = [
            RecordError(error="cannot write this one", stage="sink", record=row, position=f"{batch.topic}[{batch.partition}]@{off}")
            for row, off in zip(batch.rows, batch.record_offsets)
            if row.get("id") in self.config.reject
        ]
        return rejected or None

    async def flush(self):
        EVENTS.append(("flush", None))
        if self.config.durable_behind < 0 or not COLLECTED:
            return None
        last: dict[TopicPartition, int] = {}
        for b in COLLECTED:
            last[TopicPartition(b.topic, b.partition)] = b.last_offset + 1
        return {tp: max(0, end - self.config.durable_behind) for tp, end in last.items()}

    async def close(self):
        EVENTS.append(("close", None))
        if self.config.close_writes:
            return {TopicPartition(b.topic, b.partition): b.last_offset + 1 for b in COLLECTED}
        return None


def _plugin() -> types.ModuleType:
    module = types.ModuleType("worker_test_plugin")

    @hookimpl
    def register_connectors(register):
        for cls in (ScriptSource, CollectSink, ColumnsSink):
            register(cls)

    module.register_connectors = register_connectors
    return module


@pytest.fixture(scope="module")
def host():
    return load_plugins(_plugin())


# -- helpers -----------------------------------------------------------------------------------

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "amount", "type": "double"},
    ],
}


def write_script(tmp: Path, batches: list[list[dict]]) -> None:
    (tmp / "script.json").write_text(json.dumps(batches))


def write_spec(
    tmp: Path,
    *,
    schema: dict = SCHEMA,
    partitions: int = 4,
    key: str | None = "user",
    source_config: dict | None = None,
    sink: str | None = "collect",
    sink_config: dict | None = None,
    tolerance: str = "all",
) -> Path:
    topic: dict[str, Any] = {"partitions": partitions, "schema": schema}
    if key is not None:
        topic["key"] = key
    doc: dict[str, Any] = {
        "name": "wt",
        "topics": {"events": topic},
        "sources": [
            {"name": "in", "connector": "script", "topic": "events", "config": {"script": "script.json", **(source_config or {})}}
        ],
        "errors": {"tolerance": tolerance, **({"dead_letter_topic": "events-dlq"} if tolerance == "all" else {})},
    }
    if sink is not None:
        doc["sinks"] = [{"name": "out", "connector": sink, "topics": ["events"], "config": sink_config or {}}]
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


def events(n: int, *, users: int = 7, start: int = 1) -> list[dict]:
    seqs: dict[str, int] = defaultdict(int)
    out = []
    for i in range(start, start + n):
        user = f"user-{i % users}"
        seqs[user] += 1
        out.append({"id": i, "user": user, "seq": seqs[user], "amount": i / 2})
    return out


def chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


REPO = Path(__file__).resolve().parents[1]

RUN_SCRIPT = textwrap.dedent(
    """\
    import sys
    from runner import engine
    from runner.plugins import load_plugins
    from tests import test_worker

    host = load_plugins(test_worker._plugin())
    spec = engine.check_spec(sys.argv[1], host)
    try:
        engine.run(spec, host, once=True)
    except Exception as exc:
        print("raised", type(exc).__name__, exc, flush=True)
        sys.exit(3)
    print("finished", flush=True)
    """
)


def run_in_subprocess(spec_path: Path, *, timeout: float = 5.0) -> subprocess.CompletedProcess:
    """`engine.run(once=True)` in a child process with the in-test plugins; a run that
    hangs is killed rather than left to block the suite."""
    try:
        return subprocess.run(
            [sys.executable, "-c", RUN_SCRIPT, str(spec_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run hung (killed after {timeout}s)") from None


def consume(spec: Spec, topic: str) -> list[dict]:
    out: list[str] = []
    admin.consume(spec, topic, out.append, from_beginning=True, meta=True)
    return [json.loads(line) for line in out]


def end_offsets(spec: Spec, topic: str = "events") -> list[int]:
    return admin.describe_topics(spec, topic)[0].end_offsets


def counters(result: engine.RunResult) -> dict[str, Any]:
    return {c.name: c for c in result.counters}


def collected_rows() -> list[dict]:
    return [row for b in COLLECTED for row in b.rows]


# -- delivery ----------------------------------------------------------------------------------


def test_every_row_arrives_once_per_partition_as_murmur2_routes_its_key(tmp_path: Path, host) -> None:
    rows = events(500, users=13)
    write_script(tmp_path, chunks(rows, 60))
    spec = engine.check_spec(write_spec(tmp_path), host)
    before = int(time.time() * 1000)
    result = engine.run(spec, host, once=True)
    after = int(time.time() * 1000)

    got = collected_rows()
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]  # each once
    assert EMITTED == rows

    next_offset: dict[int, int] = defaultdict(int)
    for batch in COLLECTED:
        assert batch.topic == "events" and batch.partition in range(4)
        n = len(batch)
        assert n and len(batch.record_offsets) == len(batch.keys) == len(batch.timestamps) == n
        # Offsets continue where the previous batch of the partition stopped.
        assert list(batch.record_offsets) == list(range(next_offset[batch.partition], next_offset[batch.partition] + n))
        next_offset[batch.partition] += n
        for row, key, ts in zip(batch.rows, batch.keys, batch.timestamps):
            assert key == row["user"].encode()
            assert partition_for(key, 4) == batch.partition
            assert before <= ts <= after
    # Order within a key is kept end to end.
    last: dict[str, int] = {}
    for row in got:
        assert row["seq"] == last.get(row["user"], 0) + 1, row
        last[row["user"]] = row["seq"]

    assert end_offsets(spec) == [next_offset[p] for p in range(4)]
    c = counters(result)
    assert (c["in"].records_in, c["in"].records_out) == (500, 500)
    assert (c["out"].records_in, c["out"].records_out) == (500, 500)
    kinds = [e[0] for e in EVENTS]
    assert kinds[0] == "open" and kinds[-1] == "close" and kinds[-2] == "flush"
    assert EVENTS[0][1] == [TopicPartition("events", p) for p in range(4)]


def test_keyless_topic_spreads_batches_and_keys_are_none(tmp_path: Path, host) -> None:
    rows = events(40)
    write_script(tmp_path, chunks(rows, 10))
    spec = engine.check_spec(write_spec(tmp_path, key=None), host)
    engine.run(spec, host, once=True)
    assert sorted(r["id"] for r in collected_rows()) == [r["id"] for r in rows]
    assert all(k is None for b in COLLECTED for k in b.keys)
    # Sticky partitioning: one source batch lands whole in one partition, the next elsewhere.
    topic = consume(spec, "events")
    by_partition = defaultdict(list)
    for m in topic:
        by_partition[m["partition"]].append(m["value"]["id"])
    assert len(by_partition) == 4
    assert sorted(by_partition.values()) == sorted([r["id"] for r in c] for c in chunks(rows, 10))


def test_columns_sink_gets_arrow_typed_from_the_avro_schema(tmp_path: Path, host) -> None:
    schema = {
        "type": "record",
        "name": "Hit",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "user", "type": "string"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "size", "type": "int"},
            {"name": "ref", "type": ["null", "string"], "default": None},
        ],
    }
    base = int(datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    rows = [{"id": i, "user": f"u{i % 3}", "at": base + i, "size": i * 10, "ref": None if i % 2 else f"r{i}"} for i in range(20)]
    write_script(tmp_path, chunks(rows, 8))
    spec = engine.check_spec(write_spec(tmp_path, schema=schema, sink="columns"), host)
    engine.run(spec, host, once=True)

    assert COLLECTED
    seen = []
    for batch in COLLECTED:
        cols = batch.columns
        assert isinstance(cols, pa.RecordBatch)
        assert cols.schema.field("at").type == pa.timestamp("ms", tz="UTC")
        assert cols.schema.field("id").type == pa.int64()
        assert cols.schema.field("size").type == pa.int32()
        assert cols.schema.field("ref").type == pa.string() and cols.schema.field("ref").nullable
        assert not cols.schema.field("id").nullable
        seen += cols.to_pylist()
    seen.sort(key=lambda r: r["id"])
    assert [r["id"] for r in seen] == list(range(20))
    for r in seen:
        assert r["at"] == datetime.datetime.fromtimestamp((base + r["id"]) / 1000, tz=datetime.timezone.utc)
        assert r["size"] == r["id"] * 10 and r["ref"] == (None if r["id"] % 2 else f"r{r['id']}")


# -- retries -----------------------------------------------------------------------------------


def test_retryable_put_is_retried_with_the_same_batch(tmp_path: Path, host) -> None:
    rows = events(30)
    write_script(tmp_path, [rows])
    spec = engine.check_spec(write_spec(tmp_path, partitions=1, sink_config={"retry_puts": 2}), host)
    result = engine.run(spec, host, once=True)
    assert [r["id"] for r in collected_rows()] == [r["id"] for r in rows]
    puts = [e for e in EVENTS if e[0] == "put"]
    assert puts == [("put", 30)] * 3  # two failures, then the same batch succeeds
    c = counters(result)
    assert c["out"].retries == 2 and c["in"].retries == 0
    assert c["out"].records_out == 30


def test_retryable_poll_is_retried(tmp_path: Path, host) -> None:
    rows = events(25)
    write_script(tmp_path, chunks(rows, 10))
    spec = engine.check_spec(write_spec(tmp_path, source_config={"fail_polls": 3}), host)
    result = engine.run(spec, host, once=True)
    assert sorted(r["id"] for r in collected_rows()) == [r["id"] for r in rows]
    assert sum(end_offsets(spec)) == 25
    c = counters(result)
    assert c["in"].retries == 3 and c["in"].records_out == 25


# -- errors ------------------------------------------------------------------------------------


def test_sink_record_error_goes_to_the_dead_letter_topic(tmp_path: Path, host) -> None:
    rows = events(20)
    write_script(tmp_path, chunks(rows, 5))
    spec = engine.check_spec(write_spec(tmp_path, sink_config={"reject": [7]}), host)
    result = engine.run(spec, host, once=True)

    letters = [m["value"] for m in consume(spec, "events-dlq")]
    assert len(letters) == 1
    (letter,) = letters
    assert letter["stage"] == "sink" and letter["connector"] == "out" and letter["topic"] == "events"
    assert letter["error"] == "cannot write this one"
    assert json.loads(letter["record"]) == rows[6]
    assert letter["position"].startswith("events[")
    c = counters(result)["out"]
    assert (c.records_in, c.dead_lettered, c.errors) == (20, 1, 1)
    # The rejection does not hold the group back: a second run redelivers nothing.
    COLLECTED.clear()
    engine.run(spec, host, once=True)
    assert COLLECTED == []
    assert len(consume(spec, "events-dlq")) == 1


def test_sink_summary_does_not_count_rejected_records_as_written(tmp_path: Path, host) -> None:
    rows = events(20)
    write_script(tmp_path, chunks(rows, 5))
    spec = engine.check_spec(write_spec(tmp_path, sink_config={"reject": [7, 8]}), host)
    c = counters(engine.run(spec, host, once=True))["out"]
    assert (c.records_in, c.records_out, c.dead_lettered) == (20, 18, 2)


def test_tolerance_none_stops_naming_field_and_position_and_commits_nothing_of_the_batch(tmp_path: Path, host) -> None:
    rows = events(9)
    bad = dict(rows[4], amount="lots")  # second batch, second record
    batches = [rows[0:3], [rows[3], bad, rows[5]], rows[6:9]]
    write_script(tmp_path, batches)
    spec = engine.check_spec(write_spec(tmp_path, sink=None, tolerance="none"), host)

    with pytest.raises(DataError) as err:
        engine.run(spec, host, once=True)
    message = str(err.value)
    assert "'amount'" in message and "script:2:1" in message and "'id': 5" in message
    assert err.value.errors[0].field == "amount" and err.value.errors[0].position == "script:2:1"
    # Only the first batch reached the topic.
    assert sorted(m["value"]["id"] for m in consume(spec, "events")) == [1, 2, 3]
    assert sum(end_offsets(spec)) == 3

    # Fixed input: the rerun resumes at the failed batch (its offset was not committed).
    batches[1][1] = rows[4]
    write_script(tmp_path, batches)
    EMITTED.clear()
    engine.run(spec, host, once=True)
    assert [r["id"] for r in EMITTED] == [4, 5, 6, 7, 8, 9]
    assert sorted(m["value"]["id"] for m in consume(spec, "events")) == list(range(1, 10))


def test_tolerance_none_stops_even_when_the_source_is_ahead_of_the_producer(tmp_path: Path, host) -> None:
    # Many small batches: the poller fills the 4-batch queue while the producer commits.
    rows = events(200)
    batches = chunks(rows, 5)
    batches[3] = [dict(batches[3][0], amount="lots")] + batches[3][1:]
    write_script(tmp_path, batches)
    spec_path = write_spec(tmp_path, sink=None, tolerance="none")
    engine.check_spec(spec_path, host)
    done = run_in_subprocess(spec_path)
    assert done.returncode == 3 and "raised DataError" in done.stdout, done


def test_dead_letters_and_summary_counters_for_a_run_with_bad_records(tmp_path: Path, host) -> None:
    rows = events(12)
    batches = [
        rows[0:4] + [{"__error__": "{not json"}],
        [rows[4], dict(rows[5], amount="x"), rows[6]],
        [{"id": 99, "user": "nobody"}, *rows[7:12], {"__error__": "[1]"}],  # missing seq, amount
    ]
    write_script(tmp_path, batches)
    spec = engine.check_spec(write_spec(tmp_path), host)
    result = engine.run(spec, host, once=True)

    c = counters(result)
    src, snk = c["in"], c["out"]
    assert (src.kind, snk.kind) == ("source", "sink")
    assert src.records_in == 15  # records polled, and the two unreadable lines: read too
    assert src.records_out == 11
    assert src.dead_lettered == 4 and src.errors == 4
    assert src.records_in == src.records_out + src.filtered + src.dead_lettered and src.pending == 0
    assert (snk.records_in, snk.records_out, snk.dead_lettered, snk.errors) == (11, 11, 0, 0)
    assert sorted(r["id"] for r in collected_rows()) == [r["id"] for r in rows if r["id"] != 6]

    letters = [m["value"] for m in consume(spec, "events-dlq")]
    by_stage = defaultdict(list)
    for d in letters:
        by_stage[d["stage"]].append(d)
    assert sorted(d["record"] for d in by_stage["source"]) == ["[1]", "{not json"]
    assert sorted(d["field"] for d in by_stage["encode"]) == ["amount", "seq"]
    assert {d["position"] for d in by_stage["encode"]} == {"script:2:1", "script:3:0"}
    assert all(d["connector"] == "in" and d["topic"] == "events" for d in letters)


def test_sink_crash_aborts_the_run_closing_without_flush(tmp_path: Path, host) -> None:
    rows = events(30)
    write_script(tmp_path, chunks(rows, 10))
    spec = engine.check_spec(write_spec(tmp_path, partitions=1, sink_config={"crash_on": 15}), host)
    # Reported as one error naming the connector, with the original as its cause.
    with pytest.raises(FatalError, match="out: RuntimeError: sink exploded on id 15") as err:
        engine.run(spec, host, once=True)
    assert isinstance(err.value.__cause__, RuntimeError)
    kinds = [e[0] for e in EVENTS]
    assert "crash" in kinds
    after = kinds[kinds.index("crash") + 1 :]
    assert after == ["close"], EVENTS  # closed once, never flushed after the failing put
    # Nothing of the failed batch was committed for the group: a rerun delivers it again.
    COLLECTED.clear()
    EVENTS.clear()
    spec2 = engine.check_spec(write_spec(tmp_path, partitions=1), host)
    engine.run(spec2, host, once=True)
    assert 15 in [r["id"] for r in collected_rows()]


def test_sink_crash_aborts_even_with_a_full_queue(tmp_path: Path, host) -> None:
    # Slow puts: while one is under way the fetcher fills the 4-batch queue and waits to
    # add more; then a put fails.
    write_script(tmp_path, chunks(events(400, users=50), 5))
    spec_path = write_spec(tmp_path, sink_config={"put_delay": 0.05, "crash_on_put": 6})
    engine.check_spec(spec_path, host)
    done = run_in_subprocess(spec_path)
    assert done.returncode == 3 and "raised FatalError out: RuntimeError: sink exploded on put 6" in done.stdout, done


# -- source offsets ----------------------------------------------------------------------------


def test_a_second_run_resumes_after_the_stored_source_offsets(tmp_path: Path, host) -> None:
    rows = events(50)
    write_script(tmp_path, chunks(rows, 20))
    spec = engine.check_spec(write_spec(tmp_path), host)
    engine.run(spec, host, once=True)
    ends = end_offsets(spec)
    assert sum(ends) == 50 and len(EMITTED) == 50

    EMITTED.clear()
    COLLECTED.clear()
    result = engine.run(spec, host, once=True)
    assert EMITTED == []  # the source resumed after its last batch
    assert COLLECTED == []  # and the sink's group after its last flush
    assert end_offsets(spec) == ends
    c = counters(result)
    assert (c["in"].records_out, c["out"].records_in) == (0, 0)

    # New input appended to the script is picked up, and only it.
    write_script(tmp_path, chunks(rows, 20) + [events(5, start=51)])
    engine.run(spec, host, once=True)
    assert [r["id"] for r in EMITTED] == [51, 52, 53, 54, 55]
    assert sorted(r["id"] for r in collected_rows()) == [51, 52, 53, 54, 55]
    assert sum(end_offsets(spec)) == 55


# -- signals (subprocess) ----------------------------------------------------------------------

SIGNAL_SCRIPT = textwrap.dedent(
    """\
    import asyncio, sys, types
    from runner import engine
    from runner.batch import Batch
    from runner.connector import Config, Sink, SinkTask, Source, SourceTask, setting
    from runner.hookspecs import hookimpl
    from runner.plugins import load_plugins

    SLOW = sys.argv[2] == "slow"

    class Ticks(Source):
        name = "ticks"
        def tasks(self):
            return [TicksTask()]

    class TicksTask(SourceTask):
        async def open(self, offsets):
            self.n = offsets.get("n", 0)
        async def poll(self):
            if self.n >= 5:
                await asyncio.sleep(0.2)
                return Batch([])
            self.n += 5
            return Batch([{"n": i} for i in range(5)], source_offsets={"n": self.n})

    class Sleepy(Sink):
        name = "sleepy"
        def task(self):
            return SleepyTask()

    class SleepyTask(SinkTask):
        async def put(self, batch):
            print("ready", len(batch), flush=True)
        async def flush(self):
            print("flushing", flush=True)
            if SLOW:
                await asyncio.sleep(60)
            print("flushed", flush=True)
        async def close(self):
            print("closed", flush=True)

    plugin = types.ModuleType("signal_plugin")

    @hookimpl
    def register_connectors(register):
        register(Ticks)
        register(Sleepy)

    plugin.register_connectors = register_connectors
    host = load_plugins(plugin)
    spec = engine.check_spec(sys.argv[1], host)
    result = engine.run(spec, host)
    print("stopped", result.stopped_by_signal, flush=True)
    """
)


def start_signal_run(tmp: Path, mode: str) -> tuple[subprocess.Popen, queue.Queue]:
    spec = tmp / "spec.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "sig",
                "topics": {"ticks": {"partitions": 1, "schema": {"type": "record", "name": "T", "fields": [{"name": "n", "type": "long"}]}}},
                "sources": [{"name": "in", "connector": "ticks", "topic": "ticks"}],
                "sinks": [{"name": "out", "connector": "sleepy", "topics": ["ticks"]}],
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(spec), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_line(proc: subprocess.Popen, lines: queue.Queue, prefix: str, timeout: float = 20.0) -> list[str]:
    seen = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith(prefix):
            return seen
    proc.kill()
    raise AssertionError(f"no {prefix!r} line; saw {seen}; stderr: {proc.stderr.read()}")


def test_second_signal_exits_at_once_while_flush_hangs(tmp_path: Path) -> None:
    proc, lines = start_signal_run(tmp_path, "slow")
    try:
        wait_line(proc, lines, "ready")
        proc.send_signal(signal.SIGTERM)
        wait_line(proc, lines, "flushing")  # the (final or periodic) flush sleeps
        time.sleep(0.3)
        assert proc.poll() is None, "the first signal must wait for the flush"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert time.monotonic() - sent < 5
        assert proc.returncode == 128 + signal.SIGTERM
        stderr = proc.stderr.read()
        assert "second signal" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_single_signal_with_a_fast_flush_exits_zero(tmp_path: Path) -> None:
    proc, lines = start_signal_run(tmp_path, "fast")
    try:
        wait_line(proc, lines, "ready")
        proc.send_signal(signal.SIGTERM)
        seen = wait_line(proc, lines, "stopped", timeout=10)
        proc.wait(timeout=5)
        assert proc.returncode == 0, proc.stderr.read()
        assert seen[-1] == "stopped True"
        assert "flushed" in seen and "closed" in seen
        assert seen.index("closed") > max(i for i, l in enumerate(seen) if l == "flushed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sink_reporting_durable_offsets_gets_only_those_committed(tmp_path: Path, host) -> None:
    write_script(tmp_path, chunks(events(40), 10))
    spec = engine.check_spec(write_spec(tmp_path, partitions=1, sink_config={"durable_behind": 5}), host)
    engine.run(spec, host, once=True)
    described = admin.describe_topics(spec, "events")[0]
    assert described.groups["pipeline-wt-out"] == {0: 5}  # 5 records put but not durable: lag


def test_offsets_a_sink_reports_from_close_after_a_clean_stop_are_committed(tmp_path: Path, host) -> None:
    write_script(tmp_path, chunks(events(40), 10))
    config = {"durable_behind": 5, "close_writes": True}
    spec = engine.check_spec(write_spec(tmp_path, partitions=1, sink_config=config), host)
    engine.run(spec, host, once=True)
    described = admin.describe_topics(spec, "events")[0]
    assert described.groups["pipeline-wt-out"] == {0: 0}
