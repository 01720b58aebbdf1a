"""Avro serde in Confluent framing, and dead-letter rows."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

from runner.errors import RecordError
from runner.schema import (
    DEAD_LETTER_SCHEMA,
    AvroDecoder,
    AvroEncoder,
    FramingError,
    SchemaRegistry,
    dead_letter_rows,
    frame,
    unframe,
)
from runner.schema import serde

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Access",
    "namespace": "test",
    "fields": [
        {"name": "host", "type": "string"},
        {"name": "status", "type": "int"},
        {"name": "size", "type": "long", "default": 0},
        {"name": "referrer", "type": ["null", "string"], "default": None},
        {
            "name": "request",
            "type": {
                "type": "record",
                "name": "Request",
                "fields": [
                    {"name": "method", "type": {"type": "enum", "name": "Method", "symbols": ["GET", "POST"]}},
                    {"name": "path", "type": "string"},
                ],
            },
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}

GOOD: dict[str, Any] = {
    "host": "10.0.0.1",
    "status": 200,
    "size": 512,
    "referrer": None,
    "request": {"method": "GET", "path": "/index.html"},
    "tags": ["a"],
    "ts": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc),
}


@pytest.fixture
def registry(tmp_path: Path):
    reg = SchemaRegistry(tmp_path / "schemas.db")
    yield reg
    reg.close()


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


# -- framing ------------------------------------------------------------------------------------


def test_frame_unframe() -> None:
    value = frame(258, b"body")
    assert value == b"\x00\x00\x00\x01\x02body"
    assert unframe(value) == (258, b"body")
    assert unframe(frame(7, b"")) == (7, b"")


@pytest.mark.parametrize(
    "value, message",
    [(b"", "shorter than the 5-byte"), (b"\x00\x00\x01", "shorter"), (b"\x01\x00\x00\x00\x01x", "magic")],
)
def test_unframe_bad(value: bytes, message: str) -> None:
    with pytest.raises(FramingError, match=message):
        unframe(value)


# -- encoding -------------------------------------------------------------------------------


def test_round_trip_through_registry(registry: SchemaRegistry) -> None:
    schema_id = registry.register("access-value", SCHEMA)
    encoder = AvroEncoder(schema_id, SCHEMA)
    rows = [GOOD, with_(status=404, tags=[], referrer="http://x"), without("size")]
    values, failures = encoder.encode(rows)
    assert failures == []
    for value in values:
        assert value is not None
        assert value[0] == 0 and struct.unpack(">I", value[1:5])[0] == schema_id
        # Plain fastavro reads the body: it is standard Avro binary.
        assert fastavro.schemaless_reader(io.BytesIO(value[5:]), fastavro.parse_schema(SCHEMA))
    decoded, failures = AvroDecoder(registry.schema_by_id).decode(values)
    assert failures == []
    assert decoded[0] == GOOD
    assert decoded[1]["referrer"] == "http://x"
    assert decoded[2]["size"] == 0  # default filled in


def test_encoder_accepts_schema_text() -> None:
    values, failures = AvroEncoder(1, json.dumps(SCHEMA)).encode([GOOD])
    assert failures == [] and values[0] is not None


@pytest.mark.parametrize(
    "row, field, words",
    [
        (with_(status="abc"), "status", ["field 'status'", "expected int", "str 'abc'"]),
        (with_(host=None), "host", ["field 'host'", "expected string", "got null"]),
        (without("host"), "host", ["field 'host' is missing", "no default"]),
        (with_(zz=1), "zz", ["field 'zz' is not in the schema"]),
        (with_(request={"method": "GET", "path": 3}), "request.path", ["expected string", "int 3"]),
        (with_(request={"method": "PUT", "path": "/"}), "request.method", ["enum", "'PUT'"]),
        (with_(request={"method": "GET", "path": "/", "x": 1}), "request.x", ["not in the schema"]),
        (with_(tags=["a", 5]), "tags[1]", ["expected string"]),
        (with_(referrer=5), "referrer", ["expected null or string", "int 5"]),
        (with_(ts="yesterday"), "ts", ["timestamp-millis"]),
    ],
)
def test_encode_failures_name_the_field(row: dict[str, Any], field: str, words: list[str]) -> None:
    values, failures = AvroEncoder(1, SCHEMA).encode([GOOD, row, GOOD])
    assert values[0] is not None and values[2] is not None
    assert values[1] is None
    (failure,) = failures
    assert failure.index == 1
    assert failure.field == field
    for word in words:
        assert word in failure.error, failure.error


def test_encode_failure_for_a_non_dict() -> None:
    values, failures = AvroEncoder(1, SCHEMA).encode(["just a line"])
    assert values == [None]
    assert failures[0].field is None
    assert "expected record test.Access" in failures[0].error


def test_no_validation_pass_for_good_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strict encoder is the check: good records never reach the validator."""

    def boom(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("validate() called for a good record")

    monkeypatch.setattr(serde, "validate", boom)
    values, failures = AvroEncoder(1, SCHEMA).encode([GOOD] * 100)
    assert failures == [] and all(values)


def test_explanation_falls_back_to_fastavro_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # If the walk cannot say (it and the writer disagree), fastavro's message still names the field.
    monkeypatch.setattr(serde, "_find_problem", lambda *a: None)
    _, failures = AvroEncoder(1, SCHEMA).encode([with_(status="abc"), with_(zz=1), without("host")])
    assert [f.field for f in failures] == ["status", "zz", "host"]


# -- decoding -------------------------------------------------------------------------------


def test_decode_failures_do_not_raise(registry: SchemaRegistry) -> None:
    schema_id = registry.register("access-value", SCHEMA)
    (good,), _ = AvroEncoder(schema_id, SCHEMA).encode([GOOD])
    assert good is not None
    values = [
        good,
        b"\x01" + good[1:],  # bad magic
        b"\x00\x00",  # too short
        frame(999, good[5:]),  # unknown id
        good[:-3],  # truncated body
        good + b"junk",  # trailing bytes
        good,
    ]
    records, failures = AvroDecoder(registry.schema_by_id).decode(values)
    assert records[0] == GOOD and records[-1] == GOOD
    assert records[1:-1] == [None] * 5
    errors = {f.index: f.error for f in failures}
    assert set(errors) == {1, 2, 3, 4, 5}
    assert "0x01" in errors[1]
    assert "shorter than the 5-byte header" in errors[2]
    assert "unknown schema id 999" in errors[3]
    assert "cannot decode" in errors[4]
    assert "left over" in errors[5]


def test_decode_many_ids_and_reader_schema(registry: SchemaRegistry) -> None:
    v1 = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
    v2 = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "a", "type": "long"}, {"name": "b", "type": "string", "default": "-"}],
    }
    id1 = registry.register("r-value", v1)
    id2 = registry.register("r-value", v2)
    (old,), _ = AvroEncoder(id1, v1).encode([{"a": 1}])
    (new,), _ = AvroEncoder(id2, v2).encode([{"a": 2, "b": "x"}])
    values = [old, new, old, new]
    plain, failures = AvroDecoder(registry.schema_by_id).decode(values)
    assert failures == []
    assert plain == [{"a": 1}, {"a": 2, "b": "x"}, {"a": 1}, {"a": 2, "b": "x"}]
    resolved, failures = AvroDecoder(registry.schema_by_id, reader_schema=v2).decode(values)
    assert failures == []
    assert resolved == [{"a": 1, "b": "-"}, {"a": 2, "b": "x"}, {"a": 1, "b": "-"}, {"a": 2, "b": "x"}]


