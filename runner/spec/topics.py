"""Checking `topics:`: partitions, key, and the Avro schema each topic references (a
`.avsc` file relative to the spec, or inline)."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import fastavro
from fastavro.schema import UnknownType

from runner.spec.checking import Checker, got
from runner.spec.environment import typed
from runner.spec.model import TopicSpec, join

_TOPIC_KEYS = ("partitions", "schema", "key")


def check_topics(c: Checker, value: Any) -> dict[str, TopicSpec | None]:
    """Every declared topic name, mapped to its spec (None where the entry is invalid: it
    still counts as declared, so references to it are not reported again)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        c.problem("topics", f"expected a mapping of topic name to topic, got {got(value)}")
        return {}
    out: dict[str, TopicSpec | None] = {}
    for raw_name, entry in value.items():
        path = join("topics", raw_name)
        name = c.topic_name(raw_name, path)
        if name is not None:
            out[name] = _topic(c, name, entry, path)
    return out


def _topic(c: Checker, name: str, value: Any, path: str) -> TopicSpec | None:
    entry = c.mapping(value, path, _TOPIC_KEYS, "a topic")
    if entry is None:
        return None
    ok = True
    partitions = typed(entry.get("partitions", 1))
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        c.problem(f"{path}.partitions", f"expected an integer >= 1, got {got(partitions)}")
        ok = False
    # No schema: a raw topic, read only by sinks that take bytes (`wants = "raw"`).
    raw = "schema" not in entry
    schema, schema_file = (None, None) if raw else _schema(c, entry.get("schema"), f"{path}.schema")
    key = entry.get("key")
    if key is not None and not isinstance(key, str):
        c.problem(f"{path}.key", f"expected a field name, got {got(key)}")
        ok = False
    elif key is not None and schema is not None:
        fields = [f.get("name") for f in schema.get("fields", []) if isinstance(f, dict)]
        if key not in fields:
            c.problem(f"{path}.key", f"{key!r} is not a field of record {schema.get('name')!r} "
                      f"(fields: {', '.join(map(str, fields)) or 'none'})")
            ok = False
    elif key is not None and raw:
        c.problem(f"{path}.key", "a raw topic (no schema) has no fields to key by")
        ok = False
    if not ok or (schema is None and not raw):
        return None
    return TopicSpec(name, partitions, schema, str(key) if key is not None else None, schema_file)


def _schema(c: Checker, value: Any, path: str) -> tuple[dict | None, pathlib.Path | None]:
    """Load and check a topic's Avro schema: a .avsc path or an inline mapping."""
    schema_file: pathlib.Path | None = None
    if value is None:
        c.problem(path, "missing required key (a path to a .avsc file, or an inline Avro record schema)",
                  missing=True)
        return None, None
    if isinstance(value, str):
        schema_file = c.path_of(value)
        try:
            schema = json.loads(schema_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            c.problem(path, f"schema file not found: {schema_file}")
            return None, None
        except json.JSONDecodeError as e:
            c.problem(path, f"{schema_file}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
            return None, None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            c.problem(path, f"cannot read schema file {schema_file}: {reason}")
            return None, None
        where = f" in {schema_file}"
    elif isinstance(value, dict):
        schema, where = typed(value), ""
    else:
        c.problem(path, f"expected a path to a .avsc file or an inline Avro schema (a mapping), got {got(value)}")
        return None, None
    try:
        # A fresh named_schemas: each topic's schema must stand on its own.
        fastavro.parse_schema(copy.deepcopy(schema), named_schemas={})
    except UnknownType as e:
        c.problem(path, f"invalid Avro schema{where}: unknown type {e.name!r}")
        return None, None
    except Exception as e:  # fastavro raises several types; its message is what counts
        c.problem(path, f"invalid Avro schema{where}: {e}")
        return None, None
    if not isinstance(schema, dict) or schema.get("type") != "record":
        kind = schema.get("type") if isinstance(schema, dict) else schema
        c.problem(path, f"expected an Avro record schema{where}, got type {got(kind)}")
        return None, None
    return schema, schema_file
