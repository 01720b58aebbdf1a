"""A new user's first hour, through the CLI: a schema that does not fit the log, a run that
delivers nothing, one way to give the spec, JSON output, read-only inspection, and errors a
user can act on."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import duckdb
import pytest

from tests.conftest import pipeline_exe, run_cli

REPO = Path(__file__).resolve().parents[1]
ACTIVITY = json.loads((REPO / "pipelines" / "schemas" / "activity.avsc").read_text())


def activity_spec(tmp_path: Path, schema: dict, *, extra: str = "", sink: str = "parquet") -> Path:
    """The bundled access logs into a topic of `schema`, then to `sink`."""
    shutil.copytree(REPO / "pipelines" / "logs", tmp_path / "logs", dirs_exist_ok=True)
    (tmp_path / "activity.avsc").write_text(json.dumps(schema))
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: first-hour
        topics:
          activity: {{partitions: 4, schema: activity.avsc, key: remote_host}}
        sources:
          - name: access-logs
            connector: http_log
            topic: activity
            config: {{paths: ["logs/access.log", "logs/access.log.*"], format: combined}}
        sinks:
          - name: lake
            connector: {sink}
            topics: [activity]
            config: {{path: out}}
        errors: {{tolerance: all}}
        """) + extra)
    return spec


def without(schema: dict, *names: str) -> dict:
    return {**schema, "fields": [f for f in schema["fields"] if f["name"] not in names]}


def bundled_lines() -> list[str]:
    import gzip

    logs = REPO / "pipelines" / "logs"
    text = (logs / "access.log").read_text() + (logs / "access.log.1").read_text()
    text += gzip.decompress((logs / "access.log.2.gz").read_bytes()).decode()
    return [line for line in text.splitlines() if line.strip()]


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
    """The first line of the process's stderr holding `text` (fails after `timeout`)."""
    import selectors
    import time

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        seen = []
        while time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                line = proc.stderr.readline()
                if not line:
                    break
                seen.append(line)
                if text in line:
                    return line
    pytest.fail(f"no line with {text!r} in {timeout}s; stderr so far:\n{''.join(seen)}")


