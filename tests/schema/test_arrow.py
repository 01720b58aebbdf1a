"""Avro -> Arrow schema mapping, checked against rows fastavro actually decodes."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from runner.batch import Batch
from runner.errors import FatalError
from runner.schema import AvroDecoder, AvroEncoder, UnsupportedSchemaError, avro_to_arrow

UTC = dt.timezone.utc

ALL_TYPES: dict[str, Any] = {
    "type": "record",
    "name": "Everything",
    "namespace": "test",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "flag", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "b", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}},
        {"name": "nums", "type": {"type": "array", "items": "int"}},
        {"name": "maybe_nums", "type": {"type": "array", "items": ["null", "long"]}},
        {"name": "attrs", "type": {"type": "map", "values": "string"}},
        {
            "name": "point",
            "type": {
                "type": "record",
                "name": "Point",
                "fields": [{"name": "x", "type": "double"}, {"name": "label", "type": ["null", "string"]}],
            },
        },
        {"name": "other_point", "type": ["null", "Point"], "default": None},  # named reuse
        {"name": "opt", "type": ["null", "string"], "default": None},
        {"name": "opt_last", "type": ["int", "null"]},
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "lts_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "lts_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "t_ms", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "t_us", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {
            "name": "big",
            "type": {"type": "fixed", "name": "Big", "size": 32, "logicalType": "decimal", "precision": 50, "scale": 5},
        },
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "opt_ts", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": None},
        {"name": "odd", "type": {"type": "int", "logicalType": "timestamp-millis"}},  # wrong base: ignored
    ],
}

EXPECTED: list[tuple[str, pa.DataType, bool]] = [
    ("n", pa.null(), True),
    ("flag", pa.bool_(), False),
    ("i", pa.int32(), False),
    ("l", pa.int64(), False),
    ("f", pa.float32(), False),
    ("d", pa.float64(), False),
    ("b", pa.binary(), False),
    ("s", pa.string(), False),
    ("fx", pa.binary(4), False),
    ("color", pa.string(), False),
    ("nums", pa.list_(pa.field("item", pa.int32(), nullable=False)), False),
    ("maybe_nums", pa.list_(pa.field("item", pa.int64(), nullable=True)), False),
    ("attrs", pa.map_(pa.string(), pa.field("value", pa.string(), nullable=False)), False),
    (
        "point",
        pa.struct([pa.field("x", pa.float64(), nullable=False), pa.field("label", pa.string())]),
        False,
    ),
    (
        "other_point",
        pa.struct([pa.field("x", pa.float64(), nullable=False), pa.field("label", pa.string())]),
        True,
    ),
    ("opt", pa.string(), True),
    ("opt_last", pa.int32(), True),
    ("ts_ms", pa.timestamp("ms", tz="UTC"), False),
    ("ts_us", pa.timestamp("us", tz="UTC"), False),
    ("lts_ms", pa.timestamp("ms"), False),
    ("lts_us", pa.timestamp("us"), False),
    ("day", pa.date32(), False),
    ("t_ms", pa.time32("ms"), False),
    ("t_us", pa.time64("us"), False),
    ("price", pa.decimal128(10, 2), False),
    ("big", pa.decimal256(50, 5), False),
    ("id", pa.string(), False),
    ("opt_ts", pa.timestamp("ms", tz="UTC"), True),
    ("odd", pa.int32(), False),
]


def test_all_types() -> None:
    schema = avro_to_arrow(ALL_TYPES)
    assert schema.names == [name for name, _, _ in EXPECTED]
    for name, arrow_type, nullable in EXPECTED:
        field = schema.field(name)
        assert field.type == arrow_type, name
        assert field.nullable is nullable, name


def test_accepts_schema_text() -> None:
    assert avro_to_arrow(json.dumps(ALL_TYPES)) == avro_to_arrow(ALL_TYPES)


def _row(k: int) -> dict[str, Any]:
    return {
        "n": None,
        "flag": k % 2 == 0,
        "i": k,
        "l": 2**40 + k,
        "f": 1.5,
        "d": 2.25,
        "b": b"\x00\xff",
        "s": f"row {k}",
        "fx": b"abcd",
        "color": "GREEN",
        "nums": [1, 2, k],
        "maybe_nums": [None, 7],
        "attrs": {"k": "v"},
        "point": {"x": 1.0, "label": None},
        "other_point": {"x": 2.0, "label": "p"} if k else None,
        "opt": None if k else "set",
        "opt_last": None,
        "ts_ms": dt.datetime(2024, 5, 1, 12, 30, 1, 123000, tzinfo=UTC),
        "ts_us": dt.datetime(2024, 5, 1, 12, 30, 1, 123456, tzinfo=UTC),
        "lts_ms": dt.datetime(2024, 5, 1, 12, 30, 1, 123000),
        "lts_us": dt.datetime(2024, 5, 1, 12, 30, 1, 123456),
        "day": dt.date(2024, 2, 29),
        "t_ms": dt.time(23, 59, 59, 999000),
        "t_us": dt.time(1, 2, 3, 456789),
        "price": Decimal("1234.56"),
        "big": Decimal("12345678901234567890123456789012345678901234.56789"),
        "id": uuid.UUID(int=k),
        "opt_ts": None,
        "odd": 5,
    }


def test_record_batch_from_decoded_rows() -> None:
    rows = [_row(k) for k in range(3)]
    values, failures = AvroEncoder(1, ALL_TYPES).encode(rows)
    assert failures == []
    decoded, failures = AvroDecoder(lambda _: json.dumps(ALL_TYPES)).decode(values)
    assert failures == []
    # What fastavro hands back: datetime, date, time, Decimal.
    assert isinstance(decoded[0]["ts_ms"], dt.datetime) and decoded[0]["ts_ms"].tzinfo is not None
    assert isinstance(decoded[0]["day"], dt.date) and isinstance(decoded[0]["price"], Decimal)

    schema = avro_to_arrow(ALL_TYPES)
    batch = pa.RecordBatch.from_pylist(decoded, schema=schema)
    assert batch.schema == schema
    assert batch.num_rows == 3
    out = batch.to_pylist()
    assert out[1]["ts_ms"] == dt.datetime(2024, 5, 1, 12, 30, 1, 123000, tzinfo=dt.timezone.utc)
    assert out[1]["lts_us"] == dt.datetime(2024, 5, 1, 12, 30, 1, 123456)
    assert out[1]["price"] == Decimal("1234.56")
    assert out[1]["big"] == Decimal("12345678901234567890123456789012345678901234.56789")
    assert out[1]["id"] == str(uuid.UUID(int=1))
    assert out[1]["attrs"] == [("k", "v")]
    assert out[0]["other_point"] is None and out[1]["other_point"] == {"x": 2.0, "label": "p"}
    assert out[2]["color"] == "GREEN"

    # And through the Batch column view, as the sink side uses it.
    assert Batch(decoded, arrow_schema=schema).columns.schema == schema


def test_other_unions_are_refused_with_the_field() -> None:
    schema = {
        "type": "record",
        "name": "U",
        "fields": [
            {
                "name": "inner",
                "type": {"type": "record", "name": "I", "fields": [{"name": "v", "type": ["null", "int", "string"]}]},
            }
        ],
    }
    with pytest.raises(UnsupportedSchemaError, match=r"field 'inner\.v'.*only \[null, X\] unions") as info:
        avro_to_arrow(schema)
    assert isinstance(info.value, FatalError) and info.value.hint


def test_recursive_records_are_refused() -> None:
    schema = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}],
    }
    with pytest.raises(UnsupportedSchemaError, match="field 'next'.*contains itself"):
        avro_to_arrow(schema)


def test_top_level_must_be_a_record() -> None:
    with pytest.raises(UnsupportedSchemaError, match="must be a record"):
        avro_to_arrow({"type": "string"})


def test_decimal_precision_limits() -> None:
    def dec(precision: int) -> dict[str, Any]:
        field_type = {"type": "bytes", "logicalType": "decimal", "precision": precision}
        return {"type": "record", "name": "D", "fields": [{"name": "x", "type": field_type}]}

    assert avro_to_arrow(dec(38)).field("x").type == pa.decimal128(38, 0)
    assert avro_to_arrow(dec(39)).field("x").type == pa.decimal256(39, 0)
    with pytest.raises(UnsupportedSchemaError, match="precision 77"):
        avro_to_arrow(dec(77))
