"""A batch of records: the unit everything moves in.

A `Batch` has two views of the same records:

- `rows`: a list of dicts, one per record. What most connector authors want.
- `columns`: a `pyarrow.RecordBatch`. What Parquet writers and vectorised code want.

A batch is built from either view; the other is built on first use, once, and kept.
Never mutate a view after the other has been built.

Source side, a batch also carries `source_offsets` (where the source stands after the last
record of the batch, per source partition) and `errors` (input the source could not turn
into a record). Sink side, it carries where the records came from: `topic`, `partition`,
`record_offsets`, `keys`, `timestamps` and `headers`.

A sink that declares `wants = "raw"` gets the records undecoded: `values` holds each
record's bytes as they are in the topic (no rows or columns view).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from runner.errors import RecordError


class Batch:
    """Records plus their bookkeeping. See the module docstring."""

    __slots__ = (
        "_rows",
        "_columns",
        "arrow_schema",
        "source_offsets",
        "errors",
        "positions",
        "topic",
        "partition",
        "record_offsets",
        "keys",
        "timestamps",
        "headers",
        "values",
        "destinations",
    )

    def __init__(
        self,
        rows: list[dict[str, Any]] | None = None,
        *,
        columns: pa.RecordBatch | pa.Table | None = None,
        arrow_schema: pa.Schema | None = None,
        source_offsets: dict[str, Any] | None = None,
        errors: list[RecordError] | None = None,
        positions: Sequence[str | None] | None = None,
        topic: str | None = None,
        partition: int | None = None,
        record_offsets: Sequence[int] | None = None,
        keys: Sequence[bytes | None] | None = None,
        timestamps: Sequence[int] | None = None,
        headers: Sequence[dict[str, bytes] | None] | None = None,
        values: Sequence[bytes] | None = None,
        destinations: Sequence[str | None] | None = None,
    ) -> None:
        if rows is not None and columns is not None:
            raise ValueError("give a Batch rows or columns, not both")
        if isinstance(columns, pa.Table):
            columns = columns.combine_chunks().to_batches()[0] if columns.num_rows else None
            if columns is None:
                rows = []
        self._rows = rows if rows is not None or columns is not None else []
        self._columns = columns
        self.arrow_schema = arrow_schema
        #: Source side: source partition -> offset after this batch (JSON-serialisable).
        self.source_offsets = source_offsets or {}
        #: Source side: input that could not become a record (go to the error policy).
        self.errors = errors or []
        #: Optional, one per record: where it came from ("file:line"), for error context.
        self.positions = positions
        #: Sink side: the topic-partition these records were read from, in order.
        self.topic = topic
        self.partition = partition
        self.record_offsets = record_offsets
        self.keys = keys
        self.timestamps = timestamps
        #: Sink side: each record's Kafka headers (None when no record of the batch has any).
        self.headers = headers
        #: Raw batches (`wants = "raw"`): each record's value bytes, undecoded.
        self.values = values
        if values is not None:
            self._rows = None
        #: Source side, set by a routing transform: each record's topic (None: the
        #: source's own topic).
        self.destinations = destinations

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The records as a list of dicts (built from the columns on first use)."""
        if self._rows is None:
            if self._columns is None:
                raise TypeError("a raw batch has no rows: read batch.values")
            self._rows = self._columns.to_pylist()
        return self._rows

    @property
    def columnar(self) -> bool:
        """True when the batch was made of columns and no rows view was asked for: the
        engine then keeps it columns (partitioning, Avro encoding) instead of building rows."""
        return self._rows is None and self._columns is not None

    @property
    def columns(self) -> pa.RecordBatch:
        """The records as a pyarrow RecordBatch (built from the rows on first use).

        When the batch knows its Arrow schema (sink side, derived from the topic's Avro
        schema) the columns have exactly those types.
        """
        if self._columns is None:
            if self._rows is None:
                raise TypeError("a raw batch has no columns: read batch.values")
            self._columns = pa.RecordBatch.from_pylist(self._rows, schema=self.arrow_schema)
        return self._columns

    def conform(self, schema: pa.Schema) -> None:
        """Give the columns view exactly these Arrow types (the engine does, for a sink
        that wants columns): set before the view is built, or cast if it was."""
        if self._columns is None or self._columns.schema == schema:
            self.arrow_schema = schema
        else:
            table = pa.Table.from_batches([self._columns]).select(schema.names).cast(schema)
            self._columns = table.combine_chunks().to_batches()[0]
            self.arrow_schema = schema

    def __len__(self) -> int:
        if self.values is not None:
            return len(self.values)
        if self._rows is not None:
            return len(self._rows)
        return self._columns.num_rows

    def derive(
        self,
        rows: list[dict[str, Any]] | None = None,
        *,
        columns: pa.RecordBatch | pa.Table | None = None,
        kept: Sequence[int] | None = None,
        errors: Sequence[RecordError] = (),
        destinations: Sequence[str | None] | None = None,
    ) -> Batch:
        """A new batch of `rows` (or `columns`) made from this one, for transforms.

        `kept`: for each new record, the index of the record of this batch it came from
        (when records were dropped or filtered); None when the new records are this
        batch's, one for one. Per-record bookkeeping (positions, offsets, keys,
        timestamps, headers, destinations) follows the kept records; `errors` are added
        to this batch's; `destinations` replaces each record's topic (routing).
        """
        n = len(self)
        new_len = len(rows) if rows is not None else (columns.num_rows if columns is not None else 0)
        if kept is None and new_len != n:
            raise ValueError(f"derive: {new_len} records from {n} without `kept`")
        if kept is not None and len(kept) != new_len:
            raise ValueError(f"derive: {len(kept)} `kept` indexes for {new_len} records")

        def follow(values: Sequence[Any] | None) -> Sequence[Any] | None:
            if values is None or kept is None:
                return values
            return [values[i] for i in kept]

        if destinations is not None and len(destinations) != new_len:
            raise ValueError(f"derive: {len(destinations)} destinations for {new_len} records")
        return Batch(
            rows,
            columns=columns,
            source_offsets=self.source_offsets,
            errors=[*self.errors, *errors],
            positions=follow(self.positions),
            topic=self.topic,
            partition=self.partition,
            record_offsets=follow(self.record_offsets),
            keys=follow(self.keys),
            timestamps=follow(self.timestamps),
            headers=follow(self.headers),
            destinations=destinations if destinations is not None else follow(self.destinations),
        )

    @property
    def first_offset(self) -> int | None:
        return self.record_offsets[0] if self.record_offsets else None

    @property
    def last_offset(self) -> int | None:
        return self.record_offsets[-1] if self.record_offsets else None

    def position(self, index: int) -> str | None:
        """Where record `index` came from: what the source said ("file:line"), or on the
        sink side its place in the topic ("topic[partition]@offset")."""
        if self.positions is not None and index < len(self.positions):
            return self.positions[index]
        if self.record_offsets is not None and index < len(self.record_offsets):
            return f"{self.topic}[{self.partition}]@{self.record_offsets[index]}"
        return None

    def json_lines(self) -> list[str]:
        """Each record as one line of JSON (timestamps as ISO 8601, decimals as strings,
        bytes as base64)."""
        dumps = json.JSONEncoder(default=json_default, ensure_ascii=False).encode
        return [dumps(row) for row in self.rows]

    def __repr__(self) -> str:
        where = f" {self.topic}[{self.partition}]" if self.topic is not None else ""
        return f"<Batch{where} {len(self)} records, {len(self.errors)} errors>"


def json_default(value: Any) -> Any:
    """JSON for the Python values Avro decoding produces that `json` does not know."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