def test_a_schema_without_request_is_a_warning_and_the_run_delivers_every_line(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, without(ACTIVITY, "request"))
    checked = run_cli("validate", spec)
    assert checked.returncode == 0, checked.stderr
    [warning] = [line for line in checked.stderr.splitlines() if "warning" in line]
    assert warning.startswith(f"{spec}:7: sources[0].topic: warning:") and "'request'" in warning
    assert "1 warning(s)" in checked.stdout

    ran = run_cli("run", spec, "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)  # stdout holds only the JSON
    source, sink = summary["connectors"]
    lines = bundled_lines()
    malformed = source["dead_lettered"]
    assert source["read"] == len(lines) and 0 < malformed < 20
    assert source["delivered"] == len(lines) - malformed == sink["delivered"]
    assert source["read"] == source["delivered"] + source["filtered"] + source["dead_lettered"] + source["pending"]
    assert source["dropped_fields"] == {"request": source["delivered"]}
    assert ran.stderr.count("field 'request' is not in the schema") == 1  # warned once
    rows = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/out/activity/**/*.parquet')").fetchall()[0][0]
    assert rows == source["delivered"]

    # The table says the same, and how it adds up.
    again = run_cli("run", spec, "--once")
    assert "(read = delivered + dead-lettered)" in again.stderr


def test_a_field_the_schema_requires_and_the_source_never_produces_is_an_error(tmp_path: Path) -> None:
    schema = {**ACTIVITY, "fields": [*ACTIVITY["fields"], {"name": "country", "type": "string"}]}
    checked = run_cli("validate", activity_spec(tmp_path, schema))
    assert checked.returncode == 2
    assert "requires field 'country'" in checked.stderr and "never produces" in checked.stderr


def test_a_once_run_that_delivers_nothing_exits_1_naming_the_first_error_and_how_to_see_the_rest(
        tmp_path: Path) -> None:
    schema = {**ACTIVITY, "fields": [dict(f, type=["null", "boolean"]) if f["name"] == "status" else f
                                     for f in ACTIVITY["fields"]]}
    spec = activity_spec(tmp_path, schema)
    ran = run_cli("run", spec, "--once")
    assert ran.returncode == 1, ran.stderr
    assert "error: nothing was delivered:" in ran.stderr
    # The first in input order: the oldest rotated file is read first.
    assert "the first: access-logs: encode error at" in ran.stderr and "access.log.2.gz:1 (field 'status')" in ran.stderr
    assert f"hint: see them all: pipeline consume first-hour-dlq --from-beginning --spec {spec}" in ran.stderr
    hint = ran.stderr.split("hint: see them all: ")[1].splitlines()[0]
    shown = subprocess.run([pipeline_exe(), *hint.split()[1:], "--max", "1"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout)["connector"] == "access-logs"


def test_a_following_run_warns_once_after_1000_dead_letters_in_a_row(tmp_path: Path) -> None:
    schema = {**ACTIVITY, "fields": [dict(f, type=["null", "boolean"]) if f["name"] == "status" else f
                                     for f in ACTIVITY["fields"]]}
    spec = activity_spec(tmp_path, schema)
    spec.write_text(spec.read_text().replace("format: combined}", "format: combined, follow: true}"))
    proc = subprocess.Popen([pipeline_exe(), "run", spec, "--no-progress"], stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for_line(proc, "records in a row went to the dead-letter topic")
        assert "none was delivered" in line and "pipeline consume first-hour-dlq" in line
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0
    assert "in a row" not in rest  # once


def test_every_command_takes_its_spec_the_same_way(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, ACTIVITY)
    assert run_cli("run", spec, "--once").returncode == 0
    for args in (["offsets"], ["validate"], ["runs"]):
        by_argument = run_cli(*args, spec)
        by_option = run_cli(*args, "-s", spec)
        by_default = run_cli(*args, cwd=tmp_path)  # ./pipeline.yaml ...
        assert by_argument.returncode == 0, (args, by_argument.stderr)
        assert by_option.stdout == by_argument.stdout, args
        assert by_default.returncode == 2 and "no spec given, and there is no ./pipeline.yaml" in by_default.stderr
    shutil.copy(spec, tmp_path / "pipeline.yaml")
    assert run_cli("topics", "list", cwd=tmp_path).stdout == run_cli("topics", "list", spec).stdout
    both = run_cli("topics", "list", spec, "--spec", tmp_path / "other.yaml")
    assert both.returncode == 2 and "two specs given" in both.stderr


@pytest.mark.slow  # about 20 commands, each a process
def test_json_of_every_command_is_one_document_on_stdout(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, ACTIVITY)
    assert run_cli("run", spec, "--once").returncode == 0
    commands = [
        ["validate"], ["schedule"], ["schemas", "list"], ["schemas", "show", "activity-value"], ["runs"],
        ["topics", "list"], ["topics", "describe", "activity"], ["offsets"],
        ["consume", "first-hour-dlq", "--from-beginning"], ["consume", "activity", "--from-beginning", "--max", "3"],
        ["run", "--once"], ["plugins"], ["connectors", "list"], ["transforms", "list"],
    ]
    for args in commands:
        result = subprocess.run([pipeline_exe(), *args[:1], *args[1:], "--json", *([] if args[0] in (
            "connectors", "transforms") else [str(spec)])], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (args, result.stderr)
        checked = subprocess.run(["python", "-m", "json.tool"], input=result.stdout, capture_output=True, text=True)
        assert checked.returncode == 0, (args, result.stdout[:500])
    dlq = json.loads(run_cli("consume", "first-hour-dlq", "--from-beginning", "--json", spec).stdout)
    assert dlq and all(d["connector"] == "access-logs" for d in dlq)
    offsets = json.loads(run_cli("offsets", "--json", spec).stdout)
    assert [s["name"] for s in offsets["sources"]] == ["access-logs"] and offsets["sources"][0]["offsets"]
    assert {p["lag"] for p in offsets["sinks"][0]["partitions"]} == {0}


def test_inspection_works_where_the_user_cannot_write_and_while_a_run_writes(tmp_path: Path) -> None:
    """`unshare -U` runs a command as a user without root's override of file permissions:
    the read-only state directory is then read-only for it too."""
    spec = activity_spec(tmp_path, ACTIVITY)
    spec.write_text(spec.read_text().replace("format: combined}", "format: combined}\n    schedule: {every: 1h}"))
    assert run_cli("run", spec, "--once").returncode == 0
    state = tmp_path / ".pipeline" / "first-hour"
    for path in [state, *state.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    as_reader = ["unshare", "-U", pipeline_exe()]
    denied = subprocess.run(["unshare", "-U", "touch", str(state / "x")], capture_output=True, text=True)
    assert denied.returncode != 0, "unshare -U should take away the right to write"
    for args in (["topics", "list"], ["topics", "describe", "activity"], ["offsets"], ["schemas", "list"],
                 ["runs"], ["consume", "activity", "--from-beginning", "--max", "5"],
                 ["consume", "first-hour-dlq", "--from-beginning"]):
        result = subprocess.run([*as_reader, *args, str(spec)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.strip(), args
    assert sorted(p.name for p in state.iterdir()) == ["broker.db", "run.lock", "runs.db", "schemas.db"]  # nothing added
    for path in [state, *state.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    # While a following run holds the state directory (its -wal and -shm files exist).
    spec.write_text(spec.read_text().replace("format: combined}", "format: combined, follow: true}")
                    .replace("\n    schedule: {every: 1h}", ""))
    proc = subprocess.Popen([pipeline_exe(), "run", spec, "--no-progress"], stderr=subprocess.PIPE, text=True)
    try:
        while not (state / "broker.db-wal").exists():
            assert proc.poll() is None, proc.stderr.read()
        state.chmod(0o555)
        listed = subprocess.run([*as_reader, "topics", "list", "--json", str(spec)], capture_output=True,
                                text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert {t["name"] for t in json.loads(listed.stdout)} >= {"activity", "first-hour-dlq"}
    finally:
        state.chmod(0o755)
        proc.terminate()
        proc.communicate(timeout=60)


def test_unwritable_state_and_output_say_the_path_the_cause_and_what_to_do(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, ACTIVITY, sink="jsonl")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    text = spec.read_text()
    spec.write_text(text.replace("name: first-hour\n", f"name: first-hour\nstate_dir: {locked}/state\n"))
    ran = subprocess.run(["unshare", "-U", pipeline_exe(), "run", str(spec), "--once"], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 1
    assert f"error: state directory: {locked}/state: permission denied" in ran.stderr
    assert "hint: give this user access to it" in ran.stderr and "Traceback" not in ran.stderr
    assert "--debug" not in ran.stderr  # nothing more to see

    spec.write_text(text.replace("config: {path: out}", f"config: {{path: {locked}/out}}"))
    ran = subprocess.run(["unshare", "-U", pipeline_exe(), "run", str(spec), "--once"], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 1
    assert f"error: lake: {locked}/out: permission denied" in ran.stderr and "Traceback" not in ran.stderr


def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_loses_nothing(tmp_path: Path) -> None:
    """The output on a 64 KiB file system of its own (a private mount namespace)."""
    spec = activity_spec(tmp_path, ACTIVITY, sink="jsonl")
    small = tmp_path / "small"
    small.mkdir()
    spec.write_text(spec.read_text().replace("config: {path: out}", f"config: {{path: {small}/out}}"))
    script = f'mount -t tmpfs -o size=64k tmpfs {small} && exec {pipeline_exe()} run {spec} --once'
    ran = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr
    assert f"error: lake: {small}/out/: no space left on device" in ran.stderr, ran.stderr
    assert "hint: free some space there" in ran.stderr and "Traceback" not in ran.stderr
    # With room again, the same state delivers every line once: the output equals that of
    # a run that never met a full disk.
    again = run_cli("run", spec, "--once")
    assert again.returncode == 0, again.stderr
    spec.write_text(spec.read_text().replace(f"{small}/out", f"{tmp_path}/clean").replace(
        "name: first-hour\n", f"name: first-hour\nstate_dir: {tmp_path}/clean-state\n"))
    assert run_cli("run", spec, "--once").returncode == 0

    def records(directory: Path) -> list[str]:
        return sorted(line for f in directory.glob("*.jsonl") for line in f.read_text().splitlines())

    assert records(small / "out") == records(tmp_path / "clean") != []


def test_unknown_connectors_and_enum_values_get_help_that_fits(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, ACTIVITY, sink="sqlite")
    checked = run_cli("validate", spec)
    assert checked.returncode == 2
    assert ("unknown sink connector 'sqlite'; the example plugin pipeline-sqlite provides it: "
            f"python -m pip install -e {REPO / 'plugins' / 'pipeline-sqlite'} (installed: ") in checked.stderr
    assert "did you mean" not in checked.stderr  # nothing unrelated
    spec = activity_spec(tmp_path, ACTIVITY, extra="")
    spec.write_text(spec.read_text().replace("format: combined}", "format: combined}\n    transforms: []")
                    .replace("connector: parquet\n    topics: [activity]\n    config: {path: out}",
                             "connector: parquet\n    topics: [activity]\n    config: {path: out, compression: zstdd}")
                    .replace("tolerance: all", "tolerance: al"))
    checked = run_cli("validate", spec)
    assert "compression: expected one of" in checked.stderr and "did you mean 'zstd'?" in checked.stderr
    assert "errors.tolerance: expected 'none' or 'all', got 'al'; did you mean 'all'?" in checked.stderr


def test_a_glob_that_matches_nothing_is_a_warning(tmp_path: Path) -> None:
    spec = activity_spec(tmp_path, ACTIVITY)
    spec.write_text(spec.read_text().replace('"logs/access.log.*"', '"logz/*.log"'))
    checked = run_cli("validate", spec)
    assert checked.returncode == 0, checked.stderr
    assert "sources[0].config.paths: warning: 'logz/*.log' matches no file (yet)" in checked.stderr


def test_progress_is_a_plain_line_every_10_seconds_off_a_terminal() -> None:
    from io import StringIO

    from runner.connector import Progress
    from runner.progress import progress_display
    from runner.worker import Counters

    out = StringIO()
    show = progress_display(out, live=False)
    c = Counters("access-logs", "source", records_in=5_000)
    c.progress = {0: Progress(1024 * 1024, 4 * 1024 * 1024)}
    show([c], 5.0)
    assert out.getvalue() == ""  # not yet
    show([c], 10.0)
    c.records_in, c.progress = 10_000, {0: Progress(2 * 1024 * 1024, 4 * 1024 * 1024)}
    show([c], 20.0)
    first, second = out.getvalue().splitlines()
    assert first.startswith("pipeline: [10s] access-logs 5,000 read (500/s), 25% of 4.0 MiB")
    assert second == "pipeline: [20s] access-logs 10,000 read (500/s), 50% of 4.0 MiB, ETA 20s"


def test_the_jsonl_sink_cuts_a_half_written_tail_on_restart(tmp_path: Path) -> None:
    """What a crash mid-write leaves past the last committed mark is cut, not read as data."""
    spec = activity_spec(tmp_path, ACTIVITY, sink="jsonl")
    assert run_cli("run", spec, "--once").returncode == 0
    out = tmp_path / "out" / "activity-0.jsonl"
    committed = out.read_text()
    with out.open("a") as f:
        f.write('{"remote_host": "half-writ')  # a crash in the middle of a line
    log = tmp_path / "logs" / "access.log"
    log.write_text(log.read_text() + '203.0.113.9 - - [20/Nov/2026:13:00:00 +0000] "GET /new HTTP/1.1" 200 5 "-" "x"\n')
    assert run_cli("run", spec, "--once").returncode == 0
    lines = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert out.read_text().startswith(committed) and "half-writ" not in out.read_text()
    assert [r["path"] for r in lines].count("/new") == 1


def test_progress_on_a_terminal_is_a_bar_per_connector() -> None:
    from io import StringIO

    from runner.connector import Progress
    from runner.progress import progress_display
    from runner.worker import Counters

    out = StringIO()
    show = progress_display(out, live=True)
    source, sink = Counters("access-logs", "source", records_in=5_000), Counters("lake", "sink", records_in=4_000)
    source.progress = {0: Progress(1024 * 1024, 4 * 1024 * 1024)}
    show([source, sink], 1.0)
    show.clear()
    text = out.getvalue()
    assert "access-logs" in text and "25%" in text and "1.00M/4.00M" in text
    assert "lake" in text and "4.00k" in text
