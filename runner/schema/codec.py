"""Avro a batch at a time: compiled where the schema allows, fastavro where it does not.

`BatchEncoder` and `BatchDecoder` are what the runners use. Both take and give whole
batches, and both have two paths with the same results:

- the compiled path: pyruhvro (Rust, on arrow-rs) encodes an Arrow RecordBatch into Avro
  bodies and decodes bodies into a RecordBatch, about 0.2 µs a record each way against
  fastavro's 7 through dicts. Its output is byte-identical to fastavro's
  (tests/schema/test_codec.py proves it over random schemas and records).
- the per-record path: `AvroEncoder` / `AvroDecoder` (fastavro), which takes every schema
  the project supports, and finds and names what is wrong with a record that does not fit.

The compiled path takes a schema when every top-level field is one it handles exactly
like fastavro (see `_fast_type`): boolean, int, long, float, double, string, enum, the
date and timestamp logical types, and unions of null with one of those; anything else
(bytes, fixed, decimal, uuid, nested records, arrays, maps, other unions) uses the
per-record path for that schema. pyruhvro 0.4 has no bytes, fixed, decimal or uuid.

A batch that is not certainly valid never goes through the compiled path: rows whose
values fastavro would refuse (a bytes value in a string field, a bool in an int field,
a missing required field) or that Arrow would silently change (1.5 into an int) are
found first with one type test per value, and the batch goes to the per-record path,
which names the field of every bad record. Decoding falls back the same way when the
compiled decoder refuses a batch or reads a value that does not write back to the same
bytes (a corrupt value, bytes left over), or when a value was written with another schema
than the reader's (schema resolution).
"""

from __future__ import annotations

import datetime
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.schema.arrow import avro_to_arrow
from runner.schema.serde import (
    HEADER_SIZE,
    MAGIC,
    AvroDecoder,
    AvroEncoder,
    DecodeFailure,
    EncodeFailure,
    _key,
    _plain_uuid,
)

try:  # the compiled codec; without it (an unsupported platform) every schema uses fastavro
    import pyruhvro
except ImportError:  # pragma: no cover - pyruhvro ships wheels for the platforms we run on
    pyruhvro = None

__all__ = ["BatchDecoder", "BatchEncoder", "fast_schema"]

NoneType = type(None)
_EMPTY = pa.scalar(b"", pa.binary())
_LONGEST = 2**31 - 1  # "to the end" for binary_slice (which has no open end)
_MISSING = object()  # a key a row lacks (its type is in no field's allowed types)

_HEADER = struct.Struct(">bI")

# Avro primitive -> the Python types fastavro writes for it without coercion.
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "int": (int,),
    "long": (int,),
    "float": (float, int),
    "double": (float, int),
    "string": (str,),
}
_LOGICAL_TYPES: dict[str, tuple[type, ...]] = {
    "timestamp-millis": (datetime.datetime, int),
    "timestamp-micros": (datetime.datetime, int),
    "date": (datetime.date, datetime.datetime, int),
}
_LOGICAL = {"timestamp-millis": "long", "timestamp-micros": "long", "date": "int"}


