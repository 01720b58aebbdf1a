"""The embedded broker: durable topics in SQLite in the state directory.

One `pipeline run` process writes a state directory (it holds an exclusive `flock` on
`run.lock`, which names its pid); any number of read-only brokers (`pipeline consume`,
`pipeline topics`) may read it at the same time, from other processes.

Storage (`state_dir/broker.db`, WAL mode, synchronous=FULL, page size 16 KiB):

- `topics(id INTEGER PRIMARY KEY, name TEXT UNIQUE, partitions INT, created INT)` —
  `created` in epoch milliseconds.
- `batches_<topic id>_<partition>(end_offset INTEGER PRIMARY KEY, count INT, size INT,
  payload BLOB)` — one table per topic-partition, append-only. A row is a stored batch:
  the `count` records of one produce call to the partition, at offsets `end_offset -
  count` up to `end_offset` (exclusive), their keys, values, timestamps and headers as an
  LZ4-compressed Arrow record batch of `size` bytes (see `stored_batches`). Keyed by
  `end_offset`, the batch holding offset `o` is the first row with `end_offset > o`: a
  range scan of the table's own b-tree, for a fetch from any offset. Offsets are 0, 1, 2,
  ... with no gaps. (Layout 1 kept one row per record: 3.1 µs to write and 1.8 µs to read
  a record, and about 260 bytes of state per activity record; a writer opening a layout-1
  state directory migrates it, in one transaction.) Table names use the topic's id, so
  any topic name is safe; `SELECT id FROM topics WHERE name = ?` finds it.
- `source_offsets(connector, partition TEXT, offset TEXT)`: JSON-encoded offsets.
- `group_offsets(group_id, topic, partition, next_offset)`: consumer group commits.
- `PRAGMA user_version` is the schema version.

Exactly-once source -> topic: `produce` writes all its records and the source offsets in
one transaction. Durability: once a transaction commits, its WAL frames are fsynced
(synchronous=FULL), so a kill -9 (or power loss) after `produce` returns loses nothing.

All SQLite calls run in worker threads (`asyncio.to_thread`). Writes go through one
connection, serialised by an asyncio.Lock (and a thread lock, so that a cancelled caller
whose thread is still running cannot overlap the next write). Each consumer reads through
its own connection. Consumers wake as soon as an in-process produce to one of their topics
commits, and poll every 100 ms otherwise (records written by another process).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from runner.broker.base import (
    FetchedBatch,
    ProduceBatch,
    SourceOffsetCommit,
    TopicInfo,
    TopicPartition,
)
from runner.broker.stored_batches import COLUMNS, decode_headers, pack, unpack
from runner.errors import FatalError, PipelineError, RetryableError
from runner.sqlite import connect_read_only

__all__ = ["EmbeddedBroker", "EmbeddedConsumer"]

log = logging.getLogger("pipeline.broker")

SCHEMA_VERSION = 2  # 1: one row per record; 2: stored batches
DB_NAME = "broker.db"
LOCK_NAME = "run.lock"
POLL_INTERVAL = 0.1  # seconds between database polls of a waiting fetch
BUSY_TIMEOUT = 10.0  # seconds SQLite waits on a lock held by another connection
_PAGE_SIZE = 16384
_STATEMENT_CACHE = 1024  # two statements per partition table, plus a few

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    partitions INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS source_offsets (
    connector TEXT NOT NULL,
    partition TEXT NOT NULL,
    offset TEXT NOT NULL,
    PRIMARY KEY (connector, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
"""

_UPSERT_SOURCE = (
    "INSERT INTO source_offsets (connector, partition, offset) VALUES (?, ?, ?) "
    "ON CONFLICT (connector, partition) DO UPDATE SET offset = excluded.offset"
)
_UPSERT_GROUP = (
    "INSERT INTO group_offsets (group_id, topic, partition, next_offset) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = excluded.next_offset"
)

T = TypeVar("T")


def _table(topic_id: int, partition: int) -> str:
    return f"batches_{topic_id}_{partition}"


_CREATE_PARTITION = (
    "CREATE TABLE {} (end_offset INTEGER PRIMARY KEY, count INTEGER NOT NULL, size INTEGER NOT NULL, "
    "payload BLOB NOT NULL)"
)


