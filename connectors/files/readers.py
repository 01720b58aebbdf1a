"""One reader per file format. A reader reads one open file from a starting point (the
file's stored offset) in chunks of at most `n` records and says how far it got.

- `row`: records consumed so far, good or bad (CSV data rows without the header, JSON
  lines and log lines without blank lines, Parquet rows). A resumed reader skips `row`
  records, or seeks straight to `pos` (line formats) when the offset has it.
- `done`: the end of the file was reached.
- `state()`: the extra offset fields needed to resume quickly (`pos`, `line`).
- `taken(size)`: how many of the file's `size` bytes it has taken so far, for progress
  (compressed bytes for a .gz; for Parquet the share of rows read); called in the reading
  thread, after `read`.

Positions are `<path>:<line>` for the line formats (the line a record starts on, header
and blank lines counted, so an editor shows it) and `<path>#row<N>` for Parquet (1-based).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from runner.connector import RecordError

from connectors.files.convert import OMIT, Bad, FieldPlan

__all__ = ["Chunk", "Reader", "Unreadable", "open_reader", "READ_ERRORS"]

#: Errors of a damaged file (a truncated .gz...): the rest of the file is one data error.
READ_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)


class Unreadable(Exception):
    """The file cannot be read at all in this format (not Parquet, a bad header...)."""


@dataclass
class Chunk:
    rows: list[dict[str, Any]] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # one per row: line or row number
    errors: list[RecordError] = field(default_factory=list)
    consumed: int = 0  # records consumed (rows + bad records)


class Reader:
    """Reads one file of one format; subclasses (one per format) implement `read`."""

    #: between the path and the number in positions
    sep = ":"
    path: str
    row: int = 0
    done: bool = False
    #: why the rest of the file could not be read (a damaged .gz): reported once, as a
    #: data error, by the source; what was read before it is delivered.
    failure: str | None = None

    def read(self, n: int) -> Chunk:
        """Up to `n` records from where the reader stands; sets `done` at the file's end."""
        raise NotImplementedError  # every format's reader defines it

    def state(self) -> dict[str, Any]:
        return {}

    def taken(self, size: int) -> int:
        return size if self.done else 0

    def close(self) -> None:
        return None

    def where(self, number: int) -> str:
        return f"{self.path}{self.sep}{number}"

    def error(self, message: str, record: Any, number: int | None, fld: str | None = None) -> RecordError:
        return RecordError(
            error=message,
            stage="source",
            record=record,
            field=fld,
            position=self.where(number) if number is not None else self.path,
        )


@dataclass
class Settings:
    format: str
    batch_size: int
    encoding: str
    delimiter: str
    plans: list[FieldPlan] | None  # None: no topic schema, values as they are
    log_format: Any = None  # a compiled http_log LogFormat


def open_reader(settings: Settings, path: str, fh: BinaryIO, offset: dict[str, Any]) -> Reader:
    """A reader positioned after `offset` (`row`, and `pos`/`line` if present)."""
    kind = settings.format
    if kind == "parquet":
        return ParquetReader(settings, path, fh, offset)
    cls = {"jsonl": JsonlReader, "csv": CsvReader, "http_log": HttpLogReader}[kind]
    return cls(settings, path, fh, offset)


# -- line formats ------------------------------------------------------------------------------


