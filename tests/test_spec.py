"""Tests for runner.spec: YAML spec -> validated Spec, every problem at once with lines."""

from __future__ import annotations

import json
import pathlib
import textwrap
from typing import Any

import pytest

from runner.config import Config, setting

from runner.errors import Problem, SpecError
from runner.spec import BrokerSpec, ConnectorSpec, ErrorPolicy, Spec, load_spec

ACTIVITY_SCHEMA = {
    "type": "record",
    "name": "Activity",
    "fields": [
        {"name": "remote_host", "type": "string"},
        {"name": "path", "type": "string"},
        {"name": "status", "type": "int"},
    ],
}


def write(tmp_path: pathlib.Path, text: str, name: str = "spec.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def write_schema(tmp_path: pathlib.Path, schema: object = ACTIVITY_SCHEMA,
                 name: str = "schemas/activity.avsc") -> pathlib.Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return path


def problems(path: pathlib.Path, **kwargs: object) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        load_spec(path, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def summary(ps: list[Problem]) -> list[tuple[int | None, str]]:
    return [(p.line, p.path) for p in ps]


# A minimal valid spec with an inline schema; tests change one thing in it.
MINIMAL = """
name: demo
topics:
  events:
    schema: {type: record, name: Event, fields: [{name: id, type: long}]}
sources:
  - name: gen
    connector: generator
    topic: events
"""


def test_full_valid_spec(tmp_path: pathlib.Path) -> None:
    schema_file = write_schema(tmp_path)
    path = write(tmp_path, """
        name: activity-tracking
        state_dir: state/here
        broker: embedded
        topics:
          activity: {partitions: 4, schema: schemas/activity.avsc, key: remote_host}
        sources:
          - name: access-logs
            connector: http_log
            topic: activity
            config: {paths: ["logs/access.log*"], format: combined}
        sinks:
          - name: activity-parquet
            connector: parquet
            topics: [activity]
            config: {path: out/activity}
        errors: {tolerance: all, dead_letter_topic: activity-dlq}
    """)
    spec = load_spec(path, env={})
    assert isinstance(spec, Spec)
    assert spec.name == "activity-tracking"
    assert spec.path == path.resolve() and spec.path.is_absolute()
    assert spec.state_dir == tmp_path.resolve() / "state" / "here"
    assert spec.broker == BrokerSpec("embedded", {})
    topic = spec.topics["activity"]
    assert (topic.name, topic.partitions, topic.key) == ("activity", 4, "remote_host")
    assert topic.schema == ACTIVITY_SCHEMA and type(topic.schema) is dict
    assert topic.schema_file == schema_file.resolve()
    assert spec.sources == [
        ConnectorSpec(
            name="access-logs",
            connector="http_log",
            config={"paths": ["logs/access.log*"], "format": "combined"},
            kind="source",
            topic="activity",
            key_path="sources[0]",
        )
    ]
    # Plain Python values, not ruamel's commented containers.
    assert type(spec.sources[0].config) is dict
    assert type(spec.sources[0].config["paths"]) is list
    assert type(spec.sources[0].config["format"]) is str
    sink = spec.sinks[0]
    assert (sink.kind, sink.topics, sink.topic, sink.key_path) == (
        "sink", ["activity"], None, "sinks[0]"
    )
    assert spec.errors == ErrorPolicy("all", "activity-dlq")
    assert spec.line_of("topics.activity") == 5
    assert spec.line_of("sources[0].config.paths") == 10
    assert spec.line_of("sinks[0].config.path.nope") == 15  # falls back to the parent
    assert spec.where("sources[0].topic") == f"{path}:9 sources[0].topic"


def test_defaults(tmp_path: pathlib.Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), env={})
    assert spec.state_dir == tmp_path.resolve() / ".pipeline" / "demo"
    assert spec.broker == BrokerSpec("embedded", {})
    assert spec.errors == ErrorPolicy("none", None)
    assert spec.topics["events"].partitions == 1
    assert spec.topics["events"].key is None
    assert spec.topics["events"].schema_file is None
    assert spec.sources[0].config == {}
    assert spec.sinks == []


