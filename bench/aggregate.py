"""Benchmark a stream processor: page views per minute over activity records, counted by
our processor, by the same window in Bytewax, and by a hand-written dict loop, each in a
process of its own, one after the other, in one run on one machine.

    python bench/aggregate.py [--records 1000000] [--key method,status] [--grace 30]
                              [--rss-records 10000000] [--batch 1000] [--timeout 900] [--keep]

The data: a combined-format access log from pipelines/generate_access_logs.py (its `lines`,
imported, a million lines a call), event time rising about 200 ms a line (1M lines: about
3,300 minutes, 42,600 (minute, method, status) windows), then 1 % of the lines swapped with one up to 20 lines later (at
most 8 s of event time apart, well within the grace of 30 s: no record is late). About
0.2 % of the lines have no request ("-"), so no method: a record with a null group-by field
has no window (our processor dead-letters it; the other two skip it). Prepared once, not
timed: `pipeline run --once` of a spec with only the http_log source fills an embedded-broker
`activity` topic (4 partitions, keyed by remote_host) in a state directory; each pipeline
row runs on a copy of it. For the other two rows the topic is read back once, decoded, its
partitions merged in event-time order (each partition's own order kept, so the swapped
lines stay out of order: heapq.merge), and written to a Parquet file.

Rows (the window: tumbling 1 minute on the `timestamp` field, grace `--grace` s, key
`--key`, one count per (key, window)):

- pipeline processor: `pipeline run spec.yaml --once --no-progress` of a spec with the
  `activity` topic and one processor (`aggregate: {views: count()}`) into a topic
  `views-per-minute`; no source, no sink. Timed: the whole process (interpreter start and
  imports, about 0.5 s, included): fetch from the embedded broker, Avro decode to Arrow,
  event-time order across partitions, aggregate, then encode the windows to Avro and commit
  them with the input offsets, the state and the dead letters, a batch at a time (each
  batch's commit holds the windows it closed; the end of the input closes the rest). The
  note under the table gives the run's own elapsed time (its --json summary: no interpreter
  start or imports) as well.
- Bytewax: bytewax's `count_window` (`bytewax.operators.windowing`) with a
  `TumblingWindower` of 1 minute aligned to the epoch and an `EventClock` on the record's
  timestamp, waiting `--grace`, its system clock frozen so that the watermark follows the
  event time only (max event time - grace), as ours does; a `filter` step drops records
  with a null key field first; the key is the key fields as one string. Input: a
  `TestingSource` of the records as Python dicts (all 12 fields, as the Avro decode gives
  them: the timestamp an aware datetime), `--batch` records a batch (1,000: the best of 1, 100,
  1,000, 10,000 and 100,000 on 300,000 records, 8k, 157k, 218k, 204k and 184k records/s); output: `TestingSink`s
  collecting the counts, late items and window metadata. run_main: one worker, in this
  process. Timed: building and running the dataflow only; loading the Parquet file into
  dicts (a few seconds) comes before and is not timed. Its pace is what Bytewax does with
  decoded records; reading and decoding a topic would come on top. Bytewax's window state
  and clock are per key, and its time grows faster than the records with many keys: with
  `--key path,status` (about one key per two records) 10,000 records took 0.6 s, 80,000
  took 21 s and 160,000 took 184 s here, so 1M does not finish within `--timeout`.
- hand loop: a plain loop over the same dicts, `t = r["timestamp"]; counts[(t.year, t.month,
  t.day, t.hour, t.minute, *key fields)] += 1` in a defaultdict, skipping null keys (the
  fastest of three ways to name the minute tried: `t.replace(second=0, microsecond=0)` ran at
  0.35-0.53 M records/s, `int(t.timestamp()) // 60` at 0.5, this at 1.1-1.4). Timed: the loop
  only. It keeps every window in memory until the end and has no notion of lateness: a
  batch job, the floor of what Python can do per record.
- pipeline processor at N records, with `--rss-records N`: the first row again on a longer
  log, for peak RSS against the first row (target: within 15 %).

Columns: records/s = records / timed s; ×Bytewax, ×hand = records/s over theirs; peak RSS
= the largest total resident memory of the process and its children, sampled every 50 ms,
and at least the process's own VmHWM read at each sample (not wait4's ru_maxrss, which
carries this harness's own peak into the child: see `run`); for Bytewax and the hand loop
it holds the million dicts, about 1.5 GB; CPU/wall = user + system CPU time of the process and its
reaped children (wait4) over its whole wall time (process s), so 2.0 is both cores busy.

A row still running after `--timeout` seconds is killed and shown as such, and left out of
the check. Check: the three rows must give the same set of (window start, key, count); records with
a null key must be as many as our dead letters and Bytewax's filtered ones, and no record
late anywhere. The --rss-records row is checked against counts computed from its topic with
Arrow group_by (per fetched batch, summed), and must hold every record once. Exit 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import heapq
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from activity import REPO, SCHEMA, Result, _rss, _tree  # bench/activity.py's harness

CHUNK = 1_000_000  # log lines generated a call
DISORDER = 0.01  # share of lines swapped with a later one
REACH = 20  # ... at most this many lines later

FILL = """\
name: bench-aggregate
state_dir: state
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: [{log}], format: combined}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""

