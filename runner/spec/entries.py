"""Checking `sources:` and `sinks:`: names, connectors, the topics they reference,
schedules and transform chains. A connector's own `config:` is checked by the engine's
callback (see `checking.check`), with the connector's typed Config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runner.errors import suggest
from runner.schedule import Schedule, ScheduleError
from runner.spec.checking import Checker, got
from runner.spec.environment import typed
from runner.spec.model import ConnectorSpec, TopicSpec, TransformSpec, join, line_of

_SOURCE_KEYS = ("name", "connector", "topic", "config", "transforms", "schedule", "tasks")
_SINK_KEYS = ("name", "connector", "topics", "config", "transforms")
MAX_TASKS = 256

Topics = Mapping[str, TopicSpec | None]


def check_entries(c: Checker, kind: str, value: Any, topics: Topics, dlq: str | None) -> list[ConnectorSpec | None]:
    """One entry per list item; None where the item is not well-formed."""
    key = f"{kind}s"
    if value is None:
        return []
    if not isinstance(value, list):
        c.problem(key, f"expected a list of {key}, got {got(value)}")
        return []
    return [_entry(c, kind, item, f"{key}[{i}]", topics, dlq) for i, item in enumerate(value)]


def _entry(c: Checker, kind: str, value: Any, path: str, topics: Topics, dlq: str | None) -> ConnectorSpec | None:
    entry = c.mapping(value, path, _SOURCE_KEYS if kind == "source" else _SINK_KEYS, f"a {kind}")
    if entry is None:
        return None
    before = c.attempts
    name = c.name(entry.get("name"), f"{path}.name", required=True)
    if name is not None:
        c.names.append((name, path))
    connector = entry.get("connector")
    if not isinstance(connector, str) or not connector:
        what = "missing required key" if connector is None else f"got {got(connector)}"
        c.problem(f"{path}.connector", f"expected a connector name; {what}", missing=connector is None)
    config = entry.get("config")
    if config is None:
        config = {}
    elif not isinstance(config, dict):
        c.problem(f"{path}.config", f"expected a mapping, got {got(config)}")
    # Problems with the topics below do not stop the connector's own checks: every
    # problem of the spec is reported at once.
    core_ok = c.attempts == before

    topic: str | None = None
    topic_list: list[str] = []
    if kind == "source":
        topic = _source_topic(c, entry.get("topic"), f"{path}.topic", topics, dlq)
    else:
        topic_list = _sink_topics(c, entry.get("topics"), f"{path}.topics", topics, dlq)

    schedule = None
    if kind == "source" and entry.get("schedule") is not None:
        try:
            schedule = Schedule.parse(typed(entry["schedule"]))
        except ScheduleError as exc:
            c.problem(f"{path}.schedule", str(exc))

    tasks = _tasks(c, entry.get("tasks"), f"{path}.tasks") if kind == "source" else 1

    transforms = _transforms(c, entry.get("transforms"), f"{path}.transforms")

    core = (f"{path}.connector", f"{path}.config", f"{path}.transforms")
    tainted = any(m == path or m.startswith(core) for m in c.muted)
    if not core_ok or name is None or tainted:
        return None
    return ConnectorSpec(name=name, connector=str(connector), config=config, kind=kind, topic=topic,
                         topics=topic_list, key_path=path, schedule=schedule, transforms=transforms, tasks=tasks)


def _source_topic(c: Checker, topic: Any, path: str, topics: Topics, dlq: str | None) -> str | None:
    if not isinstance(topic, str):
        what = "missing required key" if topic is None else f"got {got(topic)}"
        c.problem(path, f"expected the name of a declared topic; {what}", missing=topic is None)
        return None
    topic = str(topic)
    if topic == dlq:
        c.problem(path, f"{topic!r} is the dead-letter topic; only sinks may use it")
        return topic
    _declared(c, topic, path, topics, None)
    if topics.get(topic) is not None and topics[topic].schema is None:
        c.problem(path, f"topic {topic!r} has no schema; a source writes schema-checked records, "
                  "so give the topic a schema")
    return topic


def _sink_topics(c: Checker, raw: Any, path: str, topics: Topics, dlq: str | None) -> list[str]:
    is_list = isinstance(raw, list)
    if isinstance(raw, str):
        raw = [raw]  # a single topic needs no list
    if not isinstance(raw, list) or not raw:
        what = "missing required key" if raw is None else f"got {got(raw)}"
        c.problem(path, f"expected a list of declared topic names; {what}", missing=raw is None)
        return []
    out: list[str] = []
    for i, t in enumerate(raw):
        tpath = f"{path}[{i}]" if is_list else path
        if not isinstance(t, str):
            c.problem(tpath, f"expected a topic name, got {got(t)}")
        elif t in out:
            c.problem(tpath, f"topic {t!r} is listed twice")
        else:
            _declared(c, t, tpath, topics, dlq)
            out.append(str(t))
    return out


def _tasks(c: Checker, value: Any, path: str) -> int:
    """`tasks: N`: how many tasks the source may split its work into (Kafka Connect's
    tasks.max); 1 when absent or wrong (the problem is reported)."""
    if value is None:
        return 1
    value = typed(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TASKS:
        c.problem(path, f"expected an integer from 1 to {MAX_TASKS}, got {got(value)}")
        return 1
    return value


def _transforms(c: Checker, value: Any, path: str) -> list[TransformSpec]:
    """A chain: a list of single-key mappings, `- NAME: {config}` (or just `- NAME`)."""
    if value is None:
        return []
    if not isinstance(value, list):
        c.problem(path, f"expected a list of transforms (`- NAME: {{config}}`), got {got(value)}")
        return []
    chain = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and item:
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            c.problem(item_path, f"expected one transform as `NAME: {{config}}`, got {got(item)}")
            continue
        ((name, config),) = item.items()
        if config is None:
            config = {}
        if not isinstance(config, dict):
            c.problem(join(item_path, name), f"expected the transform's config (a mapping), got {got(config)}")
            continue
        chain.append(TransformSpec(str(name), config, item_path))
    return chain


def _declared(c: Checker, topic: str, path: str, topics: Topics, dlq: str | None) -> None:
    if topic in topics or topic == dlq:
        return
    hint = suggest(topic, list(topics)) or f" (declared: {', '.join(topics) or 'none'})"
    c.problem(path, f"topic {topic!r} is not declared under topics{hint}")


def unique_names(c: Checker) -> None:
    seen: dict[str, str] = {}
    for name, path in c.names:
        first = seen.setdefault(name, path)
        if first != path:
            c.problem(f"{path}.name", f"name {name!r} is already used by {first} "
                      f"(line {line_of(c.doc.lines, first)}); source and sink names must be unique")
