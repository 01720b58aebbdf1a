"""Kill matrix for scale-out on Kafka (issue 18): two `pipeline run` processes of one spec
in follow mode share a 4-task file source and a 4-partition sink on a Kafka-protocol
broker (Tansu); one of them is killed with SIGKILL at a chosen moment, the other carries
on alone.

    python bench/kafka_kill_matrix.py [--trials 10] [--lines 150000] [--keep]

Each trial starts a fresh broker and both processes at once, kills the first or the second
(alternately) after 2, 4, 6, 8 or 10 s (the first rounds of the groups, the middle of the
read, the tail of the sink's work), waits until the Parquet output holds every line (at
most 120 s), then stops the survivor with SIGTERM (it must exit 0). Per trial it reports:

- lost / doubled: from the topic's end offsets (exactly once from the files into the
  topic: one record per line) and the Parquet files' offset ranges per partition (each
  record of the topic once: ranges tile each partition from 0 to its end);
- idle: how long the killed process's work stood still: from the kill to the last
  "took …" or "task N started here" line the survivor logged for the work it took over;
- pause: how long the survivor's own work stood still: its source tasks are never stopped
  (the script lists any "stopped here" or "gave up" between the kill and the SIGTERM), and
  its sink holds its flow only while it takes the partitions over (flush, reopen: the
  longest "held the flow" it logged).

Exit 1 if anything was lost or doubled or the survivor did not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.kafka_broker import CONSUMER, Tansu  # noqa: E402  (the broker the tests use)

PIPELINE = str(Path(sys.executable).parent / "pipeline")
SCHEMA = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))
FILE = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
DELAYS = [2, 4, 6, 8, 10]


def log_files(root: Path, lines: int) -> None:
    """Four access logs, one per task of `tasks: 4` (names chosen so the CRC-32 split
    gives each task one: with four names picked at random it often does not)."""
    chosen: dict[int, Path] = {}
    i = 0
    while len(chosen) < 4:
        path = (root / "logs" / f"host{i}" / "access.log").resolve()
        chosen.setdefault(zlib.crc32(str(path).encode()) % 4, path)
        i += 1
    for n, path in enumerate(chosen.values()):
        subprocess.run([sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(lines),
                        "--out", str(path.parent), "--rotate", "0", "--malformed-every", "0", "--seed", str(n)],
                       check=True)


def spec(bootstrap: str) -> str:
    broker = json.dumps({"kafka": {"bootstrap_servers": bootstrap, "consumer": CONSUMER}})
    return f"""\
name: kill
broker: {broker}
topics:
  activity: {{partitions: 4, schema: {SCHEMA}, key: remote_host}}
sources:
  - {{name: logs, connector: files, topic: activity, tasks: 4,
     config: {{paths: ["logs/*/access.log"], format: http_log}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake, rotate_records: 20000, max_open_seconds: 2}}}}
"""


def rows(lake: Path) -> int:
    if not list(lake.rglob("*.parquet")):
        return 0
    return duckdb.connect().execute(f"select count(*) from read_parquet('{lake}/**/*.parquet')").fetchone()[0]


def ranges(lake: Path) -> dict[int, set[tuple[int, int]]]:
    found: dict[int, set[tuple[int, int]]] = defaultdict(set)  # parts +1of2, +2of2 share a range
    for f in lake.rglob("*.parquet"):
        m = FILE.match(f.name)
        if m:
            found[int(m.group(1))].add((int(m.group(2)), int(m.group(3))))
    return found


def lost_and_doubled(lake: Path, ends: list[int]) -> tuple[int, int]:
    lost = doubled = 0
    found = ranges(lake)
    for p, end in enumerate(ends):
        covered = [0] * end
        for first, last in found.get(p, ()):
            for o in range(first, min(last, end - 1) + 1):
                covered[o] += 1
        lost += sum(1 for c in covered if c == 0)
        doubled += sum(c - 1 for c in covered if c > 1)
    return lost, doubled


def end_offsets(bootstrap: str) -> list[int]:
    """The topic's ends, as the engine reads them (the fetch's high watermark: Tansu
    answers ListOffsets with the last batch's base offset + 1)."""
    from runner.broker.kafka import KafkaBroker

    async def ends() -> list[int]:
        broker = KafkaBroker({"bootstrap_servers": bootstrap}, "kill", read_only=True)
        await broker.start()
        try:
            return await broker.end_offsets("activity")
        finally:
            await broker.close()

    return asyncio.run(ends())


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def idle(log: str, killed_at: float) -> float | None:
    """From the kill to the survivor's last take-over line after it."""
    took = [t for line in log.splitlines()
            if ("lake: took" in line or re.search(r"logs: task \d started here", line))
            and (t := stamp(line)) is not None and t > killed_at]
    return max(took) - killed_at if took else None


