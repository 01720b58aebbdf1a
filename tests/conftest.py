"""Shared test helpers: run the installed `pipeline` command as a user would."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_broker import kafka  # noqa: F401  (the `kafka` fixture: a real broker)

BIN = Path(sys.executable).parent


def pipeline_exe() -> str:
    exe = BIN / "pipeline"
    if not exe.exists():
        pytest.fail(f"the `pipeline` console script is not installed next to {sys.executable}; run `pip install -e .`")
    return str(exe)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [pipeline_exe(), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_jsonl_dir(directory: Path) -> dict[str, list[dict]]:
    """Output of the jsonl sink: file name -> records."""
    out = {}
    for path in sorted(directory.glob("*.jsonl")):
        out[path.name] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module", autouse=True)
def _one_stetl_download_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tests of test_real_world_log.py share the sdist their module fixture downloads
    into pytest's cache; on two pytest-xdist workers at once, both would write (and check)
    the same file. The module holds a lock on the cache directory while it runs there (an
    autouse fixture of module scope is set up before the module's own fixtures)."""
    if request.module.__name__ != "tests.test_real_world_log":
        yield
        return
    lock = Path(request.config.cache.mkdir("stetl-2.1-sdist")) / ".lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield
