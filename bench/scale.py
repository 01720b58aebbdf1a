"""Scale-out on Kafka (issue 18): how much faster do 2 and 3 `pipeline run --once`
processes of one spec finish a 4-file access-log job than 1 process, and do several
`--once` processes end together with everything written exactly once?

    python bench/scale.py [--lines 250000] [--repeat 3] [--workers 1,2,3]
                          [--once-checks 0] [--once-lines 20000] [--timeout 900] [--debug] [--keep]

Input: 4 access logs of `--lines` lines each (pipelines/generate_access_logs.py, no
rotation, no malformed lines, seed = the host number), at <work>/logs/host<K>/access.log.
The `files` source with `tasks: 4` gives task i the files whose absolute path has
`runner.connector.task_of(path, 4) == i` (CRC-32 of the path mod 4). Four fixed names
(host0..host3) may hash unevenly -- two files on one task and none on another, so one
process would read twice as much as the others whatever the worker count. So the script
walks host0, host1, ... and keeps the first name that lands on each of the tasks 0..3
(the CRC depends on the whole absolute path, hence on the temporary work directory, so the
choice is made per invocation), and prints the split: each task then reads one file.

Each measurement gets a fresh Tansu broker (tests/kafka_broker.py; in-memory, so every
run starts with empty topics, offsets and groups) and a fresh run directory holding the
spec and its `lake` output: topic `activity` (4 partitions, pipelines/schemas/activity.avsc,
key remote_host), source `files` (format http_log, `tasks: 4`, the logs by absolute path),
sink `parquet` (path lake). N processes `pipeline run spec.yaml --once` start side by side;
the wall time runs from just before the first start until the last exit (broker start-up
excluded; the consumer-group join, ~3 s on Tansu with the tests' session timeout of 6 s,
included). Every process must exit 0 and the lake must hold every line once: DuckDB's row
count equals the input, and per partition the Parquet files' offset ranges (file names
activity+P+FIRST+LAST[+iofn].parquet; parts +1of2/+2of2 of one flush share one range)
tile from 0 without overlap. A run that fails that prints the tail of its processes' logs
(<run dir>/w<i>.log; `--debug` runs them with `pipeline --debug`) and the work directory
is kept.

Each worker count runs `--repeat` times (interleaved: 1, 2, 3, 1, 2, 3, ...); the table
gives the median wall time, records/s (4 x lines / median) and the speed-up against 1
worker measured in the same invocation. The target: 2 workers >= 1.5x 1 worker. It also
gives the CPU seconds (user + system, from wait4 of the reaped children) of the `pipeline`
processes and, separately, of the broker, and their sum over the wall time: on a 2-core
machine a CPU/wall near 2 means the run was already using both cores.

`--once-checks N` then runs the 2-worker and the 3-worker `--once` configuration N times
each on `--once-lines` lines per file (default 20,000), reporting per run the exit codes,
whether the output is complete, how many records are doubled (must be 0) and how far apart
the first and the last process exited ("end together"). Exit 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runner.connector import task_of  # noqa: E402
from tests.kafka_broker import CONSUMER, Tansu  # noqa: E402

SCHEMA = REPO / "pipelines" / "schemas" / "activity.avsc"
PIPELINE = str(Path(sys.executable).parent / "pipeline")
FILE = re.compile(r"^activity\+(\d+)\+(\d{20})\+(\d{20})(?:\+(\d+)of(\d+))?\.parquet$")
TASKS = 4

SPEC = """\
name: bench-scale
broker: {broker}
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: files, topic: activity, tasks: {tasks},
     config: {{paths: [{paths}], format: http_log}}}}
sinks:
  - {{name: lake, connector: parquet, topics: [activity], config: {{path: lake}}}}
