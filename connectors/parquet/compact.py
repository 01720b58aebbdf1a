"""`pipeline compact` for the parquet sink: per topic-partition and directory, runs of
consecutive complete single-file groups merged into one file named by the run's first and
last offsets (see "Compaction" in the package doc)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.parquet import files
from runner.connector import FatalError, TopicPartition

log = logging.getLogger("pipeline.parquet")

# Compaction lets go of a topic's lock after a merge once it has held it this long (then
# scans again), so a sink starting or rebalancing meanwhile waits for one merge, not all.
LOCK_SLICE = 2.0
READ_BATCH = 64 * 1024  # rows read from an input at a time


@dataclass(frozen=True)
class Limits:
    rotate_records: int
    rotate_bytes: int
    buffer_bytes: int  # Arrow memory a row group of the merged file may take while built
    row_group_size: int | None
    compression: str | None
    partition_by: str | None
    rotate_interval: int | None  # seconds: files of different windows are never merged


@dataclass
class _File:
    """One file of a complete group."""

    path: Path
    rows: int = 0
    size: int = 0
    schema: pa.Schema | None = None
    window: object = None  # files merge only within one rotate_interval window

    @property
    def key(self) -> tuple[Path, object]:
        """Files merge with files of the same key: directory (and window)."""
        return (self.path.parent, self.window)


@dataclass
class _Group:
    """A complete group, a candidate for merging."""

    key: files.Group
    files: list[_File]
    read: bool = False
    compacted: bool = False  # a merge already

    @property
    def first(self) -> int:
        return self.key[0]

    @property
    def last(self) -> int:
        return self.key[1]


def compact(directory: Path, topics: list[str], limits: Limits, *, dry_run: bool) -> list[str]:
    """Compact the sink's output of `topics` under `directory`; one line per merge (or
    removal of what an interrupted compaction left); with `dry_run` the same lines,
    saying "would", and nothing changed."""
    lines: list[str] = []
    for topic in topics:
        root = directory / topic
        if root.is_dir():
            lines += _compact_topic(root, topic, limits, dry_run)
    return lines


def _compact_topic(root: Path, topic: str, limits: Limits, dry_run: bool) -> list[str]:
    lines: list[str] = []
    while True:
        with files.locked(root):
            held = time.monotonic()
            found = files.scan(root, topic)
            more = False
            for tp in sorted(found, key=lambda tp: tp.partition):
                lines += _tidy(root, tp, found[tp], dry_run)
                for run in _plan(found[tp], limits):
                    if dry_run:
                        lines.append(_describe(root, tp, run, "would merge"))
                        continue
                    _merge(tp, run, limits)
                    lines.append(_describe(root, tp, run, "merged"))
                    if time.monotonic() - held > LOCK_SLICE:
                        more = True  # let a waiting sink in, then scan again
                        break
                if more:
                    break
        if not more:
            return lines


def _describe(root: Path, tp: TopicPartition, run: list[_Group], verb: str) -> str:
    inputs = [f for g in run for f in g.files]
    dirs = list(dict.fromkeys(f.path.parent.relative_to(root).as_posix() for f in inputs))
    n = len(_outputs(run))
    where = _where(dirs)
    first, last = run[0].first, run[-1].last
    name = files.file_name(tp, first, last, 1, n)
    into = name if n == 1 else f"{n} files {name.replace('+1of', '+<k>of')}"
    return f"{verb} {len(inputs)} files of {tp}{where} into {into} ({sum(f.rows for f in inputs):,} rows)"


def _where(dirs: list[str]) -> str:
    if dirs == ["."]:
        return ""
    return f" in {dirs[0]}" if len(dirs) == 1 else f" in {len(dirs)} directories {dirs[0]} .. {dirs[-1]}"


def _tidy(root: Path, tp: TopicPartition, found: files.Found, dry_run: bool) -> list[str]:
    """Finish what an interrupted compaction left: the groups it had merged but not yet
    deleted (the sink's open does the same). Takes them out of `found`."""
    lines = []
    # A merge cut during its renames (its files say they are a merge: never a group a
    # running sink is renaming right now) is completed first, as open would.
    complete = found.complete()
    touched: set[Path] = set()
    for group, present in list(found.finals.items()):
        if group in complete or not files.compacted_from(next(iter(present.values()))):
            continue
        missing = set(range(1, group[2] + 1)) - set(present)
        if missing <= set(found.temps.get(group, {})) and (dry_run or files.roll_forward(found, group, touched)):
            complete.add(group)
            name = files.file_name(tp, group[0], group[1], 1, group[2]).replace("+1of", "+<k>of")
            lines.append(f"{'would complete' if dry_run else 'completed'} the interrupted merge into {name} of {tp}")
    # Temps of a merge cut before its renames lie over complete groups (a running sink's
    # temps never do: they come after all of them): garbage, as open would find.
    for group in [g for g in found.temps if g not in found.finals]:
        if any(c[0] <= group[1] and group[0] <= c[1] for c in complete):
            for path in found.temps.pop(group).values():
                if not dry_run:
                    path.unlink(missing_ok=True)
                    touched.add(path.parent)
    for d in touched:
        files.fsync_dir(d)
    for merged, covered in files.leftovers(tp, found.finals, complete, root).items():
        paths = [p for g in covered for p in found.finals.pop(g).values()]
        found.temps = {g: t for g, t in found.temps.items() if g not in covered}
        where = _where(sorted({p.parent.relative_to(root).as_posix() for p in paths}))
        verb = "would remove" if dry_run else "removed"
        name = files.file_name(tp, merged[0], merged[1], 1, merged[2]).replace("+1of", "+<k>of")
        lines.append(f"{verb} {len(paths)} files of {tp}{where} already merged into {name} (left by an interrupted compaction)")
        if not dry_run:
            for p in paths:
                p.unlink(missing_ok=True)
            for d in {p.parent for p in paths}:
                files.fsync_dir(d)
    return lines


def _plan(found: files.Found, limits: Limits) -> list[list[_Group]]:
    """The merges to make: runs of consecutive complete groups (no other group of the
    partition between them), each merged file within rotate_records and rotate_bytes, of
    one schema. A group being written or incomplete ends a run. Every file of a run
    merges with another file of the run in its directory (and window), except that a
    group at either end of the run may bring one file that merges with nothing (the
    part of a write that spanned an hour boundary, copied once into the merged group),
    if it is not itself a merge: so a merged file is only rewritten when it grows."""
    complete = found.complete()
    sequences: list[list[_Group]] = [[]]
    for g in sorted(set(found.finals) | set(found.temps)):
        if g in complete and g not in found.temps:
            paths = [found.finals[g][k] for k in sorted(found.finals[g])]
            sequences[-1].append(_Group(g, [_File(p) for p in paths]))
        elif sequences[-1]:
            sequences.append([])
    merges: list[list[_Group]] = []
    todo = [seq for seq in sequences if len(seq) >= 2]
    for seq in todo:
        for g in seq:
            _read_footers(g, limits)
    while todo:
        seq = todo.pop()
        out = _offending(seq)
        if out:
            todo += [part for part in _cut(seq, out) if len(part) >= 2]
            continue
        parts = _fit(seq, limits)
        if len(parts) > 1:
            todo += [part for part in parts if len(part) >= 2]
            continue
        merges.append(seq)
    return sorted(merges, key=lambda run: run[0].first)


def _offending(seq: list[_Group]) -> set[int]:
    """Indexes of the groups of `seq` that may not be merged in it: with a file that
    merges with no other file of `seq`, unless allowed (see _plan), with two files of one
    key (they could not be merged in offset order), or a file spanning windows."""
    count: dict[object, int] = {}
    for g in seq:
        for f in g.files:
            count[f.key] = count.get(f.key, 0) + 1
    anywhere, inside = set(), set()
    for i, g in enumerate(seq):
        keys = [f.key for f in g.files]
        lone = sum(1 for k in keys if count[k] == 1)
        if (
            len(set(keys)) < len(keys)
            or any(f.window is _UNMERGEABLE for f in g.files)
            or (lone and (lone > 1 or lone == len(keys) or g.compacted))
        ):
            anywhere.add(i)
        elif lone and 0 < i < len(seq) - 1:
            inside.add(i)
    # Those that may not be merged wherever they stand go first: the rest may end a run then.
    return anywhere or inside


def _cut(seq: list[_Group], out: set[int]) -> list[list[_Group]]:
    parts: list[list[_Group]] = [[]]
    for i, g in enumerate(seq):
        if i in out:
            parts.append([])
        else:
            parts[-1].append(g)
    return parts


def _fit(seq: list[_Group], limits: Limits) -> list[list[_Group]]:
    """`seq` cut, greedily, where a directory's merged file would pass the limits or the
    schema changes."""
    parts: list[list[_Group]] = [[]]
    rows: dict[object, int] = {}
    size: dict[object, int] = {}
    for g in seq:
        fits = not parts[-1] or (
            g.files[0].schema.equals(parts[-1][0].files[0].schema)
            and all(f.schema.equals(g.files[0].schema) for f in g.files)
            and all(
                rows.get(f.key, 0) + f.rows <= limits.rotate_records
                and size.get(f.key, 0) + f.size <= limits.rotate_bytes
                for f in g.files
            )
        )
        if not fits:
            parts.append([])
            rows, size = {}, {}
        parts[-1].append(g)
        for f in g.files:
            rows[f.key] = rows.get(f.key, 0) + f.rows
            size[f.key] = size.get(f.key, 0) + f.size
    return parts


_UNMERGEABLE = object()


def _read_footers(g: _Group, limits: Limits) -> None:
    if g.read:
        return
    for f in g.files:
        meta = pq.read_metadata(f.path)
        f.rows = meta.num_rows
        f.size = f.path.stat().st_size
        f.schema = _plain(meta.schema.to_arrow_schema())
        if limits.rotate_interval and limits.partition_by:
            f.window = _window(meta, limits.partition_by, limits.rotate_interval)
        g.compacted = g.compacted or files.META_COMPACTED.encode() in (meta.metadata or {})
    g.read = True


def _window(meta: pq.FileMetaData, field: str, interval: int) -> object:
    """The rotate_interval window all of a file's times fall in (from its statistics)."""
    lows, highs, nulls = [], [], 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema != field:
                continue
            stats = col.statistics
            if stats is None:
                return _UNMERGEABLE
            if stats.has_min_max:
                lows.append(_seconds(stats.min))
                highs.append(_seconds(stats.max))
            elif stats.null_count == rg.num_rows:
                nulls += 1
            else:
                return _UNMERGEABLE
    if not lows:
        return "null" if nulls else _UNMERGEABLE
    if None in lows or None in highs:
        return _UNMERGEABLE
    low, high = min(lows) // interval, max(highs) // interval
    return low if low == high else _UNMERGEABLE


def _seconds(value: object) -> int | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp() // 1)
    if isinstance(value, dt.date):
        return (value - dt.date(1970, 1, 1)).days * 86400
    if isinstance(value, int):
        return value // 1000  # epoch milliseconds
    return None


def _plain(schema: pa.Schema) -> pa.Schema:
    kept = files.strip_meta(schema.metadata)
    return schema.with_metadata(kept) if kept else schema.remove_metadata()


def _outputs(run: list[_Group]) -> dict[object, list[_File]]:
    """The merged files of a run: key (directory, window) -> its input files in offset order."""
    out: dict[object, list[_File]] = {}
    for g in run:
        for f in g.files:
            out.setdefault(f.key, []).append(f)
    return out


def _merge(tp: TopicPartition, run: list[_Group], limits: Limits) -> None:
    """Merge a run of groups into one group, with a file per directory (and window): its
    files are committed as the sink commits a group (each written to `.<name>.tmp` and
    fsynced, the directories fsynced, all renamed, the directories fsynced), then the
    run's files are deleted and their directories fsynced. A crash before the renames
    leaves temps the next open deletes; a crash among them, temps the next open renames;
    after them, the merged group and groups it names as merged, which the next open (or
    compaction) deletes."""
    first, last = run[0].first, run[-1].last
    outputs = _outputs(run)
    n = len(outputs)
    merged = json.dumps([[g.first, g.last] for g in run])
    staged: list[tuple[Path, Path]] = []
    try:
        for k, inputs in enumerate(outputs.values(), 1):
            final = inputs[0].path.parent / files.file_name(tp, first, last, k, n)
            tmp = final.with_name(files.temp_name(final.name))
            staged.append((tmp, final))
            meta = files.group_meta(tp, first, last, k, n)
            meta[files.META_COMPACTED] = merged
            _write_merged(tmp, inputs, meta, limits)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    dirs = {final.parent for _, final in staged}
    for d in dirs:
        files.fsync_dir(d)
    for tmp, final in staged:
        os.replace(tmp, final)
    for d in dirs:
        files.fsync_dir(d)
    for g in run:
        for f in g.files:
            f.path.unlink()
    for d in {f.path.parent for g in run for f in g.files}:
        files.fsync_dir(d)
    log.info("parquet compaction: %s: %d groups into %d..%d", tp, len(run), first, last)


def _write_merged(tmp: Path, inputs: list[_File], meta: dict[str, str], limits: Limits) -> None:
    """The rows of `inputs`, in order, to `tmp`, fsynced; row groups of at most
    row_group_size rows and about buffer_bytes of Arrow memory."""
    rows = sum(f.rows for f in inputs)
    row_group_rows = limits.row_group_size or 1024 * 1024
    sink = pa.OSFile(str(tmp), "wb")
    try:
        writer = pq.ParquetWriter(sink, inputs[0].schema, compression=limits.compression or "none")
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_bytes = 0
        for f in inputs:
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=READ_BATCH):
                pending.append(batch)
                pending_rows += batch.num_rows
                pending_bytes += batch.nbytes
                if pending_rows >= row_group_rows or pending_bytes >= limits.buffer_bytes:
                    writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
                    pending, pending_rows, pending_bytes = [], 0, 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
        writer.add_key_value_metadata(meta)
        writer.close()
    finally:
        sink.close()
    files.fsync_file(tmp)
    written = pq.read_metadata(tmp).num_rows
    if written != rows:
        raise FatalError(f"parquet compaction: {tmp} holds {written} rows, expected {rows}")
