"""Avro values in Confluent framing, and the dead-letter record.

On the wire a value is: byte 0 = magic 0, bytes 1-4 = the schema id (big-endian), then
the Avro binary body. Any Confluent-compatible client reads our topics, and we read theirs.

The encoder is the schema check: fastavro's writer refuses a record that does not fit the
schema, and only then do we work out which field was wrong. Records that fit pay nothing
beyond the encode itself (a separate validation pass measured 4.6x the encode).

fastavro's writer is lenient with numbers: it writes 1.5 or True into an int field as 1,
a numeric string into a double, any int into a boolean, and 2**40 into an `int` (which
Java readers reject). So, per batch, the encoder also checks the top-level fields whose
types it would coerce (int, long, float, double, boolean, without a logical type) with
one cheap type test per value: measured at well under a tenth of the encode. Such fields
nested inside records, arrays or maps keep fastavro's leniency.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro.validation import validate

from runner.errors import RecordError
from runner.schema.registry import SchemaNotFoundError, _normalize

MAGIC = 0
HEADER_SIZE = 5
_HEADER = struct.Struct(">bI")

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "AvroDecoder",
    "AvroEncoder",
    "DecodeFailure",
    "EncodeFailure",
    "FramingError",
    "dead_letter_rows",
    "frame",
    "unframe",
]


class FramingError(ValueError):
    """A value that is not in Confluent framing."""


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix an Avro body with the Confluent header."""
    return _HEADER.pack(MAGIC, schema_id) + body


def unframe(value: bytes) -> tuple[int, bytes]:
    """Split a Confluent-framed value into (schema id, Avro body)."""
    if len(value) < HEADER_SIZE:
        raise FramingError(
            f"value is {len(value)} bytes, shorter than the 5-byte Confluent header"
        )
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise FramingError(
            f"value starts with byte {magic & 0xFF:#04x}, not the Confluent magic byte 0x00"
        )
    return schema_id, bytes(value[HEADER_SIZE:])


# -- encoding -------------------------------------------------------------------------------


@dataclass
class EncodeFailure:
    index: int  # position in the rows given to encode()
    error: str  # human-readable, e.g. "field 'status': expected int, got str 'abc'"
    field: str | None  # path within the record, e.g. "status" or "request.path"


class AvroEncoder:
    """Encodes rows (dicts) to Confluent-framed Avro with one schema."""

    def __init__(self, schema_id: int, schema: dict[str, Any] | str) -> None:
        if isinstance(schema, str):
            schema = json.loads(schema)
        self.schema_id = schema_id
        self._named: dict[str, Any] = {}
        # Parsed once; fastavro skips re-parsing a schema it has marked as parsed.
        self._parsed = fastavro.parse_schema(schema, named_schemas=self._named)
        self._header = _HEADER.pack(MAGIC, schema_id)
        self._strict = _coerced_fields(schema)

    def encode(self, rows: Sequence[Any]) -> tuple[list[bytes | None], list[EncodeFailure]]:
        """Encode each row; a row that does not fit the schema becomes None + a failure."""
        values: list[bytes | None] = []
        failures = self._strict_failures(rows) if self._strict else []
        refused = {f.index for f in failures}
        append = values.append
        write = fastavro.schemaless_writer
        schema = self._parsed
        # One buffer holding the header; each record overwrites what follows it.
        buf = io.BytesIO()
        buf.write(self._header)
        seek, truncate, getvalue = buf.seek, buf.truncate, buf.getvalue
        for index, row in enumerate(rows):
            if refused and index in refused:
                append(None)
                continue
            seek(HEADER_SIZE)
            truncate()
            try:
                # strict=False on purpose: fastavro's strict=True refuses a missing field
                # even when it has a default. strict_allow_default alone refuses unknown
                # fields and missing fields without a default, and fills in defaults.
                write(buf, schema, row, strict_allow_default=True)
            except Exception as exc:  # any failure here means the row does not fit
                append(None)
                failures.append(self._failure(index, row, exc))
                continue
            append(getvalue())
        if refused:
            failures.sort(key=lambda f: f.index)
        return values, failures

    def _strict_failures(self, rows: Sequence[Any]) -> list[EncodeFailure]:
        """Values fastavro would silently coerce, in the top-level numeric and boolean
        fields: one type test per value, no validation pass."""
        failures: dict[int, EncodeFailure] = {}
        try:
            for name, kind in self._strict:
                accept = _ACCEPT[kind]
                for index, row in enumerate(rows):
                    value = row.get(name)
                    if value is not None and not accept(value) and index not in failures:
                        failures[index] = EncodeFailure(
                            index,
                            f"field {name!r}: expected {kind}, got {type(value).__name__} {value!r:.60}",
                            name,
                        )
        except AttributeError:  # rows that are not dicts: the writer refuses them itself
            return []
        return list(failures.values())

    def _failure(self, index: int, row: Any, exc: Exception) -> EncodeFailure:
        """Work out which field was wrong. Runs only for rows that failed."""
        try:
            problem = _find_problem(row, self._parsed, "", self._named)
        except Exception:  # never let the explanation hide the failure
            problem = None
        if problem is not None:
            return EncodeFailure(index, problem[1], problem[0] or None)
        field = _field_from_message(str(exc))
        message = str(exc) or type(exc).__name__
        return EncodeFailure(
            index, f"field {field!r}: {message}" if field else message, field
        )


