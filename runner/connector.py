"""The connector contract: what a source or sink connector is, and when each of its
methods is called. This module and `runner.batch` are all a connector imports.

A connector is two classes, as in Kafka Connect:

- the **connector** (`Source` or `Sink`): declared in a plugin, named, configured. It is a
  factory: the engine builds it from the spec's `config:` and asks it for tasks.
- the **task** (`SourceTask` or `SinkTask`): the running part that moves batches. Tasks
  are async; every method is awaited on the engine's event loop, so a task must not block
  it (run blocking I/O with `asyncio.to_thread`).

A minimal source::

    from runner.batch import Batch
    from runner.connector import Config, Source, SourceTask, hookimpl, setting

    class Numbers(Source):
        name = "numbers"
        class Config(Config):
            count: int = setting(100, help="How many numbers to emit.")

        def tasks(self):
            return [NumbersTask(self.config)]

    class NumbersTask(SourceTask):
        def __init__(self, config):
            self.config, self.next = config, 0
        async def open(self, offsets):
            self.next = offsets.get("numbers", 0)         # resume where we stopped
        async def poll(self):
            if self.next >= self.config.count:
                return None                               # exhausted
            rows = [{"n": n} for n in range(self.next, min(self.next + 1000, self.config.count))]
            self.next += len(rows)
            return Batch(rows, source_offsets={"numbers": self.next})

    @hookimpl
    def register_connectors(register):
        register(Numbers)

The `register_connectors` hook is documented in `runner.hookspecs`; `hookimpl` is
re-exported here so a connector module imports only this contract and `runner.batch`.

Offsets and resume
------------------
A source names its *source partitions* (a file, a table, a shard: any string) and gives,
with each batch, the *offset* reached in each partition after the batch's last record
(any JSON-serialisable value). The engine stores them only once the batch's records are
durable in the topic — on the embedded broker in the same transaction — and hands them back
to `SourceTask.open` on the next start. So a restarted source resumes exactly after the
last batch that reached the topic.

Sinks are told where their records came from (`Batch.topic`, `.partition`,
`.record_offsets`). The engine commits a sink's consumer position only after `flush`
returns, so whatever was not flushed is delivered again after a crash (at-least-once). A
sink that records offsets in its own output (for exactly-once) returns them from `open`.

Rows or columns
---------------
A source may return rows (a list of dicts) or columns (a `pyarrow.RecordBatch`). Columns
stay columns all the way to the topic: the engine partitions them by the key column and
encodes them a batch at a time, in compiled code, without making a dict per record. For
that, build them with `arrow_schema(avro_schema)`'s types (the topic's schema, or what
`produces()` returns); other types are cast where that loses nothing, and the batch goes
record by record where a value may not fit (the record that does not is named).

Errors
------
- Input a source cannot turn into a record (a malformed line) goes in `Batch.errors` as a
  `RecordError` with its position; the engine applies the spec's error policy.
- A record a sink cannot write is returned from `put` as a `RecordError`.
- Raise `RetryableError` when the outside world is briefly away: the engine retries the
  call with backoff (the same batch for `put`; `poll` is called again).
- Raise `FatalError` (or `ConfigError`) for what will not get better by retrying; the run
  stops with your message.
- A setting that does not fit the topics' schemas (`context.schemas`, known when the
  connector is built): raise `ConfigError([(key, message)])` from `__init__`; `pipeline
  validate` reports it at that key's line in the spec, before anything runs.
"""

from __future__ import annotations

import glob
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from runner.batch import Batch
from runner.broker.base import TopicPartition
from runner.config import Config, ConfigError, SettingInfo, setting
from runner.errors import FatalError, RecordError, RetryableError
from runner.hookspecs import hookimpl
from runner.schema.arrow import avro_to_arrow as arrow_schema

