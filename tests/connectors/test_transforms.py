"""The built-in transforms (connectors/transforms.py) through the public door: looked up in
the plugin host, configs parsed by their typed Config, applied to Batches; their output
schemas checked by encoding the transformed rows with fastavro."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import textwrap
from typing import Any

import fastavro
import fastavro.validation
import pytest
from ruamel.yaml import YAML

import connectors.transforms
from runner.batch import Batch
from runner.chain import Chain
from runner.config import ConfigError
from runner.plugins import load_plugins
from runner.transform import Transform, TransformContext

HOST = load_plugins()
UTC = dt.timezone.utc

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Hit",
    "namespace": "test",
    "fields": [
        {"name": "host", "type": ["null", "string"], "default": None, "doc": "client address"},
        {"name": "method", "type": ["null", "string"], "default": None},
        {"name": "path", "type": "string"},
        {"name": "status", "type": ["null", "int"], "default": None},
        {"name": "bytes", "type": ["null", "long"], "default": None},
        {"name": "ratio", "type": "double", "default": 0.5},
        {"name": "secure", "type": "boolean"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}

T0 = dt.datetime(2026, 11, 20, 12, 0, 0, 123000, tzinfo=UTC)


def rows() -> list[dict[str, Any]]:
    return [
        {"host": "10.0.0.1", "method": "GET", "path": "/", "status": 200, "bytes": 512, "ratio": 0.25,
         "secure": True, "ts": T0},
        {"host": "10.0.0.2", "method": "POST", "path": "/login", "status": 302, "bytes": None, "ratio": 1.0,
         "secure": False, "ts": T0 + dt.timedelta(seconds=1)},
        {"host": None, "method": None, "path": "-", "status": 400, "bytes": 0, "ratio": 0.0,
         "secure": True, "ts": T0 + dt.timedelta(seconds=2)},
        {"host": "10.0.0.1", "method": "DELETE", "path": "/static/app.js", "status": 500, "bytes": 12,
         "ratio": 2.5, "secure": True, "ts": T0 + dt.timedelta(seconds=3)},
    ]


def source_batch(data: list[dict] | None = None) -> Batch:
    data = rows() if data is None else data
    return Batch(data, positions=[f"access.log:{i + 1}" for i in range(len(data))], source_offsets={"f": 99})


def sink_batch(data: list[dict] | None = None) -> Batch:
    data = rows() if data is None else data
    n = len(data)
    return Batch(
        data,
        topic="hits",
        partition=2,
        record_offsets=[100 + i for i in range(n)],
        keys=[f"k{i}".encode() for i in range(n)],
        timestamps=[1_700_000_000_000 + i for i in range(n)],
    )


def build(name: str, config: dict | None, side: str = "source") -> Transform:
    cls = HOST.lookup("transform", name).cls
    return cls(cls.Config.parse(config), TransformContext("test-connector", side, f"{side}s[0].transforms[0]"))


def config_problems(name: str, config: dict) -> dict[str, str]:
    cls = HOST.lookup("transform", name).cls
    with pytest.raises(ConfigError) as info:
        cls.Config.parse(config)
    return dict(info.value.problems)


def out_schema(transform: Transform, schema: dict | None = None) -> dict:
    """transform.schema() on a copy, checking it neither returns nor modifies its input."""
    given = copy.deepcopy(schema or SCHEMA)
    before = copy.deepcopy(given)
    out = transform.schema(given)
    assert out is not given and given == before, "schema() must return a new dict and leave its argument alone"
    return out


def encodes(schema: dict, data: list[dict]) -> list[dict]:
    """The rows fit the schema: validated and written with fastavro, read back."""
    parsed = fastavro.parse_schema(copy.deepcopy(schema))
    assert fastavro.validation.validate_many(data, parsed, raise_errors=True)
    back = []
    for row in data:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, row)
        buf.seek(0)
        back.append(fastavro.schemaless_reader(buf, parsed))
    return back


def field(schema: dict, name: str) -> dict:
    (f,) = [f for f in schema["fields"] if f["name"] == name]
    return f


# -- the host knows them -----------------------------------------------------------------


def test_every_builtin_transform_is_registered_by_the_builtin_plugin() -> None:
    regs = {r.name: r for r in HOST.registrations("transform")}
    assert {"rename", "drop", "mask", "cast", "insert", "timestamp", "filter", "route"} <= set(regs)
    assert all(regs[n].plugin.name == "builtin" for n in ("rename", "route"))
    assert HOST.lookup("transform", "route").cls.sides == ("source",)


# -- rename ------------------------------------------------------------------------------


def test_rename_renames_fields_in_rows_and_schema() -> None:
    t = build("rename", {"fields": {"host": "client_ip", "bytes": "size"}})
    out = t.apply(sink_batch())
    assert list(out.rows[0]) == ["client_ip", "method", "path", "status", "size", "ratio", "secure", "ts"]
    assert [r["client_ip"] for r in out.rows] == ["10.0.0.1", "10.0.0.2", None, "10.0.0.1"]
    assert out.record_offsets == [100, 101, 102, 103] and out.keys[0] == b"k0"
    schema = out_schema(t)
    assert field(schema, "client_ip") == {"name": "client_ip", "type": ["null", "string"], "default": None,
                                          "doc": "client address"}
    assert [f["name"] for f in schema["fields"]][4] == "size"
    assert encodes(schema, out.rows)[1]["size"] is None


def test_rename_schema_names_the_missing_field_and_a_collision() -> None:
    with pytest.raises(ValueError, match=r"rename: field 'hots' is not in the record schema \(fields: host, method"):
        out_schema(build("rename", {"fields": {"hots": "client_ip"}}))
    with pytest.raises(ValueError, match="already has a field 'path'"):
        out_schema(build("rename", {"fields": {"host": "path"}}))


def test_rename_config_errors() -> None:
    assert "two fields renamed to 'x'" in config_problems("rename", {"fields": {"a": "x", "b": "x"}})["fields"]
    assert "not a valid Avro field name" in config_problems("rename", {"fields": {"a": "x-y"}})["fields"]
    assert "required setting missing" in config_problems("rename", {})["fields"]
    assert "did you mean 'fields'" in config_problems("rename", {"field": {"a": "b"}})["field"]


# -- drop --------------------------------------------------------------------------------


def test_drop_fields_and_keep() -> None:
    dropped = build("drop", {"fields": ["ratio", "secure"]})
    out = dropped.apply(sink_batch())
    assert list(out.rows[0]) == ["host", "method", "path", "status", "bytes", "ts"]
    schema = out_schema(dropped)
    assert [f["name"] for f in schema["fields"]] == ["host", "method", "path", "status", "bytes", "ts"]
    encodes(schema, out.rows)

    kept = build("drop", {"keep": ["ts", "path"]})
    out = kept.apply(sink_batch())
    assert out.rows[1] == {"path": "/login", "ts": T0 + dt.timedelta(seconds=1)}
    schema = out_schema(kept)
    assert [f["name"] for f in schema["fields"]] == ["path", "ts"]  # the schema's order
    encodes(schema, out.rows)


def test_drop_config_and_schema_errors() -> None:
    assert "give `fields` or `keep`" in config_problems("drop", {})[""]
    assert "not both" in config_problems("drop", {"fields": ["a"], "keep": ["b"]})["keep"]
    assert "at least one" in config_problems("drop", {"fields": []})["fields"]
    with pytest.raises(ValueError, match=r"drop: field 'nope' is not in the record schema"):
        out_schema(build("drop", {"keep": ["path", "nope"]}))


# -- mask --------------------------------------------------------------------------------


def test_mask_with_a_replacement_follows_maskfield_semantics() -> None:
    t = build("mask", {"fields": ["host", "status", "ratio", "secure", "ts", "bytes"], "with": "[redacted]"})
    out = t.apply(sink_batch())
    assert out.rows[0] == {"host": "[redacted]", "method": "GET", "path": "/", "status": 0, "bytes": 0,
                           "ratio": 0.0, "secure": False, "ts": dt.datetime(1970, 1, 1, tzinfo=UTC)}
    assert out.rows[2]["host"] is None and out.rows[1]["bytes"] is None  # null stays null
    assert rows()[0]["host"] == "10.0.0.1"  # the input rows are not modified
    schema = out_schema(t)
    assert schema == SCHEMA
    encodes(schema, out.rows)
    assert build("mask", {"fields": ["host"]}).apply(sink_batch()).rows[0]["host"] == "****"


def test_mask_hash_pseudonymises_strings_with_a_salt() -> None:
    t = build("mask", {"fields": ["host"], "hash": True, "salt": "s3cret"})
    out = t.apply(source_batch())
    digest = hashlib.sha256(b"s3cret10.0.0.1").hexdigest()
    assert [r["host"] for r in out.rows] == [digest, hashlib.sha256(b"s3cret10.0.0.2").hexdigest(), None, digest]
    assert "s3cret" not in repr(t.config)
    unsalted = build("mask", {"fields": ["host"], "hash": True}).apply(source_batch())
    assert unsalted.rows[0]["host"] == hashlib.sha256(b"10.0.0.1").hexdigest()


def test_mask_config_errors_use_the_spec_s_key_names() -> None:
    assert "not both" in config_problems("mask", {"fields": ["a"], "with": "x", "hash": True})["with"]
    assert "expected str" in config_problems("mask", {"fields": ["a"], "with": 3})["with"]
    assert "only with `hash: true`" in config_problems("mask", {"fields": ["a"], "salt": "x"})["salt"]
    with pytest.raises(ValueError, match="mask: field 'nope' is not in the record schema"):
        out_schema(build("mask", {"fields": ["nope"]}))


def test_mask_a_value_it_cannot_mask_is_a_record_error() -> None:
    data = rows()
    data[1]["host"] = object()
    out = build("mask", {"fields": ["host"]}).apply(source_batch(data))
    assert len(out) == 3 and out.positions == ["access.log:1", "access.log:3", "access.log:4"]
    (err,) = out.errors
    assert err.stage == "transform" and err.field == "host" and err.position == "access.log:2"
    assert err.error.startswith("mask: cannot mask a value of type object")


# -- cast --------------------------------------------------------------------------------


def test_cast_converts_and_keeps_nullability() -> None:
    t = build("cast", {"fields": {"status": "string", "bytes": "double", "ratio": "int", "secure": "string"}})
    out = t.apply(sink_batch())
    assert [(r["status"], r["bytes"], r["ratio"], r["secure"]) for r in out.rows] == [
        ("200", 512.0, 0, "true"), ("302", None, 1, "false"), ("400", 0.0, 0, "true"), ("500", 12.0, 2, "true"),
    ]
    schema = out_schema(t)
    assert field(schema, "status")["type"] == ["null", "string"] and field(schema, "status")["default"] is None
    assert field(schema, "bytes")["type"] == ["null", "double"]
    assert field(schema, "ratio") == {"name": "ratio", "type": "int", "default": 0}  # 0.5 cast too
    assert field(schema, "secure")["type"] == "string"
    assert encodes(schema, out.rows)[0]["status"] == "200"


def test_cast_strings_to_numbers_and_booleans() -> None:
    data = [{"a": " 42 ", "b": "4.2e1", "c": "Yes", "d": "2.5"}, {"a": "-7", "b": "1", "c": "0", "d": "3"}]
    t = build("cast", {"fields": {"a": "int", "b": "long", "c": "boolean", "d": "float"}})
    assert t.apply(source_batch(data)).rows == [
        {"a": 42, "b": 42, "c": True, "d": 2.5}, {"a": -7, "b": 1, "c": False, "d": 3.0},
    ]


def test_cast_failures_are_record_errors_naming_the_field_and_bookkeeping_follows() -> None:
    data = rows()
    data[0]["path"] = "abc"
    data[2]["path"] = "12"
    data[3]["path"] = str(2**40)  # does not fit an int
    t = build("cast", {"fields": {"path": "int"}}, side="sink")
    out = t.apply(sink_batch(data))
    assert [r["path"] for r in out.rows] == [12]
    assert out.record_offsets == [102] and out.keys == [b"k2"] and out.timestamps == [1_700_000_000_002]
    assert [e.position for e in out.errors] == ["hits[2]@100", "hits[2]@101", "hits[2]@103"]
    assert all(e.stage == "transform" and e.field == "path" for e in out.errors)
    assert "cast: field 'path': cannot cast 'abc' to int" in out.errors[0].error
    assert "out of the range of int" in out.errors[2].error
    assert out.errors[0].record["path"] == "abc"  # the record as it came in


def test_cast_config_and_schema_errors() -> None:
    problems = config_problems("cast", {"fields": {"status": "integer"}})
    assert "expected one of 'string', 'int'" in problems["fields.status"]
    with pytest.raises(ValueError, match=r"cast: field 'stauts' is not in the record schema \(fields: host"):
        out_schema(build("cast", {"fields": {"stauts": "string"}}))


# -- insert ------------------------------------------------------------------------------


def test_insert_static_values_and_sink_metadata() -> None:
    t = build("insert", {"fields": {"region": "eu-west-1", "version": 2, "weight": 0.5, "live": True},
                         "topic": "k_topic", "partition": "k_partition", "offset": "k_offset",
                         "timestamp": "k_time"}, side="sink")
    out = t.apply(sink_batch())
    assert {k: out.rows[3][k] for k in ("region", "version", "weight", "live", "k_topic", "k_partition", "k_offset")} \
        == {"region": "eu-west-1", "version": 2, "weight": 0.5, "live": True, "k_topic": "hits", "k_partition": 2,
            "k_offset": 103}
    assert out.rows[3]["k_time"] == dt.datetime(2023, 11, 14, 22, 13, 20, 3000, tzinfo=UTC)
    schema = out_schema(t)
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types["region"] == "string" and types["version"] == "long" and types["weight"] == "double"
    assert types["live"] == "boolean" and types["k_offset"] == ["null", "long"] and types["k_partition"] == ["null", "int"]
    assert types["k_time"] == ["null", {"type": "long", "logicalType": "timestamp-millis"}]
    back = encodes(schema, out.rows)
    assert back[3]["k_offset"] == 103 and back[3]["k_time"] == out.rows[3]["k_time"]


def test_insert_metadata_is_null_on_a_source() -> None:
    t = build("insert", {"offset": "k_offset", "topic": "k_topic"})
    out = t.apply(source_batch())
    assert all(r["k_offset"] is None and r["k_topic"] is None for r in out.rows)
    encodes(out_schema(t), out.rows)


def test_insert_config_and_schema_errors() -> None:
    problems = config_problems("insert", {"fields": {"x": None, "y": [1]}})
    assert "got null" in problems["fields.x"] and "got list" in problems["fields.y"]
    assert "inserted twice" in config_problems("insert", {"fields": {"a": 1}, "offset": "a"})[""]
    assert "give `fields`" in config_problems("insert", {})[""]
    with pytest.raises(ValueError, match="insert: field 'status' is already in the record schema"):
        out_schema(build("insert", {"fields": {"status": 1}}))


# -- timestamp ---------------------------------------------------------------------------


def test_timestamp_to_string_millis_and_back() -> None:
    to_string = build("timestamp", {"field": "ts", "to": "string"})
    out = to_string.apply(sink_batch())
    assert out.rows[0]["ts"] == "2026-11-20T12:00:00.123Z"
    schema = out_schema(to_string)
    assert field(schema, "ts")["type"] == "string"
    encodes(schema, out.rows)

    formatted = build("timestamp", {"field": "ts", "to": "string", "format": "%d/%m/%Y %H:%M"})
    assert formatted.apply(sink_batch()).rows[0]["ts"] == "20/11/2026 12:00"

    back = build("timestamp", {"field": "ts", "to": "timestamp"}).apply(out)
    assert back.rows[0]["ts"] == T0

    millis = build("timestamp", {"field": "ts", "to": "millis"})
    out = millis.apply(sink_batch())
    assert out.rows[0]["ts"] == int(T0.timestamp() * 1000)
    assert field(out_schema(millis), "ts")["type"] == "long"
    again = build("timestamp", {"field": "ts", "to": "timestamp"}).apply(out)
    assert again.rows[0]["ts"] == T0


def test_timestamp_parses_strings_with_a_format_keeping_nullability() -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "when", "type": ["null", "string"], "default": None}]}
    t = build("timestamp", {"field": "when", "to": "timestamp", "format": "%d/%b/%Y:%H:%M:%S %z"})
    out = t.apply(source_batch([{"when": "20/Nov/2026:13:00:00 +0100"}, {"when": None}, {"when": "yesterday"}]))
    assert [r["when"] for r in out.rows] == [dt.datetime(2026, 11, 20, 12, tzinfo=UTC), None]
    (err,) = out.errors
    assert err.field == "when" and err.position == "access.log:3"
    assert "timestamp: field 'when': cannot convert 'yesterday' to timestamp with format" in err.error
    out_s = out_schema(t, schema)
    assert field(out_s, "when") == {"name": "when", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
                                    "default": None}
    encodes(out_s, out.rows)


def test_timestamp_iso_strings_and_config_errors() -> None:
    t = build("timestamp", {"field": "t", "to": "millis"})
    out = t.apply(source_batch([{"t": "2026-11-20T12:00:00Z"}, {"t": "2026-11-20 13:00:00+01:00"}, {"t": 5}]))
    assert [r["t"] for r in out.rows] == [1795176000000, 1795176000000, 5]
    assert "expected one of 'string', 'millis', 'timestamp'" in config_problems("timestamp", {"field": "t", "to": "ms"})["to"]
    assert "no %-directive" in config_problems("timestamp", {"field": "t", "to": "string", "format": "YYYY"})["format"]
    with pytest.raises(ValueError, match="timestamp: field 't' is not in the record schema"):
        out_schema(t)


# -- filter ------------------------------------------------------------------------------


def test_filter_keep_and_drop() -> None:
    keep = build("filter", {"keep": "status >= 400 and path != '-'"})
    out = keep.apply(sink_batch())
    assert [r["path"] for r in out.rows] == ["/static/app.js"]
    assert out.record_offsets == [103] and out.keys == [b"k3"] and not out.errors

    drop = build("filter", {"drop": "path.startswith(('/static/', '/img/')) or method in ['DELETE']"})
    out = drop.apply(source_batch())
    assert [r["path"] for r in out.rows] == ["/", "/login", "-"]
    assert out.positions == ["access.log:1", "access.log:2", "access.log:3"] and out.source_offsets == {"f": 99}
    assert out_schema(drop) == SCHEMA

    everything = build("filter", {"keep": "len(path) > 0"})
    batch = source_batch()
    assert everything.apply(batch) is batch  # nothing dropped: the batch itself


def test_filter_failures_are_record_errors_naming_the_field() -> None:
    t = build("filter", {"drop": "method.lower() == 'delete' or bytes > 100"})
    out = t.apply(sink_batch())
    # row 0: kept? bytes 512 > 100 → dropped; row 1: bytes None → error; row 2: method None → error;
    # row 3: DELETE → dropped
    assert len(out) == 0
    assert [(e.position, e.field) for e in out.errors] == [("hits[2]@101", "bytes"), ("hits[2]@102", "method")]
    assert "filter: cannot evaluate drop \"method.lower() == 'delete' or bytes > 100\": field 'bytes' is null" \
        in out.errors[0].error
    missing = build("filter", {"keep": "sttus == 200"}).apply(source_batch())
    assert len(missing) == 0 and {e.field for e in missing.errors} == {"sttus"}
    assert "the record has no field 'sttus'" in missing.errors[0].error


def test_filter_config_errors_and_schema_check() -> None:
    problems = config_problems("filter", {"drop": "status >= "})
    assert "syntax error in 'status >= ' at column" in problems["drop"]
    assert "give `keep` or `drop`" in config_problems("filter", {})[""]
    assert "not both" in config_problems("filter", {"keep": "a", "drop": "b"})["drop"]
    assert "not one expression" in config_problems("filter", {"keep": "a = 1"})["keep"]
    with pytest.raises(ValueError, match=r"filter: field 'sttus' is not in the record schema"):
        out_schema(build("filter", {"keep": "sttus == 200 and all([x > 1 for x in [2]])"}))
    multi_line = build("filter", {"keep": "status >= 400\nand method is not None\n"})
    assert [r["status"] for r in multi_line.apply(source_batch()).rows] == [500]


# -- route -------------------------------------------------------------------------------


def test_route_sets_destinations_and_names_its_topics() -> None:
    t = build("route", {"field": "method", "topics": {"POST": "writes", "DELETE": "writes", None: "odd"}})
    assert t.topics() == ["writes", "odd"]
    out = t.apply(source_batch())
    assert out.destinations == [None, "writes", "odd", "writes"]
    assert out.rows == rows() and out.positions == source_batch().positions

    with_default = build("route", {"field": "status", "topics": {404: "missing", 500: "errors"}, "default": "ok"})
    assert with_default.topics() == ["missing", "errors", "ok"]
    assert with_default.apply(source_batch()).destinations == ["ok", "ok", "ok", "errors"]


def test_a_second_route_keeps_what_the_first_decided_for_values_it_does_not_list() -> None:
    chain = Chain("test", [build("route", {"field": "method", "topics": {"POST": "writes"}}),
                           build("route", {"field": "status", "topics": {"500": "errors"}})])
    assert chain.apply(source_batch()).destinations == [None, "writes", None, "errors"]
    assert chain.topics() == ["writes", "errors"]


def test_route_config_errors() -> None:
    assert "at least one" in config_problems("route", {"field": "m", "topics": {}})["topics"]
    assert "required setting missing" in config_problems("route", {"topics": {"a": "b"}})["field"]


# -- a chain -----------------------------------------------------------------------------


def test_a_chain_keeps_bookkeeping_through_several_failing_transforms() -> None:
    data = rows() + [dict(rows()[0], path="/x", status=None)]
    chain = Chain("test", [
        build("rename", {"fields": {"host": "client_ip"}}, "sink"),
        build("filter", {"drop": "status >= 500"}, "sink"),
        build("timestamp", {"field": "ts", "to": "string", "format": "%H:%M:%S"}, "sink"),
        build("cast", {"fields": {"status": "string"}}, "sink"),
        build("drop", {"fields": ["ratio"]}, "sink"),
    ])
    out = chain.apply(sink_batch(data))
    assert [r["status"] for r in out.rows] == ["200", "302", "400"]
    assert out.record_offsets == [100, 101, 102] and out.keys == [b"k0", b"k1", b"k2"]
    assert [(e.position, e.field) for e in out.errors] == [("hits[2]@104", "status")]
    schema = chain.schema(copy.deepcopy(SCHEMA))
    assert "ratio" not in [f["name"] for f in schema["fields"]]
    encodes(schema, out.rows)


def test_the_manual_s_examples_are_valid_configs() -> None:
    """Every `- NAME: {...}` example in the module docstring (the user manual) parses."""
    lines = connectors.transforms.__doc__.splitlines()
    names = {r.name for r in HOST.registrations("transform")}
    seen = set()
    for i, line in enumerate(lines):
        head = line.strip()
        if not head.startswith("- ") or head[2:].split(":")[0] not in names:
            continue
        indent = len(line) - len(line.lstrip())
        block = [line]
        for more in lines[i + 1:]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            block.append(more)
        ((name, config),) = YAML(typ="safe").load(textwrap.dedent("\n".join(block)))[0].items()
        HOST.lookup("transform", name).cls.Config.parse(config)
        seen.add(name)
    assert seen == {"rename", "drop", "mask", "cast", "insert", "timestamp", "filter", "route"}