def _db_error(exc: sqlite3.Error, doing: str) -> PipelineError:
    """Busy, full or I/O-failing databases are retried; anything else stops the run."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR")):
        return RetryableError(f"{doing}: {exc}")
    return FatalError(f"{doing}: {exc} ({name or type(exc).__name__})")


class _Topic:
    __slots__ = ("id", "name", "partitions", "tables")

    def __init__(self, id: int, name: str, partitions: int) -> None:
        self.id = id
        self.name = name
        self.partitions = partitions
        self.tables = [_table(id, p) for p in range(partitions)]


class _Conn:
    """A connection plus the thread lock that serialises its use."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.lock:
            return fn(self.conn)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class EmbeddedBroker:
    """The `Broker` on SQLite. See the module docstring."""

    distributed = False  # one process owns the state directory

    def __init__(self, state_dir: Path, *, read_only: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.read_only = read_only
        self.db_path = self.state_dir / DB_NAME
        self._lock_fd: int | None = None
        self._writer: _Conn | None = None
        self._reader: _Conn | None = None
        self._write_lock = asyncio.Lock()
        self._topics: dict[str, _Topic] = {}
        # Next offset per (topic, partition). Authoritative in the writer: it is the only
        # process writing this state directory (run.lock), and it updates this only
        # after a commit. Read-only brokers ask the database instead.
        self._next: dict[tuple[str, int], int] = {}
        self._consumers: set[EmbeddedConsumer] = set()
        self._started = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        if self.read_only:
            if not self.db_path.exists():
                raise self._no_topics_yet()
            self._reader = reader = _Conn(await asyncio.to_thread(self._connect))
            try:
                version = await self._read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
                if version == 0:  # the writer has not created the schema yet
                    raise self._no_topics_yet()
                self._check_version(version)
                if version < SCHEMA_VERSION:
                    raise FatalError(
                        f"{self.db_path} is in the layout of an older version of pipeline (layout {version}, "
                        f"this version reads {SCHEMA_VERSION})",
                        hint="`pipeline run` on its spec moves it to the new layout as it starts; or inspect it "
                        "with the version that wrote it",
                    )
            except BaseException:
                self._reader = None
                await asyncio.to_thread(reader.close)
                raise
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            try:
                self._writer = _Conn(await asyncio.to_thread(self._open_writer))
                self._reader = _Conn(await asyncio.to_thread(self._connect))
            except BaseException:
                self._release_lock()
                raise
        self._started = True

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.close()
        async with self._write_lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    await asyncio.to_thread(conn.close)
            self._writer = self._reader = None
            self._release_lock()
            self._started = False

    def _no_topics_yet(self) -> FatalError:
        return FatalError(
            f"state directory {self.state_dir} has no topics yet",
            hint="start `pipeline run` on the spec first (or check `state_dir`)",
        )

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise FatalError(
                f"{self.db_path} was written by a newer version of pipeline "
                f"(schema {version}, this version reads {SCHEMA_VERSION})",
                hint="upgrade pipeline, or use another state directory",
            )

    def _acquire_lock(self) -> None:
        path = self.state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FatalError(
                f"state directory {self.state_dir} is in use by another `pipeline run` (pid {pid})",
                hint="stop that run first, or give this one another `state_dir`",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _connect(self, *, write: bool = False) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit BEGIN/COMMIT).

        A read-only broker opens the file with `mode=ro`; the writer's read connections
        are `query_only`, so nothing but the writer connection can change the database.
        """
        try:
            if self.read_only:
                conn = connect_read_only(
                    self.db_path, isolation_level=None, check_same_thread=False,
                    timeout=BUSY_TIMEOUT, cached_statements=_STATEMENT_CACHE,
                )
            else:
                conn = sqlite3.connect(
                    self.db_path, isolation_level=None, check_same_thread=False,
                    timeout=BUSY_TIMEOUT, cached_statements=_STATEMENT_CACHE,
                )
                conn.execute("PRAGMA synchronous = FULL" if write else "PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise _db_error(exc, f"cannot open {self.db_path}") from exc
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect(write=True)
        try:
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")  # only takes on a new file
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise FatalError(f"cannot put {self.db_path} in WAL mode")
            conn.execute("PRAGMA cache_size = -16384")  # 16 MiB
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
            if version == 1:
                _migrate_from_layout_1(conn, self.db_path)
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            for id_, name, partitions in conn.execute("SELECT id, name, partitions FROM topics"):
                topic = _Topic(id_, name, partitions)
                self._topics[name] = topic
                for p, table in enumerate(topic.tables):
                    self._next[(name, p)] = conn.execute(f"SELECT max(end_offset) FROM {table}").fetchone()[0] or 0
        except sqlite3.Error as exc:
            conn.close()
            raise _db_error(exc, f"cannot open {self.db_path}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # -- plumbing ------------------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise FatalError("embedded broker used before start() or after close()")

    async def _read(self, fn: Callable[[sqlite3.Connection], T], doing: str = "read") -> T:
        reader = self._reader
        if reader is None:
            raise FatalError("embedded broker used before start() or after close()")
        try:
            return await asyncio.to_thread(reader.run, fn)
        except sqlite3.Error as exc:
            raise _db_error(exc, f"{doing} in {self.db_path}") from exc

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        doing: str,
        after_commit: Callable[[T], None] | None = None,
    ) -> T:
        """Run `fn` in one IMMEDIATE transaction on the writer connection, then
        `after_commit(result)` in the same thread (so that a caller cancelled while the
        thread runs cannot skip it: in-memory state never lags behind the database)."""
        if self.read_only:
            raise FatalError(f"cannot {doing}: the broker is open read-only")
        self._check_started()

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if after_commit is not None:
                after_commit(result)
            return result

        async with self._write_lock:
            writer = self._writer
            if writer is None:
                raise FatalError("embedded broker used after close()")
            try:
                return await asyncio.to_thread(writer.run, transaction)
            except sqlite3.Error as exc:
                raise _db_error(exc, f"{doing} in {self.db_path}") from exc

    async def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None and self.read_only:  # another process may have created it
            await self._load_topics()
            topic = self._topics.get(name)
        if topic is None:
            known = ", ".join(sorted(self._topics)) or "none"
            raise FatalError(
                f"topic {name!r} does not exist in {self.state_dir}",
                hint=f"declare it under `topics:` in the spec (topics: {known})",
            )
        return topic

    async def _load_topics(self) -> None:
        rows = await self._read(lambda c: c.execute("SELECT id, name, partitions FROM topics").fetchall())
        self._topics = {name: _Topic(id_, name, n) for id_, name, n in rows}

    # -- topics --------------------------------------------------------------------

    async def ensure_topic(self, name: str, partitions: int) -> None:
        if not name or partitions < 1:
            raise FatalError(f"invalid topic {name!r} with {partitions} partitions")
        if self.read_only:
            await self._load_topics()
        topic = self._topics.get(name)
        if topic is None:
            topic = await self._write(
                lambda c: self._create_topic(c, name, partitions),
                f"create topic {name!r}",
                after_commit=self._register,
            )
        if topic.partitions != partitions:
            raise FatalError(
                f"topic {name!r} has {topic.partitions} partitions in {self.state_dir}, "
                f"but {partitions} were asked for",
                hint="the partition count of a topic cannot change (keys would move to other "
                "partitions); use a new topic name or a new state directory",
            )

    def _register(self, topic: _Topic) -> None:
        if topic.name not in self._topics:
            self._topics[topic.name] = topic
            for p in range(topic.partitions):
                self._next[(topic.name, p)] = 0

    @staticmethod
    def _create_topic(conn: sqlite3.Connection, name: str, partitions: int) -> _Topic:
        row = conn.execute("SELECT id, partitions FROM topics WHERE name = ?", (name,)).fetchone()
        if row is not None:  # created by a concurrent ensure_topic
            return _Topic(row[0], name, row[1])
        cur = conn.execute(
            "INSERT INTO topics (name, partitions, created) VALUES (?, ?, ?)",
            (name, partitions, int(time.time() * 1000)),
        )
        topic = _Topic(cur.lastrowid or 0, name, partitions)
        for table in topic.tables:
            conn.execute(_CREATE_PARTITION.format(table))
        return topic

    async def topics(self) -> list[TopicInfo]:
        if self.read_only:
            await self._load_topics()
        return [
            TopicInfo(name, t.partitions, await self.end_offsets(name))
            for name, t in sorted(self._topics.items())
        ]

    async def end_offsets(self, topic: str) -> list[int]:
        t = await self._topic(topic)
        if not self.read_only:
            return [self._next[(topic, p)] for p in range(t.partitions)]

        def ends(conn: sqlite3.Connection) -> list[int]:
            return [conn.execute(f"SELECT max(end_offset) FROM {table}").fetchone()[0] or 0 for table in t.tables]

        return await self._read(ends, f"end offsets of {topic!r}")

    # -- produce -------------------------------------------------------------------

    async def produce(
        self,
        batches: list[ProduceBatch],
        source_offsets: SourceOffsetCommit | None = None,
    ) -> None:
        if self.read_only:
            raise FatalError("cannot produce: the broker is open read-only")
        # Check everything before the transaction: a bad call stores nothing at all.
        plan: list[tuple[tuple[str, int], str, ProduceBatch]] = []
        for b in batches:
            topic = await self._topic(b.topic)
            if not 0 <= b.partition < topic.partitions:
                raise FatalError(
                    f"partition {b.partition} out of range for topic {b.topic!r} "
                    f"({topic.partitions} partitions)"
                )
            n = len(b.values)
            if len(b.keys) != n or len(b.timestamps) != n or (b.headers is not None and len(b.headers) != n):
                raise ValueError(f"ProduceBatch for {b.topic}[{b.partition}]: lists differ in length")
            if n:
                plan.append(((b.topic, b.partition), topic.tables[b.partition], b))
        offset_rows: list[tuple[str, str, str]] = []
        if source_offsets is not None:
            try:
                offset_rows = [
                    (source_offsets.connector, str(part), json.dumps(off, sort_keys=True, separators=(",", ":")))
                    for part, off in source_offsets.offsets.items()
                ]
            except (TypeError, ValueError) as exc:
                raise FatalError(f"source {source_offsets.connector!r}: offset is not JSON-serialisable: {exc}") from exc
        if not plan and not offset_rows:
            return
        next_offsets = self._next

        def append(conn: sqlite3.Connection) -> dict[tuple[str, int], int]:
            ends: dict[tuple[str, int], int] = {}
            for tp, table, b in plan:
                end = ends.get(tp, next_offsets[tp]) + len(b.values)
                size, payload = pack(b.keys, b.values, b.timestamps, b.headers)
                conn.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", (end, len(b.values), size, payload))
                ends[tp] = end
            if offset_rows:
                conn.executemany(_UPSERT_SOURCE, offset_rows)
            return ends

        await self._write(append, "produce", after_commit=next_offsets.update)
        if plan:
            produced = {tp[0] for tp, _, _ in plan}
            for consumer in self._consumers:
                consumer._notify(produced)

    def source_writer(self, connector: str, task: int, topics: list[str], *,
                      replays_exactly: bool = True) -> EmbeddedSourceWriter:
        return EmbeddedSourceWriter(self, connector)  # records and offsets commit in one transaction

    async def source_offsets(self, connector: str) -> dict[str, Any]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT partition, offset FROM source_offsets WHERE connector = ?", (connector,)
            ).fetchall(),
            f"source offsets of {connector!r}",
        )
        return {part: json.loads(off) for part, off in rows}

    # -- consumer groups -----------------------------------------------------------

    async def consumer(self, group: str | None, topics: list[str], *,
                       only: list[TopicPartition] | None = None) -> EmbeddedConsumer:
        self._check_started()
        resolved = [await self._topic(name) for name in dict.fromkeys(topics)]
        positions: dict[TopicPartition, int] = {}
        for t in resolved:
            committed = await self.committed(group, t.name)
            for p in range(t.partitions):
                if only is None or TopicPartition(t.name, p) in only:
                    positions[TopicPartition(t.name, p)] = committed.get(p, 0)
        conn = _Conn(await asyncio.to_thread(self._connect))
        consumer = EmbeddedConsumer(self, group, resolved, positions, conn)
        self._consumers.add(consumer)
        return consumer

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT partition, next_offset FROM group_offsets WHERE group_id = ? AND topic = ?",
                (group, topic),
            ).fetchall(),
            f"committed offsets of group {group!r}",
        )
        return dict(rows)

    async def groups(self, topic: str) -> list[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT DISTINCT group_id FROM group_offsets WHERE topic = ? ORDER BY group_id",
                (topic,),
            ).fetchall(),
            f"groups of {topic!r}",
        )
        return [g for (g,) in rows]

    async def _commit_group(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        rows = [(group, tp.topic, tp.partition, int(off)) for tp, off in offsets.items()]
        if rows:
            await self._write(lambda c: c.executemany(_UPSERT_GROUP, rows), f"commit offsets of group {group!r}")


class EmbeddedConsumer:
    """A consumer-group member assigned every partition of its topics (one process, so
    no rebalancing). Used by one coroutine at a time."""

    def __init__(
        self,
        broker: EmbeddedBroker,
        group: str | None,
        topics: list[_Topic],
        positions: dict[TopicPartition, int],
        conn: _Conn,
    ) -> None:
        self._broker = broker
        self._group = group
        self._topic_names = {t.name for t in topics}
        self._tables = {
            TopicPartition(t.name, p): table for t in topics for p, table in enumerate(t.tables)
        }
        self._positions = positions
        self._order = sorted(positions)
        self._start = 0  # round-robin start partition of the next fetch
        self._conn: _Conn | None = conn
        self._wakeup = asyncio.Event()

    def _notify(self, topics: set[str]) -> None:
        if not self._topic_names.isdisjoint(topics):
            self._wakeup.set()

    def _check(self, tp: TopicPartition) -> None:
        if tp not in self._positions:
            raise FatalError(f"{tp} is not assigned to this consumer of group {self._group!r}")

    async def assignment(self) -> list[TopicPartition]:
        return list(self._order)

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check(tp)
        if offset < 0:
            raise FatalError(f"cannot seek {tp} to negative offset {offset}")
        self._positions[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        self._check(tp)
        return self._positions[tp]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self._broker.read_only:
            raise FatalError(
                f"cannot commit offsets of group {self._group!r}: the broker is open read-only"
            )
        await self._broker._commit_group(self._group, offsets)

    def on_rebalance(self, revoked: Any, assigned: Any) -> None:
        pass  # one process holds every partition: no rebalances

    async def close(self) -> None:
        self._broker._consumers.discard(self)
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def fetch(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Clear before reading: a produce committed after this point sets it again.
            self._wakeup.clear()
            batches = await self._fetch_once(max_records)
            remaining = deadline - loop.time()
            if batches or remaining <= 0 or self._conn is None:
                return batches
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
            # that comes as the wait ends, and the cancelled task then runs on (a run that
            # never ends after one of its tasks failed).
            try:
                async with asyncio.timeout(min(POLL_INTERVAL, remaining)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _fetch_once(self, max_records: int) -> list[FetchedBatch]:
        conn = self._conn
        if conn is None or max_records <= 0 or not self._order:
            return []
        n = len(self._order)
        order = self._order[self._start :] + self._order[: self._start]
        self._start = (self._start + 1) % n
        plan = [(tp, self._tables[tp], self._positions[tp]) for tp in order]
        if not self._broker.read_only:
            # In the writer the cached end offsets are exact: skip empty partitions
            # without touching the database.
            ends = self._broker._next
            plan = [x for x in plan if x[2] < ends[(x[0].topic, x[0].partition)]]
            if not plan:
                return []
        try:
            batches = await asyncio.to_thread(conn.run, lambda c: _read_partitions(c, plan, max_records))
        except sqlite3.Error as exc:
            raise _db_error(exc, f"fetch from {self._broker.db_path}") from exc
        for b in batches:
            self._positions[TopicPartition(b.topic, b.partition)] = b.next_offset
        return batches


def _read_partitions(
    conn: sqlite3.Connection, plan: list[tuple[TopicPartition, str, int]], max_records: int
) -> list[FetchedBatch]:
    """Read up to `max_records` records from the partitions in `plan`, fairly.

    First pass: each partition gets an equal share, so one busy partition cannot starve
    the others. Second pass: budget left over (from partitions with fewer records) goes
    to partitions that filled their share, in the (rotating) plan order.
    """
    share = max(1, max_records // len(plan))
    budget = max_records
    read: dict[TopicPartition, list[pa.RecordBatch]] = {}
    ends: dict[TopicPartition, int] = {}
    full: list[tuple[TopicPartition, str]] = []
    for tp, table, pos in plan:
        if budget <= 0:
            break
        want = min(share, budget)
        pieces, end = _read_range(conn, table, pos, want)
        if pieces:
            read[tp], ends[tp] = pieces, end
            budget -= end - pos
            if end - pos == want:
                full.append((tp, table))
    for tp, table in full:
        if budget <= 0:
            break
        pieces, end = _read_range(conn, table, ends[tp], budget)
        read[tp] += pieces
        budget -= end - ends[tp]
        ends[tp] = end
    out = []
    for tp, pieces in read.items():
        records = pa.Table.from_batches(pieces, schema=COLUMNS)
        headers = records.column("headers")
        values = records.column("value").combine_chunks()
        out.append(
            FetchedBatch(
                tp.topic,
                tp.partition,
                list(range(ends[tp] - records.num_rows, ends[tp])),
                records.column("key").to_pylist(),
                values.to_pylist(),
                records.column("timestamp").to_pylist(),
                None if headers.null_count == len(headers) else [decode_headers(h) for h in headers.to_pylist()],
                value_array=values,
            )
        )
    return out


def _read_range(conn: sqlite3.Connection, table: str, pos: int, want: int) -> tuple[list[pa.RecordBatch], int]:
    """Up to `want` records of a partition from offset `pos`: the pieces of the stored
    batches that hold them, and the offset after the last."""
    pieces: list[pa.RecordBatch] = []
    end = pos
    rows = conn.execute(
        f"SELECT end_offset, count, size, payload FROM {table} WHERE end_offset > ? ORDER BY end_offset", (pos,)
    )
    try:
        for batch_end, count, size, payload in rows:
            skip = end - (batch_end - count)  # the first batch may start before `pos`
            take = min(count - skip, want - (end - pos))
            pieces.append(unpack(size, payload).slice(skip, take))
            end += take
            if end - pos >= want:
                break
    finally:
        rows.close()
    return pieces, end


def _migrate_from_layout_1(conn: sqlite3.Connection, path: Path) -> None:
    """Layout 1 (one row per record) -> 2 (stored batches), in one transaction: a crash
    midway leaves layout 1, migrated again at the next start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        topics = conn.execute("SELECT id, name, partitions FROM topics").fetchall()
        records = 0
        for id_, _, partitions in topics:
            for p in range(partitions):
                old, new = f"records_{id_}_{p}", _table(id_, p)
                conn.execute(_CREATE_PARTITION.format(new))
                rows = conn.execute(f"SELECT offset, key, value, timestamp, headers FROM {old} ORDER BY offset")
                while part := rows.fetchmany(10_000):
                    offsets, keys, values, stamps, texts = zip(*part)
                    if offsets[-1] - offsets[0] != len(offsets) - 1:
                        raise FatalError(f"cannot migrate {path}: table {old} has a gap in its offsets")
                    headers = None if all(t is None for t in texts) else [decode_headers(t) or None for t in texts]
                    size, payload = pack(keys, values, stamps, headers)
                    conn.execute(f"INSERT INTO {new} VALUES (?, ?, ?, ?)", (offsets[-1] + 1, len(offsets), size, payload))
                    records += len(offsets)
                conn.execute(f"DROP TABLE {old}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.warning("%s: moved %s record(s) of %d topic(s) to the stored-batch layout (one row per produce call "
                "instead of per record); older versions of pipeline cannot read it", path, f"{records:,}", len(topics))


class EmbeddedSourceWriter:
    """Records and source offsets in one transaction: exactly once from source to topic."""

    def __init__(self, broker: EmbeddedBroker, connector: str) -> None:
        self.broker = broker
        self.connector = connector

    async def open(self) -> dict[str, Any]:
        return await self.broker.source_offsets(self.connector)

    async def stored(self) -> dict[str, Any]:
        return await self.broker.source_offsets(self.connector)

    async def produce(self, batches: list[ProduceBatch], offsets: dict[str, Any]) -> None:
        commit = SourceOffsetCommit(self.connector, offsets) if offsets else None
        await self.broker.produce(batches, commit)