AGGREGATE = """\
name: bench-aggregate
state_dir: state
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
  views-per-minute: {{partitions: 2}}
processors:
  - name: views
    from: activity
    to: views-per-minute
    key: {keys}
    time: timestamp
    window: {{tumbling: 1m}}
    grace: {grace}s
    aggregate: {{views: count()}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""

# Each prints one JSON line: timed seconds, load seconds, skipped (null key), late, and the
# windows as [start ms, [key values as text], count].
BYTEWAX = r'''
import datetime as dt, json, sys, time
import pyarrow.parquet as pq
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, TumblingWindower, count_window
from bytewax.testing import TestingSink, TestingSource, run_main
path, keys, grace, batch = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
records = pq.read_table(path).to_pylist()
loaded = time.perf_counter() - start
UTC = dt.timezone.utc
FROZEN = dt.datetime(2000, 1, 1, tzinfo=UTC)  # the "system" clock stands still: event time only
keyed = eval("lambda r: " + " and ".join(f"r[{k!r}] is not None" for k in keys))
key = eval('lambda r: f"' + "\\t".join("{r[%r]}" % k for k in keys) + '"')
start = time.perf_counter()
flow = Dataflow("views_per_minute")
stream = op.input("activity", flow, TestingSource(records, batch_size=batch))
stream = op.filter("keyed", stream, keyed)
clock = EventClock(lambda r: r["timestamp"], wait_for_system_duration=dt.timedelta(seconds=grace),
                   now_getter=lambda: FROZEN)
windower = TumblingWindower(length=dt.timedelta(minutes=1), align_to=dt.datetime(1970, 1, 1, tzinfo=UTC))
views = count_window("views", stream, clock, windower, key)
counts, late, meta = [], [], []
op.output("counts", views.down, TestingSink(counts))
op.output("late", views.late, TestingSink(late))
op.output("meta", views.meta, TestingSink(meta))
run_main(flow)
seconds = time.perf_counter() - start
opened = {(k, w): int(m.open_time.timestamp() * 1000) for k, (w, m) in meta}
windows = [[opened[(k, w)], k.split("\t"), n] for k, (w, n) in counts]
print(json.dumps({"seconds": seconds, "load_seconds": loaded, "late": len(late),
                  "skipped": len(records) - len(late) - sum(n for _, _, n in windows), "windows": windows}))
'''

HAND_LOOP = r'''
import datetime as dt, json, sys, time
from collections import defaultdict
import pyarrow.parquet as pq
path, keys = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
records = pq.read_table(path).to_pylist()
loaded = time.perf_counter() - start
null = " or ".join(f"r[{k!r}] is None" for k in keys)
fields = "".join(f", r[{k!r}]" for k in keys)
loop = f"""
def count(records):
    counts, skipped = defaultdict(int), 0
    for r in records:
        if {null}:
            skipped += 1
            continue
        t = r["timestamp"]
        counts[(t.year, t.month, t.day, t.hour, t.minute{fields})] += 1
    return counts, skipped
