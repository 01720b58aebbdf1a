"""The pipeline spec: a YAML file turned into a validated, typed `Spec`.

Every problem is collected and reported at once (`SpecError`), each with file:line and the
key path it concerns, so a user fixes a spec in one round rather than one error per run.

Loading happens in two passes:
1. The YAML is read with ruamel's round-trip loader (which knows the line of every node)
   and converted to plain Python values, interpolating `${VAR}` / `${VAR:-default}` in
   every string scalar and recording the line of every key path in a line map.
2. The plain values are validated. Problems name a key path; the line map gives the line.
   Connector-specific checks (e.g. a connector's `config:`, its transforms) are delegated
   to a callback whose problems are located through the same line map; the plugins of
   `plugin_paths:` are loaded (by another callback) before those checks, so a spec may use
   connectors from them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
from fastavro.schema import UnknownType
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarbool import ScalarBoolean

from runner.errors import Problem, SpecError
from runner.schedule import Schedule, ScheduleError

__all__ = [
    "BrokerSpec",
    "ConnectorSpec",
    "ErrorPolicy",
    "Spec",
    "TopicSpec",
    "TransformSpec",
    "load_spec",
]


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

    def line_of(self, key_path: str) -> int | None:
        return _line_of(self.lines, key_path)

    def where(self, key_path: str) -> str:
        line = self.line_of(key_path)
        loc = self.file or str(self.path)
        if line is not None:
            loc += f":{line}"
        return f"{loc} {key_path}" if key_path else loc


CheckConnector = Callable[[str, ConnectorSpec, str], list[Problem]]
# Loads the plugin modules of `plugin_paths:`; returns (index of the path, message) problems.
LoadPluginPaths = Callable[[list[pathlib.Path]], list[tuple[int, str]]]

_TOP_KEYS = (
    "name", "state_dir", "broker", "schema_registry", "plugin_paths", "topics", "sources", "sinks", "errors",
)
_TOPIC_KEYS = ("partitions", "schema", "key")
_SOURCE_KEYS = ("name", "connector", "topic", "config", "transforms", "schedule")
_SINK_KEYS = ("name", "connector", "topics", "config", "transforms")
_ERRORS_KEYS = ("tolerance", "dead_letter_topic")
_BROKER_KINDS = ("embedded", "kafka")

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# `$${` is an escaped literal; `${...}` an expression; a lone `${` is unterminated.
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_EXPR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_LAST_PART = re.compile(r"(\.[^.\[]*|\[\d+\])$")
_STR_TAG = "tag:yaml.org,2002:str"
_resolver = VersionedResolver()
_safe_yaml = YAML(typ="safe", pure=True)


def load_spec(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    check_connector: CheckConnector | None = None,
    load_plugin_paths: LoadPluginPaths | None = None,
) -> Spec:
    """Read, interpolate and validate the spec at `path`; raise `SpecError` listing every
    problem found (sorted by line)."""
    file = os.fspath(path)
    abs_path = pathlib.Path(os.path.abspath(file))
    try:
        text = abs_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([Problem(f"cannot read spec: {reason}", file=file)]) from None

    try:
        root = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = e.problem or "invalid YAML"
        if e.context:
            msg += f" ({e.context})"
        line = mark.line + 1 if mark is not None else None
        # `{` is a flow indicator, so an unquoted ${VAR} inside {...} or [...] breaks YAML.
        if line is not None and "${" in "".join(text.splitlines()[line - 1 : line]):
            msg += '; inside {...} or [...] quote ${...} expressions, e.g. "${VAR}"'
        raise SpecError([Problem(f"invalid YAML: {msg}", file=file, line=line)]) from None

    loader = _Loader(file, abs_path.parent, os.environ if env is None else env)
    spec = loader.load(root, abs_path, check_connector, load_plugin_paths)
    if loader.problems or spec is None:
        raise SpecError(loader.finished_problems())
    return spec


def _line_of(lines: Mapping[str, int], key_path: str) -> int | None:
    """The line of `key_path`, or of its deepest ancestor that has one."""
    while True:
        if key_path in lines:
            return lines[key_path]
        if not key_path:
            return None
        m = _LAST_PART.search(key_path)
        key_path = key_path[: m.start()] if m else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _got(value: Any) -> str:
    """How a wrong value is shown in a message, in YAML terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return repr(value)


