"""Checking `processors:`: topics into topics, aggregated by window, joined with a
table, or passed on (merged, filtered).

    processors:
      - name: views-per-minute
        from: activity                 # a topic or a list of topics (merged)
        to: views-per-minute           # declared under topics:; no schema: derived
        where: "status >= 400"         # optional: only records meeting it (the filter transform's language)
        key: [path, status]            # group by; the output key
        time: timestamp                # event time; omitted: the record's topic timestamp
        window: {tumbling: 1m}         # or {hopping: 5m, advance: 1m} | {sliding: 5m} | {session: 30m} | {count: 1000}
        grace: 30s                     # lateness accepted (default 0)
        emit: final                    # or updates
        idle_close: 1m                 # with no input, wall-clock time closes windows
        aggregate: {views: count(), bytes: sum(bytes), visitors: count_distinct(remote_host)}
      - name: enrich
        from: [web-orders, shop-orders]
        to: orders
        join: {table: customers, on: customer, fields: [name, country], how: left}   # or inner; retention: 30d
      - name: errors-only               # neither: records passed on (merged, filtered)
        from: activity
        to: errors
        where: "status >= 500"

The shapes are checked here; what needs the input's schema (fields exist, types fit) is
checked by the engine (`runner.processing.plan`).
"""

from __future__ import annotations

import re
from typing import Any

from runner.errors import suggest
from runner.expressions import parse
from runner.processing.windows import FUNCTIONS
from runner.schedule import ScheduleError, parse_duration
from runner.spec.checking import Checker, got
from runner.spec.model import JoinSpec, ProcessorSpec, TopicSpec, join

_KEYS = ("name", "from", "to", "where", "key", "time", "window", "grace", "emit", "idle_close", "aggregate", "join")
_WINDOWED = ("key", "time", "window", "grace", "emit", "idle_close", "aggregate")  # only with a window
_JOIN_KEYS = ("table", "on", "fields", "how", "retention")
_HOWS = ("left", "inner")
_WINDOWS = ("tumbling", "hopping", "sliding", "session", "count")
_WINDOW_FORMS = "{tumbling: 1m}, {hopping: 5m, advance: 1m}, {sliding: 5m}, {session: 30m} or {count: 1000}"
_EMITS = ("final", "updates")
_CALL = re.compile(r"\s*([A-Za-z_]+)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)?\s*\)\s*")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_processors(c: Checker, value: Any, topics: dict[str, TopicSpec | None]) -> list[ProcessorSpec | None]:
    if value is None:
        return []
    if not isinstance(value, list):
        c.problem("processors", f"expected a list of processors, got {got(value)}")
        return []
    return [_processor(c, item, f"processors[{i}]", topics) for i, item in enumerate(value)]


