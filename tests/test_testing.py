"""runner.testing, the harness for plugin authors: the built-in connectors pass it,
deliberately broken connectors fail it with messages that say what is wrong, and
`run_spec` runs a spec with the `scripted` source and the `list` sink."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from connectors.jsonl import JsonlSink, JsonlSource
from connectors.transforms import Rename
from runner import testing
from runner.batch import Batch
from runner.config import ConfigError
from runner.connector import (
    Config,
    RecordError,
    Sink,
    SinkTask,
    Source,
    SourceTask,
    TopicPartition,
    hookimpl,
    setting,
)
from runner.plugins import load_plugins
from runner.testing import (
    ConformanceError,
    ListSink,
    ScriptedSource,
    check_sink,
    check_source,
    check_transform,
    run_spec,
)
from runner.transform import Transform

pytestmark = pytest.mark.timeout(120)

N_SCHEMA = {
    "type": "record",
    "name": "N",
    "fields": [{"name": "n", "type": "long"}, {"name": "file", "type": "string"}],
}


# -- helpers ----------------------------------------------------------------------------------


def write_inputs(tmp: Path, files: int = 3, lines: int = 25, bad_line: bool = True) -> list[dict]:
    records = []
    for k in range(files):
        text = []
        for n in range(lines):
            record = {"n": n, "file": f"f{k}"}
            records.append(record)
            text.append(json.dumps(record))
            if bad_line and k == 1 and n == 10:
                text.append("{not json")
        path = tmp / "in" / f"f{k}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text) + "\n")
    return records


def read_jsonl_output(directory: Path) -> list[dict]:
    """What the jsonl sink has committed: each file up to the size its .offset records."""
    rows = []
    for data in sorted(directory.glob("*.jsonl")):
        marker = data.with_name(data.name + ".offset")
        if not marker.exists():
            continue
        size = json.loads(marker.read_text())["size"]
        with open(data, "rb") as f:
            text = f.read(size).decode("utf-8")
        rows += [json.loads(line) for line in text.splitlines() if line]
    return rows


def failure(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# -- sources that pass ------------------------------------------------------------------------


def test_jsonl_source_passes(tmp_path):
    expected = write_inputs(tmp_path)
    records = check_source(
        JsonlSource, {"paths": ["in/*.jsonl"], "batch_size": 10}, tmp_path=tmp_path, schema=N_SCHEMA
    )
    assert records == expected


def test_jsonl_source_follow_mode_passes_as_an_unbounded_source(tmp_path):
    expected = write_inputs(tmp_path, files=2, lines=12, bad_line=False)
    records = check_source(
        JsonlSource, {"paths": ["in/*.jsonl"], "batch_size": 5, "follow": True}, tmp_path=tmp_path, idle_polls=2
    )
    assert records == expected


SCRIPT = [
    {"records": [{"n": 0}, {"n": 1}]},
    {"pause": 0.1},
    {"error": "a bad line", "record": "{not json"},
    {"fail": "the world is away", "times": 2},
    {"records": [{"n": 2}]},
    {"records": [{"n": 3}, {"n": 4}, {"n": 5}]},
    {"records": [{"n": 6}]},
    {"end": True},
    {"records": [{"n": 99}]},  # after the end: never delivered
]


def test_scripted_source_passes():
    records = check_source(ScriptedSource, {"script": SCRIPT})
    assert records == [{"n": n} for n in range(7)]


def test_scripted_source_with_follow_is_unbounded():
    script = [{"records": [{"n": n}]} for n in range(6)]
    records = check_source(ScriptedSource, {"script": script, "follow": True}, idle_polls=3)
    assert records == [{"n": n} for n in range(6)]


def test_scripted_source_config_names_the_step():
    with pytest.raises(ConfigError) as excinfo:
        ScriptedSource.Config.parse({"script": [
            {"records": [{"n": 1}, 7]},
            {"pause": -1},
            {"records": [], "end": True},
            {"fail": "x", "times": 0},
            {"end": False},
            {"error": "x", "colour": "red"},
        ]})
    keys = [key for key, _ in excinfo.value.problems]
    assert keys == ["script[0].records[1]", "script[1].pause", "script[2]", "script[3].times", "script[4].end",
                    "script[5].colour"]
    with pytest.raises(ConfigError) as excinfo:
        ScriptedSource.Config.parse({"script": [{"records": []}, "oops"]})
    assert [key for key, _ in excinfo.value.problems] == ["script[1]"]


# -- sinks that pass --------------------------------------------------------------------------


def test_jsonl_sink_passes(tmp_path):
    check_sink(JsonlSink, {"path": "out"}, read=lambda: read_jsonl_output(tmp_path / "out"), tmp_path=tmp_path)
    # Everything put ended up in the output exactly once (the jsonl sink is exactly-once).
    ids = sorted(row["id"] for row in read_jsonl_output(tmp_path / "out"))
    assert ids == list(range(len(ids))) and len(ids) >= 300


def test_list_sink_passes():
    ListSink.received.clear()
    check_sink(ListSink, {}, read=lambda: ListSink.received.get("conformance", []))
    assert len(ListSink.received["conformance"]) >= 300
    ListSink.received.clear()


COLUMNS_OUT: list[dict] = []

EVENT_SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tag", "type": ["null", "string"], "default": None},
    ],
}


def make_event(i: int) -> dict:
    at = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=i)
    return {"id": i, "at": at, "tag": None if i % 3 else f"t{i}"}


class ColumnsSink(Sink):
    """A correct sink that reads the column view (as Parquet writers do)."""

    name = "columns-test"
    wants = "columns"

    def task(self) -> SinkTask:
        return ColumnsTask()


class ColumnsTask(SinkTask):
    def __init__(self) -> None:
        self.held: list[dict] = []

    async def put(self, batch: Batch) -> None:
        assert batch.arrow_schema is not None and batch.columns.schema == batch.arrow_schema
        self.held += batch.columns.to_pylist()

    async def flush(self) -> None:
        COLUMNS_OUT.extend(self.held)
        self.held = []

    async def close(self) -> None:
        self.held = []


def test_columns_sink_with_own_schema_passes():
    COLUMNS_OUT.clear()
    check_sink(ColumnsSink, {}, read=lambda: COLUMNS_OUT, schema=EVENT_SCHEMA, make_record=make_event, records=60)
    assert COLUMNS_OUT[0]["at"] == make_event(0)["at"]


REJECTING_OUT: list[dict] = []


class RejectingSink(Sink):
    """A correct sink that cannot write every seventh record (and says so)."""

    name = "rejecting-test"

    def task(self) -> SinkTask:
        return RejectingTask()


class RejectingTask(SinkTask):
    def __init__(self) -> None:
        self.held: list[dict] = []

    async def put(self, batch: Batch) -> list[RecordError] | None:
        errors = []
        for i, row in enumerate(batch.rows):
            if row["id"] % 7 == 0:
                errors.append(RecordError(error="sevens are not allowed", stage="sink", record=row,
                                          position=batch.position(i)))
            else:
                self.held.append(row)
        return errors or None

    async def flush(self) -> None:
        REJECTING_OUT.extend(self.held)
        self.held = []

    async def close(self) -> None:
        self.held = []


def test_sink_returning_record_errors_passes():
    REJECTING_OUT.clear()
    check_sink(RejectingSink, {}, read=lambda: REJECTING_OUT)
    assert REJECTING_OUT and all(row["id"] % 7 for row in REJECTING_OUT)


# -- broken sinks -----------------------------------------------------------------------------

BROKEN_OUT: list[dict] = []


class DropsOnClose(Sink):
    """Writes a partition's previous batch when the next one comes; flush says all is
    durable but keeps the last batch of each partition; close throws it away."""

    name = "drops-on-close"

    def task(self) -> SinkTask:
        return DropsOnCloseTask()


class DropsOnCloseTask(SinkTask):
    def __init__(self) -> None:
        self.last: dict[int, list[dict]] = {}

    async def put(self, batch: Batch) -> None:
        BROKEN_OUT.extend(self.last.get(batch.partition, []))
        self.last[batch.partition] = list(batch.rows)

    async def flush(self) -> None:
        return None  # a lie: the last batch of each partition is still held

    async def close(self) -> None:
        self.last = {}


def test_sink_that_drops_records_on_close_fails():
    BROKEN_OUT.clear()
    with pytest.raises(ConformanceError) as excinfo:
        check_sink(DropsOnClose, {}, read=lambda: BROKEN_OUT)
    message = failure(excinfo)
    # 300 records in batches of 50, alternating partitions: the last batch of each is held.
    assert (
        "- flush before close: 100 of 300 records are missing from the output after flush() returned None "
        "(which promises everything put so far is durable) and close(); e.g. {" in message
    )
    assert "Rule (SinkTask.flush)" in message
    assert "flush before close" in excinfo.value.failures
    assert "config" in excinfo.value.passed


class OverclaimingFlush(Sink):
    """flush reports offsets past what it was given."""

    name = "overclaiming"

    def task(self) -> SinkTask:
        return OverclaimingTask()


class OverclaimingTask(SinkTask):
    def __init__(self) -> None:
        self.next: dict[TopicPartition, int] = {}
        self.held: list[dict] = []

    async def put(self, batch: Batch) -> None:
        self.held += batch.rows
        self.next[TopicPartition(batch.topic, batch.partition)] = batch.last_offset + 1

    async def flush(self) -> dict[TopicPartition, int]:
        BROKEN_OUT.extend(self.held)
        self.held = []
        return {tp: offset + 10 for tp, offset in self.next.items()}

    async def close(self) -> None:
        self.held = []


def test_sink_whose_flush_claims_offsets_it_never_got_fails():
    BROKEN_OUT.clear()
    with pytest.raises(ConformanceError) as excinfo:
        check_sink(OverclaimingFlush, {}, read=lambda: BROKEN_OUT)
    message = failure(excinfo)
    assert ("- flush before close: flush() returned conformance[0]: 160, but records were put to conformance[0] "
            "only up to offset 149 (next offset 150): a sink cannot have made durable what it was never given"
            in message)


class HalfWritingFlush(Sink):
    """flush says everything is durable (as offsets) but writes only half of it."""

    name = "half-writing"

    def task(self) -> SinkTask:
        return HalfWritingTask()


class HalfWritingTask(SinkTask):
    def __init__(self) -> None:
        self.next: dict[TopicPartition, int] = {}
        self.held: list[dict] = []

    async def put(self, batch: Batch) -> None:
        self.held += batch.rows
        self.next[TopicPartition(batch.topic, batch.partition)] = batch.last_offset + 1

    async def flush(self) -> dict[TopicPartition, int]:
        BROKEN_OUT.extend(self.held[: len(self.held) // 2])
        self.held = []
        return dict(self.next)

    async def close(self) -> None:
        self.held = []


def test_sink_whose_flush_lies_about_durability_fails():
    BROKEN_OUT.clear()
    with pytest.raises(ConformanceError) as excinfo:
        check_sink(HalfWritingFlush, {}, read=lambda: BROKEN_OUT)
    message = failure(excinfo)
    assert ("- flush before close: 150 of 300 records are missing from the output after flush() returned "
            "{conformance[0]: 150, conformance[1]: 150} and close(); e.g." in message)
    assert "- resume after restart: 50 of 400 records are missing" in message


class ResumesTooFar(Sink):
    """Claims, on open, to have written more than it was ever given."""

    name = "resumes-too-far"

    def task(self) -> SinkTask:
        return ResumesTooFarTask()


class ResumesTooFarTask(SinkTask):
    def __init__(self) -> None:
        self.held: list[dict] = []

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 1000 for tp in partitions}

    async def put(self, batch: Batch) -> None:
        self.held += batch.rows

    async def flush(self) -> None:
        BROKEN_OUT.extend(self.held)
        self.held = []


def test_sink_resuming_past_what_was_put_fails():
    BROKEN_OUT.clear()
    with pytest.raises(ConformanceError) as excinfo:
        check_sink(ResumesTooFar, {}, read=lambda: BROKEN_OUT)
    message = failure(excinfo)
    assert "open() returned conformance[0]: 1000, but only 150 records were ever put to conformance[0]" in message


class SyncPut(Sink):
    name = "sync-put"

    def task(self) -> SinkTask:
        return SyncPutTask()


class SyncPutTask(SinkTask):
    def put(self, batch: Batch) -> None:  # forgot `async`
        return None


def test_sink_with_a_sync_method_fails_with_a_hint():
    with pytest.raises(ConformanceError) as excinfo:
        check_sink(SyncPut, {}, read=lambda: [])
    assert "is not a coroutine: declare it with `async def`" in failure(excinfo)


# -- broken sources ---------------------------------------------------------------------------


class Counting(Source):
    """Records {"n": 0..count-1} in batches of 10, with offset {"n": next}."""

    name = "counting-test"

    class Config(Config):
        count: int = setting(50, help="How many records.")

    def tasks(self) -> list[SourceTask]:
        return [self.Task(self.config.count)]

    class Task(SourceTask):
        def __init__(self, count: int) -> None:
            self.count = count
            self.next = 0

        async def open(self, offsets: dict[str, Any]) -> None:
            self.next = offsets.get("n", 0)

        async def poll(self) -> Batch | None:
            if self.next >= self.count:
                return None
            end = min(self.next + 10, self.count)
            rows = [{"n": n} for n in range(self.next, end)]
            self.next = end
            return Batch(rows, source_offsets=self.offsets(end))

        def offsets(self, end: int) -> dict[str, Any]:
            return {"n": end}


def test_a_correct_counting_source_passes():
    assert check_source(Counting, {}) == [{"n": n} for n in range(50)]


class RestartsFromZero(Counting):
    class Task(Counting.Task):
        async def open(self, offsets: dict[str, Any]) -> None:
            self.next = 0  # ignores its offsets


def test_source_that_does_not_resume_fails():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(RestartsFromZero, {})
    message = failure(excinfo)
    assert ('- resume after restart: a new task opened with the offsets committed through batch 3 of 5 ({"n": 30}) '
            "must deliver exactly the 20 records after that batch, then the end; it delivered 50: 30 repeat records "
            'delivered and committed before the restart (duplicates), e.g. {"n": 0}' in message)
    assert "Rule (SourceTask.open)" in message
    assert "- simulated crash:" in message
    assert set(excinfo.value.passed) == {"config", "read all", "close is always safe"}


class NonJsonOffsets(Counting):
    class Task(Counting.Task):
        def offsets(self, end: int) -> dict[str, Any]:
            return {"n": end, "at": datetime.datetime(2024, 1, 1)}


def test_source_with_non_json_offsets_fails():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(NonJsonOffsets, {})
    message = failure(excinfo)
    assert "- read all: batch 0: source_offsets" in message
    assert "are not JSON-serialisable (Object of type datetime is not JSON serializable)" in message
    assert excinfo.value.skipped == {
        "resume after restart": "needs a task that got through `read all`",
        "simulated crash": "needs a task that got through `read all`",
    }


class OffsetsRunAhead(Counting):
    class Task(Counting.Task):
        def offsets(self, end: int) -> dict[str, Any]:
            return {"n": end + 5}  # claims records it has not delivered


def test_source_whose_offsets_run_ahead_loses_records():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(OffsetsRunAhead, {})
    message = failure(excinfo)
    assert "5 of the expected records are missing (lost)" in message
    assert "- simulated crash: a task polled 1 batch past the committed offsets" in message


class NoHelp(Counting):
    class Config(Config):
        count: int = setting(50, help="")
        token: str = setting("", help="An API token.", secret=True)

        def __repr__(self) -> str:  # shows the secret
            return f"NoHelp.Config(count={self.count}, token={self.token!r})"


def test_config_problems_fail():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(NoHelp, {})
    message = failure(excinfo)
    assert "- config: setting 'count' has no help text" in message
    assert "- config: repr() of the parsed config shows the value of secret setting 'token'" in message
    assert list(excinfo.value.failures) == ["config"]


class Hangs(Counting):
    class Task(Counting.Task):
        async def poll(self) -> Batch | None:
            await asyncio.sleep(60)


def test_hanging_poll_fails_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(testing, "TIMEOUT", 0.2)
    with pytest.raises(ConformanceError) as excinfo:
        check_source(Hangs, {})
    assert "- read all: poll() did not return within 0.2 s" in failure(excinfo)


class TwoTasks(Counting):
    """Two tasks, each with its own source partition (offsets {"t0": n} and {"t1": n})."""

    def tasks(self) -> list[SourceTask]:
        return [self.Task(i, self.config.count) for i in range(2)]

    class Task(SourceTask):
        def __init__(self, index: int, count: int) -> None:
            self.key, self.count, self.next = f"t{index}", count + index * 7, 0

        async def open(self, offsets: dict[str, Any]) -> None:
            self.next = offsets.get(self.key, 0)

        async def poll(self) -> Batch | None:
            if self.next >= self.count:
                return None
            end = min(self.next + 10, self.count)
            rows = [{"task": self.key, "n": n} for n in range(self.next, end)]
            self.next = end
            return Batch(rows, source_offsets={self.key: end})


def test_source_with_two_tasks_passes():
    records = check_source(TwoTasks, {"count": 30})
    assert records == [{"task": "t0", "n": n} for n in range(30)] + [{"task": "t1", "n": n} for n in range(37)]


def test_config_that_does_not_parse_stops_the_checks():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(Counting, {"count": "many"})
    message = failure(excinfo)
    assert "- config: the config given to the check does not parse: count: expected int, got str 'many'" in message
    assert "not run: read all (the config does not parse)" in message


class TwoTasksOnePartition(Counting):
    def tasks(self) -> list[SourceTask]:
        return [self.Task(self.config.count), self.Task(self.config.count)]


def test_tasks_sharing_a_source_partition_fail():
    with pytest.raises(ConformanceError) as excinfo:
        check_source(TwoTasksOnePartition, {})
    assert "- read all: tasks 0 and 1 both give offsets for source partition 'n'" in failure(excinfo)


# -- transforms -------------------------------------------------------------------------------

ROW_SCHEMA = {
    "type": "record",
    "name": "Row",
    "fields": [{"name": "host", "type": "string"}, {"name": "bytes", "type": "long"}],
}


def test_rename_transform_passes():
    rows = check_transform(Rename, {"fields": {"host": "client"}}, records=[{"host": "a", "bytes": 1}],
                           schema=ROW_SCHEMA)
    assert rows == [{"client": "a", "bytes": 1}]


class OnlyPositive(Transform):
    """A correct transform that refuses records with negative bytes, as data errors."""

    name = "only-positive"

    def apply(self, batch: Batch) -> Batch:
        kept, rows, errors = [], [], []
        for i, row in enumerate(batch.rows):
            if row["bytes"] < 0:
                errors.append(self.record_error(batch, i, "negative bytes", field="bytes"))
            else:
                kept.append(i)
                rows.append(row)
        return batch.derive(rows, kept=kept, errors=errors)


@pytest.mark.parametrize("side", ["source", "sink"])
def test_transform_reporting_record_errors_passes(side):
    records = [{"host": "a", "bytes": 1}, {"host": "b", "bytes": -1}, {"host": "c", "bytes": 3}]
    rows = check_transform(OnlyPositive, {}, records=records, schema=ROW_SCHEMA, side=side)
    assert rows == [records[0], records[2]]


class Careless(Transform):
    """Drops records without `kept`, changes its schema argument, reports errors of the
    wrong stage and declares a field its rows lack."""

    name = "careless"

    def apply(self, batch: Batch) -> Batch:
        rows = [row for row in batch.rows if row["bytes"] > 1]
        error = RecordError(error="too small", stage="source", record=batch.rows[0])
        return Batch(rows, errors=[error])

    def schema(self, schema: dict) -> dict:
        schema["fields"].append({"name": "extra", "type": "string"})
        return schema


def test_careless_transform_fails():
    with pytest.raises(ConformanceError) as excinfo:
        check_transform(Careless, {}, records=[{"host": "a", "bytes": 1}, {"host": "b", "bytes": 2}],
                        schema=ROW_SCHEMA)
    message = failure(excinfo)
    assert ("- bookkeeping: the output batch lost the positions, record_offsets, keys, timestamps of its records: "
            "build it with batch.derive(rows, kept=[index of the input record of each output record])" in message)
    assert "- output schema: schema(schema) modified its argument" in message
    assert ("- output schema: output record 0 does not fit schema(schema): field 'extra' is missing and has no "
            "default" in message)
    assert "- record errors: a RecordError of stage 'source'" in message


def test_careless_transform_on_a_source_loses_the_source_offsets():
    with pytest.raises(ConformanceError) as excinfo:
        check_transform(Careless, {}, records=[{"host": "a", "bytes": 2}], schema=ROW_SCHEMA, side="source")
    message = failure(excinfo)
    assert ("- bookkeeping: the output batch's source_offsets are {}, not the input's {'conformance': 1}: on a "
            "source the engine commits the offsets of the batch that leaves the chain" in message)


class Raises(Transform):
    name = "raises"

    def apply(self, batch: Batch) -> Batch:
        raise ValueError("cannot")


def test_transform_raising_fails():
    with pytest.raises(ConformanceError) as excinfo:
        check_transform(Raises, {}, records=[{"host": "a", "bytes": 1}], schema=ROW_SCHEMA, side="source")
    assert "- apply returns a batch: apply() raised ValueError: cannot" in failure(excinfo)


# -- run_spec ---------------------------------------------------------------------------------


def test_run_spec_with_scripted_source_and_list_sink(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: harness
        topics:
          numbers:
            partitions: 1
            schema: {type: record, name: N, fields: [{name: n, type: long}]}
        sources:
          - name: script
            connector: scripted
            topic: numbers
            config:
              script:
                - records: [{n: 1}, {n: 2}]
                - pause: 0.2
                - error: "a bad line"
                - records: [{n: 3}]
        sinks:
          - name: out
            connector: list
            topics: [numbers]
        errors: {tolerance: all, dead_letter_topic: numbers-dlq}
    """))
    ListSink.received.clear()
    result = run_spec(spec)
    assert ListSink.received["out"] == [{"n": 1}, {"n": 2}, {"n": 3}]
    counters = {c.name: c for c in result.counters}
    assert (counters["script"].records_out, counters["script"].errors, counters["script"].dead_lettered) == (3, 1, 1)
    assert counters["out"].records_out == 3
    ListSink.received.clear()