def test_inline_block_schema_and_single_sink_topic(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          events:
            key: id
            schema:
              type: record
              name: Event
              fields:
                - {name: id, type: string}
        sinks:
          - name: out
            connector: stdout
            topics: events
    """)
    spec = load_spec(path, env={})
    assert spec.topics["events"].schema == {
        "type": "record", "name": "Event", "fields": [{"name": "id", "type": "string"}]
    }
    assert spec.sinks[0].topics == ["events"]


def test_brokers(tmp_path: pathlib.Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + "broker: {embedded: }\n"), env={})
    assert spec.broker == BrokerSpec("embedded", {})
    spec = load_spec(
        write(tmp_path, MINIMAL + "broker:\n  kafka: {bootstrap_servers: 'k:9092', acks: all}\n"),
        env={},
    )
    assert spec.broker == BrokerSpec("kafka", {"bootstrap_servers": "k:9092", "acks": "all"})

    path = write(tmp_path, MINIMAL + "broker:\n  kafka: {acks: all}\n")
    [p] = problems(path, env={})
    assert (p.line, p.path) == (10, "broker.kafka.bootstrap_servers")
    assert p.message == 'expected a string like "host1:9092,host2:9092", got null'
    [p] = problems(write(tmp_path, MINIMAL + "broker: {kafak: {}}\n"), env={})
    assert (p.line, p.path) == (9, "broker.kafak")
    assert "did you mean 'kafka'?" in p.message
    [p] = problems(write(tmp_path, MINIMAL + "broker: redis\n"), env={})
    assert (p.line, p.path) == (9, "broker")


def test_env_interpolation(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: ${NAME}
        topics:
          events:
            partitions: ${PARTS:-4}
            schema: {type: record, name: Event, fields: [{name: id, type: long}]}
        sources:
          - name: gen
            connector: generator
            topic: events
            config:
              follow: ${FOLLOW:-true}
              quoted: "${PARTS:-4}"
              url: http://${HOST:-localhost}:${PORT}/x
              literal: $${NOT_A_VAR} and $${HOST:-x}
              empty: ${EMPTY:-}
              nested: {list: ["${HOST:-h}", "${PORT}"]}
    """)
    spec = load_spec(path, env={"NAME": "from-env", "PORT": "8080"})
    assert spec.name == "from-env"
    assert spec.topics["events"].partitions == 4
    config = spec.sources[0].config
    # A whole-value substitution is its text, read by the setting's type when parsed.
    assert config["follow"] == "true" and config["quoted"] == "4"
    assert config["url"] == "http://localhost:8080/x"
    assert config["literal"] == "${NOT_A_VAR} and ${HOST:-x}"
    assert config["empty"] == ""
    assert config["nested"] == {"list": ["h", "8080"]}

    class Settings(Config):
        follow: bool = setting(help="-")
        quoted: int = setting(help="-")
        url: str = setting(help="-")
        literal: str = setting(help="-")
        empty: str = setting(help="-")
        nested: dict[str, list[int | str]] = setting(help="-")

    parsed = Settings.parse(config)
    assert parsed.follow is True and parsed.quoted == 4 and parsed.nested == {"list": ["h", 8080]}

    spec = load_spec(path, env={"NAME": "n", "PORT": "1", "PARTS": "8", "FOLLOW": "false"})
    assert spec.topics["events"].partitions == 8
    assert Settings.parse(spec.sources[0].config).follow is False


