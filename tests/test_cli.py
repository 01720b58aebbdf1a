"""The `pipeline` command as a user meets it: validate, plugins, connectors, schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import read_jsonl_dir, run_cli

REPO = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "record",
    "name": "Thing",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}


def test_validate_reports_three_mistakes_with_lines_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "thing.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            name: three-mistakes
            topics:
              things: {partitions: 2, schema: thing.avsc, key: id}
            sources:
              - name: in
                connector: jsonll
                topic: things
                config: {paths: ["*.jsonl"]}
            sinks:
              - name: out
                connector: jsonl
                topics: [thingz]
                config: {path: out}
            errrors: {tolerance: all}
            """
        )
    )
    result = run_cli("validate", spec)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith(str(spec))]
    assert len(lines) == 3, result.stderr
    assert f"{spec}:6:" in lines[0] and "jsonll" in lines[0] and "did you mean 'jsonl'" in lines[0]
    assert f"{spec}:12:" in lines[1] and "thingz" in lines[1]
    assert f"{spec}:14:" in lines[2] and "errrors" in lines[2] and "errors" in lines[2]
    assert "Traceback" not in result.stderr


def test_validate_reports_connector_config_errors(tmp_path: Path) -> None:
    (tmp_path / "thing.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            name: bad-config
            topics:
              things: {schema: thing.avsc}
            sources:
              - name: in
                connector: jsonl
                topic: things
                config:
                  pathz: ["*.jsonl"]
            """
        )
    )
    result = run_cli("validate", spec)
    assert result.returncode == 2
    assert f"{spec}:9:" in result.stderr and "pathz" in result.stderr and "'paths'" in result.stderr
    assert "paths: required setting missing" in result.stderr


def test_connectors_list_and_show(tmp_path: Path) -> None:
    listed = run_cli("connectors", "list", "--json")
    names = {(c["kind"], c["name"]) for c in json.loads(listed.stdout)}
    assert {("source", "jsonl"), ("sink", "jsonl")} <= names
    shown = run_cli("connectors", "show", "jsonl", "--kind", "source", "--json")
    (conn,) = json.loads(shown.stdout)
    settings = {s["name"]: s for s in conn["config"]}
    assert settings["paths"]["required"] and settings["batch_size"]["default"] == 5000
    text = run_cli("connectors", "show", "jsonl").stdout
    assert "batch_size" in text and "(required)" in text
    unknown = run_cli("connectors", "show", "jsonk")
    assert unknown.returncode == 2 and "did you mean 'jsonl'" in unknown.stderr


def _install_plugin(tmp_path: Path, name: str, module_source: str) -> Path:
    """Build and install a throwaway plugin package into its own directory with pip."""
    pkg = tmp_path / f"src-{name}"
    pkg.mkdir()
    (pkg / f"{name}.py").write_text(textwrap.dedent(module_source))
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{name.replace('_', '-')}"
            version = "0.3.1"
            [project.entry-points.pipeline]
            {name} = "{name}"
            [tool.setuptools]
            py-modules = ["{name}"]
            """
        )
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(pkg)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


GOOD_PLUGIN = """\
from runner.batch import Batch
from runner.connector import Config, Source, SourceTask, setting
from runner.hookspecs import hookimpl


class Counter(Source):
    name = "counter"
    description = "Counts from 0."

    class Config(Config):
        count: int = setting(10, help="How many records.")

    def tasks(self):
        return [CounterTask(self.config.count)]


class CounterTask(SourceTask):
    def __init__(self, count):
        self.count, self.next = count, 0

    async def open(self, offsets):
        self.next = offsets.get("counter", 0)

    async def poll(self):
        if self.next >= self.count:
            return None
        rows = [{"id": i, "name": f"n{i}"} for i in range(self.next, self.count)]
        self.next = self.count
        return Batch(rows, source_offsets={"counter": self.next})


@hookimpl
def register_connectors(register):
    register(Counter)
"""

BROKEN_PLUGIN = """\
import this_module_does_not_exist
"""


