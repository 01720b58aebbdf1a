"""The compiled Avro path gives exactly what fastavro gives: the same bytes for every record
that fits, the same failures for every record that does not, and the same values decoded.

Random schemas (unions, nulls, logical types, enums, maps, arrays, nested records) and
random records, with hypothesis. Schemas the compiled path cannot take must fall back to
fastavro; schemas it can take must really use it (checked, so the property is not proved
by the fallback alone).
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os
import string

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runner.schema.codec import BatchDecoder, BatchEncoder, fast_schema
from runner.schema.serde import AvroDecoder, AvroEncoder

UTC = dt.timezone.utc
# CODEC_EXAMPLES=5000 for a longer search than the suite's.
SETTINGS = settings(max_examples=int(os.environ.get("CODEC_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- schemas -------------------------------------------------------------------------------

PRIMITIVES = ["boolean", "int", "long", "float", "double", "string", "bytes"]
LOGICAL = [
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "long", "logicalType": "timestamp-micros"},
    {"type": "int", "logicalType": "date"},
    {"type": "string", "logicalType": "uuid"},
    {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2},
]
_names = iter(f"T{i}" for i in range(10**9))


def leaf_types() -> st.SearchStrategy:
    enum = st.builds(lambda: {"type": "enum", "name": next(_names), "symbols": ["A", "B", "C"]})
    return st.one_of(st.sampled_from(PRIMITIVES), st.sampled_from(LOGICAL), enum)


def field_types(depth: int = 0) -> st.SearchStrategy:
    leaf = leaf_types()
    options = [leaf, leaf, leaf, st.tuples(st.just("null?"), leaf, st.booleans())]
    if depth < 1:
        inner = field_types(depth + 1)
        options += [
            st.builds(lambda t: {"type": "array", "items": t}, inner),
            st.builds(lambda t: {"type": "map", "values": t}, inner),
            st.builds(lambda fs: {"type": "record", "name": next(_names), "fields": fs}, record_fields(depth + 1)),
            st.tuples(st.just("union"), st.sampled_from([["int", "string"], ["null", "long", "string"]])),
        ]
    return st.one_of(*options).map(_union)


def _union(t):
    if isinstance(t, tuple) and t[0] == "null?":
        return ["null", t[1]] if t[2] else [t[1], "null"]
    if isinstance(t, tuple) and t[0] == "union":
        return list(t[1])
    return t


def record_fields(depth: int = 0) -> st.SearchStrategy:
    return st.lists(field_types(depth), min_size=1, max_size=6).map(
        lambda types: [{"name": f"f{i}", "type": t} for i, t in enumerate(types)]
    )


@st.composite
def schemas(draw, fast_only: bool = False) -> dict:
    if fast_only:
        leaf = st.sampled_from(["boolean", "int", "long", "float", "double", "string", *LOGICAL[:3]])
        types = draw(st.lists(st.one_of(leaf, st.tuples(st.just("null?"), leaf, st.booleans()).map(_union)),
                              min_size=1, max_size=8))
        fields = [{"name": f"f{i}", "type": t} for i, t in enumerate(types)]
    else:
        fields = draw(record_fields())
    for f in fields:  # a default where Avro allows one
        if isinstance(f["type"], list) and f["type"][0] == "null" and draw(st.booleans()):
            f["default"] = None
    return {"type": "record", "name": next(_names), "fields": fields}


# -- values --------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
TIMES = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1))


def value_of(t) -> st.SearchStrategy:
    if isinstance(t, list):
        return st.one_of(*[value_of(b) for b in t])
    if isinstance(t, str):
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": FLOATS,
            "double": FLOATS,
            "string": TEXT,
            "bytes": st.binary(max_size=8),
        }[t]
    logical = t.get("logicalType")
    if logical in ("timestamp-millis", "timestamp-micros"):
        return st.one_of(TIMES.map(lambda d: d.replace(tzinfo=UTC)), TIMES, st.integers(-(2**40), 2**40))
    if logical == "date":
        return st.one_of(st.dates(), st.integers(-(10**5), 10**5))
    if logical == "uuid":
        return st.uuids().map(str)
    if logical == "decimal":
        return st.decimals(min_value=-(10**6), max_value=10**6, places=2, allow_nan=False)
    kind = t["type"]
    if kind == "enum":
        return st.sampled_from(t["symbols"])
    if kind == "array":
        return st.lists(value_of(t["items"]), max_size=3)
    if kind == "map":
        return st.dictionaries(TEXT, value_of(t["values"]), max_size=3)
    if kind == "record":
        return records(t)
    return value_of(kind)


def records(schema: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({f["name"]: value_of(f["type"]) for f in schema["fields"]})


# Values that may not fit a field: the wrong type, a near miss Arrow would change silently,
# a null, or a missing key (dropped below).
MISFITS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), TEXT, st.binary(max_size=4),
    st.just(1.5), st.just(2.0), st.just(decimal.Decimal("1.25")), st.just(dt.date(2020, 1, 2)),
    st.just(dt.datetime(2020, 1, 2, 3, 4, 5)), st.just("2020-01-02"), st.just([1]), st.just({"a": 1}),
)


@st.composite
def maybe_bad_rows(draw, schema: dict) -> list[dict]:
    rows = draw(st.lists(records(schema), min_size=1, max_size=8))
    for row in rows:
        if draw(st.integers(0, 3)) == 0:
            name = draw(st.sampled_from(sorted(row)))
            action = draw(st.integers(0, 5))
            if action == 0:
                del row[name]
            elif action == 1:
                row["extra"] = 1
            else:
                row[name] = draw(MISFITS)
    return rows


# -- helpers -------------------------------------------------------------------------------


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN (at any depth)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def registry(schema: dict, schema_id: int = 7):
    import json

    texts = {schema_id: json.dumps(schema)}
    return lambda i: texts[i]


# -- properties ----------------------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_encoding_matches_fastavro_byte_for_byte(data):
    schema = data.draw(schemas(fast_only=data.draw(st.booleans())))
    rows = data.draw(st.lists(records(schema), min_size=1, max_size=10))
    expected, expected_failures = AvroEncoder(7, schema).encode(rows)
    assume(not expected_failures)  # e.g. a float too large for a float field: both refuse
    encoder = BatchEncoder(7, schema)
    values, failures = encoder.encode(rows)
    assert failures == [] and values == expected
    if fast_schema(schema) is not None:
        assert encoder._columns(rows, None) is not None, "a fast schema took the per-record path"
        # The same records given as columns (a columnar source) give the same bytes.
        columns = pa.RecordBatch.from_pylist(rows, schema=encoder._arrow)
        assert encoder.encode(columns=columns) == (expected, [])
        assert encoder.encode_columns(columns).to_pylist() == expected  # as one binary array


@SETTINGS
@given(st.data())
def test_records_that_do_not_fit_fail_as_in_fastavro(data):
    schema = data.draw(schemas(fast_only=data.draw(st.booleans())))
    rows = data.draw(maybe_bad_rows(schema))
    expected, expected_failures = AvroEncoder(7, schema).encode(rows)
    values, failures = BatchEncoder(7, schema).encode(rows)
    assert values == expected
    assert [(f.index, f.field) for f in failures] == [(f.index, f.field) for f in expected_failures]


@SETTINGS
@given(st.data())
def test_decoding_matches_fastavro(data):
    schema = data.draw(schemas(fast_only=data.draw(st.booleans())))
    rows = data.draw(st.lists(records(schema), min_size=1, max_size=10))
    values, failures = AvroEncoder(7, schema).encode(rows)
    assume(not failures)
    expected, _ = AvroDecoder(registry(schema), schema).decode(values)
    decoder = BatchDecoder(registry(schema), schema)
    for given in (values, pa.array(values, pa.binary())):  # a list, or a binary array (embedded)
        columns, decoded, failures = decoder.decode(given)
        assert failures == []
        if fast_schema(schema) is not None:
            assert columns is not None, "a fast schema took the per-record path"
            decoded = columns.to_pylist()
        assert same(decoded, expected)


@SETTINGS
@given(st.data())
def test_corrupt_values_fail_as_in_fastavro(data):
    schema = data.draw(schemas(fast_only=True))
    rows = data.draw(st.lists(records(schema), min_size=1, max_size=6))
    values, failures = AvroEncoder(7, schema).encode(rows)
    assume(not failures)
    i = data.draw(st.integers(0, len(values) - 1))
    how = data.draw(st.integers(0, 3))
    if how == 0:
        values[i] = values[i][: data.draw(st.integers(0, len(values[i]) - 1))]  # truncated
    elif how == 1:
        values[i] = values[i] + data.draw(st.binary(min_size=1, max_size=4))  # bytes left over
    elif how == 2:
        values[i] = b"\x00\x00\x00\x00\x08" + values[i][5:]  # an unknown schema id
    else:
        values[i] = values[i][:5] + data.draw(st.binary(max_size=12))  # garbage body
    expected, expected_failures = AvroDecoder(registry(schema), schema).decode(values)
    for given in (values, pa.array(values, pa.binary())):
        columns, decoded, failures = BatchDecoder(registry(schema), schema).decode(given)
        if columns is not None:
            decoded, failures = columns.to_pylist(), []
        assert [f.index for f in failures] == [f.index for f in expected_failures]
        assert same(decoded, expected)


# -- examples ------------------------------------------------------------------------------

ACTIVITY = {
    "type": "record",
    "name": "Activity",
    "fields": [
        {"name": "host", "type": ["null", "string"], "default": None},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "status", "type": "int"},
        {"name": "bytes", "type": ["null", "long"], "default": None},
    ],
}


def test_the_activity_schema_takes_the_compiled_path():
    assert fast_schema(ACTIVITY) is not None
    assert fast_schema({**ACTIVITY, "fields": [*ACTIVITY["fields"], {"name": "b", "type": "bytes"}]}) is None


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"status": "200"}, "status"),
        ({"status": True}, "status"),
        ({"status": 200.0}, "status"),
        ({"status": 2**31}, "status"),
        ({"host": b"1.2.3.4"}, "host"),
        ({"status": None}, "status"),
    ],
)
def test_a_bad_record_in_a_batch_is_found_and_named(bad, field):
    now = dt.datetime(2026, 12, 3, tzinfo=UTC)
    rows = [{"host": "a", "timestamp": now, "status": 200, "bytes": 5} for _ in range(5)]
    rows[3] = {**rows[3], **bad}
    values, failures = BatchEncoder(1, ACTIVITY).encode(rows)
    assert [(f.index, f.field) for f in failures] == [(3, field)]
    assert values[3] is None and all(v is not None for i, v in enumerate(values) if i != 3)


def test_columns_of_other_widths_are_cast_and_lossy_casts_refused():
    encoder = BatchEncoder(1, ACTIVITY)
    now = dt.datetime(2026, 12, 3, tzinfo=UTC)
    rows = [{"host": "a", "timestamp": now, "status": 200, "bytes": 5}]
    expected, _ = AvroEncoder(1, ACTIVITY).encode(rows)
    wide = pa.RecordBatch.from_pylist(rows)  # status int64, timestamp us
    assert encoder.encode(columns=wide) == (expected, [])
    too_big = pa.RecordBatch.from_pylist([{**rows[0], "status": 2**40}])
    assert encoder.encode_columns(too_big) is None  # the per-record path must name it
    values, failures = encoder.encode(columns=too_big)
    assert values == [None] and failures[0].field == "status"
