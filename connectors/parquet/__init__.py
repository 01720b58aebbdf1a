"""`parquet` sink: Hive-style partitioned Parquet files, written exactly once.

Output layout
-------------
::

    <path>/<topic>/<layout dirs>/<topic>+<partition>+<first:020d>+<last:020d>.parquet
    e.g. out/activity/dt=2024-05-01/hour=13/activity+0+00000000000000000000+00000000000000004999.parquet

The directories come from a record-time field (`partition_by`, default `timestamp`)
formatted with `layout` (strftime, in UTC; default `dt=%Y-%m-%d/hour=%H`), so DuckDB,
Spark, polars or pandas read the tree with Hive partitioning
(`read_parquet('out/activity/**/*.parquet', hive_partitioning=true)`). Records whose time
is null go to the Hive null partition: every `name=%…` segment of the layout becomes
`name=__HIVE_DEFAULT_PARTITION__` (any other segment `__HIVE_DEFAULT_PARTITION__`), which
DuckDB and Spark read back as NULL. (DuckDB infers a Hive column's type from the
directory names: `hour=09` makes it VARCHAR, as DuckDB keeps leading zeros; pass
`hive_types={'hour': int}` to `read_parquet` to read it as an integer.) With `partition_by: null` files go straight under
`<path>/<topic>/`. The time field may be an Arrow timestamp (any unit; naive ones are taken
as UTC), a date, or an integer (epoch milliseconds).

Exactly once: groups, naming, recovery
--------------------------------------
Records of one topic-partition (tp) are buffered in offset order. Whenever the tp must write
anything (a rotation threshold, `max_open_seconds`, close), it writes a *group*: a prefix of
its buffer covering offsets `first..last`, split by layout directory (and by
`rotate_interval` window) into n files. Every file of a group carries the group's range and
size in its name: `<topic>+<partition>+<first>+<last>.parquet` when n == 1 (the usual case),
`<topic>+<partition>+<first>+<last>+<k>of<n>.parquet` otherwise. Together the n files hold
every buffered record of the tp with an offset in `first..last`; the next group starts
after `last`. So the output of a tp is a sequence of disjoint, contiguous groups, and its
resume position is `last + 1` of the last complete group.

A group is written in two phases: (1) each file to `.<final name>.tmp` in its directory
(dot-prefixed, ending `.tmp`: never matched by `**/*.parquet`, ignored by Spark), fsynced;
new directories and every directory holding a temp fsynced; (2) only then every temp renamed
to its final name, and the directories fsynced again. Only after (2) does `flush` report the
group durable, and only then may the next group of that tp start.

On `open`, for each assigned tp the sink scans `<path>/<topic>/**`:
- a group with all n final files is complete;
- a group with some but not all final files was cut inside phase 2, after every temp of it
  was durable: the missing files are still there as temps, so they are renamed (rolled
  forward) and the group is complete;
- temps of a group with no final file were cut inside phase 1: deleted (their records come
  again from the resume position); any other leftover temp is deleted too;
- resume = max `last` + 1 over complete groups (0 if none); `open` returns it and the engine
  seeks there.

So after a crash at any moment a reader sees only whole files, every record at most once
(groups are disjoint), and once the sink has reopened, every record up to the resume
position exactly once (a group is either rolled forward or its records are re-delivered).
Between a crash inside phase 2 and the next start a reader may see part of the interrupted
group, never a duplicate. A group that is incomplete with no temps to finish it cannot arise
from a crash; if it is the last group its files are deleted (its records come again), else
the sink stops and says so. Overlapping complete groups (two pipelines writing one
directory) also stop the sink rather than serve duplicates.

Rotation and durability
-----------------------
- `rotate_records` / `rotate_bytes` bound a tp's buffer: when it reaches either, its first
  `rotate_records` records (or about `rotate_bytes` of Arrow memory) are written at once, in
  `put`. Bytes are measured as the Arrow in-memory size of the buffered batches
  (`RecordBatch.nbytes`), not the compressed Parquet size, which is typically several times
  smaller. Since a group is split by directory, no file exceeds either limit.
- `buffer_bytes` bounds the buffers of all assigned tps together: when their sum passes it,
  the tp holding the most is written out whole, so memory stays under about `buffer_bytes`
  however many partitions the sink is assigned.
- `rotate_interval` (e.g. `15m`): a file holds records of one aligned record-time window
  (windows start at multiples of the interval since the epoch, UTC), so records of
  different windows go to different files even in one directory.
- `max_open_seconds`: at each `flush`, a tp whose oldest buffered record arrived longer ago
  than this is written out, so data lands promptly even on a slow topic.
- `flush` returns `{tp: next offset durable in files}` for every assigned tp; the engine
  commits only that. `close` after a clean stop (the last call was `flush`) writes out what
  is still buffered and returns the new durable offsets, which the engine commits; after an
  abort (a `put` came after the last `flush`) it discards it. Either way the next start
  resumes from the files: the consumer group's committed offset is shown as lag, never used
  for resuming.
- If a write fails part-way the task writes nothing more (close discards); the next `open`
  repairs the output as after a crash.

All file I/O runs in a worker thread (`asyncio.to_thread`) under one lock.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner.batch import Batch
from runner.connector import (
    Config,
    FatalError,
    Sink,
    SinkTask,
    TopicPartition,
    setting,
)

log = logging.getLogger("pipeline.parquet")

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"

_FINAL = re.compile(
    r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+(?P<last>\d{20})"
    r"(?:\+(?P<k>\d+)of(?P<n>\d+))?\.parquet$"
)
_TEMP = re.compile(r"^\.(?P<final>.+\.parquet)\.tmp$")
_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PER_SECOND = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}

# strftime directives whose value is fixed within a UTC minute / hour / day. A layout using
# only these is evaluated once per distinct minute/hour/day instead of once per record.
_MINUTE = set("MR")
_HOUR = set("HIp")
_DAY = set("dejaAuwDFxUWVmbBhyYCGgzZn%t")


def parse_interval(text: str) -> int:
    """Seconds in '30s', '15m', '1h', '1d'."""
    m = _INTERVAL.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"expected a positive number followed by s, m, h or d (like 15m), got {text!r}")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def layout_granularity(layout: str) -> int:
    """The coarsest span in seconds (86400, 3600, 60 or 1) within which `layout` formats
    every UTC time the same."""
    directives = set(re.findall(r"%[-_0^#EO]*(.)", layout))
    if directives <= _DAY:
        return 86400
    if directives <= _DAY | _HOUR:
        return 3600
    if directives <= _DAY | _HOUR | _MINUTE:
        return 60
    return 1


def null_directory(layout: str) -> str:
    """The directory for records whose time is null: Hive's null partition value in
    every segment of the layout that holds a time directive."""
    parts = []
    for seg in layout.split("/"):
        if "%" not in seg:
            parts.append(seg)
        elif "=" in seg and "%" not in seg.split("=", 1)[0]:
            parts.append(seg.split("=", 1)[0] + "=" + NULL_PARTITION)
        else:
            parts.append(NULL_PARTITION)
    return "/".join(parts)


def _check_layout(layout: str) -> str | None:
    """A problem with `layout`, or None."""
    if not layout:
        return None
    sample = pa.array([0, 1_714_573_845, -1], pa.timestamp("s", tz="UTC"))
    try:
        dirs = pc.strftime(sample, format=layout).to_pylist()
    except (pa.ArrowException, ValueError) as exc:
        return f"not a valid strftime format: {exc}"
    for directive in set(re.findall(r"%[-_0^#EO]*.", layout.replace("%%", ""))):
        # Arrow copies a directive it does not know (like %-H or %k) as it is.
        if directive in pc.strftime(sample, format=directive).to_pylist()[0]:
            return f"{directive} is not a strftime directive Arrow supports"
    for d in [*dirs, null_directory(layout)]:
        if d.startswith("/") or "\\" in d or any(s in ("", ".", "..") for s in d.split("/")):
            return (
                f"must format to a relative path of non-empty names (got {d!r}); "
                "use / between directories"
            )
        if any(s.startswith((".", "_")) for s in d.split("/")):
            return f"directory names must not start with '.' or '_' (readers skip them): {d!r}"
    return None


class ParquetSink(Sink):
    name = "parquet"
    description = "Writes topics to Hive-partitioned Parquet files, exactly once."
    wants = "columns"

    class Config(Config):
        path: str = setting(help="Output directory; files go under <path>/<topic>/<layout dirs>/.")
        partition_by: str | None = setting(
            "timestamp",
            help="Record-time field the directories (and rotate_interval windows) come from: "
            "a timestamp, date or epoch-milliseconds integer; null or empty for no time "
            "partitioning.",
        )
        layout: str = setting(
            "dt=%Y-%m-%d/hour=%H",
            help="strftime pattern (UTC) of the partition_by field giving the directories "
            "under <path>/<topic>/; null times go to name=__HIVE_DEFAULT_PARTITION__.",
        )
        compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = setting(
            "zstd", help="Parquet compression codec."
        )
        rotate_records: int = setting(
            1_000_000,
            help="Write a topic-partition's buffered records once there are this many "
            "(so no file holds more).",
            min=1,
            max=1_000_000_000,
        )
        rotate_bytes: int = setting(
            128 * 1024 * 1024,
            help="Write a topic-partition's buffered records once they take this many bytes "
            "of Arrow memory (the Parquet files are smaller, being encoded and compressed).",
            min=1024,
            max=64 * 1024**3,
        )
        buffer_bytes: int = setting(
            64 * 1024 * 1024,
            help="Arrow memory the buffers of all assigned partitions may take together; past "
            "it, the partition holding the most is written out (bounds memory whatever the "
            "partition count).",
            min=1024,
            max=64 * 1024**3,
        )
        rotate_interval: str | None = setting(
            None,
            help="Record-time span of one file, like 30s, 15m, 1h or 1d (windows aligned to "
            "the epoch, UTC); null: files are split by layout directory only.",
        )
        max_open_seconds: float = setting(
            60.0,
            help="Wall-clock seconds records may stay buffered: at the next flush after "
            "that, they are written out (0: at every flush).",
            min=0,
            max=7 * 86400,
        )
        row_group_size: int | None = setting(
            None,
            help="Rows per Parquet row group (null: pyarrow's default, about 1M).",
            min=1,
            max=1_000_000_000,
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = []
            interval = given.get("rotate_interval")
            if isinstance(interval, str):
                try:
                    parse_interval(interval)
                except ValueError as exc:
                    problems.append(("rotate_interval", str(exc)))
            layout = given.get("layout")
            if isinstance(layout, str):
                problem = _check_layout(layout)
                if problem:
                    problems.append(("layout", problem))
            return problems

    def target(self) -> str:
        topics = self.context.topics
        return os.path.join(self.context.display(self.config.path), topics[0] if len(topics) == 1 else "")

    def task(self) -> SinkTask:
        c = self.config
        return ParquetSinkTask(
            directory=self.context.resolve(c.path),
            partition_by=c.partition_by or None,
            layout=c.layout if c.partition_by else "",
            compression=None if c.compression == "none" else c.compression,
            rotate_records=c.rotate_records,
            rotate_bytes=c.rotate_bytes,
            buffer_bytes=c.buffer_bytes,
            rotate_interval=parse_interval(c.rotate_interval) if c.rotate_interval else None,
            max_open_seconds=c.max_open_seconds,
            row_group_size=c.row_group_size,
            schemas=dict(self.context.schemas),
        )


@dataclass
class _Chunk:
    batch: pa.RecordBatch
    offsets: Sequence[int]
    arrived: float  # time.monotonic() when put


@dataclass
class _Part:
    """One topic-partition: what is durable in files and what is buffered after it."""

    durable: int  # next offset not yet in a complete group (the resume position)
    next: int  # next offset expected from put
    chunks: list[_Chunk] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0

    def append(self, batch: pa.RecordBatch, offsets: Sequence[int]) -> None:
        self.chunks.append(_Chunk(batch, offsets, time.monotonic()))
        self.rows += batch.num_rows
        self.nbytes += batch.nbytes
        self.next = offsets[-1] + 1

    def due(self, rotate_records: int, rotate_bytes: int) -> int:
        """How many leading rows to write now because of the size limits (0: none)."""
        if self.rows < rotate_records and self.nbytes < rotate_bytes:
            return 0
        rows = acc = 0
        for chunk in self.chunks:
            size = chunk.batch.nbytes
            if acc + size > rotate_bytes:
                per_row = size / max(chunk.batch.num_rows, 1)
                rows += int((rotate_bytes - acc) / per_row) if per_row else chunk.batch.num_rows
                break
            acc += size
            rows += chunk.batch.num_rows
        return max(1, min(rotate_records, rows, self.rows))

    def take(self, n: int) -> tuple[pa.Table, int, int]:
        """The first `n` buffered rows as a table, with their first and last offset."""
        batches, left = [], n
        for chunk in self.chunks:
            if left <= 0:
                break
            b = chunk.batch if chunk.batch.num_rows <= left else chunk.batch.slice(0, left)
            batches.append(b)
            left -= b.num_rows
            last = chunk.offsets[b.num_rows - 1]
        first = self.chunks[0].offsets[0]
        schema = batches[0].schema
        if all(b.schema.equals(schema) for b in batches):
            table = pa.Table.from_batches(batches, schema)
        else:
            table = pa.concat_tables(
                [pa.Table.from_batches([b]) for b in batches], promote_options="permissive"
            )
        return table, first, last

    def drop(self, n: int, durable: int) -> None:
        while n > 0:
            chunk = self.chunks[0]
            if chunk.batch.num_rows <= n:
                self.chunks.pop(0)
                n -= chunk.batch.num_rows
                self.rows -= chunk.batch.num_rows
                self.nbytes -= chunk.batch.nbytes
            else:
                rest = chunk.batch.slice(n)
                self.rows -= n
                self.nbytes += rest.nbytes - chunk.batch.nbytes
                self.chunks[0] = _Chunk(rest, chunk.offsets[n:], chunk.arrived)
                n = 0
        self.durable = durable

    def clear(self) -> None:
        self.chunks.clear()
        self.rows = self.nbytes = 0
        self.next = self.durable


def file_name(tp: TopicPartition, first: int, last: int, k: int, n: int) -> str:
    base = f"{tp.topic}+{tp.partition}+{first:020d}+{last:020d}"
    return f"{base}.parquet" if n == 1 else f"{base}+{k}of{n}.parquet"


@dataclass
class _Found:
    """The files of one tp found on open, grouped: (first, last, n) -> {k: path}."""

    finals: dict[tuple[int, int, int], dict[int, Path]] = field(default_factory=dict)
    temps: dict[tuple[int, int, int], dict[int, Path]] = field(default_factory=dict)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Two names for one call: files and directories are fsynced at different steps of a group
# write, and the crash tests fail each step on its own.
def _fsync_file(path: Path) -> None:
    _fsync(path)


def _fsync_dir(directory: Path) -> None:
    _fsync(directory)


class ParquetSinkTask(SinkTask):
    def __init__(
        self,
        *,
        directory: Path,
        partition_by: str | None,
        layout: str,
        compression: str | None,
        rotate_records: int,
        rotate_bytes: int,
        rotate_interval: int | None,
        buffer_bytes: int | None = None,
        max_open_seconds: float,
        row_group_size: int | None,
        schemas: dict[str, dict] | None = None,
    ) -> None:
        self.directory = directory
        self.partition_by = partition_by
        self.layout = layout
        self.granularity = layout_granularity(layout) if layout else 0
        self.null_dir = null_directory(layout) if layout else ""
        self.compression = compression
        self.rotate_records = rotate_records
        self.rotate_bytes = rotate_bytes
        self.buffer_bytes = buffer_bytes
        self.rotate_interval = rotate_interval if partition_by else None
        self.max_open_seconds = max_open_seconds
        self.row_group_size = row_group_size
        self.schemas = schemas or {}
        self.parts: dict[TopicPartition, _Part] = {}
        self.lock = threading.Lock()
        self.broken: BaseException | None = None
        self.last_call: str | None = None  # "put" or "flush"
        self.known_dirs: set[Path] = set()
        self.checked_schemas: dict[str, pa.Schema] = {}
        self.files_written = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        for topic in {tp.topic for tp in partitions}:
            schema = self.schemas.get(topic)
            if self.partition_by and isinstance(schema, dict) and "fields" in schema:
                names = [f.get("name") for f in schema["fields"]]
                if self.partition_by not in names:
                    raise self._no_time_field(topic, names)
        return await asyncio.to_thread(self._open, list(partitions))

    async def put(self, batch: Batch) -> None:
        self.last_call = "put"
        if self.broken is not None:
            raise FatalError(f"parquet sink: an earlier write failed: {self.broken}")
        if not len(batch):
            return None
        tp = TopicPartition(batch.topic, batch.partition)
        part = self.parts.get(tp)
        if part is None:
            raise FatalError(f"parquet sink: got records of {tp}, which it was not opened for")
        offsets = batch.record_offsets
        columns = batch.columns
        if offsets[0] < part.next:  # already buffered or written: never twice
            skip = bisect.bisect_left(offsets, part.next)
            if skip >= len(offsets):
                return None
            columns, offsets = columns.slice(skip), offsets[skip:]
        self._check_schema(tp.topic, columns.schema)
        with self.lock:
            part.append(columns, offsets)
        if part.rows >= self.rotate_records or part.nbytes >= self.rotate_bytes:
            await asyncio.to_thread(self._write_due, tp)
        if self.buffer_bytes and sum(p.nbytes for p in self.parts.values()) > self.buffer_bytes:
            await asyncio.to_thread(self._write_largest)
        return None

    async def flush(self) -> dict[TopicPartition, int]:
        self.last_call = "put"  # until this flush has succeeded
        if self.broken is not None:
            raise FatalError(f"parquet sink: an earlier write failed: {self.broken}")
        await asyncio.to_thread(self._write_old)
        self.last_call = "flush"
        return {tp: part.durable for tp, part in self.parts.items()}

    async def close(self) -> dict[TopicPartition, int] | None:
        write = self.last_call in ("flush", None) and self.broken is None
        durable = {tp: part.durable for tp, part in self.parts.items()}
        await asyncio.to_thread(self._close, write)
        written = {tp: part.durable for tp, part in self.parts.items()}
        return written if write and written != durable else None

    # -- recovery ---------------------------------------------------------------------------

    def _open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        with self.lock:
            self.broken = None
            self.last_call = None
            self.parts = {}  # a new assignment: buffers of the old one come again from the files
            self.known_dirs.clear()
            self.directory.mkdir(parents=True, exist_ok=True)
            found = self._scan(partitions)
            resume = {}
            for tp in partitions:
                durable = self._recover(tp, found.get(tp, _Found()))
                self.parts[tp] = _Part(durable=durable, next=durable)
                resume[tp] = durable
            return resume

    def _scan(self, partitions: list[TopicPartition]) -> dict[TopicPartition, _Found]:
        wanted = set(partitions)
        found: dict[TopicPartition, _Found] = {}
        for topic in sorted({tp.topic for tp in partitions}):
            root = self.directory / topic
            if not root.is_dir():
                continue
            for dirpath, _, filenames in os.walk(root):
                for name in filenames:
                    temp = _TEMP.match(name)
                    m = _FINAL.match(temp.group("final") if temp else name)
                    if not m or m.group("topic") != topic:
                        continue
                    tp = TopicPartition(topic, int(m.group("partition")))
                    if tp not in wanted:
                        continue
                    n = int(m.group("n") or 1)
                    k = int(m.group("k") or 1)
                    key = (int(m.group("first")), int(m.group("last")), n)
                    f = found.setdefault(tp, _Found())
                    (f.temps if temp else f.finals).setdefault(key, {})[k] = Path(dirpath) / name
        return found

    def _recover(self, tp: TopicPartition, found: _Found) -> int:
        """Repair the output of `tp` after a crash; its resume offset."""
        touched: set[Path] = set()
        complete = [g for g, files in found.finals.items() if len(files) == g[2]]
        broken = []
        for group, files in found.finals.items():
            if len(files) == group[2]:
                continue
            missing = set(range(1, group[2] + 1)) - set(files)
            temps = found.temps.get(group, {})
            if missing <= set(temps):
                # Cut during the renames: every temp of the group was already durable.
                for k in sorted(missing):
                    tmp = temps.pop(k)
                    os.replace(tmp, tmp.with_name(_TEMP.match(tmp.name).group("final")))
                    touched.add(tmp.parent)
                complete.append(group)
                log.info("parquet sink: %s: completed the interrupted group %d..%d", tp, group[0], group[1])
            else:
                broken.append(group)
        top = max((g[1] for g in complete), default=-1)
        for group in broken:
            if group[0] <= top:
                raise FatalError(
                    f"parquet sink: {tp}: the files of offsets {group[0]}..{group[1]} are "
                    f"incomplete ({len(found.finals[group])} of {group[2]}) and later offsets "
                    "are written: the output was changed outside the pipeline",
                    hint=f"move {self.directory / tp.topic} away to rewrite this topic",
                )
            for path in found.finals[group].values():
                path.unlink()
                touched.add(path.parent)
            log.warning("parquet sink: %s: removed an incomplete group %d..%d", tp, group[0], group[1])
        for temps in found.temps.values():
            for path in temps.values():
                path.unlink(missing_ok=True)
                touched.add(path.parent)
        for d in touched:
            _fsync_dir(d)
        complete.sort()
        for a, b in zip(complete, complete[1:]):
            if b[0] <= a[1]:
                raise FatalError(
                    f"parquet sink: {tp}: files of offsets {a[0]}..{a[1]} and {b[0]}..{b[1]} "
                    "overlap: the output holds records twice (two pipelines writing one "
                    "directory?)",
                    hint=f"give each pipeline its own path, or move {self.directory / tp.topic} away",
                )
        return top + 1

    # -- writing ----------------------------------------------------------------------------

    def _write_due(self, tp: TopicPartition) -> None:
        with self.lock:
            part = self.parts[tp]
            while n := part.due(self.rotate_records, self.rotate_bytes):
                self._write_group(tp, part, n)

    def _write_largest(self) -> None:
        with self.lock:
            tp, part = max(self.parts.items(), key=lambda item: item[1].nbytes)
            if part.rows:
                self._write_group(tp, part, part.rows)

    def _write_old(self) -> None:
        with self.lock:
            now = time.monotonic()
            for tp, part in self.parts.items():
                if part.chunks and now - part.chunks[0].arrived >= self.max_open_seconds:
                    self._write_group(tp, part, part.rows)

    def _close(self, write: bool) -> None:
        with self.lock:
            try:
                if write and self.broken is None:
                    for tp, part in self.parts.items():
                        if part.rows:
                            self._write_group(tp, part, part.rows)
            finally:
                for part in self.parts.values():
                    part.clear()

    def _write_group(self, tp: TopicPartition, part: _Part, n: int) -> None:
        """Write the first `n` buffered rows of `tp` as one group (see the module doc)."""
        table, first, last = part.take(n)
        try:
            pieces = self._split(table)
            count = len(pieces)
            root = self.directory / tp.topic
            staged: list[tuple[Path, Path]] = []
            for k, (rel, piece) in enumerate(pieces, 1):
                directory = root / rel if rel else root
                self._ensure_dir(directory)
                final = directory / file_name(tp, first, last, k, count)
                tmp = directory / f".{final.name}.tmp"
                piece = piece.replace_schema_metadata(
                    {
                        **(piece.schema.metadata or {}),
                        b"pipeline.topic": tp.topic.encode(),
                        b"pipeline.partition": str(tp.partition).encode(),
                        b"pipeline.offsets": f"{first}-{last}".encode(),
                        b"pipeline.file": f"{k}/{count}".encode(),
                    }
                )
                self._write_file(piece, tmp)
                staged.append((tmp, final))
            dirs = {tmp.parent for tmp, _ in staged}
            for d in dirs:
                _fsync_dir(d)
            for tmp, final in staged:
                os.replace(tmp, final)
            for d in dirs:
                _fsync_dir(d)
        except BaseException as exc:
            # What is on disk now is what a crash would leave; the next open repairs it.
            self.broken = exc
            raise
        part.drop(n, last + 1)
        self.files_written += count

    def _write_file(self, table: pa.Table, path: Path) -> None:
        pq.write_table(
            table,
            str(path),
            compression=self.compression or "none",
            row_group_size=self.row_group_size,
        )
        _fsync_file(path)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self.known_dirs:
            return
        missing = []
        p = directory
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
        for parent in {d.parent for d in missing}:
            _fsync_dir(parent)  # the new directory's entry is durable before files in it
        self.known_dirs.add(directory)

    # -- splitting by record time -------------------------------------------------------------

    def _split(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """`table` cut into (relative directory, rows) by layout directory and interval
        window, rows in offset order within each piece. Vectorised: the layout is
        formatted once per distinct hour (or day, minute...), not per record."""
        if not self.partition_by or (not self.layout and not self.rotate_interval):
            return [("", table)]
        raw = self._epoch(table.column(self.partition_by))
        per_second = _PER_SECOND[raw.type.unit]
        values = raw.view(pa.int64())
        lowest = pc.min(values).as_py()
        negative = lowest is not None and lowest < 0

        def floor_div(span: int) -> pa.Array:
            if not negative:  # integer divide truncates toward zero
                return pc.divide(values, span)
            return pc.divide(pc.subtract(values, pc.if_else(pc.less(values, 0), span - 1, 0)), span)

        # Directory id per row (null where the time is null), and the directory names.
        names = [""]
        if self.layout:
            g = self.granularity
            bucket = floor_div(g * per_second)
            bmin, bmax = pc.min_max(bucket).as_py().values()
            if bmin is None or bmin == bmax:  # all null, or one directory
                dir_ids = pc.multiply(bucket, 0)
                names = self._format([bmin * g]) if bmin is not None else []
            else:
                enc = bucket.dictionary_encode()
                index: dict[str, int] = {}
                # Distinct buckets may format alike (e.g. %Y-%m over days): merge them.
                remap = [index.setdefault(name, len(index)) for name in self._format(
                    [v * g for v in enc.dictionary.to_pylist()]
                )]
                names = list(index)
                dir_ids = pc.take(pa.array(remap, pa.int64()), enc.indices)
        else:
            dir_ids = pc.multiply(values, 0)

        # Combined with the rotate_interval window: one piece per (directory, window).
        key, windows = dir_ids.cast(pa.int64()), 1
        if self.rotate_interval:
            window = floor_div(self.rotate_interval * per_second)
            wmin, wmax = pc.min_max(window).as_py().values()
            if wmin is not None and wmin != wmax:
                wenc = window.dictionary_encode()
                windows = len(wenc.dictionary)
                key = pc.add(pc.multiply(key, windows), wenc.indices.cast(pa.int64()))
        key = pc.fill_null(key, -1)

        kmin, kmax = pc.min_max(key).as_py().values()
        if kmin == kmax:
            groups = [(kmin, table)]
        else:
            order = pc.sort_indices(key)  # stable: offset order is kept within a piece
            counts = pc.value_counts(key)
            pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
            ordered = table.take(order)
            groups, start = [], 0
            for k, c in pairs:
                groups.append((k, ordered.slice(start, c)))
                start += c
        return [(self.null_dir if k == -1 else names[k // windows], piece) for k, piece in groups]

    def _format(self, seconds: list[int]) -> list[str]:
        stamps = pa.array(seconds, pa.timestamp("s", tz="UTC"))
        return pc.strftime(stamps, format=self.layout).to_pylist()

    def _epoch(self, column: pa.ChunkedArray) -> pa.Array:
        """The record-time column as a timestamp array (UTC)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        t = arr.type
        if pa.types.is_timestamp(t):
            return arr if t.tz == "UTC" else arr.cast(pa.timestamp(t.unit, tz="UTC"))
        if pa.types.is_date(t):
            return arr.cast(pa.timestamp("s", tz="UTC"))
        if pa.types.is_integer(t):
            return arr.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
        raise FatalError(f"parquet sink: partition_by field {self.partition_by!r} is {t}, not a time")

    def _check_schema(self, topic: str, schema: pa.Schema) -> None:
        if not self.partition_by or self.checked_schemas.get(topic) is schema:
            return
        idx = schema.get_field_index(self.partition_by)
        if idx < 0:
            raise self._no_time_field(topic, schema.names)
        t = schema.field(idx).type
        if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_integer(t)):
            raise FatalError(
                f"parquet sink: field {self.partition_by!r} of topic {topic!r} is {t}; "
                "partition_by needs a timestamp, a date or epoch milliseconds",
                hint="give the field an Avro logicalType (timestamp-millis, date), or set "
                "partition_by to another field or null",
            )
        self.checked_schemas[topic] = schema

    def _no_time_field(self, topic: str, names: list[str]) -> FatalError:
        return FatalError(
            f"parquet sink: topic {topic!r} has no field {self.partition_by!r} to partition by",
            hint=f"set partition_by to one of {', '.join(map(str, names))}, or to null for no "
            "time partitioning",
        )