def test_reader_equal_to_writer_skips_resolution(registry: SchemaRegistry) -> None:
    schema_id = registry.register("access-value", SCHEMA)
    values, _ = AvroEncoder(schema_id, SCHEMA).encode([GOOD])
    # The registry's text differs in form from SCHEMA; the decoder still sees them equal.
    assert registry.schema_by_id(schema_id) != json.dumps(SCHEMA)
    decoder = AvroDecoder(registry.schema_by_id, reader_schema=SCHEMA)
    records, failures = decoder.decode(values)
    assert failures == [] and records == [GOOD]
    assert decoder._schemas[schema_id][1] is None  # no writer -> reader resolution


def test_decoder_caches_lookups() -> None:
    calls: list[int] = []
    text = json.dumps(SCHEMA)

    def lookup(schema_id: int) -> str:
        calls.append(schema_id)
        return text

    values, _ = AvroEncoder(5, SCHEMA).encode([GOOD] * 10)
    decoder = AvroDecoder(lookup)
    decoder.decode(values)
    decoder.decode(values)
    assert calls == [5]


def test_lookup_errors_other_than_not_found_propagate() -> None:
    class Down(Exception):
        pass

    def lookup(schema_id: int) -> str:
        raise Down("registry unreachable")

    values, _ = AvroEncoder(5, SCHEMA).encode([GOOD])
    with pytest.raises(Down):
        AvroDecoder(lookup).decode(values)


