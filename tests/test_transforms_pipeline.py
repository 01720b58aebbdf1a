"""Transforms end to end, as a user runs them: pipelines/activity-routed.yaml on the bundled
access logs (rename, mask, filter, cast, drop and route on the source; insert on the Parquet
sink), checked against an independent reading of the logs; the error policy on records a
transform cannot handle; and `pipeline validate` on transform mistakes."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import duckdb

from tests.conftest import read_jsonl_dir, run_cli
from tests.test_activity_tracking import COMBINED

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "pipelines" / "activity-routed.yaml"
LOGS = REPO / "pipelines" / "logs"
SALT = "test-salt:"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def read_logs() -> list[tuple[str, int, str]]:
    """(file name, line number, line) of every non-empty line of the bundled logs."""
    out = []
    for path in sorted(LOGS.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            out += [(path.name, n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    return out


def expected_outcome(line: str) -> tuple[str, tuple | None]:
    """What the spec's chain does with one log line, worked out without the pipeline:
    ("malformed" | "error" | "filtered" | "writes" | "pageviews", (client_ip, method, path, status))."""
    m = COMBINED.match(line)
    if not m:
        return "malformed", None
    host, _, _, _, request, status, _, _, agent = m.groups()
    parts = request.split(" ")
    method, path = (parts[0], parts[1]) if len(parts) == 3 else (None, None)
    agent = agent.replace('\\"', '"')
    if path is None:
        return "error", None  # `path.startswith(...)` on a null path
    if path.startswith(("/static/", "/img/")) or path == "/favicon.ico" or "bot" in agent.lower():
        return "filtered", None
    client_ip = hashlib.sha256((SALT + host).encode()).hexdigest()
    return ("writes" if method in WRITES else "pageviews"), (client_ip, method, path, status)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PIPELINE_STATE": str(tmp_path / "state"), "OUT_DIR": str(tmp_path / "out"), "MASK_SALT": SALT, **extra}


def test_activity_routed_cleans_masks_filters_and_routes_the_bundled_logs(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    result = run_cli("run", SPEC, "--once", env=env, timeout=300)
    assert result.returncode == 0, result.stderr

    outcomes = [(name, n, *expected_outcome(line)) for name, n, line in read_logs()]
    by_kind = collections.Counter(kind for _, _, kind, _ in outcomes)
    assert by_kind["malformed"] and by_kind["error"] and by_kind["filtered"] and by_kind["writes"]
    # The summary counts what the filter left out apart from the errors.
    source_row = next(line.split() for line in result.stderr.splitlines() if line.startswith("access-logs "))
    # read = delivered + filtered + dead-lettered: malformed lines were read too.
    assert source_row[1:6] == ["source", f"{len(outcomes):,}",
                               f"{by_kind['pageviews'] + by_kind['writes']:,}", f"{by_kind['filtered']:,}",
                               f"{by_kind['malformed'] + by_kind['error']:,}"]
    expected = {kind: collections.Counter(rec for _, _, k, rec in outcomes if k == kind) for kind in ("pageviews", "writes")}

    # pageviews: Parquet, with the sink's insert (partition, offset) and the source's shape.
    glob = f"{tmp_path}/out/pageviews/**/*.parquet"
    db = duckdb.connect()
    columns = [c[0] for c in db.execute(f"describe select * from read_parquet('{glob}')").fetchall()]
    assert "client_ip" in columns and "remote_host" not in columns and "ident" not in columns
    assert columns[columns.index("user_agent") + 1:][:2] == ["kafka_partition", "kafka_offset"]
    got = db.execute(f"select client_ip, method, path, status from read_parquet('{glob}')").fetchall()
    assert len(got) == sum(expected["pageviews"].values()) == by_kind["pageviews"]
    assert collections.Counter(got) == expected["pageviews"]
    assert db.execute(f"select typeof(status) from read_parquet('{glob}') limit 1").fetchone() == ("VARCHAR",)
    # Each record's Kafka position, as the insert transform saw it: every offset once per partition.
    positions = db.execute(
        f"select kafka_partition, count(*), count(distinct kafka_offset), min(kafka_offset), max(kafka_offset) "
        f"from read_parquet('{glob}') group by 1 order by 1"
    ).fetchall()
    assert [p for p, *_ in positions] == [0, 1, 2, 3]
    assert all(n == distinct == hi + 1 and lo == 0 for _, n, distinct, lo, hi in positions)

    # writes: JSON lines, routed by method.
    writes = [r for records in read_jsonl_dir(tmp_path / "out" / "writes").values() for r in records]
    assert collections.Counter((r["client_ip"], r["method"], r["path"], r["status"]) for r in writes) == expected["writes"]
    assert {r["method"] for r in writes} == {"POST"} and "remote_host" not in writes[0]

    # Filtered records are nowhere; the masked addresses are no addresses.
    everything = got + [(r["client_ip"], r["method"], r["path"], r["status"]) for r in writes]
    assert not [p for _, _, p, _ in everything if p.startswith(("/static/", "/img/")) or p == "/favicon.ico"]
    assert all(len(ip) == 64 and "." not in ip and ":" not in ip for ip, *_ in everything)
    bots = db.execute(f"select count(*) from read_parquet('{glob}') where lower(user_agent) like '%bot%'").fetchone()
    assert bots == (0,)

    # The records the filter could not evaluate are in the dead-letter topic, field named.
    dlq = run_cli("consume", "activity-routed-dlq", "--from-beginning", "--spec", SPEC, env=env)
    assert dlq.returncode == 0, dlq.stderr
    letters = [json.loads(line) for line in dlq.stdout.splitlines()]
    failed = [d for d in letters if d["stage"] == "transform"]
    assert sorted((Path(d["position"].rsplit(":", 1)[0]).name, int(d["position"].rsplit(":", 1)[1])) for d in failed) \
        == sorted((name, n) for name, n, kind, _ in outcomes if kind == "error")
    assert all(d["field"] == "path" and d["error"].startswith("filter: ") and "field 'path' is null" in d["error"]
               and d["connector"] == "access-logs" for d in failed)
    record = json.loads(failed[0]["record"])  # the record as the filter got it: renamed and masked
    assert record["path"] is None and len(record["client_ip"]) == 64 and "remote_host" not in record
    assert len([d for d in letters if d["stage"] == "source"]) == by_kind["malformed"]
    assert len(letters) == by_kind["malformed"] + by_kind["error"]

    # Exactly once: a second run adds nothing anywhere.
    again = run_cli("run", SPEC, "--once", env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert db.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == by_kind["pageviews"]
    assert sum(map(len, read_jsonl_dir(tmp_path / "out" / "writes").values())) == by_kind["writes"]


def test_with_tolerance_none_a_record_the_filter_cannot_evaluate_stops_the_run(tmp_path: Path) -> None:
    # The spec as shipped, next to a log of well-formed lines in which one request was
    # logged without a request line ("-").
    shutil.copy(SPEC, tmp_path / "spec.yaml")
    (tmp_path / "schemas").mkdir()
    shutil.copy(REPO / "pipelines" / "schemas" / "pageview.avsc", tmp_path / "schemas")
    good = [line for _, _, line in read_logs() if COMBINED.match(line)]
    first = next(i for i, line in enumerate(good) if expected_outcome(line)[0] == "error")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "access.log").write_text("\n".join(good[: first + 20]) + "\n")

    result = run_cli("run", tmp_path / "spec.yaml", "--once", env=env_for(tmp_path, ERRORS_TOLERANCE="none"))
    assert result.returncode == 1, result.stderr
    assert f"access.log:{first + 1} (field 'path'): filter: cannot evaluate drop" in result.stderr
    assert "access-logs: transform error" in result.stderr and "field 'path' is null" in result.stderr
    assert "record: {'client_ip': '" in result.stderr and "'request': '-'" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_reports_transform_mistakes_with_file_and_line(tmp_path: Path) -> None:
    shutil.copy(REPO / "pipelines" / "schemas" / "pageview.avsc", tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(
        """\
        name: bad-transforms
        topics:
          hits: {schema: pageview.avsc}
        sources:
          - name: logs
            connector: http_log
            topic: hits
            config: {paths: ["*.log"]}
            transforms:
              - rname: {fields: {remote_host: client_ip}}
              - mask: {fields: [client_ip], hashh: true}
              - filter: {drop: "status >= "}
        sinks:
          - name: out
            connector: jsonl
            topics: [hits]
            config: {path: out}
            transforms:
              - route: {field: method, topics: {POST: hits}}
        """
    ))
    result = run_cli("validate", spec)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(spec))]
    assert len(lines) == 4, result.stderr
    assert f"{spec}:10:" in lines[0] and "unknown transform 'rname'" in lines[0] and "did you mean 'rename'" in lines[0]
    assert f"{spec}:11:" in lines[1] and "hashh" in lines[1] and "did you mean 'hash'" in lines[1]
    assert f"{spec}:12:" in lines[2] and "syntax error in 'status >= '" in lines[2]
    assert f"{spec}:19:" in lines[3] and "'route' works on sources only, not on a sink" in lines[3]
    assert "Traceback" not in result.stderr


def test_validate_reports_routes_to_undeclared_topics_and_fields_the_schema_lacks(tmp_path: Path) -> None:
    shutil.copy(REPO / "pipelines" / "schemas" / "pageview.avsc", tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(
        """\
        name: bad-routes
        topics:
          hits: {schema: pageview.avsc}
        sources:
          - name: logs
            connector: http_log
            topic: hits
            config: {paths: ["*.log"]}
            transforms:
              - route: {field: method, topics: {POST: writez}}
        sinks:
          - name: out
            connector: jsonl
            topics: [hits]
            config: {path: out}
            transforms:
              - cast: {fields: {stauts: int}}
        """
    ))
    result = run_cli("validate", spec)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(spec))]
    assert len(lines) == 2, result.stderr
    assert f"{spec}:10:" in lines[0] and "routes to topic 'writez', which is not declared under topics" in lines[0]
    assert f"{spec}:16:" in lines[1] and "cast: field 'stauts' is not in the record schema (fields: client_ip" in lines[1]