class _LineReader(Reader):
    def __init__(self, settings: Settings, path: str, fh: BinaryIO, offset: dict[str, Any]) -> None:
        self.settings = settings
        self.path = path
        self.fh = fh
        self.f: Any = gzip.GzipFile(fileobj=fh, mode="rb") if path.endswith(".gz") else fh
        self.encoding = settings.encoding
        self.utf8 = codecs.lookup(settings.encoding).name == "utf-8"
        self.pos = 0  # bytes consumed (uncompressed, for a .gz)
        self.line = 0  # lines consumed
        self.row = 0
        self.done = False
        self.lines = self._raw_lines()
        self._begin()
        row, pos, line = int(offset.get("row", 0)), offset.get("pos"), offset.get("line")
        if isinstance(pos, int) and isinstance(line, int) and pos > self.pos:
            self.f.seek(pos)  # straight to the stored position (past the header, if any)
            self.pos, self.line, self.row = pos, line, row
            self.lines = self._raw_lines()
            self._resumed()
        elif row > 0:
            self._skip(row)  # offsets without a position: count the records again

    def _raw_lines(self) -> Iterator[bytes]:
        try:
            for raw in self.f:
                self.pos += len(raw)
                self.line += 1
                if self.line == 1 and self.utf8 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[3:]
                yield raw
        except READ_ERRORS as exc:
            self.failure = f"cannot read past line {self.line}: {exc or type(exc).__name__}"

    def _begin(self) -> None:
        """Read what precedes the records (the CSV header)."""

    def _resumed(self) -> None:
        """Called after seeking to a stored position."""

    def _skip(self, rows: int) -> None:
        while self.row < rows and not self.done:
            self.read(rows - self.row)

    def state(self) -> dict[str, Any]:
        return {"pos": self.pos, "line": self.line}

    def taken(self, size: int) -> int:
        if self.done:
            return size
        if self.f is self.fh:
            return self.pos
        return self.fh.tell()  # a .gz: the compressed bytes its decompressor took

    def close(self) -> None:
        if self.f is not self.fh:
            self.f.close()
        self.fh.close()


def _fit_row(row: dict[str, Any], plans: list[FieldPlan] | None, names: frozenset[str]) -> tuple[str, str] | None:
    """Fit a JSON row to the schema in place: (field, message) if a value does not fit.
    Keys the schema does not name are dropped (as CSV columns are); missing nullable fields
    without a default become null."""
    if plans is None:
        return None
    if not names.issuperset(row):
        for key in [k for k in row if k not in names]:
            del row[key]
    for p in plans:
        if p.name not in row:
            if p.nullable and not p.has_default:
                row[p.name] = None
            continue
        if p.fit is not None:
            try:
                row[p.name] = p.fit(row[p.name])
            except Bad as exc:
                return p.name, f"field {p.name!r}: {exc}"
    return None


class JsonlReader(_LineReader):
    def read(self, n: int) -> Chunk:
        out = Chunk()
        plans = self.settings.plans
        names = frozenset(p.name for p in plans) if plans is not None else frozenset()
        for raw in self.lines:
            text = raw.strip()
            if not text:
                continue
            self.row += 1
            out.consumed += 1
            try:
                value = json.loads(text.decode(self.encoding))
            except (ValueError, UnicodeDecodeError) as exc:
                out.errors.append(self.error(f"invalid JSON: {exc}", _text(raw, self.encoding), self.line))
            else:
                if not isinstance(value, dict):
                    out.errors.append(
                        self.error(f"expected a JSON object, got {type(value).__name__}", _text(raw, self.encoding), self.line)
                    )
                elif (bad := _fit_row(value, plans, names)) is not None:
                    out.errors.append(self.error(bad[1], _text(raw, self.encoding), self.line, bad[0]))
                else:
                    out.rows.append(value)
                    out.numbers.append(self.line)
            if out.consumed >= n:
                return out
        self.done = True
        return out


class HttpLogReader(_LineReader):
    def read(self, n: int) -> Chunk:
        out = Chunk()
        lines: list[str] = []
        numbers: list[int] = []
        for raw in self.lines:
            text = raw.decode(self.encoding, "backslashreplace").rstrip("\r\n")  # as http_log reads
            lines.append(text)
            numbers.append(self.line)
            if text.strip():
                self.row += 1
                out.consumed += 1
                if out.consumed >= n:
                    break
        else:
            self.done = True
        rows, bad, kept = self.settings.log_format.parse_lines(lines)
        out.rows = rows
        out.numbers = numbers if kept is None else [numbers[i] for i in kept]
        out.errors = [self.error(message, lines[i], numbers[i]) for i, message in bad]
        return out


