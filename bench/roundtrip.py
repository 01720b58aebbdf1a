"""Benchmark: jsonl → schema-checked 4-partition topic → jsonl, on the embedded broker.

Prints records/s end to end and the peak memory of the `pipeline run --once` process,
for N records and 4×N records, so a memory that grows with the input shows up.

    python bench/roundtrip.py [--records 200000]
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

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "user", "type": "string"},
        {"name": "path", "type": "string"},
        {"name": "status", "type": "int"},
        {"name": "bytes", "type": "long"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "agent", "type": ["null", "string"], "default": None},
    ],
}

SPEC = """\
name: bench
topics:
  events: {partitions: 4, schema: event.avsc, key: user}
sources:
  - {name: in, connector: jsonl, topic: events, config: {paths: [input.jsonl], batch_size: 10000}}
sinks:
  - {name: out, connector: jsonl, topics: [events], config: {path: out}}
"""


def make_input(directory: Path, records: int) -> None:
    (directory / "event.avsc").write_text(json.dumps(SCHEMA))
    (directory / "spec.yaml").write_text(SPEC)
    with open(directory / "input.jsonl", "w") as f:
        for i in range(records):
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "user": f"user-{i % 5000}",
                        "path": f"/products/{i % 977}?ref=home",
                        "status": 200 if i % 13 else 404,
                        "bytes": 512 + i % 4096,
                        "ts": 1_700_000_000_000 + i,
                        "agent": "Mozilla/5.0 (X11; Linux x86_64)",
                    }
                )
                + "\n"
            )


def run_once(records: int) -> tuple[float, float]:
    directory = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        make_input(directory, records)
        exe = Path(sys.executable).parent / "pipeline"
        start = time.perf_counter()
        proc = subprocess.Popen([str(exe), "run", "spec.yaml", "--once", "--no-progress"], cwd=directory)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        elapsed = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"pipeline run failed with status {status}")
        return elapsed, usage.ru_maxrss / 1024
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    for n in (args.records, args.records * 4):
        elapsed, peak = run_once(n)
        print(f"{n:>10,} records: {elapsed:6.1f} s, {n / elapsed:>9,.0f} records/s end to end, peak RSS {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
