"""The example plugins in plugins/ install as packages and run in their pipelines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import read_jsonl_dir, run_cli

REPO = Path(__file__).resolve().parents[1]


def install(plugin: str, target: Path) -> dict[str, str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO / "plugins" / plugin)],
        check=True, capture_output=True, timeout=300,
    )
    return {"PYTHONPATH": str(target)}


def test_sequence_plugin_runs_and_resumes(tmp_path: Path) -> None:
    env = install("pipeline-sequence", tmp_path / "site")
    env |= {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert plugins["sequence"]["distribution"] == "pipeline-sequence"
    assert plugins["sequence"]["connectors"] == ["source:sequence"]

    spec = REPO / "pipelines" / "sequence.yaml"
    first = run_cli("run", spec, "--once", env=env)
    assert first.returncode == 0, first.stderr
    again = run_cli("run", spec, "--once", env=env)  # resumes at the end: nothing new
    assert again.returncode == 0, again.stderr
    records = [r for rs in read_jsonl_dir(tmp_path / "out").values() for r in rs]
    assert sorted(r["n"] for r in records) == list(range(5000))