def test_a_quoted_scalar_stays_a_string_where_the_setting_is_a_string(tmp_path: pathlib.Path) -> None:
    """`password: "true"`, `"2031-07-19"` and `"0x1F"`, written or substituted, stay strings."""
    path = write(tmp_path, """
        name: demo
        topics:
          events: {schema: {type: record, name: Event, fields: [{name: id, type: long}]}}
        sources:
          - name: gen
            connector: generator
            topic: events
            config:
              password: "true"
              day: "2031-07-19"
              code: "0x1F"
              from_env: {password: "${PW}", day: "${DAY}", code: "${CODE}", port: "${PORT}"}
    """)
    env = {"PW": "true", "DAY": "2031-07-19", "CODE": "0x1F", "PORT": "8080"}
    config = load_spec(path, env=env).sources[0].config

    class Inner(Config):
        password: str = setting(help="-", secret=True)
        day: str = setting(help="-")
        code: str = setting(help="-")
        port: int = setting(help="-")

    class Settings(Config):
        password: str = setting(help="-", secret=True)
        day: str = setting(help="-")
        code: str = setting(help="-")
        from_env: dict[str, Any] = setting(help="-")

    parsed = Settings.parse(config)
    assert (parsed.password, parsed.day, parsed.code) == ("true", "2031-07-19", "0x1F")
    inner = Inner.parse(config["from_env"])
    assert (inner.password, inner.day, inner.code, inner.port) == ("true", "2031-07-19", "0x1F", 8080)
    assert type(inner.password) is str


def test_a_whole_value_substitution_may_be_a_flow_mapping_or_list(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, MINIMAL + "broker: ${PIPELINE_BROKER:-embedded}\n")
    assert load_spec(path, env={}).broker == BrokerSpec("embedded", {})
    env = {"PIPELINE_BROKER": '{kafka: {bootstrap_servers: "k:9092", consumer: {session_timeout_ms: 6000}}}'}
    spec = load_spec(path, env=env)
    assert spec.broker == BrokerSpec("kafka", {"bootstrap_servers": "k:9092", "consumer": {"session_timeout_ms": 6000}})
    # Not YAML after all: the text stays, and the broker check reports it on its line.
    [p] = problems(path, env={"PIPELINE_BROKER": "{kafka: [unclosed"})
    assert (p.line, p.path) == (9, "broker") and "{kafka: [unclosed" in p.message