__all__ = [
    "Batch",
    "Config",
    "ConfigError",
    "ConnectorContext",
    "FatalError",
    "Progress",
    "RecordError",
    "RetryableError",
    "SettingInfo",
    "Sink",
    "SinkTask",
    "Source",
    "SourceTask",
    "TopicPartition",
    "arrow_schema",
    "hookimpl",
    "setting",
    "task_of",
]


@dataclass(frozen=True)
class ConnectorContext:
    """What the engine tells a connector about where it runs."""

    name: str  # the connector's name in the spec (e.g. "access-logs")
    pipeline: str  # the spec's `name`
    spec_dir: Path  # relative paths in config are relative to this
    state_dir: Path  # a directory the connector may keep private state in
    topics: tuple[str, ...]  # the source's topic, or the sink's topics
    # topic -> its Avro value schema (raw topics have none); for a sink, the schema of its
    # records as its transform chain leaves them, the dead-letter topic's included
    schemas: dict[str, dict]
    partitions: dict[str, int] = field(default_factory=dict)  # topic -> partition count
    # A source's `tasks: N` in the spec: `Source.tasks()` may return up to this many tasks
    # (as Kafka Connect's tasks.max); on Kafka they spread over the pipeline's processes.
    max_tasks: int = 1

    def resolve(self, path: str | Path) -> Path:
        """A config path made absolute against the spec's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.spec_dir / p

    def unmatched(self, patterns: list[str]) -> list[tuple[str, str]]:
        """`preflight` warnings for the globs (relative to the spec) that match no file."""
        return [
            ("paths", f"{pattern!r} matches no file (yet) in {self.spec_dir}")
            for pattern in patterns
            if not any(os.path.isfile(p) for p in glob.iglob(str(self.resolve(pattern)), recursive=True))
        ]

    def display(self, path: str | Path) -> str:
        """A config path as a user finds it: resolved, and relative to the working
        directory when it lies under it (for `target()`)."""
        resolved = os.path.abspath(self.resolve(path))
        relative = os.path.relpath(resolved)
        return resolved if relative.startswith("..") else relative


def task_of(partition: str, tasks: int) -> int:
    """Which of `tasks` tasks (0 .. tasks - 1) owns a source partition, by its name: the
    CRC-32 of the name's UTF-8 bytes, modulo `tasks`. The same in every process and on
    every machine (Python's `hash()` is salted per process), so a partition, and its
    offset, stays with its task from run to run as long as `tasks` is unchanged. With one
    task, every partition is task 0's."""
    return zlib.crc32(partition.encode("utf-8", "surrogateescape")) % tasks if tasks > 1 else 0


class _Connector:
    #: The name specs use in `connector:`. Unique per kind (a source and a sink may share).
    name: ClassVar[str]
    #: One line shown by `pipeline connectors list`.
    description: ClassVar[str] = ""
    #: The typed config; override with a nested `class Config(Config)`.
    Config: ClassVar[type[Config]] = Config

    def __init__(self, config: Any, context: ConnectorContext) -> None:
        """Called once per run with the validated config. Do no I/O here: open files and
        connections in the task's `open`."""
        self.config = config
        self.context = context

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        return cls.Config.settings()

    def target(self) -> str | None:
        """Where this connector reads or writes — a path, a glob, a URL without credentials
        — shown in the run summary so users find their data. None (the default) shows
        nothing. Never include secrets."""
        return None

    def preflight(self) -> list[tuple[str, str]]:
        """Warnings worth giving before anything runs, as (config key, message): a glob
        that matches no file, an output directory that does not exist yet. Called by
        `pipeline validate` and at the start of `pipeline run`; quick checks only (a glob,
        a stat), no connections. Problems that stop the connector are errors of its
        Config (`Config.check`) or of its task's `open`, not warnings."""
        return []


class SourceTask:
    """The running part of a source. Lifecycle, in order:

    1. `open(offsets)` — once. `offsets` are the stored source offsets of this connector
       (source partition -> offset) from earlier runs; empty on the first run. Open files
       and connections here and position yourself after those offsets.
    2. `poll()` — repeatedly, never concurrently with itself. Return:
       - a `Batch` of records (rows or columns) with `source_offsets` set to where each
         source partition stands after the batch, and `errors` for bad input;
       - an empty `Batch` when nothing is available right now (wait a little inside
         `poll` first — up to about a second — rather than returning at once);
       - `None` when the source is exhausted for good (a bounded source).
       `poll` may be cancelled while it waits (on shutdown); it must keep no half-done
       state that a cancellation would corrupt. Records of a batch that was returned
       but not yet committed are simply read again after a restart.
    3. `committed(offsets)` — after a batch's records and offsets are durable. Optional:
       for sources that must acknowledge upstream (delete a file, ack a queue).
    4. `close()` — once, always, whether the run ended cleanly, failed, or was stopped.
       Release what `open` took. No `poll` follows. It may come without `open` (the run
       failed before the task was opened): release only what exists.

    Reading ahead: on Kafka a process learns which source tasks it runs only when its
    group's first round ends, a few seconds after it starts. A task whose class sets
    `read_ahead = True` is opened and polled meanwhile, the batches kept in memory and
    nothing written; if the process then runs the task from the same stored offsets, it
    goes on with them, and otherwise the task is closed (a new one runs, or none). Set it
    only when `open` and `poll` change nothing outside the task (reading files: yes;
    taking messages off a queue or advancing a server-side cursor: no).
    """

    #: May `open` and `poll` run before this process knows it runs the task? See above.
    read_ahead: ClassVar[bool] = False

    async def open(self, offsets: dict[str, Any]) -> None:
        return None

    async def poll(self) -> Batch | None:
        raise NotImplementedError

    async def committed(self, offsets: dict[str, Any]) -> None:
        return None

    async def close(self) -> None:
        return None

    def progress(self) -> Progress | None:
        """How far the task has got through input of a known size, for the progress
        display of `pipeline run` (done / total, rate, ETA). Optional: None (the default)
        for a source that cannot know its size (a queue, a followed file). Called about
        once a second on the event loop, between polls: return what you know, do no I/O.
        """
        return None


@dataclass(frozen=True)
class Progress:
    """What `SourceTask.progress` reports: `done` of `total`, in `unit`s."""

    done: int
    total: int
    unit: Literal["bytes", "records", "files"] = "bytes"


class Source(_Connector):
    """A source connector: reads from the outside world into one topic.

    Subclass it, set `name`, declare `Config`, and implement `tasks()`. The engine encodes
    each batch against the topic's Avro schema (records that do not fit are data errors),
    keys and partitions it, and produces it.
    """

    def tasks(self) -> list[SourceTask]:
        """The tasks to run, each polled independently. Called more than once (the engine
        takes task i from a call of its own, again at each tick of a schedule), so build
        fresh tasks and do no I/O here; the number of tasks must not change between calls.

        Return up to `self.context.max_tasks` tasks: the spec's `tasks: N` (Kafka Connect's
        `tasks.max`), 1 when not given. Fewer is fine — one, for a source that cannot
        divide its work. Each task must own distinct source partitions, and the split must
        be *stable*: for a given N the same partition always goes to the same task, in
        every run and every process (on Kafka the tasks of one source run in different
        processes, each of which calls `tasks()`). `task_of(name, N)` is such a split by
        a partition's name; never split with `hash()`, which differs per process.

        Offsets of all tasks are stored under the connector, and every task's `open` is
        given all of them: a task ignores those of partitions it does not own. When N
        changes, a partition that moves to another task resumes there from its offset.
        """
        raise NotImplementedError

    def produces(self) -> dict[str, Any] | None:
        """The Avro record schema of the records this source produces, when the source
        knows it before reading anything (from its format, a table's columns); None (the
        default) when it cannot know (JSON lines, a CSV whose header is in the data).

        `pipeline validate` compares it, as the source's transform chain leaves it, with
        the topic's schema: a field the topic requires that the source never produces is
        an error, a produced field the topic lacks is a warning (at run time such fields
        are dropped before encoding, and counted). Only field names are compared; types
        are checked record by record, by the encoder. Called once per spec check, never
        while records flow; do no I/O here.
        """
        return None


class SinkTask:
    """The running part of a sink. Lifecycle, in order:

    1. `open(partitions)` — once per assignment, before any `put`. Returns `None` to
       start from the consumer group's committed offsets, or a dict
       `{TopicPartition: next_offset}` for sinks that keep their own position in their
       output (exactly-once sinks). On Kafka, when another process of the pipeline joins
       or leaves the consumer group, only the partitions that change hands move. To give
       some up, or take some, the engine holds the flow, calls `flush` (and commits), then
       `open` with the partitions it has from now on; each listed partition resumes from
       the offset you return for it (or the group's commit), so you may drop what you hold
       unflushed for any of them. Drop whatever is still held for partitions not in the
       list, and write nothing more for them (their new owner reads them again from the
       committed offset, or from your output's position).
    2. `put(batch)` — repeatedly, one topic-partition per batch, in offset order. Buffer
       or write; nothing needs to be durable yet. Return `RecordError`s for records that
       cannot be written (they follow the error policy), or None.
    3. `flush()` — make everything `put` so far durable and return None; the engine then
       commits the consumer offsets of everything put. A sink that lands data on its own
       schedule (a file closed when it is big enough) may instead keep records buffered
       and return `{TopicPartition: next_offset}` — how far its output is durable; only
       that is committed. Called about once a second while records flow, and before
       `close` on a clean stop. If it raises, nothing is committed.
    4. `close()` — once, always (also without `open`, if the run failed before the task
       was opened). On a clean stop `flush` has run first. On abort (a fatal
       error elsewhere, a second signal) `close` runs without `flush`: discard what was
       not flushed — it will be delivered again on restart. A sink whose `flush` reports
       offsets may write out what it still holds when closing after a clean stop and
       return `{TopicPartition: next_offset}` again; the engine commits that, so the
       consumer group shows no lag after a clean stop. Return None otherwise.

    A `kill -9` runs nothing: a sink must never leave half-written output that readers
    would take as committed (write to a temporary name and rename, use transactions, or
    record the committed length beside the output, as the `jsonl` sink does).
    """

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int] | None:
        return None

    async def put(self, batch: Batch) -> list[RecordError] | None:
        raise NotImplementedError

    async def flush(self) -> dict[TopicPartition, int] | None:
        return None

    async def close(self) -> dict[TopicPartition, int] | None:
        return None


