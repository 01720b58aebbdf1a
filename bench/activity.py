"""Benchmark the flagship job: access logs → http_log → Avro topic (embedded broker) →
parquet, against a hand-written loop of the same libraries (re parse → fastavro encode →
pyarrow Parquet), so the framework's overhead shows as a ratio.

    python bench/activity.py [--lines 1000000]

Each side runs in its own process; peak memory is that process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPEC = """\
name: bench-activity
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: [logs/access.log], format: combined}}}}
sinks:
  - {{name: parquet, connector: parquet, topics: [activity], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""

# The hand-written loop: what a developer would write without a framework.
HAND_LOOP = r'''
import io, re, sys, datetime as dt, json
import fastavro, pyarrow as pa, pyarrow.parquet as pq
log, schema_path, out = sys.argv[1:4]
schema = json.load(open(schema_path))
parsed = fastavro.parse_schema(schema)
LINE = re.compile(r'(\S+) (\S+) (\S+) \[([^\]]+)\] "([^"\\]*(?:\\.[^"\\]*)*)" (\d{3}) (\S+) "([^"\\]*(?:\\.[^"\\]*)*)" "([^"\\]*(?:\\.[^"\\]*)*)"')
MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
def ts(s):
    t = dt.datetime(int(s[7:11]), MONTHS[s[3:6]], int(s[0:2]), int(s[12:14]), int(s[15:17]), int(s[18:20]), tzinfo=dt.timezone.utc)
    off = int(s[22:24]) * 3600 + int(s[24:26]) * 60
    return t - dt.timedelta(seconds=off if s[21] == "+" else -off)
def none(v):
    return None if v == "-" else v
names = [f["name"] for f in schema["fields"]]
arrow = pa.schema([pa.field(n, pa.timestamp("ms", tz="UTC") if n == "timestamp" else pa.int32() if n == "status" else pa.int64() if n == "bytes" else pa.string()) for n in names])
writer = pq.ParquetWriter(out, arrow, compression="zstd")
rows, count, buf = [], 0, io.BytesIO()
def drain():
    global rows
    for r in rows:
        buf.seek(0); buf.truncate(); fastavro.schemaless_writer(buf, parsed, r)
    writer.write_table(pa.Table.from_pylist(rows, schema=arrow)); rows = []
with open(log, encoding="utf-8", errors="replace") as f:
    for line in f:
        m = LINE.match(line)
        if m is None:
            continue
        h, ident, user, t, req, status, size, ref, agent = m.groups()
        parts = req.split(" ")
        ok = len(parts) == 3
        rows.append({n: None for n in names} | {"remote_host": h, "ident": none(ident), "user": none(user), "timestamp": ts(t),
            "method": parts[0] if ok else None, "path": parts[1] if ok else None, "protocol": parts[2] if ok else None,
            "request": req, "status": int(status), "bytes": None if size == "-" else int(size), "referrer": none(ref), "user_agent": none(agent)})
        count += 1
        if len(rows) == 10000:
            drain()
drain(); writer.close()
print(count)
'''


def run(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run and return (seconds, peak RSS MiB of that process, stdout)."""
    start = time.perf_counter()
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(cwd / 'stderr.txt').read_text()}")
    return elapsed, usage.ru_maxrss / 1024, (cwd / "stdout.txt").read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-activity-"))
    try:
        subprocess.run(
            [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(args.lines),
             "--out", str(work / "logs"), "--rotate", "0", "--malformed-every", "0"],
            check=True,
        )
        schema = REPO / "pipelines" / "schemas" / "activity.avsc"
        (work / "spec.yaml").write_text(SPEC.format(schema=json.dumps(str(schema))))
        exe = Path(sys.executable).parent / "pipeline"
        t_pipe, m_pipe, _ = run([str(exe), "run", "spec.yaml", "--once", "--no-progress"], work)
        t_hand, m_hand, out = run([sys.executable, "-c", HAND_LOOP, "logs/access.log", str(schema), "hand.parquet"], work)
        n = args.lines
        print(f"{n:,} lines")
        print(f"pipeline run --once (embedded broker): {t_pipe:6.1f} s  {n / t_pipe:>9,.0f} lines/s  peak RSS {m_pipe:,.0f} MiB")
        print(f"hand-written loop (re→fastavro→pyarrow): {t_hand:6.1f} s  {n / t_hand:>9,.0f} lines/s  peak RSS {m_hand:,.0f} MiB")
        print(f"framework overhead: {t_pipe / t_hand:.2f}× the hand-written loop's time")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
