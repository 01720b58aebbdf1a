"""The example plugins in plugins/ install as packages and run in their pipelines."""

from __future__ import annotations

import collections
import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import ua_parser

from tests.conftest import read_jsonl_dir, run_cli
from tests.test_activity_tracking import COMBINED, bundled_lines

REPO = Path(__file__).resolve().parents[1]


def install(plugin: str, target: Path) -> dict[str, str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO / "plugins" / plugin)],
        check=True, capture_output=True, timeout=300,
    )
    return {"PYTHONPATH": str(target)}


@pytest.mark.slow  # installs the package, runs its own test session and the pipeline
def test_sequence_plugin_runs_and_resumes(tmp_path: Path) -> None:
    env = install("pipeline-sequence", tmp_path / "site")
    run_plugin_tests("pipeline-sequence", env)
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


# Each example plugin, installed and run by a test below that also runs its own tests.
PLUGINS = {"pipeline-sequence", "pipeline-useragent", "pipeline-sqlite"}


def test_every_example_plugin_has_tests_and_is_tested_here() -> None:
    found = {p.name for p in (REPO / "plugins").iterdir() if (p / "pyproject.toml").is_file()}
    assert found == PLUGINS, "a plugin in plugins/ is missing from this module's tests (or gone)"
    for plugin in sorted(found):
        assert list((REPO / "plugins" / plugin / "tests").glob("test_*.py")), f"{plugin} has no tests/test_*.py"
        assert "testpaths" in (REPO / "plugins" / plugin / "pyproject.toml").read_text(), f"{plugin}: no pytest settings of its own"


def run_plugin_tests(plugin: str, env: dict[str, str]) -> None:
    """The plugin's own tests (conformance and unit tests), against the installed package."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"plugins/{plugin}/tests"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]


@pytest.mark.slow  # installs the package, runs its own test session and the pipeline
def test_useragent_plugin_enriches_the_access_logs(tmp_path: Path) -> None:
    env = install("pipeline-useragent", tmp_path / "site")  # --no-deps: ua-parser comes from the test extra
    run_plugin_tests("pipeline-useragent", env)
    env |= {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out")}
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert plugins["useragent"]["distribution"] == "pipeline-useragent"
    assert plugins["useragent"]["connectors"] == ["transform:useragent"]

    spec = REPO / "pipelines" / "activity-useragent.yaml"
    result = run_cli("run", spec, "--once", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = bundled_lines()
    good = [m for m in map(COMBINED.match, lines) if m]
    # The user agent of each good line, as http_log gives it ("-" is null, \" unescaped).
    agents = collections.Counter(None if m.group(9) == "-" else m.group(9).replace('\\"', '"') for m in good)

    glob = f"{tmp_path}/out/activity_ua/**/*.parquet"
    db = duckdb.connect()
    columns = {name: kind for name, kind, *_ in db.execute(f"describe select * from read_parquet('{glob}')").fetchall()}
    assert {"browser", "browser_version", "os", "device", "is_bot"} <= set(columns) and columns["is_bot"] == "BOOLEAN"
    assert db.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == len(good)
    # Every line's fields are what ua-parser itself makes of its user agent.
    found = db.execute(
        f"select user_agent, browser, os, device, is_bot, count(*) from read_parquet('{glob}') group by all"
    ).fetchall()
    assert {ua: n for ua, *_, n in found} == dict(agents)
    for ua, browser, os_, device, is_bot, _ in found:
        parsed = ua_parser.parse(ua) if ua else None
        assert browser == (parsed.user_agent.family if parsed and parsed.user_agent else None), ua
        assert os_ == (parsed.os.family if parsed and parsed.os else None), ua
        assert device == (parsed.device.family if parsed and parsed.device else None), ua
        assert is_bot == (device == "Spider"), ua
    googlebot = sum(n for ua, n in agents.items() if ua and "Googlebot" in ua)
    assert googlebot > 0
    assert db.execute(
        f"select count(*) from read_parquet('{glob}') where is_bot and browser = 'Googlebot'"
    ).fetchone()[0] == googlebot
    assert db.execute(f"select count(*) from read_parquet('{glob}') where is_bot").fetchone()[0] > googlebot

    dlq = run_cli("consume", "activity-ua-dlq", "--from-beginning", "--spec", spec, env=env)
    assert len(dlq.stdout.splitlines()) == len(lines) - len(good)
    again = run_cli("run", spec, "--once", env=env, timeout=300)  # exactly once: nothing new
    assert again.returncode == 0, again.stderr
    assert db.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == len(good)


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def last_updates(path: Path) -> dict[int, dict]:
    """Each order's last update in the file, read independently of the pipeline."""
    last: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            update = json.loads(line)
            last[update["order_id"]] = update
    return last


@pytest.mark.slow  # installs the package, runs its own test session and the pipeline
def test_sqlite_plugin_upserts_order_updates(tmp_path: Path) -> None:
    env = install("pipeline-sqlite", tmp_path / "site")
    run_plugin_tests("pipeline-sqlite", env)
    orders = tmp_path / "order-updates.jsonl"
    shutil.copy(REPO / "pipelines" / "data" / "order-updates.jsonl", orders)
    env |= {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out"), "ORDERS": str(orders)}
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert plugins["sqlite"]["distribution"] == "pipeline-sqlite"
    assert plugins["sqlite"]["connectors"] == ["sink:sqlite"]

    spec = REPO / "pipelines" / "sqlite-upsert.yaml"
    db = tmp_path / "out" / "orders.db"

    def check() -> None:
        expected = last_updates(orders)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("select order_id, status, version, updated_at from orders").fetchall()
            written = conn.execute("select sum(next_offset) from _pipeline_offsets").fetchone()[0]
        assert len(rows) == len(expected)
        for order_id, status, version, updated_at in rows:
            last = expected[order_id]
            assert (status, version) == (last["status"], last["version"]), order_id
            at = EPOCH + datetime.timedelta(milliseconds=last["updated_at"])
            assert updated_at == at.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # ISO text, UTC
        # Every update went through the table once: the offsets cover every line.
        assert written == sum(1 for line in orders.read_text().splitlines() if line.strip())

    first = run_cli("run", spec, "--once", env=env)
    assert first.returncode == 0, first.stderr
    assert str(db) in first.stderr, "the summary says where the database is"
    assert len(last_updates(orders)) == 200
    check()
    again = run_cli("run", spec, "--once", env=env)
    assert again.returncode == 0, again.stderr
    check()

    # New updates arrive: some orders move on, new ones appear.
    base = max(u["updated_at"] for u in last_updates(orders).values())
    changed = [o for o, u in sorted(last_updates(orders).items()) if u["status"] == "delivered"][:25]
    more = [{"order_id": o, "status": "refunded", "version": last_updates(orders)[o]["version"] + 1,
             "customer": "someone", "amount": 1.0, "updated_at": base + i, "note": "late refund"}
            for i, o in enumerate(changed)]
    more += [{"order_id": 1000 + i, "status": "created", "version": 1, "customer": "new", "amount": 2.5,
              "updated_at": base + 100 + i} for i in range(10)]
    with orders.open("a") as f:
        f.writelines(json.dumps(u) + "\n" for u in more)
    third = run_cli("run", spec, "--once", env=env)
    assert third.returncode == 0, third.stderr
    check()
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from orders where note = 'late refund'").fetchone()[0] == 25
        assert conn.execute("select count(*) from orders").fetchone()[0] == 210
