"""Checking a read spec: every problem at once, each at its key path.

`Checker` holds what the checks share (the document's lines, the problems found, the paths
already reported) and the checks of the spec's top level: name, errors, broker, schema
registry, state directory and plugin paths. Topics and their schemas are checked in
`topics.py`, sources and sinks in `entries.py`. Connector-specific checks (a connector's
`config:`, its transforms) are delegated to a callback from the engine, whose problems are
located through the same line map.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from runner.errors import Problem, suggest
from runner.spec.model import BrokerSpec, ConnectorSpec, ErrorPolicy, ProcessorSpec, Spec, TopicSpec, join, line_of
from runner.spec.reading import Document

CheckConnector = Callable[[str, ConnectorSpec, str], list[Problem]]
# Loads the plugin modules of `plugin_paths:`; returns (index of the path, message) problems.
LoadPluginPaths = Callable[[list[pathlib.Path]], list[tuple[int, str]]]

TOP_KEYS = (
    "name", "state_dir", "broker", "schema_registry", "plugin_paths", "topics", "sources", "sinks", "processors",
    "errors",
)
_ERRORS_KEYS = ("tolerance", "dead_letter_topic")
_TOLERANCES = ("none", "all")
_BROKER_KINDS = ("embedded", "kafka")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def got(value: Any) -> str:
    """How a wrong value is shown in a message, in YAML terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return repr(str(value) if isinstance(value, str) else value)