class Sink(_Connector):
    """A sink connector: writes one or more topics to the outside world.

    Subclass it, set `name`, declare `Config`, and implement `task()`. Set `wants` to
    `"columns"` if the task reads `batch.columns` (Arrow); the engine then builds batches
    with the Arrow schema derived from the topic's Avro schema. Set it to `"raw"` for a
    sink that copies bytes (a mirror): records are not decoded, `batch.values` holds each
    value as it is in the topic, beside `keys`, `timestamps` and `headers`; such a sink
    may also read raw topics (declared without a schema).
    """

    wants: ClassVar[Literal["rows", "columns", "raw"]] = "rows"

    def task(self) -> SinkTask:
        """The task that consumes this sink's topics (one per process)."""
        raise NotImplementedError

    def compact(self, *, dry_run: bool = False) -> list[str] | None:
        """Merge small pieces of this sink's output into fewer, larger ones, for
        `pipeline compact`. Optional: None (the default) says the sink has nothing to
        compact. Return one line per change made (with `dry_run`: that would be made).

        Called outside the flow of records, possibly while a `pipeline run` of the same
        spec is writing: the change must be atomic for the sink's own recovery (a crash at
        any moment leaves output from which `SinkTask.open` resumes exactly once) and must
        not race the running task (take a lock the task also takes while it scans its
        output). Raise `FatalError` with a hint for what cannot be done.
        """
        return None
