"""What a processor needs of its input topics' schemas, and the schema it writes.

`plan(processor, schemas)` checks that the key, time and aggregated fields exist in every
input (merged topics match fields by name) with types their use accepts, and derives the
output's Avro schema: the key fields as they are, `window_start` and `window_end` as
timestamp-millis, then each aggregate (count and count_distinct: long; sum: long or double;
mean: double; min, max, first, last: the field's type; all but the counts nullable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.spec.model import ProcessorSpec

_NUMERIC = ("int", "long", "float", "double")
_TIMES = ("timestamp-millis", "timestamp-micros")


@dataclass
class Plan:
    schema: dict[str, Any]  # the output topic's Avro schema
    time_is_timestamp: bool  # the time field is a timestamp (else: epoch ms as long)
    problems: list[tuple[str, str]]  # (key path, message)


def plan(p: ProcessorSpec, schemas: dict[str, dict | None]) -> Plan:
    problems: list[tuple[str, str]] = []
    fields: dict[str, Any] = {}  # name -> Avro type (null removed), as in the first input that has it
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
            for name in [*p.keys, *(f for _, _, f in p.aggregates if f), *([p.time] if p.time else [])]:
                if name not in own:
                    problems.append((f"{p.key_path}.from", f"topic {topic!r} has no field {name!r} (merged topics "
                                     "need every field the processor uses)"))
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