class Checker:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.base_dir = doc.path.parent
        self.problems: list[Problem] = list(doc.problems)
        self.attempts = 0  # problems found, muted or not: tells whether an entry is sound
        self.names: list[tuple[str, str]] = []  # (name, key path) of sources and sinks
        self.suggested: set[str] = set()  # key paths offered by "did you mean ...?"

    @property
    def muted(self) -> set[str]:
        return self.doc.muted

    def problem(self, path: str, message: str, *, missing: bool = False) -> None:
        """Report a problem at `path`; `missing` says it is about a required key being
        absent, which goes unsaid when a misspelt key was already pointed at it."""
        self.attempts += 1
        if path in self.muted or (missing and path in self.suggested):
            return
        self.problems.append(Problem(message, path=path))

    def finished_problems(self) -> list[Problem]:
        done = [
            dataclasses.replace(
                p,
                file=p.file if p.file is not None else self.doc.file,
                line=p.line if p.line is not None else line_of(self.doc.lines, p.path),
            )
            for p in self.problems
        ]
        # Stable sort: problems on one line keep the order they were found in.
        return sorted(done, key=lambda p: (p.line is None, p.line or 0))

    def path_of(self, value: str) -> pathlib.Path:
        """A path of the spec, absolute (relative ones are relative to the spec's directory)."""
        return pathlib.Path(os.path.abspath(self.base_dir / pathlib.Path(value).expanduser()))

    # -- shapes every part uses --------------------------------------------------------

    def unknown_keys(self, mapping: dict, path: str, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key in allowed:
                continue
            hint = suggest(str(key), allowed)
            if hint:
                self.suggested.add(join(path, hint.split("'")[1]))
            elif allowed:
                hint = f" (expected one of: {', '.join(allowed)})"
            else:
                hint = " (no keys are allowed here)"
            self.problem(join(path, key), f"unknown key {key!r}{hint}")

    def mapping(self, value: Any, path: str, allowed: Sequence[str], what: str) -> dict | None:
        """`value` as a mapping with only `allowed` keys (null counts as empty)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected {what} (a mapping), got {got(value)}")
            return None
        self.unknown_keys(value, path, allowed)
        return value

    def name(self, value: Any, path: str, *, required: bool) -> str | None:
        if value is None:
            if required:
                self.problem(path, "missing required key (a name of letters, digits, '.', '_', '-')",
                             missing=True)
            return None
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.problem(path, f"expected a name of letters, digits, '.', '_', '-', got {got(value)}")
            return None
        return str(value)

    def topic_name(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
            self.problem(path, "expected a topic name of 1 to 249 letters, digits, '.', '_', '-' "
                         f"(not '.' or '..'), got {got(value)}")
            return None
        return str(value)

    # -- the top level ---------------------------------------------------------------------

    def errors(self, value: Any, name: str | None, topics: dict[str, TopicSpec | None]) -> ErrorPolicy | None:
        """The error policy; returned even when partly invalid (problems are reported), so
        that sinks reading the dead-letter topic are not reported as well."""
        entry = self.mapping(value, "errors", _ERRORS_KEYS, "an error policy")
        if entry is None:
            return None
        tolerance = entry.get("tolerance", "none")
        if tolerance not in _TOLERANCES:
            self.problem("errors.tolerance", f"expected 'none' or 'all', got {got(tolerance)}"
                         f"{suggest(tolerance, _TOLERANCES)}")
        dlq = entry.get("dead_letter_topic")
        if dlq is not None:
            dlq = self.topic_name(dlq, "errors.dead_letter_topic")
        elif tolerance == "all" and name is not None:
            dlq = f"{name}-dlq"
        if dlq is not None and dlq in topics:
            self.problem(join("topics", dlq), f"{dlq!r} is the dead-letter topic (errors.dead_letter_topic); "
                         "it has a built-in schema, so it must not be declared under topics")
        return ErrorPolicy(str(tolerance), dlq)

    def broker(self, value: Any) -> BrokerSpec | None:
        expected = "expected 'embedded', {embedded: {}} or {kafka: {bootstrap_servers: \"host:9092\"}}"
        if value is None or value == "embedded":
            return BrokerSpec("embedded")
        if value == "kafka":
            self.problem("broker", "kafka needs options: write broker: {kafka: {bootstrap_servers: \"host:9092\"}}")
            return None
        if not isinstance(value, dict):
            self.problem("broker", f"{expected}, got {got(value)}{suggest(value, _BROKER_KINDS)}")
            return None
        self.unknown_keys(value, "broker", _BROKER_KINDS)
        kinds = [k for k in _BROKER_KINDS if k in value]
        if len(kinds) != 1:
            if not kinds and not value:
                self.problem("broker", f"{expected}, got an empty mapping")
            elif len(kinds) > 1:
                self.problem("broker", "choose one broker: embedded or kafka, not both")
            return None
        kind = kinds[0]
        path = f"broker.{kind}"
        if kind == "embedded":
            options = self.mapping(value[kind], path, (), "embedded broker options")
            return BrokerSpec("embedded", dict(options)) if options is not None else None
        options = value[kind]
        if not isinstance(options, dict):
            self.problem(path, f"expected kafka options (a mapping with bootstrap_servers), got {got(options)}")
            return None
        servers = options.get("bootstrap_servers")
        if not isinstance(servers, str) or not servers.strip():
            self.problem(f"{path}.bootstrap_servers", f"expected a string like \"host1:9092,host2:9092\", "
                         f"got {got(servers)}")
            return None
        return BrokerSpec("kafka", dict(options))

    def schema_registry(self, value: Any) -> dict | None:
        """`schema_registry: {url: ...}` (or just the URL); the options' types are checked
        by the engine, as the broker's are."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return {"url": value}
        if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not value["url"].strip():
            self.problem("schema_registry", f"expected {{url: \"http://host:8081\", ...}} or a URL, got {got(value)}")
            return None
        return dict(value)

    def state_dir(self, value: Any, name: str | None) -> pathlib.Path | None:
        if value is None:
            return self.base_dir / ".pipeline" / name if name is not None else None
        if not isinstance(value, str) or not value:
            self.problem("state_dir", f"expected a directory path, got {got(value)}")
            return None
        return self.path_of(value)

    def plugin_paths(self, value: Any) -> list[pathlib.Path]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problem("plugin_paths", f"expected a list of directories, got {got(value)}")
            return []
        paths = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.problem(f"plugin_paths[{i}]", f"expected a directory path, got {got(item)}")
                continue
            path = self.path_of(item)
            if not path.is_dir():
                self.problem(f"plugin_paths[{i}]", f"no such directory: {path}")
                continue
            paths.append(path)
        return paths


def check(doc: Document, check_connector: CheckConnector | None,
          load_plugin_paths: LoadPluginPaths | None) -> tuple[Spec | None, list[Problem]]:
    """The spec of a read document, or None and every problem found (sorted by line)."""
    from runner.spec.entries import check_entries, unique_names
    from runner.spec.processors import check_processors
    from runner.spec.topics import check_topics

    c = Checker(doc)
    root = doc.root
    if root is None:
        c.problem("", "the spec is empty; expected a mapping with name, topics, sources and sinks")
        return None, c.finished_problems()
    if not isinstance(root, dict):
        c.problem("", f"expected a mapping at the top level, got {got(root)}")
        return None, c.finished_problems()
    c.unknown_keys(root, "", TOP_KEYS)

    name = c.name(root.get("name"), "name", required=True)
    topics = check_topics(c, root.get("topics"))
    errors = c.errors(root.get("errors"), name, topics)
    dlq = errors.dead_letter_topic if errors else None
    sources = check_entries(c, "source", root.get("sources"), topics, dlq)
    sinks = check_entries(c, "sink", root.get("sinks"), topics, dlq)
    processors = check_processors(c, root.get("processors"), topics)
    if not root.get("sources") and not root.get("sinks") and not root.get("processors"):
        c.problem("", "nothing to run: declare at least one source or sink")
    _refuse_cycles(c, [p for p in processors if p is not None])
    unique_names(c)
    broker = c.broker(root.get("broker"))
    registry = c.schema_registry(root.get("schema_registry"))
    state_dir = c.state_dir(root.get("state_dir"), name)
    plugin_paths = c.plugin_paths(root.get("plugin_paths"))
    if load_plugin_paths is not None and plugin_paths:
        for index, message in load_plugin_paths(plugin_paths):
            c.problem(f"plugin_paths[{index}]", message)

    if check_connector is not None:
        for entry in sources + sinks:
            if entry is None:
                continue
            for p in check_connector(entry.kind, entry, entry.key_path):
                if not p.path:  # a problem with the entry as a whole
                    p = dataclasses.replace(p, path=entry.key_path)
                c.problems.append(p)

    if c.problems or name is None or errors is None or broker is None or state_dir is None:
        return None, c.finished_problems()
    return Spec(
        name=name,
        path=doc.path,
        state_dir=state_dir,
        broker=broker,
        schema_registry=registry,
        topics={t.name: t for t in topics.values() if t is not None},
        sources=[s for s in sources if s is not None],
        sinks=[s for s in sinks if s is not None],
        errors=errors,
        lines=doc.lines,
        file=doc.file,
        plugin_paths=plugin_paths,
        processors=[p for p in processors if p is not None],
    ), []


def _refuse_cycles(c: Checker, processors: list[ProcessorSpec]) -> None:
    """Processors that feed their own input, through others or directly."""
    feeds = {p.output: p for p in processors}
    for p in processors:
        seen, todo = set(), list(p.reads)
        while todo:
            topic = todo.pop()
            if topic in seen or topic not in feeds:
                continue
            seen.add(topic)
            if feeds[topic] is p:
                c.problem(join(p.key_path, "from"), f"processor {p.name!r} reads what it writes, through "
                          f"{topic!r} (a cycle)")
                break
            todo += feeds[topic].reads
