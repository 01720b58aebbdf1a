"""`pipeline new-plugin`: the package it writes installs, passes its own tests, registers
its connector or transform, and its example spec runs, for each kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_jsonl_dir, run_cli

# kind -> (NAME, the connector's or transform's name: NAME without a `pipeline-` prefix)
PLUGINS = {
    "source": ("my-source", "my-source"),
    "sink": ("acme.sink", "acme.sink"),
    "transform": ("pipeline-shout", "shout"),
}


def created_files(stdout: str) -> list[Path]:
    return [Path(line.removeprefix("created ")) for line in stdout.splitlines() if line.startswith("created ")]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.slow  # installs each package, runs its own test session and its example
@pytest.mark.parametrize("kind", list(PLUGINS))
def test_new_plugin_installs_tests_registers_and_runs(kind: str, tmp_path: Path) -> None:
    dist, name = PLUGINS[kind]
    module = dist.replace("-", "_").replace(".", "_")
    made = run_cli("new-plugin", dist, f"--{kind}", "--dir", tmp_path)
    assert made.returncode == 0, made.stderr
    root = tmp_path / dist
    files = created_files(made.stdout)
    assert all(path.is_file() for path in files), files
    assert {str(p.relative_to(root)) for p in files} >= {
        "pyproject.toml", "README.md", f"{module}.py", "example.yaml", ".gitignore", f"tests/test_{module}.py",
    }
    assert f"pipeline run {root / 'example.yaml'} --once" in made.stdout
    assert f'[project.entry-points.pipeline]\n"{name}" = "{module}"' in (root / "pyproject.toml").read_text()

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(root)],
        check=True, capture_output=True, timeout=300,
    )
    env = {"PYTHONPATH": str(site)}

    # The generated tests pass (conformance check, behaviour, the example spec in-process).
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=root, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout and "skipped" not in tests.stdout

    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert plugins[name]["distribution"] == dist
    assert plugins[name]["connectors"] == [f"{kind}:{name}"]
    assert plugins[name]["error"] is None

    # The example runs as a user runs it, output and state redirected into tmp_path.
    env |= {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    run = run_cli("run", root / "example.yaml", "--once", env=env)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    if kind == "source":
        records = read_jsonl_dir(out)["events-0.jsonl"]
        assert [r["id"] for r in records] == list(range(1000))
        assert records[42] == {"id": 42, "message": "hello 42"}
    elif kind == "sink":
        assert lines_of(out / "orders.jsonl") == lines_of(root / "sample.jsonl")
    else:
        sample = {r["id"]: r for r in lines_of(root / "sample.jsonl")}
        records = read_jsonl_dir(out)["orders-0.jsonl"]
        assert records == [{**sample[i], "label": sample[i]["name"].upper()} for i in (1, 2, 3, 4, 6, 7, 8)]
        dlq = run_cli("consume", "orders-dlq", "--from-beginning", "--spec", root / "example.yaml", env=env)
        assert dlq.returncode == 0, dlq.stderr
        (dead,) = [json.loads(line) for line in dlq.stdout.splitlines() if line]
        assert (dead["stage"], dead["field"], json.loads(dead["record"])["id"]) == ("transform", "name", 5)

    again = run_cli("run", root / "example.yaml", "--once", env=env)  # resumes: nothing twice
    assert again.returncode == 0, again.stderr
    assert sum(len(rs) for rs in read_jsonl_dir(out).values()) == {"source": 1000, "sink": 8, "transform": 7}[kind]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("my source", "is not a valid plugin name"),
        ("x-", "is not a valid plugin name"),
        ("9lives", "is not a valid plugin name"),
        ("json", "shadows an existing module"),
        ("class", "shadows a Python keyword"),
        ("pipeline-jsonl", "the source name 'jsonl' is already registered by plugin 'builtin'"),
    ],
)
def test_bad_names_are_refused(name: str, message: str, tmp_path: Path) -> None:
    result = run_cli("new-plugin", name, "--dir", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert lines[1].startswith("hint: ") and len(lines) == 2
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_existing_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "my-sink").mkdir()
    (tmp_path / "my-sink" / "notes.txt").write_text("mine")
    result = run_cli("new-plugin", "my-sink", "--sink", "--dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: {tmp_path / 'my-sink'} already exists and is not empty (a directory)"
    assert [p.name for p in (tmp_path / "my-sink").iterdir()] == ["notes.txt"]

    (tmp_path / "empty").mkdir()  # an empty directory is fine
    result = run_cli("new-plugin", "empty", "--dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "empty" / "empty.py").is_file()
