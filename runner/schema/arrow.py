"""Avro record schema -> Arrow schema, for the column view of sink batches.

The Arrow types are chosen so `pa.RecordBatch.from_pylist(rows, schema)` accepts the rows
`AvroDecoder` produces (fastavro's Python values: datetime, date, time, Decimal, bytes).

Choices:
- enum -> plain `string`, not `dictionary<int32, string>`: every batch would carry its
  own dictionary, which makes concatenating batches and appending to one Parquet file
  unify dictionaries; Parquet dictionary-encodes strings anyway, and every consumer reads
  plain strings.
- `[null, X]` (either order) -> X, nullable. Any other union (`[int, string]`,
  `[null, A, B]`) raises UnsupportedSchemaError: Arrow's union types cannot be built from
  Python rows and Parquet has no union, and stringifying the first branch would silently
  change the data. Model such a field as a record with one optional field per branch.
- Recursive records raise UnsupportedSchemaError (Arrow types are finite trees).
- A logical type on the wrong underlying type is ignored, as the Avro spec says, and so is
  an unknown one (e.g. `duration` -> fixed_size_binary(12)).
- Field nullability follows the Avro type: only fields that accept null are nullable.
"""

from __future__ import annotations

import json
from typing import Any

import fastavro
import pyarrow as pa

from runner.errors import FatalError

__all__ = ["UnsupportedSchemaError", "avro_to_arrow"]


class UnsupportedSchemaError(FatalError):
    """An Avro schema with no faithful Arrow equivalent."""


_PRIMITIVES: dict[str, pa.DataType] = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}

# logicalType -> (underlying Avro types it applies to, Arrow type)
_LOGICAL: dict[str, tuple[tuple[str, ...], pa.DataType]] = {
    "timestamp-millis": (("long",), pa.timestamp("ms", tz="UTC")),
    "timestamp-micros": (("long",), pa.timestamp("us", tz="UTC")),
    "timestamp-nanos": (("long",), pa.timestamp("ns", tz="UTC")),
    "local-timestamp-millis": (("long",), pa.timestamp("ms")),
    "local-timestamp-micros": (("long",), pa.timestamp("us")),
    "local-timestamp-nanos": (("long",), pa.timestamp("ns")),
    "date": (("int",), pa.date32()),
    "time-millis": (("int",), pa.time32("ms")),
    "time-micros": (("long",), pa.time64("us")),
    "uuid": (("string",), pa.string()),
}


def avro_to_arrow(schema: dict[str, Any] | str) -> pa.Schema:
    """The Arrow schema for rows of the Avro record `schema`."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    named: dict[str, Any] = {}
    parsed = fastavro.parse_schema(schema, named_schemas=named, _write_hint=False)
    if not (isinstance(parsed, dict) and parsed.get("type") in ("record", "error")):
        raise UnsupportedSchemaError(
            f"cannot map a top-level Avro {_describe(parsed)} to columns: a topic's value "
            "schema must be a record",
            hint='wrap the value in a record: {"type": "record", "name": ..., "fields": [...]}',
        )
    return pa.schema(_fields(parsed, "", named, (parsed["name"],)))


def _fields(
    record: dict[str, Any], path: str, named: dict[str, Any], stack: tuple[str, ...]
) -> list[pa.Field]:
    fields = []
    for f in record["fields"]:
        field_path = f"{path}.{f['name']}" if path else f["name"]
        arrow_type, nullable = _convert(f["type"], field_path, named, stack)
        fields.append(pa.field(f["name"], arrow_type, nullable=nullable))
    return fields


def _convert(
    schema: Any, path: str, named: dict[str, Any], stack: tuple[str, ...]
) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) for the Avro type of the field at `path`."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema], schema == "null"
        if schema in stack:
            raise UnsupportedSchemaError(
                f"field {path!r}: record {schema} contains itself; recursive types cannot "
                "be columns",
                hint="flatten the recursion (e.g. keep a parent id instead of the parent)",
            )
        return _convert(named[schema], path, named, stack)

    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        has_null = len(branches) < len(schema)
        if not branches:
            return pa.null(), True
        if len(branches) > 1:
            raise UnsupportedSchemaError(
                f"field {path!r}: the union {_describe(schema)} has no Arrow column type; "
                "only [null, X] unions are supported",
                hint="use one type per field (e.g. a record with an optional field per "
                "branch), or a sink that does not need columns",
            )
        arrow_type, nullable = _convert(branches[0], path, named, stack)
        return arrow_type, nullable or has_null

    kind = schema["type"]
    logical = schema.get("logicalType")
    if logical == "decimal" and kind in ("bytes", "fixed"):
        return _decimal(schema, path), False
    if logical in _LOGICAL and kind in _LOGICAL[logical][0]:
        return _LOGICAL[logical][1], False
    if kind in ("record", "error"):
        inner = stack + (schema["name"],)
        return pa.struct(_fields(schema, path, named, inner)), False
    if kind == "enum":
        return pa.string(), False
    if kind == "fixed":
        return pa.binary(int(schema["size"])), False
    if kind == "array":
        item_type, item_nullable = _convert(schema["items"], f"{path}[]", named, stack)
        return pa.list_(pa.field("item", item_type, nullable=item_nullable)), False
    if kind == "map":
        value_type, value_nullable = _convert(schema["values"], f"{path}{{}}", named, stack)
        return (
            pa.map_(pa.string(), pa.field("value", value_type, nullable=value_nullable)),
            False,
        )
    return _convert(kind, path, named, stack)  # {"type": "int", ...}


def _decimal(schema: dict[str, Any], path: str) -> pa.DataType:
    precision = int(schema["precision"])
    scale = int(schema.get("scale", 0))
    if precision <= 38:
        return pa.decimal128(precision, scale)
    if precision <= 76:
        return pa.decimal256(precision, scale)
    raise UnsupportedSchemaError(
        f"field {path!r}: decimal precision {precision} is more than Arrow's 76",
        hint="lower the precision, or store the value as a string",
    )


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(_describe(b) for b in schema) + "]"
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    return str(schema)
