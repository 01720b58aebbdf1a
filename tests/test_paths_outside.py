"""A sink or state directory outside the spec's directory: a warning from `pipeline
validate`, a problem with `--strict`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

SPEC = """\
name: out
{state}topics:
  t: {{schema: r.avsc}}
sources:
  - {{name: in, connector: jsonl, topic: t, config: {{paths: [in.jsonl]}}}}
sinks:
  - {{name: lake, connector: jsonl, topics: [t], config: {{path: {path}}}}}
"""


def project(tmp_path: Path, path: str, state: str = "") -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "r.avsc").write_text('{"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}]}')
    (root / "in.jsonl").write_text('{"a": 1}\n')
    (root / "spec.yaml").write_text(SPEC.format(path=path, state=state))
    return root / "spec.yaml"


def test_paths_leaving_the_spec_directory_are_warnings_and_strict_refuses_them(tmp_path: Path) -> None:
    spec = project(tmp_path, "../../escaped", state="state_dir: ../state\n")
    plain = run_cli("validate", spec)
    assert plain.returncode == 0, plain.stderr
    escaped = tmp_path.parent.resolve() / "escaped"
    assert f"spec.yaml:8: sinks[0].config.path: warning: sink 'lake' writes to '{escaped}', outside the spec's " \
           f"directory '{spec.parent.resolve()}'" in plain.stderr
    assert f"spec.yaml:2: state_dir: warning: the state directory is '{tmp_path.resolve() / 'state'}'" in plain.stderr
    strict = run_cli("validate", "--strict", "--json", spec)
    assert strict.returncode == 2
    found = json.loads(strict.stdout)["problems"]
    assert [(p["level"], p["path"]) for p in found] == [("error", "sinks[0].config.path"), ("error", "state_dir")]


def test_paths_inside_the_spec_directory_say_nothing(tmp_path: Path) -> None:
    spec = project(tmp_path, "out/../lake")
    strict = run_cli("validate", "--strict", spec)
    assert strict.returncode == 0, strict.stderr
    assert "warning" not in strict.stderr