def _processor(c: Checker, value: Any, path: str, topics: dict[str, TopicSpec | None]) -> ProcessorSpec | None:
    entry = c.mapping(value, path, _KEYS, "a processor")
    if entry is None:
        return None
    before = c.attempts
    name = c.name(entry.get("name"), join(path, "name"), required=True)
    if name is not None:
        c.names.append((name, path))
    inputs = entry.get("from")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        c.problem(join(path, "from"), f"expected a topic or a list of topics, got {got(entry.get('from'))}",
                  missing="from" not in entry)
        inputs = []
    for i, topic in enumerate(inputs):
        where = join(path, "from") + (f"[{i}]" if isinstance(entry.get("from"), list) else "")
        if c.topic_name(topic, where) is not None and topic not in topics:
            c.problem(where, f"topic {topic!r} is not declared under topics{suggest(topic, list(topics))}")
    output = entry.get("to")
    if output is None:
        c.problem(join(path, "to"), "missing required key (the output topic)", missing=True)
    elif c.topic_name(output, join(path, "to")) is not None and output not in topics:
        c.problem(join(path, "to"), f"topic {output!r} is not declared under topics{suggest(output, list(topics))}")
    where = entry.get("where")
    if where is not None and not isinstance(where, str):
        c.problem(join(path, "where"), f"expected a condition such as \"status >= 400\", got {got(where)}")
    elif where is not None:
        try:
            parse(where)
        except ValueError as exc:
            c.problem(join(path, "where"), str(exc))
    if "join" in entry:
        return _joining(c, entry, path, topics, name, inputs, output, where, before)
    if "window" not in entry and "aggregate" not in entry:  # records passed on: a merge, a filter
        for key in _WINDOWED:
            if key in entry:
                c.problem(join(path, key), f"{key!r} belongs to a windowed aggregation: add window: and aggregate:")
        if c.attempts != before or name is None:
            return None
        return ProcessorSpec(name=name, inputs=list(inputs), output=str(output), key_path=path, where=where)
    keys = entry.get("key", [])
    keys = [keys] if isinstance(keys, str) else keys
    if not isinstance(keys, list) or not all(isinstance(k, str) and _FIELD.fullmatch(k) for k in keys):
        c.problem(join(path, "key"), f"expected a field name or a list of them, got {got(entry.get('key'))}")
        keys = []
    time = entry.get("time")
    if time is not None and (not isinstance(time, str) or not _FIELD.fullmatch(time)):
        c.problem(join(path, "time"), f"expected a field name, got {got(time)}")
    window = _window(c, entry.get("window"), join(path, "window"))
    grace = _duration(c, entry.get("grace", 0), join(path, "grace"), zero=True)
    idle = _duration(c, entry.get("idle_close"), join(path, "idle_close")) if "idle_close" in entry else None
    emit = entry.get("emit", "final")
    if emit not in _EMITS:
        c.problem(join(path, "emit"), f"expected 'final' or 'updates', got {got(emit)}{suggest(str(emit), _EMITS)}")
    aggregates = _aggregates(c, entry.get("aggregate"), join(path, "aggregate"), keys)
    if window is not None and "count" in window and "grace" in entry:
        c.problem(join(path, "grace"), "a count window closes at its last record: grace does not apply to it")
    if c.attempts != before or name is None or window is None or grace is None:
        return None
    return ProcessorSpec(name=name, inputs=list(inputs), output=str(output), keys=list(keys), time=time,
                         window=window, grace=grace, emit=str(emit), idle_close=idle, aggregates=aggregates,
                         key_path=path, where=where)


def _joining(c: Checker, entry: dict, path: str, topics: dict[str, TopicSpec | None], name: str | None,
             inputs: list[str], output: Any, where: str | None, before: int) -> ProcessorSpec | None:
    """`join: {table: T, on: field, fields: [...], how: left | inner}`."""
    for key in _WINDOWED:
        if key in entry:
            c.problem(join(path, key), f"{key!r} does not go with join: (join in one processor, aggregate its output "
                      "in another)")
    value, at = entry["join"], join(path, "join")
    spec = c.mapping(value, at, _JOIN_KEYS, "a join")
    if spec is None:
        return None
    table = spec.get("table")
    if table is None:
        c.problem(join(at, "table"), "missing required key (the table topic: latest value per key)", missing=True)
    elif c.topic_name(table, join(at, "table")) is not None:
        if table not in topics:
            c.problem(join(at, "table"), f"topic {table!r} is not declared under topics{suggest(table, list(topics))}")
        elif table in inputs or table == output:
            c.problem(join(at, "table"), f"topic {table!r} is the processor's input or output already")
    on = spec.get("on")
    if not isinstance(on, str) or not _FIELD.fullmatch(on):
        c.problem(join(at, "on"), f"expected the field whose value is the table's key, got {got(on)}",
                  missing=on is None)
    fields = spec.get("fields")
    if fields is not None and (not isinstance(fields, list) or not fields
                               or not all(isinstance(f, str) and _FIELD.fullmatch(f) for f in fields)):
        c.problem(join(at, "fields"), f"expected a list of the table's fields, got {got(fields)}")
    how = spec.get("how", "left")
    if how not in _HOWS:
        c.problem(join(at, "how"), f"expected 'left' or 'inner', got {got(how)}{suggest(str(how), _HOWS)}")
    retention = _duration(c, spec["retention"], join(at, "retention")) if "retention" in spec else None
    if c.attempts != before or name is None:
        return None
    return ProcessorSpec(name=name, inputs=list(inputs), output=str(output), key_path=path, where=where,
                         join=JoinSpec(table=str(table), on=str(on), fields=list(fields) if fields else None,
                                       how=str(how), retention=retention))