class CsvReader(_LineReader):
    """CSV with a header row. Header cells are matched to the schema's fields by name or
    alias (surrounding spaces ignored); columns not in the schema are ignored; a field
    without a column is null if nullable, its default if it has one, else every row is
    a data error naming it."""

    def _begin(self) -> None:
        self.record: list[str] = []  # the text lines of the record being read
        self.undecodable = False
        self.reader = csv.reader(self._text_lines(), delimiter=self.settings.delimiter)
        self.header: list[str] | None = None
        while self.header is None:
            self.record = []
            try:
                cells = next(self.reader)
            except StopIteration:
                self.done = True
                return
            except csv.Error as exc:
                raise Unreadable(f"cannot read the CSV header: {exc}") from None
            if cells:
                self.header = [c.strip() for c in cells]
        self._plan()

    def _resumed(self) -> None:
        self.reader = csv.reader(self._text_lines(), delimiter=self.settings.delimiter)

    def _text_lines(self) -> Iterator[str]:
        for raw in self.lines:
            try:
                text = raw.decode(self.encoding)
            except UnicodeDecodeError:
                text = raw.decode(self.encoding, "replace")
                self.undecodable = True
            self.record.append(text)
            yield text

    def _plan(self) -> None:
        assert self.header is not None
        self.width = len(self.header)
        plans = self.settings.plans
        if plans is None:
            self.columns = [(name, i, str, name) for i, name in enumerate(self.header)]
            self.fills: dict[str, Any] = {}
            self.missing: list[str] = []
            return
        index: dict[str, int] = {}
        for i, name in enumerate(self.header):
            index.setdefault(name, i)  # a repeated column name: the first one counts
        self.columns = []  # (field, cell index, text -> value, column name)
        self.fills = {}
        self.missing = []
        for p in plans:
            i = next((index[n] for n in p.names if n in index), None)
            if i is not None:
                self.columns.append((p.name, i, p.from_text, self.header[i]))
            elif p.has_default:
                pass  # left out: the encoder writes the field's default
            elif p.nullable:
                self.fills[p.name] = None
            else:
                self.missing.append(p.name)

    def read(self, n: int) -> Chunk:
        out = Chunk()
        if self.done:
            return out
        reader, columns, width = self.reader, self.columns, self.width
        while out.consumed < n:
            self.record = []
            self.undecodable = False
            try:
                cells = next(reader)
            except StopIteration:
                self.done = True
                break
            except csv.Error as exc:
                self.row += 1
                out.consumed += 1
                out.errors.append(self.error(f"bad CSV: {exc}", self._raw(), self._first_line()))
                continue
            if not cells:
                continue  # a blank line
            self.row += 1
            out.consumed += 1
            if self.undecodable:
                out.errors.append(self.error(f"not valid {self.encoding} text", self._raw(), self._first_line()))
                continue
            if len(cells) != width:
                out.errors.append(
                    self.error(f"the row has {len(cells)} cells, the header has {width}", self._raw(), self._first_line())
                )
                continue
            if self.missing:
                name = self.missing[0]
                out.errors.append(
                    self.error(
                        f"column {name!r} is missing from the header (the field is not nullable and has no default)",
                        self._raw(),
                        self._first_line(),
                        name,
                    )
                )
                continue
            row: dict[str, Any] = {}
            for name, i, convert, column in columns:
                try:
                    value = convert(cells[i])
                except Bad as exc:
                    out.errors.append(self.error(f"column {column!r}: {exc}", self._raw(), self._first_line(), column))
                    break
                if value is not OMIT:
                    row[name] = value
            else:
                if self.fills:
                    row.update(self.fills)
                out.rows.append(row)
                out.numbers.append(self._first_line())
        return out

    def _raw(self) -> str:
        return "".join(self.record).rstrip("\r\n")

    def _first_line(self) -> int:
        return self.line - len(self.record) + 1


