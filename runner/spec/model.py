"""What a loaded spec is: plain dataclasses, no behaviour beyond finding a key's line."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from runner.errors import Problem
from runner.schedule import Schedule


@dataclass
class TopicSpec:
    name: str
    partitions: int
    # The Avro schema as written (plain JSON-like dict), not fastavro's parsed form; None
    # for a raw topic (bytes as they are, e.g. mirrored from another cluster).
    schema: dict | None
    key: str | None
    schema_file: pathlib.Path | None  # absolute; None for an inline schema


@dataclass
class TransformSpec:
    """One transform of a chain: `- NAME: {config}`."""

    name: str
    config: dict
    key_path: str  # e.g. "sources[0].transforms[1]"


@dataclass
class ConnectorSpec:
    name: str
    connector: str
    config: dict
    kind: str  # "source" | "sink"
    topic: str | None = None  # sources
    topics: list[str] = field(default_factory=list)  # sinks
    key_path: str = ""  # e.g. "sources[0]" — for error messages
    schedule: Schedule | None = None  # sources: run as a bounded job at each tick
    transforms: list[TransformSpec] = field(default_factory=list)  # applied per batch, in order
    tasks: int = 1  # sources: how many tasks the source may divide its work into (`tasks: N`)


@dataclass
class ProcessorSpec:
    """A processor: its input topics into its output topic, filtered (`where`), and either
    aggregated by window (`window` and `aggregates`), joined with a table (`join`), or
    passed on as they are (a merge of several topics, a filter)."""

    name: str
    inputs: list[str]
    output: str
    key_path: str = ""  # e.g. "processors[0]"
    where: str | None = None  # a condition records must meet (the filter transform's language)
    # An aggregation's (`window` None: none).
    keys: list[str] = field(default_factory=list)  # group-by fields (the output key)
    time: str | None = None  # event-time field; None: the records' topic timestamps
    window: dict[str, int] | None = None  # {"tumbling": ms} or {"hopping": ms, "advance": ms}, ...
    grace: int = 0  # ms
    emit: str = "final"  # "final" | "updates"
    idle_close: int | None = None  # ms
    aggregates: list[tuple[str, str, str | None]] = field(default_factory=list)  # (output field, function, input field)
    join: JoinSpec | None = None

    @property
    def kind(self) -> str:
        """"aggregate", "join" or "pass"."""
        return "aggregate" if self.window is not None else "join" if self.join is not None else "pass"

    @property
    def reads(self) -> list[str]:
        """Every topic it reads: its inputs and its table."""
        return [*self.inputs, *([self.join.table] if self.join is not None else [])]


@dataclass
class JoinSpec:
    """`join: {table: users, on: user, fields: [plan], how: left}`: each record gets the
    `fields` of the table record whose key equals its `on` field (latest value per key)."""

    table: str
    on: str
    fields: list[str] | None  # None: every field of the table
    how: str  # "left" (records without a match keep nulls) | "inner" (they are dropped)
    retention: int | None = None  # ms: a key not updated for this long (by record time) is dropped


@dataclass
class ErrorPolicy:
    tolerance: str = "none"
    dead_letter_topic: str | None = None


@dataclass
class BrokerSpec:
    kind: str = "embedded"
    options: dict = field(default_factory=dict)


@dataclass
class Spec:
    name: str
    path: pathlib.Path  # absolute, so connectors can resolve their own relative paths
    state_dir: pathlib.Path
    broker: BrokerSpec
    topics: dict[str, TopicSpec]
    sources: list[ConnectorSpec]
    sinks: list[ConnectorSpec]
    errors: ErrorPolicy
    lines: dict[str, int]  # key path -> 1-based line
    file: str = ""  # the spec path as given, for messages
    # An external Confluent-compatible registry's options ({url: ..., ...}); None: the
    # embedded registry in the state directory.
    schema_registry: dict | None = None
    # Directories of local plugin modules (absolute), loaded before the connectors are checked.
    plugin_paths: list[pathlib.Path] = field(default_factory=list)
    # What `engine.check_spec` found worth saying but not wrong (a source field the topic
    # lacks, a glob matching nothing): shown by `pipeline validate` and `pipeline run`.
    warnings: list[Problem] = field(default_factory=list)
    processors: list[ProcessorSpec] = field(default_factory=list)

    def line_of(self, key_path: str) -> int | None:
        return line_of(self.lines, key_path)

    def where(self, key_path: str) -> str:
        line = self.line_of(key_path)
        loc = self.file or str(self.path)
        if line is not None:
            loc += f":{line}"
        return f"{loc} {key_path}" if key_path else loc

    def problem(self, key_path: str, message: str, *, level: str = "error") -> Problem:
        """A problem located at `key_path` of this spec (file and line filled in)."""
        return Problem(message, path=key_path, file=self.file or str(self.path),
                       line=self.line_of(key_path), level=level)


_LAST_PART = re.compile(r"(\.[^.\[]*|\[\d+\])$")


def line_of(lines: Mapping[str, int], key_path: str) -> int | None:
    """The line of `key_path`, or of its deepest ancestor that has one."""
    while True:
        if key_path in lines:
            return lines[key_path]
        if not key_path:
            return None
        m = _LAST_PART.search(key_path)
        key_path = key_path[: m.start()] if m else ""


def join(path: str, key: object) -> str:
    """A child's key path: `sources[0]` + `name` -> `sources[0].name`."""
    return f"{path}.{key}" if path else str(key)