def _fast_type(avro_type: Any) -> tuple[str, bool] | None:
    """(primitive or logical name, nullable) when the compiled path handles this field type
    exactly as fastavro does, else None."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1 or len(avro_type) != 2:
            return None
        inner = _fast_type(branches[0])
        return (inner[0], True) if inner else None
    if isinstance(avro_type, str):
        return (avro_type, False) if avro_type in _PYTHON_TYPES else None
    if isinstance(avro_type, dict):
        kind, logical = avro_type.get("type"), avro_type.get("logicalType")
        if logical is not None:
            return (logical, False) if _LOGICAL.get(logical) == kind else None
        if kind == "enum":
            return None  # pyruhvro writes enums, but decodes them as dictionaries; not worth it
        return _fast_type(kind) if isinstance(kind, str) else None
    return None


def fast_schema(schema: dict[str, Any] | str) -> list[tuple[str, str, bool, bool]] | None:
    """(field, type, nullable, has a non-null default) per top-level field when the compiled
    path can take `schema`, else None."""
    if pyruhvro is None:
        return None
    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    fields = []
    for f in schema.get("fields", []):
        kind = _fast_type(f["type"])
        if kind is None:
            return None
        fields.append((f["name"], kind[0], kind[1], "default" in f and f["default"] is not None))
    return fields


class BatchEncoder:
    """Encodes a batch (rows or Arrow columns) to Confluent-framed Avro with one schema."""

    def __init__(self, schema_id: int, schema: dict[str, Any] | str) -> None:
        if isinstance(schema, str):
            schema = json.loads(schema)
        self.schema_id = schema_id
        self.rows = AvroEncoder(schema_id, schema)  # the per-record path
        self.fields = fast_schema(schema)
        self.fast = self.fields is not None
        if self.fast:
            self._text = json.dumps(schema)
            self._arrow = avro_to_arrow(schema)
            self._header_scalar = pa.scalar(_HEADER.pack(MAGIC, schema_id), pa.binary())
            # Per field: its Arrow type and the Python types fastavro takes into it as they
            # are (an int too large for an int field: Arrow refuses it too).
            self._types = [
                (name, field.type, frozenset((*(_PYTHON_TYPES.get(kind) or _LOGICAL_TYPES[kind]), NoneType)))
                for (name, kind, _, _), field in zip(self.fields, self._arrow)
            ]
            self._names = frozenset(f["name"] for f in schema["fields"])
            self._required = frozenset(f["name"] for f in schema["fields"] if "default" not in f)
            # Nulls the compiled writer cannot take: a field that is not nullable, or one
            # whose default fastavro would fill in for a missing key.
            self._no_nulls = [name for name, _, nullable, default in self.fields if not nullable or default]

    def encode(
        self, rows: Sequence[Any] | None = None, *, columns: pa.RecordBatch | None = None
    ) -> tuple[list[bytes | None], list[EncodeFailure]]:
        """Encode each record; one that does not fit the schema becomes None + a failure.
        Give `rows` (dicts) or `columns` (a RecordBatch whose column names are the
        schema's fields)."""
        if self.fast:
            batch = self._columns(rows, columns)
            if batch is not None:
                return self._framed(batch).to_pylist(), []
        return self.rows.encode(rows if rows is not None else columns.to_pylist())

    def encode_columns(self, columns: pa.RecordBatch) -> pa.BinaryArray | None:
        """The compiled path alone: `columns` as a binary array of Confluent-framed values,
        one per record, built without a bytes object per record; None when the batch must
        take the per-record path (`encode`), which finds and names what does not fit."""
        if not self.fast:
            return None
        batch = self._columns(None, columns)
        return None if batch is None else self._framed(batch)

    def _columns(self, rows: Sequence[Any] | None, columns: pa.RecordBatch | None) -> pa.RecordBatch | None:
        """The records as columns of the schema's Arrow types, or None when the batch must
        take the per-record path (a record that may not fit)."""
        try:
            batch = self._from_rows(rows) if rows is not None else _conform(columns, self._arrow)
        except (pa.ArrowException, AttributeError, TypeError, ValueError, OverflowError):
            return None
        if batch is None:
            return None
        for name in self._no_nulls:
            if batch.column(name).null_count:
                return None
        return batch

    def _from_rows(self, rows: Sequence[Any]) -> pa.RecordBatch | None:
        """Rows as columns, or None if a value is of a type fastavro would refuse or Arrow
        would change (one type test per distinct type of a column, in C)."""
        names = self._names
        if set(map(len, rows)) == {len(names)}:
            get = _MISSING  # with every row as long as the schema, a missing key shows as _MISSING
        else:
            # Fewer keys where the missing fields have defaults (fastavro refuses an unknown
            # field, and a missing one without a default); missing then reads as None.
            required = self._required
            for row in rows:
                keys = row.keys()
                if keys != names and not (keys <= names and required <= keys):
                    return None
            get = None
        arrays = []
        for name, arrow_type, allowed in self._types:
            values = [row.get(name, get) for row in rows]
            if not set(map(type, values)) <= allowed:
                return None
            arrays.append(pa.array(values, arrow_type))
        return pa.RecordBatch.from_arrays(arrays, schema=self._arrow)

    def _framed(self, batch: pa.RecordBatch) -> pa.BinaryArray:
        """Compiled: the Avro bodies of `batch`, each behind the Confluent header."""
        (bodies,) = pyruhvro.serialize_record_batch(batch, self._text, 1)
        return pc.binary_join_element_wise(self._header_scalar, bodies, _EMPTY)


def _conform(columns: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch | None:
    """`columns` with exactly `schema`'s columns and types (a safe cast), or None when a
    column is missing or of a type that is not cast losslessly."""
    if columns.schema == schema:
        return columns
    names = set(columns.schema.names)
    if not all(f.name in names for f in schema):
        return None
    arrays = []
    for f in schema:
        array = columns.column(f.name)
        if array.type != f.type:
            if not _castable(array.type, f.type):
                return None
            array = array.cast(f.type)  # safe: raises on overflow or truncation
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Casts fastavro would also make from the Python values of `source`: between integer
    widths, integers to floating point, floats between widths, string widths, and
    timestamps between units."""
    t = pa.types
    if t.is_integer(source):
        return t.is_integer(target) or t.is_floating(target)
    if t.is_floating(source):
        return t.is_floating(target)
    if t.is_string(source) or t.is_large_string(source):
        return t.is_string(target)
    if t.is_timestamp(source):
        return t.is_timestamp(target)
    return False


class BatchDecoder:
    """Decodes Confluent-framed Avro values to a reader schema: Arrow columns when the
    compiled path can take the batch, else rows (dicts) from fastavro."""

    def __init__(self, lookup: Callable[[int], str], reader_schema: dict[str, Any] | str) -> None:
        if isinstance(reader_schema, str):
            reader_schema = json.loads(reader_schema)
        self.rows = AvroDecoder(lookup, reader_schema)  # the per-record path
        self._lookup = lookup
        self.fast = fast_schema(reader_schema) is not None
        if self.fast:
            self._text = json.dumps(reader_schema)
            self._arrow = avro_to_arrow(reader_schema)
            self._key = _canonical(reader_schema)
            self._same: dict[int, bool] = {}  # schema id -> written with the reader's schema

    def decode(
        self, values: Sequence[bytes] | pa.BinaryArray
    ) -> tuple[pa.RecordBatch | None, list[dict[str, Any] | None] | None, list[DecodeFailure]]:
        """(columns, None, []) from the compiled path, or (None, rows, failures) from the
        per-record path, where a bad value is a None row plus a failure. `values` may be a
        binary array (as the embedded broker stores them): no bytes object per record then
        on the compiled path."""
        if self.fast and len(values):
            columns = self._decode_fast(values)
            if columns is not None:
                return columns, None, []
        rows, failures = self.rows.decode(values.to_pylist() if isinstance(values, pa.Array) else values)
        return None, rows, failures

    def _decode_fast(self, values: Sequence[bytes] | pa.BinaryArray) -> pa.RecordBatch | None:
        if not isinstance(values, pa.Array):
            try:  # one array: the header check and the slicing below are vectorised
                values = pa.array(values, pa.binary())
            except (pa.ArrowException, TypeError):
                return None
        try:
            header = values[0].as_py()[:HEADER_SIZE]
            magic, schema_id = _HEADER.unpack(header)
        except (struct.error, TypeError):
            return None
        if magic != MAGIC or not self._written_with_reader(schema_id):
            return None
        if values.null_count or not pc.all(pc.equal(pc.binary_slice(values, 0, HEADER_SIZE), header)).as_py():
            return None  # another schema id, or not framed: the per-record path says which
        body_array = pc.binary_slice(values, HEADER_SIZE, _LONGEST)
        bodies = body_array.to_pylist()
        try:
            decoded = pyruhvro.deserialize_array(bodies, self._text)
            # The compiled reader ignores bytes left over after a record, and may read some
            # corrupt bodies differently from fastavro. Writing the records again must give
            # back exactly the bytes read (one more compiled pass, ~0.2 µs a record);
            # otherwise the per-record path decides, value by value.
            again = pyruhvro.serialize_record_batch(decoded, self._text, 1)
            if len(again) != 1 or not again[0].equals(body_array):
                return None
        except Exception:  # a corrupt value: the per-record path finds and names it
            return None
        return _cast_decoded(decoded, self._arrow)

    def _written_with_reader(self, schema_id: int) -> bool:
        same = self._same.get(schema_id)
        if same is None:
            try:
                same = _canonical(json.loads(self._lookup(schema_id))) == self._key
            except Exception:  # an unknown id: the per-record path reports it
                return False
            self._same[schema_id] = same
        return same


def _cast_decoded(decoded: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch | None:
    """pyruhvro's columns with our Arrow types (timestamps in UTC, as from rows)."""
    if decoded.schema == schema:
        return decoded
    try:
        arrays = [decoded.column(i).cast(f.type) if decoded.column(i).type != f.type else decoded.column(i)
                  for i, f in enumerate(schema)]
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
    except (pa.ArrowException, ValueError):
        return None


def _canonical(schema: Any) -> str:
    """Equal for schemas that differ only in form (the registry's normalisation)."""
    return _key(_plain_uuid(schema))
