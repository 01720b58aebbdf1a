"""The worker group's task bookkeeping (runner/worker/group.py), on real asyncio tasks."""

from __future__ import annotations

import asyncio

from runner.broker.base import TopicPartition
from runner.worker.group import TaskSlot, WorkerGroup


class _Task:
    """A task that runs until stopped, then takes a moment to write its last batch."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    async def run(self) -> None:
        await self.stop.wait()
        await asyncio.sleep(0.01)


def test_two_stops_of_one_task_at_once_remove_it_once() -> None:
    """A revocation arriving while the run itself stops its tasks: both wait for the same
    task, and the second used to fail with KeyError when the first had removed it."""

    async def main() -> None:
        group = WorkerGroup("p", "source-tasks", [TaskSlot("src", 0, _Task)], broker=None, stop=asyncio.Event(),
                            once=True)
        await group._assigned([TopicPartition("_pipeline-p-source-tasks", 0)])
        assert list(group.running) == [0]
        await asyncio.gather(group._stop([0]), group._release([TopicPartition("_pipeline-p-source-tasks", 0)]))
        assert group.running == {}

    asyncio.run(main())