def _window(c: Checker, value: Any, path: str) -> dict[str, int] | None:
    """{"tumbling": ms}, {"hopping": ms, "advance": ms}, {"sliding": ms}, {"session": ms}
    (the gap) or {"count": records}."""
    if not isinstance(value, dict) or not any(k in value for k in _WINDOWS):
        c.problem(path, f"expected one of {_WINDOW_FORMS}, got {got(value)}", missing=value is None)
        return None
    kinds = [k for k in _WINDOWS if k in value]
    c.unknown_keys(value, path, (*kinds, "advance") if "hopping" in kinds else kinds)
    if len(kinds) > 1:
        c.problem(path, f"choose one window: {', '.join(kinds)}")
        return None
    kind = kinds[0]
    if kind == "count":
        n = value[kind]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            c.problem(join(path, kind), f"expected a number of records (1 or more), got {got(n)}")
            return None
        return {"count": n}
    size = _duration(c, value[kind], join(path, kind))
    if size is None:
        return None
    if kind != "hopping":
        return {kind: size}
    advance = _duration(c, value.get("advance"), join(path, "advance"))
    if advance is None:
        return None
    if advance > size:
        c.problem(join(path, "advance"), "a hopping window advances by at most its size (else records fall between "
                  "windows)")
        return None
    return {"hopping": size, "advance": advance}


def _duration(c: Checker, value: Any, path: str, *, zero: bool = False) -> int | None:
    """A duration in ms: "500ms", "30s", "1m", "2h", "1d", "1h30m" (0 where `zero`)."""
    if zero and value in (0, "0"):
        return 0
    try:
        ms = round(parse_duration(value) * 1000) if isinstance(value, str) else None
    except ScheduleError:
        ms = None
    if ms is None or ms <= 0:
        c.problem(path, f"expected a duration like 500ms, 30s, 1m, 2h or 1d, got {got(value)}",
                  missing=value is None)
        return None
    return ms


def _aggregates(c: Checker, value: Any, path: str, keys: list[str]) -> list[tuple[str, str, str | None]]:
    """(output field, function, input field) per `name: function(field)`."""
    if not isinstance(value, dict) or not value:
        c.problem(path, f"expected a mapping of output fields to aggregates, like {{views: count()}}, got {got(value)}",
                  missing=value is None)
        return []
    out = []
    for name, call in value.items():
        where = join(path, name)
        if not isinstance(name, str) or not _FIELD.fullmatch(name):
            c.problem(where, f"expected an output field name (letters, digits, _), got {got(name)}")
            continue
        if name in (*keys, "window_start", "window_end"):
            c.problem(where, f"{name!r} is a key field or window bound of the output already")
            continue
        m = _CALL.fullmatch(call) if isinstance(call, str) else None
        if m is None:
            c.problem(where, f"expected an aggregate like count(), sum(bytes), got {got(call)}")
            continue
        function, field = m.group(1), m.group(2)
        if function not in FUNCTIONS:
            c.problem(where, f"unknown aggregate {function!r}{suggest(function, FUNCTIONS)} "
                      f"(known: {', '.join(f + '()' for f in FUNCTIONS)})")
            continue
        if (function == "count") != (field is None):
            c.problem(where, "count() takes no field" if field else f"{function}() needs a field, as in {function}(bytes)")
            continue
        out.append((name, function, field))
    return out