"""


def choose_hosts(logs: Path) -> list[tuple[str, Path]]:
    """host names, one per task 0..TASKS-1, in task order (see the docstring)."""
    chosen: dict[int, tuple[str, Path]] = {}
    k = 0
    while len(chosen) < TASKS:
        path = Path(os.path.normpath(os.path.abspath(logs / f"host{k}" / "access.log")))
        chosen.setdefault(task_of(str(path), TASKS), (f"host{k}", path))
        k += 1
    return [chosen[t] for t in range(TASKS)]


def write_logs(logs: Path, lines: int) -> list[Path]:
    hosts = choose_hosts(logs)

    def one(host: tuple[str, Path]) -> None:
        subprocess.run(
            [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(lines),
             "--out", str(host[1].parent), "--rotate", "0", "--malformed-every", "0",
             "--seed", host[0].removeprefix("host")],
            check=True, stdout=subprocess.DEVNULL,
        )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, hosts))
    paths = sorted(logs.glob("*/access.log"))
    assert len(paths) == TASKS, paths
    for p in paths:  # the generator writes exactly `lines` lines
        with open(p, "rb") as f:
            n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        assert n == lines, (p, n)
    return [h[1] for h in hosts]


@dataclass
class Run:
    workers: int
    seconds: float
    codes: list[int]
    exits: list[float]  # seconds from start, per process
    cpu: float = 0.0  # user + system seconds of the processes (and their children)
    broker_cpu: float = 0.0  # Tansu's, from its start to its stop
    rows: int = 0
    covered: int = 0  # offsets 0.. covered without gaps, summed over partitions
    gaps: int = 0  # offsets missing below a partition's highest
    doubled: int = 0  # records in two files' ranges, plus rows beyond the ranges
    problems: list[str] = field(default_factory=list)
    directory: Path | None = None

    @property
    def spread(self) -> float:
        return max(self.exits) - min(self.exits)


def check(lake: Path, run: Run, count: int) -> None:
    """Fill run.rows/covered/gaps/doubled; append problems unless every record is there once."""
    ranges: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for f in lake.rglob("*.parquet"):
        m = FILE.match(f.name)
        if not m:
            run.problems.append(f"unexpected file {f.name}")
            continue
        ranges[int(m.group(1))].add((int(m.group(2)), int(m.group(3))))
    in_ranges = 0
    for partition, spans in sorted(ranges.items()):
        expected = 0
        for first, last in sorted(spans):
            in_ranges += last - first + 1
            if first > expected:
                run.gaps += first - expected
                run.problems.append(f"partition {partition}: offsets {expected}..{first - 1} missing")
            elif first < expected:
                run.doubled += min(last + 1, expected) - first
                run.problems.append(f"partition {partition}: {first}..{last} overlaps up to {expected - 1}")
            expected = max(expected, last + 1)
        run.covered += expected
    run.rows = duckdb.connect().execute(
        f"select count(*) from read_parquet('{lake}/**/*.parquet')").fetchone()[0] if ranges else 0
    if run.rows > in_ranges:
        run.doubled += run.rows - in_ranges
    if run.rows != count:
        run.problems.append(f"{run.rows:,} rows, expected {count:,}")
    if run.covered - run.gaps != count:
        run.problems.append(f"offset ranges cover {run.covered - run.gaps:,} records, expected {count:,}")


def cpu_of_children() -> float:
    """User + system seconds of this script's reaped children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(work: Path, name: str, logs: list[Path], workers: int, count: int, args) -> Run:
    directory = work / name
    directory.mkdir()
    broker = Tansu(directory / "tansu.log")
    try:
        broker.wait_ready()
        settings = {"kafka": {"bootstrap_servers": broker.bootstrap, "consumer": CONSUMER}}
        pattern = json.dumps(str(logs[0].parent.parent / "*" / "access.log"))
        (directory / "spec.yaml").write_text(SPEC.format(
            broker=json.dumps(settings), schema=json.dumps(str(SCHEMA)), tasks=TASKS, paths=pattern))
        cmd = [PIPELINE, *(["--debug"] if args.debug else []), "run", "spec.yaml", "--once"]
        outs = [open(directory / f"w{i}.log", "w") for i in range(workers)]
        before = cpu_of_children()
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd, cwd=directory, stdout=outs[i], stderr=subprocess.STDOUT)
                 for i in range(workers)]
        exits: list[float | None] = [None] * workers
        while None in exits:
            now = time.perf_counter() - start
            for i, p in enumerate(procs):
                if exits[i] is None and p.poll() is not None:
                    exits[i] = now
            if now > args.timeout:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                        exits[i] = now
                break
            time.sleep(0.01)
        seconds = max(exits)
        cpu = cpu_of_children() - before
        for out in outs:
            out.close()
    finally:
        broker.stop()
    run = Run(workers, seconds, [p.returncode for p in procs], exits, directory=directory,
              cpu=cpu, broker_cpu=cpu_of_children() - before - cpu)
    if any(c != 0 for c in run.codes):
        run.problems.append(f"exit codes {run.codes}" + (" (killed at --timeout)" if seconds > args.timeout else ""))
    check(directory / "lake", run, count)
    if run.problems:
        print(f"  !! {name}: " + "; ".join(run.problems[:5]))
        for i in range(workers):
            tail = (directory / f"w{i}.log").read_text(errors="replace").strip().splitlines()[-15:]
            print(f"  -- {directory / f'w{i}.log'} (exit {run.codes[i]}), last lines:")
            print("\n".join(f"     {line}" for line in tail))
    elif not args.keep:
        shutil.rmtree(directory / "lake")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=250_000, help="lines per file (4 files)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per worker count (median reported)")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to time; the first is the baseline")
    parser.add_argument("--once-checks", type=int, default=0,
                        help="also run the 2- and the 3-worker --once configuration N times each on --once-lines")
    parser.add_argument("--once-lines", type=int, default=20_000, help="lines per file for --once-checks")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run's processes are killed")
    parser.add_argument("--debug", action="store_true", help="run the processes with `pipeline --debug`")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and the lakes")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-scale-"))
    print(f"work dir {work}; {os.cpu_count()} cores")
    failed = False
    t0 = time.perf_counter()

    logs = write_logs(work / "logs", args.lines)
    count = TASKS * args.lines
    print(f"input: {TASKS} files x {args.lines:,} lines = {count:,} lines; split over tasks: "
          + ", ".join(f"task {task_of(str(p), TASKS)} <- {p.parent.name}" for p in logs))
    runs: dict[int, list[Run]] = defaultdict(list)
    for r in range(args.repeat):
        for n in counts:
            run = measure(work, f"w{n}-r{r}", logs, n, count, args)
            runs[n].append(run)
            failed |= bool(run.problems)
            print(f"  {n} worker(s), run {r + 1}: {run.seconds:6.2f} s, exits {run.codes}, "
                  f"first-to-last exit {run.spread:.2f} s, rows {run.rows:,}, CPU s workers {run.cpu:.1f} + broker {run.broker_cpu:.1f}" + (" FAILED" if run.problems else ""))

    base = statistics.median(r.seconds for r in runs[counts[0]])
    print(f"\n{count:,} lines ({TASKS} files x {args.lines:,}, tasks: {TASKS}), median of {args.repeat}:")
    print(f"{'workers':>8}{'median s':>10}{'min s':>8}{'max s':>8}{'records/s':>11}{'speed-up':>10}"
          f"{'CPU s':>8}{'broker CPU s':>14}{'CPU/wall':>10}  runs (s)")
    for n in counts:
        secs = [r.seconds for r in runs[n]]
        med = statistics.median(secs)
        cpu = statistics.median(r.cpu for r in runs[n])
        bcpu = statistics.median(r.broker_cpu for r in runs[n])
        print(f"{n:>8}{med:>10.2f}{min(secs):>8.2f}{max(secs):>8.2f}{count / med:>11,.0f}{base / med:>9.2f}x"
              f"{cpu:>8.1f}{bcpu:>14.1f}{(cpu + bcpu) / med:>10.2f}  "
              + ", ".join(f"{s:.2f}" for s in secs) + ("  (FAILED runs)" if any(r.problems for r in runs[n]) else ""))
    if 2 in runs and counts[0] == 1:
        ratio = base / statistics.median(r.seconds for r in runs[2])
        print(f"target 2 workers >= 1.50x 1 worker: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'NOT met'}")

    if args.once_checks:
        small = write_logs(work / "logs-once", args.once_lines)
        small_count = TASKS * args.once_lines
        print(f"\n--once checks: {TASKS} files x {args.once_lines:,} lines = {small_count:,} lines; split: "
              + ", ".join(f"task {task_of(str(p), TASKS)} <- {p.parent.name}" for p in small))
        print(f"{'workers':>8}{'run':>5}  {'exit codes':<12}{'complete':>9}{'doubled':>9}{'wall s':>8}"
              f"{'end together s':>16}  problems")
        for n in (2, 3):
            for r in range(args.once_checks):
                run = measure(work, f"once-w{n}-r{r}", small, n, small_count, args)
                failed |= bool(run.problems)
                complete = run.rows == small_count and run.covered - run.gaps == small_count and run.gaps == 0
                print(f"{n:>8}{r + 1:>5}  {str(run.codes):<12}{'yes' if complete else 'NO':>9}{run.doubled:>9}"
                      f"{run.seconds:>8.2f}{run.spread:>16.2f}  " + ("; ".join(run.problems[:3]) or "-"))

    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if failed or args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
