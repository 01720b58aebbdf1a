"""Kill -9 loop on the flagship job: proves that crashes at random moments neither lose nor
duplicate a record (access log → http_log → Avro topic on the embedded broker → parquet).

    python bench/kill_loop.py [--kills 20] [--lines 300000] [--seed N] [--keep] [--aggregate]

It generates an access log, runs the job once uninterrupted into a reference directory,
then, in a second directory, starts `pipeline run spec.yaml --once` and SIGKILLs it after a
random delay, --kills times, and finally lets one run finish (it must exit 0). DuckDB then
compares the two Parquet datasets as multisets (`EXCEPT ALL` both ways), so identical log
lines are counted, not merged: lost = reference rows missing from the killed run's output,
doubled = rows it has beyond the reference. With --aggregate a processor counts views per
minute and status as well, and its windows are compared the same way. Exit 1 if any row is lost or doubled, a run
fails, or the final run does not exit 0; the work directory is then kept for inspection.

Kill delays are uniform between 0.3 s and the time a restart takes when only the sink's
work is left (the topic fully ingested, no Parquet committed: measured once on a copy of
the reference's state), so that kills land mid-run; and a run is killed at once (polling
every 5 ms) when out/ gains a committed file, i.e. while the sink commits its groups, so
that late kills land in the commit rather than after it. A kill counts as mid-run when the
process died of SIGKILL with the output still incomplete. After each kill it also checks,
with `pipeline offsets`, that the topic holds exactly as many records as the source has read
lines (exactly-once into the embedded broker), and shows what out/ holds: committed
`.parquet` files and hidden ones (groups being written or committed, which restarts repair).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
PIPELINE = str(Path(sys.executable).parent / "pipeline")
RUN = [PIPELINE, "run", "spec.yaml", "--once", "--no-progress"]

SPEC = """\
name: kill-loop
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: [logs/access.log], format: combined}}}}
sinks:
  - {{name: parquet, connector: parquet, topics: [activity], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""


# With --aggregate: views per minute and status too (a processor), into out-views/.
AGGREGATE = """\
processors:
  - name: views
    from: activity
    to: views
    key: [method, status]
    time: timestamp
    window: {tumbling: 1m}
    grace: 30s
    aggregate: {views: count(), bytes: sum(bytes), visitors: count_distinct(remote_host), largest: max(bytes)}
"""
AGGREGATE_SINK = """\
  - {name: views-parquet, connector: parquet, topics: [views], config: {path: out-views, partition_by: window_start}}
"""


def job_dir(path: Path, logs: Path, aggregate: bool = False) -> Path:
    """A directory holding the spec and (a link to) the log."""
    path.mkdir()
    (path / "logs").symlink_to(logs, target_is_directory=True)
    schema = REPO / "pipelines" / "schemas" / "activity.avsc"
    spec = SPEC.format(schema=json.dumps(str(schema)))
    if aggregate:
        spec = spec.replace("sources:", "  views: {partitions: 2}\nsources:").replace("sinks:", AGGREGATE + "sinks:")
        spec = spec.replace("errors:", AGGREGATE_SINK + "errors:")
    (path / "spec.yaml").write_text(spec)
    return path


def run_to_end(cwd: Path) -> float:
    """Run the job uninterrupted; its duration. Exits if the run fails."""
    start = time.perf_counter()
    proc = subprocess.run(RUN, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"run in {cwd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - start


def out_files(cwd: Path) -> tuple[int, int]:
    """(committed .parquet files, hidden temps and open files) under out/."""
    names = [p.name for p in (cwd / "out").rglob("*") if p.is_file() and p.name != ".pipeline.lock"]
    hidden = sum(n.startswith(".") for n in names)
    return len(names) - hidden, hidden


def progress(cwd: Path) -> tuple[int, int] | None:
    """(log lines the source has consumed, records in the topic) from `pipeline offsets`;
    None if it cannot say (e.g. killed before the state existed)."""
    cmd = [PIPELINE, "offsets", "spec.yaml", "--json"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    state = json.loads(proc.stdout)
    lines = sum(o.get("line", 0) for s in state["sources"] if s["name"] == "logs" for o in s["offsets"].values())
    return lines, sum(p["end"] for s in state["sinks"] if s["name"] == "parquet" for p in s["partitions"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--aggregate", action="store_true",
                        help="add a processor (views per minute and status) and compare its windows too")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pipeline-kill-loop-"))
    print(f"work dir {work}, seed {seed}")
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(args.lines),
         "--out", str(work / "logs"), "--rotate", "0", "--malformed-every", "0"],
        check=True,
    )

    ref = job_dir(work / "reference", work / "logs", args.aggregate)
    t_full = run_to_end(ref)
    # A restart with the whole log already in the topic and no Parquet yet: the shortest
    # run that still has everything to write, so the upper bound of the kill delays.
    sink_only = job_dir(work / "sink-only", work / "logs", args.aggregate)
    shutil.copytree(ref / ".pipeline", sink_only / ".pipeline")
    t_sink = run_to_end(sink_only)
    shutil.rmtree(sink_only)
    print(f"uninterrupted run {t_full:.1f} s, restart with only the sink's work left {t_sink:.1f} s")

    killed = job_dir(work / "killed", work / "logs", args.aggregate)
    complete = out_files(ref)  # the reference's committed files: the job's finished output
    mid_run, problems = 0, []
    for i in range(1, args.kills + 1):
        delay = rng.uniform(0.3, t_sink)
        before, why = out_files(killed), ""
        with open(killed / f"run{i:02d}.log", "w") as log:
            proc = subprocess.Popen(RUN, cwd=killed, stdout=log, stderr=subprocess.STDOUT)
            start = time.perf_counter()
            while proc.poll() is None and time.perf_counter() - start < delay:
                if out_files(killed)[0] != before[0]:  # a group is being committed: kill now
                    why = " on commit"
                    break
                time.sleep(0.005)
            at = time.perf_counter() - start
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        after = out_files(killed)
        if proc.returncode == -signal.SIGKILL and after != complete:
            mid_run += 1
            how = "killed mid-run"
        elif proc.returncode == -signal.SIGKILL:
            how = "killed at exit"  # its output was complete: the work was done
        elif proc.returncode == 0:
            how = "had finished"
        else:
            how = f"FAILED (exit {proc.returncode})"
            problems.append(f"run {i} exited {proc.returncode}: see {killed / f'run{i:02d}.log'}")
        # Exactly-once into the topic: after any kill, the topic holds one record per line read.
        state = progress(killed)
        if state is not None and state[0] != state[1]:
            problems.append(f"after kill {i} the source has read {state[0]:,} lines but the topic holds {state[1]:,}")
        output = (killed / f"run{i:02d}.log").read_text().strip()
        print(f"kill {i:2d} at {at:4.2f} s{why:10s} {how:14s} "
              + (f"lines read {state[0]:>9,}, topic {state[1]:>9,}; " if state else "offsets: n/a; ")
              + f"out/: {after[0]:2d} parquet, {after[1]:2d} hidden"
              + (f" | {output.splitlines()[0][:100]}" if output and proc.returncode != 0 else ""))

    t_last = time.perf_counter()
    last = subprocess.run(RUN, cwd=killed, capture_output=True, text=True, check=False)
    t_last = time.perf_counter() - t_last
    (killed / "final.log").write_text(last.stdout + last.stderr)
    if last.returncode != 0:
        problems.append(f"final run exited {last.returncode}: {(last.stdout + last.stderr).strip()}")

    db = duckdb.connect()

    def rows(d: str) -> str:  # temps and open files end in .tmp: not matched
        return f"(select * from read_parquet('{work / d / 'out'}/**/*.parquet'))"

    def count(sql: str) -> int:
        return db.execute(f"select count(*) from {sql}").fetchone()[0]

    expected, found = count(rows("reference")), count(rows("killed"))
    lost = count(f"({rows('reference')} except all {rows('killed')})")
    doubled = count(f"({rows('killed')} except all {rows('reference')})")
    if expected != args.lines:
        problems.append(f"the reference run has {expected:,} rows, not {args.lines:,}")
    same_files = sorted(p.name for p in (ref / "out").rglob("*.parquet")) == sorted(
        p.name for p in (killed / "out").rglob("*.parquet"))
    leftover = out_files(killed)[1]

    if args.aggregate:  # the windows: each once, with the same values
        def windows(d: str) -> str:
            return f"(select * from read_parquet('{work / d / 'out-views'}/**/*.parquet'))"

        expected_windows, found_windows = count(windows("reference")), count(windows("killed"))
        missing = count(f"({windows('reference')} except all {windows('killed')})")
        extra = count(f"({windows('killed')} except all {windows('reference')})")
        print(f"windows expected  {expected_windows:,}; found {found_windows:,}; missing {missing:,}; "
              f"extra or different {extra:,}")
        if missing or extra:
            problems.append(f"windows: {missing:,} missing, {extra:,} extra or different")
    print(f"kills             {args.kills}")
    print(f"kills mid-run     {mid_run}")
    print(f"rows expected     {args.lines:,} (reference run: {expected:,})")
    print(f"rows found        {found:,}")
    print(f"lost              {lost:,}")
    print(f"doubled           {doubled:,}")
    print(f"final run         exit {last.returncode}, {t_last:.1f} s; same file names as the reference: "
          f"{'yes' if same_files else 'no'}; hidden files left: {leftover}")
    print(f"total time        {time.perf_counter() - t0:.1f} s")
    for p in problems:
        print(f"PROBLEM: {p}")
    failed = bool(lost or doubled or problems)
    if failed or args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
