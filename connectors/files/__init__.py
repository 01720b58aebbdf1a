"""`files` source: whole files landing in a directory (nightly exports, hourly bundles),
each read once, into a topic — the batch-to-stream source.

    sources:
      - name: orders-export
        connector: files
        topic: orders
        config:
          paths: ["landing/orders/**/*.csv"]
          format: csv
          move_to: done/orders/          # optional

A run reads every matching file that was not read before and ends (`poll()` returns None):
it is a *bounded* source, made to run once per tick of a schedule or with `pipeline run
--once`. An empty landing directory is normal: the run simply reads nothing.

Files
-----
- `paths` are glob patterns relative to the spec's directory (`**` matches any depth).
  Files starting with a dot are not matched by `*` (write `.orders.csv.tmp`, then rename:
  a half-written file is never read). Files are read one at a time, in path order.
- Files must be complete when they land. A file still being written changes identity
  under the reader and is read again in full by the next run: write elsewhere and rename
  into place (the usual way), or set `min_age` to leave files modified within that many
  seconds for a later run.
- `.gz` files are decompressed on the fly for the line formats (csv, jsonl, http_log).
- A file deleted or moved away between the scan and its turn is skipped with a warning
  naming it; one deleted or moved while it is read is read to its end (its descriptor is
  open). A file the pipeline may not read stops the run with a message naming it.
- Progress (`pipeline run`'s display): bytes read of the bytes this run has to read (what
  earlier runs read is not counted); `.gz` in compressed bytes, Parquet by rows read.

Formats
-------
- `csv`: a header row, then one record per row (quoted fields may span lines). Cells are
  converted to the topic schema's field types (see `connectors/files/convert.py`: int/long
  range-checked, float/double, boolean `true/false/1/0/yes/no`, timestamp-millis/-micros
  from ISO 8601 — without an offset taken as UTC — or epoch numbers, date, time, decimal,
  enum, bytes as UTF-8, uuid; array/map/record cells hold JSON). An empty cell is null in
  a nullable field, "" in a string field, else the field's default, else an error.
  Header cells are matched to field names or aliases. Columns the schema does not name
  are ignored (the topic schema decides what is kept, as with Kafka Connect's converters);
  a field with no column is null if nullable, its default if it has one, and otherwise
  every row of that file is a data error naming the missing column. A row with another
  number of cells than the header is a data error. `delimiter` (default `,`) and `encoding`
  (default utf-8; a UTF-8 byte-order mark is skipped).
- `jsonl`: one JSON object per line; blank lines are skipped. Values are taken as they are,
  except where JSON cannot express the field's type: an ISO string into a timestamp, date
  or time field, a string or number into a decimal, a string into bytes (UTF-8). Keys the
  schema does not name are ignored, as CSV columns are; a missing nullable field is null
  (the encoder reports any other missing field).
- `parquet`: read with pyarrow in batches of `batch_size` rows, only the columns the
  schema names; naive timestamps are UTC. A field with no column is handled as for CSV.
- `http_log`: Apache / Nginx access logs, parsed by the `http_log` connector's compiled
  parser: `log_format` is `common`, `combined`, `vhost_combined` or an Apache LogFormat
  string. Escapes are undone and undecodable bytes kept as `\\xhh` text exactly as the
  `http_log` connector does (its docstring has the rule). The source declares the
  format's schema (`produces()`, checked by `pipeline validate`):
  `connectors.http_log.avro_schema_for(log_format)` is the topic's schema to use.

Bad input is a data error (`Batch.errors`, under the spec's `errors:` policy, e.g. to the
dead-letter topic) with its position, and the rest of the file is still delivered:

- csv: `<path>:<line>` (the line the record starts on; the header is line 1), `field` the
  column, `record` the raw line(s), the message e.g. `column 'amount': 'abc' is not a double`;
- jsonl, http_log: `<path>:<line>` and the raw line;
- parquet: `<path>#row<N>` (1-based) and the row;
- a file that cannot be read at all (not Parquet) or only in part (a damaged .gz: what
  precedes the damage is delivered): one error at `<path>`, and the file counts as read.

Once only, and resume
---------------------
Each file is known by its path and its identity: `identity: stat` (the default) is
`stat:<size>:<mtime in ns>`; `identity: hash` is `sha256:<hex digest of the content>`
(the content is read one extra time; a copy with a new mtime is then still the same
file). The source offsets hold one entry per file, under its absolute path (kept after
the file is gone or moved; a few dozen bytes each):

    {"id": "stat:52311:1714557600123456789", "row": 3000, "done": false, "pos": 196608, "line": 3001}
    {"id": "sha256:9f86d0…", "row": 4812, "done": true}

`row` is the number of records consumed (good and bad: CSV rows after the header,
non-blank lines, Parquet rows); `pos` (bytes) and `line` let a line-format file resume by
seeking rather than by skipping `row` records (either works). The engine stores the
offsets with each batch, atomically with its records, so a run killed mid-file resumes
after the last delivered record: nothing lost, nothing repeated. On the next run:

- a path whose stored id matches and is `done` is skipped;
- a path whose id matches but is not done resumes after `row`;
- a path whose content changed (another id) is a new file: read again from the start;
- changing `identity` does not make files new: a stored id of the other kind is checked
  in its own kind.

Moving finished files
---------------------
With `move_to: done/` (relative to the spec's directory) a file is moved there once the
offsets saying it was read to the end are durable (`SourceTask.committed`). The path below
the fixed directory part of the glob that matched it is kept
(`landing/**/*.csv`: `landing/2024/05/a.csv` → `done/2024/05/a.csv`); an existing file is
never overwritten: `a.1.csv`, `a.2.csv`, … are used instead. A file that was read but not
moved (a crash right after the commit, a permission problem, which is logged) is moved by
the next run without being read again. Files under `move_to` are never matched by `paths`.

Tasks
-----
With `tasks: N` on the source, N tasks read side by side, task i the files whose absolute
path hashes to i (`runner.connector.task_of`: CRC-32, the same in every process and on
every machine that sees the files at the same paths, as the offsets, kept by absolute path,
need anyway). A file keeps its task from run to run while N does. Each task scans, reads
and moves its own files, and reports its own progress. Every task is opened with the
offsets of all, so after N changes a file read (or half read) under the old N is skipped
(or resumed) by its new task.

Batches
-------
`batch_size` records (default 5000) per batch; a batch may cover the end of one file and
the start of the next, and its `source_offsets` hold an entry for each file it touches.
Records are not keyed here: set `key:` on the topic.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import glob
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from runner.batch import Batch
from runner.connector import (
    Config,
    FatalError,
    Progress,
    RecordError,
    Source,
    SourceTask,
    setting,
    task_of,
)

from connectors.files.convert import plan_for
from connectors.files.readers import READ_ERRORS, FailedReader, Reader, Settings, Unreadable, open_reader
from connectors.http_log import encoding_problems
from connectors.http_log.formats import NAMED_FORMATS, FormatError, avro_schema_for, compile_format

__all__ = ["FilesSource", "FilesSourceTask"]

log = logging.getLogger("pipeline.files")

_FORMATS = ("jsonl", "csv", "parquet", "http_log")
_ID_KINDS = {"stat": "stat", "sha256": "hash"}  # id prefix -> identity setting
_MAGIC = re.compile(r"[*?[]")


class FilesSource(Source):
    name = "files"
    description = "Reads whole files landing in a directory (csv, jsonl, parquet, access logs), each once."

    class Config(Config):
        paths: list[str] = setting(
            help="Glob patterns of the files to read, relative to the spec's directory (** matches "
            "any depth; dotfiles are not matched by *). No matching file is not an error."
        )
        format: Literal["jsonl", "csv", "parquet", "http_log"] = setting(
            help="csv (header row, cells converted to the topic schema's types), jsonl (one JSON "
            "object per line), parquet, or http_log (access logs, see log_format)."
        )
        identity: Literal["stat", "hash"] = setting(
            "stat",
            help="What makes a file the same file: stat (path + size + modification time) or hash "
            "(path + SHA-256 of the content). A path whose identity changed is read again.",
        )
        move_to: str | None = setting(
            None,
            help="Directory (relative to the spec's directory) to move each file to once it is "
            "read and its offsets committed; the sub-path below the glob's fixed part is kept, "
            "an existing file is not overwritten (a.1.csv...). Default: files stay.",
        )
        batch_size: int = setting(5000, help="Records per batch.", min=1, max=1_000_000)
        min_age: float = setting(
            0.0,
            help="Seconds since a file's last modification before it is taken; younger files wait "
            "for a later run (for writers that do not write-then-rename).",
            min=0,
        )
        delimiter: str = setting(",", help='csv: the cell delimiter, one character ("\\t" for tabs).')
        encoding: str = setting(
            "utf-8",
            help="csv, jsonl, http_log: text encoding (ASCII-compatible). csv: undecodable rows are "
            "data errors; http_log: undecodable bytes are kept as \\xhh text, like the escapes the "
            "servers write.",
        )
        log_format: str = setting(
            "combined",
            help=f"http_log: {', '.join(NAMED_FORMATS)}, or an Apache LogFormat string such as "
            '\'%h %l %u %t "%r" %>s %b %D\'.',
        )

        @classmethod
        def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
            problems = []
            fmt = given.get("format")
            if isinstance(given.get("paths"), list) and not given["paths"]:
                problems.append(("paths", "give at least one glob pattern"))
            for key, only in (("delimiter", "csv"), ("log_format", "http_log")):
                if key in given and fmt in _FORMATS and fmt != only:
                    problems.append((key, f"applies to format: {only} only (format is {fmt})"))
            if "encoding" in given and fmt == "parquet":
                problems.append(("encoding", "does not apply to format: parquet"))
            delimiter = given.get("delimiter", ",")
            if isinstance(delimiter, str) and len(delimiter) != 1:
                problems.append(("delimiter", f"must be one character, got {delimiter!r}"))
            problems += encoding_problems(given.get("encoding", "utf-8"))
            log_format = given.get("log_format", "combined")
            if isinstance(log_format, str):
                try:
                    compile_format(log_format)
                except FormatError as exc:
                    problems.append(("log_format", str(exc)))
            return problems

    def target(self) -> str:
        return " ".join(self.context.display(p) for p in self.config.paths)

    def preflight(self) -> list[tuple[str, str]]:
        return self.context.unmatched(self.config.paths)

    def produces(self) -> dict[str, Any] | None:
        """http_log: the schema of `log_format`, as the http_log source declares it. csv,
        jsonl and parquet: None (their fields are in the data)."""
        if self.config.format == "http_log":
            return avro_schema_for(self.config.log_format)
        return None

    def tasks(self) -> list[SourceTask]:
        """`tasks: N`: N tasks, task i reading the files whose absolute path hashes to i
        (`task_of`), so the same file always goes to the same task."""
        n = self.context.max_tasks
        return [FilesSourceTask(self.config, self.context, self._settings, share=(i, n)) for i in range(n)]

    @functools.cached_property
    def _settings(self) -> Settings:
        """How the tasks read, built once (the engine calls `tasks()` once per task)."""
        config, context = self.config, self.context
        schema = context.schemas.get(context.topics[0]) if context.topics else None
        return Settings(
            format=config.format,
            batch_size=config.batch_size,
            encoding=config.encoding,
            delimiter=config.delimiter,
            plans=plan_for(schema),
            log_format=compile_format(config.log_format) if config.format == "http_log" else None,
        )


class FilesSourceTask(SourceTask):
    read_ahead = True  # reading files changes nothing outside the task

    def __init__(self, config: Any, context: Any, settings: Settings, share: tuple[int, int] = (0, 1)) -> None:
        self.config = config
        self.settings = settings
        self.share = share  # (this task, of how many): it reads the files `task_of` gives it
        # (root, pattern relative to it, the fixed directory part): globbing below `root`
        # keeps wildcard characters in the spec's own directory name from counting.
        self.patterns = []
        for p in config.paths:
            pattern = os.path.expanduser(p)
            root = os.sep if os.path.isabs(pattern) else os.path.abspath(context.spec_dir)
            pattern = os.path.relpath(pattern, os.sep) if os.path.isabs(pattern) else pattern
            self.patterns.append((root, pattern, os.path.join(root, _fixed_part(pattern))))
        self.move_dir = os.path.abspath(context.resolve(config.move_to)) if config.move_to else None
        self.stored: dict[str, Any] = {}
        self.pending: deque[str] = deque()
        self.bases: dict[str, str] = {}  # path -> the fixed directory of the glob that matched it
        self.reader: Reader | None = None
        self.current: tuple[str, str, tuple[int, ...]] | None = None  # path, id, stat key
        self.finished: dict[str, tuple[int, ...]] = {}  # path -> stat key, read to the end this run
        self.lock = threading.Lock()  # one reader at a time: a poll's thread, or close
        # Progress, in bytes of the files this run reads (what earlier runs read is left out):
        # path -> (size, bytes read before this run) for the files not opened yet; the sum
        # of what is left of them all; what the finished ones and the current one account for.
        self.planned: dict[str, tuple[int, int]] = {}
        self.total_bytes = 0
        self.done_bytes = 0
        self.current_bytes = (0, 0, 0)  # (size, read before this run, taken so far)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, offsets: dict[str, Any]) -> None:
        self.stored = dict(offsets)
        await asyncio.to_thread(self._scan)

    async def poll(self) -> Batch | None:
        return await asyncio.to_thread(self._locked, self._step)

    async def committed(self, offsets: dict[str, Any]) -> None:
        if self.move_dir is None:
            return
        done = [p for p, o in offsets.items() if isinstance(o, dict) and o.get("done")]
        if done:
            await asyncio.to_thread(self._move_read, done)

    async def close(self) -> None:
        # A poll cancelled on shutdown may still be reading in its thread: wait for it.
        await asyncio.to_thread(self._locked, self._close)

    def progress(self) -> Progress:
        """Bytes read of the bytes this run reads: the matched files' sizes at the scan, less
        what earlier runs read of them (files read to the end then count not at all). A .gz
        counts in compressed bytes, a Parquet file by the share of its rows read. From what
        the last scan and read saw; no I/O."""
        size, base, taken = self.current_bytes
        return Progress(self.done_bytes + max(min(taken, size) - base, 0), self.total_bytes, "bytes")

    def _locked(self, fn: Any) -> Any:
        with self.lock:
            return fn()

    def _close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = self.current = None

    # -- in a worker thread ------------------------------------------------------------------

    def _scan(self) -> None:
        found: dict[str, str] = {}
        young_before = time.time() - self.config.min_age
        for root, pattern, base in self.patterns:
            for found_path in glob.glob(pattern, root_dir=root, recursive=True):
                path = os.path.normpath(os.path.join(root, found_path))
                if path in found or task_of(path, self.share[1]) != self.share[0]:
                    continue  # seen, or another task's
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if self.move_dir is not None and _under(path, self.move_dir):
                    continue
                if self.config.min_age and st.st_mtime > young_before:
                    continue
                found[path] = base
                self.planned[path] = (st.st_size, self._read_before(path, st))
        self.bases = found
        self.pending = deque(sorted(found))
        self.total_bytes = sum(size - before for size, before in self.planned.values())

    def _read_before(self, path: str, st: os.stat_result) -> int:
        """Bytes of the file that earlier runs read, as far as the stored offset tells
        without reading the file (an estimate, corrected when the file is opened)."""
        stored = self.stored.get(path)
        if not isinstance(stored, dict) or stored.get("id") != f"stat:{st.st_size}:{st.st_mtime_ns}":
            return 0
        if stored.get("done"):
            return st.st_size
        pos = stored.get("pos")
        if isinstance(pos, int) and not path.endswith(".gz"):
            return min(pos, st.st_size)
        return 0

    def _unplan(self, path: str) -> None:
        """Take a file out of the plan: it is being opened, skipped or gone (once opened,
        it counts again with its size and start as found then)."""
        size, before = self.planned.pop(path, (0, 0))
        self.total_bytes -= size - before

    def _step(self) -> Batch | None:
        rows: list[dict[str, Any]] = []
        errors: list[RecordError] = []
        offsets: dict[str, Any] = {}
        positions = Positions()
        budget = self.config.batch_size
        while budget > 0:
            if self.reader is None and not self._open_next():
                break
            reader, current = self.reader, self.current
            assert reader is not None and current is not None
            path, ident, key = current
            try:
                chunk = reader.read(budget)
            except READ_ERRORS as exc:
                chunk = None
                line = getattr(reader, "line", None)
                where = reader.where(line) if line is not None else path
                errors.append(RecordError(error=f"cannot read further: {exc}", stage="source", position=where))
                reader.done = True
            except OSError as exc:
                raise FatalError(f"cannot read {path}: {exc.strerror or exc}") from None
            if chunk is not None:
                budget -= chunk.consumed
                rows += chunk.rows
                errors += chunk.errors
                positions.add(f"{path}{reader.sep}", chunk.numbers)
            if reader.failure is not None:
                errors.append(RecordError(error=reader.failure, stage="source", position=path))
                reader.failure = None
            done = reader.done
            offset: dict[str, Any] = {"id": ident, "row": reader.row, "done": done}
            if not done:
                offset.update(reader.state())
                if chunk is None or not chunk.consumed:  # pragma: no cover - a reader always moves
                    offset["done"] = done = True
            offsets[path] = offset
            self.current_bytes = (*self.current_bytes[:2], reader.taken(self.current_bytes[0]))
            if done:
                reader.close()
                self.reader = self.current = None
                self.finished[path] = key
                size, base, _ = self.current_bytes
                self.done_bytes += size - base
                self.current_bytes = (0, 0, 0)
        if not rows and not errors and not offsets:
            return None
        return Batch(rows, source_offsets=offsets, errors=errors, positions=positions)

    def _open_next(self) -> bool:
        """Open the next file to read (skipping, and moving, those read before)."""
        while self.pending:
            path = self.pending.popleft()
            self._unplan(path)
            try:
                fh = open(path, "rb")
            except PermissionError as exc:
                raise FatalError(
                    f"cannot read {path}: {exc.strerror}", hint="the pipeline needs read access to the files"
                ) from None
            except OSError as exc:  # deleted or renamed away since the scan
                log.warning("files: skipped %s: %s", path, exc.strerror or exc)
                continue
            st = os.fstat(fh.fileno())
            key = _stat_key(st)
            ident = _identity(self.config.identity, fh, st)
            stored = self.stored.get(path)
            start: dict[str, Any] = {}
            if isinstance(stored, dict) and _same(stored.get("id"), ident, self.config.identity, fh, st):
                if stored.get("done"):
                    fh.close()
                    if self.move_dir is not None:
                        self._move(path)  # read and committed by an earlier run, not moved yet
                    continue
                start = stored
            self.current = (path, ident, key)
            try:
                self.reader = open_reader(self.settings, path, fh, start)
            except Unreadable as exc:
                fh.close()
                self.reader = FailedReader(path, str(exc), int(start.get("row", 0)))
            except READ_ERRORS as exc:
                fh.close()
                self.reader = FailedReader(path, f"cannot read: {exc}", int(start.get("row", 0)))
            base = min(self.reader.taken(st.st_size), st.st_size) if start else 0
            self.current_bytes = (st.st_size, base, base)
            self.total_bytes += st.st_size - base
            return True
        return False

    def _move_read(self, paths: list[str]) -> None:
        for path in paths:
            key = self.finished.pop(path, None)
            if key is None:
                continue  # not read to the end by this task (or moved already)
            try:
                if _stat_key(os.stat(path)) != key:
                    continue  # replaced since it was read: the next run reads the new file
            except FileNotFoundError:
                continue
            self._move(path)

    def _move(self, path: str) -> None:
        assert self.move_dir is not None
        base = self.bases.get(path, os.path.dirname(path))
        rel = os.path.relpath(path, base)
        if rel.startswith(".."):
            rel = os.path.basename(path)
        target = os.path.join(self.move_dir, rel)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            stem, ext = os.path.splitext(target)
            n = 0
            while os.path.lexists(target):
                n += 1
                target = f"{stem}.{n}{ext}"
            try:
                os.rename(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another file system: copy, then delete
                    raise
                shutil.move(path, target)
        except OSError as exc:
            log.warning("files: could not move %s to %s: %s (the next run tries again)", path, target, exc)


# -- helpers -----------------------------------------------------------------------------------


def _fixed_part(pattern: str) -> str:
    """The directory part of a relative glob before its first wildcard ("" for none)."""
    fixed: list[str] = []
    for part in Path(pattern).parts[:-1]:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else ""


def _under(path: str, directory: str) -> bool:
    p = os.path.abspath(path)
    return p == directory or p.startswith(directory.rstrip(os.sep) + os.sep)


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _identity(kind: str, fh: BinaryIO, st: os.stat_result) -> str:
    if kind == "stat":
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    fh.seek(0)
    digest = hashlib.file_digest(fh, "sha256").hexdigest()
    fh.seek(0)
    return f"sha256:{digest}"


def _same(stored: Any, ident: str, kind: str, fh: BinaryIO, st: os.stat_result) -> bool:
    """Whether a stored id names this file, also when it was made with the other `identity`."""
    if not isinstance(stored, str):
        return False
    if stored == ident:
        return True
    other = _ID_KINDS.get(stored.partition(":")[0])
    if other is None or other == kind:
        return False
    return stored == _identity(other, fh, st)


class Positions(Sequence[str]):
    """`<path>:<line>` / `<path>#row<N>` of each row of a batch, made only when asked for
    (on an error), not per record."""

    __slots__ = ("numbers", "starts", "prefixes")

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self.starts: list[int] = []
        self.prefixes: list[str] = []

    def add(self, prefix: str, numbers: list[int]) -> None:
        if numbers:
            self.starts.append(len(self.numbers))
            self.prefixes.append(prefix)
            self.numbers += numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self.numbers):
            raise IndexError(index)
        k = bisect_right(self.starts, index) - 1
        return f"{self.prefixes[k]}{self.numbers[index]}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Positions({list(self)!r})"
