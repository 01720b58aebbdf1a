"""How the engine runs transform chains: positions past records a sink-side chain left out,
Arrow types for sinks that want columns, and transforms that break the bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from runner.batch import Batch
from runner.chain import Chain
from runner.errors import FatalError
from runner.plugins import PluginHost, load_plugins
from runner.transform import Transform, TransformContext
from tests.conftest import run_cli

SPEC = """\
name: tail
state_dir: state
topics:
  events:
    partitions: 1
    schema:
      type: record
      name: Event
      fields:
        - {name: id, type: long}
        - {name: size, type: ["null", int], default: null}
        - {name: label, type: string}
sources:
  - {name: in, connector: jsonl, topic: events, config: {paths: [events.jsonl]}}
sinks:
  - name: out
    connector: parquet
    topics: [events]
    config: {path: out, partition_by: null}
    transforms:
      - cast: {fields: {label: int}}      # "x" does not convert: a record error
      - filter: {drop: "id >= 8"}         # the last records of every batch
  - name: all                             # a columns sink on a topic and the dead-letter topic
    connector: parquet
    topics: [events, tail-dlq]
    config: {path: all, partition_by: null}
errors: {tolerance: all, dead_letter_topic: tail-dlq}
"""


def write(tmp_path: Path, ids: range) -> None:
    with open(tmp_path / "events.jsonl", "a") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "size": i * 10, "label": "x" if i == 7 else str(i)}) + "\n")


def test_a_sink_chain_dropping_the_tail_leaves_no_lag_and_no_repeats(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    write(tmp_path, range(10))
    result = run_cli("run", tmp_path / "spec.yaml", "--once")
    assert result.returncode == 0, result.stderr

    glob = f"{tmp_path}/out/events/**/*.parquet"
    rows = duckdb.connect().execute(f"select id, size, label from read_parquet('{glob}') order by id").fetchall()
    assert rows == [(i, i * 10, i) for i in range(7)]
    # The sink's Arrow types come from the schema the chain makes: size stays int32, label is now int32.
    types = dict(duckdb.connect().execute(f"select column_name, column_type from (describe select * from read_parquet('{glob}'))").fetchall())
    assert types["size"] == "INTEGER" and types["label"] == "INTEGER"

    dlq = run_cli("consume", "tail-dlq", "--from-beginning", "--spec", tmp_path / "spec.yaml")
    letters = [json.loads(line) for line in dlq.stdout.splitlines()]
    assert [(d["stage"], d["field"]) for d in letters] == [("transform", "label")]
    # The other sink reads the dead-letter topic beside the records, untransformed.
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{tmp_path}/all/events/**/*.parquet')").fetchone() == (10,)

    described = json.loads(run_cli("topics", "describe", "events", "--json", "--spec", tmp_path / "spec.yaml").stdout)
    assert described["groups"]["pipeline-tail-out"]["lag"] == 0, "the filtered tail is committed as done"

    again = run_cli("run", tmp_path / "spec.yaml", "--once")  # exactly once: nothing new in the output
    assert again.returncode == 0, again.stderr
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{glob}')").fetchone() == (7,)


class Fresh(Transform):
    """Returns a new Batch instead of batch.derive: the offsets and errors are gone."""

    name = "fresh"

    def apply(self, batch: Batch) -> Batch:
        return Batch([dict(r) for r in batch.rows])


def test_a_transform_losing_the_offsets_stops_the_run_naming_it() -> None:
    chain = Chain("in", [Fresh(Fresh.Config.parse({}), TransformContext("in", "source", "sources[0].transforms[0]"))])
    with pytest.raises(FatalError) as err:
        chain.apply(Batch([{"a": 1}], source_offsets={"f": 1}))
    assert "transform 'fresh' (sources[0].transforms[0]) returned a batch that lost the source offsets" in str(err.value)
    assert "batch.derive" in err.value.hint


def test_derive_refuses_kept_indexes_out_of_step_with_the_rows() -> None:
    batch = Batch([{"a": 1}, {"a": 2}], positions=["f:1", "f:2"])
    with pytest.raises(ValueError, match="1 `kept` indexes for 2 records"):
        batch.derive([{"a": 1}, {"a": 2}], kept=[0])
    assert batch.derive([{"a": 2}], kept=[1]).positions == ["f:2"]


def test_registering_with_the_wrong_hook_says_which_hook() -> None:
    import types

    from runner.hookspecs import hookimpl

    module = types.ModuleType("wrong_hook")

    @hookimpl
    def register_connectors(register):
        register(Fresh)

    module.register_connectors = register_connectors
    info = PluginHost().add(module)
    assert info.broken and "register it with the register_transforms hook" in info.error


def test_disabling_by_module_name_and_a_local_module_shadowed_by_an_installed_one(tmp_path: Path) -> None:
    builtin = next(p for p in json.loads(run_cli("plugins", "--json", env={"PIPELINE_DISABLE_PLUGINS": "connectors"}).stdout)
                   if p["name"] == "builtin")
    assert builtin["disabled"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "string.py").write_text("from runner.hookspecs import hookimpl\n")  # the stdlib has `string`
    (tmp_path / "spec.yaml").write_text(SPEC.replace("state_dir: state", "state_dir: state\nplugin_paths: [mine]"))
    result = run_cli("validate", tmp_path / "spec.yaml")
    assert result.returncode == 2
    assert "plugin_paths[0]: plugin 'string'" in result.stderr and "the name 'string' is taken by" in result.stderr


def test_a_sink_chain_is_checked_against_the_dead_letter_schema_too(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC.replace("topics: [events]\n", "topics: [events, tail-dlq]\n", 1))
    result = run_cli("validate", tmp_path / "spec.yaml")
    assert result.returncode == 2
    assert "sinks[0].transforms: on topic 'tail-dlq': cast: field 'label' is not in the record schema" in result.stderr
    assert load_plugins().lookup("transform", "cast")  # nothing else was disturbed