def test_installed_plugin_runs_and_broken_plugin_is_reported(tmp_path: Path) -> None:
    site = _install_plugin(tmp_path, "counter_plugin", GOOD_PLUGIN)
    _install_plugin(tmp_path, "broken_plugin", BROKEN_PLUGIN)
    env = {"PYTHONPATH": str(site)}

    listed = run_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert plugins["counter_plugin"]["connectors"] == ["source:counter"]
    assert plugins["counter_plugin"]["distribution"] == "counter-plugin"
    assert plugins["counter_plugin"]["version"] == "0.3.1"
    assert "this_module_does_not_exist" in plugins["broken_plugin"]["error"]
    assert {"source:jsonl", "sink:jsonl"} <= set(plugins["builtin"]["connectors"])
    text = run_cli("plugins", env=env).stdout
    assert "broken_plugin (broken-plugin 0.3.1): BROKEN: ModuleNotFoundError" in text

    (tmp_path / "thing.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            name: plugged
            topics:
              things: {partitions: 2, schema: thing.avsc, key: id}
            sources:
              - {name: numbers, connector: counter, topic: things, config: {count: 25}}
            sinks:
              - {name: out, connector: jsonl, topics: [things], config: {path: out}}
            """
        )
    )
    result = run_cli("run", spec, "--once", env=env)
    assert result.returncode == 0, result.stderr
    records = [r for rs in read_jsonl_dir(tmp_path / "out").values() for r in rs]
    assert sorted(r["id"] for r in records) == list(range(25))


def test_incompatible_schema_change_is_refused_with_reason(tmp_path: Path) -> None:
    avsc = tmp_path / "thing.avsc"
    avsc.write_text(json.dumps(SCHEMA))
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "one"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            """\
            name: evolving
            topics:
              things: {schema: thing.avsc}
            sources:
              - {name: in, connector: jsonl, topic: things, config: {paths: [in.jsonl]}}
            """
        )
    )
    assert run_cli("run", spec, "--once").returncode == 0

    # Adding a field without a default breaks BACKWARD compatibility: refused at run start.
    evolved = json.loads(json.dumps(SCHEMA))
    evolved["fields"].append({"name": "colour", "type": "string"})
    avsc.write_text(json.dumps(evolved))
    refused = run_cli("run", spec, "--once")
    assert refused.returncode == 1
    assert "things-value" in refused.stderr and "colour" in refused.stderr and "BACKWARD" in refused.stderr

    # The same through `pipeline schemas register`; a compatible change (with a default) is accepted.
    refused = run_cli("schemas", "register", "things-value", avsc, "--spec", spec)
    assert refused.returncode == 1 and "colour" in refused.stderr
    evolved["fields"][-1]["default"] = "blue"
    avsc.write_text(json.dumps(evolved))
    accepted = run_cli("schemas", "register", "things-value", avsc, "--spec", spec)
    assert accepted.returncode == 0, accepted.stderr
    assert "version 2" in accepted.stdout
    listed = run_cli("schemas", "list", "--spec", spec).stdout
    assert "things-value" in listed and "1,2" in listed and "BACKWARD" in listed


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["consume", "--help"], ["topics", "describe", "--help"], ["registry", "serve", "--help"]])
def test_help_texts(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_example_pipeline_round_trip(tmp_path: Path) -> None:
    """The jsonl round-trip example in pipelines/ runs and dead-letters its three bad lines."""
    env = {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    spec = REPO / "pipelines" / "jsonl-roundtrip.yaml"
    result = run_cli("run", spec, "--once", env=env)
    assert result.returncode == 0, result.stderr
    records = [r for rs in read_jsonl_dir(tmp_path / "out").values() for r in rs]
    assert len(records) == 198
    dlq = run_cli("consume", "orders-dlq", "--from-beginning", "--spec", spec, env=env)
    letters = [json.loads(l) for l in dlq.stdout.splitlines()]
    assert sorted(d["position"].rsplit(":", 1)[1] for d in letters) == ["121", "50", "91"]


def test_consume_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`pipeline consume ... | head -1`: the reader leaves early; no traceback, exit 141."""
    import fcntl
    import subprocess

    from tests.conftest import pipeline_exe

    # The reader must leave while consume still has output to write: output that fits in
    # the pipe can all be written before the reader closes its end, and consume then rightly
    # exits 0 (as `cat small | head -1` does). So the topic holds several times what the
    # pipe takes: consume blocks on the full pipe until the reader is gone.
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    name = "x" * 200
    count = 4 * capacity // len(json.dumps({"id": 0, "name": name})) + 1
    spec = _simple_spec(tmp_path)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "name": name}) + "\n" for i in range(count)))
    assert run_cli("run", spec, "--once").returncode == 0
    try:
        proc = subprocess.Popen(
            [pipeline_exe(), "consume", "things", "--from-beginning", "--spec", str(spec)],
            stdout=write_end, stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert json.loads(reader.readline())["name"] == name
    # like `head -1` exiting
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


def _simple_spec(tmp_path: Path, extra: str = "", sink_path: str = "out") -> Path:
    (tmp_path / "thing.avsc").write_text(json.dumps(SCHEMA))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: simple
            topics:
              things: {{partitions: 2, schema: thing.avsc, key: name}}
            sources:
              - {{name: in, connector: jsonl, topic: things, config: {{paths: [in.jsonl]}}}}
            sinks:
              - {{name: out, connector: jsonl, topics: [things], config: {{path: {sink_path}}}}}
            """
        )
        + extra
    )
    return spec


def test_a_sink_may_archive_the_dead_letter_topic(tmp_path: Path) -> None:
    spec = _simple_spec(
        tmp_path,
        "  - {name: dlq-archive, connector: jsonl, topics: [things-dlq], config: {path: dlq}}\n"
        "errors: {tolerance: all, dead_letter_topic: things-dlq}\n",
    )
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "a"}\n{"id": "x", "name": "b"}\n')
    result = run_cli("run", spec, "--once")
    assert result.returncode == 0, result.stderr
    (letter,) = [r for rs in read_jsonl_dir(tmp_path / "dlq").values() for r in rs]
    assert letter["field"] == "id" and letter["position"].endswith("in.jsonl:2")


def test_file_system_errors_are_one_line_naming_the_connector_the_path_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the sink wants a directory")
    spec = _simple_spec(tmp_path, sink_path="blocker/out")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "a"}\n')
    result = run_cli("run", spec, "--once")
    assert result.returncode == 1
    assert f"error: out: {tmp_path}/blocker/out: not a directory" in result.stderr
    assert "hint: a part of the path is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert "pipeline 'simple' failed" in result.stderr  # the summary still printed
    debug = run_cli("--debug", "run", spec, "--once")
    assert "Traceback" in debug.stderr


def test_deleted_state_dir_with_old_output_is_refused_not_silently_skipped(tmp_path: Path) -> None:
    import shutil

    spec = _simple_spec(tmp_path)
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}, "name": "n{i}"}}\n' for i in range(50)))
    assert run_cli("run", spec, "--once").returncode == 0
    shutil.rmtree(tmp_path / ".pipeline")
    (tmp_path / "in.jsonl").write_text('{"id": 100, "name": "new"}\n')
    result = run_cli("run", spec, "--once")
    assert result.returncode == 1
    assert "but the topic ends at" in result.stderr and "hint:" in result.stderr


def test_read_side_commands_do_not_create_state_and_unknown_names_exit_2(tmp_path: Path) -> None:
    spec = _simple_spec(tmp_path)
    listed = run_cli("schemas", "list", "--spec", spec)
    assert listed.returncode == 2 and "no schemas registered" in listed.stderr
    assert not (tmp_path / ".pipeline").exists()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "a"}\n')
    assert run_cli("run", spec, "--once").returncode == 0
    assert run_cli("consume", "nope", "--spec", spec).returncode == 2
    assert run_cli("schemas", "show", "nope-value", "--spec", spec).returncode == 2
    bad_version = run_cli("schemas", "show", "things-value", "--version", "abc", "--spec", spec)
    assert bad_version.returncode == 2 and "Traceback" not in bad_version.stderr


def test_validate_checks_kafka_options_and_never_prints_the_password(tmp_path: Path) -> None:
    env = {"KAFKA_PASSWORD": "s3cret-pw"}
    ok = _simple_spec(
        tmp_path,
        'broker: {kafka: {bootstrap_servers: "127.0.0.1:9092", security: {protocol: SASL_SSL, '
        'sasl_mechanism: SCRAM-SHA-512, username: u, password: "${KAFKA_PASSWORD}"}}}\n',
    )
    result = run_cli("validate", ok, env=env)
    assert result.returncode == 0, result.stderr
    assert "broker kafka" in result.stdout and "s3cret-pw" not in result.stdout + result.stderr

    bad = _simple_spec(
        tmp_path,
        "broker:\n  kafka:\n    bootstrap_servers: 127.0.0.1:9092\n    clientid: x\n"
        '    security: {protocol: SASL_SSL, username: u, password: "${KAFKA_PASSWORD}"}\n',
    )
    result = run_cli("validate", bad, env=env)
    assert result.returncode == 2
    assert f"{bad}:11: broker.kafka.clientid" in result.stderr and "client_id" in result.stderr
    assert f"{bad}:12: broker.kafka.security" in result.stderr and "sasl_mechanism" in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr