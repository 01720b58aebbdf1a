"""The `sequence` source: the conformance checks of `runner.testing` (bounded and endless),
resuming from its offset, its config, and whole pipelines run with it (in-process with
`run_spec`, and through the installed `pipeline` command)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_sequence
from pipeline_sequence import Sequence, SequenceTask
from runner.connector import ConfigError
from runner.testing import check_source, run_spec

# The topic schema of pipelines/sequence.yaml: the records must fit it.
NUMBER = {
    "type": "record",
    "name": "Number",
    "fields": [{"name": "n", "type": "long"}, {"name": "key", "type": "string"}],
}


# --- conformance --------------------------------------------------------------------------


def test_conformance(tmp_path: Path) -> None:
    # Open, poll to the end, close; batches fit the schema, offsets are JSON and move
    # forward; a restart from the stored offsets (also after a simulated crash) emits
    # nothing twice and misses nothing.
    records = check_source(Sequence, {"count": 2500, "keys": 7, "batch_size": 400}, tmp_path=tmp_path, schema=NUMBER)
    assert records == [{"n": n, "key": f"k{n % 7}"} for n in range(2500)]


def test_conformance_of_an_endless_sequence(tmp_path: Path) -> None:
    # count: null never ends; the check reads up to max_records and checks the rest the same.
    records = check_source(Sequence, {"count": None, "batch_size": 100}, tmp_path=tmp_path, schema=NUMBER,
                           max_records=1000)
    assert [r["n"] for r in records] == list(range(len(records))) and len(records) >= 1000


# --- the task -------------------------------------------------------------------------------


def read(config: dict, offsets: dict) -> list[list[int]]:
    """The batches (as lists of n) a task opened with `offsets` polls until it ends."""

    async def main() -> list[list[int]]:
        task = SequenceTask(Sequence.Config.parse(config))
        await task.open(offsets)
        batches = []
        while (batch := await task.poll()) is not None:
            batches.append([row["n"] for row in batch.rows])
            assert batch.source_offsets == {"sequence": batches[-1][-1] + 1}
        await task.close()
        return batches

    return asyncio.run(main())


def test_batches_and_resuming_after_the_stored_offset() -> None:
    config = {"count": 10, "batch_size": 4}
    assert read(config, {}) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert read(config, {"sequence": 6}) == [[6, 7, 8, 9]]
    assert read(config, {"sequence": 10}) == []
    assert read({"count": 0}, {}) == []  # an empty sequence ends at once
    # A larger count later: a restart goes on from where the smaller one ended.
    assert read({"count": 12, "batch_size": 4}, {"sequence": 10}) == [[10, 11]]


def test_keys_cycle_through_n_mod_keys() -> None:
    async def first_batch() -> list[dict]:
        task = SequenceTask(Sequence.Config.parse({"count": 7, "keys": 3}))
        await task.open({})
        return (await task.poll()).rows

    assert asyncio.run(first_batch()) == [{"n": n, "key": f"k{n % 3}"} for n in range(7)]


def test_defaults() -> None:
    config = Sequence.Config.parse({})
    assert (config.count, config.keys, config.batch_size) == (1000, 10, 1000)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError) as error:
        Sequence.Config.parse({"count": -1, "keys": 0, "batch_sise": 10})
    message = str(error.value)
    assert "count: must be at least 0" in message
    assert "keys: must be at least 1" in message
    assert "did you mean 'batch_size'" in message


# --- whole pipelines ------------------------------------------------------------------------------


def write_spec(tmp_path: Path, count: int) -> Path:
    """pipelines/sequence.yaml's job with `count` records: sequence → a 2-partition keyed
    topic → the built-in jsonl sink."""
    spec = tmp_path / "sequence.yaml"
    spec.write_text(
        f"""\
name: sequence-test
topics:
  numbers: {{partitions: 2, key: key, schema: {json.dumps(NUMBER)}}}
sources:
  - {{name: numbers-in, connector: sequence, topic: numbers, config: {{count: {count}, keys: 7, batch_size: 300}}}}
sinks:
  - {{name: numbers-out, connector: jsonl, topics: [numbers], config: {{path: out}}}}
"""
    )
    return spec


def landed(out: Path) -> list[dict]:
    """What the jsonl sink wrote, read independently of it."""
    return [json.loads(line) for path in sorted(out.glob("*.jsonl")) for line in path.read_text().splitlines() if line]


def test_a_pipeline_runs_it_and_resumes(tmp_path: Path) -> None:
    run_spec(write_spec(tmp_path, 2000), plugins=[pipeline_sequence], once=True)
    records = landed(tmp_path / "out")
    assert sorted(r["n"] for r in records) == list(range(2000))
    # One key stays in one partition, in order.
    for path in (tmp_path / "out").glob("*.jsonl"):
        ns = [json.loads(line)["n"] for line in path.read_text().splitlines()]
        assert ns == sorted(ns)
    owner = {r["key"]: path.name for path in (tmp_path / "out").glob("*.jsonl")
             for r in map(json.loads, path.read_text().splitlines())}
    assert len(owner) == 7

    run_spec(write_spec(tmp_path, 2000), plugins=[pipeline_sequence], once=True)  # resumes at the end: nothing new
    assert len(landed(tmp_path / "out")) == 2000
    run_spec(write_spec(tmp_path, 2500), plugins=[pipeline_sequence], once=True)  # only the 500 new ones
    assert sorted(r["n"] for r in landed(tmp_path / "out")) == list(range(2500))


PIPELINE = Path(sys.executable).parent / "pipeline"


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    assert PIPELINE.exists(), f"no `pipeline` command next to {sys.executable}: install pipeline first"
    return subprocess.run([str(PIPELINE), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_installed_plugin_registers_and_runs_from_the_command_line(tmp_path: Path) -> None:
    # Through the entry point of the installed package, as a user runs it.
    plugins = {p["name"]: p for p in json.loads(cli("plugins", "--json", cwd=tmp_path).stdout)}
    assert plugins["sequence"]["distribution"] == "pipeline-sequence"
    assert plugins["sequence"]["connectors"] == ["source:sequence"]
    assert plugins["sequence"]["error"] is None
    shown = cli("connectors", "show", "sequence", cwd=tmp_path)
    assert shown.returncode == 0 and "batch_size" in shown.stdout and "Records per batch." in shown.stdout

    spec = write_spec(tmp_path, 1500)
    first = cli("run", spec, "--once", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = cli("run", spec, "--once", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(r["n"] for r in landed(tmp_path / "out")) == list(range(1500))
