"""Benchmark the end-to-end latency of a followed access log into its topic: from the
moment a line is appended to the log to the moment its record is in the Parquet-bound
topic (claim: within 250 ms p99 at default settings).

    python bench/latency.py [--lines 200] [--poll-interval SECONDS]

`pipeline run spec.yaml --no-progress` follows logs/access.log (http_log, `follow: true`,
otherwise default settings) into topic `activity` on the embedded broker, with a parquet
sink on it. This process appends combined-format lines one at a time at random intervals
(uniform 20-200 ms), each with a unique request path `/latency/NNNNNN`, and records when
each append (write + flush) returned. Meanwhile a read-only consumer of the state
directory (as `pipeline consume` reads it) fetches new records every --observe-ms and
notes when each marker first shows up in the raw record values. Latency = seen - appended;
it includes up to one observer period. The run is then stopped with SIGINT.

--poll-interval sets the http_log source's `poll_interval` (default 0.1 s) for experiments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from connectors.http_log import HttpLogSource
from runner.broker.embedded import EmbeddedBroker
from runner.errors import FatalError

REPO = Path(__file__).resolve().parents[1]

SPEC = """\
name: bench-latency
state_dir: state
topics:
  activity: {{partitions: 4, schema: {schema}, key: remote_host}}
sources:
  - {{name: logs, connector: http_log, topic: activity, config: {{{config}}}}}
sinks:
  - {{name: parquet, connector: parquet, topics: [activity], config: {{path: out}}}}
errors: {{tolerance: all, dead_letter_topic: activity-dlq}}
"""

MARKER = re.compile(rb"/latency/(\d{6})")


def line(i: int) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
    return (f'10.0.{i % 7}.{i % 251} - - [{stamp}] "GET /latency/{i:06d} HTTP/1.1" 200 {100 + i} '
            f'"-" "latency-bench/1.0"\n')


class Observer:
    """Polls the topic from a read-only broker; `seen[i]` is when marker i first showed up."""

    def __init__(self, state_dir: Path, period: float) -> None:
        self.state_dir, self.period = state_dir, period
        self.seen: dict[int, float] = {}
        self.cycles: list[float] = []  # duration of each observe cycle (sleep + fetch)

    async def run(self, stop: asyncio.Event) -> None:
        while True:  # until `pipeline run` has created the state and the topic
            try:
                broker = EmbeddedBroker(self.state_dir, read_only=True)
                await broker.start()
                consumer = await broker.consumer(None, ["activity"])  # no group: never commits
                break
            except FatalError:
                await asyncio.sleep(0.05)
        try:
            last = time.perf_counter()
            while not stop.is_set():
                for fb in await consumer.fetch(100_000, 0):
                    now = time.perf_counter()
                    for value in fb.values:
                        for m in MARKER.findall(value or b""):
                            self.seen.setdefault(int(m), now)
                await asyncio.sleep(self.period)
                now = time.perf_counter()
                self.cycles.append(now - last)
                last = now
        finally:
            await consumer.close()
            await broker.close()


async def measure(work: Path, lines: int, period: float) -> tuple[dict[int, float], dict[int, float], Observer]:
    observer = Observer(work / "state", period)
    stop = asyncio.Event()
    task = asyncio.create_task(observer.run(stop))
    appended: dict[int, float] = {}
    with open(work / "logs" / "access.log", "a", encoding="utf-8") as log:

        def append(i: int) -> None:
            log.write(line(i))
            log.flush()
            appended[i] = time.perf_counter()

        # Warm-up line 0: wait until the run is up and following before measuring.
        append(0)
        deadline = time.perf_counter() + 60
        while 0 not in observer.seen:
            if task.done() or time.perf_counter() > deadline:
                raise SystemExit("the warm-up line never reached the topic:\n" + (work / "run.log").read_text())
            await asyncio.sleep(0.05)
        for i in range(1, lines + 1):
            await asyncio.sleep(random.uniform(0.02, 0.2))
            append(i)
    deadline = time.perf_counter() + 5  # let the last lines arrive
    while len(observer.seen) <= lines and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    del appended[0], observer.seen[0]
    return appended, observer.seen, observer


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]  # nearest rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200, help="lines appended and measured")
    parser.add_argument("--poll-interval", type=float, help="http_log poll_interval (default: the connector's)")
    parser.add_argument("--observe-ms", type=float, default=5, help="observer's sleep between fetches")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-latency-"))
    proc = None
    try:
        (work / "logs").mkdir()
        (work / "logs" / "access.log").touch()
        config = "paths: [logs/access.log], format: combined, follow: true"
        if args.poll_interval is not None:
            config += f", poll_interval: {args.poll_interval}"
        schema = json.dumps(str(REPO / "pipelines" / "schemas" / "activity.avsc"))
        (work / "spec.yaml").write_text(SPEC.format(schema=schema, config=config))
        exe = Path(sys.executable).parent / "pipeline"
        with open(work / "run.log", "w") as out:
            proc = subprocess.Popen([str(exe), "run", "spec.yaml", "--no-progress"], cwd=work, stdout=out, stderr=out)
        appended, seen, observer = asyncio.run(measure(work, args.lines, args.observe_ms / 1000))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        latencies = [(seen[i] - t) * 1000 for i, t in appended.items() if i in seen]
        cycle = [c * 1000 for c in observer.cycles]
        default = HttpLogSource.Config.parse({"paths": ["x"]}).poll_interval
        print(f"poll_interval: {args.poll_interval if args.poll_interval is not None else f'default ({default} s)'}")
        print(f"lines appended {len(appended)}, seen in topic {len(latencies)}")
        if latencies:
            print("latency ms: " + "  ".join(f"{name} {pct(latencies, p):.0f}" for name, p in
                                             (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))))
        print(f"observer period: sleep {args.observe_ms:g} ms + fetch; measured mean {statistics.mean(cycle):.1f} ms, "
              f"p99 {pct(cycle, 99):.1f} ms (latency includes up to one period)")
        print(f"pipeline run exited {code} on SIGINT")
        if code != 0:
            print((work / "run.log").read_text()[-3000:], file=sys.stderr)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