def pause(log: str, killed_at: float, stopped_at: float) -> tuple[float, list[str]]:
    """The survivor's own work between the kill and its SIGTERM: source tasks it stopped
    (there should be none: it only takes more), and the longest time its sink held its
    flow to take partitions over (flush, reopen; logged as "held the flow N ms")."""
    stops, held = [], 0.0
    for line in log.splitlines():
        if "SIGTERM received" in line:
            break  # (what follows is the survivor's own stop)
        t = stamp(line)
        if t is None or not killed_at < t < stopped_at or "pipeline.worker" not in line:
            continue
        if "stopped here" in line or "gave up" in line:
            stops.append(f"+{t - killed_at:.1f}s {line[line.index('pipeline.worker') + 16:]}")
        m = re.search(r"held the flow (\d+) ms", line)
        if m:
            held = max(held, int(m.group(1)) / 1000)
    return held, stops


def trial(root: Path, n: int, lines: int) -> dict:
    work = root / f"trial{n}"
    work.mkdir()
    shutil.copytree(root / "logs", work / "logs")
    tansu = Tansu(work / "tansu.log")
    tansu.wait_ready()
    (work / "spec.yaml").write_text(spec(tansu.bootstrap))
    procs = [subprocess.Popen([PIPELINE, "--debug", "run", "spec.yaml", "--no-progress"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=open(work / f"w{i}.log", "w"))
             for i in range(2)]
    victim, delay = n % 2, DELAYS[(n // 2) % len(DELAYS)]
    survivor = procs[1 - victim]
    result: dict = {"trial": n, "killed": f"w{victim}", "after_s": delay}
    try:
        time.sleep(delay)
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.time()
        procs[victim].wait()
        result["rows_at_kill"] = rows(work / "lake")
        deadline = time.monotonic() + 120
        while rows(work / "lake") < 4 * lines and time.monotonic() < deadline:
            time.sleep(0.5)
        stopped_at = time.time()
        survivor.send_signal(signal.SIGTERM)
        result["survivor_exit"] = survivor.wait(60)
        ends = end_offsets(tansu.bootstrap)
        result["topic_records"] = sum(ends)
        lost, doubled = lost_and_doubled(work / "lake", ends)
        result["lost"] = lost + max(0, 4 * lines - sum(ends))
        result["doubled"] = doubled + max(0, sum(ends) - 4 * lines)
        log = (work / f"w{1 - victim}.log").read_text(errors="replace")
        result["idle_s"] = idle(log, killed_at)
        result["pause_s"], result["stops"] = pause(log, killed_at, stopped_at)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        tansu.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--lines", type=int, default=150_000, help="lines per file (4 files)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kill-matrix-"))
    log_files(root, args.lines)
    failed = False
    print(f"{'trial':>5} {'killed':>6} {'after':>6} {'rows at kill':>12} {'lost':>5} {'doubled':>7} "
          f"{'idle s':>7} {'pause s':>7} {'exit':>4}  survivor's own stops")
    for n in range(args.trials):
        r = trial(root, n, args.lines)
        bad = r["lost"] or r["doubled"] or r["survivor_exit"] != 0
        failed |= bool(bad)
        idle_s = f"{r['idle_s']:.1f}" if r["idle_s"] is not None else "-"
        print(f"{r['trial']:>5} {r['killed']:>6} {r['after_s']:>5}s {r['rows_at_kill']:>12,} {r['lost']:>5} "
              f"{r['doubled']:>7} {idle_s:>7} {r['pause_s']:>7.1f} {r['survivor_exit']:>4}  "
              f"{'; '.join(r['stops']) or 'none'}", flush=True)
    if args.keep or failed:
        print(f"work directory: {root}")
    else:
        shutil.rmtree(root)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
