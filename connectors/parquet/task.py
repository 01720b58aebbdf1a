"""The parquet sink task: streams each topic-partition's records into the files of its open
group and commits the group (see the package doc)."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.parquet import files
from connectors.parquet.layout import Splitter, partition_field_error
from runner.batch import Batch
from runner.connector import FatalError, SinkTask, TopicPartition

log = logging.getLogger("pipeline.parquet")

# Files a task keeps open at most (its open groups' files together); past it, the
# partition with the most open files has its group written out. Only reached by input
# scattered over hundreds of directories at once (a backfill in random time order).
MAX_OPEN_FILES = 256


def _plain(schema: pa.Schema) -> pa.Schema:
    """`schema` without the pipeline's own metadata keys (they go in the file's footer)."""
    kept = files.strip_meta(schema.metadata)
    return schema.with_metadata(kept) if kept else schema.remove_metadata()


class _Piece:
    """One file of an open group: the records of one directory (and window), written as
    row groups to `.<topic>+<partition>+<first>+open+<seq>.parquet.tmp` as they come."""

    __slots__ = ("rel", "tmp", "sink", "writer", "pending", "pending_rows", "pending_bytes", "size")

    def __init__(self, rel: str, tmp: Path) -> None:
        self.rel = rel
        self.tmp = tmp
        self.sink: pa.NativeFile | None = None
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.RecordBatch] = []  # not yet written (Arrow memory)
        self.pending_rows = 0
        self.pending_bytes = 0
        self.size = 0  # bytes written to the file so far

    def discard(self) -> None:
        for closing in (self.writer, self.sink):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # noqa: BLE001 - the file is deleted anyway
                    pass
        self.writer = self.sink = None
        self.pending = []
        self.tmp.unlink(missing_ok=True)


class _Group:
    """The open group of a tp: offsets first..last, one piece per (directory, window)."""

    def __init__(self, first: int, schema: pa.Schema) -> None:
        self.first = first
        self.last = first - 1
        self.rows = 0
        self.opened = time.monotonic()  # when its first record arrived
        self.schema = schema
        self.pieces: dict[tuple[str, int | None], _Piece] = {}  # in creation order: k
        self.committing = False

    def pending_bytes(self) -> int:
        return sum(p.pending_bytes for p in self.pieces.values())

    def estimate(self, ratio: float) -> float:
        """About how many bytes its files will take."""
        return sum(p.size + p.pending_bytes * ratio for p in self.pieces.values())


class _Part:
    """One topic-partition: what is durable in files and the open group after it."""

    __slots__ = ("durable", "next", "group")

    def __init__(self, durable: int) -> None:
        self.durable = durable  # next offset not yet in a complete group (the resume position)
        self.next = durable  # next offset expected from put
        self.group: _Group | None = None

    @property
    def rows(self) -> int:
        return self.group.rows if self.group else 0


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
        self.splitter = Splitter(partition_by, layout, rotate_interval)
        self.compression = compression
        self.rotate_records = rotate_records
        self.rotate_bytes = rotate_bytes
        self.buffer_bytes = buffer_bytes
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
        self.pending_bytes = 0  # Arrow memory of every piece's pending rows
        self.open_pieces = 0
        self.written: dict[str, list[int]] = {}  # topic -> [Parquet bytes, Arrow bytes] written
        self.seq = itertools.count()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        for topic in {tp.topic for tp in partitions}:
            schema = self.schemas.get(topic)
            if self.partition_by and isinstance(schema, dict) and "fields" in schema:
                error = partition_field_error(self.partition_by, topic, schema)
                if error is not None:
                    raise error
        return await self._io(self._open, list(partitions))

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
        await self._io(self._put, tp, columns, offsets)
        return None

    async def flush(self) -> dict[TopicPartition, int]:
        self.last_call = "put"  # until this flush has succeeded
        if self.broken is not None:
            raise FatalError(f"parquet sink: an earlier write failed: {self.broken}")
        await self._io(self._write_old)
        self.last_call = "flush"
        return {tp: part.durable for tp, part in self.parts.items()}

    async def close(self) -> dict[TopicPartition, int] | None:
        write = self.last_call in ("flush", None) and self.broken is None
        durable = {tp: part.durable for tp, part in self.parts.items()}
        try:
            await self._io(self._close, write)
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=False)
                self.executor = None
        written = {tp: part.durable for tp, part in self.parts.items()}
        return written if write and written != durable else None

    async def _io(self, fn: Any, *args: Any) -> Any:
        """Run file work in the task's own thread (one thread: Arrow's allocator keeps
        per-thread heaps, so memory freed by the writes is reused by the next ones)."""
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parquet-sink")
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- open: repair and resume ----------------------------------------------------------------

    def _open(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        with self.lock:
            self._discard()  # a new assignment: open groups come again from the topic
            self.broken = None
            self.last_call = None
            self.parts = {}
            self.known_dirs.clear()
            self.directory.mkdir(parents=True, exist_ok=True)
            resume = {}
            for topic in sorted({tp.topic for tp in partitions}):
                root = self.directory / topic
                wanted = {tp for tp in partitions if tp.topic == topic}
                with files.locked(root):  # never while `pipeline compact` changes the files
                    found = files.scan(root, topic, wanted)
                    for tp in sorted(wanted):
                        resume[tp] = files.recover(root, tp, found.get(tp, files.Found()))
            for tp in partitions:
                self.parts[tp] = _Part(resume[tp])
            return resume

    # -- put: stream into the open group ------------------------------------------------------

    def _put(self, tp: TopicPartition, columns: pa.RecordBatch, offsets: Sequence[int]) -> None:
        with self.lock:
            try:
                self._append(tp, self.parts[tp], columns, offsets)
                self._relieve()
            except BaseException as exc:
                # What is on disk now is what a crash would leave; the next open repairs it.
                self.broken = exc
                raise

    def _append(self, tp: TopicPartition, part: _Part, columns: pa.RecordBatch, offsets: Sequence[int]) -> None:
        total, start = columns.num_rows, 0
        per_row = columns.nbytes / total
        while start < total:
            group = part.group
            if group is not None and not group.schema.equals(columns.schema):
                self._commit(tp, part)  # a new schema starts new files
                group = None
            if group is None:
                group = part.group = _Group(offsets[start], columns.schema)
            ratio = self._ratio(tp.topic)
            room_rows = self.rotate_records - group.rows
            room_bytes = self.rotate_bytes - group.estimate(ratio)
            if group.rows and (room_rows <= 0 or room_bytes <= 0):
                if room_rows <= 0 or self._measure(tp, group) >= self.rotate_bytes:
                    self._commit(tp, part)
                    continue
                ratio = self._ratio(tp.topic)
                room_bytes = self.rotate_bytes - group.estimate(ratio)
            take = min(total - start, max(room_rows, 1))
            if per_row * ratio > 0:
                take = min(take, max(1, int(room_bytes / (per_row * ratio))))
            rows = columns if start == 0 and take == total else columns.slice(start, take)
            pieces = self.splitter.split(rows)
            new = sum(1 for rel, window, _ in pieces if (rel, window) not in group.pieces)
            if new and self.open_pieces + new > MAX_OPEN_FILES and self._commit_widest(tp):
                continue  # this tp's group was written out: start a new one
            self._add(tp, group, pieces)
            group.rows += take
            group.last = offsets[start + take - 1]
            start += take
        part.next = offsets[-1] + 1
        group = part.group
        if group is not None and (
            group.rows >= self.rotate_records
            or (group.estimate(self._ratio(tp.topic)) >= self.rotate_bytes and self._measure(tp, group) >= self.rotate_bytes)
        ):
            self._commit(tp, part)

    def _add(self, tp: TopicPartition, group: _Group, pieces: list[tuple[str, int | None, pa.RecordBatch]]) -> None:
        for rel, window, rows in pieces:
            piece = group.pieces.get((rel, window))
            if piece is None:
                directory = self.directory / tp.topic / rel if rel else self.directory / tp.topic
                piece = _Piece(rel, directory / files.open_name(tp, group.first, next(self.seq)))
                group.pieces[(rel, window)] = piece
                self.open_pieces += 1
            piece.pending.append(rows)
            piece.pending_rows += rows.num_rows
            piece.pending_bytes += rows.nbytes
            self.pending_bytes += rows.nbytes
            if self.row_group_size and piece.pending_rows >= self.row_group_size:
                self._write_rows(tp, group, piece)

    def _relieve(self) -> None:
        """Keep the pending rows of all partitions under `buffer_bytes`: write the largest
        as a row group of its file (a smaller row group, never another file)."""
        while self.buffer_bytes and self.pending_bytes > self.buffer_bytes:
            tp, group, piece = max(
                (
                    (tp, part.group, piece)
                    for tp, part in self.parts.items()
                    if part.group is not None
                    for piece in part.group.pieces.values()
                ),
                key=lambda item: item[2].pending_bytes,
            )
            if not piece.pending_bytes:
                return
            self._write_rows(tp, group, piece)

    def _commit_widest(self, tp: TopicPartition) -> bool:
        """Write out the open group with the most files (too many open); True if it was `tp`'s."""
        open_groups = [(t, p) for t, p in self.parts.items() if p.group is not None and p.group.pieces]
        if not open_groups:
            return False
        widest, part = max(open_groups, key=lambda item: len(item[1].group.pieces))
        self._commit(widest, part)
        return widest == tp

    def _ratio(self, topic: str) -> float:
        """Parquet bytes per Arrow byte written so far for `topic` (1 until known)."""
        parquet, arrow = self.written.get(topic, (0, 0))
        return parquet / arrow if arrow else 1.0

    def _measure(self, tp: TopicPartition, group: _Group) -> int:
        """The group's files' size, exactly: its pending rows are written first."""
        for piece in group.pieces.values():
            self._write_rows(tp, group, piece)
        return sum(p.size for p in group.pieces.values())

    def _write_rows(self, tp: TopicPartition, group: _Group, piece: _Piece) -> None:
        """Write a piece's pending rows to its file, as row groups."""
        if not piece.pending:
            return
        table = pa.Table.from_batches(piece.pending, group.schema)
        if piece.writer is None:
            self._ensure_dir(piece.tmp.parent)
            piece.sink = pa.OSFile(str(piece.tmp), "wb")
            piece.writer = pq.ParquetWriter(
                piece.sink,
                _plain(group.schema),
                compression=self.compression or "none",
            )
        before = piece.sink.tell()
        piece.writer.write_table(table, row_group_size=self.row_group_size)
        piece.size = piece.sink.tell()
        counts = self.written.setdefault(tp.topic, [0, 0])
        counts[0] += piece.size - before
        counts[1] += piece.pending_bytes
        self.pending_bytes -= piece.pending_bytes
        piece.pending, piece.pending_rows, piece.pending_bytes = [], 0, 0

    # -- committing a group ------------------------------------------------------------------

    def _commit(self, tp: TopicPartition, part: _Part) -> None:
        """Make the open group of `tp` durable under its final names (see the package doc)."""
        group = part.group
        if not group.pieces:  # nothing written yet
            part.group = None
            return
        group.committing = True
        n = len(group.pieces)
        staged: list[tuple[Path, Path, Path]] = []
        # Phase 1: finish every file, fsync it, give it its group's temp name.
        for k, piece in enumerate(group.pieces.values(), 1):
            self._write_rows(tp, group, piece)
            piece.writer.add_key_value_metadata(files.group_meta(tp, group.first, group.last, k, n))
            piece.writer.close()
            piece.sink.close()
            piece.writer = piece.sink = None
            self.open_pieces -= 1
            files.fsync_file(piece.tmp)
            final = piece.tmp.with_name(files.file_name(tp, group.first, group.last, k, n))
            staged.append((piece.tmp, final.with_name(files.temp_name(final.name)), final))
        for tmp, ready, _ in staged:
            os.replace(tmp, ready)
        dirs = {final.parent for *_, final in staged}
        for d in dirs:
            files.fsync_dir(d)
        # Phase 2: every temp is durable; rename them all to their final names.
        for _, ready, final in staged:
            os.replace(ready, final)
        for d in dirs:
            files.fsync_dir(d)
        part.group = None
        part.durable = group.last + 1
        self.files_written += n

    def _write_old(self) -> None:
        with self.lock:
            try:
                now = time.monotonic()
                for tp, part in self.parts.items():
                    if part.group is not None and now - part.group.opened >= self.max_open_seconds:
                        self._commit(tp, part)
            except BaseException as exc:
                self.broken = exc
                raise

    def _close(self, write: bool) -> None:
        with self.lock:
            try:
                if write and self.broken is None:
                    for tp, part in self.parts.items():
                        if part.group is not None:
                            self._commit(tp, part)
            except BaseException as exc:
                self.broken = exc
                raise
            finally:
                self._discard()

    def _discard(self) -> None:
        """Drop the open groups: their files are deleted, their records come again from the
        resume position. A group that failed while committing is left as it is, for the
        next open to repair."""
        for part in self.parts.values():
            group, part.group = part.group, None
            if group is None:
                continue
            part.next = part.durable
            for piece in group.pieces.values():
                if group.committing:
                    for closing in (piece.writer, piece.sink):
                        if closing is not None:
                            try:
                                closing.close()
                            except Exception:  # noqa: BLE001
                                pass
                else:
                    piece.discard()
        self.pending_bytes = 0
        self.open_pieces = 0

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
            files.fsync_dir(parent)  # the new directory's entry is durable before files in it
        self.known_dirs.add(directory)

    # -- schema checks ----------------------------------------------------------------------------

    def _check_schema(self, topic: str, schema: pa.Schema) -> None:
        if not self.partition_by or self.checked_schemas.get(topic) is schema:
            return
        error = partition_field_error(self.partition_by, topic, schema)
        if error is not None:
            raise error
        self.checked_schemas[topic] = schema