def test_logical_types_round_trip() -> None:
    schema = {
        "type": "record",
        "name": "L",
        "fields": [
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        ],
    }
    key = uuid.uuid4()
    row = {"id": key, "day": dt.date(2024, 2, 29), "amount": Decimal("12.34")}
    values, failures = AvroEncoder(1, schema).encode([row, {**row, "id": str(key)}])
    assert failures == []
    records, failures = AvroDecoder(lambda _: json.dumps(schema)).decode(values)
    assert failures == []
    # uuid decodes as its text, matching the Arrow mapping (string).
    assert records[0] == {"id": str(key), "day": dt.date(2024, 2, 29), "amount": Decimal("12.34")}
    assert records[1] == records[0]


# -- dead letters ---------------------------------------------------------------------------


def test_dead_letter_schema_is_documented_and_registrable(registry: SchemaRegistry) -> None:
    assert DEAD_LETTER_SCHEMA["name"] == "DeadLetter" and DEAD_LETTER_SCHEMA["namespace"] == "pipeline"
    names = [f["name"] for f in DEAD_LETTER_SCHEMA["fields"]]
    assert names == ["connector", "stage", "error", "field", "position", "topic", "record", "raw", "timestamp"]
    assert all(f.get("doc") for f in DEAD_LETTER_SCHEMA["fields"])
    assert registry.register("activity-dlq-value", DEAD_LETTER_SCHEMA) == 1


def test_dead_letter_rows_encode_and_decode(registry: SchemaRegistry) -> None:
    now_ms = 1_714_564_800_000
    errors = [
        RecordError(
            error="field 'status': expected int, got str 'abc'",
            stage="encode",
            record={"status": "abc", "when": dt.datetime(2024, 1, 1), "n": Decimal("1.5")},
            field="status",
            position="logs/a.jsonl:17",
            connector="access-logs",
            topic="activity",
        ),
        RecordError(error="malformed line", stage="source", record="GARBAGE \"line", position="a.log:3"),
        RecordError(error="not framed", stage="decode", record=b"\x01\xff\xfe", position="activity[2]@105"),
        RecordError(error="transform failed", stage="transform"),
    ]
    rows = dead_letter_rows(errors, now_ms)
    assert json.loads(rows[0]["record"]) == {"status": "abc", "when": "2024-01-01 00:00:00", "n": "1.5"}
    assert rows[0]["raw"] is None and rows[0]["field"] == "status"
    assert rows[1]["record"] == "GARBAGE \"line" and rows[1]["connector"] == "unknown"
    assert rows[2]["record"] is None and rows[2]["raw"] == b"\x01\xff\xfe"
    assert rows[3]["record"] is None and rows[3]["raw"] is None

    schema_id = registry.register("activity-dlq-value", DEAD_LETTER_SCHEMA)
    values, failures = AvroEncoder(schema_id, DEAD_LETTER_SCHEMA).encode(rows)
    assert failures == []
    decoded, failures = AvroDecoder(registry.schema_by_id).decode(values)
    assert failures == []
    assert decoded[2]["raw"] == b"\x01\xff\xfe"
    assert decoded[0]["timestamp"] == dt.datetime.fromtimestamp(now_ms / 1000, dt.timezone.utc)
    assert decoded[0]["position"] == "logs/a.jsonl:17" and decoded[0]["topic"] == "activity"


def test_values_fastavro_would_coerce_are_refused_naming_the_field() -> None:
    from runner.schema.serde import AvroEncoder

    schema = {
        "type": "record",
        "name": "N",
        "fields": [
            {"name": "i", "type": "int"},
            {"name": "l", "type": ["null", "long"], "default": None},
            {"name": "d", "type": "double"},
            {"name": "b", "type": "boolean"},
            {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ],
    }
    good = {"i": 1, "l": None, "d": 2, "b": False, "t": 5}
    rows = [
        good,
        {**good, "i": 1.5},
        {**good, "i": True},
        {**good, "i": 2**40},
        {**good, "l": 2.0},
        {**good, "d": "1.5"},
        {**good, "b": 1},
        good,
    ]
    values, failures = AvroEncoder(1, schema).encode(rows)
    assert [v is not None for v in values] == [True] + [False] * 6 + [True]
    assert [(f.index, f.field) for f in failures] == [(1, "i"), (2, "i"), (3, "i"), (4, "l"), (5, "d"), (6, "b")]
    assert failures[0].error == "field 'i': expected int, got float 1.5"