"""
exec(loop)
start = time.perf_counter()
counts, skipped = count(records)
seconds = time.perf_counter() - start
UTC = dt.timezone.utc  # the decoded timestamps are UTC: the fields are the UTC minute
windows = [[int(dt.datetime(*k[:5], tzinfo=UTC).timestamp()) * 1000, [str(v) for v in k[5:]], n] for k, n in counts.items()]
print(json.dumps({"seconds": seconds, "load_seconds": loaded, "late": 0, "skipped": skipped, "windows": windows}))
'''


@dataclass
class Row:
    name: str
    records: int
    seconds: float  # timed: what records/s is of
    wall: float  # the whole process
    cpu: float  # user + system seconds of the process and its reaped children
    rss_mib: float
    note: str = ""
    timed_out: bool = False

    @property
    def rate(self) -> float:
        return self.records / self.seconds


Windows = Counter  # (window start ms, (key values as text)) -> count


def _hwm(pid: int) -> int:
    """The process's own peak RSS so far (VmHWM: of its current image, so since its exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return 0


class TimedOut(Exception):
    pass


def run(cmd: list[str], cwd: Path, records: int, timeout: float) -> Result:
    """bench/activity.py's `run`, but the peak RSS is the sampled total of the process tree
    and the process's own VmHWM read with each sample, not wait4's ru_maxrss: a child
    spawned by this harness (vfork, then exec) carries the harness's high-water mark in
    ru_maxrss, which is large after it has held the records (835 MiB measured for a
    pipeline run whose RSS never passed 180 MiB). A process still running after `timeout`
    seconds is killed (SIGKILL, by its pid): TimedOut."""
    peak, done = [0], threading.Event()
    lock, killed = threading.Lock(), []

    def sample(pid: int) -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], sum(map(_rss, _tree(pid))), _hwm(pid))

    def kill(pid: int) -> None:
        with lock:
            if not done.is_set():  # not reaped yet: the pid is still ours
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)

    start = time.perf_counter()
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill, args=(proc.pid,))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        with lock:
            done.set()
        timer.cancel()
    elapsed = time.perf_counter() - start
    sampler.join()
    if killed:
        raise TimedOut(f"killed after {timeout:g} s")
    if status != 0:
        raise SystemExit(f"{cmd[0]} {cmd[1]} ... in {cwd} failed (exit {os.waitstatus_to_exitcode(status)}):\n"
                         f"{(cwd / 'stderr.txt').read_text()[-4000:]}")
    return Result(records, elapsed, usage.ru_utime + usage.ru_stime, peak[0] / 2**20)


# -- data -------------------------------------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location("generate_access_logs", REPO / "pipelines" / "generate_access_logs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(records: int, out: Path, seed: int = 2026) -> Path:
    """An access log of `records` lines, event time rising, 1 % of lines a little out of order."""
    gen = _generator()
    rng, shuffle = random.Random(seed), random.Random(seed + 1)
    start = dt.datetime(2026, 11, 20, 6, 0, tzinfo=dt.UTC)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "access.log"
    with open(log, "w", encoding="utf-8") as f:
        left = records
        while left:
            chunk = gen.lines(min(CHUNK, left), rng, start, 0)
            left -= len(chunk)
            last = chunk[-1]  # before the swaps: the latest
            start = dt.datetime.strptime(last[last.index("[") + 1 : last.index("]")], "%d/%b/%Y:%H:%M:%S %z")
            start += dt.timedelta(seconds=1)
            for i in range(len(chunk) - REACH):
                if shuffle.random() < DISORDER:
                    j = i + shuffle.randrange(1, REACH + 1)
                    chunk[i], chunk[j] = chunk[j], chunk[i]
            f.write("\n".join(chunk) + "\n")
    return log