def _text(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding, "replace").rstrip("\r\n")


# -- parquet -----------------------------------------------------------------------------------


class ParquetReader(Reader):
    sep = "#row"

    def __init__(self, settings: Settings, path: str, fh: BinaryIO, offset: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.settings = settings
        self.path = path
        self.fh = fh
        self.pa = pa
        try:
            self.pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as exc:
            fh.close()
            raise Unreadable(f"not a readable Parquet file: {exc}") from None
        meta = self.pf.metadata
        self.total = meta.num_rows
        names = set(self.pf.schema_arrow.names)
        plans = settings.plans
        self.fills: dict[str, Any] = {}
        self.missing: list[str] = []
        columns = None
        if plans is not None:
            columns = [p.name for p in plans if p.name in names]
            for p in plans:
                if p.name not in names:
                    if p.nullable and not p.has_default:
                        self.fills[p.name] = None
                    elif not p.has_default:
                        self.missing.append(p.name)
            self.fits = [p for p in plans if p.fit is not None and p.name in names]
        else:
            self.fits = []
        self.row = min(int(offset.get("row", 0)), self.total)
        first, before = 0, 0
        while first < meta.num_row_groups and before + meta.row_group(first).num_rows <= self.row:
            before += meta.row_group(first).num_rows
            first += 1
        self.skip = self.row - before
        groups = list(range(first, meta.num_row_groups))
        self.batches = (
            self.pf.iter_batches(batch_size=settings.batch_size, row_groups=groups, columns=columns)
            if groups
            else iter(())
        )
        self.pending: Any = None
        self.done = self.row >= self.total

    def read(self, n: int) -> Chunk:
        out = Chunk()
        rows: list[dict[str, Any]] = []
        while len(rows) < n and not self.done:
            if self.pending is None or self.pending.num_rows == 0:
                try:
                    self.pending = next(self.batches)
                except StopIteration:
                    self.done = True
                    break
                except (self.pa.ArrowException, OSError) as exc:
                    self.failure = f"cannot read past row {self.row + len(rows)}: {exc}"
                    self.done = True
                    break
                if self.skip:
                    cut = min(self.skip, self.pending.num_rows)
                    self.pending = self.pending.slice(cut)
                    self.skip -= cut
                    continue
            take = self.pending.slice(0, n - len(rows))
            self.pending = self.pending.slice(take.num_rows)
            rows += take.to_pylist()
        first = self.row + 1
        self.row += len(rows)
        out.consumed = len(rows)
        if self.row >= self.total:
            self.done = True
        for k, row in enumerate(rows):
            number = first + k
            if self.missing:
                name = self.missing[0]
                out.errors.append(
                    self.error(
                        f"column {name!r} is missing from the file (the field is not nullable and has no default)",
                        row,
                        number,
                        name,
                    )
                )
                continue
            bad = None
            for p in self.fits:
                try:
                    row[p.name] = p.fit(row[p.name])
                except Bad as exc:
                    bad = (p.name, f"column {p.name!r}: {exc}")
                    break
            if bad is not None:
                out.errors.append(self.error(bad[1], row, number, bad[0]))
                continue
            if self.fills:
                row.update(self.fills)
            out.rows.append(row)
            out.numbers.append(number)
        return out

    def taken(self, size: int) -> int:
        return size if self.done or not self.total else size * self.row // self.total

    def close(self) -> None:
        self.fh.close()


class FailedReader(Reader):
    """A file that could not be read: one data error, then done."""

    def __init__(self, path: str, message: str, row: int) -> None:
        self.path = path
        self.message = message
        self.row = row
        self.done = False

    def read(self, n: int) -> Chunk:
        self.done = True
        return Chunk(errors=[self.error(self.message, None, None)])
