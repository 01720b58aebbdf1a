"""What a processor needs of its input topics' schemas, and the schema it writes.

`plan(processor, schemas, given)` checks that the fields a processor uses exist in every
input (merged topics match fields by name) with types their use accepts, and derives the
output's Avro schema:

- an aggregation: the key fields as they are, `window_start` and `window_end` as
  timestamp-millis, then each aggregate (count and count_distinct: long; sum: long or
  double; mean: double; min, max, first, last: the field's type; all but the counts
  nullable);
- a join or a pass (merge, filter): the fields every input has (as the first input has
  them; their types must agree), then the table's joined fields (nullable in a left join).

When the output topic declares a schema of its own (`given`), the derived records must fit
it: every derived field is there with the same type (nullable where the derived one is),
and every other field has a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastavro.schema import expand_schema

from runner.expressions import names, parse
from runner.spec.model import ProcessorSpec

_NUMERIC = ("int", "long", "float", "double")
_TIMES = ("timestamp-millis", "timestamp-micros")


@dataclass
class Plan:
    schema: dict[str, Any]  # the output topic's Avro schema
    time_is_timestamp: bool  # the time field is a timestamp (else: epoch ms as long)
    problems: list[tuple[str, str]]  # (key path, message)


def plan(p: ProcessorSpec, schemas: dict[str, dict | None], given: dict | None = None) -> Plan:
    """`schemas`: every topic the processor reads (inputs and table); `given`: the output
    topic's declared schema, if any."""
    # Named types inlined where used: a field carried over may name a type that another
    # field, not carried over, defined. Each is defined once again in the output (_named_once).
    schemas = {t: expand_schema(schema) if schema is not None else None for t, schema in schemas.items()}
    found = _aggregation(p, schemas) if p.kind == "aggregate" else _passing(p, schemas)
    if found.schema:
        found.schema["fields"] = _named_once(found.schema["fields"])
    if p.where is not None:
        for topic in p.inputs:
            own = {f["name"] for f in (schemas.get(topic) or {}).get("fields", [])}
            missing = [n for n in names(parse(p.where)) if n not in own]
            if schemas.get(topic) is not None and missing:
                found.problems.append((f"{p.key_path}.where", f"no field {missing[0]!r} in {topic!r} (the condition "
                                       f"reads it); fields: {', '.join(sorted(own)) or 'none'}"))
    if given is not None and not found.problems:
        found.problems += [(f"{p.key_path}.to", message) for message in _misfits(found.schema, given)]
        found.schema = given
    return found


def _input_fields(p: ProcessorSpec, schemas: dict[str, dict | None], used: list[str],
                  problems: list[tuple[str, str]]) -> dict[str, Any]:
    """name -> Avro type (null removed), as in the first input that has it; problems for
    inputs without a schema and merged inputs without a field the processor uses."""
    fields: dict[str, Any] = {}
    for topic in p.inputs:
        schema = schemas.get(topic)
        if schema is None:
            problems.append((f"{p.key_path}.from", f"topic {topic!r} has no schema (a raw topic): a processor "
                             "reads decoded records"))
            continue
        own = {f["name"]: _non_null(f["type"]) for f in schema.get("fields", [])}
        for name, avro in own.items():
            fields.setdefault(name, avro)
        if len(p.inputs) > 1:
            for name in used:
                if name not in own:
                    problems.append((f"{p.key_path}.from", f"topic {topic!r} has no field {name!r} (merged topics "
                                     "need every field the processor uses)"))
    return fields


