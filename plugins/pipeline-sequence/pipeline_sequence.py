"""`sequence`: a source of numbered records — {"n": 0}, {"n": 1}, … — for demos and
load tests. A complete third-party connector: typed config, a task that resumes from its
offset, and the hook that registers it."""

from __future__ import annotations

from typing import Any

from runner.batch import Batch
from runner.connector import Config, Source, SourceTask, hookimpl, setting


class Sequence(Source):
    name = "sequence"
    description = "Numbered records {n, key}: n from 0 up to count (or forever)."

    class Config(Config):
        count: int | None = setting(1000, help="How many records in all (null: endless).", min=0)
        keys: int = setting(10, help="Distinct values of the `key` field (n mod keys).", min=1)
        batch_size: int = setting(1000, help="Records per batch.", min=1)

    def tasks(self) -> list[SourceTask]:
        return [SequenceTask(self.config)]


class SequenceTask(SourceTask):
    def __init__(self, config: Any) -> None:
        self.config = config
        self.next = 0

    async def open(self, offsets: dict[str, Any]) -> None:
        self.next = offsets.get("sequence", 0)  # resume after the last committed batch

    async def poll(self) -> Batch | None:
        count, size = self.config.count, self.config.batch_size
        end = self.next + size if count is None else min(self.next + size, count)
        if end <= self.next:
            return None
        keys = self.config.keys
        rows = [{"n": n, "key": f"k{n % keys}"} for n in range(self.next, end)]
        self.next = end
        return Batch(rows, source_offsets={"sequence": end})


@hookimpl
def register_connectors(register):
    register(Sequence)