def fill(work: Path, name: str, log: Path, records: int) -> Path:
    """A directory whose state holds the `activity` topic with the log's records."""
    directory = work / name
    directory.mkdir()
    (directory / "spec.yaml").write_text(FILL.format(schema=json.dumps(str(SCHEMA)), log=json.dumps(str(log))))
    result = run([str(Path(sys.executable).parent / "pipeline"), "run", "spec.yaml", "--once", "--no-progress", "--json"],
                 directory, records, timeout=3600)
    summary = json.loads((directory / "stdout.txt").read_text())
    delivered = sum(c["delivered"] for c in summary["connectors"])
    if delivered != records:
        raise SystemExit(f"filling the topic: {delivered:,} records delivered, not {records:,}")
    print(f"prepared {records:,} records in {result.seconds:.1f} s", file=sys.stderr)
    return directory


def read_topic(directory: Path, topic: str, each) -> None:
    """Call `each(partition, table)` for each fetched batch of `topic`, decoded to Arrow, in
    offset order per partition."""
    from runner.broker.base import TopicPartition
    from runner.engine import load_for_inspection, open_broker, open_registry
    from runner.schema.codec import BatchDecoder

    spec = load_for_inspection(directory / "spec.yaml")

    async def main() -> None:
        broker = open_broker(spec, read_only=True)
        await broker.start()
        registry = open_registry(spec, read_only=True)
        try:
            decoder = BatchDecoder(registry.schema_by_id, registry.get(f"{topic}-value").schema)
            ends = await broker.end_offsets(topic)
            consumer = await broker.consumer(None, [topic])
            for tp in await consumer.assignment():
                await consumer.seek(tp, 0)
            import pyarrow as pa

            while not all([await consumer.position(TopicPartition(topic, p)) >= e for p, e in enumerate(ends)]):
                for fb in await consumer.fetch(10_000, 0.05):
                    columns, rows, failures = decoder.decode(fb.value_array if fb.value_array is not None else fb.values)
                    if failures:
                        raise SystemExit(f"{topic}: undecodable record: {failures[0]}")
                    each(fb.partition, pa.Table.from_batches([columns]) if columns is not None
                         else pa.Table.from_pylist(rows))
            await consumer.close()
        finally:
            registry.close()
            await broker.close()

    asyncio.run(main())