def _passing(p: ProcessorSpec, schemas: dict[str, dict | None]) -> Plan:
    """A join or a pass: the inputs' common fields, then the table's joined ones."""
    problems: list[tuple[str, str]] = []
    used = [*([p.join.on] if p.join else [])]
    fields = _input_fields(p, schemas, used, problems)
    if problems:
        return Plan({}, False, problems)
    records = [schemas[t] for t in p.inputs]
    out_fields = []
    for field in records[0].get("fields", []):
        others = [next((f for f in r.get("fields", []) if f["name"] == field["name"]), None) for r in records[1:]]
        if any(o is None for o in others):
            continue  # merged topics keep the fields they all have
        for topic, other in zip(p.inputs[1:], others):
            if _non_null(other["type"]) != _non_null(field["type"]):
                problems.append((f"{p.key_path}.from", f"field {field['name']!r} is {_name(_non_null(field['type']))} "
                                 f"in {p.inputs[0]!r} but {_name(_non_null(other['type']))} in {topic!r}"))
        nullable = any(_nullable(f["type"]) for f in [field, *others])
        out_fields.append(_field(field, nullable))
    if p.join is not None:
        at = f"{p.key_path}.join"
        on = fields.get(p.join.on)
        if p.join.on not in fields:
            problems.append((f"{at}.on", f"no field {p.join.on!r} in {', '.join(p.inputs)} (the join key); fields: "
                             f"{', '.join(fields) or 'none'}"))
        elif _name(on) not in ("string", "int", "long"):
            problems.append((f"{at}.on", f"join key {p.join.on!r} is {_name(on)}; it matches the table's record "
                             "keys as text: join on a string, int or long"))
        table = schemas.get(p.join.table)
        if table is None:
            problems.append((f"{at}.table", f"topic {p.join.table!r} has no schema (a raw topic): a table's "
                             "records are decoded"))
            return Plan({}, False, problems)
        own = {f["name"]: f for f in table.get("fields", [])}
        for name in p.join.fields or list(own):
            if name not in own:
                problems.append((f"{at}.fields", f"no field {name!r} in table {p.join.table!r}; fields: "
                                 f"{', '.join(own) or 'none'}"))
            elif name in fields:
                problems.append((f"{at}.fields", f"field {name!r} is in {', '.join(p.inputs)} already; join "
                                 "other fields, or rename it in one of them"))
            else:
                out_fields.append(_field(own[name], p.join.how == "left" or _nullable(own[name]["type"])))
    what = f"records of {', '.join(p.inputs)}" + (f" joined with {p.join.table}" if p.join else "")
    schema = {"type": "record", "name": _record_name(p.name), "doc": f"{what} (processor {p.name})",
              "fields": out_fields}
    return Plan(schema, False, problems)


def _named_once(fields: list[dict]) -> list[dict]:
    """`fields` with each named type (record, enum, fixed) defined at its first use and
    referred to by its full name after."""
    seen: set[str] = set()

    def walk(avro: Any, namespace: str | None) -> Any:
        if isinstance(avro, list):
            return [walk(a, namespace) for a in avro]
        if not isinstance(avro, dict):
            return avro
        if avro.get("type") in ("record", "enum", "fixed") and "name" in avro:
            space = avro.get("namespace", namespace)
            full = avro["name"] if "." in avro["name"] or not space else f"{space}.{avro['name']}"
            if full in seen:
                return full
            seen.add(full)
            out = dict(avro)
            if avro["type"] == "record":
                out["fields"] = [{**f, "type": walk(f["type"], space)} for f in avro["fields"]]
            return out
        out = dict(avro)
        for key in ("items", "values"):
            if key in out:
                out[key] = walk(out[key], namespace)
        return out

    return [{**f, "type": walk(f["type"], None)} for f in fields]


def _field(field: dict, nullable: bool) -> dict:
    """A field as it is (doc and default kept), nullable (null first, default null) if asked."""
    out = {k: v for k, v in field.items() if k in ("name", "type", "doc", "default")}
    if nullable and not _nullable(field["type"]):
        out["type"] = ["null", field["type"]]
        out["default"] = None
    return out


def _nullable(avro: Any) -> bool:
    return avro == "null" or (isinstance(avro, list) and "null" in avro)


def _misfits(derived: dict, given: dict) -> list[str]:
    """Why records of `derived` do not fit `given` (none: they do)."""
    own = {f["name"]: f for f in given.get("fields", [])}
    problems = []
    for field in derived["fields"]:
        theirs = own.get(field["name"])
        if theirs is None:
            problems.append(f"the output topic's schema has no field {field['name']!r}, which the processor writes")
        elif _non_null(theirs["type"]) != _non_null(field["type"]):
            problems.append(f"field {field['name']!r} is {_name(_non_null(theirs['type']))} in the output topic's "
                            f"schema but the processor writes {_name(_non_null(field['type']))}")
        elif _nullable(field["type"]) and not _nullable(theirs["type"]):
            problems.append(f"field {field['name']!r} may be null, but the output topic's schema does not allow null")
    written = {f["name"] for f in derived["fields"]}
    problems += [f"field {name!r} of the output topic's schema is not written by the processor and has no default"
                 for name, f in own.items() if name not in written and "default" not in f]
    return problems


