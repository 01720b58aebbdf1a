"""The `sqlite` sink: upserts records into a SQLite table by key, exactly once.

Each flush writes the buffered records with `INSERT ... ON CONFLICT (key) DO UPDATE` and,
in the same transaction, each topic-partition's next offset into `_pipeline_offsets`. On
open the sink resumes from that table, so after a crash or a restart the database holds
each record's effect once: what was committed is never written again, what was not is
delivered again.

Types (the table is created from the topic's Avro schema):

    Avro                                  SQLite
    boolean                               INTEGER (0 or 1)
    int, long                             INTEGER
    float, double                         REAL
    string, enum, uuid                    TEXT
    bytes, fixed                          BLOB
    decimal                               TEXT (exact, e.g. "12.30")
    timestamp-millis / -micros            TEXT, ISO 8601 in UTC: 2026-11-20T06:00:00.000Z
    local-timestamp-millis / -micros      TEXT, ISO 8601 without zone
    date                                  TEXT 2026-11-20
    time-millis / -micros                 TEXT 06:00:00.000
    record, array, map                    TEXT, JSON
    [null, X]                             X, nullable; other fields are NOT NULL
    other unions                          no declared type (SQLite keeps each value's own)

Timestamps are ISO text rather than integer millis: SQLite has no timestamp type, and its
date functions (`datetime(updated_at)`, `strftime`, `unixepoch`) read ISO 8601 text
directly, as do people running `select * from orders`. All values of a column have the
same precision and zone, so they also sort in time order.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import decimal
import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro

from runner.batch import Batch, json_default
from runner.connector import (
    Config,
    FatalError,
    RecordError,
    RetryableError,
    Sink,
    SinkTask,
    TopicPartition,
    setting,
)

OFFSETS_TABLE = "_pipeline_offsets"

Convert = Callable[[Any], Any]


class SqliteSink(Sink):
    name = "sqlite"
    description = "Upserts records into SQLite tables by key (one table per topic), exactly once."

    class Config(Config):
        path: str = setting(help="The database file (created if missing), relative to the spec's directory.")
        key: list[str] = setting(help="The primary-key fields: a later record with the same key replaces the row.")
        table: str | None = setting(
            None, help="The table to write (default: the topic's name). Only with a single topic."
        )
        create: bool = setting(
            True,
            help="Create the table from the topic's Avro schema if missing, and add columns for "
            "fields the table lacks. If false, the table must exist with every field as a column.",
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            key = given.get("key")
            if isinstance(key, list) and all(isinstance(k, str) for k in key):
                if not key:
                    return [("key", "needs at least one field")]
                if len(set(key)) != len(key):
                    return [("key", "names a field twice")]
            if given.get("table") == "":
                return [("table", "must not be empty (omit it to use the topic's name)")]
            return []

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        topics = context.topics
        if config.table is not None and len(topics) > 1:
            # One table per topic: the topics' schemas differ, and two topics upserting into
            # one table by the same key would overwrite each other's rows in no set order.
            raise FatalError(
                f"{context.name}: config.table is only valid with one topic; this sink reads "
                f"{len(topics)} ({', '.join(topics)}) and writes each to a table named after it",
                hint="drop `table`, or use one sink per topic",
            )
        self.tables = {t: config.table or t for t in topics}
        if OFFSETS_TABLE in self.tables.values():
            raise FatalError(f"{context.name}: the table name {OFFSETS_TABLE!r} is the sink's own",
                             hint="set `table` to another name")
        for topic in topics:
            schema = context.schemas.get(topic)
            if schema is None:
                raise FatalError(f"{context.name}: topic {topic!r} has no schema; the sqlite sink needs one")
            names = [f["name"] for f in schema.get("fields", [])]
            missing = [k for k in config.key if k not in names]
            if missing:
                raise FatalError(
                    f"{context.name}: config.key: {', '.join(map(repr, missing))} not in topic {topic!r}'s "
                    f"schema (fields: {', '.join(names)})",
                    hint="`key` names the fields of the table's primary key",
                )

    def target(self) -> str:
        return self.context.display(self.config.path)

    def task(self) -> SinkTask:
        tables = {
            topic: TableWriter(table, self.context.schemas[topic], self.config.key)
            for topic, table in self.tables.items()
        }
        return SqliteSinkTask(self.context.resolve(self.config.path), tables, self.config.create, self.context.name)


class TableWriter:
    """One table: its columns from the Avro schema, the converters, the upsert statement."""

    def __init__(self, table: str, schema: dict, key: list[str]) -> None:
        self.table = table
        self.key = list(key)
        self.columns: list[tuple[str, str, bool, Convert | None]] = []  # name, type, nullable, convert
        # Named types used by reference are written out in full where they are used.
        expanded = fastavro.parse_schema(copy.deepcopy(schema), expand=True, _write_hint=False)
        for f in expanded["fields"]:
            declared, nullable, convert = sqlite_type(f["type"])
            self.columns.append((f["name"], declared, nullable, convert))
        self.names = [c[0] for c in self.columns]
        self.key_index = [self.names.index(k) for k in self.key]
        self.converters = [(i, c[3]) for i, c in enumerate(self.columns) if c[3] is not None]
        cols = ", ".join(map(quote, self.names))
        marks = ", ".join("?" * len(self.names))
        others = [n for n in self.names if n not in self.key]
        action = (
            "DO UPDATE SET " + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in others)
            if others else "DO NOTHING"
        )
        self.upsert = (
            f"INSERT INTO {quote(table)} ({cols}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(map(quote, self.key))}) {action}"
        )

    def create_sql(self) -> str:
        defs = [
            f"{quote(name)}{' ' + declared if declared else ''}{'' if nullable else ' NOT NULL'}"
            for name, declared, nullable, _ in self.columns
        ]
        defs.append(f"PRIMARY KEY ({', '.join(map(quote, self.key))})")
        return f"CREATE TABLE {quote(self.table)} (\n  " + ",\n  ".join(defs) + "\n)"

    def prepare(self, conn: sqlite3.Connection, create: bool, sink: str) -> None:
        """Create the table or check the one there: every field a column, a unique
        constraint on exactly the key columns (what ON CONFLICT needs)."""
        existing = [row[1] for row in conn.execute(f"PRAGMA table_info({quote(self.table)})")]
        if not existing:
            if not create:
                raise FatalError(
                    f"{sink}: table {self.table!r} does not exist",
                    hint="create it (with a primary key or unique index on the key), or set `create: true`",
                )
            conn.execute(self.create_sql())
            return
        missing = [c for c in self.columns if c[0] not in existing]
        if missing and not create:
            raise FatalError(
                f"{sink}: table {self.table!r} has no column {', '.join(repr(c[0]) for c in missing)}",
                hint="add the columns (ALTER TABLE ... ADD COLUMN), or set `create: true`",
            )
        for name, declared, _, _ in missing:  # a field added to the schema: a nullable column
            conn.execute(f"ALTER TABLE {quote(self.table)} ADD COLUMN {quote(name)} {declared}".rstrip())
        if not self._has_unique_key(conn):
            raise FatalError(
                f"{sink}: table {self.table!r} has no primary key or unique index on exactly "
                f"({', '.join(self.key)}), which upserts by key need",
                hint=f"CREATE UNIQUE INDEX ... ON {self.table} ({', '.join(self.key)}), or let the sink create the table",
            )

    def _has_unique_key(self, conn: sqlite3.Connection) -> bool:
        want = set(self.key)
        for index in conn.execute(f"PRAGMA index_list({quote(self.table)})").fetchall():
            name, unique, partial = index[1], index[2], index[4]
            if not unique or partial:
                continue
            columns = {row[2] for row in conn.execute(f"PRAGMA index_info({quote(name)})")}
            if columns == want:
                return True
        # An INTEGER PRIMARY KEY is the rowid and has no index of its own.
        pk = {row[1] for row in conn.execute(f"PRAGMA table_info({quote(self.table)})") if row[5]}
        return pk == want

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """The row as parameters of the upsert, in column order."""
        values = [row.get(name) for name in self.names]
        for i, convert in self.converters:
            if values[i] is not None:
                values[i] = convert(values[i])
        return tuple(values)


class SqliteSinkTask(SinkTask):
    def __init__(self, path: Path, tables: dict[str, TableWriter], create: bool, name: str) -> None:
        self.path = path
        self.tables = tables
        self.create = create
        self.name = name
        self.conn: sqlite3.Connection | None = None
        self.assigned: set[TopicPartition] = set()
        # Put since the last flush: per topic, key -> row values (the latest wins), and
        # the offset after the last record put of each topic-partition.
        self.pending: dict[TopicPartition, dict[tuple, tuple]] = {}
        self.next_offsets: dict[TopicPartition, int] = {}

    # All sqlite3 calls run in a worker thread (`asyncio.to_thread`), one at a time: the
    # connection is made with check_same_thread=False and never used concurrently.

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.assigned = set(partitions)
        # Whatever is held for partitions given up is dropped: their new owner reads it again.
        self.pending = {tp: rows for tp, rows in self.pending.items() if tp in self.assigned}
        self.next_offsets = {tp: o for tp, o in self.next_offsets.items() if tp in self.assigned}
        return await asyncio.to_thread(self._open, sorted(partitions))

    def _open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise FatalError(f"{self.name}: cannot open {self.path}: {exc}") from None
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {OFFSETS_TABLE} ("
                    " table_name TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                    " next_offset INTEGER NOT NULL, PRIMARY KEY (table_name, topic, partition))"
                )
                for writer in self.tables.values():
                    writer.prepare(conn, self.create, self.name)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        stored = {
            (topic, partition): offset
            for table, topic, partition, offset in self.conn.execute(
                f"SELECT table_name, topic, partition, next_offset FROM {OFFSETS_TABLE}"
            )
            if topic in self.tables and self.tables[topic].table == table
        }
        # A partition the database has never seen starts at 0: the database is the truth,
        # whatever the consumer group committed for an older copy of it.
        return {tp: stored.get((tp.topic, tp.partition), 0) for tp in partitions}

    async def put(self, batch: Batch) -> list[RecordError] | None:
        if not len(batch):
            return None
        tp = TopicPartition(batch.topic, batch.partition)
        if tp not in self.assigned:
            return None
        writer = self.tables[batch.topic]
        rows = self.pending.setdefault(tp, {})
        errors: list[RecordError] = []
        key_index = writer.key_index
        for index, row in enumerate(batch.rows):
            try:
                values = writer.values(row)
            except (TypeError, ValueError) as exc:
                errors.append(RecordError(error=f"sqlite: {exc}", stage="sink", record=row,
                                          position=batch.position(index)))
                continue
            key = tuple(values[i] for i in key_index)
            if None in key:
                null = writer.key[key.index(None)]
                errors.append(RecordError(error=f"sqlite: key field {null!r} is null", stage="sink",
                                          record=row, field=null, position=batch.position(index)))
                continue
            rows[key] = values  # a later version of the key replaces the earlier one
        self.next_offsets[tp] = batch.last_offset + 1
        return errors or None

    async def flush(self) -> None:
        if not self.next_offsets:
            return None
        pending, offsets = self.pending, self.next_offsets
        await asyncio.to_thread(self._write, pending, offsets)
        # Cleared only once committed: if the write failed, a retried flush writes it all.
        self.pending, self.next_offsets = {}, {}
        return None

    def _write(self, pending: dict[TopicPartition, dict[tuple, tuple]], offsets: dict[TopicPartition, int]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for tp, rows in pending.items():
                    if rows:
                        conn.executemany(self.tables[tp.topic].upsert, rows.values())
                conn.executemany(
                    f"INSERT INTO {OFFSETS_TABLE} (table_name, topic, partition, next_offset) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (table_name, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    [(self.tables[tp.topic].table, tp.topic, tp.partition, o) for tp, o in offsets.items()],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _is_transient(exc):  # locked by another writer, disk briefly full: try again
                raise RetryableError(f"{self.name}: {self.path}: {exc}") from exc
            raise FatalError(f"{self.name}: writing {self.path} failed: {exc}") from None
        except sqlite3.IntegrityError as exc:
            raise FatalError(
                f"{self.name}: {self.path}: {exc}",
                hint="the table has constraints the records do not meet (check its definition)",
            ) from None

    async def close(self) -> None:
        # After a clean stop `flush` has run; on abort what is pending is dropped and
        # delivered again on restart (the database's offsets say from where).
        self.pending, self.next_offsets = {}, {}
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await asyncio.to_thread(conn.close)
        return None


def _is_transient(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return any(s in message for s in ("locked", "busy", "disk is full", "disk i/o error"))


def quote(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


# --- Avro -> SQLite types ---------------------------------------------------------------


def _iso_timestamp(digits: int, zone: str) -> Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, datetime.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
            text = value.isoformat(timespec="microseconds")
            return text[: len(text) - 6 + digits] + zone
        return value  # already a number or text: kept as it is

    return convert


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else value


def _time_millis(value: Any) -> Any:
    return value.isoformat(timespec="milliseconds") if isinstance(value, datetime.time) else value


def _json(value: Any) -> str:
    return json.dumps(value, default=json_default, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> Any:
    return value if isinstance(value, str) else str(value)


def _any(value: Any) -> Any:
    """A value of a multi-type union, by its Python type."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str, bytes)):
        return value
    if isinstance(value, datetime.datetime):
        return _iso_timestamp(3 if value.microsecond % 1000 == 0 else 6, "Z" if value.tzinfo else "")(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    return _json(value)


# logicalType -> (the Avro types it applies to, SQLite type, converter). A logical type on
# another type is ignored, as the Avro spec says.
_LOGICAL: dict[str, tuple[tuple[str, ...], str, Convert]] = {
    "timestamp-millis": (("long",), "TEXT", _iso_timestamp(3, "Z")),
    "timestamp-micros": (("long",), "TEXT", _iso_timestamp(6, "Z")),
    "timestamp-nanos": (("long",), "TEXT", _iso_timestamp(6, "Z")),
    "local-timestamp-millis": (("long",), "TEXT", _iso_timestamp(3, "")),
    "local-timestamp-micros": (("long",), "TEXT", _iso_timestamp(6, "")),
    "local-timestamp-nanos": (("long",), "TEXT", _iso_timestamp(6, "")),
    "date": (("int",), "TEXT", _iso),
    "time-millis": (("int",), "TEXT", _time_millis),
    "time-micros": (("long",), "TEXT", _iso),
    "decimal": (("bytes", "fixed"), "TEXT", _text),
    "uuid": (("string",), "TEXT", _text),
}

_PRIMITIVE: dict[str, tuple[str, Convert | None]] = {
    "null": ("", None),
    "boolean": ("INTEGER", int),
    "int": ("INTEGER", None),
    "long": ("INTEGER", None),
    "float": ("REAL", None),
    "double": ("REAL", None),
    "string": ("TEXT", None),
    "bytes": ("BLOB", bytes),
}


def sqlite_type(avro: Any) -> tuple[str, bool, Convert | None]:
    """(declared SQLite type, nullable, converter or None) for an Avro field type."""
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        nullable = len(branches) < len(avro)
        if len(branches) == 1:
            declared, _, convert = sqlite_type(branches[0])
            return declared, nullable, convert
        return "", nullable, _any  # several types: no affinity, each value as it is
    if isinstance(avro, str):
        if avro in _PRIMITIVE:
            declared, convert = _PRIMITIVE[avro]
            return declared, avro == "null", convert
        return "", False, _any  # a named type defined elsewhere in the schema
    kind, logical = avro.get("type"), avro.get("logicalType")
    if logical in _LOGICAL and kind in _LOGICAL[logical][0]:
        _, declared, convert = _LOGICAL[logical]
        return declared, False, convert
    if kind in ("record", "error", "array", "map"):
        return "TEXT", False, _json
    if kind == "enum":
        return "TEXT", False, None
    if kind == "fixed":
        return "BLOB", False, bytes
    if isinstance(kind, (str, list, dict)):
        return sqlite_type(kind)  # {"type": "long"} and other wrapped types
    return "", False, _any