class _Loader:
    def __init__(self, file: str, base_dir: pathlib.Path, env: Mapping[str, str]) -> None:
        self.file = file
        self.base_dir = base_dir
        self.env = env
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        # Paths whose interpolation failed: their value is meaningless, so further
        # problems about them would only repeat the first one.
        self.muted: set[str] = set()
        self.attempts = 0  # problems found, muted or not: tells whether an entry is sound
        self.names: list[tuple[str, str]] = []  # (name, key path) of sources and sinks
        self.suggested: set[str] = set()  # key paths offered by "did you mean ...?"

    # -- problems ---------------------------------------------------------------------

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
                file=p.file if p.file is not None else self.file,
                line=p.line if p.line is not None else _line_of(self.lines, p.path),
            )
            for p in self.problems
        ]
        # Stable sort: problems on one line keep the order they were found in.
        return sorted(done, key=lambda p: (p.line is None, p.line or 0))

    # -- pass 1: YAML nodes -> plain values, line map, interpolation -----------------------

    def plain(self, node: Any, path: str, line: int) -> Any:
        if isinstance(node, CommentedMap):
            out: dict[Any, Any] = {}
            for k, v in node.items():
                key = self.plain_key(k)
                child = _join(path, key)
                # Keys merged in with `<<: *anchor` have no position of their own.
                pos = node.lc.data.get(k)
                key_line = pos[0] + 1 if pos else line
                value_line = pos[2] + 1 if pos else line
                self.lines.setdefault(child, key_line)
                out[key] = self.plain(v, child, value_line)
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for i, v in enumerate(node):
                child = f"{path}[{i}]"
                pos = node.lc.data.get(i)
                item_line = pos[0] + 1 if pos else line
                self.lines.setdefault(child, item_line)
                items.append(self.plain(v, child, item_line))
            return items
        if isinstance(node, str):
            return self.interpolate(str(node), path, line)
        if isinstance(node, (bool, ScalarBoolean)):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node  # None, dates

    @staticmethod
    def plain_key(key: Any) -> Any:
        if isinstance(key, str):
            return str(key)
        if isinstance(key, (bool, ScalarBoolean)):
            return bool(key)
        if isinstance(key, (int, float)) or key is None:
            return key
        return str(key)  # complex keys: only good for a message

    def interpolate(self, text: str, path: str, line: int) -> Any:
        if "${" not in text:
            return text
        out: list[str] = []
        pos = 0
        failed = False
        for m in _TOKEN.finditer(text):
            out.append(text[pos : m.start()])
            pos = m.end()
            token = m.group(0)
            if token == "$${":
                out.append("${")
                continue
            body = m.group(1)
            expr = _EXPR.fullmatch(body) if body is not None else None
            if expr is None or "${" in (expr.group(2) or ""):
                what = "unterminated ${" if body is None else f"malformed expression {token!r}"
                self.problems.append(
                    Problem(
                        f"{what}; expected ${{NAME}} or ${{NAME:-default}} "
                        "(write $${ for a literal ${, nesting is not supported)",
                        path=path,
                        line=line,
                    )
                )
                failed = True
                continue
            name, default = expr.group(1), expr.group(2)
            value = self.env.get(name)
            if not value and default is not None:  # like the shell: unset or empty
                value = default
            if value is None:
                self.problems.append(
                    Problem(
                        f"environment variable {name!r} is not set "
                        f"(set it, or give a default: ${{{name}:-default}})",
                        path=path,
                        line=line,
                    )
                )
                failed = True
                continue
            out.append(value)
        out.append(text[pos:])
        if failed:
            self.muted.add(path)
            return text
        result = "".join(out)
        whole = _TOKEN.fullmatch(text)
        # Quoted scalars are re-typed too: inside {...} a ${...} must be quoted, and
        # `{partitions: "${PARTS:-4}"}` should still give an int.
        if whole is not None and whole.group(1) is not None:
            return _retype(result)
        return result

    # -- pass 2: validation -------------------------------------------------------------

    def load(
        self,
        root: Any,
        abs_path: pathlib.Path,
        check_connector: CheckConnector | None,
        load_plugin_paths: LoadPluginPaths | None = None,
    ) -> Spec | None:
        root_line = root.lc.line + 1 if isinstance(root, (CommentedMap, CommentedSeq)) else 1
        self.lines[""] = root_line
        doc = self.plain(root, "", root_line)
        if doc is None:
            self.problem("", "the spec is empty; expected a mapping with name, topics, "
                         "sources and sinks")
            return None
        if not isinstance(doc, dict):
            self.problem("", f"expected a mapping at the top level, got {_got(doc)}")
            return None
        self.unknown_keys(doc, "", _TOP_KEYS)

        name = self.name(doc.get("name"), "name", required=True)
        topics = self.topics(doc.get("topics"))
        errors = self.errors(doc.get("errors"), name, topics)
        dlq = errors.dead_letter_topic if errors else None
        sources = self.connectors("source", doc.get("sources"), topics, dlq)
        sinks = self.connectors("sink", doc.get("sinks"), topics, dlq)
        if not doc.get("sources") and not doc.get("sinks"):
            self.problem("", "nothing to run: declare at least one source or sink")
        self.unique_names()
        broker = self.broker(doc.get("broker"))
        registry = self.schema_registry(doc.get("schema_registry"))
        state_dir = self.state_dir(doc.get("state_dir"), name)
        plugin_paths = self.plugin_paths(doc.get("plugin_paths"))
        if load_plugin_paths is not None and plugin_paths:
            for index, message in load_plugin_paths(plugin_paths):
                self.problem(f"plugin_paths[{index}]", message)

        if check_connector is not None:
            for entry in sources + sinks:
                if entry is None:
                    continue
                for p in check_connector(entry.kind, entry, entry.key_path):
                    if not p.path:  # a problem with the entry as a whole
                        p = dataclasses.replace(p, path=entry.key_path)
                    self.problems.append(p)

        if self.problems:
            return None
        assert name is not None and errors is not None and broker is not None
        assert state_dir is not None
        return Spec(
            name=name,
            path=abs_path,
            state_dir=state_dir,
            broker=broker,
            schema_registry=registry,
            topics={t.name: t for t in topics.values() if t is not None},
            sources=[s for s in sources if s is not None],
            sinks=[s for s in sinks if s is not None],
            errors=errors,
            lines=self.lines,
            file=self.file,
            plugin_paths=plugin_paths,
        )

    def unknown_keys(self, mapping: dict, path: str, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
                self.suggested.add(_join(path, close[0]))
            elif allowed:
                hint = f" (expected one of: {', '.join(allowed)})"
            else:
                hint = " (no keys are allowed here)"
            self.problem(_join(path, key), f"unknown key {key!r}{hint}")

    def mapping(self, value: Any, path: str, allowed: Sequence[str], what: str) -> dict | None:
        """`value` as a mapping with only `allowed` keys (null counts as empty)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected {what} (a mapping), got {_got(value)}")
            return None
        self.unknown_keys(value, path, allowed)
        return value

    def name(self, value: Any, path: str, *, required: bool) -> str | None:
        if value is None:
            if required:
                self.problem(
                    path, "missing required key (a name of letters, digits, '.', '_', '-')",
                    missing=True,
                )
            return None
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.problem(
                path, f"expected a name of letters, digits, '.', '_', '-', got {_got(value)}"
            )
            return None
        return value

    def topic_name(self, value: Any, path: str) -> str | None:
        if (
            not isinstance(value, str)
            or not _TOPIC_NAME.fullmatch(value)
            or value in (".", "..")
        ):
            self.problem(
                path,
                "expected a topic name of 1 to 249 letters, digits, '.', '_', '-' "
                f"(not '.' or '..'), got {_got(value)}",
            )
            return None
        return value

    # -- topics ---------------------------------------------------------------------------

    def topics(self, value: Any) -> dict[str, TopicSpec | None]:
        """Every declared topic name, mapped to its spec (None where the entry is invalid:
        it still counts as declared, so references to it are not reported again)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem("topics", f"expected a mapping of topic name to topic, got {_got(value)}")
            return {}
        out: dict[str, TopicSpec | None] = {}
        for raw_name, entry in value.items():
            path = _join("topics", raw_name)
            name = self.topic_name(raw_name, path)
            if name is None:
                continue
            out[name] = self.topic(name, entry, path)
        return out

    def topic(self, name: str, value: Any, path: str) -> TopicSpec | None:
        entry = self.mapping(value, path, _TOPIC_KEYS, "a topic")
        if entry is None:
            return None
        ok = True
        partitions = entry.get("partitions", 1)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            self.problem(f"{path}.partitions", f"expected an integer >= 1, got {_got(partitions)}")
            ok = False
        # No schema: a raw topic, read only by sinks that take bytes (`wants = "raw"`).
        raw = "schema" not in entry
        schema, schema_file = (None, None) if raw else self.schema(entry.get("schema"), f"{path}.schema")
        key = entry.get("key")
        if key is not None and not isinstance(key, str):
            self.problem(f"{path}.key", f"expected a field name, got {_got(key)}")
            ok = False
        elif key is not None and schema is not None:
            fields = [f.get("name") for f in schema.get("fields", []) if isinstance(f, dict)]
            if key not in fields:
                self.problem(
                    f"{path}.key",
                    f"{key!r} is not a field of record {schema.get('name')!r} "
                    f"(fields: {', '.join(map(str, fields)) or 'none'})",
                )
                ok = False
        elif key is not None and raw:
            self.problem(f"{path}.key", "a raw topic (no schema) has no fields to key by")
            ok = False
        if not ok or (schema is None and not raw):
            return None
        return TopicSpec(name, partitions, schema, key, schema_file)

    def schema(self, value: Any, path: str) -> tuple[dict | None, pathlib.Path | None]:
        """Load and check a topic's Avro schema: a .avsc path or an inline mapping."""
        schema_file: pathlib.Path | None = None
        if value is None:
            self.problem(path, "missing required key (a path to a .avsc file, or an inline "
                         "Avro record schema)", missing=True)
            return None, None
        if isinstance(value, str):
            schema_file = pathlib.Path(
                os.path.abspath(self.base_dir / pathlib.Path(value).expanduser())
            )
            try:
                schema = json.loads(schema_file.read_text(encoding="utf-8"))
            except FileNotFoundError:
                self.problem(path, f"schema file not found: {schema_file}")
                return None, None
            except json.JSONDecodeError as e:
                self.problem(path, f"{schema_file}: invalid JSON: {e.msg} at line {e.lineno} "
                             f"column {e.colno}")
                return None, None
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self.problem(path, f"cannot read schema file {schema_file}: {reason}")
                return None, None
            where = f" in {schema_file}"
        elif isinstance(value, dict):
            schema, where = value, ""
        else:
            self.problem(path, "expected a path to a .avsc file or an inline Avro schema "
                         f"(a mapping), got {_got(value)}")
            return None, None
        try:
            # A fresh named_schemas: each topic's schema must stand on its own.
            fastavro.parse_schema(copy.deepcopy(schema), named_schemas={})
        except UnknownType as e:
            self.problem(path, f"invalid Avro schema{where}: unknown type {e.name!r}")
            return None, None
        except Exception as e:  # fastavro raises several types; its message is what counts
            self.problem(path, f"invalid Avro schema{where}: {e}")
            return None, None
        if not isinstance(schema, dict) or schema.get("type") != "record":
            kind = schema.get("type") if isinstance(schema, dict) else schema
            self.problem(path, f"expected an Avro record schema{where}, got type {_got(kind)}")
            return None, None
        return schema, schema_file

    # -- errors, broker, state_dir ------------------------------------------------------------

    def errors(
        self, value: Any, name: str | None, topics: Mapping[str, TopicSpec | None]
    ) -> ErrorPolicy | None:
        """The error policy; returned even when partly invalid (problems are reported), so
        that sinks reading the dead-letter topic are not reported as well."""
        entry = self.mapping(value, "errors", _ERRORS_KEYS, "an error policy")
        if entry is None:
            return None
        tolerance = entry.get("tolerance", "none")
        if tolerance not in ("none", "all"):
            self.problem("errors.tolerance", f"expected 'none' or 'all', got {_got(tolerance)}")
        dlq = entry.get("dead_letter_topic")
        if dlq is not None:
            dlq = self.topic_name(dlq, "errors.dead_letter_topic")
        elif tolerance == "all" and name is not None:
            dlq = f"{name}-dlq"
        if dlq is not None and dlq in topics:
            self.problem(
                _join("topics", dlq),
                f"{dlq!r} is the dead-letter topic (errors.dead_letter_topic); it has a "
                "built-in schema, so it must not be declared under topics",
            )
        return ErrorPolicy(str(tolerance), dlq)

    def broker(self, value: Any) -> BrokerSpec | None:
        expected = (
            "expected 'embedded', {embedded: {}} or {kafka: {bootstrap_servers: \"host:9092\"}}"
        )
        if value is None or value == "embedded":
            return BrokerSpec("embedded")
        if value == "kafka":
            self.problem("broker", "kafka needs options: write "
                         "broker: {kafka: {bootstrap_servers: \"host:9092\"}}")
            return None
        if not isinstance(value, dict):
            self.problem("broker", f"{expected}, got {_got(value)}")
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
            self.problem(path, "expected kafka options (a mapping with bootstrap_servers), "
                         f"got {_got(options)}")
            return None
        servers = options.get("bootstrap_servers")
        if not isinstance(servers, str) or not servers.strip():
            self.problem(f"{path}.bootstrap_servers", "expected a string like "
                         f"\"host1:9092,host2:9092\", got {_got(servers)}")
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
            self.problem("schema_registry", "expected {url: \"http://host:8081\", ...} or a URL, "
                         f"got {_got(value)}")
            return None
        return dict(value)

    def state_dir(self, value: Any, name: str | None) -> pathlib.Path | None:
        if value is None:
            return self.base_dir / ".pipeline" / name if name is not None else None
        if not isinstance(value, str) or not value:
            self.problem("state_dir", f"expected a directory path, got {_got(value)}")
            return None
        return pathlib.Path(os.path.abspath(self.base_dir / pathlib.Path(value).expanduser()))

    def plugin_paths(self, value: Any) -> list[pathlib.Path]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problem("plugin_paths", f"expected a list of directories, got {_got(value)}")
            return []
        paths = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.problem(f"plugin_paths[{i}]", f"expected a directory path, got {_got(item)}")
                continue
            path = pathlib.Path(os.path.abspath(self.base_dir / pathlib.Path(item).expanduser()))
            if not path.is_dir():
                self.problem(f"plugin_paths[{i}]", f"no such directory: {path}")
                continue
            paths.append(path)
        return paths

    # -- sources and sinks ------------------------------------------------------------------

    def connectors(
        self,
        kind: str,
        value: Any,
        topics: Mapping[str, TopicSpec | None],
        dlq: str | None,
    ) -> list[ConnectorSpec | None]:
        """One entry per list item; None where the item is not well-formed."""
        key = f"{kind}s"
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected a list of {key}, got {_got(value)}")
            return []
        return [
            self.connector(kind, item, f"{key}[{i}]", topics, dlq)
            for i, item in enumerate(value)
        ]

    def connector(
        self,
        kind: str,
        value: Any,
        path: str,
        topics: Mapping[str, TopicSpec | None],
        dlq: str | None,
    ) -> ConnectorSpec | None:
        allowed = _SOURCE_KEYS if kind == "source" else _SINK_KEYS
        entry = self.mapping(value, path, allowed, f"a {kind}")
        if entry is None:
            return None
        before = self.attempts
        name = self.name(entry.get("name"), f"{path}.name", required=True)
        if name is not None:
            self.names.append((name, path))
        connector = entry.get("connector")
        if not isinstance(connector, str) or not connector:
            what = "missing required key" if connector is None else f"got {_got(connector)}"
            self.problem(f"{path}.connector", f"expected a connector name; {what}",
                         missing=connector is None)
        config = entry.get("config")
        if config is None:
            config = {}
        elif not isinstance(config, dict):
            self.problem(f"{path}.config", f"expected a mapping, got {_got(config)}")
        # Problems with the topics below do not stop the connector's own checks: every
        # problem of the spec is reported at once.
        core_ok = self.attempts == before

        topic: str | None = None
        topic_list: list[str] = []
        if kind == "source":
            topic = entry.get("topic")
            if not isinstance(topic, str):
                what = "missing required key" if topic is None else f"got {_got(topic)}"
                self.problem(f"{path}.topic", f"expected the name of a declared topic; {what}",
                             missing=topic is None)
            elif topic == dlq:
                self.problem(f"{path}.topic", f"{topic!r} is the dead-letter topic; only sinks "
                             "may use it")
            else:
                self.declared(topic, f"{path}.topic", topics, None)
                if topics.get(topic) is not None and topics[topic].schema is None:
                    self.problem(f"{path}.topic", f"topic {topic!r} has no schema; a source "
                                 "writes schema-checked records, so give the topic a schema")
        else:
            raw = entry.get("topics")
            is_list = isinstance(raw, list)
            if isinstance(raw, str):
                raw = [raw]  # a single topic needs no list
            if not isinstance(raw, list) or not raw:
                what = "missing required key" if raw is None else f"got {_got(raw)}"
                self.problem(f"{path}.topics",
                             f"expected a list of declared topic names; {what}",
                             missing=raw is None)
            else:
                for i, t in enumerate(raw):
                    tpath = f"{path}.topics[{i}]" if is_list else f"{path}.topics"
                    if not isinstance(t, str):
                        self.problem(tpath, f"expected a topic name, got {_got(t)}")
                    elif t in topic_list:
                        self.problem(tpath, f"topic {t!r} is listed twice")
                    else:
                        self.declared(t, tpath, topics, dlq)
                        topic_list.append(t)

        schedule = None
        if kind == "source" and entry.get("schedule") is not None:
            try:
                schedule = Schedule.parse(entry["schedule"])
            except ScheduleError as exc:
                self.problem(f"{path}.schedule", str(exc))

        transforms = self.transforms(entry.get("transforms"), f"{path}.transforms")

        core = (f"{path}.connector", f"{path}.config", f"{path}.transforms")
        tainted = any(m == path or m.startswith(core) for m in self.muted)
        if not core_ok or name is None or tainted:
            return None
        return ConnectorSpec(
            name=name,
            connector=connector,
            config=config,
            kind=kind,
            topic=topic,
            topics=topic_list,
            key_path=path,
            schedule=schedule,
            transforms=transforms,
        )

    def transforms(self, value: Any, path: str) -> list[TransformSpec]:
        """A chain: a list of single-key mappings, `- NAME: {config}` (or just `- NAME`)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(path, f"expected a list of transforms (`- NAME: {{config}}`), got {_got(value)}")
            return []
        chain = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if isinstance(item, str) and item:
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                self.problem(item_path, f"expected one transform as `NAME: {{config}}`, got {_got(item)}")
                continue
            ((name, config),) = item.items()
            if config is None:
                config = {}
            if not isinstance(config, dict):
                self.problem(_join(item_path, name), f"expected the transform's config (a mapping), got {_got(config)}")
                continue
            chain.append(TransformSpec(str(name), config, item_path))
        return chain

    def declared(
        self, topic: str, path: str, topics: Mapping[str, TopicSpec | None], dlq: str | None
    ) -> None:
        if topic in topics or topic == dlq:
            return
        known = ", ".join(topics) or "none"
        close = difflib.get_close_matches(topic, list(topics), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (declared: {known})"
        self.problem(path, f"topic {topic!r} is not declared under topics{hint}")

    def unique_names(self) -> None:
        seen: dict[str, str] = {}
        for name, path in self.names:
            first = seen.setdefault(name, path)
            if first != path:
                self.problem(
                    f"{path}.name",
                    f"name {name!r} is already used by {first} "
                    f"(line {_line_of(self.lines, first)}); source and sink names must be unique",
                )


def _retype(text: str) -> Any:
    """Re-resolve substituted text as a plain YAML scalar (int, float, bool, null, date),
    as if it had been written in place of the `${...}` expression."""
    if not text:
        return text  # an empty substitution stays an empty string rather than null
    if text.lstrip()[:1] in ("{", "["):
        # A flow mapping or list, e.g. PIPELINE_BROKER='{kafka: {bootstrap_servers: "k:9092"}}'.
        try:
            return _safe_yaml.load(text)
        except Exception:
            return text  # not YAML after all: the checks report the text where it is used
    if _resolver.resolve(ScalarNode, text, (True, False)) == _STR_TAG:
        return text
    try:
        return _safe_yaml.load(text)
    except Exception:  # e.g. "2024-13-45" looks like a date but is none: keep the text
        return text
