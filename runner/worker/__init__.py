"""The worker: runs every source and sink task of a pipeline in one asyncio process.

- `source`: SourceRunner — poll → encode (the schema check) → key/partition → produce
  (+ source offsets, one transaction on the embedded broker) → `committed`.
- `sink`: SinkRunner — fetch → decode → put → … → flush → commit consumer offsets.
- `processor`: ProcessorRunner — fetch every input partition → windowed aggregation →
  produce the closed windows (+ input offsets and state, one transaction on embedded).
- `scheduled`: ScheduledRunner — a source task as a bounded job at each schedule tick.
- `group`: WorkerGroup — the source tasks and processors, here or shared among processes (Kafka).
- `common`: counters, topics, the error policy (dead letters), retries, error reports.

Everything moves in batches: the engine makes no per-record hook call, queue hop or await.
"""

from runner.worker.common import (
    Counters,
    DeadLetters,
    Topic,
    errors_named,
    first_error,
    retrying,
)
from runner.worker.group import WorkerGroup, TaskSlot
from runner.worker.processor import ProcessorRunner, Task
from runner.worker.scheduled import ScheduledRunner
from runner.worker.sink import SinkRunner
from runner.worker.source import SourceRunner

__all__ = [
    "Counters",
    "DeadLetters",
    "ProcessorRunner",
    "ScheduledRunner",
    "SinkRunner",
    "SourceRunner",
    "Task",
    "TaskSlot",
    "WorkerGroup",
    "Topic",
    "errors_named",
    "first_error",
    "retrying",
]