def test_the_test_connectors_are_not_installed_plugins():
    host = load_plugins()
    names = {(r.kind, r.name) for r in host.registrations()}
    assert ("source", "scripted") not in names and ("sink", "list") not in names


@hookimpl
def register_connectors(register):
    """This test module is a plugin too, for run_spec: it registers `counting-test`."""
    register(Counting)


@pytest.mark.parametrize("as_name", [False, True])
def test_run_spec_with_an_authors_plugin(tmp_path, as_name):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: author
        topics:
          numbers: {partitions: 2, schema: {type: record, name: N, fields: [{name: n, type: long}]}, key: n}
        sources:
          - {name: count, connector: counting-test, topic: numbers, config: {count: 25}}
        sinks:
          - {name: collected, connector: list, topics: [numbers]}
    """))
    ListSink.received.clear()
    run_spec(spec, plugins=[__name__ if as_name else sys.modules[__name__]])
    assert sorted(row["n"] for row in ListSink.received["collected"]) == list(range(25))
    ListSink.received.clear()


def test_make_record_that_does_not_fit_the_schema_is_a_usage_error():
    with pytest.raises(ValueError, match=r"make_record\(0\) does not fit the schema: field 'at'"):
        check_sink(ListSink, {}, read=lambda: [], schema=EVENT_SCHEMA, make_record=lambda i: {"id": i, "at": "x"})
