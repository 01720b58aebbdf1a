"""Read-side operations behind `pipeline topics`, `pipeline consume` and `pipeline schemas`.
They open the broker read-only, so they work while `pipeline run` is writing."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from runner.batch import json_default
from runner.broker.base import TopicPartition
from runner.engine import open_broker, open_registry, run_async
from runner.runs import Run, RunHistory
from runner.errors import UsageError
from runner.schema.serde import AvroDecoder
from runner.spec import Spec


@dataclass
class TopicDescription:
    name: str
    partitions: int
    end_offsets: list[int]
    groups: dict[str, dict[int, int]]  # group -> partition -> lag

    @property
    def records(self) -> int:
        return sum(self.end_offsets)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "partitions": self.partitions,
            "end_offsets": self.end_offsets,
            "records": self.records,
            "groups": {g: {"lag": sum(l.values()), "partitions": l} for g, l in self.groups.items()},
        }


def describe_topics(spec: Spec, only: str | None = None) -> list[TopicDescription]:
    async def main() -> list[TopicDescription]:
        broker = open_broker(spec, read_only=True)
        await broker.start()
        try:
            infos = await broker.topics()
            if only is not None:
                infos = [t for t in infos if t.name == only]
                if not infos:
                    raise UsageError(f"no topic {only!r} in {spec.state_dir}", hint="see `pipeline topics list`")
            out = []
            for info in infos:
                ends = await broker.end_offsets(info.name)
                groups = {}
                for group in await broker.groups(info.name):
                    committed = await broker.committed(group, info.name)
                    groups[group] = {p: end - committed.get(p, 0) for p, end in enumerate(ends)}
                out.append(TopicDescription(info.name, info.partitions, ends, groups))
            return out
        finally:
            await broker.close()

    return run_async(main)


def offsets(spec: Spec) -> dict[str, Any]:
    """Where each source stands (its stored source offsets), each processor (its stored
    input positions, the inputs' ends and the lag; per task its stream time and the size
    of its window state) and each sink (its consumer group's committed offsets, the
    topic's end and the lag), read-only."""
    from runner.engine import group_name

    async def main() -> dict[str, Any]:
        broker = open_broker(spec, read_only=True)
        await broker.start()
        try:
            names = {t.name for t in await broker.topics()}
            sources = [{"name": s.name, "topic": s.topic, "offsets": await broker.source_offsets(s.name)}
                       for s in spec.sources]
            sinks = []
            for entry in spec.sinks:
                group = group_name(spec, entry)
                partitions = []
                for topic in entry.topics:
                    if topic not in names:
                        continue
                    committed = await broker.committed(group, topic)
                    for p, end in enumerate(await broker.end_offsets(topic)):
                        at = committed.get(p)
                        partitions.append({"topic": topic, "partition": p, "committed": at, "end": end,
                                           "lag": end - (at or 0)})
                sinks.append({"name": entry.name, "group": group, "partitions": partitions})
            processors = []
            for proc in spec.processors:
                stored = await broker.source_offsets(proc.name)
                ends = {t: await broker.end_offsets(t) for t in dict.fromkeys(proc.inputs) if t in names}
                processors.append(_processor_offsets(proc.name, stored, ends))
            return {"sources": sources, "processors": processors, "sinks": sinks}
        finally:
            await broker.close()

    return run_async(main)


def _processor_offsets(name: str, stored: dict[str, Any], ends: dict[str, list[int]]) -> dict[str, Any]:
    """A processor's stored offsets (see `runner.worker.processor`): "<topic>/<partition>"
    -> where that input partition resumes, "#state/<task>" -> the task's aggregation state.
    Once anything is stored, every partition of its inputs is listed (one not stored yet
    resumes at 0)."""
    positions: dict[tuple[str, int], int | None] = {}
    tasks = []
    for key, value in stored.items():
        if key.startswith("#state/") and isinstance(value, dict):
            tasks.append(_task_state(int(key.removeprefix("#state/")), value))
        elif isinstance(value, int):
            topic, _, partition = key.rpartition("/")
            positions[(topic, int(partition))] = value
    if stored:
        for topic, topic_ends in ends.items():
            for p in range(len(topic_ends)):
                positions.setdefault((topic, p), None)
    partitions = []
    for topic, p in sorted(positions):
        at = positions[(topic, p)]
        topic_ends = ends.get(topic)
        end = topic_ends[p] if topic_ends is not None and p < len(topic_ends) else None
        partitions.append({"topic": topic, "partition": p, "position": at, "end": end,
                           "lag": None if end is None else end - (at or 0)})
    return {"name": name, "partitions": partitions, "tasks": sorted(tasks, key=lambda t: t["task"])}


def _task_state(task: int, state: dict[str, Any]) -> dict[str, Any]:
    """A task's stream time and the size of its state tables (decoded from base64 Arrow
    IPC). Open windows: the rows of the table named "" (a window's partial aggregates),
    else of the largest table (a sliding window's buffered records)."""
    tables = {}
    for table, encoded in state.get("tables", {}).items():
        data = base64.b64decode(encoded)
        rows = sum(batch.num_rows for batch in pa.ipc.open_stream(data))
        tables[table] = {"bytes": len(data), "rows": rows}
    if "" in tables:
        windows = tables[""]["rows"]
    else:
        windows = max((t["rows"] for t in tables.values()), default=0)
    ms = state.get("stream_time")
    return {"task": task, "stream_time": ms, "stream_time_utc": None if ms is None else _iso(ms),
            "state_bytes": sum(t["bytes"] for t in tables.values()), "open_windows": windows, "tables": tables}


def _iso(ms: int) -> str:
    at = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(milliseconds=ms)
    return at.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def consume(
    spec: Spec,
    topic: str,
    emit: Callable[[str], None],
    *,
    from_beginning: bool = False,
    max_records: int | None = None,
    follow: bool = False,
    meta: bool = False,
) -> int:
    """Print a topic's records as JSON lines (decoded from Avro); returns how many."""

    async def main() -> int:
        broker = open_broker(spec, read_only=True)
        await broker.start()
        registry = open_registry(spec, read_only=True)
        try:
            names = {t.name for t in await broker.topics()}
            if topic not in names:
                raise UsageError(
                    f"no topic {topic!r} in {spec.state_dir}",
                    hint=f"topics: {', '.join(sorted(names)) or 'none'}",
                )
            decoder = AvroDecoder(registry.schema_by_id)
            consumer = await broker.consumer(None, [topic])  # no group: reads, never commits
            ends = await broker.end_offsets(topic)
            for tp in await consumer.assignment():
                await consumer.seek(tp, 0 if from_beginning else ends[tp.partition])
            dumps = json.JSONEncoder(default=json_default, ensure_ascii=False).encode
            count = 0
            while max_records is None or count < max_records:
                want = 1000 if max_records is None else min(1000, max_records - count)
                fetched = await consumer.fetch(want, 0.5 if follow else 0.05)
                if not fetched:
                    if follow:
                        continue
                    if all([await consumer.position(TopicPartition(topic, p)) >= e for p, e in enumerate(ends)]):
                        break
                    continue
                for fb in fetched:
                    rows, failures = decoder.decode(fb.values)
                    bad = {f.index: f.error for f in failures}
                    for i, row in enumerate(rows):
                        if count == max_records:  # a fetch may hold more than asked
                            break
                        value = row if i not in bad else {"error": bad[i]}
                        if meta:
                            key = fb.keys[i]
                            value = {
                                "partition": fb.partition,
                                "offset": fb.offsets[i],
                                "timestamp": fb.timestamps[i],
                                "key": key.decode("utf-8", "replace") if key is not None else None,
                                "value": value,
                            }
                        emit(dumps(value))
                        count += 1
            await consumer.close()
            return count
        finally:
            registry.close()
            await broker.close()

    return run_async(main)


def runs(spec: Spec, source: str | None, limit: int) -> list[Run]:
    """The run history of the spec's scheduled sources (oldest first)."""
    path = spec.state_dir / "runs.db"
    if source is not None and source not in {s.name for s in spec.sources}:
        raise UsageError(f"no source {source!r} in {spec.file}", hint=f"sources: {', '.join(s.name for s in spec.sources) or 'none'}")
    if not path.exists():
        return []
    history = RunHistory(path, read_only=True)
    try:
        return history.list(source, limit)
    finally:
        history.close()


def schedules(spec: Spec, count: int, now: datetime.datetime | None = None) -> list[tuple[str, str, str, str, list[datetime.datetime]]]:
    """Per scheduled source: name, schedule, catchup, last run ("outcome at time"), and
    its next `count` run times."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    path = spec.state_dir / "runs.db"
    history = RunHistory(path, read_only=True) if path.exists() else None
    out = []
    try:
        for entry in spec.sources:
            if entry.schedule is None:
                continue
            last = "-"
            if history is not None:
                done = [r for r in history.list(entry.name, 20) if r.outcome != "skipped"]
                if done:
                    r = done[-1]
                    last = f"{r.outcome} at {r.started.strftime('%Y-%m-%d %H:%M:%S')}"
            # Interval ticks count from the start of `pipeline run`; shown from now.
            out.append((entry.name, entry.schedule.describe(), entry.schedule.catchup, last,
                        entry.schedule.upcoming(now, count, anchor=now)))
    finally:
        if history is not None:
            history.close()
    return out