def _aggregation(p: ProcessorSpec, schemas: dict[str, dict | None]) -> Plan:
    problems: list[tuple[str, str]] = []
    used = [*p.keys, *(f for _, _, f in p.aggregates if f), *([p.time] if p.time else [])]
    fields = _input_fields(p, schemas, used, problems)
    if problems:
        return Plan({}, False, problems)

    def need(name: str, path: str, what: str) -> Any:
        if name not in fields:
            problems.append((path, f"no field {name!r} in {', '.join(p.inputs)} ({what}); fields: "
                             f"{', '.join(fields) or 'none'}"))
        return fields.get(name)

    out_fields = []
    for i, key in enumerate(p.keys):
        avro = need(key, f"{p.key_path}.key", "a group-by field")
        if avro is not None and not _primitive(avro):
            problems.append((f"{p.key_path}.key", f"group-by field {key!r} is {_name(avro)}; group by text, numbers, "
                             "booleans or timestamps"))
        out_fields.append({"name": key, "type": ["null", avro] if avro is not None else "null", "default": None})
    time_is_timestamp = False
    if p.time is not None:
        avro = need(p.time, f"{p.key_path}.time", "the event time")
        logical = avro.get("logicalType") if isinstance(avro, dict) else None
        if avro is not None and logical not in _TIMES and _name(avro) != "long":
            problems.append((f"{p.key_path}.time", f"event-time field {p.time!r} is {_name(avro)}; it must be a "
                             "timestamp (timestamp-millis or -micros) or epoch milliseconds (long)"))
        time_is_timestamp = logical in _TIMES
    for bound in ("window_start", "window_end"):
        out_fields.append({"name": bound, "type": {"type": "long", "logicalType": "timestamp-millis"}})
    for name, function, field in p.aggregates:
        path = f"{p.key_path}.aggregate.{name}"
        if function == "count":
            out_fields.append({"name": name, "type": "long"})
            continue
        avro = need(field, path, f"{function}()")
        if avro is None:
            continue
        if function in ("sum", "mean") and _name(avro) not in _NUMERIC:
            problems.append((path, f"{function}({field}): {field!r} is {_name(avro)}, not a number"))
            continue
        if function in ("min", "max", "count_distinct", "first", "last") and not _primitive(avro):
            problems.append((path, f"{function}({field}): {field!r} is {_name(avro)}; it takes text, numbers, "
                             "booleans or timestamps"))
            continue
        if function == "count_distinct":
            out_fields.append({"name": name, "type": "long"})
        elif function == "sum":
            out_fields.append({"name": name, "type": ["null", "double" if _name(avro) in ("float", "double") else "long"],
                               "default": None})
        elif function == "mean":
            out_fields.append({"name": name, "type": ["null", "double"], "default": None})
        else:
            out_fields.append({"name": name, "type": ["null", avro], "default": None})
    schema = {"type": "record", "name": _record_name(p.name), "doc": f"windowed aggregates of processor {p.name}",
              "fields": out_fields}
    return Plan(schema, time_is_timestamp, problems)


def _non_null(avro: Any) -> Any:
    if isinstance(avro, list):
        rest = [t for t in avro if t != "null"]
        return rest[0] if len(rest) == 1 else rest
    return avro


def _name(avro: Any) -> str:
    if isinstance(avro, dict):
        return avro.get("logicalType") or str(avro.get("type"))
    if isinstance(avro, list):
        return "a union"
    return str(avro)


def _primitive(avro: Any) -> bool:
    if isinstance(avro, dict):
        return avro.get("logicalType") in (*_TIMES, "date") or avro.get("type") in ("string", "long", "int")
    return avro in ("string", "int", "long", "float", "double", "boolean")


def _record_name(name: str) -> str:
    parts = [part for part in "".join(ch if ch.isalnum() else " " for ch in name).split() if part]
    text = "".join(part[:1].upper() + part[1:] for part in parts) or "Processor"
    return text if not text[0].isdigit() else "P" + text


# -- how a processor's work divides --------------------------------------------------------


def keyed_by_group(p: ProcessorSpec, topic_keys: dict[str, str | None], written: set[str]) -> bool:
    """An aggregation by one field whose one input topic a source keys by that field (and no
    processor writes: `written`; processors key records otherwise): each key's records are
    in one partition already, so the partitions can be aggregated apart. (Other
    aggregations would need their records re-keyed through a repartition topic first; for
    now one task reads all their partitions.)"""
    return p.kind == "aggregate" and len(p.keys) == 1 and len(p.inputs) == 1 \
        and topic_keys.get(p.inputs[0]) == p.keys[0] and p.inputs[0] not in written