def test_env_defaults_to_os_environ(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEC_TEST_NAME", "environ-name")
    spec = load_spec(write(tmp_path, MINIMAL.replace("name: demo", "name: ${SPEC_TEST_NAME}")))
    assert spec.name == "environ-name"


def test_undefined_variable(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          events:
            partitions: ${PARTS}
            schema: {type: record, name: Event, fields: [{name: id, type: long}]}
        sources:
          - name: gen
            connector: generator
            topic: events
            config:
              paths: [a, "${LOG_DIR}/x.log"]
              bad: ${oops
    """)
    ps = problems(path, env={})
    # One problem per variable, and none about the values left unsubstituted.
    assert summary(ps) == [
        (4, "topics.events.partitions"),
        (11, "sources[0].config.paths[1]"),
        (12, "sources[0].config.bad"),
    ]
    assert "'PARTS'" in ps[0].message and "is not set" in ps[0].message
    assert "'LOG_DIR'" in ps[1].message
    assert "unterminated" in ps[2].message
    assert all(p.file == str(path) for p in ps)
    assert str(ps[0]).startswith(f"{path}:4: topics.events.partitions: ")


def test_three_mistakes_at_once(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          activity:
            partitions: four
            schema: {type: record, name: A, fields: [{name: host, type: string}]}
        sources:
          - name: logs
            connector: http_log
            topic: activty-typo
        sink:
          - name: out
            connector: stdout
            topics: [activity]
    """)
    ps = problems(path, env={})
    assert summary(ps) == [
        (4, "topics.activity.partitions"),
        (9, "sources[0].topic"),
        (10, "sink"),
    ]
    assert ps[0].message == "expected an integer >= 1, got 'four'"
    assert "'activty-typo' is not declared" in ps[1].message
    assert ps[2].message == "unknown key 'sink'; did you mean 'sinks'?"


def test_unknown_keys_everywhere(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          events:
            partition: 2
            schema: {type: record, name: Event, fields: [{name: id, type: long}]}
        sources:
          - name: gen
            conector: generator
            topic: events
            shedule: "*/5 * * * *"
        errors: {tolerence: all}
    """)
    ps = problems(path, env={})
    assert [(p.line, p.path, p.message) for p in ps] == [
        (4, "topics.events.partition", "unknown key 'partition'; did you mean 'partitions'?"),
        # (no "connector is missing" as well: the suggestion already says so)
        (8, "sources[0].conector", "unknown key 'conector'; did you mean 'connector'?"),
        (10, "sources[0].shedule", "unknown key 'shedule'; did you mean 'schedule'?"),
        (11, "errors.tolerence", "unknown key 'tolerence'; did you mean 'tolerance'?"),
    ]


def test_source_tasks(tmp_path: pathlib.Path) -> None:
    assert load_spec(write(tmp_path, MINIMAL), env={}).sources[0].tasks == 1
    spec = load_spec(write(tmp_path, MINIMAL + "    tasks: ${TASKS:-3}\n"), env={})
    assert spec.sources[0].tasks == 3
    assert load_spec(write(tmp_path, MINIMAL + "    tasks: ${TASKS}\n"), env={"TASKS": "256"}).sources[0].tasks == 256


def test_bad_source_tasks_are_located(tmp_path: pathlib.Path) -> None:
    schema = "{type: record, name: Event, fields: [{name: id, type: long}]}"
    values = ["0", "257", "three", "2.5", "true", "[2]", "-1"]
    sources = "".join(f"  - {{name: s{i}, connector: generator, topic: events, tasks: {v}}}\n"
                      for i, v in enumerate(values))
    path = write(tmp_path, f"name: demo\ntopics:\n  events: {{schema: {schema}}}\nsources:\n{sources}"
                 "sinks:\n  - {name: out, connector: jsonl, topics: [events], tasks: 2}\n")
    assert [(p.line, p.path, p.message) for p in problems(path, env={})] == [
        *[(5 + i, f"sources[{i}].tasks", f"expected an integer from 1 to 256, got {shown}")
          for i, shown in enumerate(["0", "257", "'three'", "2.5", "true", "a list", "-1"])],
        (13, "sinks[0].tasks", "unknown key 'tasks' (expected one of: name, connector, topics, config, transforms)"),
    ]


def test_connector_config_is_not_checked_here(tmp_path: pathlib.Path) -> None:
    spec = load_spec(
        write(tmp_path, MINIMAL + "    config: {anything: [1, {goes: 2.5}], x: null}\n"), env={}
    )
    assert spec.sources[0].config == {"anything": [1, {"goes": 2.5}], "x": None}


def test_yaml_syntax_error(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          events: {partitions: 1
        sources: []
    """)
    [p] = problems(path, env={})
    assert p.line == 4
    assert p.message.startswith("invalid YAML: ")
    assert p.file == str(path)


def test_duplicate_yaml_key(tmp_path: pathlib.Path) -> None:
    [p] = problems(write(tmp_path, MINIMAL + "name: again\n"), env={})
    assert p.line == 9 and "duplicate key" in p.message


def test_empty_and_non_mapping_specs(tmp_path: pathlib.Path) -> None:
    [p] = problems(write(tmp_path, "# nothing\n"), env={})
    assert "empty" in p.message
    [p] = problems(write(tmp_path, "- a\n- b\n"), env={})
    assert p.line == 1 and "mapping" in p.message
    [p] = problems(tmp_path / "missing.yaml", env={})
    assert p.message.startswith("cannot read spec") and p.line is None


def test_nothing_to_run(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        # a pipeline with no sources or sinks
        name: idle
        sources: []
    """)
    [p] = problems(path, env={})
    assert (p.line, p.path) == (2, "")
    assert "nothing to run" in p.message


def test_schema_file_problems(tmp_path: pathlib.Path) -> None:
    write_schema(tmp_path, "{not json", name="schemas/broken.avsc")
    bad_type = {"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}
    write_schema(tmp_path, bad_type, name="schemas/badtype.avsc")
    enum = {"type": "enum", "name": "E", "symbols": ["A"]}
    write_schema(tmp_path, enum, name="schemas/enum.avsc")
    write_schema(tmp_path)
    path = write(tmp_path, """
        name: demo
        topics:
          missing: {schema: schemas/missing.avsc}
          broken: {schema: schemas/broken.avsc}
          badtype: {schema: schemas/badtype.avsc}
          enum: {schema: schemas/enum.avsc}
          keyed: {schema: schemas/activity.avsc, key: host}
          inline:
            schema:
              type: record
              fields: []
        sources:
          - {name: a, connector: c, topic: missing}
    """)
    ps = problems(path, env={})
    assert summary(ps) == [
        (3, "topics.missing.schema"),
        (4, "topics.broken.schema"),
        (5, "topics.badtype.schema"),
        (6, "topics.enum.schema"),
        (7, "topics.keyed.key"),
        (9, "topics.inline.schema"),
    ]
    schemas = tmp_path.resolve() / "schemas"
    assert ps[0].message == f"schema file not found: {schemas / 'missing.avsc'}"
    assert "invalid JSON" in ps[1].message
    assert "unknown type 'nope'" in ps[2].message and "badtype.avsc" in ps[2].message
    assert "expected an Avro record schema" in ps[3].message and "'enum'" in ps[3].message
    assert ps[4].message == (
        "'host' is not a field of record 'Activity' (fields: remote_host, path, status)"
    )
    assert '"name" is a required field' in ps[5].message


def test_bad_names_and_types(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: "bad name"
        state_dir: 5
        topics:
          "bad topic!": {schema: {type: record, name: R, fields: []}}
          ok: {partitions: 0, schema: 3}
        sources: {name: x}
        sinks:
          - name: s
            connector: c
            topics: []
            config: [1]
          - just-a-string
    """)
    ps = problems(path, env={})
    assert [(p.line, p.path, p.message) for p in ps] == [
        (1, "name", "expected a name of letters, digits, '.', '_', '-', got 'bad name'"),
        (2, "state_dir", "expected a directory path, got 5"),
        (4, "topics.bad topic!", "expected a topic name of 1 to 249 letters, digits, "
         "'.', '_', '-' (not '.' or '..'), got 'bad topic!'"),
        (5, "topics.ok.partitions", "expected an integer >= 1, got 0"),
        (5, "topics.ok.schema", "expected a path to a .avsc file or an inline Avro schema "
         "(a mapping), got 3"),
        (6, "sources", "expected a list of sources, got a mapping"),
        (10, "sinks[0].topics", "expected a list of declared topic names; got an empty list"),
        (11, "sinks[0].config", "expected a mapping, got a list"),
        (12, "sinks[1]", "expected a sink (a mapping), got 'just-a-string'"),
    ]


def test_duplicate_names(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, MINIMAL + """\
  - name: gen
    connector: generator
    topic: events
sinks:
  - name: gen
    connector: stdout
    topics: [events]
""")
    ps = problems(path, env={})
    assert summary(ps) == [(9, "sources[1].name"), (13, "sinks[0].name")]
    assert ps[0].message == (
        "name 'gen' is already used by sources[0] (line 6); source and sink names must be unique"
    )


def test_dead_letter_topic_defaults(tmp_path: pathlib.Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + "errors: {tolerance: all}\n"), env={})
    assert spec.errors == ErrorPolicy("all", "demo-dlq")
    spec = load_spec(write(tmp_path, MINIMAL + "errors: {dead_letter_topic: spare}\n"), env={})
    assert spec.errors == ErrorPolicy("none", "spare")
    spec = load_spec(write(tmp_path, MINIMAL + "errors:\n"), env={})
    assert spec.errors == ErrorPolicy("none", None)

    # A sink may read the dead-letter topic; a source may not write to it.
    sink = "sinks:\n  - {name: dlq-out, connector: stdout, topics: demo-dlq}\n"
    spec = load_spec(write(tmp_path, MINIMAL + sink + "errors: {tolerance: all}\n"), env={})
    assert spec.sinks[0].topics == ["demo-dlq"]
    [p] = problems(write(tmp_path, MINIMAL + sink), env={})
    assert (p.line, p.path) == (10, "sinks[0].topics")

    [p] = problems(write(tmp_path, MINIMAL + "errors: {tolerance: some}\n"), env={})
    assert (p.line, p.path) == (9, "errors.tolerance")
    assert p.message == "expected 'none' or 'all', got 'some'"


def test_dead_letter_topic_must_not_be_declared(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, MINIMAL + """\
  - name: to-dlq
    connector: generator
    topic: demo-dlq
errors: {tolerance: all}
""")
    ps = problems(path, env={})
    assert summary(ps) == [(11, "sources[1].topic")]
    assert "dead-letter topic" in ps[0].message

    path = write(tmp_path, """
        name: demo
        topics:
          events: {schema: {type: record, name: E, fields: []}}
          demo-dlq: {schema: {type: record, name: D, fields: []}}
        sources: [{name: g, connector: generator, topic: events}]
        errors: {tolerance: all}
    """)
    [p] = problems(path, env={})
    assert (p.line, p.path) == (4, "topics.demo-dlq")
    assert "must not be declared under topics" in p.message


def test_check_connector_problems_get_lines(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
        name: demo
        topics:
          events: {schema: {type: record, name: E, fields: [{name: id, type: long}]}}
        sources:
          - name: logs
            connector: http_log
            topic: events
            config:
              format: combined
              paths:
                - a.log
                - 7
        sinks:
          - name: broken
            connector: parquet
            topics: [nope]
          - name: out
            connector: nosuch
            topics: [events]
    """)
    calls: list[tuple[str, str, str]] = []

    def check(kind: str, entry: ConnectorSpec, key_path: str) -> list[Problem]:
        calls.append((kind, entry.name, key_path))
        if entry.connector == "http_log":
            return [
                Problem("expected a string, got 7", path=f"{key_path}.config.paths[1]"),
                Problem("unknown option", path=f"{key_path}.config.not_there.deeper"),
            ]
        return [
            Problem("unknown connector 'nosuch'", path=f"{key_path}.connector"),
            Problem("needs a config", path=""),
        ]

    ps = problems(path, env={}, check_connector=check)
    # Called for the sink with an undeclared topic too: every problem is reported at once.
    assert calls == [("source", "logs", "sources[0]"), ("sink", "broken", "sinks[0]"), ("sink", "out", "sinks[1]")]
    assert [(p.line, p.path, p.message) for p in ps] == [
        (8, "sources[0].config.not_there.deeper", "unknown option"),
        (12, "sources[0].config.paths[1]", "expected a string, got 7"),
        (14, "sinks[0]", "needs a config"),
        (15, "sinks[0].connector", "unknown connector 'nosuch'"),
        (16, "sinks[0].topics[0]", "topic 'nope' is not declared under topics (declared: events)"),
        (17, "sinks[1]", "needs a config"),
        (18, "sinks[1].connector", "unknown connector 'nosuch'"),
    ]
    assert all(p.file == str(path) for p in ps)


def test_check_connector_all_good(tmp_path: pathlib.Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), env={}, check_connector=lambda *a: [])
    assert spec.sources[0].name == "gen"


def test_unquoted_variable_in_flow_mapping_gets_a_hint(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, MINIMAL.replace("    schema:", "    partitions: 1\n    schema:") + """\
    config: {port: ${PORT}}
""")
    [p] = problems(path, env={"PORT": "1"})
    assert p.line == 10
    assert 'quote ${...} expressions, e.g. "${VAR}"' in p.message

    path.write_text(path.read_text().replace("${PORT}", '"${PORT}"'))
    config = load_spec(path, env={"PORT": "8080"}).sources[0].config
    assert config == {"port": "8080"} and config["port"].value == 8080  # typed where a number is expected