_INT32 = (-(2**31), 2**31 - 1)
_ACCEPT: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int and _INT32[0] <= v <= _INT32[1],
    "long": lambda v: type(v) is int,
    "float": lambda v: type(v) is float or type(v) is int,
    "double": lambda v: type(v) is float or type(v) is int,
    "boolean": lambda v: type(v) is bool,
}


def _coerced_fields(schema: Any) -> list[tuple[str, str]]:
    """(field, type) of the top-level fields whose values fastavro's writer would coerce:
    int, long, float, double and boolean without a logical type, alone or with null."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return []
    out = []
    for field in schema.get("fields", []):
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        kinds = [b for b in branches if b != "null" and b != {"type": "null"}]
        if len(kinds) != 1:
            continue
        kind = kinds[0]
        if isinstance(kind, dict):
            if "logicalType" in kind:
                continue
            kind = kind.get("type")
        if kind in _ACCEPT:
            out.append((field["name"], kind))
    return out


def _find_problem(
    value: Any, schema: Any, path: str, named: dict[str, Any]
) -> tuple[str, str] | None:
    """(field path, message) for the first part of `value` that does not fit, or None.

    Walks records, arrays, maps and unions itself (to build the path from the root) and
    lets fastavro's validator judge the leaves.
    """
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    if isinstance(schema, list):  # a union: fine if any branch takes it
        problems = []
        for branch in schema:
            problem = _find_problem(value, branch, path, named)
            if problem is None:
                return None
            problems.append(problem)
        records = [
            p for b, p in zip(schema, problems) if _type_of(b, named) == "record"
        ]
        if isinstance(value, dict) and len(records) == 1:
            return records[0]  # a dict for the one record branch: say what is wrong inside
        expected = " or ".join(_type_name(b, named) for b in schema)
        return path, _mismatch(path, expected, value)
    kind = _type_of(schema, named)
    if kind in ("record", "error"):
        if not isinstance(value, dict):
            return path, _mismatch(path, _type_name(schema, named), value)
        fields = schema["fields"]
        known = {f["name"] for f in fields}
        extra = [k for k in value if k not in known]
        if extra:
            p = _join(path, str(extra[0]))
            others = f" (also: {', '.join(map(str, extra[1:]))})" if extra[1:] else ""
            return p, f"field {p!r} is not in the schema{others}"
        for f in fields:
            p = _join(path, f["name"])
            if f["name"] not in value:
                if "default" in f:
                    continue
                return p, f"field {p!r} is missing and has no default"
            problem = _find_problem(value[f["name"]], f["type"], p, named)
            if problem is not None:
                return problem
        return None
    if kind == "array" and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = _find_problem(item, schema["items"], f"{path}[{i}]", named)
            if problem is not None:
                return problem
        return None
    if kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            p = f"{path}[{key!r}]"
            if not isinstance(key, str):
                return p, f"field {p!r}: map keys must be strings, got {type(key).__name__}"
            problem = _find_problem(item, schema["values"], p, named)
            if problem is not None:
                return problem
        return None
    if validate(value, schema, raise_errors=False):
        return None
    return path, _mismatch(path, _type_name(schema, named), value)


def _type_of(schema: Any, named: dict[str, Any]) -> str:
    if isinstance(schema, str):
        schema = named.get(schema, schema)
    if isinstance(schema, dict):
        return str(schema.get("type"))
    return "union" if isinstance(schema, list) else str(schema)


def _type_name(schema: Any, named: dict[str, Any]) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return " or ".join(_type_name(b, named) for b in schema)
    kind = schema.get("type")
    if "logicalType" in schema:
        return f"{kind} ({schema['logicalType']})"
    if kind in ("record", "error", "enum", "fixed"):
        extra = f" of {schema['symbols']}" if kind == "enum" else ""
        return f"{kind} {schema['name']}{extra}"
    if kind == "array":
        return f"array of {_type_name(schema['items'], named)}"
    if kind == "map":
        return f"map of {_type_name(schema['values'], named)}"
    return str(kind)


def _mismatch(path: str, expected: str, value: Any) -> str:
    got = "null" if value is None else f"{type(value).__name__} {_short(value)}"
    where = f"field {path!r}" if path else "record"
    return f"{where}: expected {expected}, got {got}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# fastavro's own wording, for when the walk above finds nothing (it and the writer
# disagree on some leniency).
_FIELD_PATTERNS = (
    re.compile(r"on field (\S+)"),
    re.compile(r"^Field (\S+) is specified in the schema but missing"),
    re.compile(r"more fields than the schema specifies: ([^,\s]+)"),
    re.compile(r"no value and no default for (\S+)"),
)


def _field_from_message(message: str) -> str | None:
    for pattern in _FIELD_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return None


# -- decoding -------------------------------------------------------------------------------


@dataclass
class DecodeFailure:
    index: int  # position in the values given to decode()
    error: str


class AvroDecoder:
    """Decodes Confluent-framed Avro values, any writer schema, optionally to one reader.

    `lookup` maps a schema id to its JSON text (e.g. `SchemaRegistry.schema_by_id`); it
    should raise `SchemaNotFoundError` (or KeyError) for an unknown id, which makes that
    value a failure. Anything else it raises (a registry that is down) propagates.

    `uuid` strings decode as `str` rather than `uuid.UUID`, matching the Arrow mapping
    (string) and JSON; the bytes are the same.
    """

    def __init__(
        self, lookup: Callable[[int], str], reader_schema: dict[str, Any] | str | None = None
    ) -> None:
        self._lookup = lookup
        if isinstance(reader_schema, str):
            reader_schema = json.loads(reader_schema)
        self._reader = None
        self._reader_key = None
        if reader_schema is not None:
            plain = _plain_uuid(reader_schema)
            self._reader = fastavro.parse_schema(plain)
            self._reader_key = _key(plain)
        # id -> (writer schema, reader schema or None when no resolution is needed)
        self._schemas: dict[int, tuple[Any, Any]] = {}

    def decode(
        self, values: Sequence[bytes | None]
    ) -> tuple[list[dict[str, Any] | None], list[DecodeFailure]]:
        """Decode each value; a bad one becomes None + a failure, never an exception."""
        records: list[Any] = []
        failures: list[DecodeFailure] = []
        append = records.append
        read = fastavro.schemaless_reader
        unpack = _HEADER.unpack_from
        new_buffer = io.BytesIO
        # The common case is one schema id for the whole batch: keep it in locals.
        last_id = -1
        writer = reader = None
        missing: dict[int, str] = {}  # unknown ids seen in this call
        for index, value in enumerate(values):
            try:
                magic, schema_id = unpack(value)
            except (struct.error, TypeError):
                append(None)
                failures.append(DecodeFailure(index, _short_frame(value)))
                continue
            if magic != MAGIC:
                append(None)
                failures.append(
                    DecodeFailure(
                        index,
                        f"not Confluent framing: first byte is {magic & 0xFF:#04x}, "
                        "expected 0x00",
                    )
                )
                continue
            if schema_id != last_id:
                if schema_id in missing:
                    append(None)
                    failures.append(DecodeFailure(index, missing[schema_id]))
                    continue
                try:
                    writer, reader = self._schemas_for(schema_id)
                except LookupError as exc:  # unknown id: _schemas_for maps it to this
                    missing[schema_id] = f"unknown schema id {schema_id}: {exc}"
                    append(None)
                    failures.append(DecodeFailure(index, missing[schema_id]))
                    continue
                last_id = schema_id
            fo = new_buffer(value)
            fo.seek(HEADER_SIZE)
            try:
                record = read(fo, writer, reader)
            except Exception as exc:  # a corrupt or truncated body
                append(None)
                failures.append(
                    DecodeFailure(
                        index,
                        f"cannot decode Avro body with schema id {schema_id}: "
                        f"{type(exc).__name__}: {exc}",
                    )
                )
                continue
            if fo.tell() != len(value):
                # Bytes left over: the body does not belong to this schema.
                append(None)
                failures.append(
                    DecodeFailure(
                        index,
                        f"{len(value) - fo.tell()} bytes left over after decoding with "
                        f"schema id {schema_id}: wrong schema or corrupt value",
                    )
                )
                continue
            append(record)
        return records, failures

    def _schemas_for(self, schema_id: int) -> tuple[Any, Any]:
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        try:
            text = self._lookup(schema_id)
        except SchemaNotFoundError as exc:
            raise LookupError(str(exc)) from exc
        plain = _plain_uuid(json.loads(text))
        writer = fastavro.parse_schema(plain)
        # The same schema as the reader (the usual case): skip resolution, half the cost.
        reader = None if self._reader is None or _key(plain) == self._reader_key else self._reader
        self._schemas[schema_id] = (writer, reader)
        return writer, reader


def _short_frame(value: Any) -> str:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return f"not Confluent framing: value is {type(value).__name__}, not bytes"
    return f"not Confluent framing: value is {len(value)} bytes, shorter than the 5-byte header"


def _plain_uuid(schema: Any) -> Any:
    """The schema with `logicalType: uuid` removed (the wire format is a plain string)."""
    if isinstance(schema, dict):
        if schema.get("logicalType") == "uuid" and schema.get("type") == "string":
            return "string"
        return {k: _plain_uuid(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_plain_uuid(v) for v in schema]
    return schema


def _key(schema: Any) -> str:
    """Equal for schemas that differ only in form (the registry's normalisation)."""
    parsed = fastavro.parse_schema(schema, _write_hint=False)
    return json.dumps(_normalize(parsed), sort_keys=True, separators=(",", ":"))


# -- dead letters ---------------------------------------------------------------------------

DEAD_LETTER_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "DeadLetter",
    "namespace": "pipeline",
    "doc": "A record the pipeline could not process, with what is needed to find and replay it.",
    "fields": [
        {"name": "connector", "type": "string", "doc": "The connector that hit the error."},
        {
            "name": "stage",
            "type": "string",
            "doc": "Where it failed: source, encode, decode, transform or sink.",
        },
        {"name": "error", "type": "string", "doc": "What went wrong, human-readable."},
        {
            "name": "field",
            "type": ["null", "string"],
            "default": None,
            "doc": "The offending field path (e.g. request.path), where known.",
        },
        {
            "name": "position",
            "type": ["null", "string"],
            "default": None,
            "doc": "Where the record came from, e.g. file.jsonl:17 or topic[2]@105.",
        },
        {
            "name": "topic",
            "type": ["null", "string"],
            "default": None,
            "doc": "The topic the record was meant for, or read from.",
        },
        {
            "name": "record",
            "type": ["null", "string"],
            "default": None,
            "doc": "The record as JSON text, or the raw input line.",
        },
        {
            "name": "raw",
            "type": ["null", "bytes"],
            "default": None,
            "doc": "The original bytes, when the input was not text.",
        },
        {
            "name": "timestamp",
            "type": {"type": "long", "logicalType": "timestamp-millis"},
            "doc": "When the error was recorded (ms since the epoch, UTC).",
        },
    ],
}


def dead_letter_rows(errors: Sequence[RecordError], now_ms: int) -> list[dict[str, Any]]:
    """Rows of DEAD_LETTER_SCHEMA for `errors`, all stamped `now_ms`."""
    rows = []
    for err in errors:
        record, raw = _dead_letter_payload(err.record)
        rows.append(
            {
                "connector": err.connector or "unknown",
                "stage": err.stage,
                "error": err.error,
                "field": err.field,
                "position": err.position,
                "topic": err.topic,
                "record": record,
                "raw": raw,
                "timestamp": now_ms,
            }
        )
    return rows


def _dead_letter_payload(record: Any) -> tuple[str | None, bytes | None]:
    if record is None:
        return None, None
    if isinstance(record, str):
        return record, None
    if isinstance(record, (bytes, bytearray, memoryview)):
        return None, bytes(record)
    try:
        # default=str: datetimes, Decimals, UUIDs... still give readable JSON.
        return json.dumps(record, default=str, ensure_ascii=False), None
    except (TypeError, ValueError):  # e.g. circular, or non-string keys of odd types
        return repr(record), None
