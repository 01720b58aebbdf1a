"""Plugins without packaging (`plugin_paths:`), disabling plugins, and what `pipeline
plugins` / `pipeline transforms` show — all through the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.conftest import read_jsonl_dir, run_cli

# A local plugin module: a source of words and a transform that adds each word's length
# (changing the record's shape, so it says so in schema() for the sink side).
LOCAL_PLUGIN = '''
from runner.batch import Batch
from runner.connector import Config, Source, SourceTask, setting
from runner.hookspecs import hookimpl
from runner.transform import Transform


class Words(Source):
    name = "words"
    description = "A few words."

    class Config(Config):
        words: list[str] = setting(help="The words.")

    def tasks(self):
        return [WordsTask(self.config.words)]


class WordsTask(SourceTask):
    def __init__(self, words):
        self.words, self.done = words, False

    async def open(self, offsets):
        self.done = offsets.get("words", False)

    async def poll(self):
        if self.done:
            return None
        self.done = True
        return Batch([{"word": w} for w in self.words], source_offsets={"words": True})


class Length(Transform):
    name = "length"
    description = "Adds the length of a string field."

    class Config(Config):
        field: str = setting("word", help="The string field.")
        fail_on: str = setting("", help="Raise (a bug) on this value.")

    def apply(self, batch):
        if self.config.fail_on and any(r[self.config.field] == self.config.fail_on for r in batch.rows):
            raise ZeroDivisionError("a bug in the transform")
        return batch.derive([{**r, "length": len(r[self.config.field])} for r in batch.rows])

    def schema(self, schema):
        return {**schema, "fields": [*schema["fields"], {"name": "length", "type": "long"}]}


@hookimpl
def register_connectors(register):
    register(Words)


@hookimpl
def register_transforms(register):
    register(Length)
'''

SPEC = """\
name: local
state_dir: state
plugin_paths: [local-plugins]
topics:
  words:
    partitions: 1
    schema: {type: record, name: Word, fields: [{name: word, type: string}]}
sources:
  - name: words
    connector: words
    topic: words
    config: {words: [kafka, connect, python]}
sinks:
  - name: out
    connector: jsonl
    topics: [words]
    transforms:
      - length: {fail_on: "${FAIL_ON:-}"}
    config: {path: out}
"""


def local_spec(tmp_path: Path, plugin: str = LOCAL_PLUGIN, spec: str = SPEC) -> Path:
    (tmp_path / "local-plugins").mkdir()
    (tmp_path / "local-plugins" / "words_plugin.py").write_text(textwrap.dedent(plugin))
    (tmp_path / "local-plugins" / "helpers.py").write_text("VALUE = 1\n")  # no hooks: not a plugin
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    return path


def test_plugin_paths_load_local_modules_and_a_sink_chain_changes_the_shape(tmp_path: Path) -> None:
    spec = local_spec(tmp_path)
    assert run_cli("validate", spec).returncode == 0
    result = run_cli("run", spec, "--once")
    assert result.returncode == 0, result.stderr
    rows = [r for rs in read_jsonl_dir(tmp_path / "out").values() for r in rs]
    assert sorted((r["word"], r["length"]) for r in rows) == [("connect", 7), ("kafka", 5), ("python", 6)]

    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", "--spec", spec).stdout)}
    assert listed["words_plugin"]["path"] == str(tmp_path / "local-plugins" / "words_plugin.py")
    assert listed["words_plugin"]["connectors"] == ["source:words", "transform:length"]
    assert "helpers" not in listed
    text = run_cli("plugins", "--spec", spec).stdout
    assert f"words_plugin ({tmp_path}/local-plugins/words_plugin.py): source:words, transform:length" in text
    # Without the spec, the local module is not loaded.
    assert "words_plugin" not in run_cli("plugins").stdout


def test_a_transform_raising_stops_the_run_naming_it(tmp_path: Path) -> None:
    result = run_cli("run", local_spec(tmp_path), "--once", env={"FAIL_ON": "connect"})
    assert result.returncode == 1
    assert "out: transform 'length' (sinks[0].transforms[0]) failed: ZeroDivisionError: a bug in the transform" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_local_plugin_and_a_missing_directory_are_spec_problems(tmp_path: Path) -> None:
    spec = local_spec(tmp_path, plugin="import no_such_module_here\n",
                      spec=SPEC.replace("plugin_paths: [local-plugins]", "plugin_paths: [local-plugins, nowhere]"))
    result = run_cli("validate", spec)
    assert result.returncode == 2
    err = result.stderr
    assert (f"spec.yaml:3: plugin_paths[0]: plugin 'words_plugin' ({tmp_path}/local-plugins/words_plugin.py) is broken: "
            "ModuleNotFoundError: No module named 'no_such_module_here'") in err
    assert f"spec.yaml:3: plugin_paths[1]: no such directory: {tmp_path}/nowhere" in err
    assert "sources[0].connector: unknown source connector 'words'" in err


def test_disabled_plugins_are_listed_as_such_and_not_loaded(tmp_path: Path) -> None:
    spec = local_spec(tmp_path)
    env = {"PIPELINE_DISABLE_PLUGINS": "words_plugin, nothing-by-that-name"}
    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", "--spec", spec, env=env).stdout)}
    assert listed["words_plugin"]["disabled"] and listed["words_plugin"]["connectors"] == []
    assert "words_plugin (" in run_cli("plugins", "--spec", spec, env=env).stdout
    assert "disabled by PIPELINE_DISABLE_PLUGINS" in run_cli("plugins", "--spec", spec, env=env).stdout
    result = run_cli("validate", spec, env=env)
    assert result.returncode == 2 and "unknown source connector 'words'" in result.stderr

    # By distribution name too: the built-ins are the distribution `pipeline`.
    env = {"PIPELINE_DISABLE_PLUGINS": "pipeline"}
    builtin = next(p for p in json.loads(run_cli("plugins", "--json", env=env).stdout) if p["name"] == "builtin")
    assert builtin["disabled"]
    result = run_cli("validate", spec, env=env)
    assert "unknown sink connector 'jsonl'" in result.stderr


def test_transforms_list_and_show(tmp_path: Path) -> None:
    listed = json.loads(run_cli("transforms", "list", "--json").stdout)
    assert {"rename", "mask", "filter", "route"} <= {t["name"] for t in listed}
    assert all(t["kind"] == "transform" for t in listed)  # an installed plugin may add its own
    assert all(t["plugin"] == "builtin" for t in listed if t["name"] in {"rename", "mask", "filter", "route"})
    shown = json.loads(run_cli("transforms", "show", "mask", "--json").stdout)
    assert shown[0]["name"] == "mask" and {s["name"] for s in shown[0]["config"]} >= {"fields"}
    text = run_cli("transforms", "show", "mask").stdout
    assert text.startswith("transform 'mask' (plugin 'builtin' from pipeline):")
    unknown = run_cli("transforms", "show", "maks")
    assert unknown.returncode == 2 and "did you mean 'mask'" in unknown.stderr
    # Connectors and transforms are listed apart.
    assert "transform" not in {c["kind"] for c in json.loads(run_cli("connectors", "list", "--json").stdout)}