def export(directory: Path, out: Path) -> int:
    """The topic's records in one Parquet file, partitions merged by event time (each one's
    own order kept), as a consumer aligning partitions in event time would see them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: dict[int, list] = {}
    read_topic(directory, "activity", lambda p, t: parts.setdefault(p, []).append(t))
    tables = [pa.concat_tables(parts[p]) for p in sorted(parts)]
    bases = [0]
    for t in tables[:-1]:
        bases.append(bases[-1] + t.num_rows)
    streams = [zip(t.column("timestamp").cast(pa.int64()).to_pylist(), range(base, base + t.num_rows))
               for t, base in zip(tables, bases)]
    order = [i for _, i in heapq.merge(*streams, key=lambda pair: pair[0])]
    pq.write_table(pa.concat_tables(tables).take(order), out)
    return len(order)


def reference(directory: Path, keys: list[str]) -> tuple[Windows, int]:
    """Counts per (window, key) of the topic's records with Arrow, and the records with a
    null key field (for the --rss-records row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts, skipped = Counter(), [0]

    def each(_: int, table: pa.Table) -> None:
        keyed = pc.is_valid(table.column("timestamp"))
        for k in keys:
            keyed = pc.and_(keyed, pc.is_valid(table.column(k)))
        skipped[0] += table.num_rows - pc.sum(keyed).as_py()
        table = table.filter(keyed)
        ms = table.column("timestamp").cast(pa.int64())
        table = table.select(keys).append_column("start", pc.multiply(pc.divide(ms, 60_000), 60_000))
        for g in table.group_by(["start", *keys], use_threads=False).aggregate([([], "count_all")]).to_pylist():
            counts[(g["start"], tuple(str(g[k]) for k in keys))] += g["count_all"]

    read_topic(directory, "activity", each)
    return counts, skipped[0]


# -- the rows ---------------------------------------------------------------------------------


def run_processor(work: Path, name: str, filled: Path, records: int, keys: list[str],
                  grace: float, timeout: float) -> tuple[Row, Windows, dict]:
    """Our processor on a copy of `filled`'s state; its row, windows and run summary."""
    directory = work / name
    directory.mkdir()
    shutil.copytree(filled / "state", directory / "state")
    try:
        spec = AGGREGATE.format(schema=json.dumps(str(SCHEMA)), keys=json.dumps(keys), grace=f"{grace:g}")
        (directory / "spec.yaml").write_text(spec)
        exe = Path(sys.executable).parent / "pipeline"
        result = run([str(exe), "run", "spec.yaml", "--once", "--no-progress", "--json"], directory, records, timeout)
        summary = json.loads((directory / "stdout.txt").read_text())
        (views,) = [c for c in summary["connectors"] if c["kind"] == "processor"]
        windows: Windows = Counter()

        def each(_: int, table) -> None:
            import pyarrow as pa

            starts = table.column("window_start").cast(pa.int64()).to_pylist()
            values = zip(*[table.column(k).to_pylist() for k in keys])
            for start, key, n in zip(starts, values, table.column("views").to_pylist()):
                windows[(start, tuple(map(str, key)))] += n

        read_topic(directory, "views-per-minute", each)
    finally:
        shutil.rmtree(directory / "state", ignore_errors=True)  # a copy: the disk back
    info = {"elapsed": summary["elapsed_seconds"], "dead_lettered": views["dead_lettered"], "read": views["read"]}
    return Row(name, records, result.seconds, result.seconds, result.cpu, result.rss_mib), windows, info


def run_script(work: Path, name: str, script: str, args: list[str], records: int,
               timeout: float) -> tuple[Row, Windows, dict]:
    directory = work / name
    directory.mkdir()
    result = run([sys.executable, "-c", script, *args], directory, records, timeout)
    out = json.loads((directory / "stdout.txt").read_text())
    windows: Windows = Counter()
    for start, key, n in out["windows"]:
        windows[(start, tuple(key))] += n
    row = Row(name, records, out["seconds"], result.seconds, result.cpu, result.rss_mib,
              note=f"loading the dicts: {out['load_seconds']:.1f} s (not timed)")
    return row, windows, out


def attempt(name: str, records: int, timeout: float, fn, *args) -> tuple[Row, Windows | None, dict]:
    """A row, or one that says it was killed after `timeout` (no windows to check)."""
    try:
        return fn(*args)
    except TimedOut as exc:
        return Row(name, records, timeout, timeout, 0.0, 0.0, note=str(exc), timed_out=True), None, {}


# -- the table --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="activity records of the main rows")
    parser.add_argument("--key", default="method,status", help="group-by fields, comma-separated")
    parser.add_argument("--grace", type=float, default=30, help="seconds a record may come late (all rows)")
    parser.add_argument("--rss-records", type=int, metavar="N", help="also run our processor on N records, to compare peak RSS")
    parser.add_argument("--batch", type=int, default=1_000, help="Bytewax TestingSource batch size")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a row may take before it is killed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.key.split(",") if k.strip()]
    n, limit = args.records, args.timeout
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-aggregate-"))
    failures: list[str] = []
    try:
        filled = fill(work, "filled", generate(n, work / "logs"), n)
        parquet = work / "activity.parquet"
        exported = export(filled, parquet)
        if exported != n:
            raise SystemExit(f"the topic gave back {exported:,} records, not {n:,}")
        ours, our_windows, info = attempt("pipeline processor", n, limit, run_processor,
                                          work, "pipeline processor", filled, n, keys, args.grace, limit)
        bytewax, bytewax_windows, bw = attempt("Bytewax", n, limit, run_script, work, "Bytewax", BYTEWAX,
                                               [str(parquet), json.dumps(keys), str(args.grace), str(args.batch)], n, limit)
        hand, hand_windows, hl = attempt("hand loop", n, limit, run_script, work, "hand loop", HAND_LOOP,
                                         [str(parquet), json.dumps(keys)], n, limit)
        rows = [ours, bytewax, hand]

        done = {r.name: (w, i) for r, w, i in ((ours, our_windows, info), (bytewax, bytewax_windows, bw),
                                                (hand, hand_windows, hl)) if w is not None}
        skipped = {"pipeline processor": info.get("dead_lettered"), "Bytewax": bw.get("skipped"),
                   "hand loop": hl.get("skipped")}
        if len(done) >= 2:
            (first, (reference_windows, _)), *others = done.items()
            same = all(w == reference_windows for w, _ in done.values())
            print(f"check: {len(reference_windows):,} (window, key) counts, {sum(reference_windows.values()):,} records "
                  f"counted; equal in {', '.join(done)}: {'yes' if same else 'NO'}"
                  + "".join(f" ({r.name}: not checked, {r.note})" for r in rows if r.timed_out)
                  + "; null-key records: "
                  + ", ".join(f"{name} {skipped[name]:,}" for name in done)
                  + (f"; late in Bytewax: {bw['late']}" if "Bytewax" in done else ""))
            for other, (theirs, _) in others:
                diff = set((reference_windows - theirs).items()) | set((theirs - reference_windows).items())
                if diff:
                    failures.append(f"{first} and {other} differ in {len(diff):,} counts, e.g. {sorted(diff)[:3]}")
            if len({skipped[name] for name in done}) > 1 or bw.get("late"):
                failures.append("null-key or late records differ")
        if our_windows is not None and sum(our_windows.values()) + info["dead_lettered"] != n:
            failures.append("ours did not count every record once")

        long = None
        if args.rss_records:
            shutil.rmtree(filled)
            big = fill(work, "filled-long", generate(args.rss_records, work / "logs-long"), args.rss_records)
            name = f"pipeline processor, {args.rss_records:,}"
            long, long_windows, long_info = attempt(name, args.rss_records, limit, run_processor,
                                                    work, name, big, args.rss_records, keys, args.grace, limit)
            if long_windows is not None:
                expected, nulls = reference(big, keys)
                ok = long_windows == expected and long_info["dead_lettered"] == nulls \
                    and sum(long_windows.values()) + nulls == args.rss_records
                print(f"check at {args.rss_records:,}: {len(long_windows):,} counts, equal to Arrow's group_by over "
                      f"the topic and every record once: {'yes' if ok else 'NO'}")
                if not ok:
                    failures.append(f"the {args.rss_records:,}-record run's windows differ from the topic's counts")
            rows.append(long)

        def ratio(r: Row, base: Row) -> str:
            return "—" if r.timed_out or base.timed_out else f"{r.rate / base.rate:.2f}"

        print(f"{f'{n:,} records, key {keys}':<40}{'records/s':>11}{'×Bytewax':>10}{'×hand':>8}"
              f"{'peak RSS':>11}{'CPU/wall':>10}{'timed':>9}{'process':>9}")
        for r in rows:
            if r.timed_out:
                print(f"{r.name:<40}  {r.note}")
                continue
            print(f"{r.name:<40}{r.rate:>11,.0f}{ratio(r, bytewax):>10}{ratio(r, hand):>8}"
                  f"{r.rss_mib:>7,.0f} MiB{r.cpu / r.wall:>10.2f}{r.seconds:>7.1f} s{r.wall:>7.1f} s")
        if not ours.timed_out:
            alone = n / info["elapsed"]
            vs = "" if bytewax.timed_out else f", {alone / bytewax.rate:.2f}× Bytewax"
            print("pipeline processor: " + (f"Bytewax {bytewax.note}" if bytewax.timed_out else
                                            f"{ratio(ours, bytewax)}× Bytewax's records/s (target ≥ 5×)")
                  + f", {ratio(ours, hand)}× the hand loop's; its run alone (--json elapsed, no interpreter start "
                  f"or imports): {info['elapsed']:.2f} s, {alone:,.0f} records/s{vs}")
        for r in (bytewax, hand):
            if not r.timed_out:
                print(f"{r.name}: {r.note}")
        if long is not None and not long.timed_out and not ours.timed_out:
            growth = (long.rss_mib / ours.rss_mib - 1) * 100
            print(f"peak RSS at {args.rss_records:,} records: {long.rss_mib:,.0f} MiB, {growth:+.1f} % against "
                  f"{n:,} (target within 15 %); its run alone {long_info['elapsed']:.1f} s")
    finally:
        if args.keep or failures:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
